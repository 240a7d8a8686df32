"""`python -m experiments sweep FILE`: run a W&B grid sweep file (configs/sweeps/) on this machine, no W&B server.

`wandb sweep` + `wandb agent` need W&B's sweep controller, which lives on the W&B server; offline, or without an
account, a sweep file could not run. This runs the same file's grid: every combination of the parameters' values,
one ``train.py`` run per combination and seed (the sweep's own command, with ``--key=value`` for ``${args}`` as the
agent passes them), every run in one W&B group, then one table ranked by the sweep's metric (mean ± sample std over
the seeds). Each finished run is recorded at once, so ``--resume`` continues an interrupted sweep.

Only ``method: grid`` runs here: ``random`` and ``bayes`` choose their next point from the server's history (use
``wandb agent`` for them). The grid itself is the cartesian product of the ``values`` lists, in the file's order,
as W&B's grid search enumerates it (the ``sweeps`` engine is not a dependency: it pins numpy < 2).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.registry import (
    ROOT,
    TRAIN,
    RegistryError,
    _display,
    _fail,
    _given,
    _interrupt,
    _write_json,
    hardware,
    markdown_table,
    parse_seeds,
    run_train,
    spread,
)

MACROS = ("${env}", "${interpreter}", "${program}", "${args}")
SUBCOMMANDS = ("fit", "validate", "test")


class SweepError(RegistryError):
    """A sweep file or option that cannot run: one line naming the file, line and key."""


@dataclass(frozen=True)
class Sweep:
    path: Path
    metric: str
    goal: str  # maximize | minimize
    parameters: dict[str, list[Any]]  # in the file's order
    subcommand: str
    before: list[str]  # train.py arguments of the command before ${args}
    after: list[str]  # and after it

    @property
    def name(self) -> str:
        return self.path.stem

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the values, the first parameter varying slowest."""
        keys = list(self.parameters)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.parameters.values())]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a W&B sweep file for a local grid run; every problem is one error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file (the sweeps are in configs/sweeps/)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SweepError(f"{_display(path)}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict):
        raise SweepError(f"{_display(path)}: expected a W&B sweep (a mapping with method, metric, parameters, command)")
    method = doc.get("method")
    if method != "grid":
        raise _fail(path, ["method"], f"{method!r} chooses its points on W&B's server; a local sweep runs "
                                      "method: grid (for random / bayes: wandb sweep FILE, then wandb agent ID)")
    metric = doc.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise _fail(path, ["metric"], "expected a mapping with name (the logged metric to rank by) and goal")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in ("maximize", "minimize"):
        raise _fail(path, ["metric", "goal"], f"expected maximize or minimize, got {goal!r}")
    params = doc.get("parameters")
    if not isinstance(params, dict) or not params:
        raise _fail(path, ["parameters"], "expected a mapping of train.py options to {values: [...]}")
    parameters: dict[str, list[Any]] = {}
    for key, spec in params.items():
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec)):
            raise _fail(path, ["parameters", key], "a grid takes values: [...] or value: x for every parameter "
                                                   "(distributions need method: random or bayes)")
        values = spec["values"] if "values" in spec else [spec["value"]]
        if not isinstance(values, list) or not values:
            raise _fail(path, ["parameters", key, "values"], "expected a non-empty list")
        parameters[str(key)] = values
    program = doc.get("program")
    if program is None or Path(str(program)).name != "train.py":
        raise _fail(path, ["program"], f"expected train.py (the sweep runs tuneforge's entry point), got {program!r}")
    command = doc.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise _fail(path, ["command"], "expected a list such as [${env}, ${interpreter}, ${program}, fit, --config, "
                                       "experiments/<exp>.yaml, ${args}]")
    for i, item in enumerate(command):
        if "${" in item and item not in MACROS:
            raise _fail(path, ["command", i], f"{item}: a local sweep knows {', '.join(MACROS)}")
    if "${program}" not in command or "${args}" not in command:
        raise _fail(path, ["command"], "must contain ${program} and ${args}")
    start, at = command.index("${program}") + 1, command.index("${args}")
    rest = command[start:at]
    if not rest or rest[0] not in SUBCOMMANDS:
        raise _fail(path, ["command", start], f"expected the train.py subcommand ({', '.join(SUBCOMMANDS)}) right "
                                              "after ${program}")
    return Sweep(path=path, metric=metric["name"], goal=goal, parameters=parameters, subcommand=rest[0],
                 before=rest[1:], after=command[at + 1:])


def as_arg(key: str, value: Any) -> str:
    """``--key=value`` as the W&B agent writes ``${args}`` (strings as they are, anything else as JSON)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


def metric_of(results: dict[str, Any], metric: str) -> float | None:
    """The sweep's metric from a run's results.json: the fit's best checkpoint score, else the test / validate one."""
    for source in (results, results.get("test") or {}, results.get("validate") or {}):
        value = source.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _find_record(records: Path, sweep: Sweep, overrides: list[str]) -> tuple[Path, dict[str, Any]] | None:
    found = []
    for path in records.glob(f"{sweep.name}-*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("file") == str(sweep.path.resolve()) \
                and record.get("overrides") == overrides:
            found.append((str(record.get("created", "")), path.name, path, record))
    return max(found)[2:] if found else None


def _new_record(records: Path, sweep: Sweep, overrides: list[str]) -> tuple[Path, dict[str, Any]]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sid, i = f"{sweep.name}-{stamp}", 1
    while (records / f"{sid}.json").exists():
        i += 1
        sid = f"{sweep.name}-{stamp}-{i}"
    record = {"id": sid, "file": str(sweep.path.resolve()), "overrides": overrides, "metric": sweep.metric, "goal": sweep.goal,
              "parameters": sweep.parameters, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": {}}
    return records / f"{sid}.json", record


def _run_key(index: int, seed: int | None) -> str:
    return f"{index}" if seed is None else f"{index}/seed{seed}"


def rank_rows(sweep: Sweep, record: dict[str, Any], seeds: list[int | None]) -> list[dict[str, Any]]:
    """One row per grid point: its values, the metric's mean / std / min / max over the seeds that reported it,
    the wall time and the run directories; best first (the sweep's goal), points without a value last."""
    rows = []
    for i, point in enumerate(sweep.points()):
        runs = [record["runs"].get(_run_key(i, s)) for s in seeds]
        runs = [r for r in runs if r]
        values = [r["metric"] for r in runs if r.get("metric") is not None]
        row: dict[str, Any] = {"point": i, **{k: point[k] for k in sweep.parameters}, "n": len(values),
                               "mean": None, "std": None, "min": None, "max": None,
                               "wall_time_s": round(sum(r["wall_time_s"] for r in runs), 1),
                               "run_dirs": " ".join(r["run_dir"] for r in runs)}
        if values:
            s = spread(values)
            row.update(mean=s["mean"], std=s["std"], min=s["min"], max=s["max"])
        tested = [r["test"] for r in runs if r.get("test") is not None]
        on_test = spread(tested) if tested else {"mean": None, "std": None}
        row.update(test_mean=on_test["mean"], test_std=on_test["std"])
        rows.append(row)
    sign = -1 if sweep.goal == "maximize" else 1
    return sorted(rows, key=lambda r: (r["mean"] is None, 0 if r["mean"] is None else sign * r["mean"], r["point"]))


def counterpart_on_test(metric: str) -> str | None:
    """The test split's counterpart of a validation metric (``val/f1`` -> ``test/f1``), shown beside it."""
    head, sep, tail = metric.partition("/")
    return f"test/{tail}" if sep and head == "val" else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_tables(stem: Path, sweep: Sweep, rows: list[dict[str, Any]], header: str) -> tuple[Path, Path]:
    """``<stem>.csv`` (every field) and ``<stem>.md`` (ranked, mean ± std), written whole each time."""
    fields = ["point", *sweep.parameters, "n", "mean", "std", "min", "max", "test_mean", "test_std", "wall_time_s",
              "run_dirs"]
    tested = counterpart_on_test(sweep.metric) if any(r["test_mean"] is not None for r in rows) else None
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    shown = [{"rank": str(r + 1), **{k: json.dumps(v) if not isinstance(v, str) else v
                                     for k, v in row.items() if k in sweep.parameters},
              sweep.metric: _fmt(row["mean"]) + ("" if row["std"] is None else f" ± {row['std']:.4f}"),
              "n": str(row["n"]), "min / max": "-" if row["n"] < 2 else f"{_fmt(row['min'])} / {_fmt(row['max'])}",
              **({tested: _fmt(row["test_mean"]) + ("" if row["test_std"] is None else f" ± {row['test_std']:.4f}")}
                 if tested else {}),
              "wall_time_s": f"{row['wall_time_s']:.0f} s", "run_dirs": row["run_dirs"]}
             for r, row in enumerate(rows)]
    columns = ("rank", *sweep.parameters, sweep.metric, "n", "min / max", *([tested] if tested else []),
               "wall_time_s", "run_dirs")
    md_path.write_text(header + markdown_table(shown, columns), encoding="utf-8")
    return csv_path, md_path


def run_sweep(sweep: Sweep, overrides: list[str], seeds: list[int] | None, out: Path, resume: bool = False,
              dry_run: bool = False, python: str = sys.executable) -> list[dict[str, Any]]:
    """Run every grid point (and seed) not finished yet, recording each as it ends; return the ranked rows."""
    if seeds is not None and _given(overrides, "--seed_everything"):
        raise SweepError("--seed_everything: --seeds sets the seed of each run; remove --seed_everything")
    for key in sweep.parameters:
        if _given(overrides, f"--{key}"):
            raise SweepError(f"--{key}: the sweep sets it at every point; remove it, or edit the file's parameters")
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    points = sweep.points()
    if dry_run:
        for i, point in enumerate(points):
            for seed in seed_list:
                print(shlex.join(["python", str(Path(TRAIN).relative_to(ROOT)), sweep.subcommand,
                                  *_run_args(sweep, point, i, seed, overrides)]))
        return []
    found = _find_record(out, sweep, overrides) if resume else None
    if found is not None:
        path, record = found
        if record.get("parameters") != sweep.parameters or record.get("metric") != sweep.metric:
            raise SweepError(f"--resume: {sweep.path}'s parameters or metric changed since sweep {record['id']}; "
                             "start a new sweep without --resume")
        print(f"Resuming sweep {record['id']} ({path}): {len(record['runs'])} runs finished before", flush=True)
    else:
        if resume:
            print(f"--resume: no earlier sweep of {sweep.path} with these overrides under {out}; starting one")
        path, record = _new_record(out, sweep, overrides)
        _write_json(path, record)
    total = len(points) * len(seed_list)
    print(f"Sweep {record['id']}: {len(points)} grid points x {len(seed_list)} seed(s) = {total} runs of train.py "
          f"{sweep.subcommand}; ranked by {sweep.metric} ({sweep.goal}); record {path}; W&B group {record['id']}",
          flush=True)
    seeds_text = "one run per point (the config's seed)" if seeds is None else \
        f"seeds {','.join(map(str, seeds))}: mean ± sample standard deviation (n - 1)"

    def tables() -> tuple[list[dict[str, Any]], Path, Path]:
        """The ranked table of the runs finished so far, rewritten after every run (a partial sweep shows too)."""
        rows = rank_rows(sweep, record, seed_list)
        done = sum(_run_key(i, s) in record["runs"] for i in range(len(points)) for s in seed_list)
        header = (f"# Sweep {record['id']}\n\n`{sweep.path}` run locally (`python -m experiments sweep`), "
                  f"{sweep.subcommand} with {shlex.join(overrides) or 'no overrides'}; {seeds_text}; ranked by "
                  f"{sweep.metric} ({sweep.goal}); {done} of {total} runs finished; hardware: {hardware()}.\n\n")
        return (rows, *write_tables(path.with_suffix(""), sweep, rows, header))

    n = 0
    for i, point in enumerate(points):
        for seed in seed_list:
            n += 1
            key = _run_key(i, seed)
            title = f"point {i + 1} of {len(points)}: {point_label(point)}" + ("" if seed is None else f", seed {seed}")
            if key in record["runs"]:
                print(f"\n=== run {n} of {total}, {title}: finished before, {record['runs'][key]['run_dir']}")
                continue
            print(f"\n=== run {n} of {total}, {title}", flush=True)
            start = time.time()
            run_dir = run_train(sweep.subcommand, _run_args(sweep, point, i, seed, overrides), python,
                                env={"WANDB_RUN_GROUP": record["id"]})
            results = json.loads((run_dir / "results.json").read_text())
            value = metric_of(results, sweep.metric)
            if value is None:
                reported = sorted(k for k in {**results, **(results.get("test") or {})} if "/" in k)
                raise SweepError(f"{sweep.path}: metric.name {sweep.metric!r} is not in {run_dir / 'results.json'} "
                                 f"(it has {', '.join(reported) or 'no metrics'}); a fit records its checkpoint "
                                 "monitor and its test metrics")
            counterpart = counterpart_on_test(sweep.metric)
            tested = (results.get("test") or {}).get(counterpart) if counterpart else None
            record["runs"][key] = {"point": i, "seed": seed, "params": point, "metric": value, "test": tested,
                                   "run_dir": str(run_dir), "wall_time_s": round(time.time() - start, 1),
                                   "hardware": hardware(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_json(path, record)  # this run now counts as finished for --resume
            tables()
            print(f"{sweep.metric} = {value:.4f} at {point_label(point)}", flush=True)
    rows, csv_path, md_path = tables()
    print(f"\nSweep {record['id']} over {', '.join(sweep.parameters)}, ranked by {sweep.metric} ({sweep.goal}):")
    for r, row in enumerate(rows, 1):
        spread_text = "" if row["std"] is None else f" ± {row['std']:.4f} (n {row['n']})"
        print(f"  {r}. {point_label({k: row[k] for k in sweep.parameters})}: {_fmt(row['mean'])}{spread_text}")
    print(f"Sweep table:     {md_path} (and {csv_path.name})")
    print(f"Sweep record:    {path} (W&B group {record['id']})", flush=True)
    return rows


def _run_args(sweep: Sweep, point: dict[str, Any], index: int, seed: int | None,
              overrides: list[str]) -> list[str]:
    """train.py's arguments for one run: the command's, with the point's ``--key=value`` where it says ``${args}``,
    then the user's overrides, then the run's name and seed."""
    name = f"{sweep.name}_p{index}" + ("" if seed is None else f"_seed{seed}")
    return [*sweep.before, *(as_arg(k, v) for k, v in point.items()), *sweep.after, *overrides, "--run_name", name,
            *([] if seed is None else ["--seed_everything", str(seed)])]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments sweep", allow_abbrev=False,
        description="Run a W&B grid sweep file on this machine without a W&B server: one train.py run per grid point "
                    "(and seed), one W&B group, a table ranked by the sweep's metric. Options not listed here are "
                    "passed to every train.py run (later ones win).")
    parser.add_argument("file", help="a sweep file, e.g. configs/sweeps/minilm_conll2003.yaml (method: grid)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: every point runs once per seed, and "
                                                      "the table shows mean ± sample std")
    parser.add_argument("--resume", action="store_true", help="continue the newest sweep of this file with the same "
                                                              "overrides, skipping its finished runs")
    parser.add_argument("--dry_run", action="store_true", help="print the train.py commands and exit")
    parser.add_argument("--out", default="runs/sweeps", help="folder for the sweep records and tables "
                                                             "(default: %(default)s)")
    try:
        args, overrides = parser.parse_known_args(argv)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        sweep = load_sweep(args.file)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `kill` stops like Ctrl-C
    try:
        run_sweep(sweep, overrides, seeds, Path(args.out), resume=args.resume, dry_run=args.dry_run)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = shlex.join(["python", "-m", "experiments", "sweep", *argv])
        print(f"error: interrupted; finished runs are recorded, continue with: {again}"
              f"{'' if args.resume else ' --resume'}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0
