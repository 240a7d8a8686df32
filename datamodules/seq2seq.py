"""Sequence-to-sequence data (summarization, translation): a source text and a target text per example.

Canonical record: ``{"source": str, "target": str, "references": list[str]}``: ``target`` is what the
model learns to write, ``references`` every reference text the generated text is scored against
(the target first). The model decides the layout of the features:

- encoder-decoder models (T5, BART, a warm-started BERT pair): ``input_ids`` = the source,
  ``labels`` = the target;
- decoder-only language models: one sequence ``prompt + target + eos`` with ``labels`` = -100 on the
  prompt (the loss covers the target only); the prompt is ``prompt_template`` filled with the source.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import TransformerDataModule
from lit_modules.errors import DataError
from lit_modules.schema import DEFAULT_PROMPT, IGNORE_INDEX

SOURCE_COLUMNS = ("source", "article", "document", "dialogue", "email_body", "text", "input")
TARGET_COLUMNS = ("target", "highlights", "summary", "subject", "subject_line", "tldr", "output")
TargetList = Literal["sentences", "references"]


class Seq2SeqDataModule(TransformerDataModule):
    """Source -> target data from JSON / JSONL / CSV / TSV / parquet files or a hub dataset.

    Args:
        source_column: column with the input text (default: the first of source, article, document,
            dialogue, email_body, text, input that exists: cnn_dailymail, xsum, samsum, aeslc layouts). A
            list of strings (sentences) is joined with spaces.
        target_column: column with the output text (default: the first of target, highlights, summary,
            subject, subject_line, tldr, output). A list of strings is read as ``target_list`` says.
        target_list: what a list-valued target holds: ``sentences`` of one text (joined with spaces) or
            alternative ``references`` (the model learns the first; evaluation scores against the best).
        reference_columns: more columns holding references for evaluation (e.g. AESLC's ann0, ann1,
            ann2); empty values are skipped.
        source_lang / target_lang: for translation data: read ``record["translation"][lang]`` (the hub
            layout of WMT / opus) or the column named by the language code.
        source_prefix: text put before every source (T5's ``"summarize: "``).
        prompt_template: decoder-only models only: the prompt, with ``{source}`` where the source goes
            (default ``"{source}\\n"``). The source is truncated, the template text never is.
        max_source_length: source length in tokens after truncation (default: ``max_seq_length``).
        max_target_length: target length in tokens after truncation; longer targets are counted and
            reported (references for evaluation are never truncated).
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "seq2seq"
    model_input_pad = {"input_ids": None, "labels": IGNORE_INDEX}

    def __init__(
        self,
        source_column: Optional[str] = None,
        target_column: Optional[str] = None,
        target_list: TargetList = "sentences",
        reference_columns: Optional[list[str]] = None,
        source_lang: Optional[str] = None,
        target_lang: Optional[str] = None,
        source_prefix: str = "",
        prompt_template: Optional[str] = None,
        max_source_length: Optional[int] = None,
        max_target_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target_list not in ("sentences", "references"):
            raise DataError(f"data.target_list: expected 'sentences' or 'references', got {target_list!r}")
        if (source_lang is None) != (target_lang is None):
            raise DataError("data.source_lang / data.target_lang: set both for translation data, or neither")
        if prompt_template is not None and prompt_template.count("{source}") != 1:
            raise DataError(f"data.prompt_template: must contain '{{source}}' exactly once, got {prompt_template!r}")
        self.max_source_length = max_source_length or self.max_seq_length
        if self.max_source_length < 1 or max_target_length < 2:
            raise DataError("data.max_source_length / data.max_target_length: expected at least 1 / 2 tokens, got "
                            f"{self.max_source_length} / {max_target_length}")
        self.source_column = source_column
        self.target_column = target_column
        self.target_list = target_list
        self.reference_columns = list(reference_columns or [])
        self.source_lang, self.target_lang = source_lang, target_lang
        self.source_prefix = source_prefix
        self.prompt_template = prompt_template
        self.max_target_length = max_target_length
        self.references: dict[str, list[list[str]]] = {}

    def cache_key_params(self) -> dict[str, Any]:
        return {"source": self.source_column, "target": self.target_column, "target_list": self.target_list,
                "refs": self.reference_columns, "langs": (self.source_lang, self.target_lang),
                "prefix": self.source_prefix, "prompt": self.prompt_template, "max_source": self.max_source_length,
                "max_target": self.max_target_length, "decoder_only": self._decoder_only()}

    def _decoder_only(self) -> bool:
        """The feature layout the model needs (``ModelFacts.decoder_only``, handed over by connect)."""
        if not self.facts.decoder_only and self.prompt_template is not None:
            raise DataError("data.prompt_template: only decoder-only models take a prompt template; "
                            "use data.source_prefix for encoder-decoder models")
        return self.facts.decoder_only

    def check_lengths(self, max_positions: int | None, model_name: str) -> None:
        if max_positions is None:
            return
        if self.facts.decoder_only:  # prompt + source + target share one sequence
            total = self.max_source_length + self.max_target_length
            if total > max_positions:
                raise DataError(f"data.max_source_length + data.max_target_length: {self.max_source_length} + "
                                f"{self.max_target_length} = {total} is more than {model_name} takes ({max_positions} "
                                "positions, prompt and target in one sequence); lower them")
            return
        for key, value in (("max_source_length", self.max_source_length), ("max_target_length", self.max_target_length)):
            if value > max_positions:
                raise DataError(f"data.{key}: {value} is more than {model_name} takes ({max_positions} positions); "
                                f"set at most {max_positions}")

    # ---- records -------------------------------------------------------------------------------

    def _columns_for(self, first: dict[str, Any], split: str, source: str) -> tuple[str, str | None]:
        found = ", ".join(first)
        if self.source_lang is not None:
            if "translation" in first and isinstance(first["translation"], dict):
                return "translation", "translation"
            missing = [c for c in (self.source_lang, self.target_lang) if c not in first]
            if missing and not (split == "predict" and missing == [self.target_lang]):
                raise DataError(f"{source}: no 'translation' field and no column {missing[0]!r}; columns found: {found}")
            return self.source_lang, self.target_lang if self.target_lang in first else None
        src = self.source_column or next((c for c in SOURCE_COLUMNS if c in first), None)
        if src is None or src not in first:
            wanted = f"'{self.source_column}'" if self.source_column else f"found (looked for {', '.join(SOURCE_COLUMNS)})"
            raise DataError(f"{source}: no source column {wanted}; columns found: {found} (set data.source_column)")
        tgt = self.target_column or next((c for c in TARGET_COLUMNS if c in first), None)
        if tgt is None or tgt not in first:
            if split == "predict":
                return src, None
            wanted = f"'{self.target_column}'" if self.target_column else f"found (looked for {', '.join(TARGET_COLUMNS)})"
            raise DataError(f"{source}: no target column {wanted}; columns found: {found} (set data.target_column)")
        for col in self.reference_columns:
            if col not in first and split != "train":
                raise DataError(f"{source}: no reference column '{col}'; columns found: {found} (data.reference_columns)")
        return src, tgt

    @staticmethod
    def _field(rec: dict[str, Any], column: str, lang: str | None, source: str, line: int) -> tuple[Any, str]:
        """The raw value of ``column`` (or of ``translation[lang]``) and the name to report it under."""
        value = rec.get(column)
        if lang is not None and column == "translation":
            value = value.get(lang) if isinstance(value, dict) else None
            column = f"translation.{lang}"
        if value is None:
            raise DataError(f"{source}:{line}: record has no '{column}' field")
        return value, column

    @staticmethod
    def _text(value: Any, column: str, source: str, line: int) -> str:
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = " ".join(v.strip() for v in value)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source}:{line}: '{column}' must be a non-empty string (or list of strings), got {value!r}")
        return value.strip()

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str, source: str) -> dict[str, list]:
        src_col, tgt_col = self._columns_for(records[0], split, source)
        sources, targets, references = [], [], []
        for rec, line in zip(records, lines):
            value, name = self._field(rec, src_col, self.source_lang, source, line)
            sources.append(self._text(value, name, source, line))
            if tgt_col is None:
                continue
            value, name = self._field(rec, tgt_col, self.target_lang, source, line)
            if isinstance(value, list) and self.target_list == "references":
                if not value:
                    raise DataError(f"{source}:{line}: '{name}' holds no references")
                refs = [self._text(v, f"{name}[{i}]", source, line) for i, v in enumerate(value)]
            else:
                refs = [self._text(value, name, source, line)]
            for col in self.reference_columns:
                extra = rec.get(col)
                if isinstance(extra, str) and extra.strip():
                    refs.append(extra.strip())
                elif extra not in (None, "") and not isinstance(extra, str):
                    raise DataError(f"{source}:{line}: reference column '{col}' must hold a string, got {extra!r}")
            targets.append(refs[0])
            references.append(refs)
        columns: dict[str, list] = {"source": sources}
        if tgt_col is not None:
            columns.update(target=targets, references=references)
        return columns

    # ---- features ------------------------------------------------------------------------------

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self._get_tokenizer()
        sources = [self.source_prefix + s for s in batch["source"]]
        targets = batch.get("target")
        if self._decoder_only():
            return self._encode_decoder_only(tok, sources, targets)
        # untruncated lengths, only to count truncation (verbose=False: no warning about the model's maximum)
        full = tok(sources, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
        out: dict[str, list] = {
            "input_ids": tok(sources, truncation=True, max_length=self.max_source_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"],
            "source_truncated": [len(ids) > self.max_source_length for ids in full],
        }
        if targets is not None:
            full = tok(text_target=targets, return_attention_mask=False, return_token_type_ids=False,
                       verbose=False)["input_ids"]
            out["labels"] = tok(text_target=targets, truncation=True, max_length=self.max_target_length,
                                return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            out["target_truncated"] = [len(ids) > self.max_target_length for ids in full]
        return out

    def _encode_decoder_only(self, tok: Any, sources: list[str], targets: list[str] | None) -> dict[str, list]:
        """``prompt + target + eos``; the template text is kept whole, only the source is truncated."""
        if tok.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token; a decoder-only model needs one to stop")
        head, _, tail = (self.prompt_template or DEFAULT_PROMPT).partition("{source}")
        plain = {"add_special_tokens": False, "return_attention_mask": False, "return_token_type_ids": False,
                 "verbose": False}
        # the tokens the tokenizer puts before a text (Llama's <s>); those after it are replaced by eos
        marked, bare = tok("a", return_attention_mask=False)["input_ids"], tok("a", **plain)["input_ids"]
        lead = marked[: next((i for i in range(len(marked)) if marked[i:i + len(bare)] == bare), 0)]
        head_ids = lead + (tok(head, **plain)["input_ids"] if head else [])
        tail_ids = tok(tail, **plain)["input_ids"] if tail else []
        source_ids = tok(sources, **plain)["input_ids"]
        out: dict[str, list] = {
            "input_ids": [head_ids + ids[: self.max_source_length] + tail_ids for ids in source_ids],
            "source_truncated": [len(ids) > self.max_source_length for ids in source_ids],
        }
        if targets is not None:
            target_ids = tok(targets, **plain)["input_ids"]
            keep = self.max_target_length - 1  # room for eos
            labels = [ids[:keep] + [tok.eos_token_id] for ids in target_ids]
            out["labels"] = [[IGNORE_INDEX] * len(p) + t for p, t in zip(out["input_ids"], labels)]
            out["input_ids"] = [p + t for p, t in zip(out["input_ids"], labels)]
            out["target_truncated"] = [len(ids) > keep for ids in target_ids]
        return out

    def resolve_schema(self, stage: str | None) -> None:
        """Report truncation (targets: a warning naming the first line); publish the references per split and the
        prompt settings (the export records them)."""
        self.schema.prompt = {"source_prefix": self.source_prefix, "prompt_template": self.prompt_template,
                              "source_lang": self.source_lang, "target_lang": self.target_lang}
        for split, ds in self.datasets.items():
            where = self._source_name(split)
            if "target_truncated" in ds.column_names:
                flags = list(ds["target_truncated"])
                if any(flags):
                    first = ds[flags.index(True)]["line"]
                    rank_zero_warn(f"{where}: {sum(flags)} of {len(flags)} targets are longer than "
                                   f"data.max_target_length={self.max_target_length} tokens and were truncated for "
                                   f"training (first at line {first}); evaluation scores against the full references")
            flags = list(ds["source_truncated"])
            if any(flags):
                rank_zero_info(f"{where}: {sum(flags)} of {len(flags)} sources truncated to "
                               f"data.max_source_length={self.max_source_length} tokens")
            if "references" in ds.column_names:
                self.references[split] = self.schema.splits[split].references = list(ds["references"])

    def truncation_counts(self, split: str) -> dict[str, int]:
        """How many sources / targets of ``split`` were truncated."""
        ds = self.datasets[split]
        return {name: sum(ds[f"{name}_truncated"]) for name in ("source", "target") if f"{name}_truncated" in ds.column_names}
