"""PEFT on every preset: what trains, what checkpoints hold, export, resume, and methods that do not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lit_modules.schema import connect
from tests.conftest import ROOT, SENTIMENT, results, run_train, write_experiment

PRESETS = ["lora", "adalora", "ia3", "prompt_tuning", "p_tuning"]


@pytest.fixture(scope="module")
def peft_runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("peft")
    exp = write_experiment(tmp / "exp.yaml", tiny_bert, data={"max_train_samples": 128}, trainer={"max_epochs": 2})
    runs = {}
    for preset in [*PRESETS, "full"]:
        args = ["fit", "--config", str(exp), "--output_dir", str(tmp / "runs"), "--run_name", preset]
        if preset != "full":
            args[3:3] = ["--config", str(ROOT / "configs" / "peft" / f"{preset}.yaml")]
        if preset == "lora":
            args += ["--model.export_merged", "true"]
        code, run_dir = run_train(args)
        assert code == 0, preset
        runs[preset] = run_dir
    runs["exp"] = exp
    return runs


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_only_its_parameters_and_the_head(peft_runs: dict[str, Path], preset: str) -> None:
    run_dir = peft_runs[preset]
    ckpt = torch.load(results(run_dir)["best_checkpoint"], map_location="cpu", weights_only=True)
    full = torch.load(results(peft_runs["full"])["best_checkpoint"], map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and len(keys) < len(full["state_dict"]) / 2  # adapters + head, not the frozen base
    assert any("classifier" in k for k in keys)  # the task head is trained and saved
    assert not any("word_embeddings.weight" == k.rsplit("model.", 1)[-1] for k in keys)
    n_saved = sum(v.numel() for v in ckpt["state_dict"].values())
    n_full = sum(v.numel() for v in full["state_dict"].values())
    assert n_saved < n_full / 4
    assert ckpt["hyper_parameters"]["peft"]["peft_type"] == preset.upper()
    # test from the checkpoint rebuilds the PEFT model and loads the adapter
    code, test_dir = run_train(["test", "--config", str(peft_runs["exp"]), "--ckpt_path",
                                results(run_dir)["best_checkpoint"], "--output_dir", str(run_dir.parent / "t")])
    assert code == 0
    assert results(test_dir)["test"]["test/accuracy"] == pytest.approx(results(run_dir)["test"]["test/accuracy"])


def test_lora_export_adapter_and_merged(peft_runs: dict[str, Path]) -> None:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    export = Path(results(peft_runs["lora"])["export"])
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(export).eval()
    merged_dir = export.with_name("export-merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tok = AutoTokenizer.from_pretrained(export)
    batch = tok(["a wonderful film", "cold food and rude staff"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(adapter(**batch).logits, merged(**batch).logits, atol=1e-5)
    out = pipeline("text-classification", model=str(merged_dir))("a wonderful film")
    assert out[0]["label"] in ("negative", "positive")


def test_lora_export_keeps_label_names(peft_runs: dict[str, Path], tmp_path: Path) -> None:
    """The adapter folder holds the base model's config (peft writes only the adapter), so the label names survive:
    AutoConfig reads them and experiments.explain predicts names, not LABEL_k."""
    from transformers import AutoConfig

    from experiments import explain

    export = Path(results(peft_runs["lora"])["export"])
    config = AutoConfig.from_pretrained(export)
    assert config.id2label == {0: "negative", 1: "positive"}
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a wonderful film", "label": "positive"}\n{"text": "rude staff", "label": "negative"}\n')
    assert explain.main(["--model", str(export), "--input", str(data), "--output", str(tmp_path / "out"),
                         "--n_steps", "8", "--no_progress"]) == 0
    rows = [yaml.safe_load(line) for line in (tmp_path / "out" / "explanations.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["positive", "negative"]
    assert {r["prediction"] for r in rows} <= {"negative", "positive"}
    assert set(rows[0]["probabilities"]) == {"negative", "positive"}


def test_adalora_ranks_shrink(tiny_bert: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from datamodules.text_classification import TextClassificationDataModule
    from lit_modules.peft_support import adalora_ranks
    from lit_modules.text_classification import TextClassificationModule

    model = TextClassificationModule(model_name_or_path=str(tiny_bert), learning_rate=1e-2, peft={
        "peft_type": "ADALORA", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 1})
    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), batch_size=16, max_train_samples=256,
                                      cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    config = model.model.peft_config["default"]
    assert config.total_step == trainer.global_step == 32  # sized from the real number of optimizer steps
    ranks = adalora_ranks(model.model)
    assert ranks and all(r <= 6 for r in ranks.values())
    # the final budget is target_r per layer on average: ranks were taken away and redistributed
    assert sum(ranks.values()) == 2 * len(ranks)
    assert min(ranks.values()) < 6


def test_lora_checkpoint_resumes_the_run(peft_runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt_path = results(peft_runs["lora"])["best_checkpoint"]
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    seen: dict[str, Any] = {}

    from lightning.pytorch import Callback

    import train

    class Probe(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in saved["state_dict"]}

    original = train.TuneforgeCLI.instantiate_trainer

    def with_probe(self: Any, **kwargs: Any) -> Any:
        trainer = original(self, **kwargs)
        trainer.callbacks.append(Probe())
        return trainer

    train.TuneforgeCLI.instantiate_trainer = with_probe
    try:
        code, run_dir = run_train(["fit", "--config", str(peft_runs["exp"]), "--config", str(ROOT / "configs/peft/lora.yaml"),
                                   "--ckpt_path", ckpt_path, "--trainer.max_epochs", "3", "--output_dir", str(tmp_path)])
    finally:
        train.TuneforgeCLI.instantiate_trainer = original
    assert code == 0
    assert seen["step"] == saved["global_step"] > 0
    for key, value in saved["state_dict"].items():
        assert torch.equal(seen["weights"][key], value), key


@pytest.mark.parametrize(
    "peft, pattern",
    [
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
         r"model\.peft: PREFIX_TUNING does not fit BertForSequenceClassification: Model does not support past key values"),
        ({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]},
         r"model\.peft: LORA does not fit .*; modules that can be targeted: .*query.*value"),
        ({"peft_type": "LORA", "rank": 8}, r"model\.peft\.rank: unknown option for LORA; accepted: .*lora_alpha.*\br\b"),
        ({"peft_type": "SUPERLORA"}, r"model\.peft\.peft_type: expected one of .*LORA"),
    ],
)
def test_methods_that_do_not_fit(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture, peft: dict, pattern: str) -> None:
    import re

    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, model={"peft": peft}, data={"max_train_samples": 32})
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.search(pattern, err), err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_prompt_learning_cannot_be_merged(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, model={"export_merged": True,
                           "peft": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}})
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert "model.export_merged: PROMPT_TUNING adds virtual tokens" in capsys.readouterr().err


def test_presets_are_valid_yaml_with_a_known_method() -> None:
    from lit_modules.peft_support import build_peft_config

    for path in sorted((ROOT / "configs" / "peft").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())["model"]["init_args"]["peft"]
        assert build_peft_config(spec, "SEQ_CLS") is not None, path
