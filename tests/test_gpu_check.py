"""python -m experiments.gpu_check on the CPU with tiny models (the path a GPU run takes, at toy size): every planned run
is in the JSON, finished runs carry every number, and the presets' single-device runs finish. No speed is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from experiments import gpu_check

TRAIN_FIELDS = ("timed_steps", "seconds", "samples_per_s", "real_tokens_per_s", "padding_share", "model_tflops", "mfu",
                "optimizer_steps")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    threads, environ = torch.get_num_threads(), dict(os.environ)
    code = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--compile", "both",
                           "--compile_tasks", "classification", "--budget_s", "900", "--run_timeout_s", "300"])
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == environ  # DDP's LOCAL_RANK & co. would make later in-process runs share a run directory
    assert code in (0, 1)  # 1: some run failed; which one is checked below
    return json.loads(out.read_text())


def test_every_planned_run_is_reported(report: dict) -> None:
    planned = gpu_check.plan(list(gpu_check.TASKS), list(gpu_check.CONFIGS), "both", ["classification"])
    assert [(r["task"], r["config"], r["compile"]) for r in report["runs"]] == planned
    assert report["device_kind"] == "cpu" and report["peak_bf16_tflops"] is None
    assert set(report["packages"]) >= {"torch", "lightning", "transformers", "datasets", "wandb"}
    for run in report["runs"]:
        assert run["status"] in ("ok", "error", "skipped")
        if run["config"] == "fsdp":  # Lightning runs FSDP on GPUs only
            assert run["status"] == "skipped" and "GPU" in run["reason"]
        if run["status"] == "error":
            assert run["error"] and run["traceback"]


def test_finished_runs_carry_every_number(report: dict) -> None:
    for run in report["runs"]:
        if run["status"] != "ok":
            continue
        train = run["train"]
        for field in TRAIN_FIELDS:
            assert field in train, (run["task"], run["config"], field)
        assert train["timed_steps"] == report["steps"] and train["optimizer_steps"] == report["steps"] + report["warmup"]
        assert train["samples_per_s"] > 0 and train["real_tokens_per_s"] > 0 and 0 <= train["padding_share"] < 1
        assert train["mfu"] is None  # no peak for a CPU
        assert run["fit_peak_memory_gb"] > 0 and run["precision"] == "bf16-mixed"
        if run["task"] != "mfu_bert":
            assert run["test"] and run["test_peak_memory_gb"] > 0


def test_single_device_presets_finish(report: dict) -> None:
    """gpu.yaml for every task, compiled and not, finishes; so does ddp.yaml, except where the product has a known gap
    (the report names it; this test is about the check itself)."""
    runs = {(r["task"], r["config"], r["compile"]): r for r in report["runs"]}
    for task in gpu_check.TASKS:
        assert runs[(task, "gpu", False)]["status"] == "ok", runs[(task, "gpu", False)].get("error")
    assert runs[("classification", "gpu", True)]["status"] == "ok"
    for task in ("classification", "ner", "qa", "causal_lm"):
        assert runs[(task, "ddp", False)]["status"] == "ok", runs[(task, "ddp", False)].get("error")


def test_in_memory_features_without_datasets(tmp_path: Path) -> None:
    """--no_datasets: the data modules keep their features in memory (the path for a GPU machine without datasets)."""
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--no_datasets", "--compile", "off",
                           "--configs", "gpu", "--tasks", "classification,qa,seq2seq"])
    report = json.loads(out.read_text())
    assert code == 0, [r.get("error") for r in report["runs"]]
    assert report["features"].startswith("in memory")
    assert [r["status"] for r in report["runs"]] == ["ok"] * 3
