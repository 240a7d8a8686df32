"""Several named evaluation sets in one run (issue #19, item 2): in-domain and out-of-domain side by side."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lit_modules.errors import DataError
from tests.conftest import SENTIMENT, results, run_train, write_experiment
from tests.qa_helpers import QA_VOCAB, make_squad


def test_named_validation_test_and_predict_sets(tmp_path: Path, tiny_bert: Path) -> None:
    sets = {"reviews": str(SENTIMENT / "validation.jsonl"), "heldout": str(SENTIMENT / "test.jsonl")}
    exp = write_experiment(tmp_path / "sets.yaml", tiny_bert, data={"validation_file": sets, "test_file": sets},
                           trainer={"max_epochs": 2, "log_every_n_steps": 1},
                           extra={"checkpoint": {"monitor": "val/heldout/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    res = results(run_dir)
    assert "val/heldout/accuracy" in res  # the monitored set's best score
    assert {f"test/{name}/{m}" for name in sets for m in ("accuracy", "f1", "loss")} <= set(res["test"])
    with open(run_dir / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"val/reviews/accuracy", "val/heldout/accuracy", "val/reviews/loss", "val/heldout/loss"} <= set(header)
    assert not any(h.startswith("val/accuracy") or "dataloader_idx" in h for h in header)

    # each named set scores exactly what a run on that file alone scores, from the same checkpoint
    ckpt = res["best_checkpoint"]
    single = yaml.safe_load(exp.read_text())
    single["data"]["init_args"]["test_file"] = sets["heldout"]
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(single))
    code, alone = run_train(["test", "--config", str(tmp_path / "single.yaml"), "--ckpt_path", ckpt,
                             "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    alone_res = results(alone)["test"]
    assert alone_res["test/accuracy"] == pytest.approx(res["test"]["test/heldout/accuracy"], abs=1e-6)
    assert alone_res["test/loss"] == pytest.approx(res["test"]["test/heldout/loss"], abs=1e-6)

    # predictions of each set go to their own file, complete and in input order
    code, pred_dir = run_train(["predict", "--config", str(exp), "--ckpt_path", ckpt, "--output_dir",
                                str(tmp_path / "runs"), "--data.predict_file", json.dumps(sets)])
    assert code == 0
    for name, path in sets.items():
        rows = [json.loads(x) for x in (pred_dir / f"predictions.{name}.jsonl").read_text().splitlines()]
        texts = [json.loads(x)["text"] for x in Path(path).read_text().splitlines()]
        assert [r["text"] for r in rows] == texts


def test_named_qa_test_sets_write_their_official_files(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_bert

    bert = build_tiny_bert(tmp_path / "qa_bert", QA_VOCAB)
    for name, seed in (("train", 1), ("a", 2), ("b", 3)):
        (tmp_path / f"{name}.json").write_text(json.dumps(make_squad(n_paragraphs=2, seed=seed)))
    sets = {"a": str(tmp_path / "a.json"), "b": str(tmp_path / "b.json")}
    cfg = {
        "model": {"class_path": "lit_modules.question_answering.QuestionAnsweringModule",
                  "init_args": {"model_name_or_path": str(bert), "learning_rate": 1e-3}},
        "data": {"class_path": "datamodules.question_answering.QuestionAnsweringDataModule",
                 "init_args": {"train_file": str(tmp_path / "train.json"), "validation_file": sets, "test_file": sets,
                               "max_seq_length": 64, "doc_stride": 16, "batch_size": 8}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/b/f1", "mode": "max"},
    }
    (tmp_path / "qa.yaml").write_text(yaml.safe_dump(cfg))
    code, run_dir = run_train(["fit", "--config", str(tmp_path / "qa.yaml"), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    assert {"test/a/exact_match", "test/a/f1", "test/b/exact_match", "test/b/f1"} <= set(results(run_dir)["test"])
    code, pred_dir = run_train(["predict", "--config", str(tmp_path / "qa.yaml"), "--ckpt_path",
                                results(run_dir)["best_checkpoint"], "--output_dir", str(tmp_path / "runs"),
                                "--data.predict_file", json.dumps(sets)])
    assert code == 0
    for name in sets:
        official = json.loads((pred_dir / f"predictions.{name}.json").read_text())
        ids = [q["id"] for a in json.loads(Path(sets[name]).read_text())["data"] for p in a["paragraphs"]
               for q in p["qas"]]
        assert sorted(official) == sorted(ids)


def test_bad_set_names_and_a_named_training_set_are_one_line() -> None:
    from datamodules.text_classification import TextClassificationDataModule

    with pytest.raises(DataError, match=r"data\.validation_file: set names may hold letters, digits.*got 'in domain'"):
        TextClassificationDataModule(validation_file={"in domain": str(SENTIMENT / "validation.jsonl")})
    with pytest.raises(DataError, match=r"data\.train_file: expected one file"):
        TextClassificationDataModule(train_file={"a": str(SENTIMENT / "train.jsonl")})  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"data\.test_file\.out: data file '.*nope\.jsonl' does not exist"):
        TextClassificationDataModule(test_file={"out": "nope.jsonl"})


def test_named_sets_under_two_processes_score_like_one(tmp_path: Path, tiny_bert: Path) -> None:
    """validate on two named sets of odd sizes with 1 and 2 CPU processes (DDP, gloo): identical metrics."""
    from tests.conftest import ROOT, run_train_subprocess

    sets = {"reviews": str(SENTIMENT / "validation.jsonl"), "heldout": str(SENTIMENT / "test.jsonl")}
    exp = write_experiment(tmp_path / "sets.yaml", tiny_bert, data={"validation_file": sets, "max_eval_samples": 15,
                                                                    "eval_batch_size": 4})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--checkpoint.monitor", "val/reviews/loss"])
    assert code == 0
    ckpt = results(run_dir)["best_checkpoint"]
    scores = []
    for extra in ([], ["--config", str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml")]):
        proc = run_train_subprocess(["validate", "--config", str(exp), *extra, "--ckpt_path", ckpt,
                                     "--output_dir", str(tmp_path / "eval")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        newest = max((tmp_path / "eval" / "sets").iterdir(), key=lambda p: p.stat().st_mtime)
        scores.append(results(newest)["validate"])
    one, two = scores
    keys = {f"val/{n}/{m}" for n in sets for m in ("accuracy", "loss", "f1")}
    assert keys <= set(one) and keys <= set(two)
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
