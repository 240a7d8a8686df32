"""Hostile input: every file reader, fed random bytes, truncated files, other encodings and huge lines.

The only outcome allowed besides success is the framework's own one-line ``DataError``. Fixed example
budgets keep this well under a minute.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.question_answering import QuestionAnsweringDataModule
from datamodules.readers import DataError, read_records
from datamodules.token_classification import TokenClassificationDataModule, read_conll

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), text)
records = st.lists(st.dictionaries(st.sampled_from(["text", "label", "sentence", "tokens", "tags", "id"]),
                                   scalars, max_size=4), min_size=0, max_size=6)


def _valid_text(fmt: str, rows: list[dict[str, Any]]) -> str:
    """A well-formed file of ``fmt`` holding ``rows`` (the starting point the mutations corrupt)."""
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        writer.writerow(["text", "label"])
        for r in rows:
            writer.writerow([str(r.get("text", "")).replace("\t", " "), str(r.get("label", ""))])
        return out.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "conll":
        return "\n\n".join("\n".join(f"{w or 'x'} {t}" for w, t in zip(str(r.get("text", "a b")).split() or ["a"],
                                                                         ["B-PER", "I-PER", "O", "Q"] * 10))
                           for r in rows) + "\n"
    assert fmt == "squad"
    return json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": str(r.get("text", "ctx")) or "ctx",
         "qas": [{"id": str(i), "question": str(r.get("sentence", "q?")),
                  "answers": [{"text": str(r.get("label", "c")), "answer_start": 0}]}]}
        for i, r in enumerate(rows)]}]})


mutations = st.one_of(
    st.tuples(st.just("keep"), st.none()),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("encode"), st.sampled_from(["latin-1", "utf-16", "utf-16-le", "cp1252", "utf-32"])),
    st.tuples(st.just("huge_line"), st.sampled_from([200_000, 1_000_000])),
    st.tuples(st.just("random_bytes"), st.binary(max_size=3000)),
    st.tuples(st.just("splice"), st.binary(min_size=1, max_size=50)),
    st.tuples(st.just("nesting"), st.integers(1000, 200_000)),
    st.tuples(st.just("long_number"), st.integers(4000, 50_000)),
)


def _mutated(fmt: str, rows: list[dict[str, Any]], mutation: tuple[str, Any]) -> bytes:
    kind, arg = mutation
    body = _valid_text(fmt, rows)
    if kind == "truncate":
        data = body.encode("utf-8")
        return data[: int(len(data) * arg)]
    if kind == "encode":
        return (body + "café naïve ü\n").encode(arg, errors="replace")
    if kind == "huge_line":
        return (body + ("x" * arg) + "\n").encode()
    if kind == "random_bytes":
        return arg
    if kind == "splice":
        data = body.encode()
        cut = len(data) // 2
        return data[:cut] + arg + data[cut:]
    if kind == "nesting":
        return ("[" * arg + "]" * arg).encode() if fmt != "csv" else ("\"" * arg).encode()
    if kind == "long_number":
        return (f'{{"text": "a", "label": {"9" * arg}}}\n' if fmt in ("jsonl", "json", "squad") else
                "text,label\na," + "9" * arg + "\n").encode()
    return body.encode()


def _check(read: Callable[[Path], Any], suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            read(path)
        except DataError as e:
            message = str(e)
            assert message and "\n" not in message, message  # one line
            assert len(message) < 2000, message[:300]  # never the whole hostile file


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
@FUZZ
@given(rows=records, mutation=mutations)
def test_record_readers_survive_hostile_files(fmt: str, rows: list[dict[str, Any]], mutation: tuple[str, Any]) -> None:
    _check(read_records, f".{fmt}", _mutated(fmt, rows, mutation))


@FUZZ
@given(rows=records, mutation=mutations)
def test_conll_reader_survives_hostile_files(rows: list[dict[str, Any]], mutation: tuple[str, Any]) -> None:
    dm = TokenClassificationDataModule()

    def read(path: Path) -> None:
        recs, lines = dm.read_file(str(path))
        dm.canonical_columns(recs, lines, "train", str(path))

    _check(read, ".conll", _mutated("conll", rows, mutation))
    _check(lambda p: read_conll(p, tag_column=-1), ".txt", _mutated("conll", rows, mutation))


@pytest.fixture(scope="module")
def qa_module(tiny_bert: Path) -> QuestionAnsweringDataModule:
    from transformers import AutoTokenizer

    dm = QuestionAnsweringDataModule()
    dm.connect(AutoTokenizer.from_pretrained(tiny_bert))
    return dm


@FUZZ
@given(rows=records, mutation=mutations)
def test_squad_reader_survives_hostile_files(qa_module: QuestionAnsweringDataModule, rows: list[dict[str, Any]],
                                             mutation: tuple[str, Any]) -> None:
    def read(path: Path) -> None:
        qa_module.files["train"] = str(path)
        recs, lines = qa_module._read_split("train")
        qa_module.canonical_columns(recs, lines, "train", str(path))

    _check(read, ".json", _mutated("squad", rows, mutation))
