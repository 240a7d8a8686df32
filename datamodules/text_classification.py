"""Text classification data: single texts or text pairs; multi-class, multi-label or regression labels.

Canonical record: ``{"text": str, "text_pair": str | None, "label": str | float | list[str]}``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TransformerDataModule
from lit_modules.errors import DataError

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question1", "premise", "question", "content", "review")
PAIR_COLUMNS = {"sentence1": "sentence2", "question1": "question2", "premise": "hypothesis", "question": "sentence"}


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else alphabetical."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


class TextClassificationDataModule(TransformerDataModule):
    """Sequence classification data.

    Args:
        text_column: column with the text (default: the first of text, sentence, sentence1, question1,
            premise, question, content, review that exists).
        text_pair_column: second text for pair tasks (default: sentence2 / question2 / hypothesis when
            the text column is sentence1 / question1 / premise).
        label_column: column with the label: a class name or id, a list of class names (multi-label),
            or a number (regression).
        label_separator: for CSV/TSV multi-label data, the separator inside the label field (e.g. ``"|"``).
        few_shot_k: train on K examples per class drawn from the training data (few-shot learning).
        few_shot_seed: the seed of that draw; run several seeds and report mean and spread.
        few_shot_dev: where the equally small dev set comes from: ``train`` (K more per class from the
            training data, as LM-BFF), ``validation`` (K per class from the validation data) or ``full``
            (the whole validation data).
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "text_classification"

    def __init__(
        self,
        text_column: Optional[str] = None,
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        label_separator: Optional[str] = None,
        few_shot_k: Optional[int] = None,
        few_shot_seed: int = 13,
        few_shot_dev: Literal["train", "validation", "full"] = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if few_shot_k is not None and few_shot_k < 1:
            raise DataError(f"data.few_shot_k: expected a positive integer or null, got {few_shot_k}")
        self.few_shot_k = few_shot_k
        self.few_shot_seed = few_shot_seed
        self.few_shot_dev = few_shot_dev
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.problem_type: ProblemType | None = None  # the model's, or inferred from the training labels
        self.label_separator = label_separator
        self.labels: list[str] | None = None
        self.label_ids: dict[str, np.ndarray] = {}

    def has_split(self, split: str) -> bool:
        if split == "validation" and self.few_shot_k and self.few_shot_dev == "train":
            return super().has_split("train")  # the few-shot dev set is drawn from the training data
        return super().has_split(split)

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "text": self.text_column, "pair": self.text_pair_column,
                "label": self.label_column, "sep": self.label_separator}

    # ---- records -------------------------------------------------------------------------------

    def _columns_for(self, first: dict[str, Any], source: str) -> tuple[str, str | None]:
        found = list(first)
        text = self.text_column or next((c for c in TEXT_COLUMNS if c in first), None)
        if text is None or text not in first:
            wanted = f"'{self.text_column}'" if self.text_column else f"found (looked for {', '.join(TEXT_COLUMNS)})"
            raise DataError(f"{source}: no text column {wanted}; columns found: {', '.join(found)} (set data.text_column)")
        pair = self.text_pair_column
        if pair is None and self.text_column is None and PAIR_COLUMNS.get(text) in first:
            pair = PAIR_COLUMNS[text]
        if pair is not None and pair not in first:
            raise DataError(f"{source}: no text pair column '{pair}'; columns found: {', '.join(found)}")
        return text, pair

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str, source: str) -> dict[str, list]:
        text_col, pair_col = self._columns_for(records[0], source)
        has_label = self.label_column in records[0]
        if not has_label and split in ("train", "validation", "test"):
            raise DataError(
                f"{source}: no label column '{self.label_column}'; columns found: {', '.join(records[0])} "
                "(set data.label_column)"
            )
        texts, pairs, labels = [], [], []
        for rec, line in zip(records, lines):
            texts.append(self._text(rec, text_col, source, line))
            if pair_col is not None:
                pairs.append(self._text(rec, pair_col, source, line))
            if has_label:
                labels.append(self._raw_label(rec, source, line))
        columns: dict[str, list] = {"text": texts, "text_pair": pairs or [None] * len(texts)}
        if has_label:
            columns.update(self._label_column(labels, lines, source))
        return columns

    @staticmethod
    def _text(rec: dict[str, Any], column: str, source: str, line: int) -> str:
        if column not in rec:
            raise DataError(f"{source}:{line}: record has no '{column}' field")
        value = rec[column]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source}:{line}: '{column}' must be a non-empty string, got {value!r}")
        return value

    def _raw_label(self, rec: dict[str, Any], source: str, line: int) -> Any:
        value = rec.get(self.label_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{source}:{line}: missing label in column '{self.label_column}'")
        if isinstance(value, str) and self.label_separator:
            return [v.strip() for v in value.split(self.label_separator) if v.strip()]
        if isinstance(value, list):
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                raise DataError(f"{source}:{line}: multi-label '{self.label_column}' must be a list of names or ids, got {value!r}")
            return [str(v) for v in value]
        if isinstance(value, (dict, bool)):
            raise DataError(f"{source}:{line}: unsupported label {value!r} in column '{self.label_column}'")
        return value

    def _label_column(self, labels: list[Any], lines: list[int], source: str) -> dict[str, list]:
        """Store labels in one Arrow type: a list of names (multi-label) or a string (class or number)."""
        kinds = {type(v) for v in labels}
        if list in kinds:
            if kinds != {list}:
                line = lines[next(i for i, v in enumerate(labels) if not isinstance(v, list))]
                raise DataError(f"{source}:{line}: expected a list of labels like the other records")
            check_one_spelling([n for v in labels for n in v], [ln for v, ln in zip(labels, lines) for _ in v], source)
            return {"label_list": labels}
        if self.facts.problem_type != "regression":  # regression names the first label that is not a number
            check_one_spelling(labels, lines, source)
        return {"label": [str(v) for v in labels]}

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        pairs = batch["text_pair"] if any(p is not None for p in batch["text_pair"]) else None
        return self._get_tokenizer()(
            batch["text"], pairs, truncation=True, max_length=self.max_seq_length, return_attention_mask=False
        )

    # ---- labels --------------------------------------------------------------------------------

    @staticmethod
    def _infer_problem_type(ds: Any) -> ProblemType:
        if "label_list" in ds.column_names:
            return "multi_label_classification"
        return "regression" if _looks_like_regression(ds["label"]) else "single_label_classification"

    def schema_splits(self) -> tuple[str, ...]:
        known = self.facts.problem_type == "regression" or self.facts.labels is not None
        return () if known else ("train",)

    def resolve_schema(self, stage: str | None) -> None:
        """Fix the label schema (the model's own if it has one, else the training data's) and map labels to ids."""
        problem_type = self.facts.problem_type
        labels = list(self.facts.labels) if self.facts.labels is not None else None
        train = self.datasets.get("train")
        if problem_type is None:
            if train is None:
                raise DataError("the label schema is unknown: train on data first, load a checkpoint, "
                                "or set model.problem_type (and model.labels)")
            problem_type = self._infer_problem_type(train)
        if labels is None and problem_type != "regression":
            if train is None:
                raise DataError("the label set is unknown: set model.labels, load a checkpoint, or give data.train_file")
            column = train["label_list"] if "label_list" in train.column_names else train["label"]
            names = {n for v in column for n in (v if isinstance(v, list) else [v])}
            labels = _sort_labels(names)
            if len(labels) < 2 and problem_type == "single_label_classification":
                raise DataError(f"{self._source_name('train')}: the training labels hold one class ({labels[0]!r}); "
                                "classification needs at least two")
        self.problem_type, self.labels = problem_type, labels
        self.schema.problem_type, self.schema.labels = problem_type, labels
        if self.few_shot_k and train is not None and stage in (None, "fit"):
            self._draw_few_shot(train)
        label2id = {name: i for i, name in enumerate(labels or [])}
        for split, ds in self.datasets.items():
            if self.kind(split) == "predict":
                continue
            self.label_ids[split] = self._ids(ds, split, label2id)
        if labels is not None:
            rank_zero_info(f"{len(labels)} labels ({problem_type}): {', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}")

    def _draw_few_shot(self, train: Any) -> None:
        """Keep K training examples per class (and a dev set of the same size), drawn with ``few_shot_seed``."""
        if self.problem_type != "single_label_classification":
            raise DataError(f"data.few_shot_k: few-shot sampling needs single-label classes, not {self.problem_type}")
        k, rng = self.few_shot_k, np.random.default_rng(self.few_shot_seed)

        def draw(ds: Any, split: str, per_class: int) -> dict[str, np.ndarray]:
            column = np.asarray(ds["label"])
            picks = {}
            for name in self.labels:
                rows = np.flatnonzero(column == name)
                if len(rows) < per_class:
                    raise DataError(f"{self._source_name(split)}: data.few_shot_k={k} needs {per_class} '{name}' "
                                    f"examples, found {len(rows)}")
                picks[name] = rng.permutation(rows)[:per_class]
            return picks

        from_dev = self.few_shot_dev == "train"
        picks = draw(train, "train", 2 * k if from_dev else k)
        self.datasets["train"] = train.select(sorted(int(i) for p in picks.values() for i in p[:k]))
        if from_dev:
            self.datasets["validation"] = train.select(sorted(int(i) for p in picks.values() for i in p[k:]))
        elif self.few_shot_dev == "validation" and "validation" in self.datasets:
            dev = draw(self.datasets["validation"], "validation", k)
            self.datasets["validation"] = self.datasets["validation"].select(sorted(int(i) for p in dev.values() for i in p))
        dev_size = len(self.datasets["validation"]) if "validation" in self.datasets else 0
        rank_zero_info(f"Few-shot: {k} per class (seed {self.few_shot_seed}): {len(self.datasets['train'])} training and "
                       f"{dev_size} dev examples (dev from {self.few_shot_dev})")

    def _ids(self, ds: Any, split: str, label2id: dict[str, int]) -> np.ndarray:
        source = self._source_name(split)
        multi = self.problem_type == "multi_label_classification"
        if ("label_list" in ds.column_names) != multi:
            given = "lists of labels" if "label_list" in ds.column_names else "single labels"
            raise DataError(f"{source}: labels are {given} but the task is {self.problem_type}")
        column = ds["label_list" if multi else "label"]
        if self.problem_type == "regression":
            values = np.empty(len(column), dtype=np.float32)
            for i, v in enumerate(column):
                try:
                    values[i] = float(v)
                except ValueError:
                    raise DataError(f"{source}:{ds[i]['line']}: regression label must be a number, got {v!r}") from None
                if not math.isfinite(values[i]):
                    raise DataError(f"{source}:{ds[i]['line']}: regression label must be finite, got {v!r}")
            return values
        unseen = [(n, i) for i, v in enumerate(column) for n in (v if multi else [v]) if n not in label2id]
        if unseen:
            name, row = unseen[0]
            raise DataError(
                f"{source}:{ds[row]['line']}: label '{name}' in {split} data does not occur in the training "
                f"labels ({', '.join(label2id)}); {len(unseen)} such label(s) in this split"
            )
        if multi:
            hot = np.zeros((len(column), len(label2id)), dtype=np.float32)
            for i, names in enumerate(column):
                hot[i, [label2id[n] for n in names]] = 1.0
            return hot
        return np.fromiter((label2id[n] for n in column), dtype=np.int64, count=len(column))

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return {"labels": self.label_ids[split]} if split in self.label_ids else {}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def check_one_spelling(labels: list[Any], lines: list[int], source: str) -> None:
    """Refuse a split whose labels mix class ids or numbers (``0``, ``"1"``, ``2.5``) with names (``negative``): read
    as given they would silently become extra classes. One line names the first of each kind and the counts."""
    numbers = [(v, ln) for v, ln in zip(labels, lines) if _is_number(v)]
    if not numbers or len(numbers) == len(labels):
        return
    names = [(v, ln) for v, ln in zip(labels, lines) if not _is_number(v)]
    (number, number_line), (name, name_line) = numbers[0], names[0]
    raise DataError(f"{source}: labels mix two spellings: {len(numbers)} class ids / numbers like {str(number)!r} (first "
                    f"at line {number_line}) and {len(names)} names like {str(name)!r} (first at line {name_line}); "
                    "write every label one way (the classes would otherwise be both)")


def _looks_like_regression(labels: list[Any]) -> bool:
    """True when every label is a number and at least one has a fractional part (1.5, "3.8")."""
    fractional = False
    for v in labels:
        if isinstance(v, bool):
            return False
        try:
            f = float(v)
        except (TypeError, ValueError):
            return False
        fractional |= not float(f).is_integer()
    return fractional
