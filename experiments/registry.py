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
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

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
ROW_FIELDS = ("date", "experiment", "variant", "split", "metric", "ours", "published", "delta", "source", "verified",
              "overrides", "hardware", "wall_time_s", "run_dir", "command")


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

def _line(path: Path, keys: list[Any]) -> Optional[int]:
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


def load_experiment(path: str | Path) -> Optional[Experiment]:
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
    return f"{value:.2f}".rstrip("0").rstrip(".") if value == value else "nan"


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

def run_train(subcommand: str, args: list[str], python: str = sys.executable) -> Path:
    """Run ``train.py <subcommand> <args>`` in a fresh process, echo its output, return its run directory."""
    cmd = [python, str(TRAIN), subcommand, *args]
    print(f"$ {shlex.join(cmd)}", flush=True)
    run_dir = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith("Run directory:"):
                run_dir = Path(line.split(":", 1)[1].strip())
    sys.stdout.flush()
    if proc.returncode != 0:
        raise RegistryError(f"train.py {subcommand} failed with exit code {proc.returncode} (see its output above)")
    if run_dir is None or not (run_dir / "results.json").is_file():
        raise RegistryError(f"train.py {subcommand} finished without a results.json to read")
    return run_dir


def hardware() -> str:
    """The accelerator the runs used (first CUDA device, else the CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def evaluate(exp: Experiment, overrides: list[str],
             python: str = sys.executable) -> tuple[Path, dict[str, float], dict[str, Any]]:
    """Fit (unless the procedure is evaluate-only) and score the published split: (run dir, metrics, fit results)."""
    config = ["--config", str(exp.path), *overrides]
    if "/" in exp.name and not Path(exp.name).is_absolute():  # runs/bert_base_sst2/..., not runs/sst2/ for every model
        config = ["--config", str(exp.path), "--run_name", exp.name.replace("/", "_"), *overrides]
    if exp.procedure == "evaluate":
        sub = "test" if exp.split == "test" else "validate"
        run_dir = run_train(sub, config, python)
        res = json.loads((run_dir / "results.json").read_text())
        return run_dir, res.get("test" if sub == "test" else "validate") or {}, res
    run_dir = run_train("fit", config, python)
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
                                      "--run_name", "reproduce", "--trainer.logger", "false"], python)
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


def _fmt(value: Optional[float], sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"


def write_results_table(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Append rows to ``<stem>.csv`` and re-render all of it as ``<stem>.md``."""
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    with open(csv_path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    for row in table:
        for key in ("ours", "published"):
            row[key] = f"{float(row[key]):.2f}" if row[key] else "-"
        row["delta"] = f"{float(row['delta']):+.2f}" if row["delta"] else "-"
        row["wall_time_s"] = f"{float(row['wall_time_s']):.0f} s" if row["wall_time_s"] else ""
        row["overrides"] = f"`{row['overrides']}`" if row["overrides"] else "(none)"
    columns = ("date", "experiment", "variant", "metric", "ours", "published", "delta", "source", "overrides",
               "hardware", "wall_time_s", "run_dir")
    md_path.write_text("# Reproduced results (written by `python -m experiments reproduce`)\n\n"
                       "ours vs published, in the source's units; delta = ours - published.\n\n"
                       + markdown_table(table, columns), encoding="utf-8")
    return csv_path, md_path


def wandb_summary(run_dir: Path, wandb_run: Optional[str], summary: dict[str, Any]) -> Optional[str]:
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
                     entity=logger.get("entity"), mode="offline" if match.group(1) else "online",
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        run.summary.update(summary)
    finally:
        run.finish()
    return run_id


def _wandb_logger_args(config_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    loggers = (config.get("trainer") or {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            return logger.get("init_args") or {}
    return {}


def reproduce(exp: Experiment, overrides: list[str], results_table: Path,
              python: str = sys.executable) -> list[dict[str, Any]]:
    """Run the experiment, compare with its published numbers, and record the comparison everywhere."""
    start = time.time()
    run_dir, metrics, res = evaluate(exp, overrides, python)
    wall = time.time() - start
    rows = comparison_rows(exp, metrics)
    command = shlex.join(["python", "-m", "experiments", "reproduce", exp.name, *overrides])
    common = {"date": time.strftime("%Y-%m-%d %H:%M"), "experiment": exp.name, "variant": exp.variant,
              "split": exp.split, "overrides": shlex.join(overrides), "hardware": hardware(),
              "wall_time_s": round(wall, 1), "run_dir": str(run_dir), "command": command}
    rows = [{**common, **row} for row in rows]
    (run_dir / "reproduce.json").write_text(json.dumps(rows, indent=2) + "\n")
    csv_path, md_path = write_results_table(results_table, rows)
    summary: dict[str, Any] = {"reproduce/experiment": exp.name, "reproduce/variant": exp.variant,
                               "reproduce/overrides": common["overrides"]}
    for row in rows:
        if row["ours"] is not None:
            summary[f"reproduce/{row['metric']}/ours"] = row["ours"]
        if row["label"]:
            summary[f"reproduce/{row['label']}/{row['metric']}/published"] = row["published"]
            if row["delta"] is not None:
                summary[f"reproduce/{row['label']}/{row['metric']}/delta"] = row["delta"]
    run_id = wandb_summary(run_dir, res.get("wandb_run"), summary)
    print(f"\n{exp.name} ({exp.variant}, {exp.split} split){' with ' + common['overrides'] if overrides else ''}:")
    for row in rows:
        print(f"  {row['metric']}: ours {_fmt(row['ours'])} vs {_fmt(row['published'])} "
              f"(delta {_fmt(row['delta'], sign=True)})  [{row['source']}]")
    print(f"Results table:   {csv_path} and {md_path}")
    if run_id is None:
        print("W&B summary:     no W&B run (logger off)", flush=True)
    else:
        offline = Path(res["wandb_run"]).name.startswith("offline-")
        sync = f" (offline; upload later with: wandb sync {run_dir / 'wandb' / 'offline-run-*'})" if offline else ""
        print(f"W&B summary:     run {run_id}{sync}", flush=True)
    return rows


def cmd_reproduce(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments reproduce", allow_abbrev=False,  # abbreviations would swallow train.py options
        description="Fit an experiment with train.py, evaluate it on the published split and record ours vs published. "
                    "Options not listed here are passed to train.py (later ones win).")
    parser.add_argument("name", help="experiment name from `python -m experiments list`, or an experiment YAML file")
    parser.add_argument("--results_table", default="runs/reproduce_results",
                        help="table to append to: <this>.csv, rendered as <this>.md (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    exp = find(args.name)
    reproduce(exp, overrides, Path(args.results_table))
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
