"""File readers: every supported format, and one-line errors that point at the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.readers import DataError, check_data_file, read_records

ROWS = [{"text": "good film", "label": "pos"}, {"text": 'said "bad", twice', "label": "neg"}]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_quotes_and_multiline_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\ngood film,pos\n"said ""bad"",\ntwice",neg\n\nok,pos\n')
    records, lines = read_records(path)
    assert records == [{"text": "good film", "label": "pos"}, {"text": 'said "bad",\ntwice', "label": "neg"},
                       {"text": "ok", "label": "pos"}]
    assert lines == [2, 3, 6]


def test_tsv_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted start\t1\nplain\t0\n')
    records, lines = read_records(path)
    assert records[0] == {"sentence": '"quoted start', "label": "1"}
    assert lines == [2, 3]


def test_json_array_lines_and_wrapped_object(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", '[\n  {"text": "good film", "label": "pos"},\n\n  {"text": "said \\"bad\\", twice",\n "label": "neg"}\n]')
    records, lines = read_records(path)
    assert records == ROWS and lines == [2, 4]
    records, _ = read_records(write(tmp_path / "b.json", json.dumps({"data": ROWS})))
    assert records == ROWS
    # JSON Lines saved with a .json suffix, as the Hugging Face json loader accepts
    records, lines = read_records(write(tmp_path / "c.json", "\n".join(json.dumps(r) for r in ROWS)))
    assert records == ROWS and lines == [1, 2]


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    records, lines = read_records(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n"))
    assert records == ROWS and lines == [1, 2]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    records, _ = read_records(tmp_path / "d.parquet")
    assert records == ROWS


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"bad\.jsonl:2: malformed JSON line"),
        ("list.jsonl", '{"text": "a"}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object"),
        ("bad.json", '[{"text": "a"},\n {"text": }]', r"bad\.json:2: malformed JSON"),
        ("ragged.csv", "text,label\na,1\nb,2,3\n", r"ragged\.csv:3: expected 2 fields \(text, label\), found 3"),
        ("quote.csv", 'text,label\n"a"b,1\n', r"quote\.csv:2: malformed CSV"),
        ("header.csv", "text,text\na,b\n", r"header\.csv:1: header has empty or repeated column names"),
        ("empty.csv", "", r"empty\.csv: the file holds no records"),
        ("header_only.tsv", "sentence\tlabel\n", r"header_only\.tsv: the file holds no records"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: the file holds no records"),
        ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), r"latin1\.csv: not valid UTF-8"),
        ("nul.csv", b"text,label\na\x00b,1\n", r"nul\.csv: contains NUL bytes"),
        ("scalar.json", "42", r"scalar\.json: expected a JSON array of records"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, name: str, content: str | bytes, expected: str) -> None:
    with pytest.raises(DataError, match=expected) as info:
        read_records(write(tmp_path / name, content))
    assert "\n" not in str(info.value)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train_file: data file '.*nope\.csv' does not exist"):
        check_data_file(tmp_path / "nope.csv", "data.train_file")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'; expected one of \.csv, \.tsv, \.json, \.jsonl, \.parquet"):
        check_data_file(write(tmp_path / "d.xlsx", "x"), "data.train_file")
    with pytest.raises(DataError, match="is a directory"):
        check_data_file(tmp_path, "data.train_file")
