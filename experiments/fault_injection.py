"""Fault injection: kill a real training run with SIGKILL at random points, resume it, and compare.

    python -m experiments.fault_injection [--kills 3] [--seed 0] [--peft lora|adalora]
        [--trainer_config configs/trainer/ddp_cpu.yaml] [--workdir DIR]

Builds a tiny random BERT (no download), then runs ``train.py fit`` on the quickstart sentiment data
(dropout on, length-grouped batches, step checkpoints every ``--every`` optimizer steps) twice:

- reference: uninterrupted;
- faulted: the same command, SIGKILLed at ``--kills`` random points (a random training step, in one of
  three places: before the batch, between backward and the optimizer step, or in the middle of a
  validation), each time resumed with ``--ckpt_path last`` until it finishes.

The kill comes from inside the process (``os.kill(os.getpid(), SIGKILL)`` from a callback added on the
command line) so the point is exact and the script repeatable; nothing of train.py knows about it.
With a multi-process trainer preset (``--trainer_config configs/trainer/ddp_cpu.yaml``: DDP, 2 CPU
processes) both runs use it and each kill hits one random rank; the others must end too. Every launch
runs in a process group of its own, and whatever of it outlives the launcher is killed and counted.
The two runs must end with identical weights, optimizer and scheduler states (and AdaLoRA's rank
allocator state), best validation score and test metrics; the script prints the comparison and exits 1
on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_validation_batch_start")

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the script needs lightning anyway
    Callback = object  # type: ignore[misc,assignment]

STOPPED = re.compile(r"Stopped by (SIG[A-Z0-9]+|a signal)")  # train.py's line after a graceful stop


class KillAt(Callback):
    """Send ``signal`` (SIGKILL, or SIGTERM / SIGUSR1 for a preemption) to this process when ``hook`` runs at
    optimizer step ``step`` or later (a test fault, never a real one); once per process. ``rank``: only in the
    process of that global rank (a distributed run loses one process; the others must notice)."""

    def __init__(self, step: int, hook: str = "on_train_batch_start", signal: str = "SIGKILL",
                 rank: Optional[int] = None) -> None:
        if hook not in HOOKS:
            raise ValueError(f"hook: expected one of {HOOKS}, got {hook!r}")
        self.step = step
        self.hook = hook
        self.signal = signal
        self.rank = rank
        self.sent = False

    def _maybe_kill(self, trainer: Any, hook: str) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if hook == self.hook and trainer.global_step >= self.step and not trainer.sanity_checking and not self.sent:
            self.sent = True
            sys.stdout.flush()
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._maybe_kill(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer: Any, *args: Any) -> None:
        self._maybe_kill(trainer, "on_before_optimizer_step")

    def on_validation_batch_start(self, trainer: Any, *args: Any) -> None:
        self._maybe_kill(trainer, "on_validation_batch_start")


def write_experiment(path: Path, model: Path, max_train_samples: int, batch_size: int, epochs: int,
                     peft: str | None, steps: int) -> Path:
    import yaml

    data = ROOT / "experiments" / "data" / "sentiment"
    cfg: dict[str, Any] = {
        "model": {"class_path": "lit_modules.text_classification.TextClassificationModule",
                  "init_args": {"model_name_or_path": str(model), "learning_rate": 1e-3, "warmup_ratio": 0.1}},
        "data": {"class_path": "datamodules.text_classification.TextClassificationDataModule",
                 "init_args": {"train_file": str(data / "train.jsonl"), "validation_file": str(data / "validation.jsonl"),
                               "test_file": str(data / "test.jsonl"), "max_seq_length": 32, "batch_size": batch_size,
                               "max_train_samples": max_train_samples, "max_eval_samples": 64}},
        "trainer": {"max_epochs": epochs, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
    }
    if peft == "lora":
        cfg["model"]["init_args"]["peft"] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                             "target_modules": ["query", "value"]}
    elif peft == "adalora":
        # all three phases of the rank schedule within the run: warmup (tinit), budget reduction with masking
        # every step, and the final steps (tfinal) that re-apply the final rank pattern
        cfg["model"]["init_args"]["peft"] = {"peft_type": "ADALORA", "init_r": 6, "target_r": 2, "lora_alpha": 8,
                                             "target_modules": ["query", "value"], "tinit": max(1, steps // 6),
                                             "tfinal": max(1, steps // 4), "deltaT": 1}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Launch:
    """How one ``train.py`` launch ended: the launcher's exit code, its output (all ranks), and how many processes
    of its group were still alive after it and had to be killed."""

    returncode: int
    stdout: str
    stderr: str
    orphans: int


def train(args: list[str], env: dict[str, str], log: Path, grace: float = 20.0) -> Launch:
    """Run ``train.py`` in a process group of its own and wait for it (the launcher: rank 0 of a DDP run).

    Lightning starts the other DDP ranks as children in the same group; when a SIGKILL takes rank 0, a child can
    be left waiting in a collective. Whatever of the group is still alive ``grace`` seconds after the launcher
    ended is killed (and counted), so no launch leaves processes behind.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: an orphan holding a pipe would block us
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=fo,
                                stderr=fe, start_new_session=True)
        try:
            code = proc.wait(timeout=1800)
        finally:
            orphans = _end_group(proc.pid, grace)
    return Launch(code, out.read_text(errors="replace"), err.read_text(errors="replace"), orphans)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc; elsewhere: the group id if it exists)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(entry.name))
    return members


def _end_group(pgid: int, grace: float) -> int:
    """Wait up to ``grace`` seconds for the rest of the group to exit, then SIGKILL it; returns how many were killed."""
    deadline = time.time() + grace
    while _group_members(pgid) and time.time() < deadline:
        time.sleep(0.2)
    left = _group_members(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return 0
        deadline = time.time() + 10
        while _group_members(pgid) and time.time() < deadline:
            time.sleep(0.1)
        if _group_members(pgid):
            raise RuntimeError(f"processes {_group_members(pgid)} of group {pgid} survived SIGKILL")
    return len(left)


def processes(trainer_config: Optional[Path]) -> int:
    """How many processes a trainer preset starts (``devices`` x ``num_nodes``; 1 when it does not say)."""
    if trainer_config is None:
        return 1
    import yaml

    trainer = (yaml.safe_load(trainer_config.read_text()) or {}).get("trainer", {})
    devices = trainer.get("devices", 1)
    devices = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 0 else 1
    return devices * int(trainer.get("num_nodes", 1) or 1)


def final_state(run_dir: Path) -> dict[str, Any]:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    res = json.loads((run_dir / "results.json").read_text())
    return {"ckpt": ckpt, "results": res}


def _equal(a: Any, b: Any) -> bool:
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def compare(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Differences between the final states of two runs (empty: identical)."""
    diffs = []
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers", "adalora"):
        if not _equal(ref["ckpt"].get(key), got["ckpt"].get(key)):
            diffs.append(f"last.ckpt {key} differs")
    ra, rb = ref["results"], got["results"]
    for key in sorted(set(ra) | set(rb)):
        if key in ("run_dir", "best_checkpoint", "wandb_run", "export", "train_seconds", "train_samples_per_second"):
            continue  # paths and wall-clock measurements, not results
        if ra.get(key) != rb.get(key):
            diffs.append(f"results.json {key}: {ra.get(key)} != {rb.get(key)}")
    if Path(ra["best_checkpoint"]).name != Path(rb["best_checkpoint"]).name:
        diffs.append(f"best checkpoint {Path(ra['best_checkpoint']).name} != {Path(rb['best_checkpoint']).name}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="how many times to SIGKILL the faulted run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (the training seed is fixed)")
    parser.add_argument("--every", type=int, default=3, help="checkpoint.every_n_train_steps")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--signals", default="SIGKILL",
                        help="comma-separated signals used in turn (SIGKILL, SIGTERM, SIGUSR1)")
    parser.add_argument("--peft", choices=["lora", "adalora"], default=None,
                        help="train LoRA / AdaLoRA adapters instead of all weights")
    parser.add_argument("--trainer_config", type=Path, default=None,
                        help="a trainer preset for both runs, e.g. configs/trainer/ddp_cpu.yaml (2 processes); "
                             "a kill then hits one random rank")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random BERT)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    opts = parser.parse_args(argv)
    import torch

    work = opts.workdir or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TUNEFORGE_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                     "WORLD_SIZE", "MASTER_", "NODE_RANK", "PL_"))}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TUNEFORGE_CACHE": env.get("TUNEFORGE_CACHE", str(work / "cache"))})
    model = opts.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import build_tiny_bert, corpus_words

        model = build_tiny_bert(work / "tiny_bert", corpus_words(), hidden_dropout_prob=0.1,
                                attention_probs_dropout_prob=0.1)
    world = processes(opts.trainer_config)
    per_process = -(-opts.max_train_samples // world)  # the distributed sampler pads the epoch to a multiple of world
    steps_per_epoch = -(-per_process // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    exp = write_experiment(work / "exp.yaml", model, opts.max_train_samples, opts.batch_size, opts.epochs, opts.peft,
                           total)
    preset = ["--config", str(opts.trainer_config.resolve())] if opts.trainer_config else []
    common = ["fit", "--config", str(exp), *preset, "--export", "false", "--run_name", "fault",
              "--checkpoint.every_n_train_steps", str(opts.every), "--min_free_disk_mb", "0"]
    logs = work / "logs"
    orphans = 0

    t0 = time.time()
    proc = train([*common, "--output_dir", str(work / "reference")], env, logs / "reference")
    orphans += proc.orphans
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"reference run: {total} steps{f' on {world} processes' if world > 1 else ''} in {time.time() - t0:.0f} s")

    rng = random.Random(opts.seed)
    candidates = list(range(opts.every + 1, total))
    if len(candidates) < opts.kills:
        parser.error(f"{total} steps leave no room for {opts.kills} kills after the first checkpoint")
    kills = sorted(rng.sample(candidates, opts.kills))
    out = ["--output_dir", str(work / "faulted")]
    for i, step in enumerate(kills):
        hook = rng.choice(HOOKS)
        sig = opts.signals.split(",")[i % len(opts.signals.split(","))]
        if hook == "on_validation_batch_start":
            step = max(opts.every + 1, step - step % steps_per_epoch)  # validation runs at epoch ends
            step = max(step, kills[i - 1] + 1) if i else step
        rank = rng.randrange(world) if world > 1 else None
        callback = json.dumps({"class_path": "experiments.fault_injection.KillAt",
                               "init_args": {"step": step, "hook": hook, "signal": sig, "rank": rank}})
        resume = ["--ckpt_path", "last"] if i else []
        proc = train([*common, *out, *resume, f"--trainer.callbacks+={callback}"], env, logs / f"kill{i + 1}")
        orphans += proc.orphans
        # SIGKILL: the process dies at once; SIGTERM / SIGUSR1: it saves last.ckpt after the batch and exits 0
        # (a signal during the very last validation lets the run finish: there is no training left to stop).
        # Under DDP a SIGKILLed rank takes the launcher down with it: killed by Lightning (-9), or an error (1)
        # from the collective the lost rank never joins.
        if sig == "SIGKILL":
            acted = proc.returncode == -signal.SIGKILL if world == 1 else proc.returncode != 0
        else:
            acted = proc.returncode == 0 and STOPPED.search(proc.stderr) is not None
        finished = proc.returncode == 0 and (work / "faulted" / "fault").is_dir() and \
            any((work / "faulted" / "fault").glob("*/results.json"))
        if sig != "SIGKILL" and finished and STOPPED.search(proc.stderr) is None:
            print(f"kill {i + 1}: {sig} at step {step} in {hook} came after the last training step; the run finished")
            break
        if not acted:
            print(f"{sig} {i + 1} at step {step} ({hook}) did not act: exit {proc.returncode}\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        last = next((work / "faulted" / "fault").glob("*/checkpoints/last.ckpt"), None)
        resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last else None
        where = f" on rank {rank}" if rank is not None else ""
        print(f"kill {i + 1}: {sig}{where} at step {step} in {hook}; exit {proc.returncode}; newest checkpoint: "
              f"step {resumed_from}")
    else:
        proc = train([*common, *out, "--ckpt_path", "last"], env, logs / "final")
        orphans += proc.orphans
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    runs = [p for p in (work / "faulted" / "fault").iterdir() if p.is_dir()]
    if len(runs) != 1:
        print(f"expected one faulted run directory, found {len(runs)}", file=sys.stderr)
        return 1
    ref = final_state(next((work / "reference" / "fault").iterdir()))
    got = final_state(runs[0])
    diffs = compare(ref, got)
    shown = {k: v for k, v in ref["results"].items() if k.startswith(("val/", "test"))}
    print(f"reference: {json.dumps(shown, sort_keys=True)}")
    print(f"faulted:   {json.dumps({k: v for k, v in got['results'].items() if k in shown}, sort_keys=True)}")
    if diffs:
        print("DIFFERENT:\n  " + "\n  ".join(diffs))
        return 1
    print(f"IDENTICAL after {opts.kills} kill(s) ({opts.signals}) and resumes: weights, optimizer, scheduler, best score, "
          f"test metrics ({time.time() - t0:.0f} s, work dir {work})")
    if world > 1:
        print(f"processes left behind by a launch and killed: {orphans}; none remain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
