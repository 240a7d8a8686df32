"""train.py end to end on a tiny model: every subcommand, run directories, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SENTIMENT, results, run_train, run_train_subprocess, write_experiment


@pytest.fixture(scope="module")
def fitted(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fit run with the tiny model; later tests validate / test / predict from its checkpoint."""
    tmp = tmp_path_factory.mktemp("fitted")
    exp = write_experiment(tmp / "exp.yaml", tiny_bert, trainer={"max_epochs": 2},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "run_dir": run_dir, "tmp": tmp}


def test_fit_writes_a_complete_run_directory(fitted: dict[str, Path]) -> None:
    run_dir = fitted["run_dir"]
    assert run_dir.parent == fitted["tmp"] / "runs" / "exp"  # runs/<experiment name>/<timestamp>
    res = results(run_dir)
    ckpt = Path(res["best_checkpoint"])
    assert ckpt.is_file() and ckpt.parent == run_dir / "checkpoints"
    assert 0.0 <= res["val/accuracy"] <= 1.0
    assert set(res["test"]) == {"test/loss", "test/accuracy", "test/f1", "test/mcc"}
    # the saved config is the resolved one, without this run's paths (rerunning it starts a new run)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["learning_rate"] == 1e-3
    assert saved["checkpoint"]["dirpath"] is None and saved["trainer"]["default_root_dir"] is None
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["versions"]["lightning"] and "git" in info
    metrics = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/accuracy", "val/f1", "val/mcc", "test/accuracy"} <= set(metrics)


def test_training_throughput_is_measured(fitted: dict[str, Path]) -> None:
    """results.json: train examples / training seconds (validation excluded), also logged per epoch."""
    import csv

    res = results(fitted["run_dir"])
    n_train = len((SENTIMENT / "train.jsonl").read_text().splitlines())
    assert res["train_samples_per_second"] == pytest.approx(2 * n_train / res["train_seconds"], rel=0.02)
    with open(fitted["run_dir"] / "csv" / "metrics.csv") as f:
        logged = [float(r["train/samples_per_sec"]) for r in csv.DictReader(f) if r.get("train/samples_per_sec")]
    assert len(logged) == 2 and all(v > 0 for v in logged)


def test_export_loads_in_a_pipeline(fitted: dict[str, Path]) -> None:
    from transformers import pipeline

    export = Path(results(fitted["run_dir"])["export"])
    classify = pipeline("text-classification", model=str(export))
    out = classify(["A wonderful, moving film.", "The food was cold and the staff rude."])
    assert {o["label"] for o in out} <= {"negative", "positive"}  # label names, not LABEL_0
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_test_validate_predict_from_the_checkpoint(fitted: dict[str, Path], tmp_path: Path) -> None:
    """The label set travels with the checkpoint: no training file is needed after fit."""
    ckpt = results(fitted["run_dir"])["best_checkpoint"]
    exp = yaml.safe_load(fitted["exp"].read_text())
    data = exp["data"]["init_args"]
    for key in ("train_file", "validation_file"):
        data.pop(key)
    data["predict_file"] = str(SENTIMENT / "test.jsonl")
    exp_path = tmp_path / "eval.yaml"
    exp_path.write_text(yaml.safe_dump(exp))
    out = tmp_path / "runs"

    code, test_dir = run_train(["test", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0 and test_dir.name.endswith("-test")
    assert results(test_dir)["test"]["test/accuracy"] == pytest.approx(results(fitted["run_dir"])["test"]["test/accuracy"])

    code, pred_dir = run_train(["predict", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(x) for x in (SENTIMENT / "test.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [r["text"] for r in inputs]  # input order, although batches are length-sorted
    assert [r["idx"] for r in rows] == list(range(len(inputs)))
    for row in rows:
        assert row["label"] in ("negative", "positive")
        assert set(row["scores"]) == {"negative", "positive"}
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["scores"], key=row["scores"].get)
    accuracy = sum(r["label"] == i["label"] for r, i in zip(rows, inputs)) / len(rows)
    assert accuracy == pytest.approx(results(test_dir)["test"]["test/accuracy"])

    data["validation_file"] = str(SENTIMENT / "validation.jsonl")
    exp_path.write_text(yaml.safe_dump(exp))
    code, val_dir = run_train(["validate", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(out)])
    assert code == 0
    assert results(val_dir)["validate"]["val/accuracy"] == pytest.approx(results(fitted["run_dir"])["val/accuracy"])
    assert len({test_dir, pred_dir, val_dir, fitted["run_dir"]}) == 4  # runs never share a directory


def test_same_seed_same_metrics_and_runs_do_not_overwrite(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "det.yaml", tiny_bert, data={"max_train_samples": 128},
                           trainer={"max_epochs": 2}, model={"warmup_ratio": 0.1})
    args = ["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false"]
    runs = []
    for seed in (7, 7, 8):
        code, run_dir = run_train([*args, "--seed_everything", str(seed)])
        assert code == 0
        runs.append(results(run_dir))
    assert len({r["run_dir"] for r in runs}) == 3
    assert runs[0]["test"] == runs[1]["test"]  # bit-identical on CPU
    assert runs[0]["val/loss"] == runs[1]["val/loss"]
    assert runs[0]["test"]["test/loss"] != runs[2]["test"]["test/loss"]


def test_presets_compose_and_command_line_wins(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "compose.yaml", tiny_bert, data={"max_train_samples": 64})
    preset = tmp_path / "preset.yaml"
    preset.write_text("trainer:\n  max_epochs: 5\n  accumulate_grad_batches: 2\ndata:\n  init_args:\n    batch_size: 16\n")
    code, run_dir = run_train(["fit", "--config", str(exp), "--config", str(ROOT / "configs/trainer/cpu.yaml"),
                               "--config", str(preset), "--trainer.max_epochs", "1", "--output_dir",
                               str(tmp_path / "runs"), "--export", "false", "--test_after_fit", "false"])
    assert code == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["accelerator"] == "cpu"
    assert saved["trainer"]["accumulate_grad_batches"] == 2
    assert saved["trainer"]["max_epochs"] == 1
    assert saved["data"]["init_args"]["batch_size"] == 16
    assert saved["data"]["init_args"]["max_train_samples"] == 64
    assert "test" not in results(run_dir)


def test_multi_label_and_regression_runs(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (SENTIMENT / "train.jsonl").read_text().splitlines()][:120]
    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(json.dumps({"text": r["text"], "label": [r["label"], "long" if len(r["text"]) > 60 else "short"]}) + "\n" for r in rows))
    reg = tmp_path / "reg.jsonl"
    reg.write_text("".join(json.dumps({"text": r["text"], "label": len(r["text"]) / 10 + 0.5}) + "\n" for r in rows))
    for path, expected in ((multi, {"val/f1", "val/f1_micro", "val/exact_match", "val/accuracy"}),
                           (reg, {"val/pearson", "val/spearman", "val/mse"})):
        exp = write_experiment(tmp_path / f"{path.stem}.yaml", tiny_bert,
                               data={"train_file": str(path), "validation_file": str(path), "test_file": None,
                                     "predict_file": str(path)})
        out = tmp_path / "runs"
        code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(out), "--export", "false"])
        assert code == 0
        header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert expected <= set(header)
        ckpt = results(run_dir)["best_checkpoint"]
        code, pred_dir = run_train(["predict", "--config", str(exp), "--ckpt_path", ckpt, "--output_dir", str(out)])
        assert code == 0
        first = json.loads((pred_dir / "predictions.jsonl").read_text().splitlines()[0])
        if path == multi:
            assert set(first["scores"]) == {"negative", "positive", "long", "short"} and isinstance(first["labels"], list)
        else:
            assert isinstance(first["score"], float)


def test_no_validation_data_keeps_the_last_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "noval.yaml", tiny_bert, data={"validation_file": None, "max_train_samples": 64},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false"])
    assert code == 0 and Path(results(run_dir)["best_checkpoint"]).is_file()


# ---- bad input: one line, exit code 2, nothing left behind ------------------------------------------

def _expect_error(capsys: pytest.CaptureFixture, args: list[str], pattern: str, out: Path) -> None:
    import re

    code, _ = run_train([*args, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    last = err[-1]
    assert re.search(pattern, last), last
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))  # no half-written run


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"model": {"init_args": {"learning_rat": 0.1}}}, r"exp\.yaml:\d+: model\.init_args\.learning_rat: unknown key"),
        ({"trainer": {"max_epochs": "three"}}, r"exp\.yaml:\d+: trainer\.max_epochs: expected int, got 'three'"),
        ({"model": {"init_args": {"learning_rate": "fast"}}}, r"exp\.yaml:\d+: model\.init_args\.learning_rate: expected float, got 'fast'"),
        ({"trainr": {"max_epochs": 1}}, r"trainr\.max_epochs: unknown key"),
        ({"model": {"init_args": {"group_learning_rates": {"classifier(": 1e-3}}}},
         r"model\.group_learning_rates: 'classifier\(' is not a regular expression"),
        ({"model": {"init_args": {"group_learning_rates": {"classifier": -1.0}}}},
         r"model\.group_learning_rates\.classifier: expected a positive number, got -1\.0"),
        ({"model": {"init_args": {"group_learning_rates": {"crossattention": 1e-3}}}},
         r"model\.group_learning_rates: 'crossattention' matches no trainable parameter"),
        ({"data": {"init_args": {"train_file": "/no/such/train.csv"}}}, r"data\.train_file: data file '/no/such/train\.csv' does not exist"),
        ({"data": {"init_args": {"train_file": str(ROOT / "train.py")}}}, r"train\.py: unsupported file type '\.py'"),
    ],
)
def test_config_errors(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: dict, pattern: str) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    cfg = yaml.safe_load(exp.read_text())

    def merge(a: dict, b: dict) -> None:
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v

    merge(cfg, override)
    exp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _expect_error(capsys, ["fit", "--config", str(exp)], pattern, tmp_path / "runs")


def test_config_error_names_the_line(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    lines = exp.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "learning_rate" in line)
    lines[at] = lines[at].replace("learning_rate", "learning_rat")
    exp.write_text("\n".join(lines) + "\n")
    _expect_error(capsys, ["fit", "--config", str(exp)], rf"exp\.yaml:{at + 1}: model\.init_args\.learning_rat: unknown key",
                  tmp_path / "runs")


def test_command_line_errors(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    base = ["fit", "--config", str(exp)]
    _expect_error(capsys, [*base, "--trainer.max_epoch", "2"], r"unknown option\(s\) --trainer\.max_epoch 2 \(options are never abbreviated", tmp_path / "runs")
    _expect_error(capsys, [*base, "--data.batch_size", "many"], r"command line: data\.init_args\.batch_size: expected int, got 'many'", tmp_path / "runs")


@pytest.mark.parametrize(
    "files, pattern",
    [
        ({"train.jsonl": '{"text": "good", "label": "pos"}\n{"text": "bad" "label": "neg"}\n'}, r"train\.jsonl:2: malformed JSON line"),
        ({"train.jsonl": '{"body": "good", "label": "pos"}\n'}, r"train\.jsonl: no text column found \(looked for text, sentence, .*\); columns found: body, label"),
        ({"train.jsonl": '{"text": "good", "label": "pos"}\n{"text": "fine", "label": "pos"}\n'}, r"train\.jsonl: the training labels hold one class \('pos'\)"),
        ({"train.jsonl": '{"text": "good", "stars": "pos"}\n'}, r"train\.jsonl: no label column 'label'; columns found: text, stars"),
        ({"train.jsonl": "\n"}, r"train\.jsonl: the file holds no records"),
        ({"train.jsonl": '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n',
          "val.jsonl": '{"text": "ok", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n'},
         r"val\.jsonl:2: label 'neutral' in validation data"),
    ],
)
def test_data_errors(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture, files: dict[str, str], pattern: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    data = {"train_file": str(tmp_path / "train.jsonl"), "test_file": None,
            "validation_file": str(tmp_path / "val.jsonl") if "val.jsonl" in files else None}
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data=data)
    _expect_error(capsys, ["fit", "--config", str(exp)], pattern, tmp_path / "runs")


def test_non_numeric_regression_label(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": 4.5}\n{"text": "bad", "label": "low"}\n')
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, data={"train_file": str(tmp_path / "train.jsonl"),
                           "validation_file": None, "test_file": None}, model={"problem_type": "regression"})
    _expect_error(capsys, ["fit", "--config", str(exp)], r"train\.jsonl:2: regression label must be a number, got 'low'",
                  tmp_path / "runs")


def test_unlogged_monitor_fails_before_training(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, extra={"checkpoint": {"monitor": "val/rouge1"}})
    _expect_error(capsys, ["fit", "--config", str(exp)], r"checkpoint\.monitor: 'val/rouge1' is not logged by this task; "
                  r"val metrics: val/accuracy, val/f1, val/loss, val/mcc", tmp_path / "runs")


def test_abbreviations_refused_in_a_fresh_process(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert)
    proc = run_train_subprocess(["fit", "--config", str(exp), "--data.batch", "8", "--output_dir", str(tmp_path / "r")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: command line: data.init_args.batch: unknown key"
    assert not (tmp_path / "r").exists()


def test_print_config_works_for_the_quickstart() -> None:
    proc = run_train_subprocess(["fit", "--config", "experiments/quickstart.yaml", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["class_path"] == "lit_modules.text_classification.TextClassificationModule"
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert cfg["checkpoint"]["monitor"] == "val/accuracy"


def test_tensorboard_logger_preset(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "tb.yaml", tiny_bert, logger="none", data={"max_train_samples": 64})
    code, run_dir = run_train(["fit", "--config", str(exp), "--config", str(ROOT / "configs/logger/tensorboard.yaml"),
                               "--output_dir", str(tmp_path / "runs"), "--export", "false", "--test_after_fit", "false"])
    assert code == 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_logged_metrics_equal_scikit_learn_on_the_predictions(fitted: dict[str, Path], tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    exp = yaml.safe_load(fitted["exp"].read_text())
    exp["data"]["init_args"]["predict_file"] = str(SENTIMENT / "validation.jsonl")
    exp_path = tmp_path / "pred.yaml"
    exp_path.write_text(yaml.safe_dump(exp))
    ckpt = results(fitted["run_dir"])["best_checkpoint"]
    code, pred_dir = run_train(["predict", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "r")])
    assert code == 0
    pred = [json.loads(x)["label"] for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in (SENTIMENT / "validation.jsonl").read_text().splitlines()]
    code, val_dir = run_train(["validate", "--config", str(exp_path), "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "r")])
    logged = results(val_dir)["validate"]
    assert logged["val/accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-6)
    assert logged["val/f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-6)
    assert logged["val/mcc"] == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-5)


def test_unreachable_hub_id_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _ = run_train(["fit", "--model", "lit_modules.text_classification.TextClassificationModule",
                         "--model.model_name_or_path", "some-org/not-cached-model", "--data",
                         "datamodules.text_classification.TextClassificationDataModule", "--data.train_file",
                         str(SENTIMENT / "train.jsonl"), "--output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: model.model_name_or_path: cannot load 'some-org/not-cached-model' as a hub id")
