"""Split COVID-QA by article for the domain-adaptive pretraining measurement (README, "Domain-adaptive pretraining (masked / causal language modelling)").

    python -m experiments.covid_qa_split [--source FILE] [--out DIR] [--every 5]

Writes two SQuAD files: ``pretrain.json`` (the articles whose contexts continued pretraining reads) and
``heldout.json`` (every ``every``-th article, from the ``every``-th on: never pretrained on; its contexts give the dev
perplexity and its questions the QA evaluation). The default output folder is ``runs/covid_qa_dapt/data``, where
``experiments/minilm/covid_qa_mlm.yaml`` and ``covid_qa_squad_transfer.yaml`` look; nothing is written into the
tracked tree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "covid_qa" / "200423_covidQA.fixed_offsets.json"
OUT = ROOT / "runs" / "covid_qa_dapt" / "data"


def split_articles(squad: dict[str, Any], every: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pretraining articles, held-out articles): article i is held out when (i + 1) % every == 0."""
    articles = squad["data"]
    held = [a for i, a in enumerate(articles) if (i + 1) % every == 0]
    kept = [a for i, a in enumerate(articles) if (i + 1) % every != 0]
    return {**squad, "data": kept}, {**squad, "data": held}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="COVID-QA in SQuAD format")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for pretrain.json and heldout.json")
    parser.add_argument("--every", type=int, default=5, help="hold out every N-th article")
    args = parser.parse_args(argv)
    if args.every < 2:
        parser.error("--every: expected an integer >= 2")
    squad = json.loads(args.source.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("pretrain", "heldout"), split_articles(squad, args.every)):
        (args.out / f"{name}.json").write_text(json.dumps(part), encoding="utf-8")
        paragraphs = [p for a in part["data"] for p in a["paragraphs"]]
        print(f"{args.out / name}.json: {len(part['data'])} articles, {sum(len(p['qas']) for p in paragraphs)} "
              f"questions, {sum(len(p['context']) for p in paragraphs):,} context characters")


if __name__ == "__main__":
    main()
