"""Does a seq2seq checkpoint read its source? Its loss with the right sources and with swapped ones.

    python -m experiments.source_reliance runs/aeslc_bert2bert/<time>/checkpoints/<best>.ckpt \
        ../shared/data/aeslc/dev.jsonl --max_samples 200

prints the mean loss per target token of the first ``--max_samples`` examples of the file, read with the
checkpoint's own data settings, once as they are and once with every source replaced by the next
example's (a rotation: no example keeps its own). A decoder that ignores the source (an unconditional
language model of the targets, the usual failure of an encoder-decoder whose cross-attention starts
random) scores the same on both; the gap, in nats per target token, is what the source tells the model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from datamodules.readers import read_records
from datamodules.seq2seq import Seq2SeqDataModule
from lit_modules.base import ConfigError
from lit_modules.schema import connect
from lit_modules.seq2seq import Seq2SeqModule


def mean_target_loss(module: Seq2SeqModule, data: Seq2SeqDataModule) -> float:
    """Loss per target token over the validation split of ``data`` (not per batch: batches differ in size)."""
    data.prepare_data()
    data.setup("validate")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            n = module.loss_weight(batch)
            total += float(module(**module.model_inputs(batch)).loss) * n
            tokens += n
    return total / tokens


def source_reliance(ckpt_path: str, path: str, max_samples: int = 200, work_dir: str | None = None) -> dict[str, Any]:
    module = Seq2SeqModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    module.eval()
    settings = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters")
    if not settings:
        raise ConfigError(f"{ckpt_path}: holds no data settings (was it written by train.py fit?)")
    keep = {"source_column", "target_column", "target_list", "source_lang", "target_lang", "source_prefix",
            "prompt_template", "max_source_length", "max_target_length", "max_seq_length", "eval_batch_size"}
    settings = {k: v for k, v in settings.items() if k in keep}
    records, lines = read_records(path)
    records, lines = records[:max_samples], lines[:max_samples]
    if len(records) < 2:
        raise ConfigError(f"{path}: needs at least 2 examples to swap sources, found {len(records)}")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        probe = Seq2SeqDataModule(**settings)
        columns = probe.canonical_columns(records, lines, "validation", path)
        right = Path(tmp) / "right.jsonl"
        swapped = Path(tmp) / "swapped.jsonl"
        sources = columns["source"]
        for file, srcs in ((right, sources), (swapped, sources[1:] + sources[:1])):
            file.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                                    for s, t in zip(srcs, columns["target"])), encoding="utf-8")
        losses = {}
        for name, file in (("right sources", right), ("swapped sources", swapped)):
            data = Seq2SeqDataModule(**{**settings, "source_column": "source", "target_column": "target",
                                        "target_list": "sentences", "source_lang": None, "target_lang": None},
                                     validation_file=str(file), cache_dir=str(Path(tmp) / "cache"))
            connect(module, data)
            losses[name] = mean_target_loss(module, data)
    return {"checkpoint": ckpt_path, "file": path, "examples": len(records),
            **{k: round(v, 4) for k, v in losses.items()},
            "gap (nats per target token)": round(losses["swapped sources"] - losses["right sources"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("file")
    parser.add_argument("--max_samples", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(source_reliance(args.checkpoint, args.file, args.max_samples), indent=2))


if __name__ == "__main__":
    main()
