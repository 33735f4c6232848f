"""The ``unimodality`` command: a LightningCLI whose classes come from the plugin registry."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from unimodality import console, registry, resume, run_lock, selection, summary, trust
from unimodality.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint
from unimodality.datamodule import DataModule
from unimodality.errors import DataError
from unimodality.outputs import EmbeddingWriter, ResultsWriter
from unimodality.parser import PLUGINS_ON_DEMAND, UnimodalityArgumentParser, compose_configs, plugins_on_demand
from unimodality.paths import same_file
from unimodality.plots import PlotCallback
from unimodality.setup import NonFiniteLossError, Setup

EVALUATION = ("validate", "test", "predict")
#: Lightning's names of the checkpoints it finds itself
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")
#: the exit status of a process ended by SIGTERM (128 + 15)
SIGTERM_STATUS = 143

DESCRIPTION = """\
Multimodal contrastive learning for biology.

  unimodality fit --config configs/clip.yaml                 train (on the bundled example data)
  unimodality validate --ckpt_path RUN/checkpoints/best.ckpt evaluate a checkpoint on its own data
  unimodality test --ckpt_path RUN/checkpoints/best.ckpt     score it on the test split (results table)
  unimodality predict --ckpt_path CKPT --data.path FILE      embed a new .h5ad or table
  unimodality evaluate --config configs/evaluate/lincs.yaml  score embeddings against baselines
  unimodality sweep configs/sweeps/clip_grid.yaml            train a grid of overrides, one run each
  unimodality compare runs/clip_grid                         tabulate runs' metrics and differing options
  unimodality plugins                                        list the registered plugins
  unimodality example-data --out DIR                         write the example data files

Commands: fit, validate, test, predict (options below), evaluate, sweep, compare, plugins, example-data; each
takes --help.
"""


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into the run directory when training (not for evaluation runs)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.log_dir is None and trainer.loggers:  # e.g. MLFlowLogger alone, to a server
            print(f"unimodality fit: no config.yaml written: the first logger ({type(trainer.loggers[0]).__name__}) "
                  "has no local directory; put a CSVLogger first (docs/tracking.md)", file=sys.stderr, flush=True)
        elif stage == "fit":
            super().setup(trainer, pl_module, stage)


class UnimodalityCLI(LightningCLI):
    """LightningCLI with unimodality's defaults: a run directory with CSV logs, best and last checkpoints,
    the resolved config, and models and data read back from a checkpoint for validate/test/predict."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        given = list(given) if isinstance(given, list | tuple) else []
        #: the subcommand a command line starts with: the only one whose options are built (None: all are; "":
        #: none, for the command's own --help, which shows the subcommands' names and descriptions only)
        self._only_subcommand = given[0] if given and given[0] in self.subcommands() else (
            "" if given and all(arg in ("-h", "--help") for arg in given) else None)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "unimodality"},
                },
            }
        )
        parser.add_argument(
            "--trust_checkpoint", type=bool, default=False,
            help="Read checkpoints with weights_only=False: any pickled object in them is loaded, which can run "
            "code. Only for checkpoints of a known origin; unimodality warns when it does so.",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        if self._only_subcommand not in (None, subcommand):
            # never parsed: only its name and description appear (in the command's --help), and building its
            # options (the trainer's, the model's and the data's, from their signatures and docstrings) is
            # most of what an option error costs beyond importing torch and Lightning
            self._subcommand_method_arguments[subcommand] = []
            return self.init_parser(**kwargs)
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("fit", "predict"):  # validate/test have Lightning's --verbose (the results table)
            parser.add_argument(
                "--verbose", type=bool, default=False,
                help="Show Lightning's messages too (its tips, the accelerators it did not find, library "
                "warnings); or set UNIMODALITY_VERBOSE=1 for any command.",
            )
        if subcommand == "fit":
            # best.ckpt and last.ckpt are added by instantiate_trainer, not listed in trainer.callbacks: a config
            # that sets trainer.callbacks (or --trainer.callbacks) then cannot drop last.ckpt by accident
            parser.add_argument(
                "--checkpoint.monitor", type=str | None, default=selection.AUTO,
                help="The validation metric best.ckpt is chosen by: auto (val/pert/mrr for cross-modal setups, "
                "the smallest-k val/recall@k for single-modality ones, else val/loss), any logged val/... name, "
                "or none for no best.ckpt. checkpoints/last.ckpt (the last epoch) is always kept.",
            )
            parser.add_argument(
                "--checkpoint.mode", type=typing.Literal["min", "max"] | None, default=None,
                help="Whether best is the lowest (min) or highest (max) value; by default min for a loss, max "
                "for anything else.",
            )
        else:
            # evaluating a checkpoint writes next to it, or where --trainer.logger says: no runs/unimodality/
            # version_<n> folder in the working directory, and no checkpoint callback (Lightning's default one
            # would restore the fit's state and warn that its dirpath changed)
            parser.set_defaults({"trainer.logger": False, "trainer.enable_checkpointing": False})
        return parser

    def _set_seed(self) -> None:
        if self.subcommand in EVALUATION and self._get(self.config, "seed_everything") is True:
            return  # no seed was asked for; evaluation draws its augmentations from fixed seeds anyway
        super()._set_seed()

    def _dump_config(self) -> None:
        # Lightning dumps the parsed config to give the model and datamodule their hyperparameters; its dump
        # validates the config again (0.3 s per command, a fifth of predict's fixed cost): it was validated by
        # the parse and nothing has changed it since
        if not hasattr(self, "config_dump"):
            dumped = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml",
                                      skip_validation=True)
            self.config_dump = yaml.safe_load(dumped)
            if "subcommand" in self.config:
                self.config_dump = self.config_dump[self.config.subcommand]

    def _parse_ckpt_path(self) -> None:
        # the model (and data) config was read from the checkpoint *before* parsing (see main), so that
        # options given on the command line win over it; Lightning's own merge would overwrite them
        return

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        verbose = self.subcommand in ("fit", "predict") and bool(self.config[self.subcommand].get("verbose"))
        console.quiet(verbose or bool(os.environ.get("UNIMODALITY_VERBOSE")), self.subcommand in EVALUATION)
        # before anything is imported or called: a config names plugins and the expected interfaces only
        trust.check_config(self.config.get(self.subcommand), "the config (--config files and options)")
        _check_strategy_available(self._get(self.config, "trainer", default={}), self.subcommand)
        if self.subcommand == "fit":
            _check_training_length(self._get(self.config, "trainer", default={}))
        version = resume.slurm_version()
        if self.subcommand == "fit" and version:
            # a requeued job starts again with the same job id: name the run directory after it, so the new
            # job finds (and resumes from) the checkpoints of the one it replaces
            for logger in _logger_configs(self._get(self.config, "trainer.logger")):
                if "version" in logger.init_args and logger.init_args.version is None:
                    logger.init_args.version = version

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "predict":
            kwargs.setdefault("logger", False)  # embedding writes files, not metrics: no empty run folder
        self.run_dir = self._fixed_run_dir() if self.subcommand == "fit" else None
        if self.run_dir is not None and resume.slurm_job_id():
            # Lightning saves its SIGUSR1 checkpoint (hpc_ckpt_<n>.ckpt) into default_root_dir and looks for
            # one there on restart; by default that is the job's working directory, shared by every job
            # started from it. The run directory is this run's own.
            kwargs["default_root_dir"] = str(self.run_dir)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # e.g. --trainer.accelerator gpu without a GPU
            _exit_with_error(self.subcommand, str(error))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default (not DeepSpeed's)
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a killed run leaves no truncated checkpoint
        if self.subcommand == "predict":
            trainer.callbacks.append(EmbeddingWriter())
        if self.subcommand in ("validate", "test"):
            trainer.callbacks.append(ResultsWriter(stage="val" if self.subcommand == "validate" else "test"))
        if self.subcommand == "fit":
            trainer.callbacks.append(resume.SigtermCheckpoint())  # a killed run saves where it was, exits 143
            trainer.callbacks.append(summary.ValidationHistory())
        if self.subcommand in ("fit", "test"):
            trainer.callbacks.append(PlotCallback())  # PNGs in <run dir>/plots (skipped without matplotlib)
        if self.run_dir is not None and resume.slurm_job_id():
            _add_slurm_requeue(trainer)
        if trainer.fast_dev_run:  # a smoke test: leave no checkpoint behind (Lightning would save last.ckpt)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        if self.subcommand == "fit" and config.get("enable_checkpointing") is not False:
            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            options = self.config[self.subcommand].get("checkpoint") or {}
            callbacks = [*callbacks, *selection.fit_checkpoints(
                options.get("monitor", selection.AUTO), options.get("mode"), [*given, *callbacks])]
        if config.get("enable_progress_bar") is not False and not console.on_terminal():
            callbacks = [*callbacks, console.EpochLines()]  # a log file: a line per epoch, no carriage returns
        if self.subcommand == "fit":
            callbacks = [*callbacks, selection.ValidationSwitch()]
        return super()._instantiate_trainer(config, callbacks)

    def _fixed_run_dir(self) -> Path | None:
        """The run directory when it is known before training, i.e. the logger's version is fixed (given, or
        ``slurm-<job id>``); ``None`` for an auto-incremented ``version_<n>`` (always a new directory)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("fast_dev_run"):
            return None
        loggers = trainer_config.get("logger")
        first = next((x for x in (loggers if isinstance(loggers, list) else [loggers]) if isinstance(x, Logger)), None)
        if first is None or getattr(first, "_version", None) is None or first.log_dir is None:
            return None
        return Path(first.log_dir)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        trusted = bool(self.config[subcommand].get("trust_checkpoint"))
        if kwargs.get("weights_only") is False and not trusted:
            raise CheckpointError(
                "--weights_only false unpickles any object a checkpoint holds, which can run code: it is refused "
                "unless you also pass --trust_checkpoint true (for checkpoints of a known origin)"
            )
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            # Lightning's own read of --ckpt_path (after ours) is tensors-only too, unless trusted: unset, it
            # would unpickle the file in full (and say so)
            kwargs["weights_only"] = not trusted
        return kwargs

    def _lock_run_directory(self) -> tuple[Path, Path] | None:
        """Hold the run directory for this fit (one process per run directory); an automatically numbered
        version is claimed first, so two runs started together get two directories. Returns what this fit
        created (the run directory, or the outermost folder made for it) and the run directory, to remove
        again if the fit fails before saving a checkpoint; ``None`` when it created nothing."""
        logger = self.trainer.logger
        if rank_zero_only.rank != 0 or self.trainer.fast_dev_run or logger is None or logger.log_dir is None:
            return None
        created = _first_missing(Path(logger.log_dir))
        if getattr(logger, "_version", "") is None and hasattr(logger, "_get_next_version"):
            above = _first_missing(Path(logger.root_dir))
            for _ in range(1000):
                name = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                if run_lock.claim_new_directory(Path(logger.root_dir), name):
                    created = above or (Path(logger.root_dir) / name).absolute()
                    break
                logger._version = None  # taken by a run started at the same moment: the next number
        self._locked = run_lock.lock_run_directory(
            logger.log_dir, hint=", or give this one another directory (--trainer.logger.init_args.version)"
        )
        return (created, Path(logger.log_dir)) if created is not None else None

    def fit(self, model: LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any):
        self._locked: Path | None = None
        created = self._lock_run_directory()
        try:
            self._fit(model, datamodule, ckpt_path, **kwargs)
        except Exception:
            if created is not None:
                run_lock.remove_failed_run(*created)  # a fit that failed (bad data...) leaves no empty run behind
            raise
        finally:
            if self._locked is not None:
                run_lock.release_run_directory(self._locked)

    def _fit(self, model: LightningModule, datamodule: Any, ckpt_path: str | None, **kwargs: Any) -> None:
        # a run directory that already holds a checkpoint (a requeued Slurm job, or a run started again with
        # the same --trainer.logger.init_args.version) is continued, not overwritten; --ckpt_path overrides
        if ckpt_path is None and self.run_dir is not None:
            found = resume.newest_checkpoint(self.run_dir)
            if found is not None:
                ckpt_path = str(found)
                if rank_zero_only.rank == 0:
                    progress = resume.checkpoint_progress(found)
                    resume.keep_csv_metrics(self.trainer.logger, progress["logged_step"] if progress else None)
                    where = f" (epoch {progress['epoch']}, global step {progress['global_step']})" if progress else ""
                    print(
                        f"Resuming run {self.run_dir} from its newest checkpoint {found}{where}; pass "
                        "--ckpt_path to choose another one",
                        flush=True,
                    )
        if ckpt_path and ckpt_path not in NAMED_CHECKPOINTS and Path(ckpt_path).is_file():
            # the one safe reader: truncated, pickled or untrusted files get a clear error before Lightning reads
            read_checkpoint(ckpt_path, trust=kwargs.get("weights_only") is False)
        try:
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        except SIGTERMException as stop:
            if isinstance(stop, resume.Requeued):
                raise
            saved = next((c.saved for c in self.trainer.callbacks if isinstance(c, resume.SigtermCheckpoint)), None)
            where = f"saved {saved}; fit again in this run directory or with --ckpt_path to resume" if saved else (
                "no checkpoint was saved at the signal (the last epoch's checkpoints/last.ckpt remains)")
            print(f"unimodality fit: stopped by SIGTERM: {where}", file=sys.stderr, flush=True)
            raise SystemExit(SIGTERM_STATUS) from None

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank takes part
        if not self.trainer.is_global_zero:
            return
        history = next((c for c in self.trainer.callbacks if isinstance(c, summary.ValidationHistory)), None)
        best = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, selection.BestCheckpoint)), None)
        lines = summary.fit_summary(history, best, selection.validates(self.trainer)) if history else []
        if lines:
            print("\nValidation summary:\n" + "\n".join(lines), flush=True)
        if log_dir is None:  # no logger, e.g. fast_dev_run
            return
        lines = [f"\nRun directory: {log_dir}"]
        for checkpoint in self.trainer.checkpoint_callbacks:
            if checkpoint.best_model_path:
                what = f"best on {checkpoint.monitor}" if checkpoint.monitor else "latest"
                lines.append(f"  {what} checkpoint: {checkpoint.best_model_path}")
        print("\n".join(lines), flush=True)

    def predict(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> None:
        kwargs["return_predictions"] = False  # the EmbeddingWriter writes them; don't hold them twice
        self.trainer.predict(model, datamodule=datamodule, **kwargs)
        written = getattr(datamodule, "written", None)
        if written is not None and self.trainer.is_global_zero:
            print(f"\nEmbeddings written to {written}", flush=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating ``path`` creates)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _logger_configs(config: Any) -> list[Any]:
    """The ``class_path``/``init_args`` configs among ``trainer.logger`` (a config, a list, or a bool)."""
    configs = config if isinstance(config, list) else [config]
    return [c for c in configs if hasattr(c, "class_path") and getattr(c, "init_args", None) is not None]


def _add_slurm_requeue(trainer: Trainer) -> None:
    """Checkpoint-and-requeue on Slurm's signal with every process in step (see ``resume.SlurmRequeue``),
    unless the config turned Lightning's auto-requeue off (``SLURMEnvironment(auto_requeue=false)``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    environment = environment or getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and not environment.auto_requeue:
        return
    signum = getattr(environment, "requeue_signal", None) or signal.SIGUSR1
    trainer.callbacks.append(resume.SlurmRequeue(resume.slurm_job_id(), signum=signum))


def _check_strategy_available(trainer_config: Any, subcommand: str) -> None:
    """Fail with one clear paragraph, before anything is built, when the strategy cannot run here (today:
    DeepSpeed without CUDA or the deepspeed package; Lightning would fail deep in instantiation)."""
    strategy = trainer_config.get("strategy") if trainer_config else None
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or ""
    if "deepspeed" not in name.lower():
        return
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible here)")
    if importlib.util.find_spec("deepspeed") is None:
        missing.append('the deepspeed package (pip install "unimodality[deepspeed]", on a machine with CUDA)')
    if missing:
        _exit_with_error(
            subcommand,
            f"the DeepSpeed strategy ({name}, e.g. from configs/trainer/deepspeed.yaml) needs "
            f"{' and '.join(missing)}. Without them, train with DDP instead: --config configs/trainer/ddp.yaml "
            "(on CPU add --trainer.accelerator cpu --trainer.devices N), or drop the DeepSpeed config. To use "
            "a DeepSpeed checkpoint elsewhere, see docs/clusters.md (consolidating it into one file).",
        )


def _check_training_length(trainer_config: Any) -> None:
    """``max_epochs 0`` (or ``max_steps 0``) would end at once with no checkpoint, reported as a success."""
    for option in ("max_epochs", "max_steps"):
        if trainer_config.get(option) == 0:
            raise ValueError(f"--trainer.{option} 0 trains nothing (no checkpoint would be written); give at least 1 "
                             "(or -1 for no limit)")


def _exit_with_error(subcommand: str | None, message: str, status: int = 2):
    """One paragraph on stderr, then exit: status 2 for a configuration error (as for a command-line
    error), 1 for a problem found while running (data, checkpoint, divergence)."""
    command = f"unimodality {subcommand}" if subcommand else "unimodality"
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None


def checkpoint_arguments(args: list[str]) -> list[str]:
    """For validate/test/predict with ``--ckpt_path``, prepend the model (and data) config it records.

    Put first, they are defaults: a later ``--config`` or ``--model.*``/``--data.*`` option overrides them.
    Predict defaults to `EmbedDataModule`, which reads a new file the way the model was trained.
    """
    if not args or args[0] not in EVALUATION:
        return args
    ckpt_path = _option(args, "--ckpt_path")
    if ckpt_path and resume.is_deepspeed_checkpoint(ckpt_path):
        # a directory of ZeRO shards: consolidate it into one fp32 checkpoint file, and use that
        try:
            consolidated = str(resume.consolidated_checkpoint(ckpt_path))
        except resume.DeepSpeedMissing as error:
            _exit_with_error(args[0], str(error))
        args = _replace_option(args, "--ckpt_path", consolidated)
        ckpt_path = consolidated
    injected: list[str] = []
    trusted = (_option(args, "--trust_checkpoint") or "false").lower() in ("true", "1", "yes")
    if ckpt_path and ckpt_path not in NAMED_CHECKPOINTS:
        # missing, corrupt, newer, pickled or untrusted files end here, clearly, before anything is imported
        checkpoint = read_checkpoint(ckpt_path, trust=trusted)
        _check_model_option(args, checkpoint, ckpt_path)
        model = _as_config(trust.upgrade_class_paths(checkpoint.get("hyper_parameters")))
        if model:
            injected.append(f"--model={json.dumps(model)}")
        data = _as_config(trust.upgrade_class_paths(checkpoint.get("datamodule_hyper_parameters")))
        if data and args[0] != "predict":
            injected.append(f"--data={json.dumps(data)}")
    if args[0] == "predict":
        output = _option(args, "--data.output")
        if output and ckpt_path and same_file(output, ckpt_path):
            raise DataError(f"--data.output {output} is the checkpoint being read: choose another output")
        injected.append("--data=EmbedDataModule")
    return [args[0], *injected, *args[1:]]


def nested_help_arguments(args: list[str]) -> list[str]:
    """``fit --model.encoders.help MLPEncoder`` (what ``--model.help`` suggests) names no setup class, which
    jsonargparse needs first: put the first registered setup (datamodule for ``--data.*``) that takes that
    parameter before it. Arguments that name the class already (``--model``, ``--config``) are left alone."""
    import inspect

    out = list(args)
    for i, arg in enumerate(args):
        match = re.match(r"--(model|data)\.(?:init_args\.)?(\w+)(?:\.[\w.]+)?\.help(=|$)", arg)
        if not match:
            continue
        root, parameter = match.group(1), match.group(2)
        before = args[:i]
        if any(a in ("--config", "-c", f"--{root}") or a.startswith(("--config=", f"--{root}=")) for a in before):
            continue
        group = "setups" if root == "model" else "datamodules"
        # the plainest name first (CrossModalSetup before its variants)
        for name, plugins in sorted(registry.registered(group).items(), key=lambda item: (len(item[0]), item[0])):
            if parameter in inspect.signature(plugins[0].cls.__init__).parameters:
                out.insert(out.index(arg), f"--{root}={name}")
                break
    return out


def _check_model_option(args: list[str], checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """``--model NAME`` naming a class other than the checkpoint's is refused before anything is built."""
    asked = _option(args, "--model")
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not asked or not saved or asked.lstrip().startswith(("{", "[")) or asked.endswith((".yaml", ".yml", ".json")):
        return
    if asked not in (saved, saved.rsplit(".", 1)[-1]):
        name = saved.rsplit(".", 1)[-1]
        raise CheckpointError(
            f"{ckpt_path}: holds a {name} ({saved}), not a {asked} (--model {asked}); drop --model to use the "
            "checkpoint's own class"
        )


def _check_config_files(args: list[str]) -> None:
    """Each ``--config`` file must be valid YAML naming only classes `unimodality.trust` accepts: say
    which file and where, before jsonargparse parses it."""
    import yaml

    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if value is None or len(value) > 4096 or value.lstrip().startswith(("{", "[")) or not Path(value).is_file():
            continue  # a config given as a YAML/JSON string (e.g. by unimodality.fit): checked once parsed
        try:
            config = yaml.safe_load(Path(value).read_text())
        except yaml.YAMLError as error:
            raise DataError(f"{value}: not valid YAML: {error}") from None
        trust.check_config(config, value)  # the classes it names, before jsonargparse imports or calls any


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _replace_option(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        if arg == name and i + 1 < len(out):
            out[i + 1] = value
        elif arg.startswith(name + "="):
            out[i] = f"{name}={value}"
    return out


def _as_config(hparams: dict[str, Any] | None) -> dict[str, Any] | None:
    if not hparams or "_class_path" not in hparams:
        return None
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return {"class_path": hparams["_class_path"], "init_args": init_args}


def _print_plugins() -> None:
    for group in registry.GROUPS:
        print(f"{group}:")
        for name, plugins in sorted(registry.registered(group).items()):
            for plugin in plugins:
                print(f"  {name:24s} {plugin.class_path}  ({plugin.dist or 'unknown package'})")


def _example_data(args: list[str]) -> None:
    import argparse

    from unimodality.example_data import data_dir, make_example_data

    parser = argparse.ArgumentParser(prog="unimodality example-data", description="Write the example data files.")
    parser.add_argument("--out", default=str(data_dir()), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    for path in make_example_data(options.out, seed=options.seed).values():
        print(path)


EVALUATE_DESCRIPTION = """\
Score embeddings the way the field does, each number next to its baselines (raw features, their PCA, a
random projection): known-relationship recall, copairs mAP (replicate retrieval, consistency) with
p-values, cross-modal retrieval, kNN and linear probes. See docs/evaluating.md.

  unimodality evaluate --config configs/evaluate/lincs.yaml
  unimodality evaluate --inputs cells.h5ad --embedding X_unimodality --labels cell_type --output runs/eval
  unimodality evaluate --inputs screen/ --embedding runs/x/checkpoints/best.ckpt --perturbation gene \\
      --batch plate --control non-targeting --evaluators '[KnownRelationshipRecall, ReplicateRetrievalMAP]'

A checkpoint --embedding is read as predict reads one: tensors and plain containers only, the classes it
names checked; --trust_checkpoint true (only for files of a known origin) unpickles anything else.
"""


def _evaluate(args: list[str]) -> None:
    """``unimodality evaluate``: the options of `unimodality.evaluation.evaluate`, from YAML or the
    command line; writes the report into ``--output`` and prints it."""
    from jsonargparse import ActionConfigFile

    from unimodality import evaluation

    _check_config_files(args)  # the classes a config names, before jsonargparse imports any
    parser = UnimodalityArgumentParser(prog="unimodality evaluate", description=EVALUATE_DESCRIPTION,
                                       formatter_class=_raw_formatter())
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_argument("--inputs", type=str | list[str], required=True,
                        help="the input file(s): .h5ad, parquet or CSV/TSV (gzipped too), or a folder of them; each "
                        "is one dataset")
    parser.add_argument("--output", type=str, default="runs/evaluate",
                        help="folder of the report: evaluation.csv/.json, details/, plots/")
    parser.add_argument("--weights_only", type=bool | None, default=None,
                        help="as for predict: false reads a checkpoint --embedding with "
                        "torch.load(weights_only=False), which can run code; refused unless --trust_checkpoint true")
    parser.add_function_arguments(evaluation.evaluate, skip={"data", "output"})
    config = parser.instantiate_classes(parser.parse_args(args))
    options = {key: value for key, value in vars(config).items()
               if key not in ("config", "inputs", "weights_only", "__path__")}
    # the trust model of predict (see UnimodalityCLI._prepare_subcommand_kwargs): unpickling needs consent
    if config.weights_only is False and not config.trust_checkpoint:
        raise CheckpointError(
            "--weights_only false unpickles any object a checkpoint holds, which can run code: it is refused "
            "unless you also pass --trust_checkpoint true (for checkpoints of a known origin)"
        )
    table = evaluation.evaluate(config.inputs, **options)
    print(evaluation.format_table(table))
    for note in table.attrs.get("notes", []):
        print(f"note: {note}")
    print(f"\nEvaluation written to {Path(config.output) / 'evaluation.csv'} (and .json, details/, plots/)", flush=True)


def main(args: list[str] | None = None, callbacks: list[Any] | None = None) -> None:
    """Entry point of the ``unimodality`` command.

    A user error (bad data, a bad checkpoint, an invalid setting, a diverged run) ends the command with one
    message and exit status 1; a traceback is kept for bugs, or shown for every error with
    ``UNIMODALITY_DEBUG=1``.

    Args:
        args: the command line after ``unimodality`` (default: ``sys.argv[1:]``).
        callbacks: Lightning callbacks (Python objects) to add to the trainer's, e.g. a sweep's pruning
            callback; they are not part of the run's ``config.yaml``.
    """
    subcommand = (args if args is not None else sys.argv[1:])[:1]
    try:
        _main(args, callbacks)
    except Exception as error:
        cause = _user_error_in(error)
        missing = _missing_extra(error)
        if os.environ.get("UNIMODALITY_DEBUG") or (cause is None and missing is None):
            raise
        _exit_with_error(subcommand[0] if subcommand else None, missing or str(cause), status=1)
    finally:
        # leave no process group for interpreter shutdown: gloo's threads can then abort the process
        # ("terminate called without an active exception") after a distributed run
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


#: optional packages a class of a config may need: the extra of unimodality that installs them
EXTRAS = {"tensorboard": "tensorboard", "tensorboardX": "tensorboard", "matplotlib": "plots", "ot": "ot",
          "deepspeed": "deepspeed", "rdkit": "molecules", "torch_geometric": "molecules"}


def _missing_extra(error: BaseException) -> str | None:
    """One line for a class that needs an optional package that is not installed (Lightning's
    ``TensorBoardLogger`` without tensorboard, say), naming the extra that installs it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ModuleNotFoundError):
            text = str(error)
            name = error.name or next((n for n in EXTRAS if f"`{n}`" in text or f"'{n}'" in text), None)
            if name in EXTRAS:
                return (f"this needs the {name} package, which is not installed: pip install "
                        f'"unimodality[{EXTRAS[name]}]" (or pip install {name})')
        error = error.__cause__ or error.__context__
    return None


def _user_error_in(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or one it was raised from (jsonargparse, for one, reports a
    class whose ``__init__`` refused a setting as "Does not validate against any of the Union subtypes")."""
    seen = set()
    while error is not None and id(error) not in seen:
        if is_user_error(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def is_user_error(error: BaseException) -> bool:
    """Whether an exception reports a problem with the user's input rather than a bug: unimodality's own
    data/checkpoint/divergence errors, a missing file, or a ``ValueError``/``TypeError`` that unimodality
    code raised on purpose (a check of a setting), as opposed to one from deep inside a library."""
    if isinstance(error, DataError | NonFiniteLossError | FileNotFoundError):
        return True
    if not isinstance(error, ValueError | TypeError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def _main(args: list[str] | None, callbacks: list[Any] | None = None) -> Any:
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    only_help = _only_help(args)
    if not only_help and not PLUGINS_ON_DEMAND:
        registry.load_plugins()  # else imported when jsonargparse first looks a class up (unimodality.parser)
    if args[:1] == ["plugins"]:
        return _print_plugins()
    if args[:1] == ["example-data"]:
        return _example_data(args[1:])
    if args[:1] == ["evaluate"]:
        return _evaluate(args[1:])
    if args[:1] == ["sweep"]:
        from unimodality import sweep

        return sweep.main(args[1:])
    if args[:1] == ["compare"]:
        from unimodality import compare

        return compare.main(args[1:])
    _check_config_files(args)
    if sum(arg in ("--config", "-c") or arg.startswith("--config=") for arg in args) > 1:
        args = compose_configs(args)
    if any(arg.endswith(".help") or ".help=" in arg for arg in args):
        args = nested_help_arguments(args)
    if from_command_line:
        # rewritten in place: DDP launches its worker processes with this same command line
        sys.argv[1:] = checkpoint_arguments(args)
    # help names no class: it need not import every plugin (and what they import)
    with plugins_on_demand(not only_help):
        return UnimodalityCLI(  # the CLI object: unimodality.api.fit reads its trainer
            Setup,
            DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=UnimodalityArgumentParser,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"description": DESCRIPTION, "formatter_class": _raw_formatter()},
            args=None if from_command_line else checkpoint_arguments(args),
            # Python objects (e.g. a sweep's pruning callback) beside the config's callbacks, not in config.yaml
            trainer_defaults={"callbacks": callbacks} if callbacks else None,
        )


def _only_help(args: list[str]) -> bool:
    """Whether the command line asks for the help of a command and nothing else (``--help``, ``fit -h``)."""
    return bool(args) and args[-1] in ("-h", "--help") and all(
        a in ("-h", "--help", "fit", "validate", "test", "predict") for a in args)


def _raw_formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


if __name__ == "__main__":
    main()
