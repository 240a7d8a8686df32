"""Every run's own directory: its name, the checks before anything is written, the saved config and run info,
and its removal when a run fails before it wrote anything worth keeping."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from lit_modules.errors import ConfigError
from lit_modules.run.wandb_mode import finish_wandb

ROOT = Path(__file__).resolve().parents[2]


def git_info() -> dict[str, Any]:
    """The commit of this checkout and whether tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty)}


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config and run info into the run directory and logs them to every logger."""

    def __init__(self, *args: Any, run_dir: Path, filled: list[tuple[Any, str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.run_dir = run_dir
        self.filled = filled  # (namespace, key, value the user gave) for the paths train.py filled in

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Save what the user asked for, not this run's paths, so that rerunning the saved config
        # starts a new run directory instead of writing into this one.
        run_values = [(ns, key, ns[key]) for ns, key, _ in self.filled]
        for ns, key, given in self.filled:
            ns[key] = given
        try:
            name = "config.yaml" if not (self.run_dir / "config.yaml").exists() else \
                f"config.resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml"  # a resumed run keeps its first config
            self.parser.save(self.config, self.run_dir / name, overwrite=True, skip_unset=False)
            config = self.parser.dump(self.config, format="json", skip_unset=False)
        finally:
            for ns, key, value in run_values:
                ns[key] = value
        info = {
            "command": [sys.executable, *sys.argv],
            "git": git_info(),
            "versions": {m: _version(m) for m in ("torch", "lightning", "transformers", "torchmetrics", "datasets", "peft", "wandb")},
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
        }
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": json.loads(config), "git": info["git"], "run_dir": str(self.run_dir)})


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def make_run_dir(output_dir: str, run_name: str, subcommand: str) -> Path:
    """A fresh directory name under ``output_dir/run_name`` (never one an earlier run used)."""
    if os.environ.get("TUNEFORGE_RUN_DIR"):  # set by the launching process for its DDP workers
        return Path(os.environ["TUNEFORGE_RUN_DIR"])
    suffix = "" if subcommand == "fit" else f"-{subcommand}"
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # every task of the job, and the job again after a requeue, uses the same directory
        return Path(output_dir) / run_name / f"slurm-{os.environ['SLURM_JOB_ID']}{suffix}"
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + suffix
    base = Path(output_dir) / run_name / stamp
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def check_output_dir(directory: Path, min_free_mb: int, key: str) -> None:
    """Before anything is built: the output directory can be created and written, and its disk has room."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and ACLs all show here (os.access misses some)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tuneforge-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {directory} ({existing}: {e.strerror or e})") from None
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"{key}: only {free_mb:.0f} MB free on the disk of {existing}, less than "
                          f"min_free_disk_mb={min_free_mb} (free space or set --min_free_disk_mb)")


def remove_unfinished_run(run_dir: Optional[Path]) -> None:
    """After a user error, remove the run directory if nothing worth keeping (a checkpoint) was written."""
    if run_dir is None or not run_dir.exists():
        return
    if any(run_dir.rglob("*.ckpt")):
        return
    finish_wandb()
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
