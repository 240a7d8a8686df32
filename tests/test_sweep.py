"""`python -m experiments sweep FILE`: a W&B grid or random sweep file run on this machine without a W&B server, through the
real train.py, with offline W&B runs read back from disk."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from experiments import sweep as sweeps
from experiments.wandb_offline import read_run
from tests.conftest import ROOT, write_experiment
from tests.test_reproduce_seeds import _kill_when, _train_py_processes


def _sweep_file(path: Path, experiment: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "program": "train.py", "method": "grid", "metric": {"name": "val/accuracy", "goal": "maximize"},
        "parameters": {"model.init_args.learning_rate": {"values": [1.0e-3, 3.0e-2]},
                       "data.init_args.batch_size": {"value": 16}},
        "command": ["${env}", "${interpreter}", "${program}", "fit", "--config", str(experiment), "${args}"],
    }
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_grid_runs_every_point_and_seed_resumes_and_groups_in_wandb(tiny_bert: Path, tmp_path: Path) -> None:
    """2 grid points with seed 13, then seeds 13,21 with --resume: only the two seed-21 runs are new; every run got
    its point's values and its seed; the ranked table is the mean / sample std of the runs' own results.json; all
    four runs, from two invocations, are in one W&B group named after the sweep."""
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_bert, logger="wandb",
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    file = _sweep_file(tmp_path / "tiny_grid.yaml", exp)
    runs, out = tmp_path / "runs", tmp_path / "sweeps"
    common = ["--out", str(out), "--output_dir", str(runs), "--export", "false", "--data.max_eval_samples", "48"]
    assert sweeps.main([str(file), "--seeds", "13", *common]) == 0
    first = {p.parent for p in runs.glob("*/*/results.json")}
    assert sorted(d.parent.name for d in first) == ["tiny_grid_p0_seed13", "tiny_grid_p1_seed13"]
    assert sweeps.main([str(file), "--seeds", "13,21", "--resume", *common]) == 0
    new = {p.parent for p in runs.glob("*/*/results.json")} - first
    assert sorted(d.parent.name for d in new) == ["tiny_grid_p0_seed21", "tiny_grid_p1_seed21"]

    record_path = next(out.glob("tiny_grid-*.json"))
    record = json.loads(record_path.read_text())
    assert sorted(record["runs"]) == ["0/seed13", "0/seed21", "1/seed13", "1/seed21"]
    by_point: dict[int, list[float]] = {0: [], 1: []}
    by_point_test: dict[int, list[float]] = {0: [], 1: []}
    for run in record["runs"].values():
        run_dir = Path(run["run_dir"])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["seed_everything"] == run["seed"]
        assert config["model"]["init_args"]["learning_rate"] == [1.0e-3, 3.0e-2][run["point"]]
        assert config["data"]["init_args"]["batch_size"] == 16
        results = json.loads((run_dir / "results.json").read_text())
        assert run["metric"] == results["val/accuracy"] and run["test"] == results["test"]["test/accuracy"]
        by_point[run["point"]].append(results["val/accuracy"])
        by_point_test[run["point"]].append(results["test"]["test/accuracy"])
        folders = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert [read_run(f)["group"] for f in folders] == [record["id"]]

    with open(record_path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    means = {p: sum(v) / 2 for p, v in by_point.items()}
    assert [int(r["point"]) for r in rows] == sorted(means, key=lambda p: (-means[p], p))  # best first
    for row in rows:
        values = by_point[int(row["point"])]
        assert int(row["n"]) == 2 and float(row["mean"]) == pytest.approx(sum(values) / 2)
        assert float(row["std"]) == pytest.approx(_sample_std(values))
        assert float(row["test_mean"]) == pytest.approx(sum(by_point_test[int(row["point"])]) / 2)
    md = record_path.with_suffix(".md").read_text()
    assert "4 of 4 runs finished" in md
    assert "| rank | model.init_args.learning_rate | data.init_args.batch_size | val/accuracy | n |" in md
    assert "test/accuracy" in md and "mean ± sample standard deviation (n - 1)" in md


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": "bayes"}, r"tiny_grid.yaml:\d+: method: 'bayes' chooses each point from the results so far on "
                          r"W&B's server: .*or sample its space here with --method random --count N"),
    ({"parameters": {"model.init_args.learning_rate": {"min": 1e-5, "max": 1e-3}}},
     r"tiny_grid.yaml:\d+: parameters.model.init_args.learning_rate: a grid takes values"),
    ({"parameters": {"model.init_args.learning_rate": {"values": []}}},
     r"parameters.model.init_args.learning_rate.values: expected a non-empty list"),
    ({"metric": {"name": "val/accuracy", "goal": "best"}}, r"metric.goal: expected maximize or minimize, got 'best'"),
    ({"program": "run.py"}, r"program: expected train.py"),
    ({"command": ["${env}", "${interpreter}", "${program}", "fit", "${args_no_hyphens}"]},
     r"command\[4\]: \$\{args_no_hyphens\}: a local sweep knows"),
    ({"command": ["${env}", "${interpreter}", "${program}", "--config", "x.yaml", "${args}"]},
     r"command\[3\]: expected the train.py subcommand"),
    ({"method": "random", "parameters": {"lr": {"distribution": "loguniform", "min": 1e-5, "max": 1e-3}}},
     r"parameters.lr.distribution: 'loguniform' is not one of W&B's distributions"),
    ({"method": "random", "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-5}}},
     r"parameters.lr.min: min 0.001 is above max 1e-05"),
    ({"method": "random", "parameters": {"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1e-3}}},
     r"parameters.lr.min: log_uniform_values needs 0 < min"),
    ({"method": "random", "parameters": {"lr": {"distribution": "normal", "mu": 0.0}}},
     r"parameters.lr: distribution normal needs sigma"),
    ({"method": "random", "parameters": {"bs": {"values": [16, 32], "probabilities": [0.5, 0.6]}}},
     r"parameters.bs.probabilities: expected 2 non-negative numbers summing to 1"),
    ({"method": "random", "parameters": {"bs": {"distribution": "int_uniform", "min": 8, "max": "64"}}},
     r"parameters.bs.max: expected a number, got '64'"),
    ({"method": "random"}, r"tiny_grid.yaml: method random draws points until stopped; give --count N"),
    ({"method": "grid", "run_cap": 0}, r"tiny_grid.yaml:\d+: run_cap: expected a positive whole number"),
])
def test_a_sweep_file_that_cannot_run_locally_is_one_line_naming_file_line_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], message: str) -> None:
    file = _sweep_file(tmp_path / "tiny_grid.yaml", tmp_path / "exp.yaml", **changes)
    assert sweeps.main([str(file), "--out", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "sweeps").exists()  # nothing written


def test_an_override_of_a_swept_option_or_a_missing_metric_stops(tiny_bert: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_bert)
    file = _sweep_file(tmp_path / "tiny_grid.yaml", exp)
    assert sweeps.main([str(file), "--model.init_args.learning_rate", "0.1"]) == 2
    assert "--model.init_args.learning_rate: the sweep sets it at every point" in capsys.readouterr().err
    # the checkpoint monitors val/loss by default, so results.json has no val/f1: the first run says so and stops
    missing = _sweep_file(tmp_path / "missing.yaml", exp, metric={"name": "val/f1", "goal": "maximize"},
                          parameters={"model.init_args.learning_rate": {"values": [1e-3, 1e-2]}})
    out = tmp_path / "sweeps"
    assert sweeps.main([str(missing), "--out", str(out), "--output_dir", str(tmp_path / "runs"),
                        "--export", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metric.name 'val/f1' is not in" in err and "val/loss" in err
    assert len(list((tmp_path / "runs").glob("*/*/results.json"))) == 1  # it stopped after the first run


def test_a_failed_run_stops_the_sweep_with_the_finished_runs_in_the_table(tiny_bert: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The second point's batch size is invalid: train.py fails, the sweep exits 2, and its table already ranks the
    first point (the table is rewritten after every run, so a stopped sweep still shows what finished)."""
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_bert, extra={"checkpoint": {"monitor": "val/accuracy",
                                                                                     "mode": "max"}})
    file = _sweep_file(tmp_path / "tiny_grid.yaml", exp,
                       parameters={"data.init_args.batch_size": {"values": [16, 0]}})
    out = tmp_path / "sweeps"
    assert sweeps.main([str(file), "--out", str(out), "--output_dir", str(tmp_path / "runs"), "--export", "false"]) == 2
    assert "train.py fit failed with exit code" in capsys.readouterr().err
    md = next(out.glob("tiny_grid-*.md")).read_text()
    assert "1 of 2 runs finished" in md
    with open(next(out.glob("tiny_grid-*.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["data.init_args.batch_size"], r["n"]) for r in rows] == [("16", "1"), ("0", "0")]
    assert rows[0]["mean"] and not rows[1]["mean"]


def test_a_killed_sweep_stops_train_py_and_resumes_with_the_unfinished_point(
        tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kill` (SIGTERM) while the second point trains: train.py stops with the sweep, exit 130 with the --resume
    command; the first point stays recorded; --resume runs the second point alone."""
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_bert, extra={"checkpoint": {"monitor": "val/accuracy",
                                                                                     "mode": "max"}})
    file = _sweep_file(tmp_path / "tiny_grid.yaml", exp)
    out = tmp_path / "sweeps"
    args = [str(file), "--out", str(out), "--output_dir", str(tmp_path / "runs"), "--export", "false"]
    log, err = tmp_path / "sweep.log", tmp_path / "sweep.err"

    def recorded() -> dict[str, Any]:
        paths = list(out.glob("*.json"))
        return json.loads(paths[0].read_text())["runs"] if paths else {}

    code = _kill_when([sys.executable, "-m", "experiments", "sweep", *args], log, err, lambda: "0" in recorded(),
                      lambda: "tiny_grid_p1" in log.read_text())  # inside the second point's train.py
    assert code == 130
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("error: interrupted; finished runs are recorded, continue with: python -m experiments "
                           "sweep ") and last.endswith(" --resume"), last
    assert _train_py_processes(str(tmp_path)) == []
    assert list(recorded()) == ["0"] and "1 of 2 runs finished" in next(out.glob("*.md")).read_text()

    capsys.readouterr()
    assert sweeps.main([*args, "--resume"]) == 0
    launched = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert len(launched) == 1 and "--run_name tiny_grid_p1" in launched[0]
    assert sorted(recorded()) == ["0", "1"] and "2 of 2 runs finished" in next(out.glob("*.md")).read_text()


RANDOM_SPACE = {
    "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
    "layers": {"min": 2, "max": 5},  # W&B infers int_uniform from whole-number bounds
    "dropout": {"min": 0.0, "max": 0.5},  # and uniform from float ones
    "warmup": {"distribution": "q_uniform", "min": 0.0, "max": 0.3, "q": 0.05},
    "bs": {"values": [16, 64], "probabilities": [0.9, 0.1]},
    "scale": {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1.0},
    "noise": {"distribution": "normal", "mu": 1.0, "sigma": 0.1},
    "fixed": {"value": "adamw"},
}


def test_random_search_draws_each_distribution_as_wandb_defines_it_and_the_same_points_from_a_seed(
        tmp_path: Path) -> None:
    spec = sweeps.load_sweep(_sweep_file(tmp_path / "r.yaml", tmp_path / "exp.yaml", method="random",
                                         parameters=RANDOM_SPACE))
    assert spec.parameters["layers"]["distribution"] == "int_uniform"
    assert spec.parameters["dropout"]["distribution"] == "uniform"
    assert spec.parameters["bs"]["distribution"] == "categorical"
    points = spec.draw(400, seed=7)
    assert points[:10] == spec.draw(10, seed=7) and points[:10] != spec.draw(10, seed=8)
    lrs = sorted(p["lr"] for p in points)
    assert 1e-5 <= lrs[0] and lrs[-1] <= 1e-3
    assert 1e-4 / 2 < lrs[200] < 1e-4 * 2  # log-uniform: the median near the geometric mean, not (min + max) / 2
    assert {p["layers"] for p in points} == {2, 3, 4, 5} and all(isinstance(p["layers"], int) for p in points)
    assert all(0.0 <= p["dropout"] <= 0.5 for p in points)
    assert all(abs(p["warmup"] / 0.05 - round(p["warmup"] / 0.05)) < 1e-9 for p in points)
    assert 0.8 < sum(p["bs"] == 16 for p in points) / 400 < 0.97
    scales = sorted(p["scale"] for p in points)
    assert 0.01 <= scales[0] and scales[-1] <= 1.0 and 0.05 < scales[200] < 0.2
    assert 0.9 < sum(p["noise"] for p in points) / 400 < 1.1
    assert {p["fixed"] for p in points} == {"adamw"}


def test_random_search_runs_count_points_and_resume_draws_the_same_ones(tiny_bert: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--count 2 with a sample seed runs two drawn learning rates; --resume --count 3 keeps those two (same seed,
    same first draws) and runs only the third; each run's config has its point's value."""
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_bert, extra={"checkpoint": {"monitor": "val/accuracy",
                                                                                     "mode": "max"}})
    file = _sweep_file(tmp_path / "tiny_random.yaml", exp, method="random",
                       parameters={"model.init_args.learning_rate": {"distribution": "log_uniform_values",
                                                                     "min": 1e-4, "max": 1e-2}})
    out, runs = tmp_path / "sweeps", tmp_path / "runs"
    common = ["--out", str(out), "--output_dir", str(runs), "--export", "false", "--data.max_eval_samples", "32",
              "--data.max_train_samples", "32"]
    assert sweeps.main([str(file), "--count", "2", "--sample_seed", "5", *common]) == 0
    assert "2 random points (sample seed 5)" in capsys.readouterr().out
    assert sweeps.main([str(file), "--count", "3", "--resume", *common]) == 0
    launched = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert len(launched) == 1 and "--run_name tiny_random_p2" in launched[0]
    record = json.loads(next(out.glob("tiny_random-*.json")).read_text())
    assert record["sample_seed"] == 5 and record["count"] == 3 and sorted(record["runs"]) == ["0", "1", "2"]
    drawn = sweeps.load_sweep(file).draw(3, 5)
    assert [record["runs"][str(i)]["params"] for i in range(3)] == drawn
    for run in record["runs"].values():
        config = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        assert config["model"]["init_args"]["learning_rate"] == pytest.approx(drawn[run["point"]][
            "model.init_args.learning_rate"], rel=1e-12)
    assert "3 of 3 runs finished" in next(out.glob("tiny_random-*.md")).read_text()
    assert sweeps.main([str(file), "--resume", "--sample_seed", "6", *common]) == 2
    assert "drew its points with seed 5" in capsys.readouterr().err


def test_a_bayes_file_samples_its_space_locally_with_method_random(capsys: pytest.CaptureFixture[str]) -> None:
    """The repository's Bayes sweep runs here as random search over its space: --count commands, the same ones again
    from the same --sample_seed."""
    file = str(ROOT / "configs" / "sweeps" / "minilm_sst2_lr_batch.yaml")
    outputs = []
    for _ in range(2):
        assert sweeps.main([file, "--method", "random", "--count", "4", "--sample_seed", "11", "--dry_run"]) == 0
        outputs.append(capsys.readouterr().out.strip().splitlines())
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4
    for line in outputs[0]:
        lr = float(re.search(r"--model.init_args.learning_rate=(\S+)", line).group(1))
        assert 1e-5 <= lr <= 2e-4 and re.search(r"--data.init_args.batch_size=(16|32|64) ", line)


def test_the_repository_grid_sweeps_expand_to_train_py_commands_that_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Every grid file in configs/sweeps/: --dry_run prints one command per point, and train.py accepts each."""
    import sys

    grids = [p for p in sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
             if yaml.safe_load(p.read_text())["method"] == "grid"]
    assert any(p.name == "minilm_conll2003.yaml" for p in grids)
    for path in grids:
        spec = sweeps.load_sweep(path)
        assert sweeps.main([str(path), "--dry_run"]) == 0
        commands = capsys.readouterr().out.strip().splitlines()
        assert len(commands) == len(spec.points()) == math.prod(len(v) for v in spec.parameters.values())
        args = commands[0].split()[2:]  # python train.py <args>
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--print_config"], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        config = yaml.safe_load(proc.stdout)
        first = spec.points()[0]
        for key, value in first.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, key
