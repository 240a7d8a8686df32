"""python -m experiments.explain: Integrated Gradients finds a planted token, completeness holds within the
reported delta, the page and pictures are written, NER / QA / PEFT exports are explained."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from experiments import explain
from tests.conftest import build_tiny_bert

FILLER = ["the", "a", "film", "movie", "plot", "actor", "scene", "story", "music", "ending", "was", "is", "very",
          "quite", "long", "short", "red", "blue", "green", "old", "new", "day", "night", "city"]
PLANTED = "zebra"
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _sentence(rng: random.Random, planted: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
    if planted:
        words.insert(rng.randint(0, len(words)), PLANTED)
    return " ".join(words)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "explanations.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def planted_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT classifier trained (plain torch) on sentences whose label is only whether 'zebra' occurs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = build_tiny_bert(tmp_path_factory.mktemp("planted_base"), [*FILLER, PLANTED, "lion", "john", "paris"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, id2label={0: "negative", 1: "positive"})
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to threads on shared cores
    try:
        running = 0.7
        # stop once the rule is learned: training on to a loss near 0 makes the output a near-step function of
        # the embeddings, which Integrated Gradients then needs many more steps to integrate
        for _ in range(400):
            labels = [rng.random() < 0.5 for _ in range(32)]
            batch = tokenizer([_sentence(rng, y) for y in labels], padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor(labels, dtype=torch.long)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running = 0.9 * running + 0.1 * float(loss)
            if running < 0.2:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
    export = tmp_path_factory.mktemp("planted") / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    return export


@pytest.fixture(scope="module")
def planted_run(planted_export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("planted_run")
    rng = random.Random(1)
    rows = [{"text": _sentence(rng, k % 2 == 0), "label": "positive" if k % 2 == 0 else "negative"} for k in range(16)]
    data = _write_jsonl(tmp / "test.jsonl", rows)
    out = tmp / "out"
    code = explain.main(["--model", str(planted_export), "--input", str(data), "--output", str(out), "--n_steps", "200",
                         "--batch_size", "8", "--attention_example", "2", "--no_progress"])
    assert code == 0
    return out, rows


def test_planted_token_ranks_first(planted_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, data = planted_run
    rows = _rows(out)
    assert [r["gold"] for r in rows] == [d["label"] for d in data]
    assert sum(r["prediction"] == r["gold"] for r in rows) >= 15  # the model learned the rule
    positives = [r for r in rows if r["prediction"] == "positive" and PLANTED in r["text"].split()]
    assert len(positives) >= 7
    for r in positives:
        exp = r["explanations"][0]
        assert exp["target"] == "positive"
        assert r["tokens"][int(np.argmax(exp["attributions"]))] == PLANTED, (r["tokens"], exp["attributions"])


def test_completeness_within_reported_delta(planted_run: tuple[Path, list[dict[str, Any]]]) -> None:
    rows = _rows(planted_run[0])
    for r in rows:
        (exp,) = r["explanations"]
        total = sum(exp["attributions"])
        diff = exp["score"] - exp["baseline_score"]
        # Captum's delta is sum(attributions) - (F(x) - F(baseline)); the scores here come from separate passes
        assert abs(total - diff) == pytest.approx(abs(exp["delta"]), abs=1e-5)
        assert abs(exp["delta"]) < 0.01 * max(1.0, abs(diff))
        if PLANTED in r["text"].split():
            assert abs(diff) > 1.0  # not vacuous: without the planted token the baseline scores far lower


def test_outputs_page_pictures_and_one_score_per_token(planted_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, data = planted_run
    rows = _rows(out)
    assert len(rows) == len(data)
    for r in rows:
        assert r["tokens"][0] == "[CLS]" and r["tokens"][-1] == "[SEP]"
        for exp in r["explanations"]:
            assert len(exp["attributions"]) == len(r["tokens"]) == len(exp["rollout"])
            assert exp["attributions"][0] == 0.0 and exp["attributions"][-1] == 0.0  # kept in the baseline
            assert sum(exp["rollout"]) == pytest.approx(1.0, abs=1e-4)
    page = (out / "explanations.html").read_text(encoding="utf-8")
    assert page.count("<tr>") == len(rows) + 1  # header + one row per example (one explained output each)
    assert PLANTED in page and "positive" in page and "negative" in page
    for remote in ("http://", "https://", "<script", "<link"):
        assert remote not in page  # self-contained
    for name in ("attention_2.png", "rollout_2.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 5000


def test_attention_rollout_by_hand() -> None:
    a = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [0.2, 0.8]]])  # one layer, two heads
    layer = 0.5 * a.mean(0) + 0.5 * np.eye(2)
    assert np.allclose(explain.attention_rollout(a[None]), layer)
    two = explain.attention_rollout(np.stack([a, a]))
    assert np.allclose(two, layer @ layer)
    assert np.allclose(two.sum(-1), 1.0)


@pytest.fixture(scope="module")
def tagger_and_reader(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny random NER and QA exports (save_pretrained + tokenizer, with id2label)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification, AutoTokenizer

    tmp = tmp_path_factory.mktemp("ner_qa")
    base = build_tiny_bert(tmp / "base", ["john", "smith", "lives", "in", "paris", "who", "where", "does", "live",
                                          "the", "city", "of", "light"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    ner = AutoModelForTokenClassification.from_pretrained(base, id2label=dict(enumerate(TAGS)))
    with torch.no_grad():  # every word I-PER: one entity over the whole sentence, several words to sum over
        ner.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))
    ner.save_pretrained(tmp / "ner")
    tokenizer.save_pretrained(tmp / "ner")
    qa = AutoModelForQuestionAnswering.from_pretrained(base)
    qa.save_pretrained(tmp / "qa")
    tokenizer.save_pretrained(tmp / "qa")
    return tmp / "ner", tmp / "qa"


def test_ner_explains_each_predicted_entity(tagger_and_reader: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    ner, _ = tagger_and_reader
    data = _write_jsonl(tmp_path / "ner.jsonl", [
        {"tokens": ["john", "smith", "lives", "in", "paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
        {"tokens": ["zzz", "smithy"], "tags": ["O", "O"]},  # an unknown word and a word of two sub-tokens
    ])
    assert explain.main(["--model", str(ner), "--input", str(data), "--output", str(tmp_path / "out"),
                         "--n_steps", "16", "--no_progress"]) == 0
    rows = _rows(tmp_path / "out")
    model = AutoModelForTokenClassification.from_pretrained(ner).eval()
    tokenizer = AutoTokenizer.from_pretrained(ner)
    for r in rows:
        assert r["predicted_tags"] == ["I-PER"] * len(r["words"])
        assert r["prediction"] == [{"type": "PER", "start_word": 0, "end_word": len(r["words"]) - 1,
                                    "text": " ".join(r["words"])}]
        (exp,) = r["explanations"]
        assert exp["target"] == "PER: " + " ".join(r["words"]) and len(exp["attributions"]) == len(r["tokens"])
        # the explained output is the sum of the predicted tag's logits at each word's first sub-token
        enc = tokenizer(r["words"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        firsts = [enc.word_ids(0).index(w) for w in range(len(r["words"]))]
        assert exp["score"] == pytest.approx(float(sum(logits[t, 2] for t in firsts)), abs=1e-4)
        assert abs(sum(exp["attributions"]) - (exp["score"] - exp["baseline_score"])) < 1e-3
    assert rows[0]["gold_entities"] == [{"type": "PER", "start_word": 0, "end_word": 1, "text": "john smith"},
                                        {"type": "LOC", "start_word": 4, "end_word": 4, "text": "paris"}]
    assert len(rows[1]["tokens"]) > len(rows[1]["words"]) + 2  # sub-tokens are shown and attributed
    page = (tmp_path / "out" / "explanations.html").read_text(encoding="utf-8")
    assert "PER: john smith lives in paris" in page and "LOC: paris" in page  # prediction and gold entities


def test_qa_explains_start_and_end_over_windows(tagger_and_reader: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    _, qa = tagger_and_reader
    long_context = " ".join(["the city of light"] * 12 + ["john smith lives in paris"])
    data = _write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "a", "question": "where does john live", "context": "john smith lives in paris",
         "answers": {"text": ["paris"], "answer_start": [20]}},
        {"id": "b", "question": "who lives in paris", "context": long_context,
         "answers": {"text": ["john smith"], "answer_start": [long_context.index("john")]}},
    ])
    out = tmp_path / "out"
    assert explain.main(["--model", str(qa), "--input", str(data), "--output", str(out), "--n_steps", "16",
                         "--max_seq_length", "24", "--no_progress"]) == 0  # the long context needs several windows
    rows = _rows(out)
    model = AutoModelForQuestionAnswering.from_pretrained(qa).eval()
    tokenizer = AutoTokenizer.from_pretrained(qa)
    for r, ex in zip(rows, [json.loads(line) for line in data.read_text().splitlines()]):
        pred = r["prediction"]
        assert ex["context"][pred["answer_start"]: pred["answer_start"] + len(pred["text"])] == pred["text"]
        start, end = r["explanations"]
        assert (start["target"], end["target"]) == ("start", "end")
        assert 0 < start["token"] <= end["token"] < len(r["tokens"]) - 1
        assert r["tokens"].index("[SEP]") < start["token"]  # the answer lies in the context, not the question
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(r["tokens"])])
        types = torch.tensor([[0] * (r["tokens"].index("[SEP]") + 1) + [1] * (len(r["tokens"]) - r["tokens"].index("[SEP]") - 1)])
        with torch.no_grad():
            o = model(input_ids=ids, token_type_ids=types)
        assert start["score"] == pytest.approx(float(o.start_logits[0, start["token"]]), abs=1e-4)
        assert end["score"] == pytest.approx(float(o.end_logits[0, end["token"]]), abs=1e-4)
        for e in (start, end):
            assert len(e["attributions"]) == len(r["tokens"])
            assert abs(sum(e["attributions"]) - (e["score"] - e["baseline_score"])) < 1e-3
    assert len(rows[1]["tokens"]) <= 24 and rows[1]["gold"] == ["john smith"]


def test_peft_adapter_export(tmp_path: Path) -> None:
    """A LoRA adapter folder as peft alone writes it (adapter + tokenizer, no config.json: the label names are unknown),
    three classes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = build_tiny_bert(tmp_path / "base", FILLER)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    adapter = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2,
                                               init_lora_weights=False))
    adapter.eval()
    export = tmp_path / "export"
    adapter.save_pretrained(export)
    AutoTokenizer.from_pretrained(base).save_pretrained(export)
    texts = ["the film was very long", "a new story", "old music"]
    data = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    assert explain.main(["--model", str(export), "--input", str(data), "--output", str(tmp_path / "out"),
                         "--n_steps", "16", "--no_progress"]) == 0
    rows = _rows(tmp_path / "out")
    with torch.no_grad():
        expected = adapter(**AutoTokenizer.from_pretrained(base)(texts, padding=True, return_tensors="pt")).logits
    assert [r["prediction"] for r in rows] == [f"LABEL_{int(k)}" for k in expected.argmax(-1)]
    assert all(r["gold"] is None and len(r["explanations"][0]["attributions"]) == len(r["tokens"]) for r in rows)


def test_user_errors_are_one_line(planted_export: Path, tagger_and_reader: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_jsonl(tmp_path / "in.jsonl", [{"text": "the film", "label": "positive"}])
    bad = tmp_path / "in.xlsx"
    bad.write_text("the film\n")
    cases = [
        (["--model", str(tmp_path / "nope"), "--input", str(data)], "--model: folder"),
        (["--model", str(planted_export), "--input", str(data), "--task", "ner"], "--task: ner, but"),
        (["--model", str(planted_export), "--input", str(bad)], "unsupported file type '.xlsx'"),
        (["--model", str(planted_export), "--input", str(tmp_path / "missing.jsonl")], "--input: file"),
        (["--model", str(tagger_and_reader[0]), "--input", str(data)], "no tokens column"),
        (["--model", str(planted_export), "--input", str(data), "--attention_example", "5"], "--attention_example"),
    ]
    for args, message in cases:
        assert explain.main([*args, "--output", str(tmp_path / "o"), "--no_progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_default_output_is_beside_the_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "sst2" / "2026-01-01_00-00-00"
    (run / "export").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    out = explain.default_output(run / "export")
    assert out.parent == run.parent.resolve() and out.name.endswith("-explain")  # never inside the earlier run
    plain = tmp_path / "some_model"
    plain.mkdir()
    assert explain.default_output(plain).parts[:2] == ("runs", "explain")


@pytest.mark.parametrize("tool", ["explain", "compress", "compress_benchmark"])
def test_the_tools_put_transformers_logging_back(tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools quieten transformers while they run and restore its verbosity and progress bars when they return,
    error or not: run in-process (tests, notebooks), they once left the load reports off for whatever came next."""
    import importlib

    from transformers.utils import logging as hf_logging

    module = importlib.import_module(f"experiments.{tool}")
    data = _write_jsonl(tmp_path / "in.jsonl", [{"text": "the film", "label": "positive"}])
    args = {"explain": ["--input", str(data)], "compress": ["--output", str(tmp_path / "o"), "--int8"],
            "compress_benchmark": ["--data", str(data)]}[tool]
    seen: list[int] = []
    original = module.parse_args

    def parse_and_look(argv: list[str] | None = None) -> Any:
        seen.append(hf_logging.get_verbosity())  # inside main: quiet
        return original(argv)

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    monkeypatch.setattr(module, "parse_args", parse_and_look)
    assert module.main(["--model", str(tmp_path / "nope"), *args]) == 2
    assert seen == [hf_logging.ERROR]
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()
