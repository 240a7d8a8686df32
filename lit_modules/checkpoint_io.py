"""Checkpoint files that are never half-written, and a one-line answer for a file that cannot be read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_modules.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<dir>/.<name>.tmp``, syncs it to disk and renames it over the target.

    A process killed while saving leaves the previous checkpoint untouched (and at most a stale ``.tmp``
    file, overwritten by the next save of the same name). Local paths only; other ones (``s3://``) go
    through Lightning's own writer. Loading uses ``weights_only=True`` unless the caller asks otherwise.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(self, path: _PATH, map_location: Any = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" not in str(path):
            check_checkpoint(path)
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_checkpoint(path: _PATH, key: str = "ckpt_path") -> dict[str, Any]:
    """Open a checkpoint (memory-mapped, ``weights_only``) or raise a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: checkpoint {path} {'is a directory' if p.is_dir() else 'does not exist'}")
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets the same one-line answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{key}: cannot read checkpoint {path} (truncated or not a checkpoint?): {reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}: {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint
