"""Shared fixtures: tiny random models with locally built tokenizers, and helpers to run train.py.

Nothing here touches the network: models are random BERTs a few KB in size, tokenizers are built
from a word list, and W&B runs offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SENTIMENT = ROOT / "experiments" / "data" / "sentiment"
SHARED_DATA = Path(os.environ.get("TUNEFORGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Offline everything; a private cache; no W&B credentials from the developer's machine."""
    os.environ["TUNEFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def build_tiny_bert(directory: Path, words: list[str], **config: Any) -> Path:
    """Save a random 2-layer BERT (hidden size 32) and a WordPiece tokenizer over ``words``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in words for c in w})
    vocab = specials + sorted(set(words)) + chars + [f"##{c}" for c in chars]
    vocab = list(dict.fromkeys(vocab))
    # transformers 5's BertTokenizer takes the vocabulary itself (a vocab_file argument is silently ignored)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert tokenizer.tokenize(words[0]) != [tokenizer.unk_token], "tiny tokenizer lost its vocabulary"
    tokenizer.save_pretrained(directory)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, **config,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(directory)
    return directory


def build_tiny_llama(directory: Path, texts: list[str]) -> Path:
    """Save a random 2-layer Llama (hidden size 32) and a byte-level BPE tokenizer trained on ``texts``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def corpus_texts() -> list[str]:
    return [json.loads(line)["text"] for split in ("train", "validation", "test")
            for line in (SENTIMENT / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def corpus_words() -> list[str]:
    words: set[str] = set()
    for split in ("train", "validation", "test"):
        for line in (SENTIMENT / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            words.update(re.findall(r"[a-z]+|[^a-z\s]", json.loads(line)["text"].lower()))
    return sorted(words)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-architecture causal LM with a BPE tokenizer trained on the quickstart sentences."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), corpus_texts())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT folder whose vocabulary covers the quickstart sentences."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), corpus_words())


def write_experiment(path: Path, tiny_bert: Path, *, data: dict[str, Any] | None = None,
                     model: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None,
                     logger: str = "csv", extra: dict[str, Any] | None = None) -> Path:
    """An experiment YAML for text classification on the quickstart data with the tiny model."""
    import yaml

    data_args = {
        "train_file": str(SENTIMENT / "train.jsonl"),
        "validation_file": str(SENTIMENT / "validation.jsonl"),
        "test_file": str(SENTIMENT / "test.jsonl"),
        "max_seq_length": 32,
        "batch_size": 32,
        **(data or {}),
    }
    trainer_args: dict[str, Any] = {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                                    **(trainer or {})}
    if logger == "csv":
        trainer_args["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
    # logger="wandb" keeps the default (W&B); "none" leaves the logger to a preset given on the command line
    cfg = {
        "model": {
            "class_path": "lit_modules.text_classification.TextClassificationModule",
            "init_args": {"model_name_or_path": str(tiny_bert), "learning_rate": 1e-3, **(model or {})},
        },
        "data": {"class_path": "datamodules.text_classification.TextClassificationDataModule", "init_args": data_args},
        "trainer": trainer_args,
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_train(args: list[str]) -> tuple[int, Path | None]:
    """Run train.py in this process; returns (exit code, run directory)."""
    import train

    argv = sys.argv
    sys.argv = [str(ROOT / "train.py")]  # LightningCLI warns when sys.argv holds arguments besides args
    try:
        code = train.main(args)
    except SystemExit as e:  # parser errors exit like argparse does
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    run_dir = os.environ.get("TUNEFORGE_RUN_DIR")
    return code, Path(run_dir) if run_dir else None


def run_train_subprocess(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
                         cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run train.py in a fresh interpreter with a clean environment (plus ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "TUNEFORGE_RUN_DIR",
                                                                      "RANK", "WORLD_SIZE", "MASTER_"))}
    base.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=timeout)


def run_train_in_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run train.py with a pseudo-terminal as stdin / stdout / stderr (what a user at a terminal has); returns the
    exit code and everything it showed. Fails the test if train.py is still running after ``timeout`` seconds."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                output += os.read(master, 65536)
            except OSError:  # the terminal closed: train.py exited
                break
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"train.py still running after {timeout:.0f} s with a terminal attached:\n"
                             f"{output[-2000:].decode(errors='replace')}") from None
    finally:
        os.close(master)
    return proc.returncode, output.decode(errors="replace")


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def fit_with_lora_and_test_again(exp: Path, tmp_path: Path, head: str | None, metric: str,
                                 extra: list[str] = ()) -> dict[str, Any]:
    """Fit ``exp`` with configs/peft/lora.yaml, check the checkpoint holds only adapters (and ``head``),
    then test from that checkpoint and check it scores what the fit's own test did."""
    import torch

    lora = str(ROOT / "configs" / "peft" / "lora.yaml")
    code, run_dir = run_train(["fit", "--config", str(exp), "--config", lora, *extra,
                               "--output_dir", str(tmp_path / "runs"), "--run_name", "lora"])
    assert code == 0
    res = results(run_dir)
    state = torch.load(res["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    adapters = [k for k in state if "lora_" in k]
    assert adapters, sorted(state)[:5]
    others = [k for k in state if "lora_" not in k]
    assert all(head and head in k for k in others), others[:5]  # nothing of the frozen base is saved
    code, test_dir = run_train(["test", "--config", str(exp), *extra, "--ckpt_path", res["best_checkpoint"],
                                "--output_dir", str(tmp_path / "test")])
    assert code == 0
    assert results(test_dir)["test"][metric] == pytest.approx(res["test"][metric], abs=1e-6)
    return res
