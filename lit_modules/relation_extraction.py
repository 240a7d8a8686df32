"""Relation extraction: the relation between two marked entities, read from the hidden states of their start markers.

The model is the standard strong recipe (Baldini Soares et al. 2019, "entity markers - entity start"; Zhou & Chen
2021): the data module puts markers around the subject and the object, the encoder (any ``AutoModel``) reads the
sentence, and a small head classifies the concatenated hidden states of the two start markers. The marker tokens
the data module added to the tokenizer get new rows in the embedding matrix.

Scores are the tasks' official ones, as torchmetrics states of every prediction (gathered across processes):
SemEval-2010 Task 8's official scorer (v1.2), "(9+1)-way evaluation with directionality taken into account"
(``average: macro``), and TACRED's scorer, micro F1 over the relations (``average: micro``); both leave out the
negative relation (``negative_label``: ``Other`` / ``no_relation``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
from transformers.modeling_outputs import SequenceClassifierOutput

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError
from lit_modules.schema import DataSchema

Average = Literal["macro", "micro"]
DIRECTION = re.compile(r"\(e[12],e[12]\)$")  # what the official SemEval scorer strips to compare relations
HEAD_CONFIG = "relation_head.json"
HEAD_WEIGHTS = "relation_head.safetensors"


# ---- the official scores -----------------------------------------------------------------------------

def undirected(label: str) -> str:
    """``Cause-Effect(e2,e1)`` -> ``Cause-Effect`` (as the SemEval scorer compares relations); others unchanged."""
    return DIRECTION.sub("", label)


def relation_scores(gold: list[str], pred: list[str], negative_label: str | None = "Other",
                    average: Average = "macro") -> dict[str, float]:
    """Precision, recall and F1 as the official scorers compute them, accuracy, and F1 per relation (``f1_<name>``).

    ``macro`` (SemEval-2010 Task 8 scorer v1.2, its official "(9+1)-way evaluation with directionality taken into
    account"): per relation without direction, a prediction is correct only with the right direction, precision
    divides by every prediction of the relation (wrong directions included), recall by every gold example of it;
    P, R and F1 are averaged over the relations that occur in the gold labels, the negative one left out.
    ``micro`` (TACRED's scorer): correct / predicted and correct / gold over every label but the negative one
    (precision 1 when nothing is predicted); per-relation F1 on exact labels.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    g, p = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    correct = g == p
    group = undirected if average == "macro" else str
    g_rel = np.asarray([group(x) for x in gold], dtype=object)
    p_rel = np.asarray([group(x) for x in pred], dtype=object)
    negative = group(negative_label) if negative_label is not None else None
    out: dict[str, float] = {"accuracy": float(correct.mean()) if len(gold) else 0.0}
    per: dict[str, tuple[float, float, float]] = {}
    for relation in sorted(set(g_rel.tolist()) - {negative}):
        hits = int(np.sum(correct & (g_rel == relation)))
        predicted, actual = int(np.sum(p_rel == relation)), int(np.sum(g_rel == relation))
        precision = hits / predicted if predicted else (0.0 if average == "macro" else 1.0)
        recall = hits / actual
        per[relation] = (precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    if average == "macro":
        values = np.asarray(list(per.values())).reshape(-1, 3)
        precision, recall, f1 = (float(v) for v in values.mean(0)) if len(per) else (0.0, 0.0, 0.0)
    else:
        positive_gold, positive_pred = g != negative, p != negative
        hits = int(np.sum(correct & positive_gold))
        precision = hits / int(positive_pred.sum()) if positive_pred.any() else 1.0
        recall = hits / int(positive_gold.sum()) if positive_gold.any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out.update(precision=precision, recall=recall, f1=f1)
    for relation, (_, _, relation_f1) in per.items():
        out[f"f1_{re.sub(r'[^A-Za-z0-9_.:-]', '_', relation)}"] = relation_f1
    return out


class RelationScores(Metric):
    """The official relation extraction scores (:func:`relation_scores`) over every example seen; the predicted and
    gold label ids are list states, so processes pool their examples before scoring."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, labels: list[str], negative_label: str | None = "Other", average: Average = "macro",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels)
        self.negative_label = negative_label
        self.average = average
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().long().flatten())
        self.target.append(target.detach().long().flatten())

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.preds, list) and not self.preds:
            preds = target = np.zeros(0, dtype=np.int64)
        else:
            preds, target = (dim_zero_cat(x).cpu().numpy() for x in (self.preds, self.target))
        names = np.asarray(self.labels, dtype=object)
        scores = relation_scores(names[target].tolist(), names[preds].tolist(), self.negative_label, self.average)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}


# ---- the model ---------------------------------------------------------------------------------------

class EntityStartClassifier(torch.nn.Module):
    """An encoder (any ``AutoModel``) and a head over the concatenated hidden states of the subject's and the
    object's start markers: ``Linear(2H, H) - ReLU - Dropout - Linear(H, labels)``.

    ``save_pretrained`` writes a plain Hugging Face folder of the encoder (``AutoModel.from_pretrained`` loads it;
    its config holds ``id2label``) plus ``relation_head.safetensors`` and ``relation_head.json`` (the head's size,
    the labels, how inputs are marked); :meth:`from_pretrained` loads both.
    """

    def __init__(self, encoder: Any, num_labels: int, dropout: float = 0.1,
                 input_format: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # what peft reads (model type, sizes)
        self.input_format = dict(input_format or {})
        hidden = encoder.config.hidden_size
        self.classifier = torch.nn.Sequential(torch.nn.Linear(2 * hidden, hidden), torch.nn.ReLU(),
                                              torch.nn.Dropout(dropout), torch.nn.Linear(hidden, num_labels))
        std = getattr(encoder.config, "initializer_range", 0.02)
        for layer in (self.classifier[0], self.classifier[3]):
            torch.nn.init.normal_(layer.weight, std=std)
            torch.nn.init.zeros_(layer.bias)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        """Where the weights are (peft's prompt learning asks)."""
        return self.encoder.device

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                subj_pos: torch.Tensor | None = None, obj_pos: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        """Logits over the relations (and the cross-entropy loss with ``labels``); ``subj_pos`` / ``obj_pos``: the
        start markers' positions (missing: the first token stands in, as in a shape probe)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states", "return_dict")}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              token_type_ids=token_type_ids, **kwargs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        zeros = torch.zeros_like(rows)
        pair = torch.cat([hidden[rows, subj_pos if subj_pos is not None else zeros],
                          hidden[rows, obj_pos if obj_pos is not None else zeros]], dim=-1)
        logits = self.classifier(pair)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The encoder as a Hugging Face folder, the head's weights and its config beside it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.encoder.save_pretrained(folder, **kwargs)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()},
                  str(folder / HEAD_WEIGHTS))
        head = {"num_labels": self.classifier[3].out_features, "dropout": self.classifier[2].p,
                "id2label": {str(k): v for k, v in self.encoder.config.id2label.items()},
                "input_format": self.input_format}
        (folder / HEAD_CONFIG).write_text(json.dumps(head, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> EntityStartClassifier:
        """Load what :meth:`save_pretrained` wrote (``kwargs`` go to ``AutoModel.from_pretrained``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        folder = Path(folder)
        head = json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8"))
        encoder = AutoModel.from_pretrained(folder, **kwargs)
        model = cls(encoder, head["num_labels"], head["dropout"], head.get("input_format"))
        model.classifier.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
        return model.eval()


# ---- the module --------------------------------------------------------------------------------------

class RelationExtractionModule(TransformerModule):
    """Relation classification between two marked entities, scored by the task's official metric.

    ``predict`` writes per example the sentence, the two entities (text, character span, type), the predicted
    relation and its probability; with ``answer_file`` also the official scorer's answer file
    (``<predictions>.answers.txt``: ``id<TAB>relation`` per line). The export is the encoder as a plain Hugging
    Face folder plus the head (:class:`EntityStartClassifier`; ``EntityStartClassifier.from_pretrained`` loads it).

    Args:
        labels: the relation names in id order; ``null`` takes them from the training data (sorted). Written into
            the encoder config (``id2label``) and the checkpoint.
        negative_label: the "no relation" class the scores leave out (``Other`` for SemEval-2010 Task 8,
            ``no_relation`` for TACRED); ``null``: every class counts.
        average: ``macro`` (SemEval's official score) or ``micro`` (TACRED's).
        answer_file: ``predict`` also writes the official scorer's answer file.
        marker_tokens: the marker tokens the data module added (recorded from the data; a checkpoint's must match).
        classifier_dropout: dropout in the head (default: the encoder's ``hidden_dropout_prob``, else 0.1).
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "relation_extraction"
    peft_task_type = "SEQ_CLS"  # peft keeps the module named "classifier" trainable
    prediction_input_fields = ("id", "text", "subj_start", "subj_end", "obj_start", "obj_end", "subj_type",
                               "obj_type", "relation")
    evaluation_options = ("negative_label", "average", "answer_file")

    def __init__(self, labels: list[str] | None = None, negative_label: str | None = "Other",
                 average: Average = "macro", answer_file: bool = False, marker_tokens: list[str] | None = None,
                 classifier_dropout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if labels is not None:
            labels = [str(x) for x in labels]
            if len(set(labels)) != len(labels) or len(labels) < 2:
                raise ConfigError(f"model.labels: expected at least two distinct relation names, got {labels}")
        if average not in ("macro", "micro"):
            raise ConfigError(f"model.average: expected macro (SemEval) or micro (TACRED), got {average!r}")
        self.labels = labels
        self.negative_label = negative_label
        self.average = average
        self.answer_file = answer_file
        self.marker_tokens = list(marker_tokens) if marker_tokens is not None else None
        self.classifier_dropout = classifier_dropout
        self.input_format: dict[str, Any] = {}

    def apply_schema(self, schema: DataSchema | None) -> dict[str, Any]:
        """The relation set and the marker tokens from the data (a checkpoint's markers must be the data's)."""
        labels = self.resolve_labels(schema, "relations")
        if self.negative_label is not None and self.negative_label not in labels:
            raise ConfigError(f"model.negative_label: {self.negative_label!r} is not one of the relations "
                              f"({', '.join(labels[:12])}{', ...' if len(labels) > 12 else ''}); name the negative "
                              "class (Other, no_relation) or set null")
        tokens = list(schema.added_tokens) if schema is not None else list(self.marker_tokens or [])
        if self.marker_tokens is not None and tokens != self.marker_tokens:
            raise ConfigError(f"model.marker_tokens: the checkpoint's model reads the markers "
                              f"{self.marker_tokens[:4]}{' ...' if len(self.marker_tokens) > 4 else ''} but the data "
                              f"marks with {tokens[:4] or 'no new tokens'}: use the data.marker_style and "
                              "data.entity_types it was trained with")
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:  # no data module (a model used on its own): the same tokens, in the same order
            self.tokenizer.add_tokens(missing, special_tokens=True)
        self.marker_tokens = tokens
        if schema is not None:
            self.input_format = dict(schema.prompt)
        return {"labels": labels, "marker_tokens": tokens}

    def build_model(self) -> Any:
        from transformers import AutoConfig, AutoModel

        if not self.labels:
            raise ConfigError("model.labels: unknown; set them, load a checkpoint, or train on labelled data")
        config = self.from_pretrained(AutoConfig, **self.label_config())
        encoder = self.from_pretrained(AutoModel, config=config)
        if getattr(encoder, "pooler", None) is not None:
            # unused, so frozen: DDP would wait for its gradients; kept so that the export loads without new weights
            encoder.pooler.requires_grad_(False)
        if len(self.tokenizer) > encoder.get_input_embeddings().num_embeddings:
            # random rows (normal, std initializer_range), as the published recipes had: transformers' default mean
            # resizing makes every new row the mean embedding (noise at 1e-9 of its covariance), so [E1] and [E2]
            # would start the same and the model could not tell the subject from the object at first
            encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        dropout = self.classifier_dropout
        if dropout is None:
            dropout = getattr(config, "hidden_dropout_prob", None) or 0.1
        model = EntityStartClassifier(encoder, len(self.labels), dropout, self.input_format)
        self._train_marker_embeddings(model)
        return model

    def _train_marker_embeddings(self, model: EntityStartClassifier) -> None:
        """With PEFT the embeddings are frozen, but the new marker rows start untrained: LoRA-family methods train
        just those rows (``trainable_token_indices``); other methods train the input embeddings whole
        (``modules_to_save``)."""
        config = self.peft_config
        ids = self.tokenizer.convert_tokens_to_ids(self.marker_tokens or [])
        if config is None or not ids:
            return
        if hasattr(config, "trainable_token_indices"):
            if config.trainable_token_indices is None:
                config.trainable_token_indices = sorted(ids)
        elif hasattr(config, "modules_to_save"):
            embeddings = model.get_input_embeddings()
            name = next(n for n, m in model.named_modules() if m is embeddings).rsplit(".", 1)[-1]
            if name not in (config.modules_to_save or []):
                config.modules_to_save = [*(config.modules_to_save or []), name]

    @property
    def _prompt_tokens(self) -> int:
        """Virtual tokens a prompt-learning PEFT method puts before the input (the marker positions move by them)."""
        from lit_modules.peft_support import PROMPT_LEARNING, peft_type

        config = self.peft_config
        if config is None or peft_type(config) not in PROMPT_LEARNING or peft_type(config) == "PREFIX_TUNING":
            return 0
        return int(config.num_virtual_tokens)

    def forward(self, **inputs: torch.Tensor) -> SequenceClassifierOutput:
        shift = self._prompt_tokens
        if shift:
            inputs = {k: v + shift if k in ("subj_pos", "obj_pos") else v for k, v in inputs.items()}
        return self.model(**inputs)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"relations": RelationScores(self.labels or [], self.negative_label, self.average)})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        metrics.update(outputs.logits.detach().argmax(-1), batch["labels"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        logits = self(**self.model_inputs(batch, labels=False)).logits.float()
        probs = torch.softmax(logits, -1)
        best = probs.argmax(-1)
        top = probs.gather(-1, best[:, None]).squeeze(-1)
        return [{"idx": i, "prediction": self.labels[b], "probability": p}
                for i, b, p in zip(batch["idx"].tolist(), best.tolist(), top.tolist())]

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per example: the sentence, the subject and the object (text, character span, type), the predicted
        relation and its probability (and the gold relation when the input has one)."""
        out = []
        for row in rows:
            text = row.get("text", "")
            merged: dict[str, Any] = {"idx": row["idx"], "id": row.get("id"), "sentence": text}
            for role, prefix in (("subject", "subj"), ("object", "obj")):
                start, end = row.get(f"{prefix}_start"), row.get(f"{prefix}_end")
                entity = {"text": text[start:end] if start is not None else None, "start": start, "end": end}
                if row.get(f"{prefix}_type") is not None:
                    entity["type"] = row[f"{prefix}_type"]
                merged[role] = entity
            merged.update(relation=row["prediction"], probability=row["probability"])
            if row.get("relation") is not None:
                merged["gold"] = row["relation"]
            out.append(merged)
        return out

    def prediction_files(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        """With ``answer_file``: the official scorer's input, ``id<TAB>relation`` per example, in input order."""
        if not self.answer_file:
            return {}
        return {".answers.txt": "".join(f"{r['id']}\t{r['relation']}\n" for r in rows)}
