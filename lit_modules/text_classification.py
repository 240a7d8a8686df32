"""Text classification: multi-class, multi-label and regression heads on any Hugging Face encoder."""

from __future__ import annotations

from typing import Any, Literal, Optional

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

from lit_modules.base import ConfigError, TransformerModule

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]


class TextClassificationModule(TransformerModule):
    """Sequence classification (``AutoModelForSequenceClassification``).

    Args:
        labels: the class names in id order; ``null`` takes them from the training data. Written into
            the model config (``id2label`` / ``label2id``) and the checkpoint, so test, predict and
            export use the same ids.
        problem_type: ``null`` infers it from the training labels.
        multi_label_threshold: probability above which a label is predicted (multi-label only).
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    prediction_input_fields = ("text", "text_pair")
    peft_task_type = "SEQ_CLS"

    def __init__(
        self,
        labels: Optional[list[str]] = None,
        problem_type: Optional[ProblemType] = None,
        multi_label_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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

    def setup(self, stage: str) -> None:
        """Take the label schema the data module resolved (the model's own when it had one)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and getattr(dm, "problem_type", None) is not None:
            self.problem_type = dm.problem_type
            self.labels = dm.labels
        if self.problem_type is None:
            raise ConfigError("model.problem_type: unknown; set it (and model.labels) or train on labelled data")
        # recorded in the checkpoint (so `test/predict --ckpt_path` rebuild the same head) and in the logged config
        self.save_hyperparameters({**self.hparams, "labels": self.labels, "problem_type": self.problem_type})

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.labels or [])

    def build_model(self) -> Any:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if self.problem_type is None:
            raise ConfigError("model.problem_type: unknown; set it (and model.labels) or train on labelled data")
        config_kwargs: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        if self.labels:
            config_kwargs["id2label"] = dict(enumerate(self.labels))
            config_kwargs["label2id"] = {name: i for i, name in enumerate(self.labels)}
        config = self.from_pretrained(AutoConfig, **config_kwargs)
        return self.from_pretrained(AutoModelForSequenceClassification, config=config)

    def build_metrics(self) -> MetricCollection:
        n = self.num_labels
        if self.problem_type == "regression":
            return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "mse": MeanSquaredError()})
        if self.problem_type == "multi_label_classification":
            t = self.multi_label_threshold
            return MetricCollection({
                "accuracy": MultilabelAccuracy(n, threshold=t, average="micro"),
                "exact_match": MultilabelExactMatch(n, threshold=t),
                "f1": MultilabelF1Score(n, threshold=t, average="macro"),
                "f1_micro": MultilabelF1Score(n, threshold=t, average="micro"),
            })
        return MetricCollection({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "f1": MulticlassF1Score(n, average="macro"),
            "mcc": MulticlassMatthewsCorrCoef(n),
        })

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        logits = outputs.logits.detach().float()
        if self.problem_type == "regression":
            metrics.update(logits.squeeze(-1), batch["labels"].float())
        elif self.problem_type == "multi_label_classification":
            metrics.update(torch.sigmoid(logits), batch["labels"].long())
        else:
            metrics.update(logits.argmax(-1), batch["labels"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "labels"}
        logits = self(**inputs).logits.float()
        idx = batch["idx"].tolist()
        if self.problem_type == "regression":
            return [{"idx": i, "score": s} for i, s in zip(idx, logits.squeeze(-1).tolist())]
        if self.problem_type == "multi_label_classification":
            probs = torch.sigmoid(logits).tolist()
            return [
                {"idx": i, "labels": [n for n, q in zip(self.labels, p) if q > self.multi_label_threshold],
                 "scores": dict(zip(self.labels, p))}
                for i, p in zip(idx, probs)
            ]
        probs = torch.softmax(logits, -1)
        best = probs.argmax(-1).tolist()
        return [
            {"idx": i, "label": self.labels[b], "scores": dict(zip(self.labels, p))}
            for i, b, p in zip(idx, best, probs.tolist())
        ]
