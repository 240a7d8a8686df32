"""Token classification (NER) data: CoNLL column files, JSON / JSONL / parquet token and tag lists, hub datasets.

Canonical record: ``{"tokens": list[str], "tags": list[str]}`` with IOB2 tags (IOB1 and BIOES are converted
on reading). Encoding labels the first sub-token of each word; sentences longer than ``max_seq_length``
are split into overlapping windows of whole words, and each word is scored in exactly one window (the
one where it has the most context), so evaluation sees every gold token once.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TransformerDataModule
from datamodules.readers import read_records, read_text, split_compression
from lit_modules.errors import DataError

TagScheme = Literal["auto", "IOB1", "IOB2", "BIOES"]
TOKENS_COLUMNS = ("tokens", "words")
TAGS_COLUMNS = ("tags", "ner_tags", "labels")
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")  # every other file is read as CoNLL columns
TAG_RE = re.compile(r"^(?:O|[BIES]-[^\s-](?:.*\S)?)$")
TAG_HELP = "expected O or B-/I-/E-/S- followed by the entity type, e.g. B-PER"


# ---- reading ---------------------------------------------------------------------------------------

def read_conll(path: str | Path, tag_column: int = -1, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[int]]:
    """Read a CoNLL column file: one token per line, columns split by tabs (when the line has one) or
    spaces, the token first and the tag in ``tag_column`` (negative: counted from the end); blank
    lines end sentences and ``-DOCSTART-`` lines end documents.

    Returns records ``{"tokens", "tags", "token_lines", "document"}`` (``tags`` is None in a one-column
    file; ``document`` counts the ``-DOCSTART-`` lines before the sentence, None before the first) and the
    line of each sentence's first token.
    """
    text = read_text(path, encoding)  # decompressed when the name ends in .gz / .bz2 / .xz / .zst
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    records: list[dict[str, Any]] = []
    starts: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    token_lines: list[int] = []
    ncols = first_line = tag_at = None
    document: int | None = None

    def end_sentence() -> None:
        if tokens:
            records.append({"tokens": list(tokens), "tags": list(tags) if tag_at is not None else None,
                            "token_lines": list(token_lines), "document": document})
            starts.append(token_lines[0])
            tokens.clear(), tags.clear(), token_lines.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            end_sentence()
            continue
        parts = [p.strip() for p in line.split("\t")] if "\t" in line else line.split()
        if parts[0] == "-DOCSTART-":
            end_sentence()
            document = 0 if document is None else document + 1
            continue
        if ncols is None:
            ncols, first_line = len(parts), number
            if ncols > 1:
                tag_at = tag_column if tag_column >= 0 else ncols + tag_column
                if not 0 < tag_at < ncols:
                    raise DataError(f"data.conll_tag_column: {path} has no tag column {tag_column} "
                                    f"({ncols} columns, column 0 is the token)")
        elif len(parts) != ncols:
            raise DataError(f"{path}:{number}: {len(parts)} columns, expected {ncols} as on line {first_line} "
                            "(a token and its tag per line; blank lines between sentences)")
        if not parts[0]:
            raise DataError(f"{path}:{number}: empty token")
        tokens.append(parts[0])
        token_lines.append(number)
        if tag_at is not None:
            tags.append(parts[tag_at])
    end_sentence()
    if not records:
        raise DataError(f"{path}: the file holds no sentences")
    return records, starts


# ---- tag schemes -----------------------------------------------------------------------------------

def to_iob2(tags: list[str]) -> list[str]:
    """IOB1, IOB2 or BIOES tags (already checked against ``TAG_RE``) as IOB2.

    An entity starts at B- or S-, and at an I- or E- that does not continue an entity of its type
    (IOB1's first tokens; the same reading conlleval gives broken IOB2). Valid IOB2 is unchanged.
    """
    out = []
    current = None  # type of the entity the previous token belongs to, if it may continue
    for tag in tags:
        if tag == "O":
            out.append(tag)
            current = None
            continue
        prefix, kind = tag[0], tag[2:]
        out.append(f"I-{kind}" if prefix in "IE" and current == kind else f"B-{kind}")
        current = None if prefix in "ES" else kind
    return out


def detect_scheme(sentences: list[list[str]]) -> str:
    """BIOES when any E-/S- tag occurs; IOB2 when every I- continues an entity of its type; else IOB1."""
    prefixes = {t[0] for tags in sentences for t in tags}
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "IOB2" if all(to_iob2(tags) == tags for tags in sentences) else "IOB1"


def tag_set(sentences: list[list[str]]) -> list[str]:
    """The model's tag set from IOB2 training tags: O, then B- and I- of every entity type (sorted)."""
    types = sorted({t[2:] for tags in sentences for t in tags if t != "O"})
    return ["O", *(f"{p}-{kind}" for kind in types for p in "BI")]


# ---- windows ---------------------------------------------------------------------------------------

def plan_windows(counts: list[int], budget: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Cut a sentence into windows of whole words that fit ``budget`` sub-tokens.

    ``counts`` holds each word's sub-token count. Consecutive windows overlap by up to ``stride``
    sub-tokens; each word is scored in one window only (the overlap is split in the middle, so a
    scored word has context on both sides). Returns ``(start, end, score_start, score_end)`` word
    ranges; the score ranges partition the sentence. A single word longer than the budget gets a
    window of its own (its first sub-token, the one scored, survives truncation).
    """
    n = len(counts)
    windows: list[list[int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and (used + counts[end] <= budget or end == start):
            used += counts[end]
            end += 1
        windows.append([start, end])
        if end >= n:
            break
        nxt, overlap = end, 0
        while nxt - 1 > start and overlap + counts[nxt - 1] <= stride:
            nxt -= 1
            overlap += counts[nxt]
        while nxt < end and overlap + counts[end] > budget:  # keep room for at least one new word
            overlap -= counts[nxt]
            nxt += 1
        start = nxt
    cuts = [0] + [(windows[k + 1][0] + windows[k][1]) // 2 for k in range(len(windows) - 1)] + [n]
    return [(s, e, cuts[k], cuts[k + 1]) for k, (s, e) in enumerate(windows)]


def document_contexts(sentences: list[list[str]], documents: list[Any],
                      words: int) -> tuple[list[list[str]], list[list[str]]]:
    """For each sentence, the last ``words`` words before it and the first ``words`` after it in its document (a
    run of consecutive sentences with the same document id)."""
    left, right = [], []
    for i, doc in enumerate(documents):
        before: list[str] = []
        j = i - 1
        while j >= 0 and documents[j] == doc and len(before) < words:
            before = sentences[j] + before
            j -= 1
        after: list[str] = []
        j = i + 1
        while j < len(sentences) and documents[j] == doc and len(after) < words:
            after += sentences[j]
            j += 1
        left.append(before[len(before) - words:] if len(before) > words else before)
        right.append(after[:words])
    return left, right


def _context_fit(left: list[int], right: list[int], per_side: int, room: int) -> tuple[int, int]:
    """How many context words to keep on each side: whole words nearest the sentence, at most ``per_side``
    sub-tokens a side and ``room`` in all; a side that needs less leaves the rest to the other.
    ``left`` / ``right`` are the sub-token counts of the words, nearest the sentence first."""
    def words_within(counts: list[int], cap: int) -> tuple[int, int]:
        n = used = 0
        while n < len(counts) and used + counts[n] <= cap:
            used += counts[n]
            n += 1
        return n, used

    _, used_left = words_within(left, min(per_side, room // 2))
    n_right, used_right = words_within(right, min(per_side, room - used_left))
    n_left, _ = words_within(left, min(per_side, room - used_right))  # what the right side did not use
    return n_left, n_right


# ---- the data module -------------------------------------------------------------------------------

class TokenClassificationDataModule(TransformerDataModule):
    """Named-entity recognition and other per-token tagging data.

    Files ending in .json / .jsonl / .parquet hold one sentence per record with a list of tokens and a
    list of tags; any other file is read as CoNLL columns (token first, tag in ``conll_tag_column``,
    blank lines between sentences, ``-DOCSTART-`` lines skipped). Hub datasets (``dataset_name``) whose
    tags are class ids get their names from the dataset's ``ClassLabel`` feature.

    Args:
        tokens_column: record field with the tokens (default: ``tokens`` or ``words``).
        tags_column: record field with the tags (default: ``tags``, ``ner_tags`` or ``labels``).
        conll_tag_column: CoNLL column holding the tag (0 is the token; negative counts from the end, so
            the default ``-1`` is the last column, as in CoNLL-2003 and WNUT-17).
        tag_scheme: ``IOB1``, ``IOB2`` or ``BIOES`` tags in the files (converted to IOB2 on reading);
            ``auto`` detects it per file.
        doc_stride: sub-tokens two consecutive windows of a long sentence share.
        label_all_tokens: in training, also label the continuation sub-tokens of a word (B- becomes
            I-); evaluation always scores each word once, at its first sub-token.
        unseen_tags: what to do with an entity type in evaluation data that training never saw:
            ``error`` (default) or ``O`` (read as O, with a log line saying how many).
        document_context: sub-tokens of context on each side of a sentence, taken from the sentences around
            it in its document (as BERT's CoNLL-2003 result and FLERT do); the context is fed to the model
            but never labelled or scored. Documents are the ``-DOCSTART-`` sections of a CoNLL file, or runs
            of consecutive records with the same ``document`` field; data without them stops with an error.
            0 (default): each sentence alone. A sentence longer than ``max_seq_length`` gets its windows
            without context.
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "token_classification"
    model_input_pad = {"input_ids": None, "token_type_ids": 0, "labels": -100, "score_word": -1}

    def __init__(
        self,
        tokens_column: Optional[str] = None,
        tags_column: Optional[str] = None,
        conll_tag_column: int = -1,
        tag_scheme: TagScheme = "auto",
        doc_stride: int = 32,
        label_all_tokens: bool = False,
        unseen_tags: Literal["error", "O"] = "error",
        document_context: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if conll_tag_column == 0:
            raise DataError("data.conll_tag_column: column 0 holds the token; the tag is in another column")
        if not 0 <= doc_stride <= self.max_seq_length // 2:
            raise DataError(f"data.doc_stride: expected an integer from 0 to max_seq_length / 2 "
                            f"({self.max_seq_length // 2}), got {doc_stride}")
        if not 0 <= document_context < self.max_seq_length:
            raise DataError(f"data.document_context: expected sub-tokens of context per side, from 0 to "
                            f"max_seq_length - 1 ({self.max_seq_length - 1}), got {document_context}")
        self.document_context = document_context
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.conll_tag_column = conll_tag_column
        self.tag_scheme = tag_scheme
        self.doc_stride = doc_stride
        self.label_all_tokens = label_all_tokens
        self.unseen_tags = unseen_tags
        self.labels: list[str] | None = None
        self.batch_columns: dict[str, dict[str, np.ndarray]] = {}

    def check_file(self, path: str, key: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{key}: data file '{path}' {'is a directory' if p.is_dir() else 'does not exist'}")

    def read_file(self, path: str) -> tuple[list[dict[str, Any]], list[int]]:
        if split_compression(path)[0].suffix.lower() in RECORD_SUFFIXES:
            return read_records(path, self.encoding)
        return read_conll(path, self.conll_tag_column, self.encoding)

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "tokens": self.tokens_column, "tags": self.tags_column,
                "conll_tag_column": self.conll_tag_column, "scheme": self.tag_scheme, "stride": self.doc_stride,
                "document_context": self.document_context}

    # ---- records -------------------------------------------------------------------------------

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str, source: str) -> dict[str, list]:
        first = records[0]
        conll = "token_lines" in first  # read_conll's records
        found = ", ".join(k for k in first if k != "token_lines")
        tok_col = self.tokens_column or next((c for c in TOKENS_COLUMNS if c in first), None)
        if tok_col is None or tok_col not in first:
            wanted = f"'{tok_col}'" if tok_col else f"found (looked for {', '.join(TOKENS_COLUMNS)})"
            raise DataError(f"{source}: no tokens column {wanted}; columns found: {found} (set data.tokens_column)")
        labelled = split != "predict"
        tag_col = self.tags_column or next((c for c in TAGS_COLUMNS if c in first), None)
        if labelled and conll and first["tags"] is None:
            raise DataError(f"{source}:{lines[0]}: one column per line, but {split} data needs a tag column "
                            "after the token")
        if labelled and (tag_col is None or tag_col not in first):
            wanted = f"'{tag_col}'" if tag_col else f"found (looked for {', '.join(TAGS_COLUMNS)})"
            raise DataError(f"{source}: no tags column {wanted}; columns found: {found} (set data.tags_column)")

        all_tokens, all_tags, all_lines, documents = [], [], [], []
        for rec, line in zip(records, lines):
            tokens = rec.get(tok_col)
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DataError(f"{source}:{line}: '{tok_col}' must be a list of strings, got {_short(tokens)}")
            if not tokens:
                raise DataError(f"{source}:{line}: empty sentence (no tokens); remove it")
            token_lines = rec["token_lines"] if conll else [line] * len(tokens)
            all_tokens.append(tokens)
            all_lines.append(token_lines)
            if labelled:
                all_tags.append(self._checked_tags(rec.get(tag_col), tokens, tag_col, token_lines, source, line))
            if self.document_context:
                if rec.get("document") is None:
                    where = ("comes before any -DOCSTART- line" if conll else "has no 'document' field")
                    raise DataError(f"{source}:{line}: data.document_context needs each sentence's document, and "
                                    f"this sentence {where} (use document_context: 0 for independent sentences)")
                documents.append(rec["document"])
        columns = {"tokens": all_tokens, "tags": self._to_iob2(all_tags, all_lines, source) if labelled
                   else [[] for _ in all_tokens], "token_lines": all_lines, "sentence": list(range(len(all_tokens)))}
        if self.document_context:
            # whole words, at least as many as the sub-tokens wanted; encode() trims them to fit
            columns["context_left"], columns["context_right"] = document_contexts(all_tokens, documents,
                                                                                  self.document_context)
        return columns

    @staticmethod
    def _checked_tags(tags: Any, tokens: list[str], column: str, token_lines: list[int], source: str,
                      line: int) -> list[str]:
        if not isinstance(tags, list):
            raise DataError(f"{source}:{line}: '{column}' must be a list of tags, got {_short(tags)}")
        if len(tags) != len(tokens):
            raise DataError(f"{source}:{line}: {len(tokens)} tokens but {len(tags)} tags")
        for tag, at in zip(tags, token_lines):
            if not isinstance(tag, str) or not TAG_RE.match(tag):
                hint = " (class ids need their names: use tag names in the file)" if isinstance(tag, int) else ""
                raise DataError(f"{source}:{at}: malformed tag {tag!r} ({TAG_HELP}){hint}")
        return tags

    def _to_iob2(self, sentences: list[list[str]], lines: list[list[int]], source: str) -> list[list[str]]:
        found = detect_scheme(sentences)
        scheme = found if self.tag_scheme == "auto" else self.tag_scheme
        if found == "BIOES" and scheme != "BIOES":
            tag, at = next((t, ln) for s, ls in zip(sentences, lines) for t, ln in zip(s, ls) if t[0] in "ES")
            raise DataError(f"{source}:{at}: tag '{tag}' is not {scheme} (set data.tag_scheme: BIOES or auto)")
        converted = [to_iob2(tags) for tags in sentences]
        if scheme == "IOB2" and found != "IOB2":
            for tags, new, ls in zip(sentences, converted, lines):
                k = next((k for k, (a, b) in enumerate(zip(tags, new)) if a != b), None)
                if k is not None:
                    after = f"follows '{tags[k - 1]}'" if k else "starts the sentence"
                    raise DataError(f"{source}:{ls[k]}: '{tags[k]}' {after}, which is not IOB2 "
                                    "(set data.tag_scheme: IOB1 or auto)")
        changed = sum(a != b for tags, new in zip(sentences, converted) for a, b in zip(tags, new))
        if changed:
            rank_zero_info(f"{source}: {scheme} tags, {changed} converted to IOB2")
        return converted

    # ---- features ------------------------------------------------------------------------------

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tokenizer = self._get_tokenizer()
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"model.tokenizer_name_or_path: token classification needs a fast tokenizer (it maps "
                            f"sub-tokens to words); {type(tokenizer).__name__} is not one")
        budget = self.max_seq_length - tokenizer.num_special_tokens_to_add()
        sentences = [list(t) for t in batch["tokens"]]
        word_counts = self._word_counts(tokenizer, sentences)
        contexts = None
        if "context_left" in batch:  # sub-tokens per context word, nearest the sentence first
            contexts = list(zip(self._word_counts(tokenizer, [left[::-1] for left in batch["context_left"]]),
                                self._word_counts(tokenizer, batch["context_right"])))
        plans = []  # (sentence, the words fed, the sentence index of the first word fed, score_start, score_end)
        for i, words in enumerate(sentences):
            counts = np.asarray(word_counts[i])
            if not counts.all():
                # a word with no sub-tokens (a lone zero-width space...) is fed as the unknown token, so
                # it is still predicted and scored
                if tokenizer.unk_token is None:
                    raise DataError(f"line {batch['line'][i]}: token {words[int(np.argmin(counts))]!r} has no "
                                    "sub-tokens with this tokenizer")
                words = sentences[i] = [w if c else tokenizer.unk_token for w, c in zip(words, counts)]
                counts = np.maximum(counts, 1)
            if contexts is not None and int(counts.sum()) <= budget:
                n_left, n_right = _context_fit(*contexts[i], self.document_context, budget - int(counts.sum()))
                left = batch["context_left"][i][len(batch["context_left"][i]) - n_left:]
                plans.append((i, [*left, *words, *batch["context_right"][i][:n_right]], -n_left, 0, len(words)))
                continue
            plans.extend((i, words[s:e], s, a, b) for s, e, a, b in plan_windows(counts.tolist(), budget,
                                                                                 self.doc_stride))
        enc = tokenizer([fed for _, fed, _, _, _ in plans], is_split_into_words=True, truncation=True,
                        max_length=self.max_seq_length, return_attention_mask=False)
        out: dict[str, list] = {k: [] for k in (*enc.keys(), "word_ids", "score_start", "score_end")}
        out.update({k: [] for k in batch})
        for j, (i, _, start, score_start, score_end) in enumerate(plans):
            for k in enc.keys():
                out[k].append(enc[k][j])
            n = len(sentences[i])  # context words (before 0, from n on) are fed, never labelled or scored
            out["word_ids"].append([-1 if w is None or not 0 <= w + start < n else w + start for w in enc.word_ids(j)])
            out["score_start"].append(score_start)
            out["score_end"].append(score_end)
            for k in batch:
                out[k].append(batch[k][i])
        return out

    @staticmethod
    def _word_counts(tokenizer: Any, word_lists: list[list[str]]) -> list[list[int]]:
        """Sub-tokens per word of each list (a word with none counts 0: it adds nothing to a window)."""
        out: list[list[int]] = [[] for _ in word_lists]
        filled = [k for k, words in enumerate(word_lists) if words]
        if filled:
            enc = tokenizer([word_lists[k] for k in filled], is_split_into_words=True, add_special_tokens=False)
            for j, k in enumerate(filled):
                ids = [w for w in enc.word_ids(j) if w is not None]
                out[k] = np.bincount(ids, minlength=len(word_lists[k])).tolist()
        return out

    # ---- labels --------------------------------------------------------------------------------

    def schema_splits(self) -> tuple[str, ...]:
        return () if self.facts.labels is not None else ("train",)

    def resolve_schema(self, stage: str | None) -> None:
        """Fix the tag set (the model's when it has one, else the training data's) and build the label arrays."""
        labels = self.facts.labels
        if labels is None:
            train = self.datasets.get("train")
            if train is None:
                raise DataError("the tag set is unknown: set model.labels, load a checkpoint, or give data.train_file")
            labels = tag_set(_sentence_values(train, "tags"))
            if len(labels) < 2:
                raise DataError(f"{self._source_name('train')}: the training tags hold no entities (only O)")
        self.labels = self.schema.labels = list(labels)
        rank_zero_info(f"{len(self.labels)} tags: {', '.join(self.labels[:25])}{' ...' if len(self.labels) > 25 else ''}")
        for split, ds in self.datasets.items():
            self.batch_columns[split] = self._batch_columns(ds, split)

    def _tag_ids(self, ds: Any, split: str) -> dict[int, np.ndarray]:
        """Per sentence, the tag ids of its words (unseen entity types raise or become O, as configured)."""
        label2id = {name: i for i, name in enumerate(self.labels or [])}
        out: dict[int, np.ndarray] = {}
        unseen: Counter = Counter()
        first_unseen = None
        for sentence, tags, lines in zip(ds["sentence"], ds["tags"], ds["token_lines"]):
            if sentence in out:
                continue
            ids = np.empty(len(tags), dtype=np.int64)
            for k, tag in enumerate(tags):
                if tag in label2id:
                    ids[k] = label2id[tag]
                else:
                    unseen[tag] += 1
                    first_unseen = first_unseen or (tag, lines[k])
                    ids[k] = label2id["O"]
            out[sentence] = ids
        if unseen:
            source, (tag, line) = self._source_name(split), first_unseen
            if self.unseen_tags == "error":
                types = ", ".join(sorted({t[2:] for t in self.labels if t != "O"}))
                raise DataError(f"{source}:{line}: tag '{tag}' in {split} data does not occur in the training tags "
                                f"(types: {types}); {sum(unseen.values())} such tag(s) in this split "
                                "(data.unseen_tags: O reads them as O)")
            rank_zero_info(f"{source}: {sum(unseen.values())} tag(s) of types training never saw read as O "
                           f"(data.unseen_tags: O): {', '.join(f'{t} x{n}' for t, n in unseen.most_common())}")
        return out

    def _batch_columns(self, ds: Any, split: str) -> dict[str, np.ndarray]:
        """Per feature: the label of each sub-token (-100: no loss), the word each sub-token scores (-1: none)."""
        kind = self.kind(split)
        tag_ids = self._tag_ids(ds, split) if kind != "predict" else {}
        to_inside = np.arange(len(self.labels or []))
        for i, name in enumerate(self.labels or []):
            if name.startswith("B-") and f"I-{name[2:]}" in self.labels:
                to_inside[i] = self.labels.index(f"I-{name[2:]}")
        train = kind == "train"
        n = len(ds)
        labels, scores = np.empty(n, dtype=object), np.empty(n, dtype=object)
        columns = zip(ds["sentence"], ds["word_ids"], ds["score_start"], ds["score_end"])
        for f, (sentence, word_ids, score_start, score_end) in enumerate(columns):
            words = np.asarray(word_ids, dtype=np.int64)
            real = words >= 0
            first = real & (words != np.concatenate([[-1], words[:-1]]))
            owned = first & (words >= score_start) & (words < score_end)
            scores[f] = np.where(owned, words, -1)
            if kind == "predict":
                continue
            ids = tag_ids[sentence]
            lab = np.full(len(words), -100, dtype=np.int64)
            # training learns from every word of a window; evaluation scores each word once
            keep = first if train else owned
            lab[keep] = ids[words[keep]]
            if train and self.label_all_tokens:
                rest = real & ~first
                lab[rest] = to_inside[ids[words[rest]]]
            labels[f] = lab
        columns_out = {"score_word": scores, "sentence": np.asarray(ds["sentence"], dtype=np.int64)}
        if kind != "predict":
            columns_out["labels"] = labels
        return columns_out

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return self.batch_columns.get(split, {})


def _sentence_values(ds: Any, column: str) -> list[Any]:
    """``column`` once per sentence (windows of one sentence repeat it)."""
    seen: set[int] = set()
    out = []
    for sentence, value in zip(ds["sentence"], ds[column]):
        if sentence not in seen:
            seen.add(sentence)
            out.append(value)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
