"""Relation extraction data: a sentence, two marked entities (subject and object) and the relation between them.

Canonical record: ``{"id": str, "text": str, "subj_start", "subj_end", "obj_start", "obj_end": int, "subj_type",
"obj_type": str | None, "relation": str | None}``; the spans are character offsets into ``text`` (end exclusive).
SemEval-2010 Task 8's ``e1`` is the subject and ``e2`` the object; the relation's ``(e1,e2)`` / ``(e2,e1)`` says
the direction.

Encoding puts entity markers around both entities (``[E1] x [/E1]``, typed ``<S:PERSON> x </S:PERSON>``, or
punctuation ``@ * person * x @``) and records the token position of each entity's start marker, which the model
reads. A sentence longer than ``max_seq_length`` is cut to a window that holds both entities.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TransformerDataModule
from datamodules.readers import read_text, split_compression
from lit_modules.errors import ConfigError, DataError
from lit_modules.schema import ModelFacts

MarkerStyle = Literal["entity_start", "typed", "punct"]
SpanEnd = Literal["inclusive", "exclusive"]
TOKENS_COLUMNS = ("token", "tokens")
SENTENCE_COLUMNS = ("sentence", "text")
RELATION_COLUMNS = ("relation", "label")
SPAN_KEYS = ("subj_start", "subj_end", "obj_start", "obj_end")
TAG = re.compile(r"(</?e[12]>)")
DIRECTED = re.compile(r"^[^()]+\((e1,e2|e2,e1)\)$")


# ---- reading ---------------------------------------------------------------------------------------

def read_semeval(path: str, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[int]]:
    """Read a SemEval-2010 Task 8 file: per example a sentence line ``ID<TAB>"... <e1>x</e1> ... <e2>y</e2> ..."``,
    a relation line (``Component-Whole(e2,e1)``, ``Other``; absent in unlabelled files), an optional ``Comment:``
    line and blank lines. A line with ``<e1>`` but no ID gets its line number as ID.

    Returns records ``{"id", "sentence", "relation"}`` and the line of each sentence.
    """
    text = read_text(path, encoding)
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    state = "none"  # none: between examples; sentence: a relation may follow; relation: a comment may follow
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (line.startswith("Comment:") and state != "none"):  # comments may quote tagged sentences
            state = "none"
        elif "<e1>" in line or "<e2>" in line:
            ident, _, sentence = line.partition("\t") if "\t" in line else (str(number), "", line)
            sentence = sentence.strip()
            if len(sentence) >= 2 and sentence[0] == sentence[-1] == '"':
                sentence = sentence[1:-1]
            records.append({"id": ident.strip(), "sentence": sentence, "relation": None})
            lines.append(number)
            state = "sentence"
        elif state == "sentence":
            records[-1]["relation"] = line
            state = "relation"
        else:
            raise DataError(f"{path}:{number}: expected a sentence line 'ID<TAB>\"... <e1>..</e1> .. <e2>..</e2> ..\"', "
                            f"its relation or a 'Comment:' line, got {line[:60]!r}")
    if not records:
        raise DataError(f"{path}: no SemEval-2010 Task 8 examples (sentence lines with <e1>..</e1> and <e2>..</e2>)")
    return records, lines


def parse_marked(sentence: str, where: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """``"a <e1>b</e1> c <e2>d</e2>"`` -> the text without tags and the character spans of e1 and e2 (end
    exclusive, surrounding spaces left out)."""
    text, opened, spans = "", {}, {}
    for piece in TAG.split(sentence):
        match = re.fullmatch(r"<(/?)(e[12])>", piece)
        if match is None:
            text += piece
            continue
        closing, name = match.group(1) == "/", match.group(2)
        if closing and name in opened:
            spans[name] = (opened.pop(name), len(text))
        elif closing or name in opened or name in spans:
            raise DataError(f"{where}: expected one <e1>..</e1> and one <e2>..</e2>, found a misplaced {piece}")
        else:
            opened[name] = len(text)
    if opened or set(spans) != {"e1", "e2"}:
        raise DataError(f"{where}: expected one <e1>..</e1> and one <e2>..</e2> in the sentence")
    out = []
    for name in ("e1", "e2"):
        start, end = spans[name]
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start == end:
            raise DataError(f"{where}: entity <{name}> is empty")
        out.append((start, end))
    return text, out[0], out[1]


def tokens_to_text(tokens: Any, spans: list[Any], span_end: str, column: str,
                   where: str) -> tuple[str, list[tuple[int, int]]]:
    """TACRED-style tokens and token spans -> the text (tokens joined by spaces) and character spans."""
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise DataError(f"{where}: '{column}' must be a non-empty list of non-empty strings")
    starts, position = [], 0
    for token in tokens:
        starts.append(position)
        position += len(token) + 1
    out = []
    for role, (start, end) in zip(("subj", "obj"), spans):
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
        last = (end if span_end == "inclusive" else end - 1) if integers else -1
        if not integers or not 0 <= start <= last < len(tokens):
            raise DataError(f"{where}: {role}_start / {role}_end ({start!r}, {end!r}) is not a token span of the "
                            f"{len(tokens)} tokens ({span_end} end; see data.span_end)")
        out.append((starts[start], starts[last] + len(tokens[last])))
    return " ".join(tokens), out


# ---- the data module -------------------------------------------------------------------------------

class RelationExtractionDataModule(TransformerDataModule):
    """Relation extraction data from SemEval-2010 Task 8 files, JSON / JSONL / parquet records or a hub dataset.

    Records come in two layouts, found from the first record: a sentence with inline tags (``sentence`` or
    ``text`` holding ``<e1>..</e1>`` and ``<e2>..</e2>``, as SemEval files and the hub's ``sem_eval_2010_task_8``)
    or TACRED's tokens (``token`` list, ``subj_start`` / ``subj_end`` / ``obj_start`` / ``obj_end``, optional
    ``subj_type`` / ``obj_type``). Files ending in ``.txt`` are read as SemEval-2010 Task 8 files.

    Args:
        marker_style: ``entity_start``: ``[E1] x [/E1]`` and ``[E2] y [/E2]`` (Baldini Soares et al. 2019);
            ``typed``: ``<S:TYPE> x </S:TYPE>`` and ``<O:TYPE> y </O:TYPE>`` (needs the entity types and
            ``entity_types``); ``punct``: ``@ x @`` and ``# y #``, with types ``@ * type * x @`` and
            ``# ^ type ^ y #`` (Zhou & Chen 2021): no new tokens.
        entity_types: the entity types the ``typed`` markers are made for (a type outside it is an error).
        relation_column: the relation field (default: ``relation`` or ``label``).
        span_end: whether TACRED-style ``*_end`` token indices are ``inclusive`` (TACRED's JSON) or ``exclusive``.
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`.
    """

    task_name = "relation_extraction"

    def __init__(
        self,
        marker_style: MarkerStyle = "entity_start",
        entity_types: list[str] | None = None,
        relation_column: str | None = None,
        span_end: SpanEnd = "inclusive",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if marker_style not in ("entity_start", "typed", "punct"):
            raise ConfigError(f"data.marker_style: expected entity_start, typed or punct, got {marker_style!r}")
        if marker_style == "typed" and not entity_types:
            raise ConfigError("data.entity_types: the typed markers need the list of entity types (e.g. [PERSON, "
                              "ORGANIZATION, ...]); or use data.marker_style punct, which needs no new tokens")
        types = [str(t) for t in entity_types or []]
        bad = [t for t in types if not t or re.search(r"[\s<>]", t)]
        if len(set(types)) != len(types) or bad:
            raise ConfigError(f"data.entity_types: expected distinct names without spaces or <>, got {types}")
        self.marker_style = marker_style
        self.entity_types = types
        self.relation_column = relation_column
        self.span_end = span_end
        self.batch_columns: dict[str, dict[str, np.ndarray]] = {}

    # ---- markers -------------------------------------------------------------------------------

    def marker_tokens(self) -> list[str]:
        """The tokens the markers need that a tokenizer may lack (none for ``punct``)."""
        if self.marker_style == "entity_start":
            return ["[E1]", "[/E1]", "[E2]", "[/E2]"]
        if self.marker_style == "typed":
            return [f"<{side}{role}:{t}>" for t in self.entity_types for role in "SO" for side in ("", "/")]
        return []

    def markers(self, role: str, entity_type: str | None) -> tuple[str, str]:
        """The (start, end) marker strings around the subject (``role`` S) or the object (O)."""
        if self.marker_style == "entity_start":
            n = 1 if role == "S" else 2
            return f"[E{n}]", f"[/E{n}]"
        if self.marker_style == "typed":
            return f"<{role}:{entity_type}>", f"</{role}:{entity_type}>"
        mark, frame = ("@", "*") if role == "S" else ("#", "^")
        words = f" {frame} {entity_type.lower().replace('_', ' ')} {frame}" if entity_type else ""
        return mark + words, mark

    def export_format(self) -> dict[str, Any]:
        """How inputs must be marked, written into the export (``self.schema.prompt``)."""
        typed = self.marker_style != "entity_start"
        return {"marker_style": self.marker_style, "entity_types": self.entity_types,
                "subject_markers": list(self.markers("S", "{TYPE}" if typed else None)),
                "object_markers": list(self.markers("O", "{TYPE}" if typed else None)),
                "note": "the model reads the hidden states of the subject's and the object's start markers"
                        + ("; punct markers without entity types are '@' and '#'" if self.marker_style == "punct" else "")}

    def connect(self, tokenizer: Any, facts: ModelFacts | None = None) -> None:
        """Take the model's tokenizer and add the marker tokens it lacks (the model resizes its embeddings for
        them: ``schema.added_tokens``)."""
        super().connect(tokenizer, facts)
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"relation extraction needs a fast tokenizer (token offsets); {type(tokenizer).__name__} "
                              "has none")
        tokens = self.marker_tokens()
        vocab = tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.schema.added_tokens = tokens

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "markers": self.marker_style, "types": self.entity_types,
                "relation": self.relation_column, "span_end": self.span_end}

    # ---- records -------------------------------------------------------------------------------

    def read_file(self, path: str) -> tuple[list[dict[str, Any]], list[int]]:
        if split_compression(path)[0].suffix.lower() == ".txt":
            return read_semeval(path, getattr(self, "encoding", "utf-8"))
        return super().read_file(path)

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str,
                          source: str) -> dict[str, list]:
        first = records[0]
        found = ", ".join(first)
        tokens_col = next((c for c in TOKENS_COLUMNS if c in first), None)
        sentence_col = next((c for c in SENTENCE_COLUMNS if c in first), None)
        if tokens_col is not None and all(k in first for k in SPAN_KEYS):
            layout = "tokens"
        elif sentence_col is not None:
            layout = "marked"
        else:
            raise DataError(f"{source}: expected SemEval-style records ('sentence' with <e1>..</e1> and <e2>..</e2>) "
                            f"or TACRED-style ones ('token', {', '.join(SPAN_KEYS)}); columns found: {found}")
        relation_col = self.relation_column or next((c for c in RELATION_COLUMNS if c in first), None)
        if self.relation_column is not None and self.relation_column not in first and split != "predict":
            raise DataError(f"{source}: no relation column '{self.relation_column}'; columns found: {found}")
        out: dict[str, list] = {k: [] for k in ("id", "text", *SPAN_KEYS, "subj_type", "obj_type", "relation")}
        for rec, line in zip(records, lines):
            where = f"{source}:{line}"
            if layout == "marked":
                sentence = rec.get(sentence_col)
                if not isinstance(sentence, str) or not sentence.strip():
                    raise DataError(f"{where}: '{sentence_col}' must be a non-empty string, got {sentence!r}")
                text, subj, obj = parse_marked(sentence, where)
            else:
                spans = [(rec.get("subj_start"), rec.get("subj_end")), (rec.get("obj_start"), rec.get("obj_end"))]
                text, (subj, obj) = tokens_to_text(rec.get(tokens_col), spans, self.span_end, tokens_col, where)
            types = []
            for key in ("subj_type", "obj_type"):
                value = rec.get(key)
                if value is not None and (not isinstance(value, str) or not value.strip()):
                    raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
                types.append(value.strip() if value else None)
            if self.marker_style == "typed":
                for key, value in zip(("subj_type", "obj_type"), types):
                    if value is None:
                        raise DataError(f"{where}: data.marker_style typed needs '{key}'")
                    if value not in self.entity_types:
                        raise DataError(f"{where}: {key} {value!r} is not in data.entity_types "
                                        f"({', '.join(self.entity_types)})")
            relation = rec.get(relation_col) if relation_col else None
            if relation is not None:
                if not isinstance(relation, str) or not relation.strip():
                    raise DataError(f"{where}: '{relation_col}' must be a relation name, got {relation!r}")
                relation = relation.strip()
                if "(" in relation and not DIRECTED.match(relation):
                    raise DataError(f"{where}: relation {relation!r}: a direction must be written (e1,e2) or (e2,e1)")
            ident = rec.get("id")
            out["id"].append(str(ident) if ident not in (None, "") else str(line))
            out["text"].append(text)
            for key, value in zip(SPAN_KEYS, (*subj, *obj)):
                out[key].append(value)
            out["subj_type"].append(types[0])
            out["obj_type"].append(types[1])
            out["relation"].append(relation)
        return out

    # ---- features ------------------------------------------------------------------------------

    def mark(self, text: str, subj: tuple[int, int], obj: tuple[int, int],
             types: tuple[str | None, str | None]) -> tuple[str, list[int]]:
        """The text with the markers put in, and the character offsets of the subject's start and end markers and
        the object's (4 numbers)."""
        events = []  # (position, closes first, outer span opens first / inner closes first, marker, which offset)
        for k, (role, (start, end), kind) in enumerate((("S", subj, types[0]), ("O", obj, types[1]))):
            opening, closing = self.markers(role, kind)
            events.append((start, 1, -(end - start), opening, 2 * k))
            events.append((end, 0, end - start, closing, 2 * k + 1))
        pieces, offsets, cursor, length = [], [0] * 4, 0, 0
        for position, _, _, marker, slot in sorted(events):
            piece = text[cursor:position] + " "
            pieces.append(piece)
            length += len(piece)
            offsets[slot] = length
            pieces.append(marker + " ")
            length += len(marker) + 1
            cursor = position
        pieces.append(text[cursor:])
        return "".join(pieces), offsets

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tokenizer = self._get_tokenizer()
        probe = tokenizer("a")["input_ids"]
        core = tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(probe)) if probe[i:i + len(core)] == core)
        prefix, suffix = probe[:at], probe[at + len(core):]
        budget = self.max_seq_length - len(prefix) - len(suffix)
        marked, char_offsets = [], []
        for i, text in enumerate(batch["text"]):
            spans = ((batch["subj_start"][i], batch["subj_end"][i]), (batch["obj_start"][i], batch["obj_end"][i]))
            out = self.mark(text, *spans, (batch["subj_type"][i], batch["obj_type"][i]))
            marked.append(out[0])
            char_offsets.append(out[1])
        enc = tokenizer(marked, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False)
        result: dict[str, list] = {"input_ids": [], "subj_pos": [], "obj_pos": [], "windowed": []}
        for ids, offsets, chars in zip(enc["input_ids"], enc["offset_mapping"], char_offsets):
            # the token of each marker: the first one that ends after the marker's first character
            ends = np.asarray([end for _, end in offsets])
            marks = [int(np.argmax(ends > c)) for c in chars]
            keep = entity_window(len(ids), [(marks[0], marks[1]), (marks[2], marks[3])], budget)
            moved = {old: new for new, old in enumerate(keep)}
            result["input_ids"].append(prefix + [ids[j] for j in keep] + suffix)
            result["subj_pos"].append(len(prefix) + moved[marks[0]])
            result["obj_pos"].append(len(prefix) + moved[marks[2]])
            result["windowed"].append(len(keep) < len(ids))
        return result

    # ---- labels --------------------------------------------------------------------------------

    def schema_splits(self) -> tuple[str, ...]:
        return () if self.facts.labels is not None else ("train",)

    def resolve_schema(self, stage: str | None) -> None:
        """Fix the relation set (the model's own when it has one, else the training data's, sorted) and map every
        labelled split's relations to ids."""
        labels = list(self.facts.labels) if self.facts.labels is not None else None
        if labels is None:
            train = self.datasets.get("train")
            if train is None:
                raise DataError("the relation set is unknown: set model.labels, load a checkpoint, or give "
                                "data.train_file")
            missing = [i for i, r in enumerate(train["relation"]) if r is None]
            if missing:
                raise DataError(f"{self._source_name('train')}:{train[missing[0]]['line']}: training data need a "
                                f"relation; {len(missing)} record(s) have none")
            labels = sorted(set(train["relation"]))
            if len(labels) < 2:
                raise DataError(f"{self._source_name('train')}: the training data hold one relation ({labels[0]!r}); "
                                "classification needs at least two")
        self.schema.labels = labels
        self.schema.prompt = self.export_format()
        label2id = {name: i for i, name in enumerate(labels)}
        for split, ds in self.datasets.items():
            source = self._source_name(split)
            columns = {"subj_pos": np.asarray(ds["subj_pos"], dtype=np.int64),
                       "obj_pos": np.asarray(ds["obj_pos"], dtype=np.int64)}
            if split != "predict":
                relations = ds["relation"]
                unknown = [i for i, r in enumerate(relations) if r not in label2id]
                if unknown:
                    first = relations[unknown[0]]
                    what = (f"{split} data need a relation" if first is None else
                            f"relation {first!r} in {split} data does not occur in the training relations "
                            f"({', '.join(labels)})")
                    raise DataError(f"{source}:{ds[unknown[0]]['line']}: {what}; {len(unknown)} such record(s)")
                columns["labels"] = np.fromiter((label2id[r] for r in relations), dtype=np.int64, count=len(ds))
            self.batch_columns[split] = columns
            windowed = int(np.sum(ds["windowed"]))
            if windowed:
                rank_zero_info(f"{source}: {windowed} of {len(ds)} sentences are longer than data.max_seq_length="
                               f"{self.max_seq_length} tokens: each is cut to a window holding both entities")
        rank_zero_info(f"{len(labels)} relations: {', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}")

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return self.batch_columns.get(split, {})


def entity_window(n: int, entities: list[tuple[int, int]], budget: int) -> list[int]:
    """The token indices to keep of a sequence of ``n`` tokens so that at most ``budget`` remain and both entities
    (inclusive token ranges, markers included) stay inside: one window centred on the two entities; when they lie
    further apart than a window holds, half the budget for each entity, from its start marker on (moved left where
    the sequence ends), so both start markers, which the model reads, are always kept."""
    if n <= budget:
        return list(range(n))
    lo = min(start for start, _ in entities)
    hi = max(end for _, end in entities) + 1
    if hi - lo <= budget:
        start = min(max(lo - (budget - (hi - lo)) // 2, 0), n - budget)
        return list(range(start, start + budget))
    keep: set[int] = set()
    for (first, _), size in zip(sorted(entities), (budget // 2, budget - budget // 2)):
        start = max(0, min(first, n - size))
        keep.update(range(start, start + size))
    return sorted(keep)
