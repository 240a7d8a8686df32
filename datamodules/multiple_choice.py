"""Multiple-choice data (SWAG, COPA, ARC, RACE style): a context, N candidate answers, one correct.

Canonical record: ``{"context": str, "prefix": str | None, "choices": list[str], "label": int | None}``:
each choice is scored as the text pair ``(context, prefix + " " + choice)``; ``label`` is the index of the
correct choice. Examples may have different numbers of choices (ARC has 3 to 5); batches pad the missing
ones and the model never picks them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import Collator, TransformerDataModule
from lit_modules.errors import DataError

CONTEXT_COLUMNS = ("context", "sent1", "premise", "article", "question", "stem", "ctx", "startphrase")
CHOICES_COLUMNS = ("choices", "endings", "options", "answers")
PREFIX_COLUMNS = ("sent2",)  # SWAG: the start of every ending
LABEL_COLUMNS = ("label", "answer", "answerKey", "gold")
NUMBERED = re.compile(r"^(ending|choice|option)(\d+)$")


class MultipleChoiceDataModule(TransformerDataModule):
    """Multiple-choice data from JSON / JSONL / CSV / TSV / parquet files or a hub dataset.

    Columns are found in the common layouts: SWAG (``sent1``, ``sent2``, ``ending0..3``, ``label``), COPA
    (``premise``, ``choice1``, ``choice2``, ``label``), ARC (``question`` as a ``{stem, choices: [{text, label}]}``
    object or flat, ``answerKey`` as a letter), or any records with a ``choices`` list.

    Args:
        context_column: the text every choice is paired with (default: the first of context, sent1, premise,
            article, question, stem, ctx, startphrase).
        question_column: a second text appended to the context (RACE's question after its article); optional.
        prefix_column: a text put before every choice (SWAG's ``sent2``; default when that column exists).
        choices_column: a list of choices per record (strings, or ``{"text", "label"}`` objects as in ARC).
        choice_columns: the choices as separate columns, in order (default: ``ending0, ending1, ...``,
            ``choice1, choice2, ...`` or ``option0, ...`` when they exist).
        label_column: the correct choice: its 0-based index, a letter (A, B, ... or the choices' own labels),
            or the choice's text.
        label_format: how the label names the choice: ``index``, ``name`` (letter), ``text``, or ``auto`` (any of
            them, and an error, not a guess, when one label reads two ways: ``"4"`` among choices ``3, 4, 5``).
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "multiple_choice"

    def __init__(
        self,
        context_column: Optional[str] = None,
        question_column: Optional[str] = None,
        prefix_column: Optional[str] = None,
        choices_column: Optional[str] = None,
        choice_columns: Optional[list[str]] = None,
        label_column: Optional[str] = None,
        label_format: Literal["auto", "index", "name", "text"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if choices_column is not None and choice_columns:
            raise DataError("data.choices_column / data.choice_columns: set one of them, not both")
        if choice_columns is not None and len(choice_columns) < 2:
            raise DataError(f"data.choice_columns: expected at least two columns, got {choice_columns}")
        self.context_column = context_column
        self.question_column = question_column
        self.prefix_column = prefix_column
        self.choices_column = choices_column
        self.choice_columns = list(choice_columns) if choice_columns else None
        self.label_column = label_column
        self.label_format = label_format
        self.label_ids: dict[str, np.ndarray] = {}

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "context": self.context_column, "question": self.question_column,
                "prefix": self.prefix_column, "choices": self.choices_column, "choice_columns": self.choice_columns,
                "label": self.label_column, "label_format": self.label_format}

    # ---- records -------------------------------------------------------------------------------

    def _layout(self, first: dict[str, Any], split: str, source: str) -> dict[str, Any]:
        """Which columns hold the context, the prefix, the choices and the label (found in the first record)."""
        found = ", ".join(first)
        nested = isinstance(first.get("question"), dict) and "stem" in first["question"]  # ARC's nested question
        context = self.context_column or ("question" if nested else next((c for c in CONTEXT_COLUMNS if c in first), None))
        if context is None or context not in first:
            wanted = f"'{self.context_column}'" if self.context_column else f"found (looked for {', '.join(CONTEXT_COLUMNS)})"
            raise DataError(f"{source}: no context column {wanted}; columns found: {found} (set data.context_column)")
        choices: Any = self.choices_column or self.choice_columns
        if choices is None:
            if nested:
                choices = "question.choices"
            else:
                kinds = {m.group(1) for c in first if (m := NUMBERED.match(c))}
                if len(kinds) == 1:  # ending0, ending1, ... (each record may have a different number of them)
                    choices = f"numbered:{kinds.pop()}"
                else:
                    choices = next((c for c in CHOICES_COLUMNS if c in first and c != context), None)
        if choices is None:
            raise DataError(f"{source}: no choices found (a list column {', '.join(CHOICES_COLUMNS)} or numbered columns "
                            f"ending0.., choice1..); columns found: {found} (set data.choices_column or "
                            "data.choice_columns)")
        plain = isinstance(choices, str) and choices != "question.choices" and not choices.startswith("numbered:")
        for column in choices if isinstance(choices, list) else [choices] if plain else []:
            if column not in first:
                raise DataError(f"{source}: no choice column '{column}'; columns found: {found}")
        prefix = self.prefix_column or next((c for c in PREFIX_COLUMNS if c in first and c != context), None)
        if self.prefix_column is not None and self.prefix_column not in first:
            raise DataError(f"{source}: no prefix column '{self.prefix_column}'; columns found: {found}")
        if self.question_column is not None and self.question_column not in first:
            raise DataError(f"{source}: no question column '{self.question_column}'; columns found: {found}")
        label = self.label_column or next((c for c in LABEL_COLUMNS if c in first), None)
        if split != "predict" and (label is None or label not in first):
            wanted = f"'{label}'" if label else f"found (looked for {', '.join(LABEL_COLUMNS)})"
            raise DataError(f"{source}: no label column {wanted}; columns found: {found} (set data.label_column)")
        return {"context": context, "nested": nested, "choices": choices, "prefix": prefix,
                "label": label if label in first else None}

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str,
                          source: str) -> dict[str, list]:
        layout = self._layout(records[0], split, source)
        out: dict[str, list] = {"context": [], "prefix": [], "choices": [], "label": []}
        for rec, line in zip(records, lines):
            where = f"{source}:{line}"
            context = rec.get(layout["context"])
            if layout["nested"] and isinstance(context, dict):
                context = context.get("stem")
            context = _text(context, layout["context"], where)
            if self.question_column is not None:
                context = f"{context} {_text(rec.get(self.question_column), self.question_column, where)}"
            prefix = rec.get(layout["prefix"]) if layout["prefix"] else None
            if prefix is not None and not isinstance(prefix, str):
                raise DataError(f"{where}: '{layout['prefix']}' must be a string, got {prefix!r}")
            texts, names = self._choices(rec, layout, where)
            label = None
            if layout["label"] is not None and split != "predict":
                label = _label_index(rec.get(layout["label"]), texts, names, layout["label"], where, self.label_format)
            out["context"].append(context)
            out["prefix"].append(prefix.strip() if prefix and prefix.strip() else None)
            out["choices"].append(texts)
            out["label"].append(label)
        return out

    def _choices(self, rec: dict[str, Any], layout: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
        """The choice texts of a record and their names (ARC's letters; else A, B, C, ...)."""
        spec = layout["choices"]
        if isinstance(spec, str) and spec.startswith("numbered:"):
            kind = spec.split(":", 1)[1]
            matches = [(NUMBERED.match(c), c) for c in rec]
            spec = [c for _, c in sorted((int(m.group(2)), c) for m, c in matches if m and m.group(1) == kind)]
        if isinstance(spec, list):
            raw: Any = [rec.get(c) for c in spec]
            raw = [v for v in raw if v not in (None, "")]  # a record may have fewer choices than the columns
            column = "/".join(spec)
        elif spec == "question.choices":
            raw, column = rec["question"].get("choices"), "question.choices"
        else:
            raw, column = rec.get(spec), spec
        if isinstance(raw, dict) and "text" in raw:  # the hub's ARC layout: {"text": [...], "label": [...]}
            raw = [{"text": t, "label": n} for t, n in zip(raw["text"], raw.get("label") or [])]
        if not isinstance(raw, list) or len(raw) < 2:
            raise DataError(f"{where}: '{column}' must hold at least two choices, got {raw!r}")
        texts, names = [], []
        for i, choice in enumerate(raw):
            name = chr(ord("A") + i) if i < 26 else str(i)
            if isinstance(choice, dict):
                name = str(choice.get("label", name))
                choice = choice.get("text")
            texts.append(_text(choice, f"{column}[{i}]", where))
            names.append(name)
        return texts, names

    # ---- features ------------------------------------------------------------------------------

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tokenizer = self._get_tokenizer()
        firsts, seconds, sizes = [], [], []
        for context, prefix, choices in zip(batch["context"], batch["prefix"], batch["choices"]):
            firsts += [context] * len(choices)
            seconds += [f"{prefix} {c}" if prefix else c for c in choices]
            sizes.append(len(choices))
        # the context is shortened first: every choice keeps its whole text as long as it fits
        enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=self.max_seq_length,
                        return_attention_mask=False)
        out: dict[str, list] = {key: [] for key in enc.keys()}
        start = 0
        for n in sizes:
            for key in enc.keys():
                out[key].append(enc[key][start:start + n])
            start += n
        return out

    def make_collator(self, split: str, pad: dict[str, int]) -> Callable[[Any], dict[str, torch.Tensor]]:
        return ChoiceCollator(pad, self._get_tokenizer().padding_side, self.pad_to_multiple_of)

    def resolve_schema(self, stage: str | None) -> None:
        """Label arrays for the labelled splits; a line on how many choices the examples have."""
        for split, ds in self.datasets.items():
            counts = np.fromiter((len(c) for c in ds["choices"]), dtype=np.int64, count=len(ds))
            shown = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()} to {counts.max()}"
            rank_zero_info(f"{self._source_name(split)}: {len(ds)} questions with {shown} choices")
            if self.kind(split) != "predict":
                labels = ds["label"]
                missing = [i for i, v in enumerate(labels) if v is None]
                if missing:
                    raise DataError(f"{self._source_name(split)}:{ds[missing[0]]['line']}: {split} data need the correct "
                                    f"choice; {len(missing)} record(s) have none")
                self.label_ids[split] = np.asarray(labels, dtype=np.int64)

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return {"labels": self.label_ids[split]} if split in self.label_ids else {}


class ChoiceCollator:
    """Pads a batch of examples with several sequences each to ``[batch, choices, tokens]``; ``choice_mask``
    marks the real choices of examples that have fewer than the batch's most."""

    def __init__(self, pad: dict[str, int], padding_side: str = "right", pad_to_multiple_of: int | None = None) -> None:
        self.rows = Collator(pad, padding_side, pad_to_multiple_of)

    def __call__(self, batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if isinstance(batch, list):
            batch = batch[0]
        sizes = [len(x) for x in batch["input_ids"]]
        width = max(sizes)
        flat: dict[str, Any] = {}
        for name in self.rows.pad:
            if name in batch:  # every example's sequences, the missing choices as one-token placeholders
                flat[name] = [seq for rows in batch[name] for seq in [*rows, *[[self.rows.pad[name]]] * (width - len(rows))]]
        padded = self.rows(flat)
        length = padded["input_ids"].shape[-1]
        out = {name: tensor.view(len(sizes), width, length) for name, tensor in padded.items()}
        # placeholders keep their one attended token (a row with none would make attention NaN); the model
        # masks their scores instead
        out["choice_mask"] = torch.tensor([[i < n for i in range(width)] for n in sizes], dtype=torch.bool)
        for name, values in batch.items():
            if name not in self.rows.pad:
                out[name] = torch.as_tensor(np.asarray(values))
        return out


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{column}' must be a non-empty string, got {value!r}")
    return value.strip()


def _label_index(value: Any, texts: list[str], names: list[str], column: str, where: str,
                 label_format: str = "auto") -> int:
    """The 0-based index of the correct choice from an index, a choice name (letter) or a choice text; in ``auto``
    a label that reads two ways stops with an error instead of a guess."""
    n = len(texts)
    if isinstance(value, bool) or value is None or not isinstance(value, (int, str)):
        raise DataError(f"{where}: '{column}' must name the correct choice, got {value!r}")
    text = str(value).strip()
    readings: dict[str, int] = {}
    if label_format in ("auto", "index") and (isinstance(value, int) or text.lstrip("-").isdigit()):
        readings["index"] = int(text)
    if label_format in ("auto", "name") and text in names:
        readings["name"] = names.index(text)
    if label_format in ("auto", "text") and text in texts:
        readings["text"] = texts.index(text)
    if len(set(readings.values())) > 1:
        ways = ", ".join(f"{kind} -> choice {i}" for kind, i in readings.items())
        raise DataError(f"{where}: '{column}' {value!r} reads two ways ({ways}); set data.label_format to index, name "
                        "or text")
    if not readings:
        accepted = {"auto": f"a choice index (0-{n - 1}), a choice name ({', '.join(names)}) or one of the choice texts",
                    "index": f"a choice index (0-{n - 1})", "name": f"a choice name ({', '.join(names)})",
                    "text": "one of the choice texts"}[label_format]
        raise DataError(f"{where}: '{column}' {value!r} is not {accepted}")
    index = next(iter(readings.values()))
    if not 0 <= index < n:
        raise DataError(f"{where}: '{column}' {value!r} is not a choice index from 0 to {n - 1}")
    return index
