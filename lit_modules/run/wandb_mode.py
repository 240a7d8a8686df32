"""Weights & Biases without prompts: the mode chosen before any ``wandb.init`` (offline without credentials or
server), logger errors mid-run turned into one warning, and the run closed at the end."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any


def wandb_api_key_available() -> bool:
    """Whether W&B credentials can be found without network or prompt (environment or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    for path in filter(None, [os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"]):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def wandb_host_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def choose_wandb_mode() -> tuple[str, str]:
    """Pick the W&B mode so that ``wandb.init`` never prompts or blocks; returns (mode, reason)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return mode, "WANDB_MODE"
    if not wandb_api_key_available():
        reason = "no W&B API key found (WANDB_API_KEY or `wandb login`)"
        os.environ["WANDB_MODE"] = "offline"
        return "offline", reason
    if not wandb_host_reachable():
        os.environ["WANDB_MODE"] = "offline"
        return "offline", "the W&B server is not reachable"
    return "online", "API key found"


def guard_logger(logger: Any) -> None:
    """Make a logger's errors mid-run (W&B service gone, network, a run finished under it) a warning, shown
    once, instead of the end of training; what it could not log is lost, the run goes on."""
    from lightning.pytorch.utilities import rank_zero_warn

    failed: list[str] = []
    for name in ("log_metrics", "log_hyperparams", "after_save_checkpoint", "save", "finalize"):
        method = getattr(logger, name, None)
        if method is None:
            continue

        def guarded(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            try:
                return _method(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever the logging backend raises, training goes on
                if not failed:
                    reason = (str(e).strip().splitlines() or [""])[0][:200]
                    rank_zero_warn(f"{type(logger).__name__}.{_name} failed ({type(e).__name__}: {reason}); training "
                                   "continues, further logger errors are not shown")
                failed.append(_name)
                return None

        setattr(logger, name, guarded)


def finish_wandb() -> None:
    """Close the W&B run of this process, so its files are complete when train.py returns."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
