"""What the command prints: Lightning's chatter kept out unless ``--verbose``, and a progress display that
suits where the output goes (tqdm bars on a terminal, one line per epoch in a log file)."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

#: Lightning's info lines that say nothing about this run: advertising, and accelerators that are absent
_CHATTER = re.compile(r"^(💡 Tip:|(GPU|TPU|HPU) available: False|`Trainer\.fit` stopped: `max_(epochs|steps)=)")
#: deprecation warnings raised inside Lightning/torch by the versions we pin, not by anything the user does, and
#: Lightning's hint to use srun wherever Slurm is installed (a run outside a job is meant to be one; slurm/*.sh
#: use srun)
_LIBRARY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                     r"The `srun` command is available on your system but is not used")
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _Chatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _CHATTER.match(str(record.getMessage()))


_FILTER = _Chatter()


#: for validate/test/predict: the callbacks of the fit that saved the checkpoint do not matter there
_EVALUATION_WARNINGS = (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",)


def quiet(verbose: bool = False, evaluation: bool = False) -> None:
    """Drop Lightning's advertising and absent-accelerator lines and known library deprecation warnings
    (and, when ``evaluation``, the warning that the fit's callbacks are absent); ``verbose`` keeps them all."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_FILTER)
        elif _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for message in _LIBRARY_WARNINGS + (_EVALUATION_WARNINGS if evaluation else ()):
        warnings.filterwarnings("default" if verbose else "ignore", message=message)


def on_terminal() -> bool:
    """Whether progress goes to a terminal (Lightning's bars write to stderr)."""
    return sys.stderr.isatty()


class EpochLines(ProgressBar):
    """Progress for a log file: one line per training epoch with its metrics (tqdm's bars would write
    hundreds of KB of carriage returns there), nothing per batch."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = 0.0

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(f"{key}={_number(value)}" for key, value in metrics.items() if key != "v_num")
        total = f" of {trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        # numbered from 0, as Lightning's bars, checkpoints and metrics.csv do
        print(f"Epoch {trainer.current_epoch}{total} ({time.monotonic() - self._started:.1f}s): {shown}",
              file=sys.stderr, flush=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
