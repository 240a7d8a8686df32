"""`python -m experiments sweep FILE`: run a W&B sweep file (configs/sweeps/) on this machine, no W&B server.

`wandb sweep` + `wandb agent` need W&B's sweep controller, which lives on the W&B server; offline, or without an
account, a sweep file could not run. This runs the same file: one ``train.py`` run per point and seed (the sweep's
own command, with ``--key=value`` for ``${args}`` as the agent passes them), every run in one W&B group, then one
table ranked by the sweep's metric (mean ± sample std over the seeds). Each finished run is recorded at once, so
``--resume`` continues an interrupted sweep.

``method: grid`` runs every combination of the ``values`` lists, in the file's order, as W&B's grid search
enumerates it. ``method: random`` draws ``--count`` points from the parameters' distributions (W&B's: ``values``
with optional ``probabilities``, ``uniform``, ``int_uniform``, ``q_uniform``, ``log_uniform_values``,
``log_uniform``, ``inv_log_uniform_values``, ``normal``, ``log_normal``, ``beta`` and their ``q_`` forms) with a
seeded generator; the seed is in the record, so ``--resume`` and ``--sample_seed`` give the same points again.
``bayes`` chooses each point from the results so far on W&B's server: ``wandb agent`` runs it, or
``--method random`` samples its space here. W&B's ``sweeps`` engine is not a dependency (it pins numpy < 2).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import random
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


# W&B's distributions: the keys each one needs (besides ``distribution``); ``q`` defaults to 1
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "constant": ("value",), "categorical": ("values",), "int_uniform": ("min", "max"), "uniform": ("min", "max"),
    "q_uniform": ("min", "max"), "log_uniform": ("min", "max"), "log_uniform_values": ("min", "max"),
    "q_log_uniform": ("min", "max"), "q_log_uniform_values": ("min", "max"), "inv_log_uniform": ("min", "max"),
    "inv_log_uniform_values": ("min", "max"), "normal": ("mu", "sigma"), "q_normal": ("mu", "sigma"),
    "log_normal": ("mu", "sigma"), "q_log_normal": ("mu", "sigma"), "beta": ("a", "b"), "q_beta": ("a", "b"),
}


def _quantized(value: float, q: float) -> float | int:
    return int(round(value / q) * q) if isinstance(q, int) else round(value / q) * q


def sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a checked parameter spec (see :func:`_check_distribution`), as W&B's random search draws it."""
    kind = spec["distribution"]
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    if kind == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    low, high = spec.get("min"), spec.get("max")
    base = kind.removeprefix("q_")
    if base == "uniform":
        value = rng.uniform(low, high)
    elif base == "log_uniform":  # min / max are natural logs of the bounds
        value = math.exp(rng.uniform(low, high))
    elif base == "log_uniform_values":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    elif kind == "inv_log_uniform":  # 1 / X with ln(X) uniform on [min, max]
        value = math.exp(-rng.uniform(low, high))
    elif kind == "inv_log_uniform_values":  # 1 / X with X log-uniform on [1 / max, 1 / min]: a value in [min, max]
        value = math.exp(-rng.uniform(-math.log(high), -math.log(low)))
    elif base == "normal":
        value = rng.gauss(spec["mu"], spec["sigma"])
    elif base == "log_normal":
        value = rng.lognormvariate(spec["mu"], spec["sigma"])
    else:  # beta
        value = rng.betavariate(spec["a"], spec["b"])
    return _quantized(value, spec.get("q", 1)) if kind.startswith("q_") else value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_distribution(path: Path, key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A random-search parameter with its distribution made explicit (W&B infers it from the keys when absent)."""
    spec = dict(spec)
    if "distribution" not in spec:
        if "values" in spec:
            spec["distribution"] = "categorical"
        elif "value" in spec:
            spec["distribution"] = "constant"
        elif {"min", "max"} <= set(spec):
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            spec["distribution"] = "int_uniform" if both_int else "uniform"
        elif {"mu", "sigma"} <= set(spec):
            spec["distribution"] = "normal"
        else:
            raise _fail(path, ["parameters", key], "expected values: [...], value: x, or a distribution with its "
                                                   "keys (min / max, mu / sigma)")
    kind = spec["distribution"]
    if kind not in DISTRIBUTIONS:
        raise _fail(path, ["parameters", key, "distribution"], f"{kind!r} is not one of W&B's distributions "
                                                               f"({', '.join(DISTRIBUTIONS)})")
    missing = [k for k in DISTRIBUTIONS[kind] if k not in spec]
    if missing:
        raise _fail(path, ["parameters", key], f"distribution {kind} needs {' and '.join(missing)}")
    if kind == "categorical":
        values, weights = spec["values"], spec.get("probabilities")
        if not isinstance(values, list) or not values:
            raise _fail(path, ["parameters", key, "values"], "expected a non-empty list")
        if weights is not None and (not isinstance(weights, list) or len(weights) != len(values)
                                    or not all(_number(w) and w >= 0 for w in weights)
                                    or not math.isclose(sum(weights), 1.0, abs_tol=1e-6)):
            raise _fail(path, ["parameters", key, "probabilities"], f"expected {len(values)} non-negative numbers "
                                                                    "summing to 1, one per value")
        return spec
    for name in DISTRIBUTIONS[kind] + (("q",) if "q" in spec else ()):
        if name != "value" and not _number(spec[name]):
            raise _fail(path, ["parameters", key, name], f"expected a number, got {spec[name]!r}")
    if kind == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise _fail(path, ["parameters", key], "int_uniform needs whole-number min and max")
    if "min" in DISTRIBUTIONS[kind] and spec["min"] > spec["max"]:
        raise _fail(path, ["parameters", key, "min"], f"min {spec['min']} is above max {spec['max']}")
    if kind.endswith("_values") and spec["min"] <= 0:
        raise _fail(path, ["parameters", key, "min"], f"{kind} needs 0 < min (the bounds are values, not logs)")
    for name in ("sigma", "q", "a", "b"):
        if name in spec and spec[name] <= 0:
            raise _fail(path, ["parameters", key, name], f"expected a positive number, got {spec[name]}")
    return spec


@dataclass(frozen=True)
class Sweep:
    path: Path
    method: str  # grid | random
    metric: str
    goal: str  # maximize | minimize
    # in the file's order: a grid's values lists; random search's specs with their distribution made explicit
    parameters: dict[str, Any]
    subcommand: str
    before: list[str]  # train.py arguments of the command before ${args}
    after: list[str]  # and after it
    run_cap: int | None = None
    early_terminate: bool = False  # W&B's server stops runs early (hyperband); here every run goes to the end

    @property
    def name(self) -> str:
        return self.path.stem

    def points(self) -> list[dict[str, Any]]:
        """A grid's every combination of the values, the first parameter varying slowest."""
        keys = list(self.parameters)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.parameters.values())]

    def draw(self, count: int, seed: int) -> list[dict[str, Any]]:
        """``count`` random-search points from generator seed ``seed``; a larger count keeps the first ones."""
        rng = random.Random(seed)
        return [{k: sample(spec, rng) for k, spec in self.parameters.items()} for _ in range(count)]


def load_sweep(path: str | Path, method: str | None = None) -> Sweep:
    """Read and check a W&B sweep file for a local run (``method`` replaces the file's); every problem is one error
    naming file and line."""
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
    method = method or doc.get("method")
    if method not in ("grid", "random"):
        raise _fail(path, ["method"], f"{method!r} chooses each point from the results so far on W&B's server: "
                                      "run it with wandb sweep FILE, then wandb agent ID, or sample its space here "
                                      "with --method random --count N")
    metric = doc.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise _fail(path, ["metric"], "expected a mapping with name (the logged metric to rank by) and goal")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in ("maximize", "minimize"):
        raise _fail(path, ["metric", "goal"], f"expected maximize or minimize, got {goal!r}")
    params = doc.get("parameters")
    if not isinstance(params, dict) or not params:
        raise _fail(path, ["parameters"], "expected a mapping of train.py options to {values: [...]}")
    parameters: dict[str, Any] = {}
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise _fail(path, ["parameters", key], "expected a mapping such as {values: [...]}")
        if method == "random":
            parameters[str(key)] = _check_distribution(path, str(key), spec)
            continue
        if not ({"values", "value"} & set(spec)):
            raise _fail(path, ["parameters", key], "a grid takes values: [...] or value: x for every parameter "
                                                   "(distributions need method: random)")
        values = spec["values"] if "values" in spec else [spec["value"]]
        if not isinstance(values, list) or not values:
            raise _fail(path, ["parameters", key, "values"], "expected a non-empty list")
        parameters[str(key)] = values
    run_cap = doc.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise _fail(path, ["run_cap"], f"expected a positive whole number, got {run_cap!r}")
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
    return Sweep(path=path, method=method, metric=metric["name"], goal=goal, parameters=parameters,
                 subcommand=rest[0], before=rest[1:], after=command[at + 1:], run_cap=run_cap,
                 early_terminate=bool(doc.get("early_terminate")))


def as_arg(key: str, value: Any) -> str:
    """``--key=value`` as the W&B agent writes ``${args}`` (strings as they are, anything else as JSON)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _short(value: Any) -> str:
    """A value for reading (a drawn 8.328495177027698e-05 as 8.328e-05); the run itself gets every digit."""
    return f"{value:.4g}" if isinstance(value, float) else value if isinstance(value, str) else json.dumps(value)


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in point.items())


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
    record = {"id": sid, "file": str(sweep.path.resolve()), "overrides": overrides, "method": sweep.method,
              "metric": sweep.metric, "goal": sweep.goal, "parameters": sweep.parameters,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": {}}
    return records / f"{sid}.json", record


def _run_key(index: int, seed: int | None) -> str:
    return f"{index}" if seed is None else f"{index}/seed{seed}"


def rank_rows(sweep: Sweep, record: dict[str, Any], seeds: list[int | None],
              points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point: its values, the metric's mean / std / min / max over the seeds that reported it, the wall
    time and the run directories; best first (the sweep's goal), points without a value last."""
    rows = []
    for i, point in enumerate(points):
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
    shown = [{"rank": str(r + 1), **{k: _short(v) for k, v in row.items() if k in sweep.parameters},
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
              dry_run: bool = False, python: str = sys.executable, count: int | None = None,
              sample_seed: int | None = None) -> list[dict[str, Any]]:
    """Run every point (and seed) not finished yet, recording each as it ends; return the ranked rows.

    ``count``: random search's number of points (else the file's ``run_cap``), or a grid's first ``count`` points.
    ``sample_seed``: random search's generator seed (else a new one, kept in the record)."""
    if seeds is not None and _given(overrides, "--seed_everything"):
        raise SweepError("--seed_everything: --seeds sets the seed of each run; remove --seed_everything")
    for key in sweep.parameters:
        if _given(overrides, f"--{key}"):
            raise SweepError(f"--{key}: the sweep sets it at every point; remove it, or edit the file's parameters")
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    found = _find_record(out, sweep, overrides) if resume and not dry_run else None
    earlier = found[1] if found else {}
    if found and (earlier.get("parameters") != sweep.parameters or earlier.get("metric") != sweep.metric
                  or earlier.get("method", "grid") != sweep.method):
        raise SweepError(f"--resume: {sweep.path}'s method, parameters or metric changed since sweep "
                         f"{earlier['id']}; start a new sweep without --resume")
    count = count or earlier.get("count") or sweep.run_cap
    if sweep.method == "random":
        if count is None:
            raise SweepError(f"{_display(sweep.path)}: method random draws points until stopped; give --count N "
                             "(as for wandb agent) or run_cap in the file")
        if found and sample_seed is not None and sample_seed != earlier.get("sample_seed"):
            raise SweepError(f"--sample_seed {sample_seed}: sweep {earlier['id']} drew its points with seed "
                             f"{earlier.get('sample_seed')}; drop --sample_seed to resume it")
        if found:
            sample_seed = earlier["sample_seed"]
        elif sample_seed is None:
            sample_seed = random.randrange(2 ** 31)
        points = sweep.draw(count, sample_seed)  # the same seed and count draw the same points again
    else:
        points = sweep.points()[:count] if count else sweep.points()
    if dry_run:
        if sweep.method == "random":
            print(f"# random search: {count} points drawn with --sample_seed {sample_seed}", file=sys.stderr)
        for i, point in enumerate(points):
            for seed in seed_list:
                print(shlex.join(["python", str(Path(TRAIN).relative_to(ROOT)), sweep.subcommand,
                                  *_run_args(sweep, point, i, seed, overrides)]))
        return []
    if found is not None:
        path, record = found
        print(f"Resuming sweep {record['id']} ({path}): {len(record['runs'])} runs finished before", flush=True)
    else:
        if resume:
            print(f"--resume: no earlier sweep of {sweep.path} with these overrides under {out}; starting one")
        path, record = _new_record(out, sweep, overrides)
    if count:
        record["count"] = count
    if sweep.method == "random":
        record["sample_seed"] = sample_seed
    _write_json(path, record)
    total = len(points) * len(seed_list)
    drawn = f"{len(points)} random points (sample seed {sample_seed})" if sweep.method == "random" \
        else f"{len(points)} grid points"
    print(f"Sweep {record['id']}: {drawn} x {len(seed_list)} seed(s) = {total} runs of train.py "
          f"{sweep.subcommand}; ranked by {sweep.metric} ({sweep.goal}); record {path}; W&B group {record['id']}",
          flush=True)
    if sweep.early_terminate:
        print("early_terminate is W&B's server stopping weak runs; here every run goes to its end", flush=True)
    seeds_text = "one run per point (the config's seed)" if seeds is None else \
        f"seeds {','.join(map(str, seeds))}: mean ± sample standard deviation (n - 1)"

    def tables() -> tuple[list[dict[str, Any]], Path, Path]:
        """The ranked table of the runs finished so far, rewritten after every run (a partial sweep shows too)."""
        rows = rank_rows(sweep, record, seed_list, points)
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
        description="Run a W&B sweep file (grid or random) on this machine without a W&B server: one train.py run "
                    "per point (and seed), one W&B group, a table ranked by the sweep's metric. Options not listed "
                    "here are passed to every train.py run (later ones win).")
    parser.add_argument("file", help="a sweep file, e.g. configs/sweeps/minilm_conll2003.yaml")
    parser.add_argument("--method", choices=("grid", "random"), default=None,
                        help="instead of the file's method (--method random samples a bayes file's space)")
    parser.add_argument("--count", type=int, default=None, help="random search: how many points to draw (else the "
                                                                "file's run_cap); grid: run only the first N points")
    parser.add_argument("--sample_seed", type=int, default=None,
                        help="random search: the generator seed, to draw the same points again (default: a new one, "
                             "kept in the sweep's record)")
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
        if args.count is not None and args.count < 1:
            raise SweepError(f"--count {args.count}: expected a positive number of points")
        sweep = load_sweep(args.file, method=args.method)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `kill` stops like Ctrl-C
    try:
        run_sweep(sweep, overrides, seeds, Path(args.out), resume=args.resume, dry_run=args.dry_run,
                  count=args.count, sample_seed=args.sample_seed)
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
