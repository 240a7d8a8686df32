"""`python -m experiments <tool>`: list (the paper baselines), reproduce (run one, or one per seed with --seeds, and
compare with the published number), compare (runs side by side without the W&B dashboard), sweep (a W&B grid or random sweep file run locally, no W&B server)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOOLS = {"list": "experiments.registry", "reproduce": "experiments.registry", "compare": "experiments.compare",
         "sweep": "experiments.sweep"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m experiments {{{','.join(TOOLS)}}} ...", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOLS[argv[0]])
    # the registry serves two subcommands and takes the subcommand itself
    return module.main(argv if TOOLS[argv[0]] == "experiments.registry" else argv[1:])


if __name__ == "__main__":
    sys.exit(main())
