"""What a run prints: tuneforge's own lines and progress, not third-party chatter.

Each known-harmless message is silenced at its source, by exact text, never by a blanket filter: Lightning's
litlogger tip and a few routine notes, PyTorch's ``_pytree`` deprecation warning that Lightning triggers, W&B's
warnings about settings Lightning passes (``wandb.require('service')``, ``anonymous``) and its banner and footer
(``WANDB_QUIET``), transformers' weight-loading progress bar, and datasets' tokenising bar when the output is a
file. Warnings that are a run's own business stay.
``train.py --verbose_output true`` (or ``TUNEFORGE_VERBOSE=1``) brings everything back.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

# Lightning's informational lines that say nothing about this run
LIGHTNING_NOTES = (
    re.compile(r"^💡 Tip: For seamless cloud logging"),
    re.compile(r"^Loading `(train|val|test|predict)_dataloader` to estimate number of stepping batches"),
    re.compile(r"^TPU available: "),
    re.compile(r"^HPU available: "),
    # train.py adds the model summary itself (plain text when output is not a terminal)
    re.compile(r"^Trainer already configured with model summary callbacks"),
)
WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch._pytree, triggered inside Lightning
    # a data module without validation data returns no loader on purpose (SemEval-2010 Task 8 has no dev set)
    r"Total length of `list` across ranks is zero",
    # under bf16-mixed / 16-mixed the weights stay float32, so the summary's float32 size is the right one
    r"Precision .*-mixed is not supported by the model summary",
    # test / validate / predict --ckpt_path write into a run directory of their own, never the checkpoint's
    r"The dirpath has changed from .* therefore `best_model_score`",
)


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose_output`` / ``TUNEFORGE_VERBOSE=1``)."""
    return os.environ.get("TUNEFORGE_VERBOSE", "").lower() in ("1", "true", "yes")


class _DropNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip("\n")
        return not any(pattern.search(message) for pattern in LIGHTNING_NOTES)


_FILTER = _DropNotes()


def configure_terminal(verbose_output: bool) -> None:
    """Silence the known-harmless third-party messages for this process (and the DDP workers it starts)."""
    if verbose_output:
        os.environ["TUNEFORGE_VERBOSE"] = "1"
        return
    os.environ.setdefault("WANDB_QUIET", "true")  # W&B's banner and run-history footer; its warnings stay
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights: 100%" on every model load
    except ImportError:
        pass
    if not sys.stderr.isatty():
        # datasets' "Tokenising train: 40%|..." bar is carriage-return-joined redraws in a log file; the data module's
        # "Tokenised N train examples from FILE" line follows it anyway
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


def quiet_wandb_logger(logger: Any) -> None:
    """Stop W&B's warnings about what Lightning's ``WandbLogger`` passes: ``wandb.require('service')`` (a no-op
    since W&B 0.18) and ``anonymous=None`` (a setting W&B deprecated). Call before the run starts."""
    if verbose():
        return
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    import wandb

    require = wandb.require
    if not getattr(require, "_tuneforge", False):
        def quiet_require(requirement: Any = None, *args: Any, **kwargs: Any) -> Any:
            if requirement == "service":
                return None
            return require(requirement, *args, **kwargs)

        quiet_require._tuneforge = True  # type: ignore[attr-defined]
        wandb.require = quiet_require
