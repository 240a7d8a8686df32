"""Extractive question answering (SQuAD v1.1 / v2.0) on any Hugging Face encoder.

The model scores every token as the start and the end of the answer, per window. Evaluation keeps
each window's logits, gathers them from all processes at the end of the epoch, and post-processes
them per question (:func:`postprocess_qa`: best valid span over all of a question's windows, mapped
back to the context text, compared with the no-answer score for SQuAD v2.0). The answers are scored
with the official SQuAD exact match and F1 (:class:`SquadMetric`).
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from datamodules.question_answering import QAFeatures
from lit_modules.base import ConfigError, TransformerModule

# ---- the official SQuAD evaluation (v1.1 and v2.0 scripts) ---------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace (as the official scripts)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1(prediction: str, gold: str, version_2: bool) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)  # v2.0: both empty (no answer) is a match
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str], version_2: bool = False) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers, each in [0, 1].

    v2.0 ignores gold answers that normalise to nothing; no gold answer means "no answer" (``""``).
    """
    if version_2:
        golds = [g for g in golds if normalize_answer(g)]
    golds = list(golds) or [""]
    norm = normalize_answer(prediction)
    exact = max(float(norm == normalize_answer(g)) for g in golds)
    return exact, max(_f1(prediction, g, version_2) for g in golds)


class SquadMetric(Metric):
    """SQuAD exact match and F1 (0-100), as the official v1.1 / v2.0 evaluation scripts compute them.

    ``update(predictions, gold_answers, indices)`` takes each question's predicted text, its gold answer
    texts (an empty list: unanswerable) and its number in the split. Per-question scores are kept in
    list states, so several processes sync them exactly; a question number seen twice (a sampler that pads
    processes with repeats; the project's own evaluation sampler never does) counts once. v2.0 adds ``has_ans_*`` and ``no_ans_*`` over the answerable
    and unanswerable questions.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, version_2: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version_2 = version_2
        for name in ("index", "exact", "f1", "has_answer"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], gold_answers: Sequence[Sequence[str]],
               indices: Sequence[int] | torch.Tensor) -> None:
        if len(predictions) != len(gold_answers) or len(predictions) != len(indices):
            raise ValueError("predictions, gold_answers and indices must be equally long")
        scores = [squad_scores(p, g, self.version_2) for p, g in zip(predictions, gold_answers)]
        self.index.append(torch.as_tensor(indices, dtype=torch.long, device=self.device).reshape(-1))
        self.exact.append(torch.tensor([s[0] for s in scores], dtype=torch.float64, device=self.device))
        self.f1.append(torch.tensor([s[1] for s in scores], dtype=torch.float64, device=self.device))
        self.has_answer.append(torch.tensor([len(g) > 0 for g in gold_answers], dtype=torch.bool, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        # list states are lists before a sync and one concatenated tensor after it
        index, exact, f1, has = (dim_zero_cat(s) if isinstance(s, torch.Tensor) or s else torch.empty(0)
                                 for s in (self.index, self.exact, self.f1, self.has_answer))
        if not index.numel():
            return {"exact_match": torch.tensor(0.0), "f1": torch.tensor(0.0)}
        _, first = np.unique(index.cpu().numpy(), return_index=True)
        keep = torch.as_tensor(first, device=index.device)
        exact, f1, has = exact[keep], f1[keep], has[keep]
        out = {"exact_match": 100 * exact.mean(), "f1": 100 * f1.mean()}
        if self.version_2:
            for name, subset in (("has_ans", has), ("no_ans", ~has)):
                if subset.any():
                    out[f"{name}_exact_match"] = 100 * exact[subset].mean()
                    out[f"{name}_f1"] = 100 * f1[subset].mean()
        return {k: v.float() for k, v in out.items()}


# ---- post-processing ---------------------------------------------------------------------------

@dataclass
class QAPredictions:
    """Post-processed answers: one entry per question in ``examples`` (question numbers, ascending)."""

    examples: np.ndarray
    texts: list[str]
    best_scores: np.ndarray  # start + end logit of the best span (-inf: no valid span)
    null_scores: np.ndarray  # the lowest CLS start + end logit over the question's windows
    n_best: Optional[list[list[dict[str, Any]]]] = None


def postprocess_qa(
    features: QAFeatures,
    rows: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    examples: Optional[np.ndarray] = None,
    with_n_best: bool = False,
) -> QAPredictions:
    """Window logits -> one answer text per question, vectorised over all windows at once.

    ``rows`` are the feature rows the logits ``[len(rows), width]`` belong to (positions past a window's
    length hold anything; they are outside the context). Per window, the ``n_best_size`` best start and end
    tokens inside the context are paired; spans that end before they start or are longer than
    ``max_answer_length`` tokens are discarded; each question keeps its ``n_best_size`` best spans over
    all its windows. With ``version_2_with_negative`` the answer is empty when the no-answer score (CLS)
    beats the best span by more than ``null_score_diff_threshold``. ``examples`` restricts the work to
    those questions (each process post-processes its share).
    """
    rows = np.asarray(rows, dtype=np.int64)
    example = features.example[rows]
    if examples is not None:
        keep = np.isin(example, examples)
        rows, example = rows[keep], example[keep]
        start_logits, end_logits = start_logits[keep], end_logits[keep]
    width = min(start_logits.shape[1], features.offset_start.shape[1])
    starts = np.asarray(start_logits[:, :width], dtype=np.float32)
    ends = np.asarray(end_logits[:, :width], dtype=np.float32)
    char_start, char_end = features.offset_start[rows, :width], features.offset_end[rows, :width]
    n = len(rows)
    arange = np.arange(n)
    cls = features.cls_index[rows]
    null = starts[arange, cls] + ends[arange, cls]

    in_context = char_start >= 0
    s_masked = np.where(in_context, starts, -np.inf)
    e_masked = np.where(in_context, ends, -np.inf)
    k = min(n_best_size, width)
    s_top = np.argpartition(-s_masked, k - 1, axis=1)[:, :k]
    e_top = np.argpartition(-e_masked, k - 1, axis=1)[:, :k]
    s_val = np.take_along_axis(s_masked, s_top, 1)
    e_val = np.take_along_axis(e_masked, e_top, 1)
    score = s_val[:, :, None] + e_val[:, None, :]  # [n, k start, k end]
    s_tok = np.broadcast_to(s_top[:, :, None], score.shape)
    e_tok = np.broadcast_to(e_top[:, None, :], score.shape)
    r = arange[:, None, None]
    valid = (np.isfinite(score) & (e_tok >= s_tok) & (e_tok - s_tok < max_answer_length)
             & (char_end[r, e_tok] > char_start[r, s_tok]))
    score = np.where(valid, score, -np.inf).reshape(n, k * k)

    # each window's best pairs, then each question's best over its windows
    m = min(n_best_size, k * k)
    pick = np.argpartition(-score, m - 1, axis=1)[:, :m]
    cand_score = np.take_along_axis(score, pick, 1).ravel()
    cand_feat = np.repeat(arange, m)
    cand_s = s_top[cand_feat, pick.ravel() // k]
    cand_e = e_top[cand_feat, pick.ravel() % k]
    ok = np.isfinite(cand_score)
    cand_score, cand_feat, cand_s, cand_e = cand_score[ok], cand_feat[ok], cand_s[ok], cand_e[ok]
    cand_ex = example[cand_feat]
    order = np.lexsort((-cand_score, cand_ex))
    cand_score, cand_feat, cand_s, cand_e, cand_ex = (
        a[order] for a in (cand_score, cand_feat, cand_s, cand_e, cand_ex))
    group_ex, group_start = np.unique(cand_ex, return_index=True)
    rank = np.arange(len(cand_ex)) - np.repeat(group_start, np.diff(np.append(group_start, len(cand_ex))))
    top = rank < n_best_size

    questions = np.unique(example)
    slot = np.searchsorted(questions, example)
    null_min = np.full(len(questions), np.inf, dtype=np.float32)
    np.minimum.at(null_min, slot, null)
    best = np.full(len(questions), -np.inf, dtype=np.float32)
    best_feat = np.zeros(len(questions), dtype=np.int64)
    best_s = np.zeros(len(questions), dtype=np.int64)
    best_e = np.zeros(len(questions), dtype=np.int64)
    where = np.searchsorted(questions, group_ex)
    best[where] = cand_score[group_start]
    best_feat[where], best_s[where], best_e[where] = cand_feat[group_start], cand_s[group_start], cand_e[group_start]

    texts: list[str] = []
    for q, example_number in enumerate(questions.tolist()):
        answer = ""
        if np.isfinite(best[q]) and not (version_2_with_negative and null_min[q] - best[q] > null_score_diff_threshold):
            f = best_feat[q]
            answer = features.contexts[example_number][char_start[f, best_s[q]]: char_end[f, best_e[q]]]
        texts.append(answer)
    result = QAPredictions(questions, texts, best, null_min)
    if with_n_best:
        result.n_best = _n_best_lists(features, questions, cand_ex[top], cand_feat[top], cand_s[top], cand_e[top],
                                      cand_score[top], starts, ends, char_start, char_end,
                                      null_min if version_2_with_negative else None)
    return result


def _n_best_lists(features: QAFeatures, questions: np.ndarray, ex: np.ndarray, feat: np.ndarray, s: np.ndarray,
                  e: np.ndarray, score: np.ndarray, starts: np.ndarray, ends: np.ndarray, char_start: np.ndarray,
                  char_end: np.ndarray, null: Optional[np.ndarray]) -> list[list[dict[str, Any]]]:
    """Each question's candidates (best first) with text, character span, logits and softmax probability."""
    lists: list[list[dict[str, Any]]] = [[] for _ in questions]
    slots = np.searchsorted(questions, ex)
    for slot, example_number, f, a, b, sc in zip(slots.tolist(), ex.tolist(), feat.tolist(), s.tolist(), e.tolist(),
                                                 score.tolist()):
        begin, stop = int(char_start[f, a]), int(char_end[f, b])
        lists[slot].append({"text": features.contexts[example_number][begin:stop], "start": begin, "end": stop,
                            "score": sc, "start_logit": float(starts[f, a]), "end_logit": float(ends[f, b])})
    for slot, entries in enumerate(lists):
        if null is not None:
            entries.append({"text": "", "start": None, "end": None, "score": float(null[slot])})
            entries.sort(key=lambda x: -x["score"])
        if entries:
            scores = np.array([x["score"] for x in entries], dtype=np.float64)
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            for entry, p in zip(entries, probs.tolist()):
                entry["probability"] = p
    return lists


# ---- the module --------------------------------------------------------------------------------

EVALUATION_OPTIONS = ("n_best_size", "max_answer_length", "null_score_diff_threshold")

class QuestionAnsweringModule(TransformerModule):
    """Extractive QA (``AutoModelForQuestionAnswering``), evaluated with the official SQuAD EM / F1.

    Args:
        version_2_with_negative: the model may answer "no answer" (SQuAD v2.0); ``null`` takes it from the
            data (true when the training data, or else the evaluation data, has unanswerable questions).
            Stored in the checkpoint.
        n_best_size: start and end tokens considered per window, and candidate answers kept per question.
        max_answer_length: longest answer, in tokens.
        null_score_diff_threshold: v2.0: answer "" when the no-answer score beats the best span by more.
            These three are read from the config (also with ``--ckpt_path``), never from the checkpoint.
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.

    Logs ``val/exact_match``, ``val/f1`` (v2.0 also ``val/has_ans_*``, ``val/no_ans_*``) and ``val/loss``,
    the same for ``test/``. ``predict`` writes ``predictions.jsonl`` (per question: the answer and the
    n-best list with scores and probabilities) and the official ``predictions.json`` (``{id: answer}``).
    """

    peft_task_type = "QUESTION_ANS"

    def __init__(
        self,
        version_2_with_negative: Optional[bool] = None,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_best_size < 1:
            raise ConfigError(f"model.n_best_size: expected a positive integer, got {n_best_size}")
        if max_answer_length < 1:
            raise ConfigError(f"model.max_answer_length: expected a positive integer, got {max_answer_length}")
        self.version_2_with_negative = version_2_with_negative
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.null_score_diff_threshold = null_score_diff_threshold
        self._windows: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def setup(self, stage: str) -> None:
        """Decide SQuAD v1.1 or v2.0 from the data when not given; the checkpoint keeps the choice."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        flags: dict[str, bool] = getattr(dm, "has_unanswerable", {}) or {}
        if self.version_2_with_negative is None:
            self.version_2_with_negative = flags["train"] if "train" in flags else any(flags.values())
        self.save_hyperparameters({**self.hparams, "version_2_with_negative": self.version_2_with_negative})
        # How answers are read off the logits is an evaluation choice: keep it out of the checkpoint, whose
        # hyperparameters LightningCLI would otherwise put over the command line of `test` / `predict`.
        for key in EVALUATION_OPTIONS:
            self.hparams.pop(key, None)

    def build_model(self) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return self.from_pretrained(AutoModelForQuestionAnswering)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"squad": SquadMetric(version_2=bool(self.version_2_with_negative))})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError("question answering scores whole questions at the end of the epoch")

    # ---- evaluation: keep window logits per step, answer and score per question per epoch --------

    def _keep_windows(self, stage: str, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["attention_mask"].bool()  # real tokens, in order, whichever side the padding is on
        self._windows.setdefault(stage, []).append((
            batch["idx"].detach().cpu(), mask.sum(1).cpu(),
            outputs.start_logits.detach().float()[mask].cpu(), outputs.end_logits.detach().float()[mask].cpu(),
        ))

    def evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        outputs = self(**self.model_inputs(batch))
        self._keep_windows(stage, outputs, batch)
        if outputs.loss is not None:
            n = batch["input_ids"].shape[0]
            loss_metric, _ = self.stage_metrics(stage)
            positions = [batch["start_positions"], batch["end_positions"]]
            loss_metric.update(self._unpadded_loss(outputs, batch["attention_mask"], positions), weight=n)
            self.log(f"{stage}/loss", loss_metric, prog_bar=stage == "val", batch_size=n)

    @staticmethod
    def _unpadded_loss(outputs: Any, attention_mask: torch.Tensor, positions: list[torch.Tensor]) -> torch.Tensor:
        """The model's span loss with padding positions left out of the softmax (Hugging Face keeps them), so
        a window's loss does not depend on how wide its batch was padded, nor on how windows were batched."""
        pad = ~attention_mask.bool()
        losses = [torch.nn.functional.cross_entropy(logits.detach().float().masked_fill(pad, float("-inf")), target)
                  for logits, target in zip((outputs.start_logits, outputs.end_logits), positions)]
        return (losses[0] + losses[1]) / 2

    def _gather_windows(self, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's window logits from every process: (feature rows, start [n, width], end [n, width])."""
        parts = self._windows.pop(stage, [])
        if parts:
            idx, lengths, start, end = (torch.cat(column) for column in zip(*parts))
        else:
            idx, lengths = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
            start, end = torch.empty(0), torch.empty(0)
        if self.trainer is not None and self.trainer.world_size > 1:
            from torchmetrics.utilities.distributed import gather_all_tensors

            idx, lengths, start, end = (torch.cat(gather_all_tensors(t.to(self.device))).cpu()
                                        for t in (idx, lengths, start, end))
        idx, lengths = idx.numpy(), lengths.numpy()
        begin = np.cumsum(lengths) - lengths
        rows, first = np.unique(idx, return_index=True)  # repeats only from a sampler that pads processes
        lengths, begin = lengths[first], begin[first]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        take = np.repeat(begin, lengths) + within
        row_of = np.repeat(np.arange(len(rows)), lengths)
        out = []
        for flat in (start.numpy(), end.numpy()):
            padded = np.full((len(rows), int(lengths.max(initial=0))), -np.inf, dtype=np.float32)
            padded[row_of, within] = flat[take]
            out.append(padded)
        return rows, out[0], out[1]

    def _postprocess(self, split: str, rows: np.ndarray, start: np.ndarray, end: np.ndarray,
                     examples: Optional[np.ndarray] = None,
                     with_n_best: bool = False) -> tuple[QAFeatures, QAPredictions]:
        features = self.trainer.datamodule.qa_features(split)
        return features, postprocess_qa(
            features, rows, start, end, n_best_size=self.n_best_size, max_answer_length=self.max_answer_length,
            version_2_with_negative=bool(self.version_2_with_negative),
            null_score_diff_threshold=self.null_score_diff_threshold, examples=examples, with_n_best=with_n_best,
        )

    def _score_epoch(self, stage: str, split: str) -> None:
        rows, start, end = self._gather_windows(stage)
        if not len(rows):
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        features = self.trainer.datamodule.qa_features(split)
        questions = np.unique(features.example[rows])
        mine = questions[questions % world == rank]  # each process answers and scores its share, once
        _, predictions = self._postprocess(split, rows, start, end, examples=mine)
        _, metrics = self.stage_metrics(stage)
        metrics.update(predictions.texts, [features.answers[i] for i in predictions.examples.tolist()],
                       torch.as_tensor(predictions.examples))
        values = metrics.compute()  # syncs the per-question scores of all processes
        metrics.reset()
        self.log_dict(values, prog_bar=stage == "val")

    def on_validation_epoch_start(self) -> None:
        self._windows["val"] = []

    def on_validation_epoch_end(self) -> None:
        self._score_epoch("val", "validation")

    def on_test_epoch_start(self) -> None:
        self._windows["test"] = []

    def on_test_epoch_end(self) -> None:
        self._score_epoch("test", "test")

    # ---- prediction ----------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list:
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k not in ("start_positions", "end_positions")}
        self._keep_windows("predict", self(**inputs), batch)
        return []  # answers need all of a question's windows: they are written at the end of the epoch

    def on_predict_epoch_start(self) -> None:
        self._windows["predict"] = []

    def on_predict_epoch_end(self) -> None:
        rows, start, end = self._gather_windows("predict")
        if self.trainer.is_global_zero:
            features, predictions = self._postprocess("predict", rows, start, end, with_n_best=True)
            self._write_answers(features, predictions)

    def _write_answers(self, features: QAFeatures, predictions: QAPredictions) -> None:
        """``predictions.jsonl`` (answer + n-best per question, input order) and the official ``predictions.json``."""
        path = Path(self.predictions_file or Path(self.trainer.default_root_dir) / "predictions.jsonl")
        if path.suffix == ".json":
            path = path.with_suffix(".jsonl")
        official = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for q, text, best, null, n_best in zip(predictions.examples.tolist(), predictions.texts,
                                               predictions.best_scores.tolist(), predictions.null_scores.tolist(),
                                               predictions.n_best or []):
            row: dict[str, Any] = {"id": features.ids[q], "question": features.questions[q], "prediction_text": text}
            if self.version_2_with_negative:
                row["null_score_diff"] = null - best if np.isfinite(best) else None
            row["n_best"] = n_best
            rows.append(row)
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        answers = {r["id"]: r["prediction_text"] for r in rows}
        _write_atomic(official, json.dumps(answers, ensure_ascii=False, indent=1) + "\n")
        rank_zero_info(f"Wrote {len(rows)} answers to {official} (n-best lists with scores: {path})")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
