"""File readers: local data files -> lists of records, with errors that name the file and line.

Every reader returns ``(records, lines)``: ``records`` is a list of dicts (one per example, keys as in
the file) and ``lines`` the 1-based line number (or record number for formats without lines) where
each record starts, so later checks can point the user at the exact place. Text formats may be
compressed (``.gz``, ``.bz2``, ``.xz``, and ``.zst`` when the ``zstandard`` package is installed): they are
read decompressed, and line numbers count lines of the decompressed text. ``encoding`` (default UTF-8)
reads legacy files (``latin-1``, ``cp1252``, ...).
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import csv
import gzip
import importlib.util
import json
import lzma
import os
import re
import zlib
from pathlib import Path
from typing import IO, Any, Callable

from lit_modules.errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")  # the formats that may come compressed


def _open_zstd(path: Path) -> IO[bytes]:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))


# compression suffix -> how to open the file for reading bytes (zstandard is optional)
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open,
                                                        ".zst": _open_zstd}


def split_compression(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``data.jsonl.gz`` -> (``data.jsonl``, ``.gz``); a path without a compression suffix -> (path, None)."""
    p = Path(path)
    suffix = p.suffix.lower()
    return (p.with_suffix(""), suffix) if suffix in COMPRESSIONS else (p, None)


def check_encoding(encoding: str, key: str = "data.encoding") -> str:
    """A text encoding Python knows (``utf-8``, ``latin-1``, ``cp1252``, ...), or a one-line DataError."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"{key}: unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A text file's content, decompressed when its name ends in a compression suffix; a byte-order mark is
    dropped. Errors (bad bytes for the encoding, a damaged archive) are one line naming the file."""
    p = Path(path)
    _, compression = split_compression(p)
    try:
        if compression is None:
            raw = p.read_bytes()
        else:
            if compression == ".zst" and importlib.util.find_spec("zstandard") is None:
                raise DataError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)")
            with COMPRESSIONS[compression](p) as f:
                raw = f.read()
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
        if isinstance(e, DataError):
            raise
        what = f"not a readable {compression} file" if compression else "cannot be read"
        raise DataError(f"{path}: {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        hint = "set data.encoding (e.g. latin-1 or cp1252) or convert the file to UTF-8" if \
            codecs.lookup(encoding).name == "utf-8" else "check data.encoding"
        shown = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
        raise DataError(f"{path}:{line}: not valid {shown} (byte {e.start}: {e.reason}); {hint}") from None
    return text[1:] if text.startswith("\ufeff") else text


def file_format(path: str | os.PathLike) -> str:
    """The reader name for ``path`` from its suffix (after a compression suffix), or a DataError listing the
    supported ones."""
    inner, compression = split_compression(path)
    suffix = inner.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES or (compression and suffix not in TEXT_SUFFIXES):
        shown = suffix + (compression or "") if suffix else (compression or "(none)")
        raise DataError(
            f"{path}: unsupported file type '{shown}'; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
            f"(the text formats also compressed: {', '.join(COMPRESSIONS)})"
        )
    return suffix[1:]


def check_data_file(path: str | os.PathLike, key: str) -> None:
    """Fail early (while the config is read) when a configured data file is missing or of an unknown type."""
    p = Path(path)
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise DataError(f"{key}: data file '{path}' {where}")
    file_format(p)


def read_records(path: str | os.PathLike, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[int]]:
    """Read a csv / tsv / json / jsonl (each possibly compressed) / parquet file into records and their line
    numbers; text formats are decoded with ``encoding``."""
    fmt = file_format(path)
    if fmt == "parquet":
        records, lines = _read_parquet(Path(path))
    else:
        reader = {"csv": _read_delimited, "tsv": _read_delimited, "json": _read_json, "jsonl": _read_jsonl,
                  "txt": _read_lines}[fmt]
        records, lines = reader(Path(path), read_text(path, encoding))
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records, lines


def _read_lines(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Plain text: one record ``{"text": line}`` per non-empty line (texts to predict, raw text to pretrain on)."""
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    pairs = [(line.strip(), i) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return [{"text": t} for t, _ in pairs], [i for _, i in pairs]


def _read_delimited(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """CSV with standard quoting; TSV without quoting (the GLUE convention: quotes are text)."""
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    tsv = split_compression(path)[0].suffix.lower() == ".tsv"
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


def _read_jsonl(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    records, lines = [], []
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = _loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON line (column {e.colno}: {e.msg})") from None
        records.append(_check_record(path, i, obj))
        lines.append(i)
    return records, lines


def _read_json(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """A JSON array of records, an object holding one (``{"data": [...]}``), or JSON Lines named .json."""
    try:
        obj = _loads(text)
    except json.JSONDecodeError as e:
        first_line_end = text.find("\n")
        if first_line_end != -1 and e.lineno > 1:
            try:  # a .json file that is really JSON Lines (as the HF json loader accepts)
                _loads(text[:first_line_end])
                return _read_jsonl(path, text)
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
