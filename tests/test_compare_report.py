"""`experiments compare --html`: one self-contained report, rendered in headless Chromium.

How the browser check works: the test copies the report and puts a small probe script first in its
``<head>``. The probe records every ``window`` error event (uncaught exceptions, and resources that fail
to load: capture phase), unhandled promise rejections and ``console.error`` calls, and after the load
event writes them, with the page's rendered text (``document.body.innerText``: text that is laid out,
SVG text included, ``display: none`` left out), into a ``<pre>`` that ``--dump-dom`` prints. That is
level-aware and does not depend on Chromium's log format; its stderr is full of unrelated ``ERROR`` lines
(D-Bus, GPU) and logs every console message at INFO. As a second net, no ``CONSOLE`` line in that log
may report an error. All host names resolve to nothing (``--host-resolver-rules``), so a page that
wanted the network would record a load error. A first test proves the probe catches what it should.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); skips with that reason without one.
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from experiments.compare import PALETTE, load_run, write_html
from experiments.wandb_offline import read_run
from tests.conftest import ROOT, run_train_subprocess, write_experiment

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  __errors.push("error: " + (e.message || (e.target && (e.target.src || e.target.href)) || "unknown"));
}, true);
window.addEventListener("unhandledrejection", function (e) { __errors.push("unhandledrejection: " + e.reason); });
var __consoleError = console.error;
console.error = function () {
  __errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  __consoleError.apply(console, arguments);
};
window.addEventListener("load", function () {
  setTimeout(function () {
    var probe = document.createElement("pre");
    probe.id = "__probe";
    probe.textContent = JSON.stringify({errors: __errors, text: document.body.innerText,
                                        charts: document.querySelectorAll("svg.chart").length});
    document.body.appendChild(probe);
  }, 0);
});
</script>"""


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


needs_chromium = pytest.mark.skipif(chromium_binary() is None,
                                    reason="no chromium binary on PATH (Debian/Ubuntu: apt-get install -y chromium)")


def chromium(args: list[str], page: Path) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file, as root, with a throwaway profile and no way to reach any host."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


def render(report: Path, tmp_path: Path) -> dict[str, Any]:
    """Load ``report`` with the probe in Chromium; the probe's findings plus the console lines of Chromium's log."""
    page = tmp_path / f"probed-{report.name}"
    page.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = chromium(["--virtual-time-budget=5000", "--dump-dom"], page)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"the page never reached its load event\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-1500:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result


def console_errors(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"Uncaught|Error|Failed to load", line)]


@needs_chromium
def test_the_probe_sees_errors_and_network_use(tmp_path: Path) -> None:
    """The harness itself: a page with an exception, a console.error and a CDN image must fail the checks."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><p>visible</p>'
                   '<p style="display:none">hidden</p><img src="https://cdn.example.com/x.png">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    result = render(bad, tmp_path)
    errors = "\n".join(result["errors"])
    assert "console.error: boom" in errors and "undefinedFunction is not defined" in errors
    assert "https://cdn.example.com/x.png" in errors  # the page tried the network
    assert "visible" in result["text"] and "hidden" not in result["text"]
    assert console_errors(result["console"])


@pytest.fixture(scope="module")
def two_runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real train.py runs of the tiny model: one logging to W&B offline, one to CSV under a name that needs
    HTML escaping; different learning rates."""
    tmp = tmp_path_factory.mktemp("compare_runs")
    home = tmp / "home"
    home.mkdir()
    runs = []
    for lr, logger, name in (("0.001", "wandb", "lr-1e-3"), ("0.0003", "csv", 'lr<3e-4> & "csv"')):
        exp = write_experiment(tmp / f"lr{lr}.yaml", tiny_bert, logger=logger, data={"max_train_samples": 64},
                               trainer={"max_epochs": 3, "log_every_n_steps": 1}, model={"learning_rate": float(lr)})
        proc = run_train_subprocess(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs"), "--run_name", name,
                                     "--export", "false"], env={"HOME": str(home), "NETRC": str(home / ".netrc")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(next((tmp / "runs" / name).iterdir()))
    return runs


def _val_loss_best(run_dir: Path) -> float:
    """The run's lowest val/loss, read straight from its logger's files (not through experiments.compare)."""
    offline = sorted(run_dir.glob("wandb/offline-run-*"))
    if offline:
        rows = read_run(offline[0])["history"]
    else:
        with open(next(run_dir.rglob("metrics.csv")), newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    return min(row["val/loss"] for row in rows if "val/loss" in row)


@needs_chromium
def test_html_report_renders_every_run_without_errors(two_runs: list[Path], tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.html"
    args = ["compare", *map(str, two_runs), "--plots", str(tmp_path / "plots"), "--html", str(report)]
    proc = subprocess.run([sys.executable, "-m", "experiments", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"HTML report: {report}" in proc.stdout
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.html"]  # the temporary file was renamed
    source = report.read_text(encoding="utf-8")
    # self-contained: nothing is loaded from anywhere (the SVG namespace URI is a name, not a request)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|<link\b|@import|url\(""", source, re.IGNORECASE)

    names = [load_run(r)["name"] for r in two_runs]
    assert names[1].startswith('lr<3e-4> & "csv"/')
    result = render(report, tmp_path)
    assert result["errors"] == [], result["errors"]
    assert console_errors(result["console"]) == [], result["console"]
    for name in names:
        assert name in result["text"], f"{name!r} not on the rendered page"
    assert "model.learning_rate" in result["text"] and "0.0003" in result["text"]  # the hyper-parameter that differs
    assert "trainer.max_epochs" not in result["text"]  # one that does not
    assert result["charts"] >= 4  # val/accuracy, val/loss, train/loss, ... one chart each

    # each run's best val/loss is marked on its chart and named in its legend
    chart = re.search(r'<svg class="chart"[^>]*aria-label="val/loss".*?</svg>', source, re.DOTALL).group(0)
    for i, (run_dir, name) in enumerate(zip(two_runs, names)):
        best = _val_loss_best(run_dir)
        group = re.search(rf'<g class="run" data-run="{i}">.*?</g>', chart, re.DOTALL).group(0)
        assert f"{html.escape(name)}: best val/loss = {best:.4f}" in group
        assert f"{html.escape(name)} (best {best:.4f}, epoch" in chart
    # and in the table: the best value per run, and the better run in bold
    table = re.search(r"<table>.*?</table>", source, re.DOTALL).group(0)
    bests = sorted(_val_loss_best(r) for r in two_runs)
    assert f'class="num winner">{bests[0]:.4f} <small>(epoch' in table
    assert f'class="num">{bests[1]:.4f} <small>(epoch' in table or bests[0] == bests[1]


@needs_chromium
def test_report_screenshot_paints_every_run(two_runs: list[Path], tmp_path: Path) -> None:
    """The SVG charts paint: each run's colour covers far more of a screenshot than its 10x10 swatch in the table."""
    import matplotlib.image

    report = write_html([load_run(r) for r in two_runs], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    chromium(["--hide-scrollbars", "--window-size=1400,1400", f"--screenshot={shot}"], report)
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in PALETTE[:2]:
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        count = int((pixels == rgb).all(axis=1).sum())
        assert count > 500, f"{colour}: {count} pixels"


def test_html_is_written_atomically(two_runs: list[Path], tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    runs = [load_run(r) for r in two_runs]
    write_html(runs, report)
    before = report.read_text(encoding="utf-8")
    broken = [*runs, {"name": "broken", "config": {}, "history": None}]  # fails while rendering
    with pytest.raises(TypeError):
        write_html(broken, report)
    assert report.read_text(encoding="utf-8") == before  # the old report is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # and no temporary file is left
