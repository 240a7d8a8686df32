"""Callbacks train.py adds to every run."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lit_modules.base import ConfigError


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` on the monitored metric, with two safeguards.

    Without validation data there is nothing to monitor: it then keeps the checkpoint of the last
    epoch and says so. A monitored metric the task never logs fails right after the sanity check
    (before any training) instead of at the end of the first epoch.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage == "fit" and self.monitor and dm is not None and hasattr(dm, "has_split") and not dm.has_split("validation"):
            rank_zero_info(f"No validation data: checkpointing the last epoch (nothing to compare {self.monitor} on)")
            self.monitor = None
        super().setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor and trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
            raise ConfigError(f"checkpoint.monitor: '{self.monitor}' is not logged by this task; val metrics: {logged}")
        super().on_validation_end(trainer, pl_module)


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

    @staticmethod
    def _now(trainer: Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start, self._epoch_samples, self._val_seconds = self._now(trainer), 0, 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self._epoch_samples += int(ids.shape[0]) if ids is not None else 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = self._now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += self._now(trainer) - self._val_start

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
