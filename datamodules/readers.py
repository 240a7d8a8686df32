"""File readers: local data files -> lists of records, with errors that name the file and line.

Every reader returns ``(records, lines)``: ``records`` is a list of dicts (one per example, keys as in
the file) and ``lines`` the 1-based line number (or record number for formats without lines) where
each record starts, so later checks can point the user at the exact place.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import re
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


class DataError(ValueError):
    """A problem with the user's data or data options; the message is one line the user can act on."""


def file_format(path: str | os.PathLike) -> str:
    """The reader name for ``path`` from its suffix, or a DataError listing the supported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type '{suffix or '(none)'}'; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return suffix[1:]


def check_data_file(path: str | os.PathLike, key: str) -> None:
    """Fail early (while the config is read) when a configured data file is missing or of an unknown type."""
    p = Path(path)
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise DataError(f"{key}: data file '{path}' {where}")
    file_format(p)


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """Read a csv / tsv / json / jsonl / parquet file into records and their line numbers."""
    fmt = file_format(path)
    reader = {"csv": _read_delimited, "tsv": _read_delimited, "json": _read_json, "jsonl": _read_jsonl,
              "parquet": _read_parquet}[fmt]
    try:
        records, lines = reader(Path(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); convert the file to UTF-8") from None
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records, lines


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return text[1:] if text.startswith("\ufeff") else text  # tolerate a UTF-8 byte-order mark


def _read_delimited(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """CSV with standard quoting; TSV without quoting (the GLUE convention: quotes are text)."""
    text = _read_text(path)
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    tsv = path.suffix.lower() == ".tsv"
    kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    rows = csv.reader(text.splitlines(keepends=True), strict=True, **kwargs)
    try:
        header = next(rows, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or any(not h for h in header):
            raise DataError(f"{path}:1: header has empty or repeated column names: {header}")
        records, lines = [], []
        line = rows.line_num + 1
        for row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                line = rows.line_num + 1
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), found {len(row)}"
                )
            records.append(dict(zip(header, row)))
            lines.append(line)
            line = rows.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{rows.line_num}: malformed {'TSV' if tsv else 'CSV'}: {e}") from None
    return records, lines


def _loads(text: str) -> Any:
    """``json.loads`` whose other failures (nesting too deep, a number too long for ``int``) are
    ``JSONDecodeError`` too, so hostile files get the same one-line error as malformed ones."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except ValueError as e:
        raise json.JSONDecodeError(str(e).split(";")[0], text, 0) from None


def _check_record(path: Path, line: int, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: expected a JSON object per record, found {type(obj).__name__}")
    return obj


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    records, lines = [], []
    for i, raw in enumerate(_read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = _loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON line (column {e.colno}: {e.msg})") from None
        records.append(_check_record(path, i, obj))
        lines.append(i)
    return records, lines


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """A JSON array of records, an object holding one (``{"data": [...]}``), or JSON Lines named .json."""
    text = _read_text(path)
    try:
        obj = _loads(text)
    except json.JSONDecodeError as e:
        first_line_end = text.find("\n")
        if first_line_end != -1 and e.lineno > 1:
            try:  # a .json file that is really JSON Lines (as the HF json loader accepts)
                _loads(text[:first_line_end])
                return _read_jsonl(path)
            except json.JSONDecodeError:
                pass
        raise DataError(f"{path}:{e.lineno}: malformed JSON (column {e.colno}: {e.msg})") from None
    if isinstance(obj, list):
        lines = _array_item_lines(text)
        return [_check_record(path, line, r) for r, line in zip(obj, lines)], lines
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) == 1:
            records = obj[lists[0]]
            # Line numbers are not recoverable cheaply here; report the record number instead.
            return [_check_record(path, i, r) for i, r in enumerate(records, start=1)], list(range(1, len(records) + 1))
        raise DataError(
            f"{path}: expected a JSON array of records or an object with one list of records, "
            f"found an object with keys {sorted(obj)[:10]}"
        )
    raise DataError(f"{path}: expected a JSON array of records, found {type(obj).__name__}")


def _array_item_lines(text: str) -> list[int]:
    """1-based line where each element of a top-level JSON array starts (the text is known to parse)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r,]*")
    pos = ws.match(text, text.index("[") + 1).end()
    starts = []
    while pos < len(text) and text[pos] != "]":
        starts.append(pos)
        _, pos = decoder.raw_decode(text, pos)
        pos = ws.match(text, pos).end()
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [bisect.bisect_left(newlines, s) + 1 for s in starts]


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    import pyarrow.parquet as pq
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    records = table.to_pylist()
    return records, list(range(1, len(records) + 1))
