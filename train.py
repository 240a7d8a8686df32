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
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # silence the fork warning of DataLoader workers

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelSummary, ProgressBar, RichModelSummary  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402

from datamodules.base import PreparationInterrupted, TransformerDataModule  # noqa: E402
from lit_modules.base import TransformerModule, check_checkpoint_task  # noqa: E402
from lit_modules.callbacks import (  # noqa: E402
    BestCheckpoint,
    PredictionsWriter,
    Preemption,
    ResumeState,
    PredictionTables,
    RunMetadata,
    Stopped,
    is_terminal,
    progress_bar_for,
)
from lit_modules.checkpoint_io import AtomicCheckpointIO, check_checkpoint  # noqa: E402
from lit_modules.distributed import full_state_dict, restore_weights  # noqa: E402
from lit_modules.errors import ConfigError, DataError, NonFiniteLossError, first_line  # noqa: E402
from lit_modules.model_card import check_push_to_hub, push_to_hub, write_model_card  # noqa: E402
from lit_modules.peft_support import peft_type  # noqa: E402
from lit_modules.run.parser_errors import DEFAULT_CONFIG, summarize_parser_error  # noqa: E402
from lit_modules.run.run_dir import RunConfigCallback, check_output_dir, make_run_dir, remove_unfinished_run  # noqa: E402
from lit_modules.run.terminal import configure_terminal, quiet_wandb_logger  # noqa: E402
from lit_modules.run.wandb_mode import choose_wandb_mode, finish_wandb, guard_logger  # noqa: E402
from lit_modules.schema import connect  # noqa: E402

SUBCOMMANDS = ("fit", "validate", "test", "predict")
USER_ERRORS = (DataError, ConfigError)


class TuneforgeParser(LightningArgumentParser):
    """LightningCLI's parser with one-line error messages."""

    argv: list[str] = []  # the arguments being parsed (set by TuneforgeCLI), to find config files in
    cwd: str = "."

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {summarize_parser_error(message, TuneforgeParser.argv, TuneforgeParser.cwd)}\n")
        sys.exit(2)


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
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=TuneforgeParser,
            parser_kwargs=parser_kwargs,
            save_config_callback=RunConfigCallback,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        TuneforgeParser.argv = [str(a) for a in args] if isinstance(args, list) else sys.argv[1:]
        TuneforgeParser.cwd = os.getcwd()
        check_config_files(TuneforgeParser.argv)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path here: an unreadable file is one line, exit 2
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
            checkpoint = check_checkpoint(ckpt)
            # a checkpoint of another task or model class: one line, before its hyperparameters replace the model's
            model = self.config[sub].get("model")
            class_path = model.get("class_path") if hasattr(model, "get") else None
            if class_path:
                import importlib

                module, _, name = class_path.rpartition(".")
                cls = getattr(importlib.import_module(module), name)
                check_checkpoint_task(checkpoint, {"task": getattr(cls, "task", "base"), "class_path": class_path})
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=str, default="runs", help="Root of all run directories.")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="Run group folder and W&B run name (default: the first --config file's name).")
        parser.add_argument("--export", type=bool, default=True,
                            help="After fit, write the best checkpoint as a Hugging Face folder (<run dir>/export).")
        parser.add_argument("--push_to_hub", type=Optional[str], default=None,
                            help="After fit, upload the export (with its model card) to this Hugging Face Hub repo id; "
                                 "checked before training (offline mode, token, hub reachable).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the best checkpoint when test data is configured.")
        parser.add_argument("--predictions_file", type=Optional[str], default=None,
                            help="predict output (JSONL); default <run dir>/predictions.jsonl.")
        parser.add_argument("--reference", type=Optional[dict[str, Any]], default=None,
                            help="Published results this experiment file reproduces (read by `python -m experiments`; "
                                 "training ignores it).")
        parser.add_argument("--log_predictions", type=int, default=0,
                            help="At every evaluation, a W&B Table of the first N examples of each evaluation set "
                                 "(input, gold, prediction, score) and, for classification, a confusion matrix.")
        parser.add_argument("--early_stopping", type=Optional[dict[str, Any]], default=None,
                            help="Stop fitting when checkpoint.monitor stops improving: EarlyStopping's options "
                                 "({patience: 3, min_delta: 0.0}); preset: configs/callbacks/early_stopping.yaml.")
        parser.add_argument("--verbose_output", type=bool, default=False,
                            help="Show every third-party message (W&B banners, Lightning notes, load reports).")
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
        if sub == "fit" and cfg.get("push_to_hub"):
            if not cfg.export:
                raise ConfigError("push_to_hub: uploads the export; it cannot go with --export false")
            check_push_to_hub(cfg.push_to_hub)  # fails here, in one line, not after hours of training
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
        self.wandb_mode, self.wandb_dir = None, self.run_dir
        loggers = cfg.trainer.logger
        if not loggers and cfg.trainer.callbacks:
            # no logger: the learning-rate monitor of the default config has nothing to log to
            kept = [c for c in cfg.trainer.callbacks if "LearningRateMonitor" not in str(c.get("class_path", ""))]
            fill(cfg.trainer, "callbacks", kept)

        def own_dir(value: Any) -> bool:
            """A logger save_dir that means "this run's directory": unset (WandbLogger's default is "."), the output root,
            or "runs" (the presets' value: the default output root); any other directory is used as given."""
            return value in (None, "", ".", "runs") or Path(str(value)).resolve() == Path(cfg.output_dir).resolve()

        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(logger, "class_path"):
                continue
            args = logger.init_args
            name = logger.class_path.rsplit(".", 1)[-1]
            if name == "WandbLogger":
                self.wandb_mode, reason = choose_wandb_mode()
                rank_zero_info(f"W&B: {self.wandb_mode} ({reason})")
                if own_dir(args.get("save_dir")):
                    fill(args, "save_dir", str(self.run_dir))
                self.wandb_dir = Path(str(args.get("save_dir")))
                if not args.get("name"):
                    fill(args, "name", run_name)
                # W&B looks for a git checkout in the run directory (never one) and warns; the run's config already
                # holds this code's commit and dirty flag (run_info.json's "git", logged by RunConfigCallback)
                os.environ.setdefault("WANDB_DISABLE_GIT", "true")
                if resume.get("wandb_id") and not args.get("id"):  # continue the same W&B run
                    fill(args, "id", resume["wandb_id"])
                    fill(logger, "dict_kwargs", {**(logger.get("dict_kwargs") or {}), "resume": "allow"})
            elif name in ("CSVLogger", "TensorBoardLogger"):
                if own_dir(args.get("save_dir")):
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
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(progress_bar_for(sys.stdout))  # Rich in a terminal, whole lines in a file or CI log
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            # Lightning's own default is Rich's table whenever rich is installed, box characters in a log file too
            callbacks.append(RichModelSummary(max_depth=1) if is_terminal(sys.stdout) else ModelSummary(max_depth=1))
        tables = self.config[self.subcommand].get("log_predictions") or 0
        if tables < 0:
            raise ConfigError(f"log_predictions: expected a number of examples >= 0, got {tables}")
        if tables and self.subcommand != "predict":
            callbacks.append(PredictionTables(tables))
        early = self.config[self.subcommand].get("early_stopping")
        if early and self.subcommand == "fit":
            ckpt = self.config["fit"].checkpoint
            if not ckpt.monitor:
                raise ConfigError("early_stopping: needs checkpoint.monitor, the metric it watches")
            try:
                callbacks.append(EarlyStopping(monitor=ckpt.monitor, mode=ckpt.mode, **early))
            except TypeError as e:
                raise ConfigError(f"early_stopping: {first_line(e)}") from None
        if self.subcommand == "predict":
            path = self.config["predict"].predictions_file or str(self.run_dir / "predictions.jsonl")
            callbacks.append(PredictionsWriter(path))
        if config.get("enable_checkpointing") is False:  # the checkpoint section adds one unless switched off
            callbacks = [c for c in callbacks if not isinstance(c, BestCheckpoint)]
        try:
            trainer = self._instantiate_trainer(config, callbacks)
        except MisconfigurationException as e:  # e.g. --trainer.accelerator gpu on a machine without one
            raise ConfigError(f"trainer: {first_line(e)}") from None
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                quiet_wandb_logger(logger)
                guard_logger(logger)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one a strategy or the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_instantiate_classes(self) -> None:
        """The one hand-off between model and data (lit_modules.schema.connect), and what the data decides about
        checkpointing."""
        if isinstance(self.model, TransformerModule) and isinstance(self.datamodule, TransformerDataModule):
            connect(self.model, self.datamodule)
            if self.subcommand == "fit" and not self.datamodule.has_split("validation"):
                for callback in self.trainer.callbacks:
                    if isinstance(callback, BestCheckpoint):
                        callback.without_validation()

    def after_fit(self) -> None:
        cfg = self.config["fit"]
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results: dict[str, Any] = {"best_checkpoint": best or None}
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
            monitor = trainer.checkpoint_callback.monitor
            results[monitor] = float(trainer.checkpoint_callback.best_model_score)
            self._summarise_best(monitor, results[monitor], trainer.checkpoint_callback.best_model_path)
        speed = next((c for c in trainer.callbacks if isinstance(c, RunMetadata)), None)
        if speed is not None and speed.samples_per_second:
            # unrounded: a short run's seconds rounded to 2 decimals would skew samples / seconds by percents
            results["train_seconds"] = speed.train_seconds
            results["train_samples_per_second"] = speed.samples_per_second
        if cfg.test_after_fit and isinstance(dm, TransformerDataModule) and dm.has_split("test"):
            metrics = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=True)
            results["test"] = {k: v for per_set in metrics for k, v in per_set.items()}  # one dict per named test set
        elif best:
            restore_weights(trainer, best)
        if cfg.export and isinstance(model, TransformerModule):
            state = full_state_dict(trainer, best or None)  # every process: FSDP gathers its shards here
            if trainer.is_global_zero:
                export = model.export(self.run_dir / "export", state_dict=state)
                results["export"] = str(export)
                self._model_card(export, results, speed)
                if cfg.get("push_to_hub"):
                    results["hub"] = push_to_hub(export, cfg.push_to_hub)
        if trainer.is_global_zero:
            self._finish(results)

    def _summarise_best(self, monitor: str, score: float, path: str) -> None:
        """The W&B run summary holds the best score and its epoch (the dashboard's runs table shows them)."""
        import re

        match = re.search(r"epoch(\d+)", Path(path).name) if path else None
        for logger in self.trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and self.trainer.is_global_zero:
                try:
                    logger.experiment.summary[f"best/{monitor}"] = score
                    if match:
                        logger.experiment.summary["best/epoch"] = int(match.group(1))
                except Exception as e:  # noqa: BLE001 - the summary is a convenience; the run is done
                    from lightning.pytorch.utilities import rank_zero_warn

                    rank_zero_warn(f"W&B summary not written ({type(e).__name__}: {first_line(e)})")

    def _model_card(self, export: Path, results: dict[str, Any], speed: Optional[RunMetadata]) -> None:
        """The export's README.md in the Hugging Face model-card format (metadata, results, hyper-parameters,
        per-epoch validation, versions, the command); a card that cannot be written is a warning, not a failure."""
        model, dm, cfg = self.model, self.datamodule, self.config["fit"]
        tag = model.hub_pipeline_tag()
        if tag is None:
            return
        monitor = self.trainer.checkpoint_callback.monitor if self.trainer.checkpoint_callback else None
        history = speed.validation_history if speed is not None else []
        best = None
        if monitor and monitor in results and history:
            better = max if getattr(self.trainer.checkpoint_callback, "mode", "min") == "max" else min
            row = better((r for r in history if monitor in r), key=lambda r: r[monitor], default=None)
            best = (monitor, results[monitor], row["epoch"]) if row else None
        datasets = [str(p) for p in (getattr(dm, "files", {}) or {}).values() if p] or \
            [getattr(dm, "dataset_name", None) or "unknown"]
        hp = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and v is not None}
        hp.update({f"data.{k}": v for k, v in dict(getattr(dm, "hparams", {})).items()
                   if v is not None and not k.endswith("_file")})
        hp.update({f"trainer.{k}": cfg.trainer.get(k) for k in ("max_epochs", "max_steps", "precision",
                                                                 "accumulate_grad_batches", "gradient_clip_val")
                   if cfg.trainer.get(k) not in (None, -1)})
        hp["seed"] = self.config["fit"].get("seed_everything")
        try:
            from importlib.metadata import version

            info = json.loads((self.run_dir / "run_info.json").read_text()) if (self.run_dir / "run_info.json").is_file() \
                else {}
            config_yaml = (self.run_dir / "config.yaml").read_text() if (self.run_dir / "config.yaml").is_file() else None
            versions = {**(info.get("versions") or {}), "huggingface_hub": version("huggingface_hub")}
            write_model_card(export, pipeline_tag=tag, base_model=model.model_name_or_path, datasets=datasets,
                             dataset_config=getattr(dm, "dataset_config_name", None),
                             metrics=results.get("test") or {}, best_validation=best, hyperparameters=hp,
                             validation_history=history, versions=versions,
                             command=info.get("command") or [sys.executable, *sys.argv],
                             peft_method=peft_type(model.peft_config) if model.peft_config is not None else None,
                             git_commit=(info.get("git") or {}).get("commit"), config_yaml=config_yaml)
        except Exception as e:  # noqa: BLE001 - the export is done; a card problem must not fail the run
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"model card not written ({type(e).__name__}: {first_line(e)})")

    def after_validate(self) -> None:
        self._finish({"validate": self._metrics()})

    def after_test(self) -> None:
        self._finish({"test": self._metrics()})

    def after_predict(self) -> None:
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionsWriter)), None)
        files = [str(p) for p in (writer.written if writer is not None else []) if p.suffix == ".jsonl"]
        self._finish({"predictions": files[0] if len(files) == 1 else files or None})

    def _metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def _finish(self, results: dict[str, Any]) -> None:
        """Write results.json and print where everything went."""
        if not self.trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        finish_wandb()  # W&B writes its last files now, so that the summary below is the last thing printed
        wandb_dirs = sorted((self.wandb_dir / "wandb").glob("*run-*")) if self.wandb_mode else []
        wandb_dir = wandb_dirs[-1] if wandb_dirs else None  # a resumed run adds one folder per launch
        results = {"run_dir": str(self.run_dir), "wandb_run": str(wandb_dir) if wandb_dir else None, **results}
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        lines = [f"Run directory:   {_shown(self.run_dir)}"]
        if wandb_dir is not None:
            sync = ""
            if self.wandb_mode == "offline":  # every launch of a resumed run has its own offline folder
                sync = f" (offline; upload later with: wandb sync {' '.join(_shown(d) for d in wandb_dirs)})"
            lines.append(f"W&B run:         {_shown(wandb_dir)}{sync}")
        if results.get("best_checkpoint"):
            lines.append(f"Best checkpoint: {_shown(results['best_checkpoint'])}")
        if results.get("export"):
            lines.append(f"Export:          {_shown(results['export'])}  (transformers.pipeline(task, model=this folder); "
                         "model card: README.md)")
        if results.get("hub"):
            lines.append(f"Hub:             {results['hub']}")
        if results.get("predictions"):
            shown = results["predictions"] if isinstance(results["predictions"], list) else [results["predictions"]]
            lines.append(f"Predictions:     {', '.join(_shown(p) for p in shown)}")
        for stage in ("validate", "test"):
            if results.get(stage):
                shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[stage].items()) if "/" in k)
                lines.append(f"{stage.capitalize()} metrics: {shown}")
        print("\n".join(lines), flush=True)


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is valid YAML, or one line names the file (and line) that is not."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            if ":" in path or "{" in path:  # jsonargparse also takes the YAML itself as the value
                continue
            raise ConfigError(f"--config {path}: {'is a directory' if p.is_dir() else 'no such file'}")
        try:
            yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(e, "problem", None) or first_line(e)
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a config file?") from None


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with ``--ckpt_path last``."""
    import shlex

    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join(["python", "train.py", *args, "--ckpt_path", "last"])


def _shown(path: Path | str) -> str:
    """A path relative to the working directory when it lies below it (as the user typed the other paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_dir() -> Optional[Path]:
    return Path(os.environ["TUNEFORGE_RUN_DIR"]) if os.environ.get("TUNEFORGE_RUN_DIR") else None


def _verbose_flag(argv: list[str]) -> bool:
    """``--verbose_output`` / ``--verbose_output true`` / ``--verbose_output=true`` on the command line (read before the
    parser runs: the noise it controls starts at import time). (``--verbose`` is LightningCLI's own, for validate /
    test: it prints the metrics table.)"""
    for i, arg in enumerate(argv):
        if arg == "--verbose_output":
            return i + 1 >= len(argv) or argv[i + 1].lower() not in ("false", "0", "no")
        if arg.startswith("--verbose_output="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    return os.environ.get("TUNEFORGE_VERBOSE", "").lower() in ("1", "true", "yes")


def _sigint(signum: int, frame: Any) -> None:
    """Ctrl-C outside training (which Preemption handles): remembered, so the exit code says so, then the usual
    KeyboardInterrupt."""
    global _SIGINT_SEEN
    _SIGINT_SEEN = True
    raise KeyboardInterrupt


_SIGINT_SEEN = False


def main(args: Optional[list[str]] = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2; Ctrl-C exits 130."""
    global _SIGINT_SEEN
    import signal

    if os.environ.get("LOCAL_RANK") is None:  # a fresh launch, not a DDP worker of this run
        os.environ.pop("TUNEFORGE_RUN_DIR", None)
    argv = [str(a) for a in args] if args is not None else sys.argv[1:]
    _SIGINT_SEEN = Preemption.ctrl_c = False
    configure_terminal(_verbose_flag(argv))
    previous = signal.getsignal(signal.SIGINT)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _sigint)
        except ValueError:  # not the main thread
            pass
    try:
        TuneforgeCLI(args=args)
    except Stopped as e:  # SIGINT / SIGTERM / SIGUSR1 during training: last.ckpt was saved after the running batch
        name = signal.Signals(e.signum).name if e.signum is not None else "a signal on another process"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            sys.stderr.write(f"Stopped by {name} at step {e.step}. Saved {_shown(e.checkpoint)}\n"
                             f"Run directory:   {_shown(_run_dir() or '')}\n"
                             f"Continue with:   {resume_command(argv)}\n")
        return 128 + signal.SIGINT if e.signum == signal.SIGINT else 0
    except SIGTERMException:
        sys.stderr.write(f"Stopped by a signal; continue with: {resume_command(argv)}\n")
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted (Ctrl-C)\n")
        remove_unfinished_run(_run_dir())
        return 130
    except SystemExit as e:
        if not (_SIGINT_SEEN or Preemption.ctrl_c) or e.code in (0, None):  # Lightning ends a Ctrl-C with exit 1
            raise
        sys.stderr.write(f"Interrupted (Ctrl-C); the checkpoints written so far are kept in {_shown(_run_dir() or '')}\n")
        remove_unfinished_run(_run_dir())
        return 130
    except NonFiniteLossError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except PreparationInterrupted as e:  # SIGINT / SIGTERM before training: nothing worth keeping was written
        sys.stderr.write(f"error: {e}\n")
        remove_unfinished_run(Path(os.environ["TUNEFORGE_RUN_DIR"]) if os.environ.get("TUNEFORGE_RUN_DIR") else None)
        return 128 + e.signum
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise
        sys.stderr.write(f"error: {user_error}\n")
        remove_unfinished_run(Path(os.environ["TUNEFORGE_RUN_DIR"]) if os.environ.get("TUNEFORGE_RUN_DIR") else None)
        return 2
    finally:
        finish_wandb()
        try:
            signal.signal(signal.SIGINT, previous)
        except (ValueError, TypeError):
            pass
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


if __name__ == "__main__":
    sys.exit(main())
