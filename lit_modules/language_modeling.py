"""Language-model (continued) pretraining: masked LM for encoders, causal LM for decoders, on raw text.

The data module cuts the text into blocks and makes the targets (masks for masked LM); this module scores them:
``val/loss`` is the mean loss per predicted token (masked tokens, or next tokens), ``val/perplexity`` its
exponential. The export is a plain Hugging Face folder (``AutoModelForMaskedLM`` / ``AutoModelForCausalLM``) that
every other task takes as ``model_name_or_path``; with PEFT the adapters are merged into it first.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric, MetricCollection

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError
from lit_modules.schema import IGNORE_INDEX, DataSchema

Objective = Literal["mlm", "clm"]


def detect_objective(config: Any) -> Objective:
    """``clm`` for decoder-only families, ``mlm`` for encoders that have a masked-LM head (as
    ``lit_modules.seq2seq.detect_architecture`` tells them apart); encoder-decoders are refused."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model.model_name_or_path: {model_type} is an encoder-decoder; language-model pretraining "
                          "here takes encoders (masked LM) or decoders (causal LM)")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "clm"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    raise ConfigError(f"model.objective: cannot tell whether {model_type} is trained as a masked or a causal LM; "
                      "set mlm or clm")


class TokenPerplexity(Metric):
    """exp of the mean negative log-likelihood per predicted token, summed in float64 so that the value does not
    depend on how the tokens were batched or shared among processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, token_nll: torch.Tensor) -> None:
        self.nll += token_nll.double().sum()
        self.tokens += token_nll.numel()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1))


class LanguageModelingModule(TransformerModule):
    """Masked or causal language modelling of raw text, for domain-adaptive (continued) pretraining.

    ``predict`` scores each block: the number of predicted tokens, the mean loss and the perplexity, with the
    block's text and the line (document) where it starts.

    Args:
        objective: ``mlm`` (``AutoModelForMaskedLM``; the data module masks) or ``clm`` (``AutoModelForCausalLM``;
            labels are the inputs, shifted by the model); ``null`` reads it from the model config (decoder-only
            families: clm; encoders: mlm).
        **kwargs: the options of :class:`~lit_modules.base.TransformerModule`. With ``peft`` the export is always the
            adapters merged into the base model (a plain folder other tasks can start from), so ``export_merged`` has
            nothing to add; prompt-learning methods (virtual tokens, nothing to merge) are refused.
    """

    task = "language_modeling"
    prediction_input_fields = ("line",)

    def __init__(self, objective: Objective | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if objective is None:
            objective = detect_objective(self.pretrained_config())
            rank_zero_info(f"Objective: {objective} (from the config of {self.model_name_or_path}; set model.objective "
                           "to choose)")
        elif objective not in ("mlm", "clm"):
            raise ConfigError(f"model.objective: expected mlm or clm, got {objective!r}")
        self.objective: Objective = objective
        tok = self.tokenizer
        if objective == "mlm" and tok.mask_token_id is None:
            raise ConfigError(f"model.objective: mlm needs a tokenizer with a mask token; {self.model_name_or_path}'s "
                              "has none (a decoder: set clm)")
        if objective == "clm" and tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ConfigError("model.model_name_or_path: the tokenizer has no end-of-sequence token to separate "
                                  "documents and pad with")
            tok.pad_token = tok.eos_token  # padding is ignored (labels -100, attention 0): any id will do
        if self.peft_spec is not None:
            from lit_modules.peft_support import PROMPT_LEARNING, build_peft_config, peft_type

            kind = peft_type(build_peft_config(self.peft_spec, None))
            if kind in PROMPT_LEARNING:
                raise ConfigError(f"model.peft: {kind} adds virtual tokens, which cannot be merged into the weights, "
                                  "and language-model pretraining exports a plain model for other tasks to start from; "
                                  "use a method whose weights merge (LORA, IA3, ...)")
        self.export_merged = False  # the export itself is the merged model (export_model)

    @property
    def decoder_only(self) -> bool:
        """Causal LM: the data module makes labels from the inputs instead of masking (``ModelFacts.decoder_only``)."""
        return self.objective == "clm"

    @property
    def peft_task_type(self) -> str | None:  # type: ignore[override]
        return "CAUSAL_LM" if self.objective == "clm" else None

    def apply_schema(self, schema: DataSchema | None) -> dict[str, Any]:
        return {"objective": self.objective}  # test / predict from the checkpoint rebuild the same head

    def build_model(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if self.objective == "mlm":
            return self.from_pretrained(AutoModelForMaskedLM)
        # an encoder trained as a causal LM (BERT's LM head model) must be told to attend causally
        encoder = getattr(self.pretrained_config(), "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        return self.from_pretrained(AutoModelForCausalLM, **({"is_decoder": True} if encoder else {}))

    # ---- scoring -------------------------------------------------------------------------------

    def _targets(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of the predicted positions (causal LM: position t predicts token t + 1)."""
        if self.objective == "clm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits, labels

    def predicted_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """How many tokens the batch's loss averages over."""
        labels = batch["labels"][:, 1:] if self.objective == "clm" else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def _check_labels(self, batch: dict[str, torch.Tensor]) -> None:
        if "labels" not in batch:
            raise ConfigError("language-model batches have no labels: run the model with its data module "
                              "(lit_modules.schema.connect(model, data), then trainer.fit / validate / test / predict), "
                              "which masks the blocks or copies the inputs as targets")

    def evaluation_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        self._check_labels(batch)
        return outputs.loss if self.predicted_tokens(batch) > 0 else None  # no token chosen: nothing to average

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return self.predicted_tokens(batch)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": TokenPerplexity()})

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative log-likelihood of every predicted token and, per row, the mask of them."""
        logits, labels = self._targets(logits, labels)
        keep = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
        return nll, keep

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        nll, _ = self.token_nll(outputs.logits, batch["labels"])
        if nll.numel():
            metrics["perplexity"].update(nll)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        self._check_labels(batch)
        logits = self(**self.model_inputs(batch, labels=False)).logits
        nll, keep = self.token_nll(logits, batch["labels"])
        per_row = torch.zeros(keep.shape[0], dtype=torch.float64, device=nll.device)
        per_row.index_add_(0, keep.nonzero()[:, 0], nll.double())
        counts = keep.sum(1).tolist()
        # the block as written: masked positions hold their original token in the labels
        original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
        rows = []
        for i, ids, mask, total, n in zip(batch["idx"].tolist(), original, batch["attention_mask"].bool(),
                                          per_row.tolist(), counts):
            loss = total / n if n else None
            rows.append({"idx": i, "text": self.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True),
                         "tokens": n, "loss": loss, "perplexity": math.exp(loss) if loss is not None else None})
        return rows

    # ---- export --------------------------------------------------------------------------------

    def export_model(self) -> Any:
        """The plain model: with PEFT, a copy with the adapters merged into the weights, which any task loads with
        ``from_pretrained`` (an adapter folder would need peft and the base model to load)."""
        if self.peft_config is None:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def hub_pipeline_tag(self) -> str | None:
        return "text-generation" if self.objective == "clm" else "fill-mask"
