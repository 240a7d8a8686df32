"""Memory over a long run: resident set size (RSS) of a real ``train.py fit`` every N steps.

    python -m experiments.memory_soak [--steps 20000] [--every 500] [--workdir DIR]

Trains a tiny random BERT on the quickstart sentiment data for ``--steps`` optimizer steps, with a
(short) validation every epoch so per-epoch metric states are built and reset hundreds of times, and
step checkpoints every 1000 steps. A callback records the process's RSS every ``--every`` steps; the
script prints the series and the growth from the first quarter of the run to the end. Not a test: the
numbers depend on the machine and the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class RssRecorder(Callback):
    """Append ``{"step", "rss_mb", "epoch"}`` to ``path`` every ``every`` optimizer steps."""

    def __init__(self, path: str, every: int = 500) -> None:
        self.path = path
        self.every = every

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        import psutil

        if trainer.global_step % self.every == 0:
            rss = psutil.Process().memory_info().rss / 2**20
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                    "rss_mb": round(rss, 1)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args(argv)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="memory-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny_bert, corpus_words, write_experiment

    model = build_tiny_bert(work / "tiny_bert", corpus_words())
    exp = write_experiment(work / "soak.yaml", model, data={"batch_size": 8, "max_eval_samples": 32},
                           trainer={"max_epochs": -1, "max_steps": opts.steps, "log_every_n_steps": 50,
                                    "limit_val_batches": 2})
    series = work / "rss.jsonl"
    series.unlink(missing_ok=True)
    callback = json.dumps({"class_path": "experiments.memory_soak.RssRecorder",
                           "init_args": {"path": str(series), "every": opts.every}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TUNEFORGE_RUN_DIR"))}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TUNEFORGE_CACHE": env.get("TUNEFORGE_CACHE", str(work / "cache"))})
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(exp), "--output_dir",
                           str(work / "runs"), "--export", "false", "--test_after_fit", "false",
                           "--checkpoint.every_n_train_steps", "1000", f"--trainer.callbacks+={callback}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in series.read_text().splitlines()]
    for r in rows:
        print(f"step {r['step']:>6}  epoch {r['epoch']:>4}  RSS {r['rss_mb']:8.1f} MB")
    quarter = next(r for r in rows if r["step"] >= opts.steps // 4)
    print(f"{opts.steps} steps, {rows[-1]['epoch'] + 1} epochs in {time.time() - t0:.0f} s; RSS at step "
          f"{quarter['step']}: {quarter['rss_mb']:.1f} MB, at step {rows[-1]['step']}: {rows[-1]['rss_mb']:.1f} MB "
          f"(growth {rows[-1]['rss_mb'] - quarter['rss_mb']:+.1f} MB); min {min(r['rss_mb'] for r in rows):.1f}, "
          f"max {max(r['rss_mb'] for r in rows):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
