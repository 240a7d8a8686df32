"""W&B by default, offline without credentials, never a prompt: real offline runs, read back from disk."""

from __future__ import annotations

import os
from pathlib import Path

from experiments.wandb_offline import read_run
from tests.conftest import results, run_train_in_terminal, run_train_subprocess, write_experiment


def _no_credentials_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb")}


def test_offline_run_without_credentials(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "wb.yaml", tiny_bert, logger="wandb", trainer={"max_epochs": 2, "log_every_n_steps": 1},
                           data={"max_train_samples": 96}, extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false"],
                                env=_no_credentials_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: offline (no W&B API key found" in proc.stderr + proc.stdout
    run_dir = next((tmp_path / "runs" / "wb").iterdir())
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1  # fit and the test after it share one W&B run
    assert f"wandb sync {offline_runs[0]}" in proc.stdout
    run = read_run(offline_runs[0])
    val = [row["val/accuracy"] for row in run["history"] if "val/accuracy" in row]
    assert len(val) == 2 and all(0.0 <= v <= 1.0 for v in val)
    assert any("train/loss" in row for row in run["history"])
    assert any("test/accuracy" in row for row in run["history"])
    assert any(k.startswith("train/lr") for row in run["history"] for k in row)
    config = run["config"]
    assert config["params/total"] > 0 and config["params/trainable"] == config["params/total"]
    assert config["config"]["model"]["init_args"]["learning_rate"] == 1e-3  # the resolved config
    assert set(config["git"]) == {"commit", "dirty"}
    assert config["labels"] == ["negative", "positive"]
    assert results(run_dir)["wandb_run"] == str(offline_runs[0])


def test_no_prompt_with_a_terminal_attached(tiny_bert: Path, tmp_path: Path) -> None:
    """With a TTY and no key, wandb.init would ask for a key and wait forever; train.py must not let it."""
    exp = write_experiment(tmp_path / "tty.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 32},
                           trainer={"max_steps": 2, "limit_val_batches": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(_no_credentials_env(tmp_path))
    code, text = run_train_in_terminal(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                        "--export", "false", "--test_after_fit", "false"], env)
    assert code == 0, text[-3000:]
    assert "Enter your choice" not in text and "Create a W&B account" not in text  # wandb's login prompt
    assert "W&B: offline (no W&B API key found" in text
    assert list((tmp_path / "runs").rglob("run-*.wandb"))


def test_wandb_mode_disabled_is_honoured(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "off.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 32},
                           trainer={"max_steps": 2, "limit_val_batches": 1})
    env = {**_no_credentials_env(tmp_path), "WANDB_MODE": "disabled"}
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false",
                                 "--test_after_fit", "false"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: disabled (WANDB_MODE)" in proc.stderr + proc.stdout
    assert not list((tmp_path / "runs").rglob("*.wandb"))


def test_key_but_unreachable_server_goes_offline(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "net.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 32},
                           trainer={"max_steps": 2, "limit_val_batches": 1})
    env = {**_no_credentials_env(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"), "--export", "false",
                                 "--test_after_fit", "false"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: offline (the W&B server is not reachable)" in proc.stderr + proc.stdout
    assert list((tmp_path / "runs").rglob("run-*.wandb"))
    saved = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "x" * 40 not in saved  # the key never lands in the saved config
