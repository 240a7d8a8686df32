"""Read W&B offline runs (``offline-run-*/run-*.wandb``) without network or a W&B account.

The ``.wandb`` file is a sequence of protobuf ``Record`` messages in W&B's LevelDB-style log format
(32 KiB blocks; each chunk has a 7-byte header: CRC32, length, type). This reader decodes it with the
protobuf classes that ship with the ``wandb`` package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7  # <I checksum, <H length, <B type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 7  # file header: b":W&B" + magic (2 bytes) + version (1 byte)
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing :W&B header)")
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            pos += left - HEADER
            continue
        yield kind, data[pos : pos + length]
        pos += length


def records(path: str | Path) -> Iterator[Any]:
    """Every protobuf ``Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = b""
    for kind, chunk in _chunks(Path(path).read_bytes()):
        if kind == FULL:
            buf = chunk
        elif kind == FIRST:
            buf = chunk
            continue
        elif kind == MIDDLE:
            buf += chunk
            continue
        elif kind == LAST:
            buf += chunk
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec


def _items(items: Any) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json) if item.value_json else None
    return out


def run_file(run_dir: str | Path) -> Path:
    """The ``.wandb`` file of an offline run directory (or the file itself)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    found = sorted(run_dir.glob("run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file")
    return found[0]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """History rows, summary, config, run id, and the run's name / group / tags / notes / job type."""
    history, summary, config, run_id = [], {}, {}, None
    info: dict[str, Any] = {}
    for rec in records(run_file(run_dir)):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(rec.history.item))
        elif kind == "summary":
            summary.update(_items(rec.summary.update))
        elif kind == "config":
            config.update(_items(rec.config.update))
        elif kind == "run":
            run_id = rec.run.run_id
            config.update(_items(rec.run.config.update))
            info = {"group": rec.run.run_group, "tags": list(rec.run.tags), "notes": rec.run.notes,
                    "name": rec.run.display_name, "job_type": rec.run.job_type}
    return {"history": history, "summary": summary, "config": config, "run_id": run_id, **info}
