"""The shared data pipeline every task uses.

file or hub dataset -> reader -> canonical records -> tokenised, cached features -> padded batch

A task subclass says only what differs: how raw records become canonical columns
(:meth:`TransformerDataModule.canonical_columns`), how a batch of canonical columns is tokenised
(:meth:`TransformerDataModule.encode`) and what the model needs to know about the data
(:meth:`TransformerDataModule.resolve_schema`). Everything else lives here: reading, sample limits,
tokenising once (rank 0, in ``prepare_data``) into an on-disk cache keyed by everything that
affects the result, dynamic padding, length-grouped training batches and length-sorted
evaluation batches. The tokenizer and the model's facts arrive once, through :meth:`connect`
(``lit_modules.schema.connect``); what the model needs goes back through ``self.schema``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import logging
import os
import signal
import site
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from datamodules.readers import check_data_file, check_encoding, read_records
from lit_modules.errors import DataError
from lit_modules.schema import DataSchema, ModelFacts, SplitData

SPLITS = ("train", "validation", "test", "predict")
# Which splits each trainer entry point needs; ``fit`` also validates when a validation split exists.
STAGE_SPLITS = {
    TrainerFn.FITTING: ("train", "validation"),
    TrainerFn.VALIDATING: ("validation",),
    TrainerFn.TESTING: ("test",),
    TrainerFn.PREDICTING: ("predict",),
}
CACHE_FORMAT_VERSION = 2
# data.num_proc null: splits this large are tokenised by one process per usable core (SQuAD's 87,599 training questions
# in 23.5 s instead of 34.1 s on 2 cores); smaller ones in-process: they tokenise in seconds, and the cut-off itself was
# chosen, not measured
PARALLEL_MIN_RECORDS = 20_000
# the logger Lightning's rank_zero_info writes to, shown on every process: for lines each process that does the work prints
_PROCESS_LOG = logging.getLogger("lightning.pytorch.utilities.rank_zero")
# packages whose versions change what a tokenizer produces (part of the feature cache key)
TOKENISATION_PACKAGES = ("transformers", "tokenizers", "sentencepiece", "datasets", "pyarrow")


class PreparationInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived while the data were read or tokenised (before training); no partial cache is kept.

    train.py ends with its message as one line and exit code 128 + the signal number (130 / 143).
    """

    def __init__(self, signum: int, stage: str) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} while {stage}: stopped, and no partly written tokenised "
                         "cache was kept (the same command starts over)")


class _Signalled(KeyboardInterrupt):
    """Raised by the signal handler inside :func:`_signals_interrupt`: a KeyboardInterrupt, which ``datasets``
    cleans up after (it removes its temporary cache file) and which no ``except Exception`` swallows."""


@contextlib.contextmanager
def _signals_interrupt(stage: str) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM (whose default would end the process at once, leaving the
    temporary file of a half-written cache behind) interrupt it and raise :class:`PreparationInterrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        raise _Signalled(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Signalled as e:
        raise PreparationInterrupted(e.args[0], stage) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _library_dirs() -> tuple[str, ...]:
    dirs = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], *site.getsitepackages()}
    dirs.add(site.getusersitepackages())
    return tuple(str(Path(d).resolve()) for d in dirs if d)


def _own_module(module: ModuleType | None, libraries: tuple[str, ...]) -> str | None:
    """The source file of ``module`` when it is project code (not the standard library or an installed package)."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    resolved = str(Path(path).resolve())
    return None if resolved.startswith(libraries) else resolved


def feature_code_fingerprint(cls: type) -> str:
    """A hash of the source of every project module that shapes the features ``cls`` builds.

    Starts from the modules of ``cls`` and its base classes, and follows, to a fixed point, every project
    module whose functions, classes or submodules those modules use (readers, helpers, the schema), so that
    editing any of them invalidates cached features. Installed packages count through their versions
    instead (:data:`TOKENISATION_PACKAGES`).
    """
    libraries = _library_dirs()
    files: dict[str, ModuleType] = {}
    todo = [sys.modules.get(k.__module__) for k in cls.__mro__]
    while todo:
        module = todo.pop()
        path = _own_module(module, libraries)
        if path is None or path in files:
            continue
        files[path] = module  # type: ignore[assignment]
        for value in vars(module).values():
            used = value if isinstance(value, ModuleType) else sys.modules.get(getattr(value, "__module__", "") or "")
            if used is not None and used is not module:
                todo.append(used)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.rsplit(os.sep, 2)[-2:].__repr__().encode())
        h.update(Path(path).read_bytes())
    for package in TOKENISATION_PACKAGES:
        try:
            h.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return h.hexdigest()


def check_set_name(name: Any, key: str) -> str:
    """A named evaluation set's name: letters, digits, ``_``, ``-`` and ``.`` (it becomes part of metric names like
    ``val/<name>/f1`` and of file names)."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DataError(f"{key}: set names may hold letters, digits, '_', '-' and '.', got {name!r}")
    return name


def default_cache_dir() -> Path:
    """``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``: where tokenised features are kept between launches."""
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


class TransformerDataModule(LightningDataModule):
    """Base data module: local files (csv, tsv, json, jsonl, parquet) or a Hugging Face hub dataset.

    Args:
        train_file / validation_file / test_file / predict_file: local data files, one per split. The evaluation
            splits also take several named sets, ``{name: file}`` (in-domain and out-of-domain side by side):
            each is evaluated, logged (``val/<name>/f1``) and predicted (``predictions.<name>.jsonl``) on its own.
        dataset_name / dataset_config_name: a hub dataset (``datasets.load_dataset``), used for the
            splits that have no file.
        hub_splits: hub split name per split when they are not ``train`` / ``validation`` / ``test``; an
            evaluation split may map names to hub splits (``{validation: {matched: validation_matched, ...}}``).
        max_seq_length: longer inputs are truncated (tasks that window long inputs say so).
        max_train_samples / max_eval_samples / max_predict_samples: keep only the first N records.
        batch_size / eval_batch_size: per-process batch sizes (eval defaults to ``2 * batch_size``).
        group_by_length: build training batches from examples of similar length (less padding).
        pad_to_multiple_of: pad batch length to a multiple of this (8 helps tensor cores on GPU).
        num_workers: DataLoader worker processes.
        num_proc: processes that tokenise a split (``datasets.map(num_proc=...)``); ``null`` (default): one per usable
            core for splits of at least :data:`PARALLEL_MIN_RECORDS` records (20,000), one otherwise (smaller splits
            tokenise in seconds). The cached features are the same either way.
        cache_dir: where tokenised features are cached (default ``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``).
        overwrite_cache: tokenise again even when a cached copy exists.
        encoding: the text encoding of the data files (``utf-8``; ``latin-1``, ``cp1252``, ... for legacy files).
            Files may also be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``): read as decompressed text.
    """

    task_name = "base"
    # columns the model consumes, and the value each list-valued one is padded with (None: the tokenizer's pad id)
    model_input_pad: dict[str, int | None] = {"input_ids": None, "token_type_ids": 0}
    # per-example token positions among the extra batch columns (QA span labels): shifted when padding on the left
    position_columns: tuple[str, ...] = ()

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | dict[str, str] | None = None,
        test_file: str | dict[str, str] | None = None,
        predict_file: str | dict[str, str] | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        hub_splits: dict[str, str | dict[str, str]] | None = None,
        max_seq_length: int = 128,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_predict_samples: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        overwrite_cache: bool = False,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoding = check_encoding(encoding)
        # split key -> file: "validation", or "validation/<name>" for each of several named evaluation sets
        self.files: dict[str, Any] = {}
        self.eval_sets: dict[str, list[str]] = {}  # evaluation split -> its set names in order ([]: one, unnamed)
        for split, value in (("train", train_file), ("validation", validation_file), ("test", test_file),
                             ("predict", predict_file)):
            self.files[split] = None if isinstance(value, dict) else value
            if isinstance(value, dict):
                if split == "train":
                    raise DataError("data.train_file: expected one file (named sets are for evaluation splits)")
                self.eval_sets[split] = [check_set_name(name, f"data.{split}_file") for name in value]
                self.files.update({f"{split}/{name}": path for name, path in value.items()})
        for split, path in self.files.items():
            if path is not None:
                kind, _, name = split.partition("/")
                self.check_file(path, f"data.{kind}_file" + (f".{name}" if name else ""))
        if max_seq_length < 8:
            raise DataError(f"data.max_seq_length: expected an integer >= 8, got {max_seq_length}")
        for key in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self.hparams, key)
            if value is not None and value < 1:
                raise DataError(f"data.{key}: expected a positive integer or null, got {value}")
        if batch_size < 1:
            raise DataError(f"data.batch_size: expected a positive integer, got {batch_size}")
        if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
            raise DataError(f"data.num_proc: expected a positive integer or null (one process per core for large "
                            f"splits), got {num_proc!r}")
        self.dataset_name = dataset_name
        self.dataset_config_name = dataset_config_name
        self.hub_splits: dict[str, str] = {"train": "train", "validation": "validation", "test": "test"}
        for split, value in (hub_splits or {}).items():
            if isinstance(value, dict):
                names = [check_set_name(name, f"data.hub_splits.{split}") for name in value]
                if self.eval_sets.get(split) and self.eval_sets[split] != names:
                    raise DataError(f"data.hub_splits.{split}: names {names} differ from data.{split}_file's "
                                    f"{self.eval_sets[split]}")
                self.eval_sets[split] = names
                self.hub_splits.pop(split, None)
                self.hub_splits.update({f"{split}/{name}": hub for name, hub in value.items()})
            else:
                self.hub_splits[split] = value
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.overwrite_cache = overwrite_cache
        self.tokenizer: Any = None  # the model's, handed over by connect()
        self.facts = ModelFacts()  # what the model fixes (label set, layout, length limit), handed over by connect()
        self.schema = DataSchema(task=self.task_name, encode=self.encode)  # what the model gets back, filled in setup
        self.datasets: dict[str, Any] = {}
        self._hub: Any = None
        # tokenise once per job (global rank 0), not once per node; other nodes load the shared cache
        self.prepare_data_per_node = False

    # ---- what a task defines -------------------------------------------------------------------

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str, source: str) -> dict[str, list]:
        """Turn raw records into the task's canonical columns (validate here, naming ``source:line``). ``split`` is the
        split's kind (``train``, ``validation``, ``test``, ``predict``), also for one of several named sets."""
        raise NotImplementedError

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        """Tokenise a batch of canonical columns; must return ``input_ids`` (and may add other features)."""
        raise NotImplementedError

    def cache_key_params(self) -> dict[str, Any]:
        """Every option that changes ``canonical_columns`` or ``encode`` output (part of the cache key)."""
        return {"max_seq_length": self.max_seq_length}

    def schema_splits(self) -> tuple[str, ...]:
        """Splits to load in any stage because the schema still needs something from them (the training data's
        label set when the model has none yet)."""
        return ()

    def resolve_schema(self, stage: str | None) -> None:
        """Fill ``self.schema`` once the stage's splits are loaded (``self.datasets``): the label set, anything
        the model needs to build its head or score, and per-split evaluation data in ``self.schema.splits``
        (each split already has a :class:`~lit_modules.schema.SplitData` holding its feature table)."""

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        """Per-example arrays added to every batch of ``split`` (for example label ids)."""
        return {}

    def make_collator(self, split: str, pad: dict[str, int]) -> Callable[[Any], dict[str, torch.Tensor]]:
        """The function that turns one batch of feature rows into tensors (default: :class:`Collator`, dynamic
        padding). ``pad``: the padding value of every list-valued model input."""
        return Collator(pad, self._get_tokenizer().padding_side, self.pad_to_multiple_of, self.position_columns)

    def check_lengths(self, max_positions: int | None, model_name: str) -> None:
        """Refuse length options the model cannot take (its position embeddings), before anything is read."""
        if max_positions is not None and self.max_seq_length > max_positions:
            raise DataError(f"data.max_seq_length: {self.max_seq_length} is more than {model_name} takes "
                            f"({max_positions} positions); set at most {max_positions}")

    def check_file(self, path: str, key: str) -> None:
        """Fail early (while the config is read) when a data file is missing or of a type this task cannot read."""
        check_data_file(path, key)

    def read_file(self, path: str) -> tuple[list[dict[str, Any]], list[int]]:
        """Read one local data file into records and the line number where each starts."""
        return read_records(path, self.encoding)

    # ---- the hand-off from the model --------------------------------------------------------

    def connect(self, tokenizer: Any, facts: ModelFacts | None = None) -> None:
        """Take the model's tokenizer and facts (``lit_modules.schema.connect`` calls this; tests and tools that
        use a data module alone pass a tokenizer, and facts when the feature layout depends on them)."""
        self.tokenizer = tokenizer
        self.facts = facts or ModelFacts(task=self.task_name)
        self.check_lengths(self.facts.max_positions, self.facts.model_name)

    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} has no tokenizer: connect it to its model first "
                               "(lit_modules.schema.connect(model, data), or data.connect(tokenizer))")
        return self.tokenizer

    # ---- splits and sources --------------------------------------------------------------------

    @staticmethod
    def kind(split: str) -> str:
        """``train``, ``validation``, ``test`` or ``predict`` of a split key (``validation/xquad`` -> ``validation``)."""
        return split.partition("/")[0]

    def split_keys(self, kind: str) -> list[str]:
        """The split keys of ``kind``: ``[kind]``, or ``kind/<name>`` per named set, in the configured order."""
        names = self.eval_sets.get(kind)
        return [f"{kind}/{name}" for name in names] if names else [kind]

    def has_split(self, split: str) -> bool:
        """Whether this run will have data for ``split`` (a kind: any of its named sets counts)."""
        return any(self._has_source(key) for key in self.split_keys(split)) if "/" not in split else \
            self._has_source(split)

    def _has_source(self, split: str) -> bool:
        """Whether a file or hub dataset provides ``split`` (a split key)."""
        if self.files.get(split) is not None:
            return True
        if self.dataset_name is None or self.kind(split) == "predict":
            return False
        return self.hub_splits.get(split) in self._hub_split_names()

    def _hub_split_names(self) -> list[str]:
        import datasets

        return list(datasets.get_dataset_split_names(self.dataset_name, self.dataset_config_name))

    def _stage_splits(self, stage: str | TrainerFn | None) -> list[str]:
        fn = self.trainer.state.fn if self.trainer is not None and self.trainer.state.fn else None
        if fn is None and stage is not None:
            fn = {"fit": TrainerFn.FITTING, "validate": TrainerFn.VALIDATING, "test": TrainerFn.TESTING,
                  "predict": TrainerFn.PREDICTING}[str(stage)]
        wanted = STAGE_SPLITS[fn] if fn is not None else SPLITS
        wanted = (*wanted, *(s for s in self.schema_splits() if s not in wanted))
        splits = [key for kind in wanted for key in self.split_keys(kind) if self._has_source(key)]
        needed = {TrainerFn.FITTING: "train", TrainerFn.VALIDATING: "validation", TrainerFn.TESTING: "test",
                  TrainerFn.PREDICTING: "predict"}.get(fn)
        if needed is not None and needed not in {self.kind(s) for s in splits}:
            hint = f"data.{needed}_file" + (" (or a hub dataset with that split)" if needed != "predict" else "")
            raise DataError(f"{fn.value} needs {needed} data: set {hint}")
        return splits

    def _source_name(self, split: str) -> str:
        if self.files.get(split) is not None:
            return str(self.files[split])
        return f"{self.dataset_name}{'/' + self.dataset_config_name if self.dataset_config_name else ''}[{self.hub_splits[split]}]"

    def _read_split(self, split: str) -> tuple[list[dict[str, Any]], list[int]]:
        if self.files.get(split) is not None:
            return self.read_file(self.files[split])
        import datasets

        ds = datasets.load_dataset(self.dataset_name, self.dataset_config_name, split=self.hub_splits[split])
        records = ds.to_list()
        # class-id label columns (and lists of them, as NER tags) become their names, so hub and file data
        # share one label vocabulary
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                for r in records:
                    r[name] = feature.int2str(r[name]) if r[name] is not None and r[name] >= 0 else None
            elif isinstance(getattr(feature, "feature", None), datasets.ClassLabel):
                names = feature.feature
                for r in records:
                    if r[name] is not None:
                        r[name] = [names.int2str(v) if v is not None and v >= 0 else None for v in r[name]]
        if not records:
            raise DataError(f"{self._source_name(split)}: the split holds no records")
        return records, list(range(1, len(records) + 1))

    def _max_samples(self, split: str) -> int | None:
        return {"train": self.hparams.max_train_samples, "predict": self.hparams.max_predict_samples}.get(
            self.kind(split), self.hparams.max_eval_samples
        )

    # ---- caching -------------------------------------------------------------------------------

    def _cache_path(self, split: str) -> Path:
        from datasets.fingerprint import Hasher

        h = hashlib.sha256()
        if self.files.get(split) is not None:
            with open(self.files[split], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(self._source_name(split).encode())
        key = {
            "version": CACHE_FORMAT_VERSION,
            "task": type(self).__qualname__,
            "split": split,
            "max_samples": self._max_samples(split),
            "params": self.cache_key_params(),
            "encoding": self.encoding,
            "tokenizer": Hasher.hash(self._get_tokenizer()),
            # the code that builds features (every project module involved) and the versions of the packages
            # that tokenise are part of the key: editing either invalidates old caches
            "code": feature_code_fingerprint(type(self)),
        }
        h.update(repr(key).encode())
        return self.cache_dir / self.task_name / f"{split.replace('/', '__')}-{h.hexdigest()[:20]}.arrow"

    def _load_split(self, split: str, build: bool) -> Any:
        """The split's features from the cache; with ``build`` create them first when missing."""
        import datasets

        path = self._cache_path(split)
        if path.is_file() and not (build and self.overwrite_cache):
            return datasets.Dataset.from_file(str(path))
        if not build:  # global rank 0 was to build it in prepare_data
            if self.trainer is None or self.trainer.node_rank == 0:
                raise RuntimeError(f"tokenised cache {path} is missing; was prepare_data skipped?")
            warnings.warn(f"node {self.trainer.node_rank} does not see the tokenised cache {path} that rank 0 wrote: "
                          "tokenising here; put data.cache_dir (or TUNEFORGE_CACHE) on a filesystem every node shares "
                          "to tokenise once per job", stacklevel=2)
        records, lines = self._read_split(split)
        limit = self._max_samples(split)
        if limit is not None:
            records, lines = records[:limit], lines[:limit]
        columns = self.canonical_columns(records, lines, self.kind(split), self._source_name(split))
        columns.setdefault("line", lines)  # a task that drops or splits records returns its own line column
        ds = datasets.Dataset.from_dict(columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        features = self._tokenise(ds, path, split)
        # every process that tokenises says so (a node without the shared cache is not global rank 0)
        _PROCESS_LOG.info(f"Tokenised {len(features)} {split} examples from {self._source_name(split)} -> {path}")
        return features

    def tokenising_processes(self, n_records: int) -> int:
        """How many processes tokenise a split of ``n_records`` (``data.num_proc``; see the class docstring)."""
        if self.num_proc is not None:
            return max(1, min(self.num_proc, n_records))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores if n_records >= PARALLEL_MIN_RECORDS else 1

    def _tokenise(self, ds: Any, path: Path, split: str) -> Any:
        """``datasets.map`` of :meth:`encode` into the cache file ``path``. datasets writes a file under a temporary
        name and renames it, so a cache is never half-written. With several processes (``data.num_proc``) the shards
        go to a temporary folder beside the cache and are then written as the one cache file; an interrupted run
        leaves neither cache nor shards."""
        import shutil
        import tempfile

        import datasets
        from datasets.arrow_writer import ArrowWriter

        processes = self.tokenising_processes(len(ds))
        shards = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent)) if processes > 1 else None
        trainer = self.trainer
        try:
            # worker processes get a pickled copy of this data module: without the trainer (and its model)
            self.trainer = None if shards else trainer
            features = ds.map(self._encode_with_length, batched=True, batch_size=1000,
                              num_proc=processes if shards else None,
                              cache_file_name=str(shards / "shard.arrow" if shards else path),
                              # decided by the caller (datasets would otherwise reuse a file overwrite_cache replaces)
                              load_from_cache_file=False, desc=f"Tokenising {split}")
            if shards:
                with ArrowWriter(path=str(shards / "complete.arrow"), features=features.features) as writer:
                    writer.write_table(features.data.table)  # the shards, memory-mapped, in order
                    writer.finalize()
                os.replace(shards / "complete.arrow", path)
                features = datasets.Dataset.from_file(str(path))
        finally:
            self.trainer = trainer
            if shards:
                shutil.rmtree(shards, ignore_errors=True)
        return features

    def _encode_with_length(self, batch: dict[str, list]) -> dict[str, list]:
        out = self.encode(batch)
        # tokens per example (summed over the sequences of tasks with several per example, e.g. answer choices):
        # what batches are grouped and sorted by
        out["length"] = [sum(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids) for ids in out["input_ids"]]
        return out

    # ---- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Read and tokenise every split this run needs, once (Lightning calls this on one process)."""
        with _signals_interrupt("preparing the data"):
            for split in self._stage_splits(None):
                self._load_split(split, build=True)

    def setup(self, stage: str | None = None) -> None:
        with _signals_interrupt("preparing the data"):
            for split in self._stage_splits(stage):
                # prepare_data ran on global rank 0 only; without a trainer (tests, notebooks) build here
                self.datasets[split] = self._load_split(split, build=self.trainer is None or self.trainer.world_size == 1)
            self.schema.splits = {split: SplitData(table=ds) for split, ds in self.datasets.items()}
            self.schema.eval_sets = {kind: list(self.eval_sets.get(kind, [])) for kind in ("validation", "test", "predict")}
            self.resolve_schema(stage)
            for split, ds in self.datasets.items():  # a task may have replaced a split (few-shot draws)
                self.schema.splits.setdefault(split, SplitData()).table = ds
            self.schema.resolved = True

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.group_by_length:
            # under DDP the groups span one batch of every process, so each process's batches stay grouped
            sampler: Sampler = LengthGroupedSampler(ds["length"], self.batch_size * world)
        else:
            sampler = ShuffleSampler(len(ds))
        if world > 1:
            sampler = TrainShardSampler(sampler, world, self.trainer.global_rank)
        return self._loader("train", self.batch_size, sampler, resumable=True)

    def val_dataloader(self) -> DataLoader | list:
        # no validation data: an empty list tells Lightning to skip validation
        return self._eval_loaders("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loaders("predict")

    def _eval_loaders(self, kind: str) -> DataLoader | list:
        """One loader for a single evaluation set, a list (in the configured order) for several named ones."""
        if not self.eval_sets.get(kind):
            return self._eval_loader(kind) if kind in self.datasets else []
        return [self._eval_loader(key) for key in self.split_keys(kind) if key in self.datasets]

    def _eval_loader(self, split: str) -> DataLoader:
        lengths = np.asarray(self.datasets[split]["length"])
        order = np.argsort(-lengths, kind="stable").tolist()  # longest first: an out-of-memory shows at once
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return self._loader(split, self.eval_batch_size, order)
        if len(order) < world:  # a process without a batch would skip the epoch hooks that sync the metrics
            raise DataError(f"{self._source_name(split)}: {len(order)} example(s) cannot be shared by {world} "
                            f"processes; evaluate with fewer devices")
        return self._loader(split, self.eval_batch_size, EvalShardSampler(order, world, self.trainer.global_rank))

    def _loader(self, split: str, batch_size: int, sampler: Any, resumable: bool = False) -> DataLoader:
        tokenizer = self._get_tokenizer()
        pad = {k: (tokenizer.pad_token_id if v is None else v) for k, v in self.model_input_pad.items()}
        features = BatchFetcher(self.datasets[split], pad, self.extra_batch_columns(split))
        collate = self.make_collator(split, pad)
        common = {
            "collate_fn": collate,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            # the loader's own generator seeds workers, so creating an iterator never draws from the global RNG
            # (a resumed run then sees the same dropout masks as an uninterrupted one)
            "generator": torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0))),
        }
        loader = ResumableDataLoader if resumable else DataLoader
        return loader(features, batch_size=batch_size, sampler=sampler, **common)


class BatchFetcher(torch.utils.data.Dataset):
    """Map-style dataset that fetches a whole batch of rows from the Arrow table in one call."""

    def __init__(self, table: Any, pad: dict[str, int], extra: dict[str, np.ndarray]) -> None:
        self.table = table.select_columns([c for c in pad if c in table.column_names])
        self.extra = extra

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        batch = self.table[indices]
        for name, values in self.extra.items():
            batch[name] = values[indices]
        batch["idx"] = np.asarray(indices)
        return batch


def column_tensor(rows: Any) -> torch.Tensor:
    """One value per example (``idx``, positions, ...) as a tensor, without a copy where it is already an array."""
    return torch.from_numpy(rows) if isinstance(rows, np.ndarray) else torch.tensor(rows)


class Collator:
    """Pads a columnar batch to its longest row (dynamic padding) and builds the attention mask.

    ``position_columns`` hold one token position per row; left padding shifts them with the tokens.
    """

    def __init__(self, pad: dict[str, int], padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 position_columns: tuple[str, ...] = ()) -> None:
        self.pad = pad
        self.left = padding_side == "left"
        self.multiple = pad_to_multiple_of
        self.position_columns = position_columns

    def __call__(self, batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if isinstance(batch, list):  # DataLoader with batch_size=None or a sampler yielding single items
            batch = batch[0]
        lengths = np.fromiter((len(x) for x in batch["input_ids"]), dtype=np.int64)
        width = self._width(int(lengths.max()))
        out: dict[str, torch.Tensor] = {}
        for name, rows in batch.items():
            if name in self.pad:
                # each column to its own longest row: seq2seq labels may be longer or shorter than the inputs
                own = width if name == "input_ids" else self._width(max(len(x) for x in rows))
                out[name] = torch.from_numpy(self._pad_rows(rows, own, self.pad[name]))
            else:
                out[name] = column_tensor(rows)
            if self.left and name in self.position_columns:
                out[name] = out[name] + torch.from_numpy(width - lengths)
        positions = np.arange(width)[None, :]
        mask = positions >= (width - lengths)[:, None] if self.left else positions < lengths[:, None]
        out["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        return out

    def _width(self, longest: int) -> int:
        return -(-longest // self.multiple) * self.multiple if self.multiple else longest

    def _pad_rows(self, rows: list[list[int]], width: int, value: int) -> np.ndarray:
        arr = np.full((len(rows), width), value, dtype=np.int64)
        for i, row in enumerate(rows):
            if self.left:
                arr[i, width - len(row):] = row
            else:
                arr[i, : len(row)] = row
        return arr


class LengthGroupedSampler(Sampler[int]):
    """Random order where each run of ``batch_size`` indices has similar lengths: Hugging Face's
    ``group_by_length`` order (``transformers.trainer_pt_utils.get_length_grouped_indices``: shuffle, cut into
    mega-batches, sort each by length, the longest example first), drawn from a generator seeded by the global
    seed and the epoch (``set_epoch``) so that a run and its resumed copy see the same order, and able to leave
    out the consumed start of an epoch (``skip``) without reading it. transformers' own ``LengthGroupedSampler``
    has neither the per-epoch seed nor the skip.
    """

    skip = 0  # indices to leave out at the start of the next epoch (set once by ResumableDataLoader)

    def __init__(self, lengths: list[int] | np.ndarray, batch_size: int, mega_factor: int = 50,
                 seed: int | None = None) -> None:
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        # batches per mega-batch: always 50 (Hugging Face's default shrinks it to 4 mega-batches per epoch on small
        # data, which leaves 6x the padding on 1,000 examples; tests/test_datamodule.py measures it)
        self.mega_factor = mega_factor
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, self.mega_factor, generator=generator)
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


class EvalShardSampler(DistributedSampler):
    """One process's share of an evaluation order: every ``num_replicas``-th index from ``rank`` on.

    Unlike Lightning's ``DistributedSampler`` it never repeats an example to give every process the same
    number, so validation / test metrics count each example exactly once and equal a single-process run;
    the shares differ by at most one example and keep the longest-first order. Being a
    ``DistributedSampler``, Lightning uses it as it is instead of wrapping it.
    """

    def __init__(self, order: list[int], num_replicas: int, rank: int) -> None:
        super().__init__(order, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.order = list(order)
        self.total_size = len(self.order)
        self.num_samples = len(self.order[rank::num_replicas])

    def __iter__(self) -> Iterator[int]:
        return iter(self.order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class TrainShardSampler(DistributedSampler):
    """One process's share of a training order: every ``num_replicas``-th index of ``sampler``'s order.

    Lightning would wrap a custom sampler in a ``DistributedSamplerWrapper`` that shuffles its output
    again (length grouping lost: padding as in a random order) and never passes the epoch on. This one
    is a ``DistributedSampler``, so Lightning uses it as it is: the order is the same on every process
    (it depends only on the seed and the epoch), is padded by repeating its start to a multiple of
    ``num_replicas`` as ``DistributedSampler`` does, and process ``rank`` takes positions ``rank,
    rank + num_replicas, ...``: one run of ``batch_size * num_replicas`` grouped indices becomes one
    batch per process. ``skip`` leaves out this process's first indices (a mid-epoch resume).
    """

    skip = 0

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int) -> None:
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        skip, self.skip = self.skip, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])

    def __len__(self) -> int:
        return self.num_samples


class ShuffleSampler(RandomSampler):
    """A random order that depends only on the global seed and the epoch (``set_epoch``), like
    :class:`LengthGroupedSampler` without the grouping; unlike a plain ``RandomSampler`` it draws nothing
    from the global RNG, so a resumed run sees the same order."""

    skip = 0  # indices to leave out at the start of the next epoch (set once by ResumableDataLoader)

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(range(n))
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data_source))[skip:].tolist())


class ResumableDataLoader(DataLoader):
    """Training ``DataLoader`` whose place in the epoch travels with the checkpoint.

    Lightning saves ``state_dict()`` of a stateful training loader in every checkpoint and calls
    ``load_state_dict`` before iterating again, so a run resumed from a mid-epoch checkpoint continues at
    the next unseen batch of the same epoch's order (not at the start of the epoch). The state is the
    sampler's epoch and the number of batches handed out in it; the skip applies only to that epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._served = 0
        self._resume: dict[str, int] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:
        # a generator: this runs at the first batch, after Lightning has set the sampler's epoch
        epoch, resume = self._sampler_epoch(), self._resume
        self._resume = None
        skip = resume["batches"] if resume and resume["epoch"] == epoch and resume["batches"] < len(self) else 0
        self._epoch, self._served = epoch, skip
        # our samplers leave out the consumed indices (no rows read); one Lightning put in (overfit_batches): read and drop
        by_index = hasattr(self.sampler, "skip") and self.batch_size is not None
        if by_index:
            self.sampler.skip = skip * self.batch_size
        iterator = super().__iter__()
        if not by_index:
            for _ in itertools.islice(iterator, skip):
                pass
        for batch in iterator:
            self._served += 1
            yield batch
