"""Compare runs without the W&B dashboard: differing hyper-parameters, final / best metrics, curves.

    python -m experiments compare runs/quickstart/2026-11-28_18-02-11 runs/quickstart/2026-11-28_18-30-40 \
        [--plots out_dir] [--csv table.csv]

A run is a run directory written by train.py (metrics from its W&B offline run, or its CSV log), a
W&B offline run folder (``offline-run-*``), or a CSV logger folder holding ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from experiments.wandb_offline import read_run

# higher is better for these metric names; lower for anything with "loss", "mse", "perplexity"
LOWER_IS_BETTER = ("loss", "mse", "perplexity", "gen_len_error")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k in ("class_path",) and prefix:
                out[prefix.rstrip(".")] = v
                continue
            key = f"{prefix}{k}" if k != "init_args" else prefix.rstrip(".")
            out.update(_flatten(v, f"{key}." if key else ""))
        return out
    return {prefix.rstrip("."): json.dumps(obj) if isinstance(obj, (list, dict)) else obj}


def load_run(path: str | Path) -> dict[str, Any]:
    """``{"name", "config": flat dict, "history": [rows]}`` for a run directory, W&B offline run or CSV log."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run")
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    if (path / "config.yaml").is_file():
        config = _flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    wandb_runs = sorted(path.glob("wandb/offline-run-*")) + sorted(path.glob("wandb/run-*"))
    if path.name.startswith(("offline-run-", "run-")) and list(path.glob("*.wandb")):
        wandb_runs = [path]
    csv_files = sorted(path.rglob("metrics.csv"))
    if wandb_runs:
        for run in wandb_runs:  # a resumed run has one folder per launch; their histories join
            data = read_run(run)
            history.extend(data["history"])
            if not config:
                config = _flatten(data["config"].get("config", {}))
    elif csv_files:
        with open(csv_files[0], newline="") as f:
            for row in csv.DictReader(f):
                history.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    else:
        raise FileNotFoundError(f"{path}: neither a W&B offline run nor a CSV log (metrics.csv) found")
    name = path.name if path.name not in ("", ".") else str(path)
    if path.parent.name and not path.name.startswith(("offline-run-", "run-")):
        name = f"{path.parent.name}/{path.name}"
    return {"name": name, "config": config, "history": history}


def step_of(row: dict[str, Any]) -> float:
    return row.get("trainer/global_step", row.get("step", row.get("_step", 0)))


def summarize(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per metric: final value and best value (max, or min for losses) over the run's history."""
    series: dict[str, list[float]] = {}
    for row in run["history"]:
        for key, value in row.items():
            if "/" in key and isinstance(value, (int, float)) and not key.startswith(("_", "trainer/")) and math.isfinite(value):
                series.setdefault(key, []).append(float(value))
    out = {}
    for key, values in series.items():
        lower = any(word in key for word in LOWER_IS_BETTER)
        out[key] = {"final": values[-1], "best": min(values) if lower else max(values)}
    return out


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs (run-specific paths and the published-results block left out)."""
    skip = ("trainer.default_root_dir", "checkpoint.dirpath", "trainer.logger.save_dir", "output_dir")
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1 and not k.endswith(skip)
            and not k.startswith("reference.")]


def table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = differing([r["config"] for r in runs])
    summaries = [summarize(r) for r in runs]
    metrics = sorted({m for s in summaries for m in s if m.startswith(("val/", "test/"))}) or \
        sorted({m for s in summaries for m in s})
    header = ["run", *keys]
    for m in metrics:
        header += [f"{m} (final)", f"{m} (best)"] if m.startswith("val/") else [m]
    rows = []
    for run, summary in zip(runs, summaries):
        row = [run["name"], *[str(run["config"].get(k, "")) for k in keys]]
        for m in metrics:
            value = summary.get(m)
            cells = [value["final"], value["best"]] if m.startswith("val/") else [value["final"] if value else None]
            if value is None and m.startswith("val/"):
                cells = [None, None]
            row += ["" if c is None else f"{c:.4f}" for c in cells]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per metric: every run's curve against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = sorted({k for r in runs for row in r["history"] for k in row
                      if "/" in k and not k.startswith(("_", "trainer/")) and not k.startswith("test/")})
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in runs:
            points = [(step_of(row), row[metric]) for row in run["history"] if isinstance(row.get(metric), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=run["name"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (metric.replace("/", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, W&B offline runs or CSV log folders")
    p.add_argument("--plots", default="compare_plots", help="folder for the learning-curve PNGs")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    a = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in a.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    header, rows = table(runs)
    print(markdown(header, rows))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    written = plot(runs, Path(a.plots))
    print(f"\n{len(written)} plots in {a.plots}/: {', '.join(p.name for p in written)}")
    return 0
