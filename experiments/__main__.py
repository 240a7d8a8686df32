"""`python -m experiments <tool>`: compare (runs side by side without the W&B dashboard)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOOLS = {"compare": "experiments.compare"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m experiments {{{','.join(TOOLS)}}} ...", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
