"""python -m experiments.benchmark end to end on tiny random models and tiny data, every --task and mode: each runner's
row is printed with every field. No speed is asserted (the benchmark measures them; a test cannot)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import pytest
import torch

from experiments import benchmark

SUMMARY = ["runner", "train samples/s (loop)", "vs best peer", "e2e samples/s", "tokenise s", "eval samples/s",
           "eval vs best peer", "peak RSS train MB", "peak RSS eval MB (+growth)", "metric (per repeat)"]
TASK_COLUMNS = {"qa": ["model windows/s", "post-processing s"],
                "seq2seq": ["generation s", "gen tokens/s", "gen examples/s"]}
METRICS = {"classification": ["accuracy"], "ner": ["f1", "precision", "recall"], "qa": ["exact_match", "f1"],
           "seq2seq": ["rouge1", "rouge2", "rougeL", "gen_len"], "causal_lm": ["target_loss", "perplexity"]}
RUNNERS = {"classification": ["tuneforge", "hf_trainer", "hf_grouped", "hand_loop", "tuneforge_bf16"],
           "ner": ["tuneforge", "hf_trainer", "hf_grouped"], "qa": ["tuneforge", "hf_trainer", "hf_grouped"],
           "seq2seq": ["tuneforge", "hf_seq2seq", "hf_seq2seq_grouped"],
           "causal_lm": ["tuneforge", "hf_trainer", "hf_padding_free", "trl_packing"]}
NUMBER = re.compile(r"^-?\d+(\.\d+)?x?$")


def run(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    threads = torch.get_num_threads()
    code = benchmark.main(args)
    assert torch.get_num_threads() == threads  # the process's setting is given back
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def markdown_rows(out: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the markdown table whose first column is ``first_header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def runners_for(task: str) -> list[str]:
    names = RUNNERS[task]
    return [n for n in names if n != "trl_packing" or importlib.util.find_spec("trl") is not None]


@pytest.mark.parametrize("task", list(RUNNERS))
def test_every_runner_prints_every_field(task: str, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    names = runners_for(task)
    out = run(capsys, ["--task", task, "--tiny", "--runners", ",".join(names), "--output", str(tmp_path / "r.json")])
    # one line per runner and repeat, every field named
    for name in names:
        line = next(x for x in out.splitlines() if x.startswith(f"  repeat 1 {name} "))
        for field in ("train ", "samples/s (loop", "e2e", "steps)", "tokenise", "eval ", "examples)",
                      "peak RSS train", "eval ", *METRICS[task]):
            assert field in line, (field, line)
        assert "ERROR" not in line
    # the summary table: every runner, every column filled with a number (or a ratio), metrics named
    header, rows = markdown_rows(out, "runner")
    assert header == SUMMARY[:7] + TASK_COLUMNS.get(task, []) + SUMMARY[7:]
    assert [r[0] for r in rows] == names
    for row in rows:
        assert len(row) == len(header)
        for column, cell in zip(header[1:-2], row[1:-2]):
            if "vs best peer" in column and not any(benchmark.is_peer(n) for n in names):
                continue
            assert NUMBER.match(cell), (row[0], column, cell)
        assert re.match(r"^\d+ \(\+-?\d+\)$", row[-2]), row  # peak RSS of evaluation and its growth
        for metric in METRICS[task]:
            assert metric in row[-1]
    assert (tmp_path / "r.json").is_file()
    if task == "seq2seq":  # generation with the same weights through tuneforge and Seq2SeqTrainer
        header, rows = markdown_rows(out, "repeat")
        assert "identical outputs" in header and len(rows) == 1 and all(rows[0])


def test_qa_tokenise_only(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, ["--task", "qa", "--tiny", "--tokenise_only"])
    header, rows = markdown_rows(out, "runner")
    assert header[:4] == ["runner", "tokenise s (per repeat)", "questions/s (best)", "windows"]
    assert [r[0] for r in rows] == benchmark.TOKENISE_RUNNERS.split(",")
    for row in rows:
        assert NUMBER.match(row[1]) and NUMBER.match(row[2]) and int(row[3]) > 0, row


def test_evaluation_at_two_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """--eval_only at two evaluation sizes: a memory table with both sizes for every runner."""
    out = run(capsys, ["--task", "qa", "--tiny", "--eval_only", "--max_eval_samples", "8,16",
                       "--runners", "tuneforge,hf_trainer"])
    _, rows = markdown_rows(out, "runner")
    assert [r[0] for r in rows] == ["tuneforge", "hf_trainer"]
    assert all(r[1] == "-" for r in rows)  # nothing trained
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "8 examples: s / peak RSS MB" in line)
    assert "16 examples: s / peak RSS MB" in lines[start]
    memory_rows = lines[start + 2: start + 4]
    assert [r.split("|")[1].strip() for r in memory_rows] == ["tuneforge", "hf_trainer"]
    for r in memory_rows:
        assert "-" not in r.split("|")[3:5], r


def test_grouped_qa_peer_pairs_each_window_with_its_own_logits(capsys: pytest.CaptureFixture[str]) -> None:
    """group_by_length also reorders Trainer.predict's output; the grouped QA peer evaluates in dataset order, so the
    same untrained weights score exactly as the un-grouped recipe (in grouped order they pair answers with the wrong
    windows and score differently)."""
    out = run(capsys, ["--task", "qa", "--tiny", "--eval_only", "--runners", "hf_trainer,hf_grouped", "--no-isolate"])
    _, rows = markdown_rows(out, "runner")
    assert [r[0] for r in rows] == ["hf_trainer", "hf_grouped"]
    assert rows[0][-1] == rows[1][-1] and "f1" in rows[0][-1]
