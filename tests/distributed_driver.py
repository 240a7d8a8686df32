"""Runs validate, test and predict for several task setups in one launch, on 1 or N CPU processes.

    python tests/distributed_driver.py SPECS.json OUT_DIR DEVICES

Each spec is ``{"name", "model": {"class_path", "init_args"}, "data": {...}, "ckpt": path | null}``, the
shape of an experiment file. With DEVICES > 1 Lightning relaunches this script for the other ranks
(DDP over gloo); every Trainer after the first reuses the process group, so one launch covers every
task. Rank 0 writes ``OUT_DIR/<name>.json`` (validate and test metrics) next to
``OUT_DIR/<name>-predictions.jsonl``. tests/test_distributed.py compares 1 and 2 processes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from lit_modules.callbacks import PredictionsWriter  # noqa: E402
from lit_modules.schema import connect  # noqa: E402


def build(section: dict[str, Any]) -> Any:
    """The object a ``{"class_path", "init_args"}`` section describes."""
    module, _, name = section["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**section.get("init_args", {}))


def trainer(devices: int, **kwargs: Any) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


def fit_checkpoint(spec: dict[str, Any], path: Path, steps: int = 3) -> Path:
    """A few optimizer steps on one process, saved as a checkpoint: trained heads, labels in the hparams."""
    from lightning.pytorch import seed_everything

    seed_everything(0, verbose=False)
    model, dm = build(spec["model"]), build(spec["data"])
    connect(model, dm)
    t = trainer(1, max_steps=steps, limit_val_batches=0, enable_checkpointing=False, default_root_dir=str(path.parent))
    t.fit(model, datamodule=dm)
    t.save_checkpoint(path)
    return path


def evaluate(specs: list[dict[str, Any]], out_dir: Path, devices: int) -> None:
    """validate, test and predict every spec from its checkpoint; rank 0 writes the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        model, dm = build(spec["model"]), build(spec["data"])
        connect(model, dm)
        writer = PredictionsWriter(out_dir / f"{spec['name']}-predictions.jsonl")
        t = trainer(devices, enable_checkpointing=False, default_root_dir=str(out_dir), callbacks=[writer])
        ckpt = spec.get("ckpt")
        val = t.validate(model, datamodule=dm, ckpt_path=ckpt, verbose=False)
        test = t.test(model, datamodule=dm, ckpt_path=ckpt, verbose=False)
        t.predict(model, datamodule=dm, ckpt_path=ckpt, return_predictions=False)
        if t.is_global_zero:
            sizes = {"validate": len(dm.datasets["validation"]), "test": len(dm.datasets["test"])}  # features
            (out_dir / f"{spec['name']}.json").write_text(json.dumps({"validate": val[0], "test": test[0],
                                                                      "world_size": t.world_size, "sizes": sizes}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs_file, out, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    evaluate(json.loads(Path(specs_file).read_text()), out, n)
