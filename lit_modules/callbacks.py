"""Callbacks train.py adds to every run."""

from __future__ import annotations

from typing import Any

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
    """Writes the run directory and the W&B run id into every checkpoint, so a resumed run continues both."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        wandb_id = None
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_id = logger.version
        checkpoint["tuneforge"] = {"run_dir": self.run_dir, "wandb_id": wandb_id}
