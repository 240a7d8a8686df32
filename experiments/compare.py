"""Compare runs without the W&B dashboard: differing hyper-parameters, final / best metrics, curves.

    python -m experiments compare runs/quickstart/2026-11-28_18-02-11 runs/quickstart/2026-11-28_18-30-40 \
        [--plots out_dir] [--csv table.csv] [--html report.html]

``--html`` writes one self-contained page (inline SVG, CSS and a few lines of JavaScript; no server, no
network): the runs with their differing hyper-parameters and best / final / test metrics, and per metric
every run's curve overlaid with each run's best value marked.

A run is a run directory written by train.py (metrics from its W&B offline run, or its CSV log), a
W&B offline run folder (``offline-run-*``), or a CSV logger folder holding ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import tempfile
import time
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
    return {"name": name, "config": config, "history": history, "path": str(path)}


def lower_is_better(metric: str) -> bool:
    """Loss-like metrics are better when lower; every other metric when higher."""
    return any(word in metric for word in LOWER_IS_BETTER)


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
        out[key] = {"final": values[-1], "best": min(values) if lower_is_better(key) else max(values)}
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


# ---- the HTML report ------------------------------------------------------------------------------

# Tableau 10: distinguishable, and readable on white
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def has_best(metric: str) -> bool:
    """Whether a best value means something for this metric (not for learning rates or throughput)."""
    return metric.startswith(("val/", "test/")) or lower_is_better(metric)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def curve(run: dict[str, Any], metric: str) -> tuple[str, list[tuple[float, float, Any]]]:
    """(x axis, [(x, value, epoch)]) of one metric of one run: x is the optimizer step when the rows carry one
    (``trainer/global_step`` from W&B, ``step`` from the CSV log), else the logged epoch."""
    rows = [row for row in run["history"] if _number(row.get(metric)) is not None]
    if all(_number(row.get("trainer/global_step", row.get("step"))) is not None for row in rows):
        axis, x_of = "optimizer step", lambda r: r.get("trainer/global_step", r.get("step"))
    elif all(_number(row.get("epoch")) is not None for row in rows):
        axis, x_of = "epoch", lambda r: r["epoch"]
    else:
        axis, x_of = "logged row", lambda r: r.get("_step", 0)
    return axis, [(float(x_of(row)), float(row[metric]), row.get("epoch")) for row in rows]


def best_point(points: list[tuple[float, float, Any]], metric: str) -> tuple[float, float, Any] | None:
    """The point with the best value (min for losses, max otherwise; the first one on ties)."""
    if not points:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(points, key=lambda p: p[1])


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(first + len(ticks) * step)
    return [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    return f"{value:.4g}"


def _fmt_epoch(epoch: Any) -> str:
    number = _number(epoch)
    return "" if number is None else f"epoch {int(number)}" if number == int(number) else f"epoch {number:g}"


def svg_chart(metric: str, runs: list[dict[str, Any]]) -> str:
    """One metric, every run's curve overlaid (colour = run), each run's best point marked, run names as legend."""
    e = html.escape
    width, plot_h, left, right, top = 640, 260, 64, 18, 30
    curves = [curve(run, metric) for run in runs]
    xs = [p[0] for _, pts in curves for p in pts]
    ys = [p[1] for _, pts in curves for p in pts]
    axis = next((a for a, pts in curves if pts), "optimizer step")
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw = width - left - right

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    marked = has_best(metric)
    legend_rows = len(runs)
    height = top + plot_h + 40 + 18 * legend_rows + 6
    out = [(f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{e(metric)}" xmlns="http://www.w3.org/2000/svg">'),
           f'<text class="title" x="{left}" y="18">{e(metric)}</text>']
    if marked:
        better = "lower is better" if lower_is_better(metric) else "higher is better"
        out.append(f'<text class="note" x="{width - right}" y="18" text-anchor="end">{better}; ◆ = best</text>')
    for t in yt:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    for t in xt:
        out.append(f'<line class="grid" y1="{top}" y2="{top + plot_h}" x1="{sx(t):.1f}" x2="{sx(t):.1f}"/>'
                   f'<text class="tick" x="{sx(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_label(t)}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{plot_h}"/>'
               f'<text class="axis" x="{left + pw / 2}" y="{top + plot_h + 32}" text-anchor="middle">{e(axis)}</text>')
    legend_y = top + plot_h + 52
    for i, (run, (_, pts)) in enumerate(zip(runs, curves)):
        color = PALETTE[i % len(PALETTE)]
        best = best_point(pts, metric) if marked else None
        out.append(f'<g class="run" data-run="{i}">')
        if pts:
            d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y, _) in enumerate(pts))
            out.append(f'<path class="line" d="{d}" stroke="{color}"/>')
            if len(pts) <= 60:
                for x, y, epoch in pts:
                    tip = f"{run['name']}: {metric} = {y:.4f} at {axis} {x:g}" + (f", {_fmt_epoch(epoch)}" if epoch is not None else "")
                    out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                               f'<title>{e(tip)}</title></circle>')
        if best is not None:
            bx, by = sx(best[0]), sy(best[1])
            where = _fmt_epoch(best[2]) or f"{axis} {best[0]:g}"
            out.append(f'<path class="best" d="M{bx:.1f},{by - 7:.1f} L{bx + 7:.1f},{by:.1f} L{bx:.1f},{by + 7:.1f} '
                       f'L{bx - 7:.1f},{by:.1f} Z" fill="{color}"><title>{e(run["name"])}: best {e(metric)} = '
                       f'{best[1]:.4f} ({e(where)})</title></path>')
        out.append("</g>")
        ly = legend_y + 18 * i
        text = run["name"] + (f" (best {best[1]:.4f}, {where})" if best is not None else "" if pts else " (not logged)")
        out.append(f'<g class="legend" data-run="{i}"><line x1="{left}" x2="{left + 22}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="3"/><text x="{left + 30}" y="{ly}">{e(text)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def chart_metrics(runs: list[dict[str, Any]]) -> list[str]:
    """The metrics with curves (test metrics are single numbers: they go in the table), validation first."""
    metrics = sorted({k for r in runs for row in r["history"] for k in row
                      if "/" in k and not k.startswith(("_", "trainer/", "test/")) and _number(row[k]) is not None})
    return sorted(metrics, key=lambda m: (not m.startswith("val/"), not lower_is_better(m) and m.startswith("train/"), m))


def _table_html(runs: list[dict[str, Any]]) -> str:
    e = html.escape
    keys = differing([r["config"] for r in runs])
    metrics = sorted({m for r in runs for m in summarize(r) if m.startswith(("val/", "test/"))})
    head = ["run", *keys]
    columns: list[tuple[str, str]] = []  # (metric, "best" | "final" | "test")
    for m in metrics:
        columns += [(m, "best"), (m, "final")] if m.startswith("val/") else [(m, "test")]
    cells: list[list[tuple[float | None, str]]] = []
    for run in runs:
        row = []
        for m, kind in columns:
            _, pts = curve(run, m)
            point = (best_point(pts, m) if kind == "best" else pts[-1]) if pts else None
            text = "" if point is None else f"{point[1]:.4f}"
            if kind == "best" and point is not None:
                text += f" <small>({e(_fmt_epoch(point[2]) or f'step {point[0]:g}')})</small>"
            row.append((point[1] if point else None, text))
        cells.append(row)
    # the best run per column (not for "final": the last value is not a choice anyone made)
    winners = {}
    for c, (m, kind) in enumerate(columns):
        values = [(row[c][0], i) for i, row in enumerate(cells) if row[c][0] is not None]
        if kind != "final" and len(values) > 1:
            winners[c] = (min if lower_is_better(m) else max)(values)[0]
    out = ['<div class="scroll"><table>', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) +
           "".join(f"<th>{e(m)}<br><small>{kind}</small></th>" for m, kind in columns) + "</tr></thead><tbody>"]
    for i, (run, row) in enumerate(zip(runs, cells)):
        color = PALETTE[i % len(PALETTE)]
        tds = [f'<td class="name"><span class="swatch" style="background:{color}"></span>{e(run["name"])}</td>']
        tds += [f"<td class=\"param\">{e(str(run['config'].get(k, '')))}</td>" for k in keys]
        for c, (value, text) in enumerate(row):
            win = c in winners and value == winners[c]
            tds.append(f'<td class="num{" winner" if win else ""}">{text}</td>')
        out.append(f'<tr data-run="{i}">' + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    if not keys:
        out.append('<p class="note">No hyper-parameter differs between these runs.</p>')
    return "\n".join(out)


_STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.note, small { color: #666; } .scroll { overflow-x: auto; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th { background: #f6f6f6; font-weight: 600; vertical-align: bottom; } td.num { text-align: right; white-space: nowrap; }
td.winner { font-weight: 700; background: #e6f4ea; } td.name { white-space: nowrap; }
td.param { max-width: 22em; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 16px; max-width: 2000px; }
.chart { width: 100%; height: auto; }
.chart text { font-size: 12px; fill: #333; } .chart .title { font-size: 14px; font-weight: 600; }
.chart .tick, .chart .note, .chart .axis { fill: #666; font-size: 11px; }
.grid { stroke: #eee; } .frame { fill: none; stroke: #bbb; }
.line { fill: none; stroke-width: 2; } .best { stroke: #000; stroke-width: 1.2; }
.legend { cursor: pointer; } .off { opacity: 0.15; } .run.off { display: none; }
"""

# Clicking a run (legend or table row) hides or shows its curves in every chart.
_SCRIPT = """
document.addEventListener("click", function (event) {
  var item = event.target.closest("[data-run]");
  if (!item || item.classList.contains("run")) return;
  var run = item.getAttribute("data-run");
  document.querySelectorAll('[data-run="' + run + '"]').forEach(function (el) { el.classList.toggle("off"); });
});
"""


def report_html(runs: list[dict[str, Any]]) -> str:
    """The whole report as one HTML document: nothing in it loads anything from anywhere."""
    e = html.escape
    charts = [svg_chart(m, runs) for m in chart_metrics(runs)]
    sources = "".join(f"<li><code>{e(str(r.get('path', r['name'])))}</code></li>" for r in runs)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Run comparison: {e(', '.join(r['name'] for r in runs))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        (f"<h1>Run comparison</h1><p class=\"note\">{len(runs)} runs, written {time.strftime('%Y-%m-%d %H:%M')} by "
        "<code>python -m experiments compare</code>. Bold: the best run per column (lowest for loss / mse / "
        "perplexity, highest otherwise). Click a run to hide or show it.</p>"),
        "<h2>Runs</h2>", _table_html(runs),
        "<h2>Curves</h2>", '<div class="charts">', *charts, "</div>",
        f"<details><summary>Run sources</summary><ul>{sources}</ul></details>",
        f"<script>{_SCRIPT}</script>", "</body></html>", ""])


def write_html(runs: list[dict[str, Any]], path: Path) -> Path:
    """Write :func:`report_html` to ``path`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(report_html(runs))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def last_table(run: str | Path, key: str = "val/predictions") -> tuple[list[str], list[list[Any]]] | None:
    """The last W&B Table logged under ``key`` in a run (run directory or offline run folder), read from disk: the
    table files W&B keeps in ``files/media/table/<key>_<step>_<hash>.table.json``. None when the run has none."""
    path = Path(run)
    folders = [path] if path.name.startswith(("offline-run-", "run-")) else \
        sorted(path.glob("wandb/offline-run-*")) + sorted(path.glob("wandb/run-*"))
    found: list[tuple[int, int, Path]] = []
    for order, folder in enumerate(folders):
        directory = folder / "files" / "media" / "table" / Path(key).parent
        for file in directory.glob(f"{Path(key).name}_*.table.json"):
            step = file.name[len(Path(key).name) + 1:].split("_", 1)[0]
            found.append((order, int(step) if step.isdigit() else -1, file))
    if not found:
        return None
    data = json.loads(max(found)[2].read_text(encoding="utf-8"))
    return list(data["columns"]), list(data["data"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, W&B offline runs or CSV log folders")
    p.add_argument("--plots", default=None, help="also write a learning-curve PNG per metric into this folder")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    p.add_argument("--html", default=None, help="also write a self-contained HTML report (table + overlaid curves) here")
    p.add_argument("--table", default=None, metavar="KEY",
                   help="print each run's last W&B Table logged under KEY (train.py --log_predictions: val/predictions, "
                        "val/<set>/predictions, test/predictions) from its files, then stop")
    a = p.parse_args(argv)
    if a.table:
        for run in a.runs:
            found = last_table(run, a.table)
            if found is None:
                print(f"error: {run}: no table '{a.table}' (was the run made with --log_predictions N?)")
                return 2
            columns, data = found
            print(f"{run}: {a.table} ({len(data)} rows)\n{markdown(columns, [[_short(v) for v in r] for r in data])}\n")
        return 0
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
    if a.plots:
        written = plot(runs, Path(a.plots))
        print(f"\n{len(written)} plots in {a.plots}/: {', '.join(p.name for p in written)}")
    if a.html:
        print(f"HTML report: {write_html(runs, Path(a.html))}")
    return 0
