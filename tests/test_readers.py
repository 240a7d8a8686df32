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
        ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), r"latin1\.csv:2: not valid UTF-8 \(byte 14: .*\); set data\.encoding"),
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


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json", "txt"])
def test_compressed_files_read_as_their_text(tmp_path: Path, fmt: str, compression: str) -> None:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[compression]
    text = {"jsonl": "".join(json.dumps(r) + "\n" for r in ROWS),
            "csv": 'text,label\ngood film,pos\n"said ""bad"", twice",neg\n',
            "json": json.dumps(ROWS, indent=1),
            "txt": "good film\n\nsaid \"bad\", twice\n"}[fmt]
    plain = write(tmp_path / f"d.{fmt}", text)
    packed = tmp_path / f"d.{fmt}{compression}"
    with opener(packed, "wt", encoding="utf-8") as f:
        f.write(text)
    assert read_records(packed) == read_records(plain)
    check_data_file(packed, "data.train_file")


def test_errors_in_a_compressed_file_point_into_its_text(tmp_path: Path) -> None:
    import gzip

    packed = tmp_path / "d.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(json.dumps(ROWS[0]) + "\n" + '{"text": "broken"\n')
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:2: malformed JSON line"):
        read_records(packed)
    damaged = write(tmp_path / "e.jsonl.gz", b"\x1f\x8b\x08\x00 this is not gzip data")
    with pytest.raises(DataError, match=r"e\.jsonl\.gz: not a readable \.gz file"):
        read_records(damaged)
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet\.gz'"):
        check_data_file(write(tmp_path / "f.parquet.gz", b"x"), "data.train_file")


def test_encoding_option_reads_legacy_files(tmp_path: Path) -> None:
    from datamodules.readers import check_encoding

    path = write(tmp_path / "latin1.tsv", "text\tlabel\ncaf\xe9 cr\xe8me\t1\nna\xefve\t0\n".encode("latin-1"))
    records, lines = read_records(path, "latin-1")
    assert [r["text"] for r in records] == ["café crème", "naïve"] and lines == [2, 3]
    with pytest.raises(DataError, match=r"latin1\.tsv:2: not valid UTF-8 .*set data\.encoding \(e\.g\. latin-1"):
        read_records(path)
    with pytest.raises(DataError, match=r"data\.encoding: unknown text encoding 'latin-9x'"):
        check_encoding("latin-9x")


def test_data_modules_take_the_encoding(tmp_path: Path, tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    from datamodules.text_classification import TextClassificationDataModule
    from datamodules.token_classification import TokenClassificationDataModule
    from lit_modules.errors import DataError as Error

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    train = write(tmp_path / "t.csv", "text,label\ncaf\xe9 good,pos\nbad,neg\n".encode("cp1252"))
    dm = TextClassificationDataModule(train_file=str(train), encoding="cp1252", cache_dir=str(tmp_path / "c"))
    dm.connect(tok)
    dm.setup("fit")
    assert dm.datasets["train"]["text"][0] == "café good"
    conll = write(tmp_path / "t.conll", "M\xfcller B-PER\nlebt O\n".encode("latin-1"))
    ner = TokenClassificationDataModule(train_file=str(conll), encoding="latin-1", cache_dir=str(tmp_path / "c"))
    ner.connect(tok)
    ner.setup("fit")
    assert ner.datasets["train"]["tokens"][0] == ["Müller", "lebt"]
    with pytest.raises(Error, match=r"data\.encoding: unknown text encoding"):
        TextClassificationDataModule(train_file=str(train), encoding="nope")
