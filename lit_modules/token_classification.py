"""Token classification (NER): a per-token head on any Hugging Face encoder, scored on entities.

The entity-level metric gives the numbers of ``seqeval`` (the field's standard scorer) exactly, in its
default, conlleval-compatible mode and in its strict IOB2 mode; its states are lists of tensors, so
torchmetrics gathers them across processes before scoring.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Optional

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from lit_modules.base import TransformerModule, load_pretrained
from lit_modules.errors import ConfigError
from lit_modules.schema import DataSchema

MetricMode = Literal["default", "strict"]
Entity = tuple[str, int, int]  # (type, start, end): tokens[start:end]


# ---- entities --------------------------------------------------------------------------------------

def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval's default mode reads a tag: 'B-PER' -> ('B', 'PER'), 'O' -> ('O', '_')."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in "ES" or (prev_tag in "BI" and tag in "BSO")
            or (prev_tag not in "O." and prev_type != type_))


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in "BS" or (prev_tag in "ESO" and tag in "EI")
            or (tag not in "O." and prev_type != type_))


def entities_default(tags: list[str]) -> list[Entity]:
    """Entities as seqeval's default mode (and conlleval) reads them: an I- after O or after another type
    starts an entity, a change of type ends one."""
    out = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split(chunk)
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            out.append((prev_type, begin, i))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return out


def entities_strict(tags: list[str]) -> list[Entity]:
    """Entities as seqeval's strict IOB2 mode reads them: B-X followed by any number of I-X; an I- that
    does not continue an entity of its type belongs to none."""
    out = []
    i, n = 0, len(tags)
    while i < n:
        tag = tags[i]
        if tag[:1] not in ("B", "I", "O") or (tag != "O" and tag[1:2] != "-"):
            raise ValueError(f"not an IOB2 tag: {tag!r}")
        if tag.startswith("B-"):
            kind, end = tag[2:], i + 1
            while end < n and tags[end] == f"I-{kind}":
                end += 1
            out.append((kind, i, end))
            i = end
        else:
            i += 1
    return out


def extract_entities(tags: list[str], mode: MetricMode = "default") -> list[Entity]:
    """The entities of one tag sequence, read as the metric reads them in ``mode``."""
    return entities_strict(tags) if mode == "strict" else entities_default(tags)


def entity_scores(gold: list[list[str]], pred: list[list[str]], mode: MetricMode = "default",
                  types: Optional[list[str]] = None) -> dict[str, float]:
    """Micro precision / recall / F1 over all entities and F1 per type (``f1_<TYPE>``), as seqeval computes
    them (0 where undefined). ``types`` fixes the per-type keys (default: the types in gold or pred)."""
    true_counts: Counter = Counter()
    pred_counts: Counter = Counter()
    hits: Counter = Counter()
    for s, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        gold_set, pred_set = set(extract_entities(g, mode)), set(extract_entities(p, mode))
        true_counts.update(e[0] for e in gold_set)
        pred_counts.update(e[0] for e in pred_set)
        hits.update(e[0] for e in gold_set & pred_set)

    def prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    precision, recall, f1 = prf(sum(hits.values()), sum(pred_counts.values()), sum(true_counts.values()))
    out = {"precision": precision, "recall": recall, "f1": f1}
    for kind in types if types is not None else sorted(set(true_counts) | set(pred_counts)):
        out[f"f1_{kind}"] = prf(hits[kind], pred_counts[kind], true_counts[kind])[2]
    return out


class EntityScores(Metric):
    """Entity-level precision, recall and F1 (micro) and F1 per entity type, identical to seqeval.

    ``update`` takes, per window of a sentence, the predicted and gold tag ids of its sub-tokens, the
    word each sub-token scores (-1: none) and the sentence id; ``compute`` puts every sentence back
    together from its windows (a word scored twice counts once: a safety net for samplers that
    pad processes with repeats; the project's own evaluation sampler never does) and scores whole sentences. Args: ``labels`` (tag names in id order, IOB2)
    and ``mode`` (seqeval's ``default``, conlleval-compatible, or ``strict`` IOB2).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, labels: list[str], mode: MetricMode = "default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels)
        self.mode = mode
        self.types = sorted({t[2:] for t in self.labels if t != "O"})
        for name in ("sentence", "word", "preds", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, score_word: torch.Tensor, sentence: torch.Tensor) -> None:
        mask = score_word >= 0
        self.sentence.append(sentence[:, None].expand_as(score_word)[mask])
        self.word.append(score_word[mask])
        self.preds.append(preds[mask])
        self.target.append(target[mask])

    def sentences(self) -> tuple[list[list[str]], list[list[str]]]:
        """The gold and predicted tag sequences of every sentence seen, in sentence-id order."""
        if isinstance(self.sentence, list) and not self.sentence:
            return [], []
        sentence, word, pred, gold = (dim_zero_cat(x).cpu().numpy() for x in (self.sentence, self.word, self.preds, self.target))
        if not len(word):
            return [], []
        key = sentence * (int(word.max()) + 1) + word
        _, first = np.unique(key, return_index=True)  # sorted by (sentence, word); repeats dropped
        sentence, pred, gold = sentence[first], pred[first], gold[first]
        cuts = np.flatnonzero(np.diff(sentence)) + 1
        names = np.asarray(self.labels, dtype=object)
        return ([names[g].tolist() for g in np.split(gold, cuts)], [names[p].tolist() for p in np.split(pred, cuts)])

    def compute(self) -> dict[str, torch.Tensor]:
        gold, pred = self.sentences()
        scores = entity_scores(gold, pred, self.mode, self.types)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}


# ---- the module ------------------------------------------------------------------------------------

class TokenClassificationModule(TransformerModule):
    """Token classification (``AutoModelForTokenClassification``), scored on entities.

    Args:
        labels: the IOB2 tag names in id order (``O`` among them); ``null`` takes them from the training
            data (O, then B- and I- of each entity type). Written into the model config (``id2label`` /
            ``label2id``) and the checkpoint.
        metric_mode: ``default`` scores entities as seqeval's default mode and conlleval do (an I- after O
            starts an entity); ``strict`` as seqeval's strict IOB2 mode (only B-X I-X... is an entity).
            Predicted entity spans in ``predict`` output follow the same reading.
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "token_classification"
    prediction_input_fields = ("tokens",)
    peft_task_type = "TOKEN_CLS"
    non_input_keys = frozenset({"idx", "score_word", "sentence"})
    evaluation_options = ("metric_mode",)

    def __init__(self, labels: Optional[list[str]] = None, metric_mode: MetricMode = "default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if labels is not None:
            labels = [str(x) for x in labels]
            bad = [t for t in labels if not (t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2))]
            if len(set(labels)) != len(labels) or "O" not in labels or bad:
                raise ConfigError(f"model.labels: expected distinct IOB2 tags including O (O, B-<TYPE>, I-<TYPE>), "
                                  f"got {labels}")
        self.labels = labels
        self.metric_mode = metric_mode

    def load_tokenizer(self, name_or_path: str, key: str = "model.tokenizer_name_or_path", **kwargs: Any) -> Any:
        tokenizer = super().load_tokenizer(name_or_path, key, **kwargs)
        pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        if "ByteLevel(add_prefix_space=False" in repr(pre_tokenizer):
            # byte-level BPE (RoBERTa, GPT-2): pre-split words must get the leading space they have inside a
            # sentence, or every word is encoded as if it were glued to the previous one
            from transformers import AutoTokenizer

            tokenizer = load_pretrained(AutoTokenizer, name_or_path, key, trust_remote_code=self.trust_remote_code,
                                        add_prefix_space=True, **kwargs)
        return tokenizer

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """Take the tag set the data module resolved (the model's own when it had one)."""
        return {"labels": self.resolve_labels(schema, "tags")}

    def build_model(self) -> Any:
        from transformers import AutoConfig, AutoModelForTokenClassification

        if self.labels is None:
            raise ConfigError("model.labels: unknown; set them, load a checkpoint, or train on tagged data")
        config = self.from_pretrained(AutoConfig, **self.label_config())
        return self.from_pretrained(AutoModelForTokenClassification, config=config)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"entities": EntityScores(self.labels or [], self.metric_mode)})

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over the labelled sub-tokens."""
        return int((batch["labels"] != -100).sum())

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        metrics.update(outputs.logits.detach().argmax(-1), batch["labels"], batch["score_word"], batch["sentence"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        best = self(**self.model_inputs(batch, labels=False)).logits.argmax(-1).cpu()
        score_word = batch["score_word"].cpu()
        rows = []
        for row, (idx, sentence) in enumerate(zip(batch["idx"].tolist(), batch["sentence"].tolist())):
            mask = score_word[row] >= 0
            rows.append({"idx": idx, "sentence": sentence, "words": score_word[row][mask].tolist(),
                         "tags": [self.labels[t] for t in best[row][mask].tolist()]})
        return rows

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        """Per window: its words, and the gold and predicted entities among the words it scores."""
        table = self.schema.split(stage).table if self.schema is not None and self.schema.resolved else None
        idx = batch["idx"].tolist()
        sentences = table.select_columns(["tokens"]).select(idx).to_list() if table is not None else [{}] * len(idx)
        pred, gold, score_word = (t.detach().cpu() for t in (outputs.logits.argmax(-1), batch["labels"],
                                                              batch["score_word"]))
        labels, rows = self.labels or [], []
        for r, record in enumerate(sentences):
            mask = score_word[r] >= 0
            words = score_word[r][mask].tolist()
            tokens = record.get("tokens") or []

            def spans(ids: list[int], tokens: list[str] = tokens, words: list[int] = words) -> list[str]:
                tags = [labels[t] if 0 <= t < len(labels) else "O" for t in ids]
                return [f"{kind}: {' '.join(tokens[words[s]:words[e - 1] + 1])}"
                        for kind, s, e in extract_entities(tags, self.metric_mode)]

            rows.append({"idx": idx[r], "text": " ".join(tokens[words[0]:words[-1] + 1]) if words else "",
                         "gold": spans(gold[r][mask].tolist()), "prediction": spans(pred[r][mask].tolist())})
        return rows

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per sentence: its tokens, the predicted tag of each and the entity spans they make."""
        merged: dict[int, dict[str, Any]] = {}
        for row in rows:  # the windows of a sentence, in order
            out = merged.setdefault(row["sentence"], {"idx": row["sentence"], "tokens": row.get("tokens"), "tags": {}})
            out["tags"].update(zip(row["words"], row["tags"]))
        result = []
        for sentence in sorted(merged):
            out = merged[sentence]
            tags = [out["tags"][w] for w in sorted(out["tags"])]
            tokens = out["tokens"]
            entities = [{"type": kind, "start": start, "end": end,
                         "text": " ".join(tokens[start:end]) if tokens else None}
                        for kind, start, end in extract_entities(tags, self.metric_mode)]
            result.append({"idx": sentence, "tokens": tokens, "tags": tags, "entities": entities})
        return result

    def hub_pipeline_tag(self) -> Optional[str]:
        return "token-classification"
