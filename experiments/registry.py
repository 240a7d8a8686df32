"""Paper baselines: the experiment files that carry published numbers, listed and reproduced.

    python -m experiments list [--format markdown|csv|json]
    python -m experiments reproduce NAME [--results_table runs/reproduce_results] [train.py options ...]

An experiment file (``experiments/<model>/<dataset>.yaml``) states its published results in a top-level
``reference`` block, which ``train.py`` accepts and training ignores. The block is the single source of
truth for ``list`` and ``reproduce``:

    reference:
      task: text classification
      model: bert-base-uncased
      dataset: GLUE SST-2 (hub nyu-mll/glue, sst2)
      split: validation            # the split the published numbers are on: validation or test
      variant: paper               # paper: the source's setup; local: runs on this machine's models and data
      procedure: fit               # fit, then evaluate the best checkpoint; evaluate: no training (zero-shot)
      published:                   # may be empty for a local variant without a comparable published number
        - label: bert_paper        # short name, used in W&B summary keys
          source: Devlin et al. 2019 (BERT), Table 5, BERT-BASE, dev accuracy
          verified: primary        # primary: read in the source itself; secondary: read in a copy or
                                   # citation of it; unverified: not found, taken from elsewhere
          read_at: where it was read
          metrics: {accuracy: 92.7}
          scale: 100               # published = ours * scale (accuracy etc. are logged as fractions; SQuAD EM/F1: 1)
          setup: what that source ran, where it differs from this file
      notes: anything a reader must know before comparing

``reproduce`` runs ``train.py fit`` with the file (plus the overrides), evaluates the best checkpoint on the
published split (the test after fit, or ``train.py validate --ckpt_path <best>``), then appends one row per
published metric ("ours vs published, delta") to a CSV table, re-renders it as Markdown, writes the rows
into the run directory (``reproduce.json``) and into the run's W&B summary (``reproduce/...`` keys; an offline
run is re-opened with the same id and ``resume="allow"``, so ``wandb sync`` uploads both parts into one run).

``reproduce NAME --seeds 13,21,42 [--resume]`` does that once per seed (``--seed_everything <seed>``, and
``--data.few_shot_seed <seed>`` when the config draws a few-shot sample, as LM-BFF varies its data splits), each in
its own run directory and W&B run (named ``<run name>_seed<seed>``, all in one W&B group named after the
reproduction), then appends one row per published metric: mean +- sample standard deviation (n - 1), min / max, n,
published, delta = mean - published and the gap in standard deviations. Each finished seed is recorded at once, and
atomically, in ``<results table folder>/reproductions/<reproduction id>.json``; ``--resume`` continues the newest
reproduction of the same experiment and overrides, skipping its finished seeds (a seed that was interrupted is run
again).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TRAIN = ROOT / "train.py"
SPLITS = ("validation", "test")
VARIANTS = ("paper", "local")
PROCEDURES = ("fit", "evaluate")
VERIFIED = ("primary", "secondary", "unverified")
REFERENCE_KEYS = {"task", "model", "dataset", "split", "variant", "procedure", "published", "notes"}
REQUIRED_KEYS = ("task", "model", "dataset", "split", "variant", "published")
PUBLISHED_KEYS = {"label", "source", "verified", "read_at", "metrics", "scale", "setup", "note"}
# ours is the mean over the n seeds (one run: its value); std is the sample standard deviation (n - 1), empty for
# n = 1; gap_std = delta / std. A multi-seed row names its reproduction record instead of one run directory.
ROW_FIELDS = ("date", "experiment", "variant", "split", "metric", "ours", "std", "min", "max", "n", "seeds", "published",
              "delta", "gap_std", "source", "verified", "overrides", "hardware", "wall_time_s", "run_dir",
              "reproduction", "command")
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


class RegistryError(ValueError):
    """A bad reference block or an unknown experiment: one line naming the file, line and key."""


@dataclass
class Published:
    """One published result: its source and the metric values, in the source's units."""

    label: str
    source: str
    verified: str
    metrics: dict[str, float]
    scale: float = 100.0
    read_at: str = ""
    setup: str = ""
    note: str = ""


@dataclass
class Experiment:
    """An experiment file with a reference block."""

    name: str
    path: Path
    task: str
    model: str
    dataset: str
    split: str
    variant: str
    procedure: str = "fit"
    published: list[Published] = field(default_factory=list)
    notes: str = ""

    @property
    def stage_prefix(self) -> str:
        return "val" if self.split == "validation" else "test"


# ---- reading reference blocks -------------------------------------------------------------------

def _line(path: Path, keys: list[Any]) -> int | None:
    """1-based line of a nested key (str for mapping keys, int for list items) in a YAML file."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _fail(path: Path, keys: list[Any], what: str) -> RegistryError:
    line = _line(path, keys)
    dotted = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    return RegistryError(f"{_display(path)}{f':{line}' if line else ''}: {dotted}: {what}")


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def experiment_name(path: Path) -> str:
    """``experiments/bert_base/sst2.yaml`` -> ``bert_base/sst2``; a file elsewhere is named by its path."""
    try:
        return path.resolve().relative_to(EXPERIMENTS).with_suffix("").as_posix()
    except ValueError:
        return str(path)


def load_experiment(path: str | Path) -> Experiment | None:
    """The experiment described by ``path``'s reference block; None when the file has none."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise RegistryError(f"{_display(path)}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RegistryError(f"{_display(path)}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    ref = config.get("reference") if isinstance(config, dict) else None
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise _fail(path, ["reference"], "expected a mapping")
    for key in ref:
        if key not in REFERENCE_KEYS:
            raise _fail(path, ["reference", key], f"unknown key (expected {', '.join(sorted(REFERENCE_KEYS))})")
    for key in REQUIRED_KEYS:
        if key not in ref:
            raise _fail(path, ["reference"], f"missing key '{key}'")
    for key in ("task", "model", "dataset"):
        if not isinstance(ref[key], str) or not ref[key].strip():
            raise _fail(path, ["reference", key], f"expected a non-empty string, got {ref[key]!r}")
    for key, allowed in (("split", SPLITS), ("variant", VARIANTS), ("procedure", PROCEDURES)):
        if key in ref and ref[key] not in allowed:
            raise _fail(path, ["reference", key], f"expected one of {', '.join(allowed)}, got {ref[key]!r}")
    if not isinstance(ref["published"], list):
        raise _fail(path, ["reference", "published"], "expected a list of published results")
    if not ref["published"] and ref["variant"] == "paper":
        raise _fail(path, ["reference", "published"], "a paper variant needs at least one published result")
    published = [_published(path, i, entry) for i, entry in enumerate(ref["published"])]
    labels = [p.label for p in published]
    if len(set(labels)) != len(labels):
        raise _fail(path, ["reference", "published"], f"labels must be distinct, got {labels}")
    return Experiment(
        name=experiment_name(path), path=path, task=ref["task"], model=ref["model"], dataset=ref["dataset"],
        split=ref["split"], variant=ref["variant"], procedure=ref.get("procedure", "fit"), published=published,
        notes=str(ref.get("notes") or "").strip(),
    )


def _published(path: Path, i: int, entry: Any) -> Published:
    keys: list[Any] = ["reference", "published", i]
    if not isinstance(entry, dict):
        raise _fail(path, keys, "expected a mapping with label, source, verified, metrics")
    for key in entry:
        if key not in PUBLISHED_KEYS:
            raise _fail(path, [*keys, key], f"unknown key (expected {', '.join(sorted(PUBLISHED_KEYS))})")
    for key in ("label", "source", "verified", "metrics"):
        if key not in entry:
            raise _fail(path, keys, f"missing key '{key}'")
    if not isinstance(entry["label"], str) or not re.fullmatch(r"[a-z0-9_]+", entry["label"]):
        raise _fail(path, [*keys, "label"], f"expected lower-case letters, digits and _, got {entry['label']!r}")
    if entry["verified"] not in VERIFIED:
        raise _fail(path, [*keys, "verified"], f"expected one of {', '.join(VERIFIED)}, got {entry['verified']!r}")
    if entry["verified"] != "unverified" and not str(entry.get("read_at") or "").strip():
        raise _fail(path, keys, "missing key 'read_at' (where the number was read; or set verified: unverified)")
    metrics = entry["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise _fail(path, [*keys, "metrics"], "expected a mapping of metric name to published value")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, [*keys, "metrics", name], f"expected a number, got {value!r}")
    scale = entry.get("scale", 100)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise _fail(path, [*keys, "scale"], f"expected a positive number, got {scale!r}")
    return Published(label=entry["label"], source=str(entry["source"]).strip(), verified=entry["verified"],
                     metrics={str(k): float(v) for k, v in metrics.items()}, scale=float(scale),
                     read_at=str(entry.get("read_at") or "").strip(), setup=str(entry.get("setup") or "").strip(),
                     note=str(entry.get("note") or "").strip())


def discover(root: Path = EXPERIMENTS) -> list[Experiment]:
    """Every experiment file under ``root`` with a reference block, sorted by name."""
    found = [load_experiment(p) for p in sorted(root.rglob("*.yaml")) if "data" not in p.relative_to(root).parts[:1]]
    return sorted((e for e in found if e is not None), key=lambda e: e.name)


def find(name: str, root: Path = EXPERIMENTS) -> Experiment:
    """The experiment called ``name`` (``bert_base/sst2``), or the one in the YAML file ``name``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        exp = load_experiment(path)
        if exp is None:
            raise RegistryError(f"{name}: no reference block (see `python -m experiments list`)")
        return exp
    experiments = discover(root)
    for exp in experiments:
        if exp.name == name.removesuffix(".yaml"):
            return exp
    raise RegistryError(f"unknown experiment '{name}'; known: {', '.join(e.name for e in experiments)}")


# ---- list ---------------------------------------------------------------------------------------

LIST_COLUMNS = ("name", "variant", "task", "model", "dataset", "split", "metric", "published", "source", "verified")


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}".rstrip("0").rstrip(".")


def list_rows(experiments: list[Experiment]) -> list[dict[str, str]]:
    """One row per experiment and published source (a local variant without one gets a row of dashes)."""
    rows = []
    for exp in experiments:
        base = {"name": exp.name, "variant": exp.variant, "task": exp.task, "model": exp.model,
                "dataset": exp.dataset, "split": exp.split}
        if not exp.published:
            rows.append({**base, "metric": "-", "published": "-", "source": "none comparable (see notes)",
                         "verified": "-"})
        for p in exp.published:
            values = " / ".join(_number(v) for v in p.metrics.values())
            rows.append({**base, "metric": " / ".join(p.metrics), "published": values, "source": p.source,
                         "verified": p.verified})
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cmd_list(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments list",
                                     description="The paper baselines and local variants with their published numbers.")
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    args = parser.parse_args(argv)
    experiments = discover()
    if args.format == "json":
        print(json.dumps([{**asdict(e), "path": str(e.path.relative_to(ROOT))} for e in experiments], indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=LIST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(list_rows(experiments))
    else:
        print(markdown_table(list_rows(experiments), LIST_COLUMNS), end="")
    return 0


# ---- reproduce ----------------------------------------------------------------------------------

def run_train(subcommand: str, args: list[str], python: str = sys.executable,
              env: dict[str, str] | None = None) -> Path:
    """Run ``train.py <subcommand> <args>`` in a fresh process, echo its output, return its run directory."""
    cmd = [python, str(TRAIN), subcommand, *args]
    print(f"$ {shlex.join(cmd)}", flush=True)
    run_dir = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1,
                          env=None if env is None else {**os.environ, **env}) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                if line.startswith("Run directory:"):
                    run_dir = Path(line.split(":", 1)[1].strip())
        except BaseException:  # Ctrl-C or a kill of this process: never leave train.py running on its own
            _stop(proc)
            raise
    sys.stdout.flush()
    if proc.returncode != 0:
        raise RegistryError(f"train.py {subcommand} failed with exit code {proc.returncode} (see its output above)")
    if run_dir is None or not (run_dir / "results.json").is_file():
        raise RegistryError(f"train.py {subcommand} finished without a results.json to read")
    return run_dir


def _stop(proc: subprocess.Popen, grace_s: float = 120.0) -> None:
    """SIGTERM (train.py saves last.ckpt after the running batch and exits), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def hardware() -> str:
    """The accelerator the runs used (first CUDA device, else the CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def _config_args(exp: Experiment) -> list[str]:
    config = ["--config", str(exp.path)]
    if "/" in exp.name and not Path(exp.name).is_absolute():  # runs/bert_base_sst2/..., not runs/sst2/ for every model
        config += ["--run_name", exp.name.replace("/", "_")]
    return config


def resolve_config(exp: Experiment, overrides: list[str], python: str = sys.executable) -> dict[str, Any]:
    """train.py's fully resolved config of the experiment plus ``overrides`` (``fit --print_config``).

    It checks the overrides before anything runs, and tells what the options decide: the seed, the run name, the
    loggers, whether a few-shot sample is drawn.
    """
    cmd = [python, str(TRAIN), "fit", *_config_args(exp), *overrides, "--print_config"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # errors: to stderr
    if proc.returncode != 0:
        print(f"$ {shlex.join(cmd)}", flush=True)
        raise RegistryError(f"train.py fit failed with exit code {proc.returncode} (see its output above)")
    try:
        config = yaml.safe_load(proc.stdout)
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise RegistryError(f"`{shlex.join(cmd)}` printed no config to read")
    return config


def few_shot(config: dict[str, Any]) -> bool:
    """Whether the resolved config trains on a few-shot sample (``data.init_args.few_shot_k`` set)."""
    data = config.get("data") or {}
    return isinstance(data, dict) and (data.get("init_args") or {}).get("few_shot_k") is not None


def procedure(exp: Experiment, config: dict[str, Any]) -> str:
    """The file's procedure, except that a few-shot sample means training: fit even an evaluate-only file."""
    return "fit" if few_shot(config) else exp.procedure


def _procedure_note(exp: Experiment, config: dict[str, Any]) -> str:
    proc = procedure(exp, config)
    if proc != exp.procedure:
        print(f"{exp.name}: a few-shot sample (data.few_shot_k={config['data']['init_args']['few_shot_k']}) is "
              "trained on: fit, although the file's procedure is evaluate", flush=True)
    return proc


def _seed_of(config: dict[str, Any]) -> str:
    seed = config.get("seed_everything")
    return str(seed) if isinstance(seed, int) and not isinstance(seed, bool) else ""  # true: drawn at run time


def evaluate(exp: Experiment, overrides: list[str], python: str = sys.executable, proc: str | None = None,
             env: dict[str, str] | None = None) -> tuple[Path, dict[str, float], dict[str, Any]]:
    """Fit (unless the procedure is evaluate-only) and score the published split: (run dir, metrics, fit results)."""
    config = [*_config_args(exp), *overrides]
    if (proc or exp.procedure) == "evaluate":
        sub = "test" if exp.split == "test" else "validate"
        run_dir = run_train(sub, config, python, env)
        res = json.loads((run_dir / "results.json").read_text())
        return run_dir, res.get("test" if sub == "test" else "validate") or {}, res
    run_dir = run_train("fit", config, python, env)
    res = json.loads((run_dir / "results.json").read_text())
    if exp.split == "test":
        if not res.get("test"):
            raise RegistryError(f"{exp.name}: the published numbers are on the test split, but the fit tested nothing "
                                "(no test data configured, or --test_after_fit false)")
        return run_dir, res["test"], res
    if not res.get("best_checkpoint"):
        raise RegistryError(f"{exp.name}: the fit wrote no checkpoint to evaluate")
    # the best checkpoint on the full validation split, into a folder inside the fit's run directory, without a logger
    eval_dir = run_train("validate", [*config, "--ckpt_path", res["best_checkpoint"], "--output_dir", str(run_dir),
                                      "--run_name", "reproduce", "--trainer.logger", "false"], python, env)
    metrics = json.loads((eval_dir / "results.json").read_text()).get("validate") or {}
    return run_dir, metrics, res


def comparison_rows(exp: Experiment, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per published metric: ours (in the source's units), published, delta = ours - published."""
    prefix = exp.stage_prefix
    rows = []
    for p in exp.published:
        for name, value in p.metrics.items():
            ours = metrics.get(f"{prefix}/{name}")
            ours = None if ours is None else float(ours) * p.scale
            rows.append({"metric": f"{prefix}/{name}", "ours": ours, "published": value,
                         "delta": None if ours is None else ours - value, "source": p.source, "verified": p.verified,
                         "label": p.label})
    if not exp.published:  # a local variant without a comparable number: report what was measured
        for key in sorted(k for k in metrics if k.startswith(f"{prefix}/") and not k.endswith("/loss")):
            rows.append({"metric": key, "ours": float(metrics[key]), "published": None, "delta": None,
                         "source": "none comparable", "verified": "-", "label": ""})
    return rows


def spread(values: list[float]) -> dict[str, Any]:
    """n, mean, sample standard deviation (n - 1; None for one value), min and max of ``values``."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def gap_in_std(mean: float, std: float | None, published: float | None) -> float | None:
    """(mean - published) / std; 0 when the seeds all hit the published number exactly; None when undefined
    (one seed, no published number, or no spread at a distance from it)."""
    if published is None or std is None:
        return None
    if std == 0:
        return 0.0 if mean == published else None
    return (mean - published) / std


def seed_rows(exp: Experiment, metrics_by_seed: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per published metric over the seeds: ours = mean, std, min, max, n, delta = mean - published,
    gap_std = delta / std. A seed that did not report a metric does not count in its n."""
    per_seed = {seed: comparison_rows(exp, metrics) for seed, metrics in metrics_by_seed.items()}
    rows = []
    for i, first in enumerate(next(iter(per_seed.values()), [])):
        values = [rows_[i]["ours"] for rows_ in per_seed.values() if i < len(rows_) and rows_[i]["ours"] is not None]
        seeds = [seed for seed, rows_ in per_seed.items() if i < len(rows_) and rows_[i]["ours"] is not None]
        row = {**first, "ours": None, "std": None, "min": None, "max": None, "n": 0, "delta": None, "gap_std": None,
               "seeds": ",".join(map(str, seeds))}
        if values:
            s = spread(values)
            row.update(ours=s["mean"], std=s["std"], min=s["min"], max=s["max"], n=s["n"],
                       gap_std=gap_in_std(s["mean"], s["std"], first["published"]))
            if first["published"] is not None:
                row["delta"] = s["mean"] - first["published"]
        rows.append(row)
    return rows


def places(*values: Any) -> int:
    """Decimals to show a metric with: 4 on a 0-1 scale (accuracy 0.7667 ± 0.0360, where two would hide the
    spread), 2 on a 0-100 one (F1 81.97 ± 0.13)."""
    numbers = [abs(float(v)) for v in values if v not in (None, "")]
    return 4 if numbers and max(numbers) <= 1 else 2


def _fmt(value: float | None, sign: bool = False, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _read_table(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_results_table(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Append rows to ``<stem>.csv`` and re-render all of it as ``<stem>.md``.

    A table written before the multi-seed columns existed is rewritten once with them (its rows: n empty)."""
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if csv_path.exists():
        header, old = _read_table(csv_path)
        if tuple(header) != ROW_FIELDS:
            tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
            os.replace(tmp, csv_path)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    _, table = _read_table(csv_path)
    for row in table:
        n = int(row["n"]) if row.get("n") else None
        std = float(row["std"]) if row.get("std") else None
        d = places(row["ours"], row["published"], row.get("min"), row.get("max"))
        row["ours"] = "-" if not row["ours"] else f"{float(row['ours']):.{d}f}" + ("" if std is None else f" ± {std:.{d}f}")
        row["published"] = f"{float(row['published']):.{d}f}" if row["published"] else "-"
        row["delta"] = f"{float(row['delta']):+.{d}f}" if row["delta"] else "-"
        if row.get("gap_std"):
            row["gap_std"] = f"{float(row['gap_std']):+.2f}"
        elif n == 1 and row["published"] != "-":
            row["gap_std"] = "n/a (1 seed)"
        elif std == 0 and row["published"] != "-":
            row["gap_std"] = "n/a (std 0)"
        else:
            row["gap_std"] = "-"
        row["min / max"] = f"{float(row['min']):.{d}f} / {float(row['max']):.{d}f}" if n and n > 1 else "-"
        row["n"] = row.get("n") or "1"  # rows from before the n column were single runs
        row["wall_time_s"] = f"{float(row['wall_time_s']):.0f} s" if row["wall_time_s"] else ""
        row["overrides"] = f"`{row['overrides']}`" if row["overrides"] else "(none)"
        row["run_dir"] = row["run_dir"] or row.get("reproduction") or ""
    columns = ("date", "experiment", "variant", "metric", "n", "ours", "published", "delta", "gap_std", "min / max",
               "seeds", "source", "overrides", "hardware", "wall_time_s", "run_dir")
    md_path.write_text("# Reproduced results (written by `python -m experiments reproduce`)\n\n"
                       "In the source's units. ours: one run's value, or over n seeds the mean ± the sample standard "
                       "deviation (n - 1); delta = ours - published; gap_std = delta / std (n/a for one seed, or no "
                       "spread); wall_time_s: all seeds together; run_dir: the run, or the reproduction record listing "
                       "every seed's run.\n\n" + markdown_table(table, columns), encoding="utf-8")
    return csv_path, md_path


def wandb_summary(run_dir: Path, wandb_run: str | None, summary: dict[str, Any],
                  group: str | None = None) -> str | None:
    """Add ``summary`` to the W&B run of ``run_dir`` by re-opening it with its id; returns the run id."""
    if not wandb_run:
        return None
    folder = Path(wandb_run)
    match = re.fullmatch(r"(offline-)?run-\d{8}_\d{6}-(\w+)", folder.name)
    if match is None:
        raise RegistryError(f"{folder}: not a W&B run folder (offline-run-<time>-<id> or run-<time>-<id>)")
    run_id = match.group(2)
    logger = _wandb_logger_args(run_dir / "config.yaml")
    import wandb

    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), project=logger.get("project") or "tuneforge",
                     entity=logger.get("entity"), group=group, mode="offline" if match.group(1) else "online",
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        run.summary.update(summary)
    finally:
        run.finish()
        wandb.teardown()  # finish() can return before the offline run file is complete; this waits for it
    return run_id


def _wandb_loggers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The init_args of every WandbLogger in a resolved config."""
    loggers = (config.get("trainer") or {}).get("logger")
    return [logger.get("init_args") or {} for logger in (loggers if isinstance(loggers, list) else [loggers])
            if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")]


def _wandb_logger_args(config_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    found = _wandb_loggers(config) if isinstance(config, dict) else []
    return found[0] if found else {}


def _summary(exp: Experiment, overrides: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"reproduce/experiment": exp.name, "reproduce/variant": exp.variant,
                               "reproduce/overrides": shlex.join(overrides)}
    for row in rows:
        if row["ours"] is not None:
            summary[f"reproduce/{row['metric']}/ours"] = row["ours"]
        if row["label"]:
            summary[f"reproduce/{row['label']}/{row['metric']}/published"] = row["published"]
            if row["delta"] is not None:
                summary[f"reproduce/{row['label']}/{row['metric']}/delta"] = row["delta"]
    return summary


def _print_wandb(run_id: str | None, res: dict[str, Any], run_dir: Path) -> None:
    if run_id is None:
        print("W&B summary:     no W&B run (logger off)", flush=True)
    else:
        offline = Path(res["wandb_run"]).name.startswith("offline-")
        sync = f" (offline; upload later with: wandb sync {run_dir / 'wandb' / 'offline-run-*'})" if offline else ""
        print(f"W&B summary:     run {run_id}{sync}", flush=True)


def reproduce(exp: Experiment, overrides: list[str], results_table: Path, python: str = sys.executable,
              config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the experiment, compare with its published numbers, and record the comparison everywhere."""
    config = resolve_config(exp, overrides, python) if config is None else config
    proc = _procedure_note(exp, config)
    start = time.time()
    run_dir, metrics, res = evaluate(exp, overrides, python, proc)
    wall = time.time() - start
    rows = comparison_rows(exp, metrics)
    command = shlex.join(["python", "-m", "experiments", "reproduce", exp.name, *overrides])
    common = {"date": time.strftime("%Y-%m-%d %H:%M"), "experiment": exp.name, "variant": exp.variant,
              "split": exp.split, "overrides": shlex.join(overrides), "hardware": hardware(),
              "wall_time_s": round(wall, 1), "run_dir": str(run_dir), "command": command,
              "n": 1, "seeds": _seed_of(config)}
    rows = [{**common, **row, "min": row["ours"], "max": row["ours"]} for row in rows]
    (run_dir / "reproduce.json").write_text(json.dumps(rows, indent=2) + "\n")
    csv_path, md_path = write_results_table(results_table, rows)
    run_id = wandb_summary(run_dir, res.get("wandb_run"), _summary(exp, overrides, rows))
    print(f"\n{exp.name} ({exp.variant}, {exp.split} split){' with ' + common['overrides'] if overrides else ''}:")
    for row in rows:
        d = places(row["ours"], row["published"])
        print(f"  {row['metric']}: ours {_fmt(row['ours'], digits=d)} vs {_fmt(row['published'], digits=d)} "
              f"(delta {_fmt(row['delta'], sign=True, digits=d)})  [{row['source']}]")
    print(f"Results table:   {csv_path} and {md_path}")
    _print_wandb(run_id, res, run_dir)
    return rows


# ---- reproduce over several seeds ---------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """``"13,21,42"`` -> [13, 21, 42]; anything else is a one-line error naming --seeds."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise RegistryError(f"--seeds: expected integers separated by commas (e.g. 13,21,42), got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        dup = next(s for s in seeds if seeds.count(s) > 1)
        raise RegistryError(f"--seeds: seed {dup} is given twice in {text!r} (each seed is one run)")
    if max(seeds) > MAX_SEED:
        raise RegistryError(f"--seeds: seeds must lie in 0..{MAX_SEED}, got {max(seeds)}")
    return seeds


def _given(overrides: list[str], *options: str) -> str | None:
    """The first of ``options`` that ``overrides`` sets (``--opt value`` or ``--opt=value``)."""
    for arg in overrides:
        for option in options:
            if arg == option or arg.startswith(option + "="):
                return option
    return None


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """What must stay the same for seeds to belong to one reproduction: the resolved config, less the published
    numbers (correcting a reference does not change what was run)."""
    return {k: v for k, v in config.items() if k != "reference"}


def _difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first key where two resolved configs differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            found = _difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    return None if a == b else f"{key or '(config)'}: {a!r} then, {b!r} now"


def _write_json(path: Path, data: Any) -> None:
    """Write JSON so that a kill at any moment leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_reproduction(records: Path, exp: Experiment, overrides: list[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest reproduction record of ``exp`` with exactly these overrides."""
    found = []
    for path in records.glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("experiment") == exp.name and record.get("overrides") == overrides:
            found.append((str(record.get("created", "")), path.name, path, record))
    return max(found)[2:] if found else None


def new_reproduction(records: Path, exp: Experiment, overrides: list[str], config: dict[str, Any],
                     run_name: str) -> tuple[Path, dict[str, Any]]:
    """A fresh record (not yet written): its id names the W&B group, unless the config sets a group itself."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rid, i = f"{run_name}-{stamp}", 1
    while (records / f"{rid}.json").exists():
        i += 1
        rid = f"{run_name}-{stamp}-{i}"
    groups = [g for g in (args.get("group") for args in _wandb_loggers(config)) if g]
    record = {"id": rid, "experiment": exp.name, "experiment_file": str(exp.path), "overrides": overrides,
              "wandb_group": groups[0] if groups else rid, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "recipe": recipe(config), "runs": {}}
    return records / f"{rid}.json", record


def reproduce_seeds(exp: Experiment, overrides: list[str], seeds: list[int], results_table: Path,
                    resume: bool = False, python: str = sys.executable,
                    config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One fit per seed, each recorded as it finishes, then one row per published metric over the seeds."""
    if _given(overrides, "--seed_everything"):
        raise RegistryError("--seed_everything: --seeds sets the seed of each run; remove --seed_everything")
    if _given(overrides, "--data.few_shot_seed", "--data.init_args.few_shot_seed"):
        raise RegistryError("--data.few_shot_seed: --seeds sets the few-shot draw of each run; remove it")
    config = resolve_config(exp, overrides, python) if config is None else config
    draws = few_shot(config)
    if procedure(exp, config) == "evaluate":
        raise RegistryError(f"--seeds: {exp.name} only evaluates (procedure: evaluate, no few-shot sample to draw), "
                            "so every seed would give the same numbers; run it without --seeds")
    proc = _procedure_note(exp, config)
    run_name = config.get("run_name") or (exp.name.replace("/", "_") if "/" in exp.name
                                          and not Path(exp.name).is_absolute() else exp.path.stem)
    records = results_table.parent / "reproductions"
    found = find_reproduction(records, exp, overrides) if resume else None
    if found is not None:
        path, record = found
        changed = _difference(record.get("recipe"), recipe(config))
        if changed:
            raise RegistryError(f"--resume: the resolved config differs from reproduction {record['id']}'s at "
                                f"{changed}; start a new reproduction without --resume")
        done = [s for s in seeds if str(s) in record["runs"]]
        print(f"Resuming reproduction {record['id']} ({path}): seeds finished: {', '.join(map(str, done)) or 'none'}")
    else:
        if resume:
            print(f"--resume: no earlier reproduction of {exp.name} with these overrides under {records}; "
                  "starting a new one")
        path, record = new_reproduction(records, exp, overrides, config, run_name)
        _write_json(path, record)
    group = record["wandb_group"]
    print(f"Reproduction {record['id']}: seeds {', '.join(map(str, seeds))}; record {path}; W&B group {group}",
          flush=True)
    for i, seed in enumerate(seeds, 1):
        if str(seed) in record["runs"]:
            print(f"\n=== seed {seed} ({i} of {len(seeds)}): finished before, {record['runs'][str(seed)]['run_dir']}")
            continue
        print(f"\n=== seed {seed} ({i} of {len(seeds)})", flush=True)
        seed_args = [*overrides, "--run_name", f"{run_name}_seed{seed}", "--seed_everything", str(seed)]
        if draws:  # a new K-shot sample per seed, as LM-BFF's data splits
            seed_args += ["--data.few_shot_seed", str(seed)]
        start = time.time()
        # the group goes in through the environment: it works with any logger list, and train.py leaves it alone
        run_dir, metrics, res = evaluate(exp, seed_args, python, proc, env={"WANDB_RUN_GROUP": group})
        wall = time.time() - start
        rows = comparison_rows(exp, metrics)
        (run_dir / "reproduce.json").write_text(json.dumps(
            [{"reproduction": record["id"], "seed": seed, **row} for row in rows], indent=2) + "\n")
        summary = {**_summary(exp, overrides, rows), "reproduce/seed": seed, "reproduce/reproduction": record["id"]}
        run_id = wandb_summary(run_dir, res.get("wandb_run"), summary, group)
        _print_wandb(run_id, res, run_dir)
        record["runs"][str(seed)] = {"seed": seed, "run_dir": str(run_dir), "wandb_run": res.get("wandb_run"),
                                     "metrics": metrics, "wall_time_s": round(wall, 1), "hardware": hardware(),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(path, record)  # now this seed counts as finished for --resume
    runs = [record["runs"][str(s)] for s in seeds]
    rows = seed_rows(exp, {r["seed"]: r["metrics"] for r in runs})
    command = shlex.join(["python", "-m", "experiments", "reproduce", exp.name, "--seeds",
                          ",".join(map(str, seeds)), *overrides])
    common = {"date": time.strftime("%Y-%m-%d %H:%M"), "experiment": exp.name, "variant": exp.variant,
              "split": exp.split, "overrides": shlex.join(overrides),
              "hardware": " / ".join(dict.fromkeys(r["hardware"] for r in runs)),
              "wall_time_s": round(sum(r["wall_time_s"] for r in runs), 1), "run_dir": "",
              "reproduction": str(path), "command": command}
    rows = [{**common, **row} for row in rows]
    record["rows"] = rows
    _write_json(path, record)
    csv_path, md_path = write_results_table(results_table, rows)
    print(f"\n{exp.name} ({exp.variant}, {exp.split} split), seeds {', '.join(map(str, seeds))}"
          f"{' with ' + common['overrides'] if overrides else ''}; ± is the sample standard deviation (n - 1):")
    for row in rows:
        gap = "" if row["gap_std"] is None else f" = {row['gap_std']:+.2f} std"
        d = places(row["ours"], row["published"], row["min"], row["max"])
        print(f"  {row['metric']}: ours {_fmt(row['ours'], digits=d)} ± {_fmt(row['std'], digits=d)} "
              f"(min {_fmt(row['min'], digits=d)}, max {_fmt(row['max'], digits=d)}, n {row['n']}) vs "
              f"{_fmt(row['published'], digits=d)} (delta {_fmt(row['delta'], sign=True, digits=d)}{gap})  "
              f"[{row['source']}]")
    print(f"Results table:   {csv_path} and {md_path}")
    print(f"Reproduction:    {path} (W&B group {group})", flush=True)
    return rows


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_reproduce(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments reproduce", allow_abbrev=False,  # abbreviations would swallow train.py options
        description="Fit an experiment with train.py, evaluate it on the published split and record ours vs published. "
                    "Options not listed here are passed to train.py (later ones win).")
    parser.add_argument("name", help="experiment name from `python -m experiments list`, or an experiment YAML file")
    parser.add_argument("--results_table", default="runs/reproduce_results",
                        help="table to append to: <this>.csv, rendered as <this>.md (default: %(default)s)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (e.g. 13,21,42,87,100): one run each, then mean ± sample std; "
                             "few-shot configs also draw their sample with each seed")
    parser.add_argument("--resume", action="store_true",
                        help="with --seeds: continue the newest reproduction of this experiment with the same "
                             "overrides, skipping its finished seeds")
    args, overrides = parser.parse_known_args(argv)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.resume and seeds is None:
        raise RegistryError("--resume: only with --seeds (to continue one interrupted fit, use train.py fit "
                            "--ckpt_path last)")
    exp = find(args.name)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `kill` stops like Ctrl-C
    try:
        if seeds is None:
            reproduce(exp, overrides, Path(args.results_table))
        else:
            reproduce_seeds(exp, overrides, seeds, Path(args.results_table), resume=args.resume)
    except KeyboardInterrupt:
        again = shlex.join(["python", "-m", "experiments", "reproduce", *argv])
        hint = "" if seeds is None else f"; finished seeds are recorded, continue with: {again}" + \
            ("" if args.resume else " --resume")
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


COMMANDS = {"list": cmd_list, "reproduce": cmd_reproduce}


def main(argv: list[str]) -> int:
    """``list`` or ``reproduce``; errors are one line on stderr and exit code 2."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m experiments {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
