"""`python -m experiments reproduce NAME --seeds ...`: one run per seed, mean / sample std over them, --resume, and
one W&B group per reproduction, all through the real train.py and offline W&B runs read back from disk."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from experiments import registry
from experiments.wandb_offline import read_run
from tests.conftest import ROOT, write_experiment


def _experiment(tmp_path: Path, tiny_bert: Path, split: str, procedure: str = "fit") -> Path:
    """A tiny experiment with two published entries: accuracy (in percent) and the loss (scale 1), whose value
    differs between seeds even when an untrained model's accuracy does not."""
    reference = {"task": "text classification", "model": "tiny random BERT", "dataset": "quickstart sentiment",
                 "split": split, "variant": "local", "procedure": procedure,
                 "published": [{"label": "fixture", "source": "test fixture", "verified": "unverified",
                                "metrics": {"accuracy": 60.0}},
                               {"label": "loss_fixture", "source": "test fixture (loss)", "verified": "unverified",
                                "metrics": {"loss": 0.5}, "scale": 1}]}
    return write_experiment(tmp_path / "tiny.yaml", tiny_bert, logger="wandb", trainer={"max_epochs": 1},
                            extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"},
                                   "reference": reference})


def _fit_dirs(runs: Path) -> set[Path]:
    return {p.parent for p in runs.glob("*/*/config.yaml") if "reproduce" not in p.parts[-3:]}


def _rows(table: Path) -> list[dict[str, str]]:
    with open(table.with_suffix(".csv"), newline="") as f:
        return list(csv.DictReader(f))


def _sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_seeds_aggregate_resume_and_share_one_wandb_group(tiny_bert: Path, tmp_path: Path) -> None:
    """Seed 13 alone, then 13,21 with --resume: only seed 21 runs; the row is the mean / sample std of the two
    runs' own results.json; both runs (from two invocations) are in one W&B group and named after their seed; the
    few-shot sample (set on the command line) is drawn with each seed. The file only evaluates (like
    smollm2/sst2_prompt), so this also checks that a few-shot sample makes reproduce train."""
    exp = _experiment(tmp_path, tiny_bert, split="test", procedure="evaluate")
    runs, table = tmp_path / "runs", tmp_path / "tables" / "results"
    overrides = ["--data.few_shot_k", "12", "--data.max_eval_samples", "64", "--export", "false",
                 "--output_dir", str(runs)]
    assert registry.main(["reproduce", str(exp), "--seeds", "13", "--results_table", str(table), *overrides]) == 0
    first = _fit_dirs(runs)
    assert [d.parent.name for d in first] == ["tiny_seed13"]
    assert registry.main(["reproduce", str(exp), "--seeds", "13,21", "--resume", "--results_table", str(table),
                          *overrides]) == 0
    new = _fit_dirs(runs) - first
    assert [d.parent.name for d in new] == ["tiny_seed21"]  # seed 13 was not run again
    dirs = {13: next(iter(first)), 21: next(iter(new))}

    # each seed trained (a checkpoint: the few-shot sample overrides the file's evaluate-only procedure) with its
    # own seed and its own K-shot draw
    results = {s: json.loads((d / "results.json").read_text()) for s, d in dirs.items()}
    for seed, d in dirs.items():
        config = yaml.safe_load((d / "config.yaml").read_text())
        assert config["seed_everything"] == seed and config["data"]["init_args"]["few_shot_seed"] == seed
        assert results[seed]["best_checkpoint"] and results[seed]["test"]

    rows = _rows(table)
    assert [(r["metric"], r["n"]) for r in rows] == [("test/accuracy", "1"), ("test/loss", "1"),
                                                     ("test/accuracy", "2"), ("test/loss", "2")]
    assert rows[0]["std"] == "" and float(rows[0]["ours"]) == pytest.approx(100 * results[13]["test"]["test/accuracy"])
    for row, key, scale, published in ((rows[2], "test/accuracy", 100, 60.0), (rows[3], "test/loss", 1, 0.5)):
        values = [scale * results[s]["test"][key] for s in (13, 21)]
        mean, std = sum(values) / 2, _sample_std(values)
        assert float(row["ours"]) == pytest.approx(mean)
        assert float(row["std"]) == pytest.approx(std)
        assert (float(row["min"]), float(row["max"])) == pytest.approx((min(values), max(values)))
        assert float(row["delta"]) == pytest.approx(mean - published)
        assert row["seeds"] == "13,21" and row["run_dir"] == ""
        if std > 0:
            assert float(row["gap_std"]) == pytest.approx((mean - published) / std)
        else:  # an untrained tiny model can score the same on every seed: no finite gap in standard deviations
            assert row["gap_std"] == "" and mean != published
        assert "--seeds 13,21" in row["command"] and "--resume" not in row["command"]
    assert float(rows[3]["std"]) > 0  # the seeds really gave different models
    md = table.with_suffix(".md").read_text()
    mean, std = float(rows[3]["ours"]), float(rows[3]["std"])
    # a 0-1 metric gets 4 decimals (2 would hide a spread like 0.7667 ± 0.0360), a percentage 2
    assert f"| 2 | {mean:.4f} ± {std:.4f} | 0.5000 | {mean - 0.5:+.4f} | {(mean - 0.5) / std:+.2f} |" in md
    accuracy = float(rows[2]["ours"])
    assert f"| 2 | {accuracy:.2f} ± {float(rows[2]['std']):.2f} | 60.00 |" in md
    assert "| 1 |" in md and "n/a (1 seed)" in md and "sample standard deviation (n - 1)" in md

    # the record lists both seeds; every W&B folder of both runs (the fit and the re-opened summary) is in its group
    record = json.loads(Path(rows[3]["reproduction"]).read_text())
    assert sorted(record["runs"]) == ["13", "21"] and record["wandb_group"] == record["id"]
    assert record["id"].startswith("tiny-")
    for seed, d in dirs.items():
        folders = sorted((d / "wandb").glob("offline-run-*"))
        assert len(folders) == 2
        infos = [read_run(f) for f in folders]
        assert [i["group"] for i in infos] == [record["id"]] * 2
        assert infos[0]["name"] == f"tiny_seed{seed}" and infos[0]["run_id"] == infos[1]["run_id"]
        assert infos[1]["summary"]["reproduce/seed"] == seed
        assert infos[1]["summary"]["reproduce/reproduction"] == record["id"]


def _train_py_processes(marker: str) -> list[int]:
    """Live train.py processes whose command line mentions ``marker`` (this test's temporary folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if "train.py" in cmdline and marker in cmdline and "zombie" not in state:
                found.append(int(proc.name))
    return found


def _wait_for(condition: Any, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"reproduce ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _kill_when(cmd: list[str], log: Path, err: Path, *conditions: Any) -> int:
    """Start ``cmd`` (output to ``log`` / ``err``), wait for each condition in turn and 3 s more (inside the next
    train.py), then SIGTERM it; its exit code. It never outlives the test."""
    with open(log, "w") as out, open(err, "w") as error:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=error)
        try:
            for condition in conditions:
                _wait_for(condition, proc, log)
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_killed_reproduction_resumes_and_reruns_only_the_interrupted_seed(
        tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kill` (SIGTERM) of reproduce while seed 6 trains: train.py is stopped with it, the finished seed 5 stays
    recorded, and `--resume` runs seed 6 alone (fit + the validation re-scoring), with no few-shot options."""
    exp = _experiment(tmp_path, tiny_bert, split="validation")
    runs, table = tmp_path / "runs", tmp_path / "results"
    overrides = ["--data.max_train_samples", "48", "--data.max_eval_samples", "64", "--export", "false",
                 "--output_dir", str(runs)]
    args = ["reproduce", str(exp), "--seeds", "5,6", "--results_table", str(table), *overrides]
    log, err = tmp_path / "reproduce.log", tmp_path / "reproduce.err"
    records = tmp_path / "reproductions"

    def recorded() -> dict[str, Any]:
        paths = list(records.glob("*.json"))
        return json.loads(paths[0].read_text())["runs"] if paths else {}

    code = _kill_when([sys.executable, "-m", "experiments", *args], log, err, lambda: "5" in recorded(),
                      lambda: "--seed_everything 6" in log.read_text())  # inside seed 6's train.py
    assert code == 130
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("error: interrupted; finished seeds are recorded, continue with: python -m experiments "
                           "reproduce ") and last.endswith(" --resume"), last
    assert _train_py_processes(str(tmp_path)) == []  # train.py did not outlive reproduce
    before = recorded()
    assert list(before) == ["5"]

    capsys.readouterr()
    assert registry.main([*args, "--resume"]) == 0
    launched = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert len(launched) == 2 and " fit " in launched[0] and " validate " in launched[1]  # seed 6 only
    assert "--seed_everything 6" in launched[0] and "few_shot_seed" not in launched[0]
    after = recorded()
    assert sorted(after) == ["5", "6"] and after["5"] == before["5"]
    rows = _rows(table)
    assert [(r["metric"], r["n"], r["seeds"]) for r in rows] == [("val/accuracy", "2", "5,6"),
                                                                 ("val/loss", "2", "5,6")]
    # ours per seed is its best checkpoint re-scored by `train.py validate`, in the run's reproduce.json too
    for row, scale in zip(rows, (100, 1)):
        values = []
        for seed in ("5", "6"):
            run_dir = Path(after[seed]["run_dir"])
            scored = json.loads(next((run_dir / "reproduce").glob("*-validate/results.json")).read_text())["validate"]
            values.append(scale * scored[row["metric"]])
            per_run = {r["metric"]: r for r in json.loads((run_dir / "reproduce.json").read_text())}
            assert per_run[row["metric"]]["ours"] == pytest.approx(values[-1]) and per_run[row["metric"]]["seed"] == \
                int(seed)
        assert float(row["ours"]) == pytest.approx(sum(values) / 2)
        assert float(row["std"]) == pytest.approx(_sample_std(values))


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1,x"], "error: --seeds: expected integers separated by commas (e.g. 13,21,42), got '1,x'"),
    (["--seeds", ""], "error: --seeds: expected integers separated by commas (e.g. 13,21,42), got ''"),
    (["--seeds", "13,21,13"], "error: --seeds: seed 13 is given twice in '13,21,13' (each seed is one run)"),
    (["--seeds", "-1"], "error: --seeds: expected integers separated by commas (e.g. 13,21,42), got '-1'"),
    (["--seeds", "4294967296"], "error: --seeds: seeds must lie in 0..4294967295, got 4294967296"),
    (["--resume"], ("error: --resume: only with --seeds (to continue one interrupted fit, use train.py fit "
                    "--ckpt_path last)")),
    (["--seeds", "1,2", "--seed_everything", "3"],
     "error: --seed_everything: --seeds sets the seed of each run; remove --seed_everything"),
    (["--seeds", "1,2", "--data.few_shot_k", "8", "--data.init_args.few_shot_seed=3"],
     "error: --data.few_shot_seed: --seeds sets the few-shot draw of each run; remove it"),
])
def test_bad_seed_options_give_one_line_and_exit_2(extra: list[str], message: str, tiny_bert: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    exp = _experiment(tmp_path, tiny_bert, split="validation")
    args = ["reproduce", str(exp), "--results_table", str(tmp_path / "results"), "--output_dir", str(tmp_path / "runs")]
    assert registry.main([*args, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message] and captured.out == ""
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reproductions").exists()


def test_seed_conflicts_found_in_the_resolved_config(tiny_bert: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """What only the resolved config tells: a zero-shot file has nothing for seeds to vary; --resume refuses a
    reproduction whose recipe changed since, naming the key."""
    base = ["--results_table", str(tmp_path / "results"), "--output_dir", str(tmp_path / "runs")]
    zero_shot = _experiment(tmp_path, tiny_bert, split="test", procedure="evaluate")
    assert registry.main(["reproduce", str(zero_shot), "--seeds", "1,2", *base]) == 2
    assert capsys.readouterr().err.splitlines() == [
        (f"error: --seeds: {zero_shot} only evaluates (procedure: evaluate, no few-shot sample to draw), so every "
         "seed would give the same numbers; run it without --seeds")]

    exp = _experiment(tmp_path, tiny_bert, split="validation")
    # an earlier reproduction of the same experiment and overrides, whose recipe had another learning rate
    config = registry.resolve_config(registry.find(str(exp)), base[2:])
    earlier = {**registry.recipe(config), "model": {**config["model"], "init_args": {
        **config["model"]["init_args"], "learning_rate": 0.5}}}
    records = tmp_path / "reproductions"
    records.mkdir()
    (records / "tiny-20260101-000000.json").write_text(json.dumps({
        "id": "tiny-20260101-000000", "experiment": str(exp), "overrides": base[2:], "wandb_group": "g",
        "created": "2026-01-01T00:00:00", "recipe": earlier, "runs": {}}))
    capsys.readouterr()
    assert registry.main(["reproduce", str(exp), "--seeds", "1", "--resume", *base]) == 2
    assert capsys.readouterr().err.splitlines() == [
        ("error: --resume: the resolved config differs from reproduction tiny-20260101-000000's at "
         "model.init_args.learning_rate: 0.5 then, 0.001 now; start a new reproduction without --resume")]
    assert not (tmp_path / "runs").exists()


def test_spread_and_gap_in_standard_deviations() -> None:
    """Sample std (n - 1), and the gap when it is undefined: one seed, or seeds without spread."""
    s = registry.spread([80.0, 82.0, 87.0])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 83.0, 80.0, 87.0)
    assert s["std"] == pytest.approx(math.sqrt(13.0))  # ((-3)^2 + (-1)^2 + 4^2) / (3 - 1)
    assert registry.gap_in_std(83.0, math.sqrt(13.0), 90.0) == pytest.approx(-7 / math.sqrt(13.0))
    assert registry.spread([81.5])["std"] is None
    assert registry.gap_in_std(81.5, None, 90.0) is None  # one seed: no spread to measure the gap in
    assert registry.gap_in_std(90.0, 0.0, 90.0) == 0.0  # every seed on the published number
    assert registry.gap_in_std(85.0, 0.0, 90.0) is None  # no spread, and a gap: not a finite number of stds
    assert registry.gap_in_std(85.0, 1.0, None) is None  # nothing published


def test_decimals_follow_the_metrics_scale() -> None:
    assert registry.places(0.7667, "", 0.7225, 0.7959) == 4  # accuracy on 0-1: 0.77 ± 0.04 would hide the spread
    assert registry.places(81.97, 89.2, 81.82, 82.05) == 2  # F1 in percent
    assert registry.places(0.9, 91.5) == 2  # one value on 0-100 sets the scale
    assert registry.places("", None) == 2


def test_results_table_from_before_the_seed_columns_is_rewritten_with_them(tmp_path: Path) -> None:
    old_fields = ("date", "experiment", "variant", "split", "metric", "ours", "published", "delta", "source",
                  "verified", "overrides", "hardware", "wall_time_s", "run_dir", "command")
    old = {"date": "2026-11-28 20:55", "experiment": "minilm/sst2", "variant": "local", "split": "validation",
           "metric": "val/accuracy", "ours": "82.0", "published": "91.5", "delta": "-9.5", "source": "s",
           "verified": "primary", "overrides": "", "hardware": "CPU", "wall_time_s": "1129.0", "run_dir": "runs/x",
           "command": "python -m experiments reproduce minilm/sst2"}
    table = tmp_path / "results"
    with open(table.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow(old)
    new = {**old, "ours": 90.0, "std": 0.0, "min": 90.0, "max": 90.0, "n": 3, "seeds": "1,2,3", "delta": -1.5,
           "gap_std": None, "run_dir": "", "reproduction": "runs/reproductions/r.json"}
    registry.write_results_table(table, [new])
    rows = _rows(table)
    assert tuple(rows[0]) == registry.ROW_FIELDS
    assert {k: rows[0][k] for k in old_fields} == old and rows[0]["n"] == ""
    assert rows[1]["n"] == "3" and rows[1]["reproduction"] == "runs/reproductions/r.json"
    md = table.with_suffix(".md").read_text().splitlines()
    assert "| 1 | 82.00 | 91.50 | -9.50 | - | - |" in md[-2]  # the old single run
    assert "| 3 | 90.00 ± 0.00 | 91.50 | -1.50 | n/a (std 0) | 90.00 / 90.00 | 1,2,3 |" in md[-1]
    assert md[-1].endswith("| runs/reproductions/r.json |")


def test_main_module_runs_reproduce_with_seeds_errors(tmp_path: Path) -> None:
    """The command line itself (python -m experiments): a bad --seeds is one line on stderr and exit code 2."""
    env = {k: v for k, v in os.environ.items() if k != "TUNEFORGE_RUN_DIR"}
    proc = subprocess.run([sys.executable, "-m", "experiments", "reproduce", "minilm/sst2", "--seeds", "1,x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --seeds: expected integers separated by commas (e.g. 13,21,42), got '1,x'"]
