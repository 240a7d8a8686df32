"""Reliability: exact resume after kills and preemption, atomic checkpoints, numerical and output faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules.base import LengthGroupedSampler, ResumableDataLoader, ShuffleSampler
from datamodules.text_classification import TextClassificationDataModule
from lit_modules.schema import connect
from lit_modules.text_classification import TextClassificationModule
from tests.conftest import ROOT, SENTIMENT, results, run_train, run_train_subprocess, write_experiment


# ---- A: exact resume -------------------------------------------------------------------------------

def _clean_env() -> dict[str, str]:
    """The environment without what an in-process run (or a DDP launch) of an earlier test left behind."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TUNEFORGE_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                     "WORLD_SIZE", "MASTER_", "NODE_RANK", "PL_"))}


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (Linux)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (entry / "cmdline").read_bytes() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def test_fault_injection_resume_is_exact(tmp_path: Path) -> None:
    """experiments/fault_injection.py: a SIGKILL and a SIGTERM mid-run, resumed; identical to an uninterrupted run."""
    env = _clean_env()
    proc = subprocess.run([sys.executable, "-m", "experiments.fault_injection", "--kills", "2", "--signals",
                           "SIGKILL,SIGTERM", "--epochs", "2", "--max_train_samples", "32", "--every", "2", "--seed", "1",
                           "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "kill 1: SIGKILL" in proc.stdout and "kill 2: SIGTERM" in proc.stdout
    assert "IDENTICAL after 2 kill(s)" in proc.stdout


def test_fault_injection_adalora_resume_is_exact(tmp_path: Path) -> None:
    """AdaLoRA: killed in the budget-reduction phase (step 5) and in the final phase (step 7, which re-applies the
    final rank pattern: a run that lost it crashes), resumed each time; identical to an uninterrupted run."""
    proc = subprocess.run([sys.executable, "-m", "experiments.fault_injection", "--peft", "adalora", "--kills", "2",
                           "--epochs", "2", "--max_train_samples", "32", "--every", "1", "--seed", "0",
                           "--workdir", str(tmp_path)], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "kill 1: SIGKILL at step 5" in proc.stdout and "kill 2: SIGKILL at step 7" in proc.stdout
    assert "IDENTICAL after 2 kill(s)" in proc.stdout


def test_fault_injection_ddp_resume_is_exact(tmp_path: Path) -> None:
    """2 processes (DDP over gloo): rank 0 SIGKILLed (rank 1 must not outlive it), then a SIGTERM to rank 1 alone
    (both stop at the same batch); resumed each time, identical to an uninterrupted 2-process run."""
    proc = subprocess.run([sys.executable, "-m", "experiments.fault_injection", "--trainer_config",
                           str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), "--kills", "2", "--signals",
                           "SIGKILL,SIGTERM", "--epochs", "2", "--max_train_samples", "64", "--every", "2", "--seed", "1",
                           "--workdir", str(tmp_path)], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reference run: 8 steps on 2 processes" in proc.stdout
    assert "kill 1: SIGKILL on rank 0 at step 3" in proc.stdout and "kill 2: SIGTERM on rank 1 at step 4" in proc.stdout
    assert "IDENTICAL after 2 kill(s)" in proc.stdout
    assert not _processes_mentioning(str(tmp_path))  # no rank of any launch is left running


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process groups from /proc (Linux)")
def test_fault_injection_kills_what_outlives_the_launcher(tmp_path: Path) -> None:
    """A launcher that exits while a process it started lives on (a DDP rank orphaned by its rank 0): killed."""
    from experiments.fault_injection import _end_group, _group_members

    marker = str(tmp_path / "orphan")
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                             f"'import time; time.sleep(600)', {marker!r}]); print('started', flush=True)"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "started"
    assert proc.wait(timeout=60) == 0
    assert _processes_mentioning(marker)  # the launcher is gone, its child is not
    assert _end_group(proc.pid, grace=0.5) == 1
    assert not _processes_mentioning(marker) and not _group_members(proc.pid)


class AdaLoraProbe(Callback):
    """Test probe: saves a checkpoint after optimizer step ``save_at``; copies the AdaLoRA rank allocator's
    statistics after step ``probe_at``."""

    def __init__(self, probe_at: int, save_at: int = -1, path: Path | None = None) -> None:
        self.probe_at, self.save_at, self.path = probe_at, save_at, path
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        from lit_modules.peft_support import ADALORA_STATISTICS, adalora_allocator

        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)
        if trainer.global_step == self.probe_at:
            allocator = adalora_allocator(pl_module.model)
            self.seen = {k: {n: t.clone() for n, t in getattr(allocator, k).items()} for k in ADALORA_STATISTICS}


def test_adalora_statistics_travel_with_the_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    """The rank allocator's importance statistics (outside the state dict) are saved and restored: the step after
    a resume updates them exactly as the uninterrupted run does (starting them from zero would not)."""
    from lightning.pytorch import Trainer, seed_everything

    from datamodules.text_classification import TextClassificationDataModule
    from lit_modules.callbacks import ResumeState

    def fit(probe: AdaLoraProbe, ckpt: Path | None = None) -> None:
        seed_everything(0, verbose=False)
        model = TextClassificationModule(model_name_or_path=str(tiny_bert), learning_rate=1e-2, peft={
            "peft_type": "ADALORA", "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1,
            "target_modules": ["query", "value"]})
        dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), batch_size=8, max_train_samples=32,
                                          cache_dir=str(tmp_path / "cache"))
        connect(model, dm)
        Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, callbacks=[ResumeState(), probe],
                ).fit(model, dm, ckpt_path=ckpt)

    ckpt = tmp_path / "step3.ckpt"
    whole = AdaLoraProbe(probe_at=4, save_at=3, path=ckpt)
    fit(whole)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["adalora"]
    assert saved["ipt"] and set(saved["ipt"]) == set(whole.seen["ipt"])  # one tensor per AdaLoRA parameter
    assert saved["rank_pattern"] and all(isinstance(b, bool) for bits in saved["rank_pattern"].values() for b in bits)
    resumed = AdaLoraProbe(probe_at=4)
    fit(resumed, ckpt)
    for key, tensors in whole.seen.items():
        for name, tensor in tensors.items():
            assert torch.equal(resumed.seen[key][name], tensor), (key, name)


def _batches(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("sampler", ["grouped", "shuffle"])
def test_training_loader_resumes_at_the_next_unseen_batch(sampler: str) -> None:
    lengths = np.random.default_rng(0).integers(5, 60, size=50)
    make = (lambda: LengthGroupedSampler(lengths, 4, mega_factor=2, seed=7)) if sampler == "grouped" else \
        (lambda: ShuffleSampler(50, seed=7))
    full = ResumableDataLoader(list(range(50)), batch_size=4, sampler=make())
    expected = _batches(full, epoch=1)
    assert expected != _batches(full, epoch=0)  # the order changes with the epoch

    first = ResumableDataLoader(list(range(50)), batch_size=4, sampler=make())
    first.sampler.set_epoch(1)
    seen = []
    for batch in first:
        seen.append(batch.tolist())
        if len(seen) == 5:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 5}

    resumed = ResumableDataLoader(list(range(50)), batch_size=4, sampler=make())
    resumed.load_state_dict(state)
    rest = _batches(resumed, epoch=1)
    assert seen + rest == expected
    assert len(resumed) == len(expected)  # the epoch keeps its length (Lightning counts the skipped batches)
    assert _batches(resumed, epoch=2) == _batches(full, epoch=2)  # the skip applies once
    # a state from another epoch (a checkpoint at an epoch end) skips nothing
    other = ResumableDataLoader(list(range(50)), batch_size=4, sampler=make())
    other.load_state_dict({"epoch": 0, "batches": 13})
    assert _batches(other, epoch=1) == expected


# ---- B: atomic checkpoints -------------------------------------------------------------------------

_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from lit_modules.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
i = 0
while True:
    i += 1
    io.save_checkpoint({{"state_dict": {{"w": torch.full((4_000_000,), float(i))}}, "i": i}}, {path!r})
    print(i, flush=True)
"""


def test_kill_during_save_never_leaves_a_truncated_checkpoint(tmp_path: Path) -> None:
    from lit_modules.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "i": 0}, path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # at least one full save happened
        time.sleep(float(rng.uniform(0.0, 0.2)))  # then die somewhere inside a later 16 MB save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = io.load_checkpoint(path)
        assert ckpt["state_dict"]["w"].shape == (4_000_000,)
        assert torch.all(ckpt["state_dict"]["w"] == float(ckpt["i"]))  # a complete earlier save, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) in (["last.ckpt"], [".last.ckpt.tmp", "last.ckpt"])


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_truncated_checkpoint_is_one_line_naming_the_file(subcommand: str, tiny_bert: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:1500])
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    code, _ = run_train([subcommand, "--config", str(exp), "--ckpt_path", str(bad), "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: ckpt_path: cannot read checkpoint {bad} (truncated or not a checkpoint?)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml"))


def test_checkpoints_load_with_weights_only(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"max_train_samples": 32})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false",
                               "--test_after_fit", "false", "--checkpoint.every_n_train_steps", "1",
                               "--trainer.limit_val_batches", "1"])
    assert code == 0
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # RNG and loader states are plain data
        assert {"rng_states", "loops", "state_dict"} <= set(state)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


# ---- C: numerical faults ---------------------------------------------------------------------------

class NaNLossAt(TextClassificationModule):
    """Test module: the training loss is NaN at the given optimizer steps, or the weights turn NaN after ``poison_at``."""

    def __init__(self, nan_steps: list[int] = (), poison_at: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.poison_at = poison_at

    def forward(self, **inputs: torch.Tensor) -> Any:
        out = super().forward(**inputs)
        if self.training and self.global_step in self.nan_steps:
            out.loss = out.loss * float("nan")
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.poison_at:
            with torch.no_grad():
                next(self.parameters()).fill_(float("inf"))


def _nan_experiment(tmp_path: Path, tiny_bert: Path, **model: Any) -> Path:
    exp = write_experiment(tmp_path / "nan.yaml", tiny_bert, data={"max_train_samples": 64, "batch_size": 16},
                           trainer={"max_epochs": 2, "log_every_n_steps": 1})
    text = exp.read_text().replace("lit_modules.text_classification.TextClassificationModule",
                                   "tests.test_reliability.NaNAtStep")
    exp.write_text(text)
    return exp


NaNAtStep = NaNLossAt


def test_nan_loss_stops_naming_step_and_batch(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = _nan_experiment(tmp_path, tiny_bert)
    code, run_dir = run_train(["fit", "--config", str(exp), "--model.nan_steps", "[5]", "--output_dir", str(tmp_path / "r"),
                               "--checkpoint.every_n_train_steps", "2"])
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: train/loss is nan at step 5 (epoch 1, batch 1; training examples ")
    assert "model.skip_nonfinite_loss" in line
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):  # what was saved before the bad batch is intact
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] <= 5 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_nan_loss_skipped_and_counted(tiny_bert: Path, tmp_path: Path) -> None:
    exp = _nan_experiment(tmp_path, tiny_bert)
    code, run_dir = run_train(["fit", "--config", str(exp), "--model.nan_steps", "[2, 6]", "--model.skip_nonfinite_loss",
                               "true", "--output_dir", str(tmp_path / "r"), "--export", "false"])
    assert code == 0
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    skipped = [float(r.split(",")[header.index("train/skipped_batches")]) for r in rows[1:]
               if r.split(",")[header.index("train/skipped_batches")]]
    assert sorted(set(skipped)) == [1.0, 2.0]
    state = torch.load(results(run_dir)["best_checkpoint"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 8  # Lightning counts a skipped batch's step (without gradients: no update)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_nonfinite_weights_never_overwrite_a_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    """Weights that turned Inf (all later losses NaN, skipped) are never saved; the earlier checkpoints stay."""
    exp = _nan_experiment(tmp_path, tiny_bert)
    code, run_dir = run_train(["fit", "--config", str(exp), "--model.poison_at", "3", "--model.skip_nonfinite_loss", "true",
                               "--checkpoint.every_n_train_steps", "1", "--output_dir", str(tmp_path / "r"),
                               "--export", "false", "--test_after_fit", "false"])
    assert code == 0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3  # saved at the end of step 3, before the weights turned Inf
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), ckpt.name


# ---- D: output faults ------------------------------------------------------------------------------

def test_unwritable_output_dir_stops_before_training(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(blocker / "runs")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: output_dir: {blocker} is a file, not a directory"

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: use a file system that refuses writes instead
        locked = Path("/proc/tuneforge-runs")
    else:
        locked.chmod(0o500)
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(locked)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: output_dir: cannot write to {locked} (")


def test_nearly_full_disk_stops_before_training(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                         "--min_free_disk_mb", str(10**12)])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: output_dir: only ") and "less than min_free_disk_mb=1000000000000" in line
    assert not (tmp_path / "runs").exists()


# ---- G: W&B --------------------------------------------------------------------------------------

class FinishWandbAt(Callback):
    """Test fault: the W&B run ends under the logger at ``step`` (as when its service dies); later logging raises."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.logger.experiment.finish()


def test_wandb_error_mid_run_never_stops_training(tiny_bert: Path, tmp_path: Path) -> None:
    import wandb

    with pytest.raises(wandb.errors.UsageError):  # the fault is real: a finished run refuses to log
        run = wandb.init(mode="offline", dir=str(tmp_path))
        run.finish()
        run.log({"x": 1})
    exp = write_experiment(tmp_path / "wb.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 64},
                           trainer={"max_epochs": 2, "log_every_n_steps": 1})
    callback = '{"class_path": "tests.test_reliability.FinishWandbAt", "init_args": {"step": 2}}'
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false",
                                 f"--trainer.callbacks+={callback}"], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WandbLogger.log_metrics failed (UsageError: Run" in proc.stderr
    assert "`Trainer.fit` stopped: `max_epochs=2` reached" in proc.stderr  # trained to the end
    res = results(next((tmp_path / "runs" / "wb").iterdir()))
    assert set(res["test"]) == {"test/loss", "test/accuracy", "test/f1", "test/mcc"}  # and tested


def test_api_key_with_unreachable_server_never_leaks(tiny_bert: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    key = "k3y" + "0123456789abcdef" * 2 + "zzzzz"
    env = {"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(home / ".config"),
           "WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    exp = write_experiment(tmp_path / "wb.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 32},
                           trainer={"max_steps": 2, "limit_val_batches": 1})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false",
                                 "--test_after_fit", "false"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: offline (the W&B server is not reachable)" in proc.stdout + proc.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if key.encode() in p.read_bytes()]
    assert not leaked
    assert key not in proc.stdout + proc.stderr


# ---- H: signals while the data are tokenised -------------------------------------------------------

class SlowTokenising(TextClassificationDataModule):
    """Test data module: once the cache's temporary file exists (``datasets`` creates it after the first batch of
    1000 rows), it lists the cache folder into ``$SLOW_TOKENISING_MARKER`` and tokenising each batch takes
    ``$SLOW_TOKENISING`` seconds, as for a large corpus."""

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        folder = self.cache_dir / self.task_name
        if any(p.name.startswith("tmp") for p in folder.iterdir()):
            marker = Path(os.environ["SLOW_TOKENISING_MARKER"])
            if not marker.exists():
                marker.write_text("\n".join(sorted(p.name for p in folder.iterdir())))
            time.sleep(float(os.environ.get("SLOW_TOKENISING", "0")))
        return super().encode(batch)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_while_tokenising_leaves_no_partial_cache(name: str, tiny_bert: Path, tmp_path: Path) -> None:
    """A real signal to train.py while its cache is half-written: one line, exit 128 + signal, the temporary file
    gone, no run directory; the same command then tokenises afresh and trains."""
    train = tmp_path / "train.jsonl"
    train.write_text((SENTIMENT / "train.jsonl").read_text() * 3)  # 1,500 rows: two tokenising batches
    cache, marker, runs = tmp_path / "cache", tmp_path / "marker", tmp_path / "runs"
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"train_file": str(train), "cache_dir": str(cache)},
                           trainer={"max_steps": 2, "limit_val_batches": 1})
    exp.write_text(exp.read_text().replace("datamodules.text_classification.TextClassificationDataModule",
                                           "tests.test_reliability.SlowTokenising"))
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(exp), "--output_dir", str(runs),
               "--export", "false", "--test_after_fit", "false", "--min_free_disk_mb", "0"]
    env = {**_clean_env(), "WANDB_MODE": "disabled", "SLOW_TOKENISING_MARKER": str(marker)}
    proc = subprocess.Popen(command, cwd=ROOT, env={**env, "SLOW_TOKENISING": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no marker"
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, name), err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: {name} while preparing the data: stopped, and no partly written "
                                            "tokenised cache was kept (the same command starts over)")
    assert any(n.startswith("tmp") for n in marker.read_text().split())  # the signal came while one was half-written
    assert list((cache / "text_classification").iterdir()) == []  # and it is gone
    assert not runs.exists() or not any(runs.rglob("*.*"))

    if name == "SIGTERM":  # the same command again: tokenised afresh (nothing partial to load), then trained
        marker.unlink()
        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "Tokenised 1500 train examples" in rerun.stdout + rerun.stderr
        files = sorted(p.name for p in (cache / "text_classification").iterdir())
        assert [f.split("-")[0] for f in files] == ["train", "validation"]


def test_overwrite_cache_tokenises_again(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    def prepared(overwrite: bool) -> Path:
        dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), cache_dir=str(tmp_path),
                                          overwrite_cache=overwrite)
        dm.connect(AutoTokenizer.from_pretrained(tiny_bert))
        dm.prepare_data()
        return dm._cache_path("train")

    path = prepared(False)
    first = path.stat().st_ino, path.stat().st_mtime_ns
    assert prepared(False).stat().st_ino == first[0]  # reused
    prepared(True)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) != first  # a new file in its place
