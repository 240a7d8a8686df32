"""A callback for tests that interrupt training from outside (``trainer.callbacks`` in a subprocess's experiment file):
it prints one line when step ``at`` starts, so a test knows training is under way without guessing from the clock,
and from then on waits ``delay`` seconds before each batch, so that training cannot end before the signal lands
however fast the machine is."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

LINE = "step-signal: training is under way"


class StepSignal(Callback):
    def __init__(self, at: int = 3, delay: float = 0.02) -> None:
        self.at, self.delay = at, delay

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            print(LINE, flush=True)
            sys.stdout.flush()
        if trainer.global_step >= self.at:
            time.sleep(self.delay)
