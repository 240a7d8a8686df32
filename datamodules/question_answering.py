"""Extractive question answering data: SQuAD v1.1 / v2.0 files, flat records, hub datasets.

Canonical record: ``{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}``;
an empty answer list is an unanswerable question (SQuAD v2.0).

A question and its context become one or more features (windows): the context is cut into windows
of ``max_seq_length`` tokens that overlap by ``doc_stride`` tokens; only the context is truncated.
Each window carries its token -> character offsets (``-1`` outside the context) and its start / end
labels, which point at the CLS token when the answer is not inside that window or there is none.

The cached feature table holds one row per window. Per-window columns: ``example_index``, ``id``,
``line``, ``input_ids`` (``token_type_ids``), ``offset_start`` / ``offset_end``, ``start_positions`` /
``end_positions``, ``cls_index``. The example's ``question``, ``context`` and ``answers`` are stored on
its first window only (null on the others), so long documents are not copied once per window. Training
windows keep only what training reads: no offsets, and null question and context (post-processing is for
evaluation).
"""

from __future__ import annotations

import bisect
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import TransformerDataModule
from lit_modules.errors import DataError
from lit_modules.schema import QAFeatures

MisalignedAnswers = Literal["error", "snap", "drop"]


def flatten_squad(articles: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], list[int]]:
    """SQuAD's nested ``data[].paragraphs[].qas[]`` -> one flat record per question.

    Each record gets the paragraph's ``context`` and a ``_where`` locator (``data[3].paragraphs[2].qas[5]``)
    for error messages, since SQuAD files are often a single line; its "line" is the question's
    1-based number in the file.
    """
    records: list[dict[str, Any]] = []
    for i, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{source}:data[{i}]: expected an article with a 'paragraphs' list")
        for j, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise DataError(f"{source}:data[{i}].paragraphs[{j}]: expected a paragraph with a 'qas' list")
            for k, qa in enumerate(qas):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{source}:{where}: expected a JSON object, found {type(qa).__name__}")
                records.append({**qa, "context": paragraph.get("context"), "_where": where})
    if not records:
        raise DataError(f"{source}: the file holds no questions")
    return records, list(range(1, len(records) + 1))


def nearest_occurrence(context: str, text: str, start: int) -> Optional[int]:
    """The start of the occurrence of ``text`` in ``context`` closest to ``start`` (earlier on ties)."""
    best: Optional[int] = None
    pos = context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        if pos > start:
            break  # later occurrences are only farther away
        pos = context.find(text, pos + 1)
    return best


def token_span(starts: list[int], ends: list[int], lo: int, hi: int, start_char: int,
               end_char: int) -> Optional[tuple[int, int]]:
    """Token positions of the characters ``[start_char, end_char)`` among context tokens ``lo..hi``.

    ``starts`` / ``ends`` are the tokens' character offsets; None when the span is not inside the window.
    """
    if not (starts[lo] <= start_char and ends[hi] >= end_char):
        return None
    first = bisect.bisect_right(starts, start_char, lo, hi + 1) - 1  # last token starting at or before
    last = bisect.bisect_left(ends, end_char, lo, hi + 1)  # first token ending at or after
    return first, last


def _padded(column: pa.ChunkedArray, fill: int) -> np.ndarray:
    """A list<int> Arrow column -> a 2-D array padded with ``fill`` (no Python loop over rows)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    lengths = np.diff(offsets)
    out = np.full((len(lengths), int(lengths.max(initial=0))), fill, dtype=np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = values
    return out


class QuestionAnsweringDataModule(TransformerDataModule):
    """Extractive QA data (SQuAD v1.1 and v2.0).

    Reads SQuAD JSON files (nested ``data[].paragraphs[].qas[]``, v2.0 ``is_impossible`` questions with
    empty ``answers``), flat JSON / JSONL / CSV / parquet records with ``id``, ``question``, ``context``,
    ``answers`` (``{"text": [...], "answer_start": [...]}`` or a list of ``{"text", "answer_start"}``),
    or a hub dataset in the ``squad`` / ``squad_v2`` layout (``dataset_name``).

    Args:
        max_seq_length: tokens per window, question included (384 as in the SQuAD recipes).
        doc_stride: tokens of overlap between consecutive windows of a long context.
        question_column / context_column / answer_column / id_column: field names in flat records.
        misaligned_answers: what to do when an ``answer_start`` does not point at its answer text:
            ``error`` (stop, naming the first and counting all), ``snap`` (move it to the nearest
            occurrence of the text in the context) or ``drop`` (drop that answer, and the question
            when it has none left). ``snap`` and ``drop`` report the counts in the log.
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "question_answering"
    # labels are token positions: the collator shifts them when the tokenizer pads on the left
    position_columns = ("start_positions", "end_positions")

    def __init__(
        self,
        max_seq_length: int = 384,
        doc_stride: int = 128,
        question_column: str = "question",
        context_column: str = "context",
        answer_column: str = "answers",
        id_column: str = "id",
        misaligned_answers: MisalignedAnswers = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(max_seq_length=max_seq_length, **kwargs)
        if not 0 <= doc_stride < max_seq_length:
            raise DataError(f"data.doc_stride: expected an integer in [0, max_seq_length={max_seq_length}), "
                            f"got {doc_stride}")
        if misaligned_answers not in ("error", "snap", "drop"):
            raise DataError(f"data.misaligned_answers: expected error, snap or drop, got {misaligned_answers!r}")
        self.doc_stride = doc_stride
        self.columns = {"id": id_column, "question": question_column, "context": context_column,
                        "answers": answer_column}
        self.misaligned_answers = misaligned_answers
        self.positions: dict[str, dict[str, np.ndarray]] = {}
        self.has_unanswerable: dict[str, bool] = {}
        self._qa_features: dict[str, QAFeatures] = {}
        self._encode_source = "input"
        self._encode_kind = "validation"  # the split kind encode() works on (set with the records it gets)

    def cache_key_params(self) -> dict[str, Any]:
        padding_side = getattr(self._get_tokenizer(), "padding_side", "right")
        return {**super().cache_key_params(), "doc_stride": self.doc_stride, "columns": self.columns,
                "misaligned": self.misaligned_answers, "padding_side": padding_side}

    # ---- records -------------------------------------------------------------------------------

    def _read_split(self, split: str) -> tuple[list[dict[str, Any]], list[int]]:
        records, lines = super()._read_split(split)
        if isinstance(records[0], dict) and "paragraphs" in records[0]:  # SQuAD's nested layout
            return flatten_squad(records, self._source_name(split))
        return records, lines

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str,
                          source: str) -> dict[str, list]:
        tokenizer = self._get_tokenizer()
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"question answering needs a fast tokenizer (offset mappings); "
                            f"{type(tokenizer).__name__} is not one")
        self._encode_source = source
        self._encode_kind = split
        col = self.columns
        with_answers = split != "predict"
        out: dict[str, list] = {"id": [], "question": [], "context": [], "answers": [], "line": []}
        seen: dict[str, str] = {}
        misaligned: list[str] = []  # where each misaligned answer is
        shifts: list[int] = []
        n_answers = dropped_questions = 0
        for rec, line in zip(records, lines):
            where = f"{source}:{rec.get('_where', line)}"
            qid = self._required(rec, col["id"], where, kind=(str, int))
            qid = str(qid)
            question = self._required(rec, col["question"], where)
            context = self._required(rec, col["context"], where, what="context")
            if qid in seen:
                raise DataError(f"{where}: duplicate question id {qid!r} (first at {seen[qid]})")
            seen[qid] = where
            texts, starts = self._answers(rec, where) if with_answers else ([], [])
            kept_texts, kept_starts = [], []
            for text, start in zip(texts, starts):
                n_answers += 1
                if context[start: start + len(text)] != text:
                    found = context[start: start + len(text)]
                    misaligned.append(f"{where}: answer_start {start} does not point at the answer text {text!r} "
                                      f"(the context there reads {found!r})")
                    if self.misaligned_answers == "drop":
                        continue
                    if self.misaligned_answers == "snap":
                        moved = nearest_occurrence(context, text, start)
                        if moved is None:
                            raise DataError(f"{where}: answer text {text!r} does not occur in the context, so "
                                            f"answer_start {start} cannot be snapped (fix the record or set "
                                            "data.misaligned_answers: drop)")
                        shifts.append(abs(moved - start))
                        start = moved
                kept_texts.append(text)
                kept_starts.append(start)
            if texts and not kept_texts:  # every answer dropped: keeping it would make it "unanswerable"
                dropped_questions += 1
                continue
            out["id"].append(qid)
            out["question"].append(question)
            out["context"].append(context)
            out["answers"].append({"text": kept_texts, "answer_start": kept_starts})
            out["line"].append(line)
        if misaligned:
            counted = (f"{len(misaligned)} of {n_answers} answers in {source} have an answer_start that does not "
                       "point at their text")
            if self.misaligned_answers == "error":
                raise DataError(f"{misaligned[0]}; {counted} (set data.misaligned_answers to snap or drop)")
            if self.misaligned_answers == "snap":
                rank_zero_warn(f"{counted}; snapped each to the nearest occurrence of the text (shift: median "
                               f"{int(np.median(shifts))}, largest {max(shifts)} characters); first: {misaligned[0]}")
            else:
                rank_zero_warn(f"{counted}; dropped them ({dropped_questions} question(s) left without an answer "
                               f"dropped too); first: {misaligned[0]}")
        if not out["id"]:
            raise DataError(f"{source}: no questions left after dropping misaligned answers")
        out["example_index"] = list(range(len(out["id"])))
        return out

    @staticmethod
    def _required(rec: dict[str, Any], key: str, where: str, kind: Any = str, what: str | None = None) -> Any:
        if key not in rec or rec[key] is None:
            raise DataError(f"{where}: record has no '{key}' field")
        value = rec[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "string" if kind is str else "string or integer"
            raise DataError(f"{where}: '{key}' must be a {expected}, got {value!r}")
        if isinstance(value, str) and not value.strip():
            raise DataError(f"{where}: empty {what or repr(key)}")
        return value

    def _answers(self, rec: dict[str, Any], where: str) -> tuple[list[str], list[int]]:
        key = self.columns["answers"]
        if key not in rec or rec[key] is None:
            raise DataError(f"{where}: record has no '{key}' field (training and evaluation data need gold answers)")
        value = rec[key]
        if isinstance(value, dict) and "text" in value and "answer_start" in value:  # hub / HF layout
            texts, starts = value["text"], value["answer_start"]
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise DataError(f"{where}: '{key}' must hold equally long 'text' and 'answer_start' lists, "
                                f"got {value!r}")
        elif isinstance(value, list):  # SQuAD layout: a list of {"text", "answer_start"}
            if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
                raise DataError(f"{where}: each of '{key}' must be an object with 'text' and 'answer_start', "
                                f"got {value!r}")
            texts, starts = [a["text"] for a in value], [a["answer_start"] for a in value]
        else:
            raise DataError(f"{where}: '{key}' must be a list of {{text, answer_start}} or "
                            f"{{'text': [...], 'answer_start': [...]}}, got {value!r}")
        for text, start in zip(texts, starts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: answer text must be a non-empty string, got {text!r}")
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                raise DataError(f"{where}: answer_start must be an integer >= 0, got {start!r}")
        if rec.get("is_impossible") is True and texts:
            raise DataError(f"{where}: is_impossible is true but the question has answers")
        return list(texts), list(starts)

    # ---- features ------------------------------------------------------------------------------

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tokenizer = self._get_tokenizer()
        # As the Hugging Face QA recipes: a tokenizer that pads on the left (XLNet) reads the context first.
        question_first = getattr(tokenizer, "padding_side", "right") != "left"
        questions = [q.lstrip() for q in batch["question"]]  # some SQuAD questions start with lots of spaces
        pair = (questions, batch["context"]) if question_first else (batch["context"], questions)
        try:
            enc = tokenizer(
                *pair, truncation="only_second" if question_first else "only_first", max_length=self.max_seq_length,
                stride=self.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                return_attention_mask=False,
            )
        except BaseException as e:  # the tokenizer refuses (Rust panic) when a question leaves no room for the context
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            longest = int(np.argmax([len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]))
            n = len(tokenizer(questions[longest], add_special_tokens=False)["input_ids"])
            raise DataError(
                f"{self._encode_source}:{batch['line'][longest]}: question of {n} tokens leaves too little room for "
                f"the context in max_seq_length={self.max_seq_length} with doc_stride={self.doc_stride} "
                f"(raise data.max_seq_length or lower data.doc_stride; tokenizer: {str(e).splitlines()[0]})"
            ) from None
        context_seq = 1 if question_first else 0
        cls_id = tokenizer.cls_token_id
        # training windows need only their labels: the offsets, question and context are for post-processing, which
        # evaluation splits do (without them SQuAD's training split tokenised in 18.4 s instead of 23.5 s on 2 cores)
        evaluated = self._encode_kind != "train"
        keys = ("example_index", "id", "line", "answers", "start_positions", "end_positions", "cls_index")
        out: dict[str, list] = {k: [] for k in keys + (("question", "context", "offset_start", "offset_end")
                                                       if evaluated else ())}
        previous = -1
        for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
            ids = enc["input_ids"][i]
            seq = enc.sequence_ids(i)
            lo = seq.index(context_seq)
            hi = len(seq) - 1 - seq[::-1].index(context_seq)
            if evaluated:  # -1 outside the context
                starts = [o[0] if s == context_seq else -1 for o, s in zip(enc["offset_mapping"][i], seq)]
                ends = [o[1] if s == context_seq else -1 for o, s in zip(enc["offset_mapping"][i], seq)]
            else:  # token_span() reads only the context's tokens lo..hi
                starts = [o[0] for o in enc["offset_mapping"][i]]
                ends = [o[1] for o in enc["offset_mapping"][i]]
            cls = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            answers = batch["answers"][sample]
            span = None
            if answers["text"]:  # labels follow the first answer, as in the SQuAD recipes
                # without the answer's outer whitespace (COVID-QA answers end with a space), which no token covers
                text = answers["text"][0]
                start_char = answers["answer_start"][0] + len(text) - len(text.lstrip())
                span = token_span(starts, ends, lo, hi, start_char, answers["answer_start"][0] + len(text.rstrip()))
            first_window = sample != previous
            previous = sample
            out["example_index"].append(batch["example_index"][sample])
            out["id"].append(batch["id"][sample])
            out["line"].append(batch["line"][sample])
            out["answers"].append(batch["answers"][sample] if first_window else None)
            if evaluated:
                for key in ("question", "context"):
                    out[key].append(batch[key][sample] if first_window else None)
                out["offset_start"].append(starts)
                out["offset_end"].append(ends)
            out["start_positions"].append(span[0] if span else cls)
            out["end_positions"].append(span[1] if span else cls)
            out["cls_index"].append(cls)
        if not evaluated:  # the input's own question / context columns are replaced, as on evaluation windows
            out["question"] = out["context"] = [None] * len(out["id"])
        out["input_ids"] = enc["input_ids"]
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    # ---- what the model needs ------------------------------------------------------------------

    def resolve_schema(self, stage: str | None) -> None:
        """Count unanswerable questions (SQuAD v2.0 when the training data, or else the evaluation data, has
        them) and publish every evaluation split's windows for post-processing."""
        self._qa_features = {}
        for split, ds in self.datasets.items():
            table = ds.with_format(None).data
            answers = pc.drop_null(table.column("answers"))  # one per question (on its first window)
            unanswerable = int(pc.sum(pc.equal(pc.list_value_length(pc.struct_field(answers, "text")), 0)).as_py() or 0)
            kind = self.kind(split)
            self.has_unanswerable[split] = kind != "predict" and unanswerable > 0
            if kind != "predict":
                self.positions[split] = {k: table.column(k).to_numpy().astype(np.int64)
                                         for k in ("start_positions", "end_positions")}
            note = f", {unanswerable} unanswerable" if self.has_unanswerable[split] else ""
            rank_zero_info(f"{self._source_name(split)}: {len(answers)} questions in {len(ds)} windows{note}")
            if kind != "train":
                self.schema.splits[split].qa = self.qa_features(split)
        flags = self.has_unanswerable
        self.schema.has_unanswerable = flags["train"] if "train" in flags else any(flags.values())

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return dict(self.positions.get(split, {}))

    def qa_features(self, split: str) -> QAFeatures:
        """The arrays post-processing needs for ``split`` (offsets, example map, contexts, gold answers)."""
        if split not in self._qa_features:
            ds = self.datasets[split]
            table = ds.with_format(None).data
            example_index = table.column("example_index").to_numpy()
            numbers, first, example = np.unique(example_index, return_index=True, return_inverse=True)
            firsts = pa.array(first)

            def per_example(name: str) -> list[Any]:
                return table.column(name).take(firsts).to_pylist()

            answers = per_example("answers")
            self._qa_features[split] = QAFeatures(
                example=example.astype(np.int64),
                offset_start=_padded(table.column("offset_start"), -1),
                offset_end=_padded(table.column("offset_end"), -1),
                cls_index=table.column("cls_index").to_numpy().astype(np.int64),
                ids=per_example("id"),
                questions=per_example("question"),
                contexts=per_example("context"),
                answers=[list(a["text"]) if a else [] for a in answers],
            )
        return self._qa_features[split]
