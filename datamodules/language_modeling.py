"""Language-model (continued) pretraining data: raw text -> fixed-length token blocks -> masked or causal targets.

Documents come from a text file (one per non-empty line), JSON / JSONL / CSV / TSV / parquet records with a text
field, a folder of ``.txt`` files (one per file), the paragraph contexts of a SQuAD file (``squad_contexts``) or a
hub dataset. They are tokenised, joined with the tokenizer's separator (SEP for BERT-like tokenizers, else EOS) and
cut into blocks of ``max_seq_length`` tokens, each wrapped as the tokenizer wraps one sequence (``[CLS] ... [SEP]``
for BERT, ``<s> ...`` for Llama, nothing for GPT-2), so no compute goes to padding. Documents are joined in
groups of 1,000 (the tokenisation batches of the shared data module); the partial block at the end of a group is
dropped in training data (as Hugging Face's ``run_mlm.py`` / ``run_clm.py`` do) and kept, padded, in evaluation
data, so that every held-out token is scored. ``max_*_samples`` count documents.

Targets are made per batch, just before it moves to the device (``on_before_batch_transfer``): causal LM labels are
the inputs (the model shifts them); masked LM picks ``mlm_probability`` of the tokens (or whole words), never special
tokens, and replaces 80% of them with the mask token, 10% with a random token and keeps 10% (BERT's recipe). Each
block's choices come from its own random generator, seeded by (run seed, epoch, block) in training, so a resumed run
masks exactly as an uninterrupted one, and by (``eval_mask_seed``, block) in evaluation, so the evaluation loss does
not depend on batching, the number of processes or the epoch. transformers' ``DataCollatorForLanguageModeling`` draws
from one stream per batch (masks would depend on how blocks are batched and shared), so it is not used.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import Collator, TransformerDataModule
from datamodules.readers import check_data_file, read_text, split_compression
from lit_modules.atomic_files import write_text_atomic
from lit_modules.errors import ConfigError, DataError
from lit_modules.schema import IGNORE_INDEX, ModelFacts

MASK_REPLACE = 0.8  # of the chosen tokens: replaced by the mask token
RANDOM_REPLACE = 0.1  # ... by a random token; the rest keep their token


class TextFolder(os.PathLike):
    """A folder of ``.txt`` files (also compressed: ``.txt.gz`` ...) given as a split's data file; each file is one
    document, in sorted order of their paths below the folder.

    The shared data module keys its feature cache on the bytes of a split's file, which it opens; a folder has no
    bytes of its own, so this object stands in for it: opened (``os.fspath``) it is a manifest of every file's path
    and SHA-256, written into the cache directory; shown (``str``) it is the folder.
    """

    def __init__(self, folder: str | os.PathLike, manifest_dir: Path) -> None:
        self.folder = Path(folder)
        self.manifest = manifest_dir / f"{hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:20]}.txt"

    def files(self) -> list[Path]:
        """The folder's text files, sorted."""
        return text_files(self.folder)

    def __fspath__(self) -> str:
        lines = [f"{p.relative_to(self.folder)}\t{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in self.files()]
        write_text_atomic(self.manifest, "\n".join(lines) + "\n")
        return str(self.manifest)

    def __str__(self) -> str:
        return str(self.folder)

    __repr__ = __str__


def text_files(folder: Path) -> list[Path]:
    """The ``.txt`` files (also compressed) anywhere below ``folder``, hidden ones left out, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and split_compression(p)[0].suffix.lower() == ".txt"
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class LanguageModelingDataModule(TransformerDataModule):
    """Raw text for masked (encoders) or causal (decoders) language modelling; the model decides which
    (``ModelFacts.decoder_only``: causal).

    Args:
        text_column: the field holding the text in JSON / JSONL / CSV / parquet records and hub datasets.
        squad_contexts: read a SQuAD file's (or a flat QA file's / hub dataset's) ``context`` fields as the
            documents, each distinct context once, in file order.
        mlm_probability: masked LM: the share of tokens (of words, with ``whole_word_mask``) chosen for prediction.
        whole_word_mask: masked LM: choose whole words (all their sub-tokens together); needs a fast tokenizer.
        eval_mask_seed: masked LM: the seed of the fixed evaluation masks.
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule`; ``train_file`` etc. may
            also be a folder of ``.txt`` files.
    """

    task_name = "language_modeling"
    # word_start (whole-word masking only): 1 where a word begins; used for the masks, never given to the model
    model_input_pad: ClassVar[dict[str, int | None]] = {"input_ids": None, "word_start": 1}

    def __init__(
        self,
        text_column: str = "text",
        squad_contexts: bool = False,
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        eval_mask_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < mlm_probability < 1.0:
            raise DataError(f"data.mlm_probability: expected a number in (0, 1), got {mlm_probability}")
        if eval_mask_seed < 0:
            raise DataError(f"data.eval_mask_seed: expected an integer >= 0, got {eval_mask_seed}")
        self.text_column = text_column
        self.squad_contexts = squad_contexts
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.eval_mask_seed = eval_mask_seed
        for split, path in self.files.items():
            if path is not None and Path(path).is_dir():
                self.files[split] = TextFolder(path, self.cache_dir / self.task_name / "folders")  # type: ignore[assignment]
        self._keep_last_block = True  # set per split in canonical_columns (encode sees no split)

    # ---- files ---------------------------------------------------------------------------------

    def check_file(self, path: str, key: str) -> None:
        if Path(path).is_dir():
            if not text_files(Path(path)):
                raise DataError(f"{key}: folder '{path}' holds no .txt files")
            return
        check_data_file(path, key)

    def read_file(self, path: Any) -> tuple[list[dict[str, Any]], list[int]]:
        if not isinstance(path, TextFolder):
            return super().read_file(path)
        files = path.files()  # one record per file; its "line" is the file's number in this order
        return [{self.text_column: read_text(p, self.encoding)} for p in files], list(range(1, len(files) + 1))

    # ---- the hand-off from the model -----------------------------------------------------------

    def connect(self, tokenizer: Any, facts: ModelFacts | None = None) -> None:
        super().connect(tokenizer, facts)
        if self.facts.decoder_only:
            if self.whole_word_mask:
                raise ConfigError("data.whole_word_mask: only for masked language modelling; "
                                  f"{self.facts.model_name} is trained as a causal LM")
            return
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ConfigError(f"masked language modelling needs a tokenizer with a mask token and "
                              f"{self.facts.model_name}'s has none (set model.objective: clm for a decoder)")
        if self.whole_word_mask and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"data.whole_word_mask: needs a fast tokenizer (word boundaries); "
                              f"{type(tokenizer).__name__} is not one")

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "text_column": self.text_column, "squad_contexts": self.squad_contexts,
                "whole_word_mask": self.whole_word_mask}

    # ---- records -------------------------------------------------------------------------------

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str,
                          source: str) -> dict[str, list]:
        texts: list[str] = []
        kept: list[int] = []
        if self.squad_contexts:
            seen: set[str] = set()
            for context, line in _contexts(records, lines, source):
                if context not in seen:
                    seen.add(context)
                    texts.append(context)
                    kept.append(line)
        else:
            if self.text_column not in records[0]:
                hint = "; a SQuAD file? set data.squad_contexts: true" if "paragraphs" in records[0] else \
                    " (set data.text_column)"
                raise DataError(f"{source}: no text column '{self.text_column}'; columns found: "
                                f"{', '.join(map(str, records[0]))}{hint}")
            for rec, line in zip(records, lines):
                text = rec.get(self.text_column)
                if not isinstance(text, str):
                    raise DataError(f"{source}:{line}: '{self.text_column}' must be a string, got {text!r}")
                if text.strip():  # empty texts hold nothing to learn
                    texts.append(text)
                    kept.append(line)
        if not texts:
            what = "context" if self.squad_contexts else repr(self.text_column)
            raise DataError(f"{source}: no text to read (every {what} is empty)")
        self._keep_last_block = split != "train"
        return {"text": texts, "line": kept}

    # ---- features ------------------------------------------------------------------------------

    def _wrapping(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after one sequence (BERT: [CLS] / [SEP])."""
        probe = self._get_tokenizer()("a", return_special_tokens_mask=True)
        ids, special = probe["input_ids"], probe["special_tokens_mask"]
        start = next((i for i, s in enumerate(special) if not s), len(ids))
        end = next((i for i in range(len(ids), 0, -1) if not special[i - 1]), start)
        return list(ids[:start]), list(ids[end:])

    def separator_id(self) -> int:
        """The token put between two documents: SEP (BERT-like tokenizers), else EOS."""
        tok = self._get_tokenizer()
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if sep is None:
            raise ConfigError("the tokenizer has neither a separator (SEP) nor an end-of-sequence (EOS) token to put "
                              "between documents")
        return int(sep)

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self._get_tokenizer()
        enc = tok(batch["text"], add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False, verbose=False)
        sep = self.separator_id()
        prefix, suffix = self._wrapping()
        size = self.max_seq_length - len(prefix) - len(suffix)
        stream: list[int] = []
        word_start: list[int] = []
        doc_starts: list[int] = []  # where each document begins in the stream
        for i, ids in enumerate(enc["input_ids"]):
            doc_starts.append(len(stream))
            stream.extend(ids)
            stream.append(sep)
            if self.whole_word_mask:
                words = enc.word_ids(i)
                word_start.extend(int(j == 0 or w is None or w != words[j - 1]) for j, w in enumerate(words))
                word_start.append(1)
        n_blocks = len(stream) // size + int(self._keep_last_block and len(stream) % size > 0)
        out: dict[str, list] = {"text": [None] * n_blocks, "line": [], "input_ids": []}
        if self.whole_word_mask:
            out["word_start"] = []
        for b in range(n_blocks):
            lo, hi = b * size, min((b + 1) * size, len(stream))
            out["input_ids"].append(prefix + stream[lo:hi] + suffix)
            out["line"].append(batch["line"][bisect.bisect_right(doc_starts, lo) - 1])  # where the block starts
            if self.whole_word_mask:
                out["word_start"].append([1] * len(prefix) + word_start[lo:hi] + [1] * len(suffix))
        return out

    def resolve_schema(self, stage: str | None) -> None:
        for split, ds in self.datasets.items():
            if len(ds) == 0:
                raise DataError(f"{self._source_name(split)}: fewer tokens than one block of data.max_seq_length="
                                f"{self.max_seq_length} (training data drop a partial last block); lower it or add text")
            rank_zero_info(f"{self._source_name(split)}: {len(ds)} blocks of up to {self.max_seq_length} tokens")

    # ---- batches -------------------------------------------------------------------------------

    def make_collator(self, split: str, pad: dict[str, int]) -> Collator:
        # always the full block width: a row's outputs then do not depend on which rows share its batch
        return Collator(pad, self._get_tokenizer().padding_side, self.max_seq_length)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Targets for every batch the trainer runs: random masks in training, fixed ones in evaluation."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        trainer = self.trainer
        training = trainer is not None and trainer.training
        return self.add_targets(batch, training=training, epoch=trainer.current_epoch if training else 0)

    def add_targets(self, batch: dict[str, torch.Tensor], training: bool, epoch: int = 0) -> dict[str, torch.Tensor]:
        """The batch with ``labels`` (and masked ``input_ids`` for masked LM). Block ``idx``'s masks depend only on
        (run seed, ``epoch``, ``idx``) when ``training``, else on (``eval_mask_seed``, ``idx``)."""
        batch = dict(batch)
        word_start = batch.pop("word_start", None)
        attention = batch["attention_mask"].bool()
        if self.facts.decoder_only:
            batch["labels"] = batch["input_ids"].masked_fill(~attention, IGNORE_INDEX)
            return batch
        tok = self._get_tokenizer()
        ids = batch["input_ids"].numpy()
        special = np.isin(ids, np.asarray(tok.all_special_ids)) | ~attention.numpy()
        inputs, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        for row, idx in enumerate(batch["idx"].tolist()):
            real = attention[row].numpy()  # the block's tokens, wherever the padding is
            seed = [0, run_seed, epoch, idx] if training else [1, self.eval_mask_seed, idx]
            words = None if word_start is None else word_start[row].numpy()[real]
            inputs[row, real], labels[row, real] = mask_tokens(
                ids[row, real], special[row, real], np.random.default_rng(seed), self.mlm_probability,
                tok.mask_token_id, len(tok), words)
        batch["input_ids"], batch["labels"] = torch.from_numpy(inputs), torch.from_numpy(labels)
        return batch


def mask_tokens(ids: np.ndarray, special: np.ndarray, rng: np.random.Generator, probability: float, mask_id: int,
                vocab_size: int, word_start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one block: (inputs, labels). Each token (each word, given ``word_start``: 1 where a word
    begins) is chosen with ``probability``, special tokens never; chosen tokens become the mask token (80%), a random
    token (10%) or stay (10%), and only they get a label. The draws depend only on ``rng`` and the block's length."""
    n = len(ids)
    chosen_draw, kind, random_ids = rng.random(n), rng.random(n), rng.integers(0, vocab_size, n)
    if word_start is None:
        chosen = chosen_draw < probability
    else:
        chosen = chosen_draw[np.cumsum(word_start) - 1] < probability  # one draw per word, shared by its tokens
    chosen &= ~special
    labels = np.where(chosen, ids, IGNORE_INDEX)
    inputs = ids.copy()
    inputs[chosen & (kind < MASK_REPLACE)] = mask_id
    swapped = chosen & (kind >= MASK_REPLACE) & (kind < MASK_REPLACE + RANDOM_REPLACE)
    inputs[swapped] = random_ids[swapped]
    return inputs, labels


def _contexts(records: list[dict[str, Any]], lines: list[int], source: str) -> list[tuple[str, int]]:
    """Every ``context`` of SQuAD articles (``paragraphs[].context``) or of flat QA records, with its record's line."""
    out: list[tuple[str, int]] = []
    for i, (rec, line) in enumerate(zip(records, lines)):
        if isinstance(rec.get("paragraphs"), list):
            for j, paragraph in enumerate(rec["paragraphs"]):
                context = paragraph.get("context") if isinstance(paragraph, dict) else None
                if not isinstance(context, str):
                    raise DataError(f"{source}:data[{i}].paragraphs[{j}]: expected a paragraph with a 'context' string")
                if context.strip():
                    out.append((context, line))
        elif "context" in rec:
            if not isinstance(rec["context"], str):
                raise DataError(f"{source}:{line}: 'context' must be a string, got {rec['context']!r}")
            if rec["context"].strip():
                out.append((rec["context"], line))
        else:
            raise DataError(f"{source}:{line}: data.squad_contexts reads SQuAD articles (with 'paragraphs') or records "
                            f"with a 'context' field; found fields {', '.join(map(str, rec))}")
    return out
