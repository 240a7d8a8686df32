"""Prompt-based classification (PET / LM-BFF): a language model scores each class's label words.

A masked LM predicts the word at the template's mask ("great" vs "terrible"); a causal LM scores
the label words right after the prompt (summed log-probabilities of their tokens). The class scores
replace a classification head, so the same model works zero-shot (``validate`` / ``test`` without
training) and fine-tunes few-shot with cross-entropy over the classes, all metrics and outputs as
in text classification.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers.modeling_outputs import SequenceClassifierOutput

from torchmetrics import MetricCollection

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError
from lit_modules.schema import DataSchema
from lit_modules.text_classification import (
    classification_metrics,
    classification_rows,
    classification_table_rows,
    update_classification_metrics,
)

SINGLE_LABEL = "single_label_classification"


class PromptClassificationModule(TransformerModule):
    """Classification by label words under a language-model head.

    Args:
        verbalizer: class name -> label word (or several words, whose probabilities are averaged),
            in the order the classes take. Write words as they follow the prompt: with a leading
            space for BPE tokenizers (" great"); WordPiece tokenizers ignore it. A masked LM needs
            every word to be one token; a causal LM accepts multi-token words.
        lm_type: ``masked`` or ``causal``; ``null`` picks masked when the tokenizer has a mask token.
        calibrate: contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): at evaluation the
            class probabilities are divided by those the model gives content-free inputs rendered
            into the same template, which removes the label words' prior (majority-label and
            surface-form bias). Recomputed at the start of every evaluation, so it follows training.
        content_free_inputs: the texts that estimate that prior (their class probabilities are averaged).
        **kwargs: the options of :class:`~lit_modules.base.TransformerModule` (``peft`` included).
    """

    task = "prompt_classification"
    prediction_input_fields = ("text", "text_pair")
    evaluation_options = ("calibrate", "content_free_inputs")

    def __init__(
        self,
        verbalizer: dict[str, Union[str, list[str]]],
        lm_type: Optional[Literal["masked", "causal"]] = None,
        calibrate: bool = False,
        content_free_inputs: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> None:
        if not verbalizer or len(verbalizer) < 2:
            raise ConfigError(f"model.verbalizer: expected at least two classes with label words, got {verbalizer!r}")
        super().__init__(**kwargs)
        self.labels = [str(k) for k in verbalizer]  # the classes, in the verbalizer's order
        self.problem_type = SINGLE_LABEL
        self.lm_type = lm_type or ("masked" if self.tokenizer.mask_token is not None else "causal")
        if self.lm_type == "causal" and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.verbalizer = {str(k): [v] if isinstance(v, str) else list(v) for k, v in verbalizer.items()}
        self.word_ids = self._word_ids()
        self.calibrate = calibrate
        self.content_free_inputs = list(content_free_inputs) if content_free_inputs is not None else ["N/A", ""]
        if calibrate and not self.content_free_inputs:
            raise ConfigError("model.content_free_inputs: calibration needs at least one content-free text")
        self.log_prior: Optional[torch.Tensor] = None  # [classes], set at the start of each evaluation

    @property
    def peft_task_type(self) -> Optional[str]:  # type: ignore[override]
        return "CAUSAL_LM" if self.lm_type == "causal" else None

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """The classes are the verbalizer's; the data maps its labels to them (it fails on a label without words)."""
        if schema is not None and schema.labels is not None and list(schema.labels) != self.labels:
            raise ConfigError(f"model.verbalizer: classes {self.labels} differ from the data's labels {schema.labels}")
        return {}

    def build_metrics(self) -> MetricCollection:
        return classification_metrics(SINGLE_LABEL, len(self.labels))

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        update_classification_metrics(metrics, SINGLE_LABEL, outputs.logits, batch["labels"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        logits = self(**self.model_inputs(batch, labels=False)).logits
        return classification_rows(SINGLE_LABEL, self.labels, logits, batch["idx"].tolist())

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        table = self.schema.split(stage).table if self.schema is not None and self.schema.resolved else None
        return classification_table_rows(SINGLE_LABEL, self.labels, outputs.logits, batch, table)

    def _word_ids(self) -> list[list[list[int]]]:
        """Token ids of every label word, per class; masked LMs need single tokens."""
        out = []
        for label, words in self.verbalizer.items():
            per_class = []
            for word in words:
                ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ConfigError(f"model.verbalizer.{label}: {word!r} has no tokens")
                if self.lm_type == "masked" and len(ids) != 1:
                    pieces = self.tokenizer.convert_ids_to_tokens(ids)
                    raise ConfigError(f"model.verbalizer.{label}: {word!r} is {len(ids)} tokens {pieces} for this "
                                      "tokenizer; a masked LM needs single-token label words")
                per_class.append(ids)
            out.append(per_class)
        return out

    def build_model(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        auto = AutoModelForMaskedLM if self.lm_type == "masked" else AutoModelForCausalLM
        model = self.from_pretrained(auto)
        config = self.label_config()
        model.config.id2label, model.config.label2id = config["id2label"], config["label2id"]
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                **_: Any) -> SequenceClassifierOutput:
        scores = self._masked_scores(input_ids, attention_mask) if self.lm_type == "masked" else \
            self._causal_scores(input_ids, attention_mask)
        if self.calibrate and not self.training and self.log_prior is not None:
            scores = scores.log_softmax(-1) - self.log_prior.to(scores.device)
        loss = torch.nn.functional.cross_entropy(scores, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=scores)

    @torch.no_grad()
    def content_free_prior(self) -> torch.Tensor:
        """Log of the mean class probabilities for the content-free inputs rendered into the template."""
        if self.schema is None or self.schema.encode is None:
            raise ConfigError("model.calibrate: needs the prompt data module, which renders the template "
                              "(lit_modules.schema.connect(model, data))")
        n = len(self.content_free_inputs)
        encoded = self.schema.encode({"text": self.content_free_inputs, "text_pair": [None] * n})
        saved, self.log_prior = self.log_prior, None
        try:
            probs = []
            for ids in encoded["input_ids"]:  # one at a time: no padding to get right
                input_ids = torch.tensor([ids], device=self.device)
                scores = self(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
                probs.append(scores.float().softmax(-1)[0])
        finally:
            self.log_prior = saved
        return torch.stack(probs).mean(0).log()

    def start_evaluation(self, stage: str) -> None:
        if self.calibrate:
            self.log_prior = self.content_free_prior()
            prior = ", ".join(f"{label}={p:.3f}" for label, p in zip(self.labels, self.log_prior.exp().tolist()))
            rank_zero_info(f"Contextual calibration: class prior on content-free inputs {prior}")

    @staticmethod
    def _aligned(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the input positions (prompt-learning PEFT methods prepend virtual tokens)."""
        return logits[:, -input_ids.shape[1]:]

    @staticmethod
    def _pool_words(word_logprobs: list[torch.Tensor]) -> torch.Tensor:
        """[B] log-probabilities of each label word -> the class score (log of their mean probability)."""
        stacked = torch.stack(word_logprobs, dim=-1)
        return torch.logsumexp(stacked, dim=-1) - torch.log(torch.tensor(float(stacked.shape[-1])))

    def _masked_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self._aligned(self.model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids)
        at_mask = logits[input_ids == self.tokenizer.mask_token_id]  # [B, vocab]; one mask per row
        logprobs = at_mask.float().log_softmax(-1)
        return torch.stack([self._pool_words([logprobs[:, ids[0]] for ids in words]) for words in self.word_ids], -1)

    def _causal_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(1) - 1 if self.tokenizer.padding_side == "right" else \
            torch.full_like(attention_mask[:, 0], input_ids.shape[1] - 1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if all(len(ids) == 1 for words in self.word_ids for ids in words):  # one forward pass scores every class
            logits = self._aligned(self.model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids)
            logprobs = logits[rows, last].float().log_softmax(-1)
            return torch.stack([self._pool_words([logprobs[:, ids[0]] for ids in words]) for words in self.word_ids], -1)
        per_class = []
        for words in self.word_ids:
            per_class.append(self._pool_words([self._continuation_logprob(input_ids, attention_mask, last, ids)
                                               for ids in words]))
        return torch.stack(per_class, -1)

    def _continuation_logprob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor,
                              word: list[int]) -> torch.Tensor:
        """Summed log-probability of the word's tokens right after each prompt (teacher forcing)."""
        batch, width, n = input_ids.shape[0], input_ids.shape[1], len(word)
        ids = torch.full((batch, width + n), self.tokenizer.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros((batch, width + n), dtype=attention_mask.dtype, device=attention_mask.device)
        ids[:, :width], mask[:, :width] = input_ids, attention_mask
        word_t = torch.tensor(word, dtype=input_ids.dtype, device=input_ids.device)
        positions = last[:, None] + 1 + torch.arange(n, device=input_ids.device)[None, :]  # where the word goes
        rows = torch.arange(batch, device=input_ids.device)[:, None]
        ids[rows, positions] = word_t
        mask[rows, positions] = 1
        logprobs = self._aligned(self.model(input_ids=ids, attention_mask=mask).logits, ids).float().log_softmax(-1)
        return logprobs[rows, positions - 1, word_t[None, :]].sum(-1)

    def export_files(self) -> dict[str, str]:
        import json

        return {"verbalizer.json": json.dumps(self.verbalizer, indent=2) + "\n"}

    def hub_pipeline_tag(self) -> Optional[str]:
        return "fill-mask" if self.lm_type == "masked" else "text-generation"
