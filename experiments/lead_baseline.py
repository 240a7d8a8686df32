"""Lead baselines for summarization data, scored with the same ROUGE code as the models.

    python -m experiments.lead_baseline ../shared/data/aeslc/test.jsonl --source_column email_body \
        --target_column subject --reference_columns ann0 ann1 ann2 --max_samples 500

prints ROUGE of "the first sentence" (lead-1) and of "the first N words" (N = the mean reference
length in words, unless --words is given) as the summary, read with the same columns and reference
handling as ``Seq2SeqDataModule``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from datamodules.readers import read_records
from datamodules.seq2seq import Seq2SeqDataModule
from lit_modules.seq2seq_metrics import RougeScore, split_sentences


def lead_scores(path: str, max_samples: int | None = None, words: int | None = None, use_stemmer: bool = True,
                **data_kwargs: Any) -> dict[str, Any]:
    """ROUGE of the lead-1 sentence and of the first ``words`` words of each source."""
    records, lines = read_records(path)
    if max_samples:
        records, lines = records[:max_samples], lines[:max_samples]
    columns = Seq2SeqDataModule(**data_kwargs).canonical_columns(records, lines, "test", path)
    sources, refs = columns["source"], columns["references"]
    if words is None:
        words = round(sum(len(r[0].split()) for r in refs) / len(refs))
    leads = {"lead-1 sentence": [(split_sentences(s) or [""])[0] for s in sources],
             f"first {words} words": [" ".join(s.split()[:words]) for s in sources]}
    out: dict[str, Any] = {"file": path, "examples": len(sources)}
    for name, preds in leads.items():
        metric = RougeScore(use_stemmer=use_stemmer)
        metric.update(preds, refs, torch.arange(len(preds)))
        out[name] = {k: round(float(v), 4) for k, v in metric.compute().items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--source_column")
    parser.add_argument("--target_column")
    parser.add_argument("--reference_columns", nargs="*")
    parser.add_argument("--target_list", default="sentences", choices=["sentences", "references"])
    parser.add_argument("--max_samples", type=int)
    parser.add_argument("--words", type=int, help="words in the first-N-words baseline (default: mean reference length)")
    parser.add_argument("--no_stemmer", action="store_true")
    args = parser.parse_args()
    print(json.dumps(lead_scores(args.file, args.max_samples, args.words, not args.no_stemmer,
                                 source_column=args.source_column, target_column=args.target_column,
                                 reference_columns=args.reference_columns, target_list=args.target_list), indent=2))


if __name__ == "__main__":
    main()
