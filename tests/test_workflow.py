"""The experiment workflow: presets, W&B naming / resume / artifacts, sweeps, and `experiments compare`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from experiments.wandb_offline import read_run, records, run_file
from tests.conftest import ROOT, run_train, run_train_subprocess, write_experiment

PRESETS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))


def _home(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "NETRC": str(home / ".netrc")}


def print_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    """The config train.py resolves for ``args`` (parsed in this process: no model is built)."""
    capsys.readouterr()
    code, _ = run_train([*args, "--print_config"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return yaml.safe_load(out.out)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_trainer_presets_compose_with_an_experiment(preset: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = print_config(["fit", "--config", str(ROOT / "experiments/quickstart.yaml"), "--config", str(preset)], capsys)
    expected = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in expected.items():
        got = cfg["trainer"][key]
        assert (got.get("class_path") if isinstance(value, dict) else got) == (value.get("class_path") if isinstance(value, dict) else value)
    assert cfg["model"]["class_path"].endswith("TextClassificationModule")  # the experiment is untouched


def test_deepspeed_missing_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed here")
    except ImportError:
        pass
    proc = run_train_subprocess(["fit", "--config", "experiments/quickstart.yaml", "--config",
                                 "configs/trainer/deepspeed_zero2.yaml", "--output_dir", str(tmp_path / "r")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: trainer.strategy: deepspeed_stage_2 needs the optional package "
                                                    "deepspeed (pip install deepspeed; it needs a CUDA toolchain)")


@pytest.fixture(scope="module")
def wandb_runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two offline W&B runs with different learning rates, named, grouped and tagged; the second resumed once."""
    tmp = tmp_path_factory.mktemp("wandb_runs")
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"project": "tuneforge", "tags": ["tiny", "test"], "notes": "workflow test", "log_model": True},
              "dict_kwargs": {"group": "lr-study", "job_type": "train"}}
    runs = {}
    for lr in ("0.001", "0.0003"):
        exp = write_experiment(tmp / f"lr{lr}.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 96},
                               trainer={"max_epochs": 1, "log_every_n_steps": 1, "logger": logger},
                               model={"learning_rate": float(lr)})
        args = ["fit", "--config", str(exp), "--output_dir", str(tmp / "runs"), "--export", "false",
                "--checkpoint.save_last", "true"]
        proc = run_train_subprocess(args, env=_home(tmp))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[lr] = next((tmp / "runs" / f"lr{lr}").iterdir())
    # resume the second run for one more epoch from its last checkpoint
    exp = tmp / "lr0.0003.yaml"
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs"), "--export", "false",
                                 "--checkpoint.save_last", "true", "--ckpt_path", "last", "--trainer.max_epochs", "2"],
                                env=_home(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["tmp"] = tmp
    return runs


def test_wandb_name_group_tags_notes_and_artifact(wandb_runs: dict[str, Path]) -> None:
    offline = sorted((wandb_runs["0.001"] / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run = read_run(offline[0])
    assert (run["name"], run["group"], run["job_type"], run["notes"]) == ("lr0.001", "lr-study", "train", "workflow test")
    assert run["tags"] == ["tiny", "test"]
    artifacts = [r.artifact for r in records(run_file(offline[0])) if r.WhichOneof("record_type") == "artifact"]
    assert artifacts and artifacts[0].type == "model"  # the best checkpoint, uploaded by `wandb sync`


def test_resume_continues_the_same_run(wandb_runs: dict[str, Path]) -> None:
    run_dir = wandb_runs["0.0003"]
    assert len(list(run_dir.parent.iterdir())) == 1  # no second run directory
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    ids = {read_run(o)["run_id"] for o in offline}
    assert len(ids) == 1  # the same W&B run id: `wandb sync` appends the second part
    assert list(run_dir.glob("config.resumed-*.yaml")) and (run_dir / "config.yaml").is_file()
    second = read_run(offline[1])["history"]
    assert min(row["trainer/global_step"] for row in second if "trainer/global_step" in row) > 0  # continued, not restarted
    assert any(row.get("epoch") == 1 for row in second)


def test_compare_table_and_plots(wandb_runs: dict[str, Path], tmp_path: Path) -> None:
    import subprocess

    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "experiments", "compare", str(wandb_runs["0.001"]), str(wandb_runs["0.0003"]),
                           "--plots", str(plots), "--csv", str(tmp_path / "t.csv")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "model.learning_rate" in header and "val/accuracy (best)" in header and "test/accuracy" in header
    assert "trainer.max_epochs" not in header  # only differing hyper-parameters
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| lr")]
    assert len(rows) == 2 and "0.001" in rows[0] and "0.0003" in rows[1]
    assert all(re.search(r"\| 0\.\d{4} \|", r) for r in rows)
    pngs = {p.name for p in plots.glob("*.png")}
    assert {"val_accuracy.png", "train_loss.png", "val_loss.png"} <= pngs
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (tmp_path / "t.csv").read_text().count("\n") == 3


def test_compare_writes_only_what_it_is_asked_for(wandb_runs: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The table alone is a print: no plot folder appears in the working directory unless --plots names one."""
    from experiments.compare import main as compare_main

    monkeypatch.chdir(tmp_path)
    assert compare_main([str(wandb_runs["0.001"]), str(wandb_runs["0.0003"])]) == 0
    assert "model.learning_rate" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_compare_reads_csv_logs(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "csv.yaml", tiny_bert, data={"max_train_samples": 64}, trainer={"log_every_n_steps": 1})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from experiments.compare import load_run, summarize

    run = load_run(next((tmp_path / "runs" / "csv").iterdir()))
    summary = summarize(run)
    assert summary["val/loss"]["best"] <= summary["val/loss"]["final"] + 1e-12
    assert "test/accuracy" in summary


@pytest.mark.parametrize("sweep", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_files_validate_and_their_command_parses(sweep: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.config.schema import fill_validate_schema

    config = yaml.safe_load(sweep.read_text())
    fill_validate_schema(config)  # W&B's own sweep schema (raises on an invalid file)
    args = []
    for key, spec in config["parameters"].items():
        value = spec["values"][-1] if "values" in spec else spec["max"]
        args.append(f"--{key}={value}")  # how the W&B agent renders ${args}
    command = [a for a in config["command"] if a not in ("${env}", "${interpreter}", "${program}")]
    assert command[0] == "fit" and config["command"][-1] == "${args}"
    monkeypatch.chdir(ROOT)  # the agent runs the command from the repository root
    printed = print_config([*command[:-1], *args], capsys)
    for key, spec in config["parameters"].items():
        node = printed
        for part in key.split("."):
            node = node[part]
        expected = spec["values"][-1] if "values" in spec else spec["max"]
        assert node == pytest.approx(expected)
    assert printed["checkpoint"]["monitor"] == config["metric"]["name"]


def test_compare_leaves_out_run_paths_and_the_reference_block() -> None:
    from experiments.compare import differing

    configs = [{"model.learning_rate": lr, "output_dir": f"/tmp/{lr}", "reference.published": [lr]} for lr in (1e-3, 3e-4)]
    assert differing(configs) == ["model.learning_rate"]
