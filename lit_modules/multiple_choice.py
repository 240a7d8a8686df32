"""Multiple choice (SWAG, COPA, ARC style): every (context, choice) pair is scored by one encoder pass and a
linear head (``AutoModelForMultipleChoice``); the highest-scoring choice is the answer."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torchmetrics import MeanMetric, MetricCollection
from transformers.modeling_outputs import MultipleChoiceModelOutput

from lit_modules.base import TransformerModule


class MultipleChoiceModule(TransformerModule):
    """Multiple-choice classification, scored by accuracy.

    Batches hold ``[batch, choices, tokens]`` inputs and a ``choice_mask`` for examples with fewer choices than
    the batch's most; masked choices get no score. ``predict`` writes per example the choices, the predicted
    index and text, and every choice's probability. The export loads in ``AutoModelForMultipleChoice``.

    Args:
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "multiple_choice"
    peft_task_type = "SEQ_CLS"  # peft has no multiple-choice type; this one keeps the classifier head trainable
    prediction_input_fields = ("context", "prefix", "choices", "label")

    def build_model(self) -> Any:
        from transformers import AutoModelForMultipleChoice

        return self.from_pretrained(AutoModelForMultipleChoice)

    def forward(self, labels: Optional[torch.Tensor] = None, choice_mask: Optional[torch.Tensor] = None,
                **inputs: torch.Tensor) -> MultipleChoiceModelOutput:
        logits = self.model(**inputs).logits
        if choice_mask is not None:  # padded choices of examples with fewer of them: never chosen
            logits = logits.masked_fill(~choice_mask.bool(), torch.finfo(logits.dtype).min)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        metrics["accuracy"].update((outputs.logits.argmax(-1) == batch["labels"]).float())

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        logits = self(**self.model_inputs(batch, labels=False)).logits.float()
        probs = torch.softmax(logits, -1)
        rows = []
        for i, p, mask in zip(batch["idx"].tolist(), probs.tolist(), batch["choice_mask"].tolist()):
            scores = [q for q, real in zip(p, mask) if real]
            rows.append({"idx": i, "prediction": int(max(range(len(scores)), key=scores.__getitem__)), "scores": scores})
        return rows

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        """Per question: the context, the choices, the gold and the predicted choice and its probability."""
        table = self.schema.split(stage).table if self.schema is not None and self.schema.resolved else None
        idx = batch["idx"].tolist()
        records = table.select_columns(["context", "choices"]).select(idx).to_list() if table is not None else \
            [{"context": None, "choices": []}] * len(idx)
        probs = torch.softmax(outputs.logits.detach().float(), -1).cpu()
        best, gold = probs.argmax(-1).tolist(), batch["labels"].tolist()
        return [{"idx": i, "context": r["context"], "choices": r["choices"],
                 "gold": r["choices"][g] if g < len(r["choices"]) else g,
                 "prediction": r["choices"][b] if b < len(r["choices"]) else b, "score": float(probs[k, b])}
                for k, (i, r, b, g) in enumerate(zip(idx, records, best, gold))]

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The predicted choice's text beside its index."""
        for row in rows:
            if row.get("choices"):
                row["prediction_text"] = row["choices"][row["prediction"]]
        return rows

    def hub_pipeline_tag(self) -> Optional[str]:
        return "multiple-choice"
