#!/usr/bin/env python
"""tuneforge: fine-tune Hugging Face transformers from the terminal.

    python train.py fit --config experiments/quickstart.yaml [--config configs/trainer/gpu.yaml] [--key value ...]
    python train.py validate|test|predict --config ... --ckpt_path runs/<name>/<time>/checkpoints/<file>.ckpt

Every run gets its own directory (``<output_dir>/<run_name>/<timestamp>``) holding the resolved
config, run info (git commit, versions, command), the checkpoints, the W&B / CSV / TensorBoard logs,
the predictions and the Hugging Face export. Defaults come from ``configs/default.yaml``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # silence the fork warning of DataLoader workers

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from datamodules.base import PreparationInterrupted, TransformerDataModule  # noqa: E402
from datamodules.readers import DataError  # noqa: E402
from lit_modules.base import ConfigError, NonFiniteLossError, TransformerModule  # noqa: E402
from lit_modules.callbacks import BestCheckpoint, Preemption, ResumeState, RunMetadata  # noqa: E402
from lit_modules.checkpoint_io import AtomicCheckpointIO, check_checkpoint  # noqa: E402
from lit_modules.distributed import full_state_dict, restore_weights  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
USER_ERRORS = (DataError, ConfigError)


# ---- one-line parser errors ------------------------------------------------------------------------

def _key_source(argv: list[str], key: str, cwd: str = ".") -> str:
    """Where the value of ``key`` came from: the last ``--config`` file setting it (file:line) or the command line.

    ``cwd`` is the directory the arguments were given in (jsonargparse changes directory while it parses).
    """
    flags = {f"--{key}", f"--{key.replace('.init_args', '')}"}
    source = f"{DEFAULT_CONFIG.relative_to(ROOT)}:{_yaml_line(DEFAULT_CONFIG, key)}" if _yaml_line(DEFAULT_CONFIG, key) else None
    for i, arg in enumerate(argv):
        path = None
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        if path is not None:
            full = path if path.is_absolute() else Path(cwd) / path
            line = _yaml_line(full, key) if full.is_file() else None
            source = f"{path}:{line}" if line else source
        elif arg.split("=", 1)[0] in flags:
            source = "command line"
    return source or "command line"


def _yaml_line(path: Path, key: str) -> Optional[int]:
    """1-based line of dotted ``key`` in a YAML file (``init_args`` levels optional), or None."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    parts = [p for p in key.split(".") if p != "init_args"]

    def find(node: Any, parts: list[str]) -> Optional[int]:
        if not parts or not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if k.value == parts[0]:
                if len(parts) == 1:
                    return k.start_mark.line + 1
                return find(v, parts[1:])
            if k.value == "init_args":
                found = find(v, parts)
                if found:
                    return found
        return None

    return find(node, parts)


def summarize_parser_error(message: str, argv: list[str], cwd: str = ".") -> str:
    """Reduce jsonargparse's nested error report to one line: where, which key, what was expected."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    key_parts: list[str] = []
    unknown = expected = got = None
    for ln in lines:
        if m := re.match(r'Parser key "([^"]+)"', ln):
            key_parts.append(m.group(1))
        elif m := re.search(r"Problem with given class_path '([^']+)'", ln):
            key_parts.append("init_args")
        elif m := re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)|does not accept option '([^']+)'", ln):
            unknown = m.group(1) or m.group(2)
        elif m := re.search(r"unrecognized arguments: (.*)", ln):
            return f"unknown option(s) {m.group(1)} (options are never abbreviated; see --help)"
        elif (m := re.search(r"Expected a typing\.Literal\[(.*)\]", ln)) and expected is None:
            expected = f"one of {m.group(1)}"
        elif (m := re.search(r"Expected a <class '([^']+)'>", ln)) and m.group(1) != "NoneType" and expected is None:
            expected = m.group(1)
        elif (m := re.search(r"(?:Expected a|Expected an) ([^.<]+?)\.? Got value", ln)) and expected is None:
            expected = m.group(1)
        if m := re.search(r"(?:Got value|Given value): (.*)", ln):
            got = got or m.group(1)
        if m := re.search(r"Import path (\S+) does not correspond to a subclass of (\S+)", ln):
            return f"{'.'.join(key_parts) or 'class_path'}: '{m.group(1)}' is not a subclass of {m.group(2)}"
    key = re.sub(r"(^|\.)init_args\.init_args", r"\1init_args", ".".join(key_parts))
    if unknown is not None:
        key = f"{key}.{unknown}" if key and not unknown.startswith(key) else unknown
        what = "unknown key"
    elif expected is not None:
        key = key[: -len(".init_args")] if key.endswith(".init_args") else key
        what = f"expected {expected}" + (f", got {got!r}" if got is not None else "")
    else:
        return lines[-1] if len(lines) == 1 else " ".join(lines[:3])
    where = _key_source(argv, key, cwd)
    return f"{where}: {key}: {what}"


class TuneforgeParser(LightningArgumentParser):
    """LightningCLI's parser with one-line error messages."""

    argv: list[str] = []  # the arguments being parsed (set by TuneforgeCLI), to find config files in
    cwd: str = "."

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {summarize_parser_error(message, TuneforgeParser.argv, TuneforgeParser.cwd)}\n")
        sys.exit(2)


# ---- W&B without prompts ---------------------------------------------------------------------------

def wandb_api_key_available() -> bool:
    """Whether W&B credentials can be found without network or prompt (environment or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    for path in filter(None, [os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"]):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def wandb_host_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def choose_wandb_mode() -> tuple[str, str]:
    """Pick the W&B mode so that ``wandb.init`` never prompts or blocks; returns (mode, reason)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return mode, "WANDB_MODE"
    if not wandb_api_key_available():
        reason = "no W&B API key found (WANDB_API_KEY or `wandb login`)"
        os.environ["WANDB_MODE"] = "offline"
        return "offline", reason
    if not wandb_host_reachable():
        os.environ["WANDB_MODE"] = "offline"
        return "offline", "the W&B server is not reachable"
    return "online", "API key found"


def guard_logger(logger: Any) -> None:
    """Make a logger's errors mid-run (W&B service gone, network, a run finished under it) a warning, shown
    once, instead of the end of training; what it could not log is lost, the run goes on."""
    from lightning.pytorch.utilities import rank_zero_warn

    failed: list[str] = []
    for name in ("log_metrics", "log_hyperparams", "after_save_checkpoint", "save", "finalize"):
        method = getattr(logger, name, None)
        if method is None:
            continue

        def guarded(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            try:
                return _method(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever the logging backend raises, training goes on
                if not failed:
                    reason = (str(e).strip().splitlines() or [""])[0][:200]
                    rank_zero_warn(f"{type(logger).__name__}.{_name} failed ({type(e).__name__}: {reason}); training "
                                   "continues, further logger errors are not shown")
                failed.append(_name)
                return None

        setattr(logger, name, guarded)


# ---- run directory, config and run info --------------------------------------------------------------

def git_info() -> dict[str, Any]:
    """The commit of this checkout and whether tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty)}


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config and run info into the run directory and logs them to every logger."""

    def __init__(self, *args: Any, run_dir: Path, filled: list[tuple[Any, str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.run_dir = run_dir
        self.filled = filled  # (namespace, key, value the user gave) for the paths train.py filled in

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Save what the user asked for, not this run's paths, so that rerunning the saved config
        # starts a new run directory instead of writing into this one.
        run_values = [(ns, key, ns[key]) for ns, key, _ in self.filled]
        for ns, key, given in self.filled:
            ns[key] = given
        try:
            name = "config.yaml" if not (self.run_dir / "config.yaml").exists() else \
                f"config.resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml"  # a resumed run keeps its first config
            self.parser.save(self.config, self.run_dir / name, overwrite=True, skip_unset=False)
            config = self.parser.dump(self.config, format="json", skip_unset=False)
        finally:
            for ns, key, value in run_values:
                ns[key] = value
        info = {
            "command": [sys.executable, *sys.argv],
            "git": git_info(),
            "versions": {m: _version(m) for m in ("torch", "lightning", "transformers", "torchmetrics", "datasets", "peft", "wandb")},
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
        }
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": json.loads(config), "git": info["git"], "run_dir": str(self.run_dir)})


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def make_run_dir(output_dir: str, run_name: str, subcommand: str) -> Path:
    """A fresh directory name under ``output_dir/run_name`` (never one an earlier run used)."""
    if os.environ.get("TUNEFORGE_RUN_DIR"):  # set by the launching process for its DDP workers
        return Path(os.environ["TUNEFORGE_RUN_DIR"])
    suffix = "" if subcommand == "fit" else f"-{subcommand}"
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # every task of the job, and the job again after a requeue, uses the same directory
        return Path(output_dir) / run_name / f"slurm-{os.environ['SLURM_JOB_ID']}{suffix}"
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + suffix
    base = Path(output_dir) / run_name / stamp
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


# ---- the CLI -------------------------------------------------------------------------------------

class TuneforgeCLI(LightningCLI):
    """LightningCLI with run directories, W&B that never blocks, export and test after fit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parser_kwargs = {
            sub: {"default_config_files": [str(DEFAULT_CONFIG)], "allow_abbrev": False} for sub in SUBCOMMANDS
        }
        parser_kwargs["allow_abbrev"] = False
        super().__init__(
            TransformerModule,
            TransformerDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=TuneforgeParser,
            parser_kwargs=parser_kwargs,
            save_config_callback=RunConfigCallback,
            auto_configure_optimizers=False,
            *args,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        TuneforgeParser.argv = [str(a) for a in args] if isinstance(args, list) else sys.argv[1:]
        TuneforgeParser.cwd = os.getcwd()
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path here: an unreadable file is one line, exit 2
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
            check_checkpoint(ckpt)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=str, default="runs", help="Root of all run directories.")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="Run group folder and W&B run name (default: the first --config file's name).")
        parser.add_argument("--export", type=bool, default=True,
                            help="After fit, write the best checkpoint as a Hugging Face folder (<run dir>/export).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the best checkpoint when test data is configured.")
        parser.add_argument("--predictions_file", type=Optional[str], default=None,
                            help="predict output (JSONL); default <run dir>/predictions.jsonl.")
        parser.add_argument("--reference", type=Optional[dict[str, Any]], default=None,
                            help="Published results this experiment file reproduces (read by `python -m experiments`; "
                                 "training ignores it).")
        parser.add_argument("--min_free_disk_mb", type=int, default=1024,
                            help="Stop before training when the output directory's disk has less free space (MB).")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")

    # The run directory, loggers and checkpoint paths are fixed before any class is built.
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        configs = [Path(str(p)) for p in (cfg.get("config") or [])]
        # the experiment file names the run: the first --config outside configs/ (presets live there)
        experiments = [p for p in configs if "configs" not in p.resolve().relative_to(p.resolve().anchor).parts[:-1]]
        run_name = cfg.run_name or ((experiments or configs)[0].stem if configs else "run")
        resume = self._resume_point(cfg, run_name) if sub == "fit" else {}
        check_output_dir(Path(cfg.output_dir), cfg.min_free_disk_mb, "output_dir")
        if cfg.checkpoint.dirpath is not None:
            check_output_dir(Path(cfg.checkpoint.dirpath), cfg.min_free_disk_mb, "checkpoint.dirpath")
        self.run_dir = Path(resume["run_dir"]) if resume.get("run_dir") else make_run_dir(cfg.output_dir, run_name, sub)
        os.environ["TUNEFORGE_RUN_DIR"] = str(self.run_dir)
        filled: list[tuple[Any, str, Any]] = []

        def fill(ns: Any, key: str, value: Any) -> None:
            filled.append((ns, key, ns.get(key)))
            ns[key] = value

        if cfg.trainer.default_root_dir is None:
            fill(cfg.trainer, "default_root_dir", str(self.run_dir))
        if cfg.checkpoint.dirpath is None:
            fill(cfg.checkpoint, "dirpath", str(self.run_dir / "checkpoints"))
        strategy = cfg.trainer.strategy
        strategy_name = str(strategy.get("class_path") if hasattr(strategy, "get") else strategy)
        if "deepspeed" in strategy_name.lower() and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"trainer.strategy: {strategy_name} needs the optional package deepspeed "
                              "(pip install deepspeed; it needs a CUDA toolchain)")
        if cfg.trainer.enable_progress_bar is False and cfg.trainer.callbacks:
            # the default config adds a progress bar; switching bars off must not be an error
            kept = [c for c in cfg.trainer.callbacks if "ProgressBar" not in str(c.get("class_path", ""))]
            fill(cfg.trainer, "callbacks", kept)
        self.wandb_mode = None
        loggers = cfg.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(logger, "class_path"):
                continue
            args = logger.init_args
            name = logger.class_path.rsplit(".", 1)[-1]
            if name == "WandbLogger":
                self.wandb_mode, reason = choose_wandb_mode()
                rank_zero_info(f"W&B: {self.wandb_mode} ({reason})")
                fill(args, "save_dir", str(self.run_dir))
                if not args.get("name"):
                    fill(args, "name", run_name)
                if resume.get("wandb_id") and not args.get("id"):  # continue the same W&B run
                    fill(args, "id", resume["wandb_id"])
                    fill(logger, "dict_kwargs", {**(logger.get("dict_kwargs") or {}), "resume": "allow"})
            elif name in ("CSVLogger", "TensorBoardLogger"):
                fill(args, "save_dir", str(self.run_dir))
                if args.get("name") in (None, "lightning_logs") and args.get("version") is None:
                    fill(args, "name", "")
                    fill(args, "version", "csv" if name == "CSVLogger" else "tensorboard")
        self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": self.run_dir, "filled": filled}

    def _resume_point(self, cfg: Any, run_name: str) -> dict[str, Any]:
        """For ``fit --ckpt_path``: the run directory and W&B run id the checkpoint belongs to.

        ``--ckpt_path last`` means the newest checkpoint of the newest run named ``run_name``. A SLURM job
        that was requeued finds its own run directory (named after the job id) and Lightning's HPC checkpoint.
        """
        ckpt = cfg.ckpt_path
        if ckpt == "last":
            runs = Path(cfg.output_dir) / run_name
            found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) or \
                sorted(runs.glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise ConfigError(f"ckpt_path: 'last' found no checkpoint of a run named '{run_name}' under {runs}")
            ckpt = cfg.ckpt_path = str(found[-1])
            rank_zero_info(f"Resuming from {ckpt}")
        elif ckpt is None and os.environ.get("SLURM_JOB_ID"):
            hpc = sorted(make_run_dir(cfg.output_dir, run_name, "fit").glob("hpc_ckpt_*.ckpt"))
            ckpt = str(hpc[-1]) if hpc else None
        if not ckpt or ckpt in ("best", "hpc"):
            return {}
        meta = check_checkpoint(ckpt).get("tuneforge") or {}
        run_dir = meta.get("run_dir")
        return {"run_dir": run_dir if run_dir and Path(run_dir).is_dir() else None, "wandb_id": meta.get("wandb_id")}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        callbacks += [RunMetadata(str(self.run_dir)), ResumeState(), Preemption()]
        if config.get("enable_checkpointing") is False:  # the checkpoint section adds one unless switched off
            callbacks = [c for c in callbacks if not isinstance(c, BestCheckpoint)]
        trainer = self._instantiate_trainer(config, callbacks)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                guard_logger(logger)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one a strategy or the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_instantiate_classes(self) -> None:
        if isinstance(self.model, TransformerModule):
            self.model.predictions_file = self.config[self.subcommand].predictions_file or str(self.run_dir / "predictions.jsonl")

    def after_fit(self) -> None:
        cfg = self.config["fit"]
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results: dict[str, Any] = {"best_checkpoint": best or None}
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
            results[trainer.checkpoint_callback.monitor] = float(trainer.checkpoint_callback.best_model_score)
        speed = next((c for c in trainer.callbacks if isinstance(c, RunMetadata)), None)
        if speed is not None and speed.samples_per_second:
            results["train_seconds"] = round(speed.train_seconds, 2)
            results["train_samples_per_second"] = round(speed.samples_per_second, 2)
        if cfg.test_after_fit and isinstance(dm, TransformerDataModule) and dm.has_split("test"):
            metrics = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=True)
            results["test"] = metrics[0] if metrics else {}
        elif best:
            restore_weights(trainer, best)
        if cfg.export and isinstance(model, TransformerModule):
            state = full_state_dict(trainer, best or None)  # every process: FSDP gathers its shards here
            if trainer.is_global_zero:
                results["export"] = str(model.export(self.run_dir / "export", state_dict=state))
        if trainer.is_global_zero:
            self._finish(results)

    def after_validate(self) -> None:
        self._finish({"validate": self._metrics()})

    def after_test(self) -> None:
        self._finish({"test": self._metrics()})

    def after_predict(self) -> None:
        self._finish({"predictions": self.model.predictions_file})

    def _metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def _finish(self, results: dict[str, Any]) -> None:
        """Write results.json and print where everything went."""
        if not self.trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wandb_dirs = sorted((self.run_dir / "wandb").glob("*run-*")) if self.wandb_mode else []
        wandb_dir = wandb_dirs[-1] if wandb_dirs else None  # a resumed run adds one folder per launch
        results = {"run_dir": str(self.run_dir), "wandb_run": str(wandb_dir) if wandb_dir else None, **results}
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        lines = [f"Run directory:   {self.run_dir}"]
        if wandb_dir is not None:
            target = wandb_dir if len(wandb_dirs) == 1 else self.run_dir / "wandb" / "offline-run-*"
            sync = f" (offline; upload later with: wandb sync {target})" if self.wandb_mode == "offline" else ""
            lines.append(f"W&B run:         {wandb_dir}{sync}")
        if results.get("best_checkpoint"):
            lines.append(f"Best checkpoint: {results['best_checkpoint']}")
        if results.get("export"):
            lines.append(f"Export:          {results['export']}  (transformers.pipeline(task, model=this folder))")
        if results.get("predictions"):
            lines.append(f"Predictions:     {results['predictions']}")
        for stage in ("validate", "test"):
            if results.get(stage):
                shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[stage].items()) if "/" in k)
                lines.append(f"{stage.capitalize()} metrics: {shown}")
        print("\n".join(lines), flush=True)


def check_output_dir(directory: Path, min_free_mb: int, key: str) -> None:
    """Before anything is built: the output directory can be created and written, and its disk has room."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and ACLs all show here (os.access misses some)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tuneforge-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {directory} ({existing}: {e.strerror or e})") from None
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"{key}: only {free_mb:.0f} MB free on the disk of {existing}, less than "
                          f"min_free_disk_mb={min_free_mb} (free space or set --min_free_disk_mb)")


def _remove_unfinished_run(run_dir: Optional[Path]) -> None:
    """After a user error, remove the run directory if nothing worth keeping (a checkpoint) was written."""
    if run_dir is None or not run_dir.exists():
        return
    if any(run_dir.rglob("*.ckpt")):
        return
    _finish_wandb()
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.exists() and not any(parent.iterdir()):
        parent.rmdir()


def main(args: Optional[list[str]] = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    if os.environ.get("LOCAL_RANK") is None:  # a fresh launch, not a DDP worker of this run
        os.environ.pop("TUNEFORGE_RUN_DIR", None)
    try:
        TuneforgeCLI(args=args)
    except SIGTERMException:  # SIGTERM / SIGUSR1: last.ckpt was saved after the running batch
        run_dir = os.environ.get("TUNEFORGE_RUN_DIR")
        sys.stderr.write(f"Stopped by a signal; continue with the same command plus --ckpt_path last (run {run_dir})\n")
        return 0
    except NonFiniteLossError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except PreparationInterrupted as e:  # SIGINT / SIGTERM before training: nothing worth keeping was written
        sys.stderr.write(f"error: {e}\n")
        _remove_unfinished_run(Path(os.environ["TUNEFORGE_RUN_DIR"]) if os.environ.get("TUNEFORGE_RUN_DIR") else None)
        return 128 + e.signum
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise
        sys.stderr.write(f"error: {user_error}\n")
        _remove_unfinished_run(Path(os.environ["TUNEFORGE_RUN_DIR"]) if os.environ.get("TUNEFORGE_RUN_DIR") else None)
        return 2
    finally:
        _finish_wandb()
    return 0


def _user_error(error: BaseException) -> Optional[BaseException]:
    """The DataError / ConfigError behind ``error`` (jsonargparse wraps errors raised while building classes)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _finish_wandb() -> None:
    """Close the W&B run of this process, so its files are complete when train.py returns."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


if __name__ == "__main__":
    sys.exit(main())
