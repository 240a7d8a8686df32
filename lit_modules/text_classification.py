"""Text classification: multi-class, multi-label and regression heads on any Hugging Face encoder."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MultilabelAccuracy,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError
from lit_modules.schema import DataSchema

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]


def classification_metrics(problem_type: str, num_labels: int, threshold: float = 0.5) -> MetricCollection:
    """The metrics of a problem type: accuracy, macro F1 and MCC (single label); micro accuracy, exact match, macro
    and micro F1 (multi-label); Pearson, Spearman and MSE (regression)."""
    n = num_labels
    if problem_type == "regression":
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "mse": MeanSquaredError()})
    if problem_type == "multi_label_classification":
        return MetricCollection({
            "accuracy": MultilabelAccuracy(n, threshold=threshold, average="micro"),
            "exact_match": MultilabelExactMatch(n, threshold=threshold),
            "f1": MultilabelF1Score(n, threshold=threshold, average="macro"),
            "f1_micro": MultilabelF1Score(n, threshold=threshold, average="micro"),
        })
    return MetricCollection({
        "accuracy": MulticlassAccuracy(n, average="micro"),
        "f1": MulticlassF1Score(n, average="macro"),
        "mcc": MulticlassMatthewsCorrCoef(n),
    })


def update_classification_metrics(metrics: MetricCollection, problem_type: str, logits: torch.Tensor,
                                  labels: torch.Tensor) -> None:
    """Update :func:`classification_metrics` from one batch's logits (class scores) and label ids."""
    logits = logits.detach().float()
    if problem_type == "regression":
        metrics.update(logits.squeeze(-1), labels.float())
    elif problem_type == "multi_label_classification":
        metrics.update(torch.sigmoid(logits), labels.long())
    else:
        metrics.update(logits.argmax(-1), labels)


def classification_rows(problem_type: str, labels: Sequence[str], logits: torch.Tensor, idx: list[int],
                        threshold: float = 0.5) -> list[dict[str, Any]]:
    """Prediction rows: the predicted label and every class's probability (a score for regression)."""
    logits = logits.float()
    if problem_type == "regression":
        return [{"idx": i, "score": s} for i, s in zip(idx, logits.squeeze(-1).tolist())]
    if problem_type == "multi_label_classification":
        probs = torch.sigmoid(logits).tolist()
        return [{"idx": i, "labels": [n for n, q in zip(labels, p) if q > threshold], "scores": dict(zip(labels, p))}
                for i, p in zip(idx, probs)]
    probs = torch.softmax(logits, -1)
    best = probs.argmax(-1).tolist()
    return [{"idx": i, "label": labels[b], "scores": dict(zip(labels, p))} for i, b, p in zip(idx, best, probs.tolist())]


def classification_table_rows(problem_type: str, labels: Sequence[str], logits: torch.Tensor, batch: dict[str, Any],
                              table: Any, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Rows of the per-evaluation examples table: the text (and pair), the gold label, the prediction, its score."""
    idx = batch["idx"].tolist()
    predicted = classification_rows(problem_type, labels, logits.detach(), idx, threshold)
    fields = [c for c in ("text", "text_pair") if table is not None and c in table.column_names]
    inputs = table.select_columns(fields).select(idx).to_list() if fields else [{}] * len(idx)
    gold = batch["labels"].detach().cpu()
    rows = []
    for i, row, record in zip(range(len(idx)), predicted, inputs):
        out = {"idx": row["idx"], **{k: v for k, v in record.items() if v is not None}}
        if problem_type == "regression":
            out.update(gold=float(gold[i]), prediction=row["score"])
        elif problem_type == "multi_label_classification":
            out.update(gold=[n for n, on in zip(labels, gold[i].tolist()) if on], prediction=row["labels"])
        else:
            out.update(gold=labels[int(gold[i])], prediction=row["label"], score=row["scores"][row["label"]])
        rows.append(out)
    return rows


class TextClassificationModule(TransformerModule):
    """Sequence classification (``AutoModelForSequenceClassification``).

    Args:
        labels: the class names in id order; ``null`` takes them from the training data. Written into
            the model config (``id2label`` / ``label2id``) and the checkpoint, so test, predict and
            export use the same ids.
        problem_type: ``null`` infers it from the training labels.
        multi_label_threshold: probability above which a label is predicted (multi-label only).
        teacher: knowledge distillation (Hinton et al. 2015): a fine-tuned teacher, as an export folder (or hub id)
            that ``AutoModelForSequenceClassification`` loads, or a tuneforge checkpoint (``.ckpt``) of this task.
            Its label names must be the student's, in the same order. The student is this module's model (another
            checkpoint, or fewer layers of the same one: ``model_kwargs: {num_hidden_layers: 3}``); it trains on
            ``distill_alpha * T^2 * KL(teacher_T || student_T) + (1 - distill_alpha) * CE(labels)``. The teacher's
            logits are computed once per training example and reused in later epochs (the teacher is frozen
            and runs without dropout).
        distill_temperature / distill_alpha: the softmax temperature T and the weight of the soft targets.
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "text_classification"
    prediction_input_fields = ("text", "text_pair")
    peft_task_type = "SEQ_CLS"
    evaluation_options = ("multi_label_threshold",)

    def __init__(
        self,
        labels: Optional[list[str]] = None,
        problem_type: Optional[ProblemType] = None,
        multi_label_threshold: float = 0.5,
        teacher: Optional[str] = None,
        distill_temperature: float = 2.0,
        distill_alpha: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if distill_temperature <= 0:
            raise ConfigError(f"model.distill_temperature: expected a number > 0, got {distill_temperature}")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ConfigError(f"model.distill_alpha: expected a number in [0, 1], got {distill_alpha}")
        self.teacher_source, self.distill_temperature, self.distill_alpha = teacher, distill_temperature, distill_alpha
        self._teacher_cache: dict[int, torch.Tensor] = {}
        if labels is not None:
            labels = [str(x) for x in labels]
            if len(set(labels)) != len(labels) or len(labels) < 1:
                raise ConfigError(f"model.labels: expected distinct class names, got {labels}")
        if problem_type == "regression" and labels:
            raise ConfigError("model.labels: a regression model has no labels; remove them or change model.problem_type")
        self.labels = labels
        # class names without a problem type mean ordinary single-label classification
        self.problem_type = problem_type or ("single_label_classification" if labels else None)
        self.multi_label_threshold = multi_label_threshold

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """Take the label schema the data module resolved (the model's own when it had one)."""
        if schema is not None and schema.problem_type is not None:
            self.problem_type, self.labels = schema.problem_type, schema.labels
        if self.problem_type is None:
            raise ConfigError("model.problem_type: unknown; set it (and model.labels) or train on labelled data")
        if self.teacher_source is not None and self.problem_type != "single_label_classification":
            raise ConfigError(f"model.teacher: distillation needs single-label classes, not {self.problem_type}")
        if self.teacher_source is not None and self._trainer is not None and self.trainer.state.fn == "fit":
            _ = self.teacher  # loaded (and its labels checked) now, before training starts
        return {"labels": self.labels, "problem_type": self.problem_type}

    @property
    def teacher(self) -> Any:
        """The frozen teacher model (loaded on first use; kept out of this module's parameters and checkpoints)."""
        if self.teacher_source is None:
            return None
        if "_teacher" not in self.__dict__:
            self.__dict__["_teacher"] = self._load_teacher(self.teacher_source)
        return self.__dict__["_teacher"]

    def _load_teacher(self, source: str) -> Any:
        from transformers import AutoModelForSequenceClassification

        from lit_modules.base import load_pretrained

        if source.endswith(".ckpt"):
            from lit_modules.checkpoint_io import check_checkpoint

            check_checkpoint(source, "model.teacher")
            module = type(self).load_from_checkpoint(source, map_location="cpu", teacher=None)
            module.configure_model()
            model, labels = module.model, module.labels
        else:
            model = load_pretrained(AutoModelForSequenceClassification, source, "model.teacher")
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if self.labels is not None and list(labels) != list(self.labels):
            raise ConfigError(f"model.teacher: its labels {list(labels)} are not the student's {self.labels} (same "
                              "names, same order)")
        model.eval().requires_grad_(False)
        return model.to(self.device)

    def training_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher_source is None or self.problem_type != "single_label_classification":
            return outputs.loss
        from lit_modules.distillation import distillation_loss

        return distillation_loss(outputs.logits, self._teacher_logits(batch), batch["labels"],
                                 self.distill_temperature, self.distill_alpha)

    @torch.no_grad()
    def _teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits of a training batch, each example's computed once and cached by its index."""
        idx = batch["idx"].tolist()
        missing = [k for k, i in enumerate(idx) if i not in self._teacher_cache]
        if missing:
            teacher = self.teacher.to(self.device)
            inputs = {k: v[missing] for k, v in self.model_inputs(batch, labels=False).items()}
            for k, row in zip(missing, teacher(**inputs).logits.float().cpu()):
                self._teacher_cache[idx[k]] = row
        return torch.stack([self._teacher_cache[i] for i in idx]).to(self.device)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.labels or [])

    def build_model(self) -> Any:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if self.problem_type is None:
            raise ConfigError("model.problem_type: unknown; set it (and model.labels) or train on labelled data")
        config_kwargs: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        if self.labels:
            config_kwargs.update(self.label_config())
        config = self.from_pretrained(AutoConfig, **config_kwargs)
        return self.from_pretrained(AutoModelForSequenceClassification, config=config)

    def build_metrics(self) -> MetricCollection:
        return classification_metrics(self.problem_type, self.num_labels, self.multi_label_threshold)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        update_classification_metrics(metrics, self.problem_type, outputs.logits, batch["labels"])
        if self.table_rows is not None and self.problem_type == "single_label_classification":  # --log_predictions
            self._confusion(stage).update(outputs.logits.detach().argmax(-1), batch["labels"])

    def _confusion(self, stage: str) -> Any:
        """The confusion matrix of a stage (evaluation set), kept only while tables are logged."""
        from torchmetrics.classification import MulticlassConfusionMatrix

        if not hasattr(self, "_confusions"):
            self._confusions = torch.nn.ModuleDict()
        if stage not in self._confusions:
            self._confusions[stage] = MulticlassConfusionMatrix(self.num_labels).to(self.device)
        return self._confusions[stage]

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        table = self.schema.split(stage).table if self.schema is not None and self.schema.resolved else None
        return classification_table_rows(self.problem_type, self.labels or [], outputs.logits, batch, table,
                                         self.multi_label_threshold)

    def evaluation_plots(self, stage: str) -> dict[str, Any]:
        if self.problem_type != "single_label_classification":
            return {}
        confusion = self._confusion(stage)
        matrix = confusion.compute().tolist()  # syncs the counts of every process
        confusion.reset()
        return {"confusion_matrix": (list(self.labels or []), matrix)}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        logits = self(**self.model_inputs(batch, labels=False)).logits
        return classification_rows(self.problem_type, self.labels or [], logits, batch["idx"].tolist(),
                                   self.multi_label_threshold)

    def hub_pipeline_tag(self) -> Optional[str]:
        return "text-classification"
