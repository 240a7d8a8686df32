"""Extractive question answering (SQuAD v1.1 / v2.0) on any Hugging Face encoder.

The model scores every token as the start and the end of the answer, per window. Evaluation keeps, per
window, only what post-processing reads: the ``n_best_size`` best start and end tokens inside the context
and the no-answer score (:func:`window_top_k`), in a torchmetrics ``Metric`` (:class:`SquadWindowScores`)
that gathers them from all processes, post-processes them per question (:func:`postprocess_top_k`: best
valid span over all of a question's windows, mapped back to the context text, compared with the
no-answer score for SQuAD v2.0) and scores the answers with the official SQuAD exact match and F1
(:func:`squad_scores`). Memory grows with the number of windows times ``n_best_size``, not with the
windows' full logits.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError
from lit_modules.schema import DataSchema, QAFeatures

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


def window_top_k(features: QAFeatures, rows: np.ndarray, start_logits: np.ndarray, end_logits: np.ndarray,
                 k: int) -> tuple[np.ndarray, ...]:
    """Per window, what post-processing reads: the ``k`` best start and end tokens inside the context (positions
    and logits; -inf where the context has fewer tokens) and the no-answer score (CLS start + end logit).

    ``start_logits`` / ``end_logits``: ``[len(rows), width]`` over each window's tokens in order (positions past a
    window's length hold anything; they are outside the context). Returns ``(s_top, s_val, e_top, e_val, null)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    width = min(start_logits.shape[1], features.offset_start.shape[1])
    starts = np.asarray(start_logits[:, :width], dtype=np.float32)
    ends = np.asarray(end_logits[:, :width], dtype=np.float32)
    arange = np.arange(len(rows))
    cls = features.cls_index[rows]
    null = starts[arange, cls] + ends[arange, cls]
    in_context = features.offset_start[rows, :width] >= 0
    out = []
    for logits in (starts, ends):
        masked = np.where(in_context, logits, -np.inf)
        if width < k:  # fewer tokens than candidates: pad with impossible ones
            masked = np.pad(masked, ((0, 0), (0, k - width)), constant_values=-np.inf)
        top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
        val = np.take_along_axis(masked, top, 1)
        out += [np.where(np.isfinite(val), top, 0), val]
    return out[0], out[1], out[2], out[3], null


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
    """Window logits -> one answer text per question (:func:`window_top_k`, then :func:`postprocess_top_k`).

    ``rows`` are the feature rows the logits ``[len(rows), width]`` belong to. ``examples`` restricts the work to
    those questions.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if examples is not None:
        keep = np.isin(features.example[rows], examples)
        rows, start_logits, end_logits = rows[keep], start_logits[keep], end_logits[keep]
    top = window_top_k(features, rows, start_logits, end_logits, n_best_size)
    return postprocess_top_k(features, rows, *top, n_best_size=n_best_size, max_answer_length=max_answer_length,
                             version_2_with_negative=version_2_with_negative,
                             null_score_diff_threshold=null_score_diff_threshold, with_n_best=with_n_best)


def postprocess_top_k(
    features: QAFeatures,
    rows: np.ndarray,
    s_top: np.ndarray,
    s_val: np.ndarray,
    e_top: np.ndarray,
    e_val: np.ndarray,
    null: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    with_n_best: bool = False,
) -> QAPredictions:
    """Per-window best tokens (:func:`window_top_k`) -> one answer text per question, vectorised over all windows.

    Per window, the best start and end tokens inside the context are paired; spans that end before they start or
    are longer than ``max_answer_length`` tokens are discarded; each question keeps its ``n_best_size`` best spans
    over all its windows. With ``version_2_with_negative`` the answer is empty when the no-answer score (the
    lowest over the question's windows) beats the best span by more than ``null_score_diff_threshold``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    example = features.example[rows]
    n, k = s_top.shape
    arange = np.arange(n)
    width = features.offset_start.shape[1]
    s_tok_k, e_tok_k = np.minimum(s_top, width - 1), np.minimum(e_top, width - 1)
    score = s_val[:, :, None] + e_val[:, None, :]  # [n, k start, k end]
    s_tok = np.broadcast_to(s_tok_k[:, :, None], score.shape)
    e_tok = np.broadcast_to(e_tok_k[:, None, :], score.shape)
    r = rows[:, None, None]
    char_start, char_end = features.offset_start, features.offset_end
    valid = (np.isfinite(score) & (e_tok >= s_tok) & (e_tok - s_tok < max_answer_length)
             & (char_end[r, e_tok] > char_start[r, s_tok]))
    score = np.where(valid, score, -np.inf).reshape(n, k * k)

    # each window's best pairs, then each question's best over its windows
    m = min(n_best_size, k * k)
    pick = np.argpartition(-score, m - 1, axis=1)[:, :m]
    cand_score = np.take_along_axis(score, pick, 1).ravel()
    cand_win = np.repeat(arange, m)
    cand_s, cand_e = s_tok_k[cand_win, pick.ravel() // k], e_tok_k[cand_win, pick.ravel() % k]
    cand_sv, cand_ev = s_val[cand_win, pick.ravel() // k], e_val[cand_win, pick.ravel() % k]
    ok = np.isfinite(cand_score)
    cand_score, cand_win, cand_s, cand_e, cand_sv, cand_ev = (
        a[ok] for a in (cand_score, cand_win, cand_s, cand_e, cand_sv, cand_ev))
    cand_ex = example[cand_win]
    order = np.lexsort((-cand_score, cand_ex))
    cand_score, cand_win, cand_s, cand_e, cand_sv, cand_ev, cand_ex = (
        a[order] for a in (cand_score, cand_win, cand_s, cand_e, cand_sv, cand_ev, cand_ex))
    group_ex, group_start = np.unique(cand_ex, return_index=True)
    rank = np.arange(len(cand_ex)) - np.repeat(group_start, np.diff(np.append(group_start, len(cand_ex))))
    top = rank < n_best_size

    questions = np.unique(example)
    slot = np.searchsorted(questions, example)
    null_min = np.full(len(questions), np.inf, dtype=np.float32)
    np.minimum.at(null_min, slot, null)
    best = np.full(len(questions), -np.inf, dtype=np.float32)
    best_row = np.zeros(len(questions), dtype=np.int64)
    best_s = np.zeros(len(questions), dtype=np.int64)
    best_e = np.zeros(len(questions), dtype=np.int64)
    where = np.searchsorted(questions, group_ex)
    best[where] = cand_score[group_start]
    best_row[where] = rows[cand_win[group_start]]
    best_s[where], best_e[where] = cand_s[group_start], cand_e[group_start]

    texts: list[str] = []
    for q, example_number in enumerate(questions.tolist()):
        answer = ""
        if np.isfinite(best[q]) and not (version_2_with_negative and null_min[q] - best[q] > null_score_diff_threshold):
            f = best_row[q]
            answer = features.contexts[example_number][char_start[f, best_s[q]]: char_end[f, best_e[q]]]
        texts.append(answer)
    result = QAPredictions(questions, texts, best, null_min)
    if with_n_best:
        result.n_best = _n_best_lists(features, questions, cand_ex[top], rows[cand_win[top]], cand_s[top], cand_e[top],
                                      cand_score[top], cand_sv[top], cand_ev[top],
                                      null_min if version_2_with_negative else None)
    return result


def _n_best_lists(features: QAFeatures, questions: np.ndarray, ex: np.ndarray, feat: np.ndarray, s: np.ndarray,
                  e: np.ndarray, score: np.ndarray, s_logit: np.ndarray, e_logit: np.ndarray,
                  null: Optional[np.ndarray]) -> list[list[dict[str, Any]]]:
    """Each question's candidates (best first) with text, character span, logits and softmax probability."""
    lists: list[list[dict[str, Any]]] = [[] for _ in questions]
    slots = np.searchsorted(questions, ex)
    char_start, char_end = features.offset_start, features.offset_end
    for slot, example_number, f, a, b, sc, sl, el in zip(slots.tolist(), ex.tolist(), feat.tolist(), s.tolist(),
                                                         e.tolist(), score.tolist(), s_logit.tolist(), e_logit.tolist()):
        begin, stop = int(char_start[f, a]), int(char_end[f, b])
        lists[slot].append({"text": features.contexts[example_number][begin:stop], "start": begin, "end": stop,
                            "score": sc, "start_logit": float(sl), "end_logit": float(el)})
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


class SquadWindowScores(Metric):
    """SQuAD exact match and F1 of whole questions, from window outputs gathered across processes.

    ``update(rows, start_logits, end_logits, attention_mask, features)`` keeps, per window, the ``n_best_size``
    best start / end tokens inside the context and the no-answer score (list states, concatenated across
    processes); ``compute`` post-processes all windows (:func:`postprocess_top_k`) and scores every question
    with the official definition (:func:`squad_scores`). ``features`` is the split's :class:`QAFeatures`
    (every process holds the whole split). A window seen twice counts once.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, version_2: bool = False, n_best_size: int = 20, max_answer_length: int = 30,
                 null_score_diff_threshold: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version_2, self.n_best_size, self.max_answer_length = version_2, n_best_size, max_answer_length
        self.null_score_diff_threshold = null_score_diff_threshold
        self.features: Optional[QAFeatures] = None
        self.last_predictions: Optional[QAPredictions] = None
        for name in ("rows", "s_top", "s_val", "e_top", "e_val", "null"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor, start_logits: torch.Tensor, end_logits: torch.Tensor,
               attention_mask: torch.Tensor, features: QAFeatures) -> None:
        self.features = features
        top = windows_top_k(features, rows, start_logits, end_logits, attention_mask, self.n_best_size)
        for name, value in zip(("rows", "s_top", "s_val", "e_top", "e_val", "null"), top):
            getattr(self, name).append(torch.from_numpy(value).to(self.device))

    def predictions(self) -> QAPredictions:
        """The post-processed answers of every window seen (on every process, after a sync)."""
        rows, s_top, s_val, e_top, e_val, null = (dim_zero_cat(getattr(self, n)).cpu().numpy()
                                                  for n in ("rows", "s_top", "s_val", "e_top", "e_val", "null"))
        rows, first = np.unique(rows, return_index=True)
        return postprocess_top_k(self.features, rows, s_top[first], s_val[first], e_top[first], e_val[first],
                                 null[first], n_best_size=self.n_best_size, max_answer_length=self.max_answer_length,
                                 version_2_with_negative=self.version_2,
                                 null_score_diff_threshold=self.null_score_diff_threshold)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.features is None or (isinstance(self.rows, list) and not self.rows):
            return {"exact_match": torch.tensor(0.0), "f1": torch.tensor(0.0)}
        predictions = self.last_predictions = self.predictions()  # kept for the examples table
        scorer = SquadMetric(version_2=self.version_2, sync_on_compute=False)
        scorer.update(predictions.texts, [self.features.answers[q] for q in predictions.examples.tolist()],
                      predictions.examples.tolist())
        return scorer.compute()


def windows_top_k(features: QAFeatures, rows: torch.Tensor, start_logits: torch.Tensor, end_logits: torch.Tensor,
                  attention_mask: torch.Tensor, k: int) -> tuple[np.ndarray, ...]:
    """:func:`window_top_k` of one batch: its real tokens in order, whichever side the padding is on."""
    mask = attention_mask.detach().bool().cpu()
    lengths = mask.sum(1).numpy()
    width = int(lengths.max(initial=0))
    out = []
    for logits in (start_logits, end_logits):
        flat = logits.detach().float().cpu()[mask].numpy()
        padded = np.full((len(lengths), width), -np.inf, dtype=np.float32)
        padded[np.repeat(np.arange(len(lengths)), lengths),
               np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
        out.append(padded)
    rows_np = rows.detach().cpu().numpy().astype(np.int64)
    s_top, s_val, e_top, e_val, null = window_top_k(features, rows_np, out[0], out[1], k)
    return rows_np, s_top.astype(np.int64), s_val, e_top.astype(np.int64), e_val, null.astype(np.float32)


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

    task = "question_answering"
    peft_task_type = "QUESTION_ANS"
    label_keys = frozenset({"start_positions", "end_positions"})
    evaluation_options = EVALUATION_OPTIONS

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

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """Decide SQuAD v1.1 or v2.0 from the data when not given; the checkpoint keeps the choice."""
        if self.version_2_with_negative is None:
            self.version_2_with_negative = bool(schema.has_unanswerable) if schema is not None else False
        return {"version_2_with_negative": self.version_2_with_negative}

    def build_model(self) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return self.from_pretrained(AutoModelForQuestionAnswering)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"squad": SquadWindowScores(
            version_2=bool(self.version_2_with_negative), n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length, null_score_diff_threshold=self.null_score_diff_threshold)})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        features = self.schema.split(stage).qa if self.schema is not None else None
        if features is None:
            raise ConfigError(f"question answering needs the {stage} split's windows: connect the data module")
        metrics["squad"].update(batch["idx"], outputs.start_logits, outputs.end_logits, batch["attention_mask"],
                                features)

    def evaluation_table(self, stage: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The first questions of the epoch's post-processed answers, with their gold answers and scores."""
        _, metrics = self.stage_metrics(stage)
        metric = metrics["squad"]
        predictions, features = metric.last_predictions, metric.features
        if predictions is None or features is None:
            return []
        out = []
        for q, text in zip(predictions.examples.tolist()[: self.table_limit], predictions.texts):
            exact, f1 = squad_scores(text, features.answers[q], bool(self.version_2_with_negative))
            out.append({"idx": q, "id": features.ids[q], "question": features.questions[q],
                        "gold": features.answers[q], "prediction": text, "exact_match": exact, "f1": f1})
        return out

    def evaluation_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The model's span loss with padding positions left out of the softmax (Hugging Face keeps them), so
        a window's loss does not depend on how wide its batch was padded, nor on how windows were batched."""
        if outputs.loss is None:
            return None
        pad = ~batch["attention_mask"].bool()
        positions = (batch["start_positions"], batch["end_positions"])
        losses = [torch.nn.functional.cross_entropy(logits.detach().float().masked_fill(pad, float("-inf")), target)
                  for logits, target in zip((outputs.start_logits, outputs.end_logits), positions)]
        return (losses[0] + losses[1]) / 2

    # ---- prediction: windows per step, answers once all of a question's windows are in ----------

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list:
        outputs = self(**self.model_inputs(batch, labels=False))
        key = self.schema.eval_sets.get("predict") if self.schema is not None else None
        split = f"predict/{key[dataloader_idx]}" if key else "predict"
        rows, s_top, s_val, e_top, e_val, null = windows_top_k(
            self._features(split), batch["idx"], outputs.start_logits, outputs.end_logits, batch["attention_mask"],
            self.n_best_size)
        return [{"idx": int(r), "s_top": a.tolist(), "s_val": b.tolist(), "e_top": c.tolist(), "e_val": d.tolist(),
                 "null": float(z)} for r, a, b, c, d, z in zip(rows, s_top, s_val, e_top, e_val, null)]

    def _features(self, split: str) -> QAFeatures:
        features = self.schema.split(split).qa if self.schema is not None else None
        if features is None:
            raise ConfigError(f"question answering needs the {split} split's windows: connect the data module")
        return features

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per question, in input order: the answer and the n-best list with scores and probabilities."""
        features = self._features(self.predict_split)
        arrays = [np.asarray([r[k] for r in rows], dtype=np.float32 if "val" in k or k == "null" else np.int64)
                  for k in ("idx", "s_top", "s_val", "e_top", "e_val", "null")]
        if not rows:
            return []
        predictions = postprocess_top_k(
            features, *arrays, n_best_size=self.n_best_size, max_answer_length=self.max_answer_length,
            version_2_with_negative=bool(self.version_2_with_negative),
            null_score_diff_threshold=self.null_score_diff_threshold, with_n_best=True)
        out = []
        for q, text, best, null, n_best in zip(predictions.examples.tolist(), predictions.texts,
                                               predictions.best_scores.tolist(), predictions.null_scores.tolist(),
                                               predictions.n_best or []):
            row: dict[str, Any] = {"id": features.ids[q], "question": features.questions[q], "prediction_text": text}
            if self.version_2_with_negative:
                row["null_score_diff"] = null - best if np.isfinite(best) else None
            row["n_best"] = n_best
            out.append(row)
        return out

    def prediction_files(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        """The official ``predictions.json`` (``{id: answer}``) that the SQuAD evaluation script reads."""
        answers = {r["id"]: r["prediction_text"] for r in rows}
        return {".json": json.dumps(answers, ensure_ascii=False, indent=1) + "\n"}

    def hub_pipeline_tag(self) -> Optional[str]:
        return "question-answering"
