"""W&B beyond scalars (issue #19, item 3): a table of examples and a confusion matrix at every evaluation, the best
score and its epoch in the run summary, all kept by offline runs and readable from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from experiments.compare import last_table, main as compare_main
from experiments.wandb_offline import read_run
from tests.conftest import SENTIMENT, results, run_train, write_experiment


def test_classification_run_logs_example_tables_confusion_matrices_and_the_best_score(tmp_path: Path,
                                                                                      tiny_bert: Path,
                                                                                      capsys) -> None:
    os.environ["WANDB_MODE"] = "offline"
    exp = write_experiment(tmp_path / "tables.yaml", tiny_bert, logger="wandb", trainer={"max_epochs": 2},
                           data={"max_train_samples": 64},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--log_predictions", "5"])
    assert code == 0
    columns, rows = last_table(run_dir, "val/predictions")
    assert columns == ["idx", "text", "gold", "prediction", "score"] and len(rows) == 5
    gold = [json.loads(x) for x in (SENTIMENT / "validation.jsonl").read_text().splitlines()]
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]  # the first examples of the file, in order
    assert [(r[1], r[2]) for r in rows] == [(g["text"], g["label"]) for g in gold[:5]]
    assert all(r[3] in ("negative", "positive") and 0.5 <= r[4] <= 1.0 for r in rows)
    columns, cells = last_table(run_dir, "val/confusion_matrix_table")
    assert columns == ["Actual", "Predicted", "nPredictions"] and sum(c[2] for c in cells) == len(gold)
    test_columns, test_rows = last_table(run_dir, "test/predictions")
    assert len(test_rows) == 5
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    summary = read_run(offline)["summary"]
    assert summary["best/val/accuracy"] == results(run_dir)["val/accuracy"]
    assert summary["best/epoch"] in (0, 1)
    assert compare_main([str(run_dir), "--table", "val/predictions"]) == 0
    printed = capsys.readouterr().out
    assert "| idx | text | gold | prediction | score |" in printed and gold[0]["text"][:40] in printed


def test_qa_tables_show_questions_answers_and_scores(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_bert
    from tests.qa_helpers import QA_VOCAB, make_squad

    os.environ["WANDB_MODE"] = "offline"
    bert = build_tiny_bert(tmp_path / "qa_bert", QA_VOCAB)
    (tmp_path / "train.json").write_text(json.dumps(make_squad(n_paragraphs=2, seed=1)))
    (tmp_path / "dev.json").write_text(json.dumps(make_squad(n_paragraphs=2, seed=2)))
    code, run_dir = run_train([
        "fit", "--model", "lit_modules.question_answering.QuestionAnsweringModule", "--model.model_name_or_path",
        str(bert), "--data", "datamodules.question_answering.QuestionAnsweringDataModule",
        "--data.train_file", str(tmp_path / "train.json"), "--data.validation_file", str(tmp_path / "dev.json"),
        "--data.max_seq_length", "64", "--data.doc_stride", "16", "--trainer.max_epochs", "1",
        "--output_dir", str(tmp_path / "runs"), "--log_predictions", "3", "--export", "false"])
    assert code == 0
    columns, rows = last_table(run_dir, "val/predictions")
    assert columns == ["idx", "id", "question", "gold", "prediction", "exact_match", "f1"] and len(rows) == 3
    dev = [q for a in json.loads((tmp_path / "dev.json").read_text())["data"] for p in a["paragraphs"]
           for q in p["qas"]]
    assert [r[2] for r in rows] == [q["question"].strip() for q in dev[:3]] or \
        [r[1] for r in rows] == [q["id"] for q in dev[:3]]
