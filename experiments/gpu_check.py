"""One prepared GPU check: every task's fit + test with the GPU presets, torch.compile off and on, and the numbers that
say whether the GPU is used well. No hub, no network, no package installs.

    # on any machine with ../shared/data, once: small slices of the real data into a git-ignored folder
    python -m experiments.gpu_check --prepare_data runs/gpu_check_data
    # on the GPU machine (carry runs/gpu_check_data with the working tree); about 7 minutes on one GPU
    python -m experiments.gpu_check --data runs/gpu_check_data --out $OUT/gpu_check.json
    # what the tests run: tiny models on the CPU
    python -m experiments.gpu_check --tiny --device cpu --out /tmp/gpu_check.json

Models are random-initialised from config objects and saved locally: a BERT-base-sized encoder (12 layers, 768 wide,
vocabulary 30,522: classification, NER, QA, and the BERT2BERT encoder-decoder of seq2seq) and a Llama-sized decoder
(``--llama 1b``: TinyLlama-1.1B's shape, 22 layers, 2,048 wide, grouped-query attention; ``360m``: SmolLM2-360M's)
for decoder-only seq2seq (causal_lm). Tokenizers are built from the data's own words (WordPiece) and text (byte-level
BPE). Each task runs ``fit`` (``--steps`` optimizer steps after ``--warmup`` untimed ones) and ``test`` through the
task's module, data module, ``lit_modules.schema.connect`` and ``lightning.Trainer``, under configs/trainer/gpu.yaml
(bf16-mixed), ddp.yaml and fsdp.yaml on one device, with ``model.compile`` off and on. One more run, ``mfu_bert``,
measures the headline number: BERT-base, sequence length 128, bf16, on SQuAD paragraphs labelled with their article
(every sequence fills its 128 tokens), batch 256.

Reported per run: training samples/s and tokens/s over real (non-padding) tokens, the share of padding, model FLOP
utilisation (MFU) on real tokens against the GPU's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`; ``--peak_tflops``
overrides), peak GPU memory of fit and of test, the test metrics, and any error (one run failing does not stop the
others). Runs are ordered by what matters most and skipped, with a note, when ``--budget_s`` would be exceeded; the JSON
file is rewritten after every run, so a run cut short still leaves what finished.

FLOPs per training step (PaLM, Chowdhery et al. 2022, appendix B): 6 x (matrix-multiply weights) x real tokens, plus
12 x layers x width x sum over sequences of (real length)^2 for attention; encoder-decoders count the encoder on the
source tokens, the decoder on the target tokens, and cross-attention as 12 x decoder layers x width x source x target
length. Embedding lookups are not counted; causal attention is counted in full (the usual convention).

Needs torch, lightning, transformers, torchmetrics (and peft only for PEFT runs, none here). tuneforge's data
modules cache features with ``datasets`` (and QA reads them with ``pyarrow``): when ``datasets`` is missing (or with
``--no_datasets``) the data modules keep their features in memory instead (:class:`InMemoryFeatures`, the same
reading, encoding, padding and sampling, without the on-disk cache); QA then still needs ``pyarrow``. ROUGE's stemmer
needs ``nltk``; without it seq2seq scores unstemmed ROUGE.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

TASKS = ("mfu_bert", "classification", "ner", "qa", "seq2seq", "causal_lm")
CONFIGS = ("gpu", "ddp", "fsdp")
# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0))
LLAMA_SHAPES = {
    "1b": {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab_size": 32000},
    "360m": {"hidden": 960, "layers": 32, "heads": 15, "kv_heads": 5, "intermediate": 2560, "vocab_size": 49152},
}
BERT_BASE = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab_size": 30522}
# slices of ../shared/data that --prepare_data copies (first N records of each file)
SLICES = {"sst2_train": 4096, "sst2_dev": 256, "conll_train": 2048, "conll_dev": 256, "squad_train": 1536,
          "squad_dev": 256, "aeslc_train": 2048, "aeslc_dev": 128, "mfu_train": 10240}
PROMPT = "Email:\n{source}\nSubject line:"


# ---- environment -----------------------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    """Versions of the packages the check uses or may miss (None: not installed)."""
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "lightning", "transformers", "torchmetrics", "peft", "datasets", "pyarrow", "nltk", "wandb",
                 "tokenizers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """The dense bf16 peak of a GPU by name, and where the number comes from."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, f"table entry {key!r}: {tflops:g} TFLOP/s dense bf16 (NVIDIA data sheet)"
    return None, f"no table entry for {device_name!r}: MFU not computed (give --peak_tflops)"


# ---- data -------------------------------------------------------------------------------------------------

def prepare_data(shared: Path, out: Path) -> dict[str, Path]:
    """Copy the first records of the real data sets the check uses from ``shared`` (../shared/data) into ``out`` (a
    git-ignored folder: the shared data must not enter the repository); a few MB."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def lines(src: Path, n: int, header: bool = False) -> list[str]:
        text = src.read_text(encoding="utf-8").splitlines(keepends=True)
        return text[: n + int(header)]

    for split, name, n in (("train", "train.tsv", SLICES["sst2_train"]), ("dev", "dev.tsv", SLICES["sst2_dev"])):
        files[f"sst2_{split}"] = out / f"sst2_{split}.tsv"
        files[f"sst2_{split}"].write_text("".join(lines(shared / "sst2" / name, n, header=True)), encoding="utf-8")
    for split, name, n in (("train", "eng.train", SLICES["conll_train"]), ("dev", "eng.testa", SLICES["conll_dev"])):
        blocks = (shared / "conll2003" / name).read_text(encoding="utf-8").split("\n\n")
        files[f"conll_{split}"] = out / f"conll_{split}.txt"
        files[f"conll_{split}"].write_text("\n\n".join(blocks[: n + 1]) + "\n", encoding="utf-8")
    for split, name, n in (("train", "train.json", SLICES["squad_train"]), ("dev", "dev.json", SLICES["squad_dev"])):
        data = json.loads((shared / "squad_v1.1" / name).read_text(encoding="utf-8"))["data"]
        kept, count = [], 0
        for article in data:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                if count >= n:
                    break
                qas = paragraph["qas"][: n - count]
                count += len(qas)
                paragraphs.append({**paragraph, "qas": qas})
            if paragraphs:
                kept.append({**article, "paragraphs": paragraphs})
            if count >= n:
                break
        files[f"squad_{split}"] = out / f"squad_{split}.json"
        files[f"squad_{split}"].write_text(json.dumps({"version": "1.1", "data": kept}), encoding="utf-8")
    for split, name, n in (("train", "train.jsonl", SLICES["aeslc_train"]), ("dev", "dev.jsonl", SLICES["aeslc_dev"])):
        files[f"aeslc_{split}"] = out / f"aeslc_{split}.jsonl"
        files[f"aeslc_{split}"].write_text("".join(lines(shared / "aeslc" / name, n)), encoding="utf-8")
    # mfu_bert: paragraphs labelled with their article's title (a real topic label; every paragraph fills 128 tokens)
    data = json.loads((shared / "squad_v1.1" / "train.json").read_text(encoding="utf-8"))["data"]
    rows = [{"text": p["context"], "label": a["title"]} for a in data for p in a["paragraphs"]][: SLICES["mfu_train"]]
    files["mfu_train"] = out / "mfu_train.jsonl"
    files["mfu_train"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files


def data_files(folder: Path | None, work: Path) -> tuple[dict[str, Path], str]:
    """The prepared real-data slices in ``folder``, or tiny data written from the project's own sentences."""
    names = [*(f"{n}_{s}" for n in ("sst2", "conll", "squad", "aeslc") for s in ("train", "dev")), "mfu_train"]
    if folder is not None:
        files = {n: next(iter(sorted(folder.glob(f"{n}.*"))), None) for n in names}
        missing = [n for n, p in files.items() if p is None]
        if missing:
            raise SystemExit(f"--data {folder}: no {', '.join(missing)} (make it with --prepare_data {folder})")
        return files, f"real data slices from {folder}"  # type: ignore[return-value]
    from experiments.benchmark import tiny_corpus, write_tiny_data

    corpus = tiny_corpus()
    files = write_tiny_data(work / "data", corpus)
    files["mfu_train"] = work / "data" / "mfu_train.jsonl"
    files["mfu_train"].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in corpus))
    return files, "tiny data from experiments/data/sentiment"


def all_texts(files: dict[str, Path]) -> list[str]:
    """Every text of the data files (what the tokenizers are built from)."""
    texts: list[str] = []
    for name, path in files.items():
        raw = path.read_text(encoding="utf-8")
        if name.startswith("squad"):
            for article in json.loads(raw)["data"]:
                for p in article["paragraphs"]:
                    texts.append(p["context"])
                    texts += [q["question"] for q in p["qas"]]
        elif path.suffix == ".jsonl":
            for line in raw.splitlines():
                texts += [str(v) for v in json.loads(line).values() if isinstance(v, str)]
        else:
            texts += raw.splitlines()
    return texts


class ListTable:
    """The few ``datasets.Dataset`` methods tuneforge's data path uses, over in-memory columns (no ``datasets``)."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        if isinstance(key, int):
            return {k: v[key] for k, v in self.columns.items()}
        return {k: [v[int(i)] for i in key] for k, v in self.columns.items()}

    def select_columns(self, names: list[str]) -> ListTable:
        return ListTable({k: self.columns[k] for k in names})

    def with_format(self, _: Any = None) -> ListTable:
        return self

    @property
    def data(self) -> Any:
        """A pyarrow table of the columns (extractive QA reads its windows through pyarrow)."""
        import pyarrow as pa

        return pa.table(self.columns)


class InMemoryFeatures:
    """Mixin for a tuneforge data module: features built in memory (read, canonical columns, ``encode`` in batches
    of 1,000, as the cached path does) instead of cached with ``datasets``, for machines without it."""

    def _load_split(self, split: str, build: bool) -> ListTable:
        built = self.__dict__.setdefault("_in_memory", {})
        if split not in built:
            records, lines = self._read_split(split)  # type: ignore[attr-defined]
            limit = self._max_samples(split)  # type: ignore[attr-defined]
            if limit is not None:
                records, lines = records[:limit], lines[:limit]
            source = self._source_name(split)  # type: ignore[attr-defined]
            columns = self.canonical_columns(records, lines, split, source)  # type: ignore[attr-defined]
            columns.setdefault("line", lines)
            n = len(next(iter(columns.values())))
            out: dict[str, list] = {}
            for start in range(0, n, 1000):
                chunk = {k: v[start: start + 1000] for k, v in columns.items()}
                encoded = {**chunk, **self._encode_with_length(chunk)}  # type: ignore[attr-defined]
                for k, v in encoded.items():
                    out.setdefault(k, []).extend(v)
            built[split] = ListTable(out)
        return built[split]


# ---- models ------------------------------------------------------------------------------------------------

def build_models(work: Path, texts: list[str], tiny: bool, llama: str, device: str) -> dict[str, Path]:
    """Random BERT and Llama folders (model + tokenizer) for the check; BERT-base and Llama-sized unless ``tiny``."""
    from experiments.benchmark import build_tiny_bert, build_tiny_llama, words_of

    words = sorted({w for t in texts for w in words_of(t)})
    bert = work / "models" / "bert"
    llama_dir = work / "models" / "llama"
    if tiny:
        build_tiny_bert(bert, words)
        build_tiny_llama(llama_dir, texts)
        return {"bert": bert, "llama": llama_dir}
    b = BERT_BASE
    # the WordPiece vocabulary holds the data's words; the embedding is BERT-base's 30,522 rows
    build_tiny_bert(bert, words[: b["vocab_size"] - 2000], hidden=b["hidden"], layers=b["layers"], heads=b["heads"],
                    intermediate=b["intermediate"], vocab_size=b["vocab_size"])
    s = LLAMA_SHAPES[llama]
    with torch.device(device if device == "cuda" else "cpu"):  # initialising 1B weights is much faster on the GPU
        build_tiny_llama(llama_dir, texts, hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                         kv_heads=s["kv_heads"], intermediate=s["intermediate"], vocab_size=s["vocab_size"],
                         bpe_vocab=8000)
    return {"bert": bert, "llama": llama_dir}


def matmul_weights(module: torch.nn.Module) -> int:
    """Weights of every matrix multiply (``nn.Linear``) in ``module``, whatever wraps it (FSDP, compile)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def transformer_shape(config: Any) -> tuple[int, int]:
    """(layers, width) of a Hugging Face config."""
    return int(getattr(config, "num_hidden_layers", 0)), int(getattr(config, "hidden_size", 0))


# ---- measuring ---------------------------------------------------------------------------------------------

def throughput_meter(kind: str, warmup: int, cuda: bool) -> Any:
    """A Lightning callback counting samples, real tokens, padding and model FLOPs of every training step after the
    first ``warmup`` ones, and timing them (synchronised with the GPU at both ends). ``kind``: ``encoder``,
    ``encoder_decoder`` or ``decoder``."""
    from lightning.pytorch.callbacks import Callback

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Meter(Callback):
        def __init__(self) -> None:
            self.steps = 0
            self.samples = 0
            self.tokens: Any = 0
            self.slots: Any = 0
            self.flops: Any = 0.0
            self.start = self.end = float("nan")
            self.warmup_s = float("nan")

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            model = pl_module.model
            self.t0 = time.perf_counter()
            if kind == "encoder_decoder":
                self.p_enc, self.p_dec = matmul_weights(model.encoder), matmul_weights(model.decoder)
                self.enc_shape = transformer_shape(model.config.encoder)
                self.dec_shape = transformer_shape(model.config.decoder)
            else:
                self.p = matmul_weights(model)
                self.shape = transformer_shape(model.config)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: dict[str, Any], batch_idx: int) -> None:
            if batch_idx == warmup:
                sync()
                self.start = time.perf_counter()
                self.warmup_s = self.start - self.t0
            if batch_idx < warmup:
                return
            mask = batch["attention_mask"]
            lengths = mask.sum(1).float()
            self.steps += 1
            self.samples += int(mask.shape[0])
            self.slots += mask.numel()
            if kind == "encoder_decoder":
                target = (batch["labels"] != -100).sum(1).float()
                (layers_e, width), (layers_d, _) = self.enc_shape, self.dec_shape
                self.tokens = self.tokens + lengths.sum() + target.sum()
                self.flops = self.flops + 6 * (self.p_enc * lengths.sum() + self.p_dec * target.sum()) \
                    + 12 * width * (layers_e * (lengths ** 2).sum()
                                    + layers_d * ((target ** 2).sum() + (target * lengths).sum()))
                self.slots += batch["labels"].numel()
            else:
                layers, width = self.shape
                self.tokens = self.tokens + lengths.sum()
                self.flops = self.flops + 6 * self.p * lengths.sum() + 12 * layers * width * (lengths ** 2).sum()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            sync()
            self.end = time.perf_counter()

        def summary(self, peak_tflops: float | None) -> dict[str, Any]:
            seconds = self.end - self.start
            tokens, flops, slots = float(self.tokens), float(self.flops), float(self.slots)
            out = {"timed_steps": self.steps, "seconds": seconds, "warmup_s": self.warmup_s,
                   "samples_per_s": self.samples / seconds, "real_tokens_per_s": tokens / seconds,
                   "padding_share": 1 - tokens / slots if slots else float("nan"),
                   "model_tflops": flops / seconds / 1e12}
            out["mfu"] = out["model_tflops"] / peak_tflops if peak_tflops else None
            return out

    return Meter()


@contextlib.contextmanager
def peak_memory(cuda: bool) -> Iterator[dict[str, float]]:
    """Peak memory of the block in GB: the GPU's allocator (CUDA) or the process's resident size (CPU)."""
    out: dict[str, float] = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:
        from experiments.benchmark import PeakRss

        with PeakRss() as rss:
            yield out
        out["gb"] = rss.peak / 1024


# ---- one run -----------------------------------------------------------------------------------------------

def preset(name: str, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer settings and data options of configs/trainer/<name>.yaml, on one device (``cpu``: the same preset
    on the CPU, for the tests)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "trainer" / f"{name}.yaml").read_text())
    trainer = dict(cfg.get("trainer") or {})
    data = dict(((cfg.get("data") or {}).get("init_args")) or {})
    trainer["devices"] = 1
    if device == "cpu":
        trainer["accelerator"] = "cpu"
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        module, _, cls = strategy["class_path"].rpartition(".")
        kwargs = {**(strategy.get("init_args") or {}), **(strategy.get("dict_kwargs") or {})}
        policy = kwargs.get("auto_wrap_policy")
        if isinstance(policy, str) and "." in policy:
            owner, _, attr = policy.rpartition(".")
            kwargs["auto_wrap_policy"] = getattr(importlib.import_module(owner), attr)
        trainer["strategy"] = getattr(importlib.import_module(module), cls)(**kwargs)
    return trainer, data


def task_setup(task: str, files: dict[str, Path], models: dict[str, Path], tiny: bool, in_memory: bool,
               compile_option: Any, data_options: dict[str, Any], cache: str) -> tuple[Any, Any, str, int]:
    """The module and data module of one task, the FLOP-counting kind and the test batches to run."""
    from datamodules.question_answering import QuestionAnsweringDataModule
    from datamodules.seq2seq import Seq2SeqDataModule
    from datamodules.text_classification import TextClassificationDataModule
    from datamodules.token_classification import TokenClassificationDataModule
    from lit_modules.question_answering import QuestionAnsweringModule
    from lit_modules.seq2seq import Seq2SeqModule
    from lit_modules.text_classification import TextClassificationModule
    from lit_modules.token_classification import TokenClassificationModule

    def data(cls: type, **kwargs: Any) -> Any:
        if in_memory:
            cls = type(f"InMemory{cls.__name__}", (InMemoryFeatures, cls), {})
        return cls(**kwargs, **data_options, cache_dir=cache)

    common = {"learning_rate": 1e-4, "warmup_ratio": 0.1, "weight_decay": 0.01, "compile": compile_option}
    bert, llama = str(models["bert"]), str(models["llama"])
    batch = 8 if tiny else 32
    length = 64 if tiny else 128
    if task in ("classification", "mfu_bert"):
        if task == "mfu_bert":
            files_ = {"train_file": str(files["mfu_train"])}
            batch, test = (8 if tiny else 256), 0
        else:
            files_ = {"train_file": str(files["sst2_train"]), "test_file": str(files["sst2_dev"])}
            test = 4
        return (TextClassificationModule(model_name_or_path=bert, **common),
                data(TextClassificationDataModule, **files_, max_seq_length=length, batch_size=batch), "encoder", test)
    if task == "ner":
        return (TokenClassificationModule(model_name_or_path=bert, **common),
                data(TokenClassificationDataModule, train_file=str(files["conll_train"]),
                     test_file=str(files["conll_dev"]), max_seq_length=length, batch_size=batch), "encoder", 4)
    if task == "qa":
        return (QuestionAnsweringModule(model_name_or_path=bert, **common),
                data(QuestionAnsweringDataModule, train_file=str(files["squad_train"]),
                     test_file=str(files["squad_dev"]), max_seq_length=64 if tiny else 384,
                     doc_stride=16 if tiny else 128, batch_size=batch), "encoder", 4)
    stemmer = importlib.util.find_spec("nltk") is not None
    if task == "seq2seq":
        return (Seq2SeqModule(model_name_or_path=bert, architecture="encoder_decoder", max_new_tokens=4 if tiny else 16,
                              rouge_use_stemmer=stemmer, **common),
                data(Seq2SeqDataModule, train_file=str(files["aeslc_train"]), test_file=str(files["aeslc_dev"]),
                     source_column="email_body", target_column="subject", max_source_length=length,
                     max_target_length=16 if tiny else 32, batch_size=batch), "encoder_decoder", 2)
    if task == "causal_lm":
        return (Seq2SeqModule(model_name_or_path=llama, architecture="causal_lm", max_new_tokens=4 if tiny else 16,
                              rouge_use_stemmer=stemmer, **common),
                data(Seq2SeqDataModule, train_file=str(files["aeslc_train"]), test_file=str(files["aeslc_dev"]),
                     source_column="email_body", target_column="subject", prompt_template=PROMPT,
                     max_source_length=length if tiny else 256, max_target_length=16 if tiny else 32,
                     batch_size=batch if tiny else 16), "decoder", 2)
    raise ValueError(task)


def run_one(task: str, config: str, compiled: bool, a: argparse.Namespace, files: dict[str, Path],
            models: dict[str, Path], peak: float | None) -> dict[str, Any]:
    """Fit (and test) one task under one preset, compile on or off; every number, or the error."""
    row: dict[str, Any] = {"task": task, "config": config, "compile": compiled, "status": "ok"}
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"{task}-{config}-", dir=a.work_dir))
    try:
        with time_limit(a.run_timeout_s):
            _fit_and_test(row, task, config, compiled, a, files, models, peak, root)
    except Exception as e:  # noqa: BLE001 - one run failing must not stop the others; the error is the result
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        row["traceback"] = traceback.format_exc()[-3000:]
    finally:
        row["seconds"] = time.perf_counter() - start
        shutil.rmtree(root, ignore_errors=True)
        gc.collect()  # the run's model, optimizer and trainer are unreachable now
        if compiled:
            torch._dynamo.reset()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return row


def _fit_and_test(row: dict[str, Any], task: str, config: str, compiled: bool, a: argparse.Namespace,
                  files: dict[str, Path], models: dict[str, Path], peak: float | None, root: Path) -> None:
    from lightning.pytorch import Trainer, seed_everything

    from lit_modules import distributed
    from lit_modules.schema import connect

    cuda = a.device == "cuda"
    # the wrap policy collects block class names once per process: another model's names would be kept
    distributed._BLOCK_NAMES.clear()
    trainer_settings, data_options = preset(config, a.device)
    compile_option: Any = False
    if compiled:
        compile_option = {"backend": a.compile_backend} if a.compile_backend != "inductor" else True
    seed_everything(0, verbose=False)
    model, dm, kind, test_batches = task_setup(task, files, models, a.tiny, a.in_memory, compile_option,
                                               data_options, str(root / "cache"))
    connect(model, dm)
    meter = throughput_meter(kind, a.warmup, cuda)
    trainer = Trainer(max_epochs=1, limit_train_batches=a.warmup + a.steps, limit_test_batches=test_batches or 1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
                      default_root_dir=root, callbacks=[meter], **trainer_settings)
    row["precision"] = str(trainer.precision)
    row["strategy"] = type(trainer.strategy).__name__
    with peak_memory(cuda) as memory:
        trainer.fit(model, dm)
    row["fit_peak_memory_gb"] = memory["gb"]
    row["train"] = meter.summary(peak)
    row["train"]["optimizer_steps"] = trainer.global_step
    row["parameters"] = sum(p.numel() for p in model.parameters())
    if test_batches:
        with peak_memory(cuda) as memory:
            t = time.perf_counter()
            metrics = trainer.test(model, dm, verbose=False)[0]
            row["test_s"] = time.perf_counter() - t
        row["test_peak_memory_gb"] = memory["gb"]
        row["test"] = {k: float(v) for k, v in metrics.items()}


def plan(tasks: list[str], configs: list[str], compile_mode: str,
         compile_tasks: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """The runs in the order they matter: the headline MFU run, every task on gpu.yaml, then DDP and FSDP, then
    compiled runs (the decoder first: compile pays most there; seq2seq last: generation recompiles at every length)."""
    order: list[tuple[str, str, bool]] = []
    flags = {"off": [False], "on": [True], "both": [False, True]}[compile_mode]
    if "mfu_bert" in tasks:
        order += [("mfu_bert", "gpu", c) for c in flags if "gpu" in configs]
    rest = [t for t in tasks if t != "mfu_bert"]
    if False in flags:
        order += [(t, c, False) for c in configs for t in rest]
    if True in flags:
        ranked = sorted((t for t in rest if compile_tasks is None or t in compile_tasks),
                        key=lambda t: (t != "causal_lm", t == "seq2seq"))
        order += [(t, c, True) for c in configs for t in ranked]
    return order


class RunTimeout(Exception):
    """A run went past ``--run_timeout_s``."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`RunTimeout` in the main thread after ``seconds`` (SIGALRM; no limit where it is missing)."""
    import signal

    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RunTimeout(f"stopped after {seconds:.0f} s (--run_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def table(rows: list[dict[str, Any]]) -> str:
    """The runs as a markdown table."""
    head = ["task", "config", "compile", "status", "samples/s", "real tokens/s", "padding", "model TFLOP/s", "MFU",
            "fit peak GB", "test peak GB", "test metrics", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x: Any, digits: int = 1) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    for r in rows:
        t = r.get("train", {})
        metrics = ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in (r.get("test") or {}).items()
                            if not k.endswith("loss"))[:80]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error') or r.get('reason', '')}"
        lines.append("| " + " | ".join([
            r["task"], r["config"], "on" if r["compile"] else "off", status.replace("|", "/")[:120],
            f(t.get("samples_per_s")), f(t.get("real_tokens_per_s"), 0),
            f(100 * t["padding_share"], 1) + "%" if "padding_share" in t else "-", f(t.get("model_tflops"), 2),
            f(100 * t["mfu"], 1) + "%" if t.get("mfu") is not None else "-", f(r.get("fit_peak_memory_gb"), 2),
            f(r.get("test_peak_memory_gb"), 2), metrics or "-", f(r.get("seconds"), 0)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every run that was not skipped finished, 1 otherwise, 2 when it could not start. The
    process's torch threads and environment are given back as they were (the tests call this in process, and
    Lightning's DDP strategy sets ``LOCAL_RANK``, ``MASTER_ADDR``, ... in the environment of the process it runs in)."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random models and tiny data (the tests)")
    p.add_argument("--data", default=None, help="the folder --prepare_data made (default: tiny data)")
    p.add_argument("--prepare_data", default=None, metavar="DIR", help="copy the data slices into DIR and stop")
    p.add_argument("--shared_data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--compile", dest="compile_mode", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend (default inductor; eager with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 30; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; 1 with --tiny)")
    p.add_argument("--budget_s", type=float, default=420.0, help="stop starting runs after this many seconds")
    p.add_argument("--run_timeout_s", type=float, default=None,
                   help="stop one run after this many seconds (default 100; 0: no limit)")
    p.add_argument("--compile_tasks", default=None, help="tasks also run compiled (default: every task)")
    p.add_argument("--llama", choices=sorted(LLAMA_SHAPES), default="1b")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak (overrides the table)")
    p.add_argument("--no_datasets", action="store_true", help="keep features in memory even if datasets is installed")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's; 1 with --device cpu, as busy shared cores need)")
    p.add_argument("--work_dir", default=None)
    a = p.parse_args(argv)

    if a.prepare_data:
        files = prepare_data(Path(a.shared_data), Path(a.prepare_data))
        size = sum(f.stat().st_size for f in files.values())
        print(f"wrote {len(files)} files, {size / 1e6:.1f} MB, into {a.prepare_data}")
        return 0
    t0 = time.perf_counter()
    a.steps = a.steps or (2 if a.tiny else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 5)
    a.compile_backend = a.compile_backend or ("eager" if a.tiny else "inductor")
    a.run_timeout_s = 100.0 if a.run_timeout_s is None else a.run_timeout_s
    if a.threads or a.device == "cpu":
        torch.set_num_threads(a.threads or 1)
    versions = package_versions()
    a.in_memory = a.no_datasets or versions["datasets"] is None
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: no GPU visible to torch", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    peak, peak_source = (a.peak_tflops, "--peak_tflops") if a.peak_tflops else \
        (peak_bf16_tflops(name) if cuda else (None, "CPU: no MFU"))
    own_work = a.work_dir is None
    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="gpu-check-")
    work = Path(a.work_dir)
    report: dict[str, Any] = {
        "device": name, "device_kind": a.device, "tiny": a.tiny, "torch": torch.__version__,
        "cuda": torch.version.cuda, "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "peak_bf16_tflops": peak, "peak_source": peak_source, "packages": versions,
        "features": "in memory (datasets missing or --no_datasets)" if a.in_memory else "datasets cache",
        "steps": a.steps, "warmup": a.warmup, "compile_backend": a.compile_backend, "runs": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - t0
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(out)

    print(f"gpu_check on {name} ({a.device}), torch {torch.__version__}, peak {peak_source}; features "
          f"{report['features']}; packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    try:
        files, report["data"] = data_files(Path(a.data) if a.data else None, work)
        t = time.perf_counter()
        models = build_models(work, all_texts(files), a.tiny, a.llama, a.device)
        report["model_build_s"] = time.perf_counter() - t
        save()
        estimate = {False: 4.0 if a.tiny else 25.0, True: 8.0 if a.tiny else 75.0}
        compile_tasks = a.compile_tasks.split(",") if a.compile_tasks else None
        for task, config, compiled in plan(a.tasks.split(","), a.configs.split(","), a.compile_mode, compile_tasks):
            elapsed = time.perf_counter() - t0
            if elapsed + estimate[compiled] > a.budget_s:
                row = {"task": task, "config": config, "compile": compiled, "status": "skipped",
                       "reason": f"time budget ({elapsed:.0f} of {a.budget_s:.0f} s used)"}
            elif config == "fsdp" and not cuda:  # Lightning refuses it: nothing to learn on the CPU
                row = {"task": task, "config": config, "compile": compiled, "status": "skipped",
                       "reason": "Lightning runs FSDP on GPUs only"}
            else:
                row = run_one(task, config, compiled, a, files, models, peak)
            report["runs"].append(row)
            save()
            train = row.get("train", {})
            print(f"  {task:14s} {config:4s} compile {'on ' if compiled else 'off'} {row['status']:7s} "
                  f"{train.get('samples_per_s', float('nan')):9.1f} samples/s "
                  f"{train.get('real_tokens_per_s', float('nan')):11.0f} tokens/s "
                  f"MFU {100 * (train.get('mfu') or float('nan')):5.1f}% "
                  f"{row.get('error') or row.get('reason') or ''}", flush=True)
    finally:
        save()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(report["runs"]))
    print(f"\n{len(report['runs'])} runs in {report['elapsed_s']:.0f} s; JSON: {out}")
    return 1 if any(r["status"] == "error" for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
