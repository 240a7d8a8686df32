"""Knowledge distillation as a training option (issue #18): a teacher's soft targets, cached, mixed with the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from datamodules.text_classification import TextClassificationDataModule
from lit_modules.distillation import distillation_loss
from lit_modules.schema import connect
from lit_modules.text_classification import TextClassificationModule
from tests.conftest import SENTIMENT, results, run_train, run_train_subprocess, write_experiment


@pytest.fixture(scope="module")
def teacher(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("teacher")
    # the quickstart sentences with a marker word in front of each (its class's), so that a tiny random BERT learns
    # the task within seconds and the teacher has something worth passing on
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (SENTIMENT / f"{split}.jsonl").read_text().splitlines()]
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(
            {**r, "text": ("enjoyed " if r["label"] == "positive" else "not ") + r["text"]}) + "\n" for r in rows))
    exp = write_experiment(tmp / "teacher.yaml", tiny_bert, trainer={"max_epochs": 6}, model={"learning_rate": 3e-3},
                           data={f"{s}_file": str(tmp / f"{s}.jsonl") for s in ("train", "validation", "test")},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "results": results(run_dir), "tmp": tmp}


def test_training_loss_is_the_distillation_loss_and_teacher_logits_are_computed_once(teacher: dict, tiny_bert: Path,
                                                                                     tmp_path: Path) -> None:
    export = teacher["results"]["export"]
    model = TextClassificationModule(model_name_or_path=str(tiny_bert), teacher=export, distill_temperature=3.0,
                                     distill_alpha=0.7, learning_rate=1e-3)
    data = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), max_train_samples=48,
                                        batch_size=16, max_seq_length=32, cache_dir=str(tmp_path / "cache"))
    connect(model, data)
    calls: list[int] = []
    seen: dict[str, torch.Tensor] = {}

    per_epoch: list[int] = []

    class Count(Callback):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: object) -> None:
            per_epoch.append(len(calls))

    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                      callbacks=[Count()])
    original = TextClassificationModule.training_loss

    def checked(self: TextClassificationModule, outputs: object, batch: dict) -> torch.Tensor:
        loss = original(self, outputs, batch)
        if not calls:
            self.teacher.register_forward_hook(lambda *_: calls.append(1))
        teacher_logits = torch.stack([self._teacher_cache[i] for i in batch["idx"].tolist()])
        expected = distillation_loss(outputs.logits, teacher_logits, batch["labels"], 3.0, 0.7)
        seen["max_diff"] = torch.maximum(seen.get("max_diff", torch.tensor(0.0)), (loss - expected).abs().detach())
        return loss

    TextClassificationModule.training_loss = checked  # type: ignore[method-assign]
    try:
        trainer.fit(model, data)
    finally:
        TextClassificationModule.training_loss = original  # type: ignore[method-assign]
    assert float(seen["max_diff"]) < 1e-6  # the loss is Hinton et al.'s mix, with the cached teacher logits
    assert len(model._teacher_cache) == 48  # one entry per training example
    assert per_epoch[0] > 0 and per_epoch[1] == per_epoch[0]  # the second epoch ran the teacher no more
    assert "_teacher" not in dict(model.named_modules()) and not any("teacher" in k for k in model.state_dict())


def test_a_smaller_student_learns_from_the_teacher_from_the_command_line(teacher: dict, tmp_path: Path) -> None:
    export = teacher["results"]["export"]
    code, run_dir = run_train(["fit", "--config", str(teacher["exp"]), "--output_dir", str(tmp_path / "runs"),
                               "--model.teacher", export, "--model.distill_alpha", "1.0",
                               "--model.model_kwargs", "{num_hidden_layers: 1}", "--trainer.max_epochs", "4"])
    assert code == 0
    student = results(run_dir)
    config = json.loads((Path(student["export"]) / "config.json").read_text())
    assert config["num_hidden_layers"] == 1  # half the teacher's layers
    # pure distillation (no labels): the student still scores well above chance against the gold labels
    assert student["test"]["test/accuracy"] >= 0.6, (student["test"], teacher["results"]["test"])


def test_a_teacher_with_other_labels_is_refused(teacher: dict, tiny_bert: Path, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (SENTIMENT / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["label"] = {"negative": "bad", "positive": "good"}[r["label"]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"train_file": str(train), "validation_file": None,
                                                                   "test_file": None})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--model.teacher", teacher["results"]["export"]])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: model.teacher: its labels ['negative', 'positive'] are not the student's ['bad', 'good']" in proc.stderr
