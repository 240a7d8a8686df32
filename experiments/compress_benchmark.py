"""Accuracy, size and CPU speed of every compressed variant of a classifier, measured side by side in one run.

    python -m experiments.compress_benchmark --model runs/sst2/<time>/export --data ../shared/data/sst2/dev.tsv \
        [--prune_heads 24 --prune_data held_out.tsv [--recover_steps 200 --recover_data train_part.tsv]] \
        [--distilled <student export>] [--latency_samples 100] [--repeats 3] [--threads N] [--json out.json]

Builds the variants exactly as ``python -m experiments.compress`` writes them (fp32 reference, int8, ONNX,
ONNX + int8, pruned when ``--prune_heads`` is given, and a distilled student when ``--distilled`` is given), loads
each back from its folder, and measures on ``--data`` (labelled classification data):

- accuracy over the whole file;
- size on disk of the weight files;
- latency at batch 1: the median (and 90th percentile) over the first ``--latency_samples`` examples, the
  variants taking turns example by example so that load from other processes falls on all of them alike;
- throughput at batch 32: examples per second over the whole file in input order (batches padded to their
  longest), ``--repeats`` rounds with the variants taking turns, the median round reported.

Tokenisation is done once, outside the timings (it is the same for every variant). PyTorch and ONNX Runtime use
the same number of threads (``--threads``, default torch's). On cores shared with other processes, measure with
``--threads 1``: with more threads than free cores every PyTorch operator waits at its OpenMP barrier for a thread
the scheduler has parked (milliseconds per operator), and the numbers measure the neighbours, not the model. Prints a markdown table, then the JSON (also
written to ``--json``). ``--profile`` adds the top operators of one batch-32 pass of fp32 and int8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.compress import (
    VerificationError,
    add_variant_arguments,
    build_variants,
    load_fp32,
    load_variant,
    tokenized_batches,
    weights_size,
    write_fp32,
)
from experiments.explain import quiet_transformers, read_examples
from lit_modules.errors import ConfigError, DataError, first_line

ORDER = ("fp32", "int8", "onnx", "onnx_int8", "pruned", "distilled")


def labels_of(examples: list[dict[str, Any]], id2label: dict[int, str], path: str) -> np.ndarray:
    """Gold label ids of the examples, by the model's label names."""
    label2id = {name: k for k, name in id2label.items()}
    out = []
    for ex in examples:
        if ex["gold"] is None:
            raise DataError(f"{path}: has no label column; accuracy needs gold labels")
        if ex["gold"] not in label2id:
            raise DataError(f"{path}:{ex['line']}: label {ex['gold']!r} is not one of the model's labels "
                            f"({', '.join(label2id)})")
        out.append(label2id[ex["gold"]])
    return np.array(out)


def profile(runner: Any, batch: dict[str, np.ndarray], rows: int = 12) -> str:
    """The operators that take the most CPU time in one pass of ``runner`` over ``batch``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build, reload and measure every variant; returns the JSON-ready results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    loaded = load_fp32(args.model)
    if loaded.task != "classification" or loaded.problem_type in ("regression", "multi_label_classification"):
        raise ConfigError(f"--model: compress_benchmark measures single-label classification accuracy; "
                          f"'{args.model}' is {loaded.task} ({loaded.problem_type})")
    examples = read_examples(args.data, "classification", loaded.tokenizer)
    if args.max_samples:
        examples = examples[: args.max_samples]
    gold = labels_of(examples, loaded.id2label, args.data)
    batches = tokenized_batches(loaded, examples, args.batch_size, args.max_seq_length)
    singles = tokenized_batches(loaded, examples[: args.latency_samples], 1, args.max_seq_length)

    work = Path(args.variants_dir) if args.variants_dir else Path(tempfile.mkdtemp(prefix="compress_benchmark-"))
    args.output, args.int8, args.onnx, args.onnx_int8 = str(work), True, True, True
    args.verify_data = args.verify_data or args.data
    folders = {"fp32": write_fp32(loaded, work / "fp32"), **build_variants(args, loaded)}
    if args.distilled:
        student = load_fp32(args.distilled)
        if student.id2label != loaded.id2label:
            raise ConfigError(f"--distilled: its labels {student.id2label} differ from the model's {loaded.id2label}")
        folders["distilled"] = write_fp32(student, work / "distilled")
    names = [n for n in ORDER if n in folders]
    runners = {n: load_variant(folders[n], threads)[0] for n in names}

    for runner in runners.values():  # warm-up: first-call allocations and ONNX Runtime's lazy initialisation
        for batch in batches[:2] + singles[:2]:
            runner(batch)
    predictions: dict[str, np.ndarray] = {}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:
            out = []
            start = time.perf_counter()
            for batch in batches:
                out.append(runners[n](batch)[0].argmax(-1))
            rounds[n].append(len(examples) / (time.perf_counter() - start))
            if r == 0:
                predictions[n] = np.concatenate(out)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    for single in singles:
        for n in names:
            start = time.perf_counter()
            runners[n](single)
            latencies[n].append(1000 * (time.perf_counter() - start))

    base_acc = float((predictions["fp32"] == gold).mean())
    base_tp = statistics.median(rounds["fp32"])
    rows = []
    for n in names:
        acc = float((predictions[n] == gold).mean())
        tp = statistics.median(rounds[n])
        rows.append({
            "variant": n, "accuracy": acc, "accuracy_change_points": 100 * (acc - base_acc),
            "agreement_with_fp32": float((predictions[n] == predictions["fp32"]).mean()),
            "size_mib": weights_size(folders[n]) / 2**20,
            "latency_ms_median": statistics.median(latencies[n]),
            "latency_ms_p90": float(np.percentile(latencies[n], 90)),
            "throughput_per_s": tp, "throughput_rounds": rounds[n], "speedup_vs_fp32": tp / base_tp,
            "folder": str(folders[n]),
        })
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "model": str(args.model), "data": str(args.data),
        "examples": len(examples), "batch_size": args.batch_size, "latency_samples": len(singles),
        "repeats": args.repeats, "max_seq_length": args.max_seq_length,
        "machine": {"cpus": os.cpu_count(), "threads": threads, "processor": platform.processor() or platform.machine(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                    "quantized_engine": torch.backends.quantized.engine},
        "rows": rows,
    }
    if args.profile:
        result["profile"] = {n: profile(runners[n], batches[0]) for n in ("fp32", "int8")}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    header = ("| variant | accuracy | change (points) | size on disk (MiB) | latency batch 1, median / p90 (ms) "
              "| throughput batch 32 (examples/s) | vs fp32 |")
    lines = [header,
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['accuracy_change_points']:+.2f} | "
                     f"{r['size_mib']:.1f} | {r['latency_ms_median']:.2f} / {r['latency_ms_p90']:.2f} | "
                     f"{r['throughput_per_s']:.1f} | {r['speedup_vs_fp32']:.2f}x |")
    return "\n".join(lines)


def goal_lines(result: dict[str, Any]) -> list[str]:
    """The issue's goal, int8 >= 1.5x fp32 batch-32 throughput with <= 1 point of accuracy lost, per int8 variant."""
    out = []
    for r in result["rows"]:
        if r["variant"] in ("int8", "onnx_int8"):
            met = r["speedup_vs_fp32"] >= 1.5 and r["accuracy_change_points"] >= -1.0
            out.append(f"{r['variant']}: {r['speedup_vs_fp32']:.2f}x fp32 throughput, {r['accuracy_change_points']:+.2f} "
                       f"accuracy points: goal (>= 1.5x, >= -1 point) {'met' if met else 'NOT met'}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="classification export folder (plain or PEFT adapter)")
    p.add_argument("--data", required=True, help="labelled evaluation file (e.g. ../shared/data/sst2/dev.tsv)")
    p.add_argument("--distilled", default=None, help="a distilled student's export, measured as one more row")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--latency_samples", type=int, default=100, help="examples timed one at a time")
    p.add_argument("--repeats", type=int, default=3, help="throughput rounds per variant (median reported)")
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N examples of --data")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--variants_dir", default=None, help="keep the variant folders here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", action="store_true", help="top operators of fp32 and int8 on one batch")
    add_variant_arguments(p)
    args = p.parse_args(argv)
    for key in ("batch_size", "latency_samples", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key}: expected an integer >= 1, got {getattr(args, key)}")
    return args


@quiet_transformers()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = benchmark(args)
    except (ConfigError, DataError) as e:
        print(f"error: {first_line(e, 400)}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"error: {first_line(e, 400)}", file=sys.stderr)
        return 1
    m = result["machine"]
    print(f"{result['date']}, {result['examples']} examples of {result['data']}, {m['threads']} threads on "
          f"{m['cpus']} CPUs (load average {m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} "
          f"at end), torch {m['torch']}, onnxruntime {m['onnxruntime']}")
    print(markdown(result))
    for line in goal_lines(result):
        print(line)
    for name, table in result.get("profile", {}).items():
        print(f"\nprofile, {name}, one batch of {result['batch_size']}:\n{table}")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
