"""Callbacks train.py adds to every run, and the predictions writer."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_modules.atomic_files import write_text_atomic
from lit_modules.errors import ConfigError


def validation_follows(trainer: Trainer) -> bool:
    """Whether Lightning validates right after the training batch that is ending now.

    A checkpoint written at such a batch end resumes past that validation (Lightning counts it as done),
    so resumable checkpoints are written after the validation instead.
    """
    loop = trainer.fit_loop.epoch_loop
    try:  # Lightning's own decision (private API; the fallback is the end of the epoch)
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return bool(loop.batch_progress.is_last_batch)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` on the monitored metric, with two safeguards and resumable step checkpoints.

    Without validation data there is nothing to monitor: it then keeps the checkpoint of the last
    epoch and says so. A monitored metric the task never logs fails right after the sanity check
    (before any training) instead of at the end of the first epoch.

    ``every_n_train_steps: N`` writes ``last.ckpt`` every N optimizer steps (and at every validation), for
    ``fit --ckpt_path last`` to resume from; the best checkpoint is still chosen at validation only (plain
    ``ModelCheckpoint`` would compare stale validation scores every N steps instead).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_interval = self._every_n_train_steps
        if self.step_interval:
            self._every_n_train_steps = 0
            self._every_n_epochs = kwargs.get("every_n_epochs") or 1
            self.save_last = self.save_last or True
        self._last_step_checkpoint = -1
        self._module: Optional[LightningModule] = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if (not self.step_interval or step % self.step_interval or step == self._last_step_checkpoint
                or self._should_skip_saving_checkpoint(trainer) or validation_follows(trainer)):
            return  # (before a validation: last.ckpt is written at its end)
        saved_before = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_step_checkpoint = step
        self._last_global_step_saved = saved_before  # a validation at this very step still saves the best

    # weights gone NaN / Inf (an overflow, a bad batch) must never replace a good checkpoint, nor become "best"
    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self._weights_not_finite(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self._weights_not_finite(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _weights_not_finite(self, trainer: Trainer) -> bool:
        module = self._module if self._module is not None else trainer.strategy.lightning_module
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            rank_zero_warn(f"Not saving a checkpoint at step {trainer.global_step}: parameters are not finite"
                           + (f" ({bad[0]}{' and more' if len(bad) > 1 else ''})" if bad else ""))
            return True
        return False


    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module
        super().setup(trainer, pl_module, stage)

    def without_validation(self) -> None:
        """There is no validation data (train.py knows): keep the last epoch's checkpoint instead of the best."""
        if self.monitor:
            rank_zero_info(f"No validation data: checkpointing the last epoch (nothing to compare {self.monitor} on)")
            self.monitor = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor and trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
            raise ConfigError(f"checkpoint.monitor: '{self.monitor}' is not logged by this task; val metrics: {logged}")
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_resume_point(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_resume_point(trainer)

    def _save_resume_point(self, trainer: Trainer) -> None:
        """With step checkpoints, ``last.ckpt`` after every validation / epoch (Lightning writes it only when
        the top-k changed)."""
        if self.step_interval and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def examples_in(batch: Any) -> int:
    """How many examples a training batch holds: its rows, or for a padding-free batch (one row of examples end to
    end, ``position_ids`` restarting at 0 for each, no attention mask) the number of restarts."""
    if not isinstance(batch, dict) or batch.get("input_ids") is None:
        return 0
    positions = batch.get("position_ids")
    if positions is not None and batch.get("attention_mask") is None:
        return int((positions == 0).sum())
    return int(batch["input_ids"].shape[0])


class RunMetadata(Callback):
    """Writes the run directory and the W&B run id into every checkpoint, so a resumed run continues both,
    and measures training throughput: examples per second of training time (validation excluded, all
    processes together), logged as ``train/samples_per_sec`` every epoch and put into results.json."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.train_seconds = 0.0
        self.train_samples = 0
        self._epoch_start = self._val_start = 0.0
        self._epoch_samples = 0
        self._val_seconds = 0.0
        self.validation_history: list[dict[str, Any]] = []  # one row per validation while fitting (model card)

    @staticmethod
    def _now(trainer: Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _start_counting(self, trainer: Trainer) -> None:
        self._epoch_start, self._epoch_samples, self._val_seconds = self._now(trainer), 0, 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_counting(trainer)  # a run resumed mid-epoch gets no epoch-start hook first

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_counting(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._epoch_samples += examples_in(batch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = self._now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += self._now(trainer) - self._val_start
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
            row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
            self.validation_history.append(row)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = self._now(trainer) - self._epoch_start - self._val_seconds
        samples = self._epoch_samples * trainer.world_size
        if samples and seconds > 0:
            self.train_seconds += seconds
            self.train_samples += samples
            pl_module.log("train/samples_per_sec", samples / seconds, rank_zero_only=True)

    @property
    def samples_per_second(self) -> Optional[float]:
        return self.train_samples / self.train_seconds if self.train_seconds else None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        wandb_id = None
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_id = logger.version
        checkpoint["tuneforge"] = {"run_dir": self.run_dir, "wandb_id": wandb_id}


class ResumeState(Callback):
    """What Lightning does not restore for an exact mid-epoch resume: the random number generators and the
    training loader's place in the epoch.

    The generators (torch, CUDA, numpy, random) are saved with every checkpoint and put back right before
    the first training batch of a resumed run: loading a checkpoint, building data loaders and the sanity
    check happen in a different order in a resumed run than at the same point of an uninterrupted one, and
    the state at the next training step is what has to match (dropout masks, sampling in the model). Under
    DDP each process's generators are kept and each process gets its own back (resumed with another number of
    processes, all get rank 0's).

    Lightning saves the state of a stateful training loader (``ResumableDataLoader``) in the checkpoint but
    restores it only when it builds the loader after loading the checkpoint; a module whose
    ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (ours do, to size the schedule)
    builds it before, and the state would be dropped. It is handed to the loader at ``on_train_start``,
    before the first batch is drawn.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None
        self._loader_states: list[dict[str, Any]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        states, self._loader_states = self._loader_states, []
        if not states:
            return
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else \
            list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        stateful = [dl for dl in loaders if hasattr(dl, "load_state_dict") and hasattr(dl, "state_dict")]
        if len(stateful) == len(states):
            for loader, state in zip(stateful, states):
                loader.load_state_dict(state)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # plain tensors and ints only, so checkpoints still load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, gauss_py = random.getstate()
        states = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "state": list(state), "gauss": gauss_py},
        }
        checkpoint["rng_states"] = states
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # every process has drawn differently (its own batches' shapes set how much dropout draws): keep each
            # one's generators; every process builds the checkpoint, rank 0 writes it
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {**states, "cuda": [s.cpu() for s in states["cuda"]]})
            checkpoint["rng_states_per_rank"] = gathered

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("rng_states_per_rank") or []
        if len(per_rank) == trainer.world_size and trainer.world_size > 1:
            self._pending = per_rank[trainer.global_rank]
        else:  # one process, or not as many as when saved (the data order differs then anyway)
            self._pending = checkpoint.get("rng_states")
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        torch.set_rng_state(states["torch"].cpu())
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
        n = states["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = states["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class Stopped(SIGTERMException):
    """Training stopped by a signal after saving ``last.ckpt`` (``checkpoint``); ``signum`` says which signal."""

    def __init__(self, signum: Optional[int], checkpoint: Path, step: int) -> None:
        super().__init__()
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


class Preemption(Callback):
    """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) stop training after the running batch, with ``last.ckpt`` saved for
    ``--ckpt_path last``; a second Ctrl-C stops at once.

    The checkpoint is written at the end of a training batch that no validation follows (the same place
    step checkpoints are written; when one follows, after the next batch), so the resumed run continues
    exactly (Lightning's own SIGTERM handling may stop in the middle of a validation, from which a run does
    not resume exactly; its Ctrl-C handling saves nothing). All processes stop at the same batch. Then
    :class:`Stopped` ends ``fit`` and train.py prints the resume command and exits with 0 (SIGTERM, SIGUSR1:
    the scheduler asked) or 130 (Ctrl-C). Under SLURM with auto-requeue Lightning's handlers stay in charge
    (an HPC checkpoint and ``scontrol requeue``).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    ctrl_c = False  # a Ctrl-C arrived during training (train.py's exit code says so)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning registered its handlers (they run between on_fit_start and on_train_start)
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                return

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            Preemption.ctrl_c = True
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: stop now, save nothing more
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        if signum == signal.SIGINT:
            rank_zero_info("Ctrl-C: stopping after this batch and saving last.ckpt (Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False) \
                or validation_follows(trainer):
            return
        ckpt = trainer.checkpoint_callback
        dirpath = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        if isinstance(ckpt, ModelCheckpoint):
            ckpt.last_model_path = str(path)
        raise Stopped(self.received, path, trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training reached its end: a ``last.ckpt`` left by an earlier interruption now holds the final state, so
        that ``--ckpt_path last`` never goes back to the step the run was once stopped at."""
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not ckpt.dirpath or getattr(ckpt, "save_last", False):
            return  # no checkpoints, or ModelCheckpoint keeps last.ckpt itself
        path = Path(ckpt.dirpath) / "last.ckpt"
        if trainer.strategy.broadcast(path.is_file()):
            trainer.save_checkpoint(path)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


class PredictionsWriter(BasePredictionWriter):
    """Writes ``predict``'s output: one JSONL file in input order (and any extra files the task adds, e.g. QA's
    official ``predictions.json``), complete under DDP (every process's rows are gathered on rank 0), written
    atomically (a temporary file, then a rename).

    The rows come from the module's ``predict_step``; ``pl_module.finalize_predictions`` puts them in input
    order, attaches the input fields and merges per-feature rows, ``pl_module.prediction_files`` adds files.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)
        if self.path.suffix == ".json":  # the official QA file takes the .json name; the rows are JSON Lines
            self.path = self.path.with_suffix(".jsonl")
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Optional[Sequence[Any]]) -> None:
        schema = getattr(pl_module, "schema", None)
        names = (schema.eval_sets.get("predict") if schema is not None else None) or []
        # one dataloader: its batch outputs (each a list of rows); several named predict sets: one list per set
        loaders = [list(loader) for loader in predictions] if names else [list(predictions)]
        self.written = []
        for i, batches in enumerate(loaders):
            rows = [row for batch in batches for row in (batch or [])]
            if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, rows)
                rows = [row for part in gathered for row in part]
            if not trainer.is_global_zero:
                continue
            split = f"predict/{names[i]}" if names else "predict"
            path = self.path.with_name(f"{self.path.stem}.{names[i]}{self.path.suffix}") if names else self.path
            out = pl_module.finalize_predictions(rows, split)
            write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out))
            self.written.append(path)
            for suffix, text in pl_module.prediction_files(out).items():
                self.written.append(write_text_atomic(path.with_suffix(suffix), text))
            rank_zero_info(f"Wrote {len(out)} predictions to {path}")


class PlainProgressBar(ProgressBar):
    """Progress as whole lines, for output that goes to a file or a CI log (where tqdm's carriage returns pile up
    into one unreadable line): a line every ``every_percent`` of an epoch and at its end, with the step, the
    speed and the progress-bar metrics; one line per validation with its metrics."""

    def __init__(self, every_percent: int = 10) -> None:
        super().__init__()
        self.every = max(1, min(100, every_percent))
        self._enabled = True
        self._next = 0
        self._start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, flush=True)

    def _metrics(self, trainer: Trainer, pl_module: LightningModule, prefix: str) -> str:
        items = self.get_metrics(trainer, pl_module)
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items()
                 if k.startswith(prefix) and k != "v_num"]
        return ", ".join(shown)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._next, self._start = self.every, time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = self.total_train_batches
        if not isinstance(total, int) or total <= 0:
            return
        done = batch_idx + 1
        percent = 100 * done // total
        if percent < self._next and done != total:
            return
        while self._next <= percent:
            self._next += self.every
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._print(f"epoch {trainer.current_epoch + 1}{epochs}  batch {done}/{total} ({percent}%)  "
                    f"{rate:.2f} batches/s  {self._metrics(trainer, pl_module, 'train/')}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._print(f"validation: {self._metrics(trainer, pl_module, 'val/')}")


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal that can show Rich's live output (not a file, a pipe, CI or TERM=dumb)."""
    isatty = getattr(stream, "isatty", None)
    return isatty is not None and isatty() and os.environ.get("TERM", "") != "dumb"


def progress_bar_for(stream: Any) -> ProgressBar:
    """Rich's progress bar in a terminal; whole lines (:class:`PlainProgressBar`) when output goes to a file or CI."""
    if is_terminal(stream):
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(leave=True)
    return PlainProgressBar()


class PredictionTables(Callback):
    """``--log_predictions N``: at every validation (and test), a W&B Table of the first N examples of each
    evaluation set (input, gold, prediction, score; per task: entity spans, answer texts, generated text), and the
    task's plots (a confusion matrix for single-label classification), so errors can be paged through in the
    dashboard. Offline runs keep them in their folder (``experiments compare --table`` prints the last one).

    The rows come from the module (:meth:`evaluation_rows` while evaluating, :meth:`evaluation_table` at the end),
    are gathered from every process and kept in example order; only W&B loggers receive them.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def _start(self, pl_module: LightningModule) -> None:
        pl_module.table_rows, pl_module.table_limit = {}, self.n

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        collected, pl_module.table_rows = pl_module.table_rows or {}, None
        for key in pl_module.stage_keys(stage):
            rows = collected.get(key, [])
            if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, rows)
                rows = [row for part in gathered for row in part]
            rows = sorted({row["idx"]: row for row in rows}.values(), key=lambda row: row["idx"])
            rows = pl_module.evaluation_table(key, rows)[: self.n]
            plots = pl_module.evaluation_plots(key)  # on every process: it may sync metric states
            if trainer.sanity_checking or not trainer.is_global_zero:
                continue
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    _log_wandb(logger, key, rows, plots, trainer.global_step)


def _cell(value: Any) -> Any:
    """A table cell W&B shows as it is: numbers and text; lists and dicts as compact JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _log_wandb(logger: Any, key: str, rows: list[dict[str, Any]], plots: dict[str, Any], step: int) -> None:
    import wandb

    payload: dict[str, Any] = {}
    if rows:
        columns = list(dict.fromkeys(c for row in rows for c in row))
        payload[f"{key}/predictions"] = wandb.Table(columns=columns,
                                                    data=[[_cell(row.get(c)) for c in columns] for row in rows])
    if "confusion_matrix" in plots:
        names, matrix = plots["confusion_matrix"]
        y_true = [i for i, counts in enumerate(matrix) for j, n in enumerate(counts) for _ in range(int(n))]
        preds = [j for counts in matrix for j, n in enumerate(counts) for _ in range(int(n))]
        if y_true:
            payload[f"{key}/confusion_matrix"] = wandb.plot.confusion_matrix(y_true=y_true, preds=preds,
                                                                               class_names=list(names))
    if payload:
        logger.experiment.log({**payload, "trainer/global_step": step})
