"""What a new user runs into (issue #14): silent or ugly failures turned into one line, Ctrl-C that keeps the
work, valid-but-unusual input that simply works, and a terminal that shows tuneforge's own lines last."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.step_signal import LINE as STEP_SIGNAL
from tests.conftest import ROOT, SENTIMENT, results, run_train, run_train_subprocess, write_experiment


def one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, and stderr's last line is ``error: ...`` matching ``pattern`` with no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(pattern, last), last


def no_run_left(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))[:5]


# ---- 1. mixed label spellings --------------------------------------------------------------------------

def test_mixed_label_spellings_stop_before_training(tmp_path: Path, tiny_bert: Path) -> None:
    rows = [json.loads(line) for line in (SENTIMENT / "train.jsonl").read_text().splitlines()[:40]]
    for row in rows[:20]:  # half the file spells the classes as ids
        row["label"] = "1" if row["label"] == "positive" else "0"
    train = tmp_path / "mixed.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"train_file": str(train)})
    out = tmp_path / "runs"
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(out)])
    one_line_error(proc, r"error: .*mixed\.jsonl: labels mix two spellings: 20 class ids / numbers like '\d' \(first "
                         r"at line 1\) and 20 names like '\w+' \(first at line 21\)")
    no_run_left(out)


# ---- 2. lengths the model cannot take ----------------------------------------------------------------

def test_max_seq_length_above_the_models_positions_stops_before_anything(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    out = tmp_path / "runs"
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(out), "--data.max_seq_length", "100000"])
    one_line_error(proc, r"error: data\.max_seq_length: 100000 is more than .*tiny_bert.* takes \(512 positions\); "
                         r"set at most 512")
    no_run_left(out)


def test_seq2seq_length_options_are_checked_too(tmp_path: Path, tiny_bert: Path, tiny_llama: Path) -> None:
    from tests.test_seq2seq import write_experiment as seq2seq_experiment

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps({"document": "alpha beta", "summary": "alpha"}) + "\n")
    out = tmp_path / "runs"
    b2b = seq2seq_experiment(tmp_path / "b2b.yaml", tiny_bert, data, model={"architecture": "encoder_decoder"})
    proc = run_train_subprocess(["fit", "--config", str(b2b), "--output_dir", str(out),
                                 "--data.max_source_length", "600"])
    one_line_error(proc, r"error: data\.max_source_length: 600 is more than .* takes \(512 positions\)")
    llama = seq2seq_experiment(tmp_path / "llama.yaml", tiny_llama, data)
    proc = run_train_subprocess(["fit", "--config", str(llama), "--output_dir", str(out),
                                 "--data.max_source_length", "400", "--data.max_target_length", "200"])
    one_line_error(proc, r"error: data\.max_source_length \+ data\.max_target_length: 400 \+ 200 = 600 is more than .* "
                         r"takes \(512 positions, prompt and target in one sequence\)")
    no_run_left(out)


# ---- 3. a checkpoint of another task ---------------------------------------------------------------------

def test_a_checkpoint_of_another_task_is_refused_in_one_line(tmp_path: Path, tiny_bert: Path) -> None:
    from tests.test_token_classification import make_sentences, write_conll

    exp = write_experiment(tmp_path / "cls.yaml", tiny_bert)
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    cls_ckpt = results(run_dir)["best_checkpoint"]
    conll = write_conll(tmp_path / "ner.conll", make_sentences(8, seed=1))
    ner = ["--model", "lit_modules.token_classification.TokenClassificationModule",
           "--model.model_name_or_path", str(tiny_bert),
           "--data", "datamodules.token_classification.TokenClassificationDataModule", "--data.test_file", str(conll)]
    out = tmp_path / "eval"
    proc = run_train_subprocess(["test", *ner, "--ckpt_path", cls_ckpt, "--output_dir", str(out)])
    one_line_error(proc, r"error: ckpt_path: the checkpoint holds a text classification model "
                         r"\(lit_modules\.text_classification\.TextClassificationModule\), not a token classification "
                         r"model \(lit_modules\.token_classification\.TokenClassificationModule\)")
    # the reverse: an NER checkpoint given to text classification
    code, ner_dir = run_train(["fit", *ner, "--data.train_file", str(conll), "--data.test_file", str(conll),
                               "--output_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
                               "--trainer.logger", "false"])
    assert code == 0
    proc = run_train_subprocess(["test", "--config", str(exp), "--ckpt_path", results(ner_dir)["best_checkpoint"],
                                 "--output_dir", str(out)])
    one_line_error(proc, r"error: ckpt_path: the checkpoint holds a token classification model .* not a text "
                         r"classification model")
    no_run_left(out)


def test_model_and_data_of_different_tasks_are_refused(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--model", "lit_modules.question_answering.QuestionAnsweringModule",
                                 "--model.model_name_or_path", str(tiny_bert)])
    one_line_error(proc, r"error: model QuestionAnsweringModule does question answering but data "
                         r"TextClassificationDataModule holds text classification data")


# ---- 4. Ctrl-C keeps the work ----------------------------------------------------------------------

def test_ctrl_c_saves_last_ckpt_prints_the_resume_command_and_resume_works(tmp_path: Path, tiny_bert: Path) -> None:
    """SIGINT during training: the running batch ends, last.ckpt is saved, the resume command is printed, exit 130;
    that command (default settings, W&B offline) continues the run to the end."""
    train = tmp_path / "train.jsonl.gz"  # (a compressed training file, read as its text)
    with gzip.open(train, "wt", encoding="utf-8") as f:
        f.write((SENTIMENT / "train.jsonl").read_text() * 2)
    callbacks = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                 {"class_path": "tests.step_signal.StepSignal", "init_args": {"at": 3}}]  # says when step 3 starts
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, logger="wandb",
                           data={"train_file": str(train), "batch_size": 8},
                           trainer={"max_epochs": 2, "enable_progress_bar": False, "callbacks": callbacks})
    args = ["fit", "--config", str(exp), "--output_dir", "runs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "TUNEFORGE_RUN_DIR"))}
    env["PYTHONPATH"] = str(ROOT)  # for tests.step_signal
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:  # wait until training runs
        lines.append(line)
        if line.startswith(STEP_SIGNAL):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    output = "".join(lines) + out
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    last = sorted((tmp_path / "runs" / "exp").glob("*/checkpoints/last.ckpt"))
    assert len(last) == 1, output[-2000:]
    resume = re.search(r"Continue with:\s+(python train\.py .*)", output)
    assert resume and resume.group(1).endswith("--ckpt_path last"), output[-2000:]
    assert re.search(r"Stopped by SIGINT at step \d+\. Saved runs/exp/[^/]+/checkpoints/last\.ckpt", output)
    command = resume.group(1).split()
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), *command[2:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads((last[0].parents[1] / "results.json").read_text())
    assert "test/accuracy" in res["test"]  # the resumed run went on to its test
    import torch

    # it continued to the end of the schedule (1,000 sentences / batch 8 x 2 epochs), not restarted or cut short
    assert torch.load(last[0], map_location="cpu", weights_only=False)["global_step"] == 250
    # the resumed run's summary names both offline W&B folders in its sync command, with relative paths
    sync = re.search(r"W&B run:\s+(\S+) \(offline; upload later with: wandb sync (.*)\)", again.stdout)
    assert sync and len(sync.group(2).split()) == 2, again.stdout[-2000:]
    assert all(not p.startswith("/") for p in sync.group(2).split())
    assert re.search(r"^Best checkpoint: runs/exp/", again.stdout, re.M)


def test_a_second_ctrl_c_stops_at_once(tiny_bert: Path) -> None:
    from lit_modules.callbacks import Preemption

    preemption = Preemption()
    preemption._handle(signal.SIGINT, None)  # the first: remembered, training finishes its batch
    assert preemption.received == signal.SIGINT
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            preemption._handle(signal.SIGINT, None)  # the second: at once
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- 5. and 6. the terminal ----------------------------------------------------------------------------

NOISE = ("litlogger", "wandb.require('service')", "anonymous setting", "git root", "LeafSpec", "LOAD REPORT",
         "newly initialized", "Tracking run with wandb", "Run history", "Run summary", "Loading `train_dataloader`",
         "wandb sync", "Loading weights", "Trainer already configured")


def test_quickstart_like_run_prints_no_third_party_noise_and_ends_with_the_summary(tmp_path: Path,
                                                                                   tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "quick.yaml", tiny_bert, logger="wandb",
                           trainer={"max_epochs": 1, "enable_progress_bar": True, "enable_model_summary": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "TUNEFORGE_RUN_DIR"))}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(exp), "--output_dir", "runs"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    seen = [noise for noise in NOISE if noise in output.replace("upload later with: wandb sync", "")]
    assert not seen, (seen, output[-4000:])
    assert not re.search(r"^\S*warn", proc.stderr, re.I | re.M), proc.stderr[-3000:]
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-5:]
    assert tail[0].startswith("Run directory:   runs/quick/") and tail[-1].startswith("Test metrics: test/accuracy="), tail
    # test from the checkpoint: the head comes from it, so no "newly initialised" note either
    ckpt = results(tmp_path / tail[0].split()[-1])["best_checkpoint"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "test", "--config", str(exp), "--ckpt_path", ckpt,
                           "--output_dir", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "newly initialised" not in proc.stderr + proc.stdout and "LOAD REPORT" not in proc.stderr + proc.stdout
    # --verbose_output brings the third-party lines back
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "test", "--config", str(exp), "--ckpt_path", ckpt,
                           "--output_dir", "runs", "--verbose_output", "true"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "LOAD REPORT" in proc.stdout + proc.stderr


def test_an_untrained_head_is_said_when_nothing_replaces_it(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, model={"labels": ["negative", "positive"]})
    proc = run_train_subprocess(["test", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"2 weight\(s\) of BertForSequenceClassification are newly initialised \(classifier\.\w+, "
                     r"classifier\.\w+\) and no checkpoint replaces them", proc.stderr), proc.stderr[-2000:]


# ---- 7. the other rough edges --------------------------------------------------------------------------

def test_a_gpu_that_is_not_there_is_one_line(tmp_path: Path, tiny_bert: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    out = tmp_path / "runs"
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(out), "--trainer.accelerator", "gpu"])
    one_line_error(proc, r"error: trainer: No supported gpu backend found!")
    no_run_left(out)


def test_a_broken_config_file_is_named_among_several(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: 2\n  logger: [unclosed\n")
    proc = run_train_subprocess(["fit", "--config", str(exp), "--config", str(broken), "--output_dir",
                                 str(tmp_path / "runs")])
    one_line_error(proc, r"error: .*broken\.yaml:\d+: not valid YAML")


def test_model_paths_say_what_was_tried(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--model.model_name_or_path", "./models/no-such-model"])
    one_line_error(proc, r"error: model\.model_name_or_path: local folder '\./models/no-such-model' does not exist")
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                 "--model.model_name_or_path", "bert-base-uncazed"], env={"HF_HUB_OFFLINE": "1"})
    one_line_error(proc, r"error: model\.model_name_or_path: cannot load 'bert-base-uncazed' as a hub id: it is not a "
                         r"local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set")


def test_an_early_failure_prints_no_wandb_sync_for_a_removed_run(tmp_path: Path, tiny_bert: Path) -> None:
    bad = tmp_path / "dev.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "neutral"}) + "\n")
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, logger="wandb", data={"validation_file": str(bad)})
    out = tmp_path / "runs"
    env = {"WANDB_MODE": "offline"}
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(out)], env=env)
    one_line_error(proc, r"label 'neutral' in validation data does not occur in the training labels")
    assert "wandb sync" not in proc.stdout + proc.stderr
    no_run_left(out)


def test_no_logger_is_fine(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, logger="wandb")
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--trainer.logger", "false"])
    assert code == 0 and results(run_dir)["test"]


def test_an_explicit_logger_save_dir_is_honoured(tmp_path: Path, tiny_bert: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    elsewhere = tmp_path / "my_logs"
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--trainer.logger.init_args.save_dir", str(elsewhere)])
    assert code == 0
    assert list(elsewhere.rglob("metrics.csv")), sorted(elsewhere.rglob("*"))[:5]
    assert not list(run_dir.rglob("metrics.csv"))


def test_the_conll_experiment_file_matches_the_readme_row() -> None:
    """The README's CoNLL row was measured with batch 16; the experiment file says the same."""
    cfg = yaml.safe_load((ROOT / "experiments" / "minilm" / "conll2003.yaml").read_text())
    assert cfg["data"]["init_args"]["batch_size"] == 16
    readme = (ROOT / "README.md").read_text()
    command = "python train.py fit --config experiments/minilm/conll2003.yaml"
    rows = [line for line in readme.splitlines() if line.startswith("| NER | CoNLL-2003") and command in line]
    assert len(rows) == 1 and "batch 16" in rows[0]
