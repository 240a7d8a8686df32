"""The shared LightningModule: loading, train mode, optimizer groups, warmup sizing, parameter counts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from datamodules.text_classification import TextClassificationDataModule
from lit_modules.base import ConfigError, resolve_model_path
from lit_modules.text_classification import TextClassificationModule
from lit_modules.schema import connect
from tests.conftest import SENTIMENT


def test_model_is_in_train_mode_during_training(tiny_bert: Path, tmp_path: Path) -> None:
    seen: list[bool] = []

    class Probe(TextClassificationModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.extend(m.training for m in self.model.modules() if isinstance(m, torch.nn.Dropout))
            return super().training_step(batch, batch_idx)

    model = Probe(model_name_or_path=str(tiny_bert))
    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), batch_size=64,
                                      cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(model, dm)
    assert seen and all(seen)  # dropout active although from_pretrained returns an eval-mode model


def fit_and_capture(tiny_bert: Path, tmp_path: Path, **model_kwargs: Any) -> tuple[Any, Any, Trainer]:
    model = TextClassificationModule(model_name_or_path=str(tiny_bert), **model_kwargs)
    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), batch_size=32,
                                      cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    trainer = Trainer(max_epochs=2, accumulate_grad_batches=3, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    return model, trainer.lr_scheduler_configs[0].scheduler, trainer


def test_optimizer_groups_and_warmup_sized_from_real_steps(tiny_bert: Path, tmp_path: Path) -> None:
    model, scheduler, trainer = fit_and_capture(tiny_bert, tmp_path, learning_rate=1e-3, weight_decay=0.1,
                                                warmup_ratio=0.25)
    optimizer = trainer.optimizers[0]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert no_decay_names and all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert all(not (names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["fused"] is True  # every parameter is a CPU float tensor
    # N examples / 32 per batch, accumulating 3 batches per optimizer step, over 2 epochs
    batches = math.ceil(len((SENTIMENT / "train.jsonl").read_text().splitlines()) / 32)
    steps = 2 * math.ceil(batches / 3)
    assert trainer.global_step == steps
    total = scheduler.lr_lambdas[0].keywords["num_training_steps"]
    warmup = scheduler.lr_lambdas[0].keywords["num_warmup_steps"]
    assert (total, warmup) == (steps, math.ceil(0.25 * steps))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay reached 0 at the last step


def test_group_learning_rates(tiny_bert: Path, tmp_path: Path) -> None:
    """Parameters matching a pattern train at its rate (first matching pattern wins), under the same warmup."""
    rates = {"classifier": 1e-2, r"encoder\.layer\.0\.": 5e-3, "encoder": 1e-4}
    model, scheduler, trainer = fit_and_capture(tiny_bert, tmp_path, learning_rate=1e-3, weight_decay=0.1,
                                                group_learning_rates=rates, lr_scheduler_type="constant",
                                                warmup_steps=2)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"decay", "no_decay", *(f"{k}/{rates_name}" for rates_name in rates
                                                 for k in ("decay", "no_decay"))}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    for pattern, lr in [(None, 1e-3), *rates.items()]:
        for kind, decay in (("decay", 0.1), ("no_decay", 0.0)):
            group = groups[kind if pattern is None else f"{kind}/{pattern}"]
            assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == decay  # constant after warmup
            members = [names[id(p)] for p in group["params"]]
            assert members
            if pattern == "classifier":
                assert all("classifier" in n for n in members)
            elif pattern == "encoder":  # every encoder layer but layer 0, which the earlier pattern took
                assert all("encoder.layer." in n and "encoder.layer.0." not in n for n in members)
            elif pattern is not None:
                assert all("encoder.layer.0." in n for n in members)
            else:
                assert all("classifier" not in n and "encoder.layer." not in n for n in members)


def test_cosine_and_constant_schedules(tiny_bert: Path, tmp_path: Path) -> None:
    _, scheduler, _ = fit_and_capture(tiny_bert, tmp_path, lr_scheduler_type="constant", warmup_steps=2)
    assert scheduler.get_last_lr()[0] == pytest.approx(2e-5)
    assert [scheduler.lr_lambdas[0](s) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    _, scheduler, _ = fit_and_capture(tiny_bert, tmp_path, lr_scheduler_type="cosine")
    total = scheduler.lr_lambdas[0].keywords["num_training_steps"]
    assert scheduler.lr_lambdas[0](total / 2) == pytest.approx(0.5)  # half way down the cosine
    assert scheduler.lr_lambdas[0](total) == pytest.approx(0.0)


def test_parameter_counts_are_logged(tiny_bert: Path, tmp_path: Path) -> None:
    model, _, trainer = fit_and_capture(tiny_bert, tmp_path)
    import yaml

    logged = yaml.safe_load(Path(trainer.logger.log_dir, "hparams.yaml").read_text())
    total = sum(p.numel() for p in model.parameters())
    assert logged["params/total"] == total and logged["params/trainable"] == total


def test_labels_are_written_into_the_model_config(tiny_bert: Path, tmp_path: Path) -> None:
    model, _, _ = fit_and_capture(tiny_bert, tmp_path)
    assert model.model.config.id2label == {0: "negative", 1: "positive"}
    assert model.model.config.label2id == {"negative": 0, "positive": 1}
    assert model.hparams["labels"] == ["negative", "positive"]


def test_package_model_paths(tmp_path: Path) -> None:
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # hub ids pass through
    with pytest.raises(ConfigError, match=r"package 'no_such_pkg_xyz' is not installed \(pip install no-such-pkg-xyz\)"):
        resolve_model_path("pkg:no_such_pkg_xyz/model")
    with pytest.raises(ConfigError, match="has no folder 'nothing'"):
        resolve_model_path("pkg:datamodules/nothing")
    with pytest.raises(ConfigError, match=r"model.model_name_or_path: cannot load '.*empty' as a local folder"):
        (tmp_path / "empty").mkdir()
        TextClassificationModule(model_name_or_path=str(tmp_path / "empty"))


def test_trust_remote_code_is_off_by_default(tiny_bert: Path) -> None:
    model = TextClassificationModule(model_name_or_path=str(tiny_bert), labels=["a", "b"])
    assert model.trust_remote_code is False
    seen: dict[str, Any] = {}

    class Loader:
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> None:
            seen.update(kwargs)

    model.from_pretrained(Loader)
    assert seen["trust_remote_code"] is False


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_with_the_fused_optimizer(tiny_bert: Path, tmp_path: Path, precision: str) -> None:
    """Lightning's mixed-precision plugin refuses clipping with a fused optimizer; the module clips itself
    (no gradient scaler in bf16): every optimizer step sees a gradient norm within the limit."""
    from lightning.pytorch.callbacks import Callback

    norms: list[float] = []

    class GradNorm(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0]
            assert optimizer.defaults["fused"]
            params = [p for g in optimizer.param_groups for p in g["params"]]

            def record(*_: Any) -> None:
                grads = [p.grad.norm() for p in params if p.grad is not None]
                norms.append(float(torch.stack(grads).norm()))

            optimizer.register_step_post_hook(record)  # the step runs the closure: backward, then clipping

    model = TextClassificationModule(model_name_or_path=str(tiny_bert), learning_rate=1e-3)
    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), batch_size=32,
                                      cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    Trainer(max_steps=4, precision=precision, gradient_clip_val=0.01, callbacks=[GradNorm()], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path).fit(model, dm)
    assert len(norms) == 4 and max(norms) <= 0.01 * 1.001, norms


def test_throughput_leaves_validation_time_out(tiny_bert: Path, tmp_path: Path) -> None:
    """RunMetadata counts training time only: a validation that takes 1 s per epoch adds nothing to it."""
    import time

    from lightning.pytorch.callbacks import Callback

    from lit_modules.callbacks import RunMetadata

    class SlowValidation(Callback):
        seconds = 0.0

        def on_validation_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int,
                                      dataloader_idx: int = 0) -> None:
            if batch_idx == 0:
                time.sleep(1.0)
                self.seconds += 1.0

    model = TextClassificationModule(model_name_or_path=str(tiny_bert))
    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"),
                                      validation_file=str(SENTIMENT / "validation.jsonl"), max_eval_samples=8,
                                      batch_size=64, cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    meta, slow = RunMetadata(str(tmp_path)), SlowValidation()
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[slow, meta])
    start = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - start
    assert slow.seconds == 2.0
    assert meta.train_samples == 2 * len(dm.datasets["train"])
    assert 0 < meta.train_seconds < wall - slow.seconds  # both sleeps left out of the training time
