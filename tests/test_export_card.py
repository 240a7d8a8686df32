"""Every export carries a Hugging Face model card built from the run (issue #19, item 1), and --push_to_hub fails
fast, before training, where it cannot work."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import results, run_train, run_train_subprocess, write_experiment


def test_fit_writes_a_model_card_that_loads_with_its_metadata(tmp_path: Path, tiny_bert: Path) -> None:
    from huggingface_hub import ModelCard

    exp = write_experiment(tmp_path / "card.yaml", tiny_bert, trainer={"max_epochs": 2},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    res = results(run_dir)
    card = ModelCard.load(Path(res["export"]) / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-classification" and data["library_name"] == "transformers"
    assert "tuneforge" in data["tags"]
    results_ = data["model-index"][0]["results"]
    logged = {m["type"]: m["value"] for r in results_ for m in r["metrics"]}
    assert logged["accuracy"] == round(res["test"]["test/accuracy"], 4) or \
        abs(logged["accuracy"] - res["test"]["test/accuracy"]) < 1e-4
    text = card.text
    assert "train.py fit --config" in text  # the command that reproduces the run
    table = [line for line in text.splitlines() if re.match(r"^\|\s*\d+\s*\|", line)]
    assert len(table) == 2  # one validation row per epoch


def test_push_to_hub_fails_before_training_where_it_cannot_work(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    out = tmp_path / "runs"
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(out), "--push_to_hub", "me/my-model"],
                                env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: push_to_hub")
    assert not out.exists() or not any(out.rglob("*.ckpt"))
