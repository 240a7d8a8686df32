"""Dialogue fine-tuning: a decoder-only chat model learns to write the next reply of a conversation.

Conversations are rendered with the tokenizer's chat template (``model.chat_template`` supplies or replaces it);
the loss covers the assistant turns the data marks (``datamodules.dialogue``). Validation and test log the
teacher-forced loss and its perplexity (``exp`` of the loss averaged over every learned token); test and predict
also generate the last reply of every conversation from the turns before it and score it against the reference
with ROUGE-1/2/L/Lsum and SacreBLEU, with the mean reply length in tokens. The export is a causal-LM folder
whose tokenizer keeps the chat template, so ``transformers.pipeline("text-generation")`` takes conversations.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from torchmetrics import Metric, MetricCollection

from lit_modules.base import TransformerModule
from lit_modules.errors import ConfigError, first_line
from lit_modules.schema import IGNORE_INDEX, DataSchema
from lit_modules.seq2seq import generation_settings, left_padded_prompts
from lit_modules.seq2seq_metrics import (
    MeanGeneratedLength,
    RougeScore,
    SacreBleuScore,
    SentenceSplitter,
)

# Validation epochs that generate nothing leave the reply metrics without updates; they log nothing then (an empty
# result), so torchmetrics' warning about computing before updating says nothing useful here.
warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric Reply(Rouge|Bleu|Length) was called")

_PROBE = [{"role": "user", "content": "Hi, how are you?"}, {"role": "assistant", "content": "Fine, thank you."}]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template writes right after an assistant's text (the first special or added token after
    it): generation stops there. Raises a one-line :class:`ConfigError` when there is none."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except TemplateError as e:  # jinja syntax, undefined names, the template's raise_exception
        raise ConfigError(f"model.chat_template: cannot render a conversation: {first_line(e)}") from None
    reply = _PROBE[1]["content"]
    end = text.rfind(reply) + len(reply)
    if end < len(reply):
        raise ConfigError("model.chat_template: the template does not write the assistant's text as it is")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if start >= end and token in specials:
            return int(token)
    raise ConfigError("model.chat_template: assistant turns end with no special token, so generation could not stop "
                      "at the end of a reply; use a template that ends them with one (e.g. the eos token)")


def read_chat_template(value: str) -> str:
    """A chat template given as text or as the path of a ``.jinja`` file."""
    path = Path(value)
    if value.endswith(".jinja"):
        if not path.is_file():
            raise ConfigError(f"model.chat_template: file {value} does not exist")
        return path.read_text(encoding="utf-8")
    return value


class Perplexity(Metric):
    """``exp`` of the loss averaged over every learned token of the epoch (not over batches): the sum of each
    batch's mean loss times its token count, divided by all tokens, summed over processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor, tokens: int) -> None:
        if tokens == 0:  # a batch without learned tokens has a NaN mean
            return
        self.loss_sum += mean_loss.detach().to(torch.float64) * tokens
        self.tokens += tokens

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.tokens) == 0:
            return {}
        return {"perplexity": torch.exp(self.loss_sum / self.tokens).float()}


class _WhenGenerated:
    """Reply metrics log nothing (an empty result) in an epoch that generated no reply."""

    key = ""

    def compute(self) -> Any:
        if self.unique_rows().numel() == 0:  # type: ignore[attr-defined]
            return {}
        value = super().compute()  # type: ignore[misc]
        return value if isinstance(value, dict) else {self.key: value}


class ReplyRouge(_WhenGenerated, RougeScore):
    """ROUGE-1/2/L/Lsum of the generated replies against the reference replies."""


class ReplyBleu(_WhenGenerated, SacreBleuScore):
    """Corpus SacreBLEU of the generated replies."""

    key = "bleu"


class ReplyLength(_WhenGenerated, MeanGeneratedLength):
    """Mean generated reply length in tokens (the end-of-turn token not counted)."""

    key = "reply_len"


class DialogueModule(TransformerModule):
    """Next-reply fine-tuning of a decoder-only chat model (``AutoModelForCausalLM``).

    Args:
        chat_template: the Jinja chat template (text, or a ``.jinja`` file) when the tokenizer has none or another
            one is wanted; it is saved with the tokenizer in checkpoints' hyperparameters and the export.
        num_beams / max_new_tokens / min_new_tokens / length_penalty / no_repeat_ngram_size: generation settings
            for validate / test / predict (greedy by default), saved as the export's ``generation_config.json``.
        generation_kwargs: any other ``GenerationConfig`` field (``repetition_penalty``, ``do_sample``, ...).
        generate_val_samples: validation generates replies (and logs ROUGE / BLEU / reply length) for the first N
            examples (file order); 0 (default): validation logs loss and perplexity only; null: every example.
            Test and predict always generate for every example.
        rouge_use_stemmer / sentence_splitter / bleu_tokenize: as for seq2seq (``lit_modules.seq2seq_metrics``).
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "dialogue"
    peft_task_type = "CAUSAL_LM"
    non_input_keys = frozenset({"idx", "reply_start"})
    # dropped_turns: how many of the history's first turns the model did not see (data.max_seq_length)
    prediction_input_fields = ("history", "dropped_turns", "reference")
    evaluation_options = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
                          "generation_kwargs", "generate_val_samples", "rouge_use_stemmer", "sentence_splitter",
                          "bleu_tokenize")

    def __init__(
        self,
        chat_template: str | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        generation_kwargs: dict[str, Any] | None = None,
        generate_val_samples: int | None = 0,
        rouge_use_stemmer: bool = True,
        sentence_splitter: SentenceSplitter = "rules",
        bleu_tokenize: str = "13a",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (generate_val_samples or 0) < 0:
            raise ConfigError(f"model.generate_val_samples: expected an integer >= 0, got {generate_val_samples}")
        self.generation_settings = generation_settings(num_beams, max_new_tokens, min_new_tokens, length_penalty,
                                                       no_repeat_ngram_size, generation_kwargs, sentence_splitter)
        self.generate_val_samples = generate_val_samples
        self.rouge_use_stemmer, self.sentence_splitter = rouge_use_stemmer, sentence_splitter
        self.bleu_tokenize = bleu_tokenize
        self._prepare_tokenizer(chat_template)
        self._generate_rows: dict[str, int | None] = {"val": 0, "test": None}
        self.system_prompt: str | None = None  # the data's system prompt (recorded in the export)

    def _prepare_tokenizer(self, chat_template: str | None) -> None:
        tok = self.tokenizer
        if chat_template is not None:
            tok.chat_template = read_chat_template(chat_template)
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"model.chat_template: the tokenizer of {self.model_name_or_path} has no chat template; "
                              "give one (Jinja text or a .jinja file)")
        if not getattr(tok, "is_fast", False):
            raise ConfigError(f"model.model_name_or_path: {type(tok).__name__} is not a fast tokenizer; locating the "
                              "assistant turns needs its character offsets")
        self.end_of_turn_id = end_of_turn_id(tok)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.convert_ids_to_tokens(self.end_of_turn_id)  # padding is masked
        # batched generation pads prompts on the left; init_kwargs is what save_pretrained writes
        tok.padding_side = tok.init_kwargs["padding_side"] = "left"

    # ---- model ---------------------------------------------------------------------------------

    def apply_schema(self, schema: DataSchema | None) -> dict[str, Any]:
        """Keep the data's system prompt for the export."""
        if schema is not None:
            self.system_prompt = schema.prompt.get("system_prompt")
        return {}

    def build_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        model = self.from_pretrained(AutoModelForCausalLM)
        gen, tok = model.generation_config, self.tokenizer
        stops = [self.end_of_turn_id]
        if tok.eos_token_id not in (None, self.end_of_turn_id):
            stops.append(tok.eos_token_id)
        gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, stops if len(stops) > 1 else stops[0]
        for key, value in self.generation_settings.items():
            setattr(gen, key, value)
        return model

    def forward(self, **inputs: Any) -> Any:
        if "attention_mask" in inputs:
            # positions count real tokens only, so left-padded rows train like unpadded ones
            inputs.setdefault("position_ids", (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0))
        elif "position_ids" in inputs:
            # a padding-free row (data.padding_free): transformers masks packed sequences apart only without a KV
            # cache, and models make one whenever use_cache is on (their default, in training too)
            inputs["use_cache"] = False
        return self.model(**inputs)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({
            "perplexity": Perplexity(),
            "rouge": ReplyRouge(use_stemmer=self.rouge_use_stemmer, sentence_splitter=self.sentence_splitter),
            "bleu": ReplyBleu(tokenize=self.bleu_tokenize),
            "reply_len": ReplyLength(),
        }, compute_groups=False)

    # ---- evaluation ----------------------------------------------------------------------------

    def start_evaluation(self, stage: str) -> None:
        """Validation generates for the first ``generate_val_samples`` examples; test for all of them."""
        if stage in self._generate_rows:
            self._generate_rows[stage] = self.generate_val_samples if stage == "val" else None

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over the learned tokens (each predicted from the token before it)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        """Perplexity from every batch; generated replies scored on the rows this epoch generates for."""
        metrics["perplexity"].update(outputs.loss, self.loss_weight(batch))
        limit = self._generate_rows.get(stage.partition("/")[0])  # val/<name>: one of several validation sets
        if limit is not None:
            if limit == 0:
                return
            keep = batch["idx"] < limit
            if not keep.any():
                return
            batch = {k: v[keep] for k, v in batch.items()}
        texts, lengths = self.generate_replies(batch)
        all_refs = self.schema.split(stage).references if self.schema is not None else None
        if all_refs is None:
            raise ConfigError(f"the {stage} data hold no reference replies to score the generated ones against")
        idx = batch["idx"]
        refs = [all_refs[i] for i in idx.tolist()]
        metrics["rouge"].update(preds=texts, references=refs, idx=idx)
        metrics["bleu"].update(preds=texts, references=refs, idx=idx)
        metrics["reply_len"].update(gen_lengths=lengths, idx=idx)

    @torch.no_grad()
    def generate_replies(self, batch: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        """Generate the reply of every row from its turns before ``reply_start``; returns the texts and their lengths
        in tokens (without the end-of-turn token)."""
        ids = batch["input_ids"]
        before_reply = torch.arange(ids.shape[1], device=ids.device)[None, :] < batch["reply_start"][:, None]
        prompts, mask = left_padded_prompts(ids, batch["attention_mask"] * before_reply, None,
                                            self.tokenizer.pad_token_id)
        new = self.model.generate(input_ids=prompts, attention_mask=mask)[:, prompts.shape[1]:]
        stops = self.model.generation_config.eos_token_id
        is_end = torch.isin(new, torch.as_tensor(stops if isinstance(stops, list) else [stops], device=new.device))
        lengths = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(new[:, 0], new.shape[1]))
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                 for row, n in zip(new, lengths.tolist())]
        return texts, lengths

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                     dataloader_idx: int = 0) -> list[dict[str, Any]]:
        texts, _ = self.generate_replies(batch)
        return [{"idx": i, "prediction": t} for i, t in zip(batch["idx"].tolist(), texts)]

    # ---- export --------------------------------------------------------------------------------

    def export_model(self) -> Any:
        """The model with its generation settings (stopping at the end-of-turn token) and, when the data gave one,
        the system prompt in ``config.task_specific_params["dialogue"]`` (the tokenizer keeps the chat template)."""
        if self.system_prompt:
            self.model.config.task_specific_params = {"dialogue": {"system_prompt": self.system_prompt}}
        return self.model
