"""The ``unimodality`` command: a LightningCLI whose classes come from the plugin registry."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from unimodality import registry
from unimodality.datamodule import DataModule
from unimodality.outputs import EmbeddingWriter
from unimodality.setup import Setup

EVALUATION = ("validate", "test", "predict")
_RESOLUTION_ERRORS = ("import path", "subclass of", "Problem with given class_path")

DESCRIPTION = """\
Multimodal contrastive learning for biology.

  unimodality fit --config configs/clip.yaml                 train (on the bundled example data)
  unimodality validate --ckpt_path RUN/checkpoints/best.ckpt evaluate a checkpoint on its own data
  unimodality predict --ckpt_path CKPT --data.path FILE      embed a new .h5ad or table
  unimodality plugins                                        list the registered plugins
  unimodality example-data --out DIR                         write the example data files
"""


class UnimodalityArgumentParser(LightningArgumentParser):
    """Adds the registered plugin names (and the closest match) to class-resolution errors."""

    def error(self, message: str, ex: Exception | None = None):
        if "Registered plugins" not in message and any(m in message for m in _RESOLUTION_ERRORS):
            names = _unresolved_names(message)
            message = f"{message}\n\n{registry.unknown_name_hint(names[0] if names else '')}"
        return super().error(message, ex)


def _unresolved_names(message: str) -> list[str]:
    """The class names jsonargparse failed to resolve, as its message quotes them."""
    patterns = (r"import path string: ([\w.]+)", r"val='([\w.]+)'", r"Given value: ([\w.]+)\s*$")
    found = [m.group(1) for p in patterns for m in re.finditer(p, message, flags=re.MULTILINE)]
    return list(dict.fromkeys(found))


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into the run directory when training (not for evaluation runs)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class UnimodalityCLI(LightningCLI):
    """LightningCLI with unimodality's defaults: a run directory with CSV logs, best and last checkpoints,
    the resolved config, and models and data read back from a checkpoint for validate/test/predict."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "unimodality"},
                },
                # two checkpoints: the best on val/loss, and the latest epoch. (Lightning's save_last only
                # rewrites last.ckpt when a new best is saved, so it is not the last epoch's weights.)
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"filename": "best", "monitor": "val/loss", "mode": "min"},
                    },
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"filename": "last", "monitor": None, "enable_version_counter": False},
                    },
                ],
            }
        )

    def _parse_ckpt_path(self) -> None:
        # the model (and data) config was read from the checkpoint *before* parsing (see main), so that
        # options given on the command line win over it; Lightning's own merge would overwrite them
        return

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "predict":
            kwargs.setdefault("logger", False)  # embedding writes files, not metrics: no empty run folder
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "predict":
            trainer.callbacks.append(EmbeddingWriter())
        if trainer.fast_dev_run:  # a smoke test: leave no checkpoint behind (Lightning would save last.ckpt)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
        return trainer

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank takes part
        if not self.trainer.is_global_zero or log_dir is None:  # no logger, e.g. fast_dev_run
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


def checkpoint_arguments(args: list[str]) -> list[str]:
    """For validate/test/predict with ``--ckpt_path``, prepend the model (and data) config it records.

    Put first, they are defaults: a later ``--config`` or ``--model.*``/``--data.*`` option overrides them.
    Predict defaults to :class:`EmbedDataModule`, which reads a new file the way the model was trained.
    """
    if not args or args[0] not in EVALUATION:
        return args
    ckpt_path = _option(args, "--ckpt_path")
    injected: list[str] = []
    if ckpt_path and Path(ckpt_path).is_file():
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = _as_config(checkpoint.get("hyper_parameters"))
        if model:
            injected.append(f"--model={json.dumps(model)}")
        data = _as_config(checkpoint.get("datamodule_hyper_parameters"))
        if data and args[0] != "predict":
            injected.append(f"--data={json.dumps(data)}")
    if args[0] == "predict":
        injected.append("--data=EmbedDataModule")
    return [args[0], *injected, *args[1:]]


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``unimodality`` command."""
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    registry.load_plugins()
    if args[:1] == ["plugins"]:
        return _print_plugins()
    if args[:1] == ["example-data"]:
        return _example_data(args[1:])
    if from_command_line:
        # rewritten in place: DDP launches its worker processes with this same command line
        sys.argv[1:] = checkpoint_arguments(args)
    UnimodalityCLI(
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
    )
    # leave no process group for interpreter shutdown: gloo's threads can then abort the process
    # ("terminate called without an active exception") after a successful distributed run
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _raw_formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


if __name__ == "__main__":
    main()
