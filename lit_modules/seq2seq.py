"""Sequence-to-sequence generation: summarization and translation with three kinds of model.

- ``seq2seq``: any ``AutoModelForSeq2SeqLM`` (T5, BART, PEGASUS, Marian, ...);
- ``encoder_decoder``: an ``EncoderDecoderModel`` warm-started from two encoder checkpoints (the
  "bert2bert" recipe of Rothe et al. 2020), its start / end / pad tokens taken from the tokenizer;
- ``causal_lm``: a decoder-only language model (GPT-2, Llama family) on ``prompt + target``
  sequences, the loss on the target tokens only, prompts left-padded for batched generation.

Validation and test compute the teacher-forced loss on every batch and, on the epochs that generate,
ROUGE-1/2/L/Lsum, SacreBLEU and the mean generated length on generated text.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection

from lit_modules.base import TransformerModule, held_load_reports, resolve_model_path
from lit_modules.errors import ConfigError, first_line
from lit_modules.schema import DEFAULT_PROMPT, IGNORE_INDEX, DataSchema
from lit_modules.seq2seq_metrics import (
    MeanGeneratedLength,
    RougeScore,
    SacreBleuScore,
    SentenceSplitter,
    check_sentence_splitter,
)

Architecture = Literal["seq2seq", "encoder_decoder", "causal_lm"]


def detect_architecture(config: Any) -> Architecture:
    """``seq2seq`` for encoder-decoder configs, ``causal_lm`` for decoder-only families, else ``encoder_decoder``.

    BERT-like encoders also have a causal-LM head class in transformers; they count as encoders
    because they have a masked-LM head too (a pure decoder family has none).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal_lm"
    return "encoder_decoder"


def left_padded_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of decoder-only rows (no label, not padding), left-padded for ``generate``."""
    keep = attention_mask.bool()
    if labels is not None:
        keep &= labels.eq(IGNORE_INDEX)
    lengths = keep.sum(1)
    width = int(lengths.max())
    ids = input_ids.new_full((len(input_ids), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = input_ids[i][keep[i]]
        mask[i, width - n:] = 1
    return ids, mask



def generation_settings(num_beams: int, max_new_tokens: int, min_new_tokens: int, length_penalty: float,
                        no_repeat_ngram_size: int, generation_kwargs: Optional[dict[str, Any]],
                        sentence_splitter: str) -> dict[str, Any]:
    """The ``generate`` settings of every generating task (seq2seq, dialogue), checked in one line each."""
    for key, value, low in (("num_beams", num_beams, 1), ("max_new_tokens", max_new_tokens, 1),
                            ("min_new_tokens", min_new_tokens, 0), ("no_repeat_ngram_size", no_repeat_ngram_size, 0)):
        if value < low:
            raise ConfigError(f"model.{key}: expected an integer >= {low}, got {value}")
    if min_new_tokens > max_new_tokens:
        raise ConfigError(f"model.min_new_tokens: {min_new_tokens} is more than model.max_new_tokens={max_new_tokens}")
    check_sentence_splitter(sentence_splitter, "model.sentence_splitter")
    from transformers import GenerationConfig

    unknown = sorted(set(generation_kwargs or {}) - set(GenerationConfig().to_dict()))
    if unknown:
        raise ConfigError(f"model.generation_kwargs: {', '.join(unknown)} is not a GenerationConfig field")
    return {
        "num_beams": num_beams, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens or None,
        "no_repeat_ngram_size": no_repeat_ngram_size or None,
        # beam-only setting: transformers warns when it is set for greedy search
        "length_penalty": length_penalty if num_beams > 1 else None,
        # said explicitly, so that pipelines (whose default is sampling) decode as evaluation did
        "do_sample": False,
        **(generation_kwargs or {}),
    }

class Seq2SeqModule(TransformerModule):
    """Summarization / translation fine-tuning with generation-based evaluation.

    Args:
        architecture: ``seq2seq``, ``encoder_decoder`` (warm-start from encoder checkpoints) or
            ``causal_lm``; ``null`` reads it from the model config (encoder-decoder configs -> seq2seq,
            decoder-only families -> causal_lm, encoders such as BERT -> encoder_decoder).
        decoder_name_or_path: ``encoder_decoder`` only: the decoder's checkpoint (default: the encoder's);
            it must share the encoder's tokenizer.
        num_beams / max_new_tokens / min_new_tokens / length_penalty / no_repeat_ngram_size: generation
            settings for validate / test / predict; saved as the export's ``generation_config.json``.
        generation_kwargs: any other ``GenerationConfig`` field (``repetition_penalty``, ``do_sample``, ...).
        generate_every_n_epochs: while fitting, generate (and score ROUGE / BLEU) on epochs 0, N, 2N, ...
            and the last; the other validation epochs compute the loss only.
        generate_val_samples: while fitting, generate for the first N validation examples (file order)
            only; the loss still covers all of them. Test, validate and predict always use every example.
        rouge_use_stemmer: Porter-stem tokens for ROUGE (as the published summarization numbers).
        sentence_splitter: how ROUGE-Lsum splits text into sentences: ``rules`` (offline) or ``punkt``
            (NLTK's trained English model; needs its ``punkt_tab`` data).
        bleu_tokenize: SacreBLEU tokeniser (``13a``, ``intl``, ``zh``, ``char``, ...).
        **kwargs: the shared options of :class:`~lit_modules.base.TransformerModule`.
    """

    task = "seq2seq"
    prediction_input_fields = ("source", "target")
    evaluation_options = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
                          "generation_kwargs", "generate_every_n_epochs", "generate_val_samples", "rouge_use_stemmer",
                          "sentence_splitter", "bleu_tokenize")

    def __init__(
        self,
        architecture: Optional[Architecture] = None,
        decoder_name_or_path: Optional[str] = None,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        generation_kwargs: Optional[dict[str, Any]] = None,
        generate_every_n_epochs: int = 1,
        generate_val_samples: Optional[int] = None,
        rouge_use_stemmer: bool = True,
        sentence_splitter: SentenceSplitter = "rules",
        bleu_tokenize: str = "13a",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if generate_every_n_epochs < 1:
            raise ConfigError(f"model.generate_every_n_epochs: expected an integer >= 1, got {generate_every_n_epochs}")
        if generate_val_samples is not None and generate_val_samples < 1:
            raise ConfigError(f"model.generate_val_samples: expected an integer >= 1, got {generate_val_samples}")
        self.generation_settings = generation_settings(num_beams, max_new_tokens, min_new_tokens, length_penalty,
                                                       no_repeat_ngram_size, generation_kwargs, sentence_splitter)
        self.generate_every_n_epochs = generate_every_n_epochs
        self.generate_val_samples = generate_val_samples
        self.rouge_use_stemmer, self.sentence_splitter, self.bleu_tokenize = rouge_use_stemmer, sentence_splitter, bleu_tokenize
        if architecture is None:
            from transformers import AutoConfig

            architecture = detect_architecture(self.from_pretrained(AutoConfig))
            rank_zero_info(f"Architecture: {architecture} (from the config of {self.model_name_or_path}; "
                           "set model.architecture to choose)")
        self.architecture: Architecture = architecture
        if decoder_name_or_path is not None and architecture != "encoder_decoder":
            raise ConfigError(f"model.decoder_name_or_path: only used with architecture encoder_decoder, not {architecture}")
        self.decoder_name_or_path = decoder_name_or_path
        self._prepare_tokenizer()
        self._generate_rows: dict[str, str | None] = {"val": None, "test": None}
        self.data_prompt: dict[str, Any] = {}  # source_prefix / prompt_template of the data (the schema's)

    @property
    def decoder_only(self) -> bool:
        """Whether source and target share one sequence (the data module lays out features by this)."""
        return self.architecture == "causal_lm"

    def _prepare_tokenizer(self) -> None:
        tok = self.tokenizer
        if self.architecture == "causal_lm":
            if tok.eos_token_id is None:
                raise ConfigError("model.model_name_or_path: the tokenizer has no end-of-sequence token; "
                                  "a decoder-only model needs one to learn where the output stops")
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token  # padding is masked (inputs) or ignored (labels): any id will do
            # what batched generation needs (training passes position ids instead); init_kwargs is what gets saved
            tok.padding_side = tok.init_kwargs["padding_side"] = "left"
        elif self.architecture == "encoder_decoder" and None in self._encoder_decoder_tokens():
            raise ConfigError("model.model_name_or_path: warm-starting an encoder-decoder needs a tokenizer with "
                              "start (CLS or BOS), end (SEP or EOS) and padding tokens")

    def _encoder_decoder_tokens(self) -> tuple[int | None, int | None, int | None]:
        """Decoder start, end and padding ids of a warm-started encoder-decoder: BERT's [CLS] / [SEP] / [PAD]."""
        tok = self.tokenizer
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return start, end, tok.pad_token_id

    # ---- model ---------------------------------------------------------------------------------

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """Keep the data's prompt settings (for the export); record the resolved architecture in the checkpoint."""
        self.data_prompt = dict(schema.prompt) if schema is not None else {}
        return {"architecture": self.architecture}

    def build_model(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if self.architecture == "seq2seq":
            model = self.from_pretrained(AutoModelForSeq2SeqLM)
        elif self.architecture == "causal_lm":
            model = self.from_pretrained(AutoModelForCausalLM)
        else:
            model = self._warm_start_encoder_decoder()
        gen = model.generation_config
        tok = self.tokenizer
        if self.architecture == "causal_lm":
            gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
        for key, value in self.generation_settings.items():
            setattr(gen, key, value)
        return model

    def _warm_start_encoder_decoder(self) -> Any:
        from transformers import EncoderDecoderModel

        encoder = resolve_model_path(self.model_name_or_path)
        decoder = resolve_model_path(self.decoder_name_or_path or self.model_name_or_path,
                                     "model.decoder_name_or_path" if self.decoder_name_or_path else "model.model_name_or_path")
        kwargs: dict[str, Any] = {}
        for key, value in {**self.model_kwargs, "trust_remote_code": self.trust_remote_code}.items():
            if key.startswith(("encoder_", "decoder_")):
                kwargs[key] = value
            else:
                kwargs[f"encoder_{key}"] = kwargs[f"decoder_{key}"] = value
        try:
            with held_load_reports() as reports:
                model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, **kwargs)
            self.report_new_weights(reports, "EncoderDecoderModel")
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.model_name_or_path: cannot warm-start an encoder-decoder from '{encoder}' and "
                              f"'{decoder}': {first_line(e)}") from None
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = self._encoder_decoder_tokens()
        model.config.vocab_size = model.config.decoder.vocab_size
        return model

    def forward(self, **inputs: torch.Tensor) -> Any:
        if self.decoder_only and "attention_mask" in inputs:
            # positions count real tokens only, so left-padded rows train like unpadded ones
            inputs.setdefault("position_ids", (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0))
        return self.model(**inputs)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({
            "rouge": RougeScore(use_stemmer=self.rouge_use_stemmer, sentence_splitter=self.sentence_splitter),
            "bleu": SacreBleuScore(tokenize=self.bleu_tokenize),
            "gen_len": MeanGeneratedLength(),
        })

    # ---- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_texts(self, batch: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        """Generate for every row of ``batch``; returns the texts and the generated token counts."""
        tok = self.tokenizer
        if self.decoder_only:
            ids, mask = left_padded_prompts(batch["input_ids"], batch["attention_mask"], batch.get("labels"),
                                            tok.pad_token_id)
            out = self.model.generate(input_ids=ids, attention_mask=mask)
            new = out[:, ids.shape[1]:]
        else:
            out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            new = out[:, 1:]  # the decoder start token
        eos = self.model.generation_config.eos_token_id
        is_end = torch.isin(new, torch.as_tensor(eos if isinstance(eos, list) else [eos], device=new.device))
        # up to and including the first end token; rows that never end used every step
        lengths = torch.where(is_end.any(1), is_end.int().argmax(1) + 1, torch.full_like(is_end[:, 0], new.shape[1], dtype=torch.long))
        texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        return texts, lengths

    def start_evaluation(self, stage: str) -> None:
        """Decide whether (and for which rows) this validation / test epoch generates."""
        if stage == "predict":
            return
        trainer = self.trainer
        rows: str | None = "all"
        if stage == "val" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            epoch, last = self.current_epoch, trainer.max_epochs is not None and self.current_epoch + 1 >= trainer.max_epochs
            if epoch % self.generate_every_n_epochs and not last:
                rows = None
            elif self.generate_val_samples is not None:
                rows = "subset"
        self._generate_rows[stage] = rows

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        """Generation and its metrics on the epochs (and rows) that generate (the loss covers every batch)."""
        rows = self._generate_rows[stage.partition("/")[0]]  # val/<set>: the plan of its stage
        if rows is None:
            return
        if rows == "subset":
            keep = batch["idx"] < self.generate_val_samples
            if not keep.any():
                return
            batch = {k: v[keep] for k, v in batch.items()}
        texts, lengths = self.generate_texts(batch)
        all_refs = self.schema.split(stage).references if self.schema is not None else None
        if all_refs is None:
            raise ConfigError(f"the {stage} data hold no reference texts to score the generated ones against")
        idx = batch["idx"]
        metrics.update(preds=texts, references=[all_refs[i] for i in idx.tolist()], idx=idx, gen_lengths=lengths)
        self._last_generated = dict(zip(idx.tolist(), texts))  # for the examples table (--log_predictions)

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        """Per example the epoch generated for: the source, the references and the generated text."""
        generated, self._last_generated = getattr(self, "_last_generated", {}), {}
        if not generated or self.schema is None:
            return []
        split = self.schema.split(stage)
        idx = sorted(generated)
        sources = split.table.select_columns(["source"]).select(idx).to_list() if split.table is not None else []
        refs = split.references or []
        return [{"idx": i, "source": (sources[k]["source"] if sources else None),
                 "reference": refs[i] if i < len(refs) else None, "generated": generated[i]}
                for k, i in enumerate(idx)]

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over target tokens (a causal LM predicts each from the one before it)."""
        labels = batch["labels"][:, 1:] if self.decoder_only else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        texts, _ = self.generate_texts(batch)
        return [{"idx": i, "prediction": t} for i, t in zip(batch["idx"].tolist(), texts)]

    # ---- export --------------------------------------------------------------------------------

    def export_model(self) -> Any:
        """The model, its generation settings (``generation_config.json``) and the source prefix / prompt template
        in ``config.task_specific_params`` (the Hugging Face place for them)."""
        prompt = dict(self.data_prompt)
        src, tgt = prompt.pop("source_lang", None), prompt.pop("target_lang", None)
        task = f"translation_{src}_to_{tgt}" if src and tgt else "summarization"
        params = {"prefix": prompt.get("source_prefix") or ""}
        if prompt.get("prompt_template") is not None or self.decoder_only:
            params["prompt_template"] = prompt.get("prompt_template") or DEFAULT_PROMPT
        self.model.config.task_specific_params = {task: params}
        return self.model

    def hub_pipeline_tag(self) -> Optional[str]:
        if self.decoder_only:
            return "text-generation"
        translation = self.data_prompt.get("source_lang") and self.data_prompt.get("target_lang")
        return "translation" if translation else "summarization"
