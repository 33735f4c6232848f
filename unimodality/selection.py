"""Which checkpoints a fit keeps: ``best.ckpt`` by a selection metric, and ``last.ckpt`` always.

A contrastive loss on a small validation set is a poor selector (on held-out real data ``val/loss`` was lowest
at epoch 0-1 while retrieval kept improving), so by default ``best.ckpt`` is chosen on retrieval: the first of
`AUTO_MONITORS` the setup logs (``val/pert/mrr`` for cross-modal setups, ``val/recall@k`` for
single-modality ones), with ``val/loss`` as the last resort. A fit without a validation split keeps
``last.ckpt`` only.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

#: ``--checkpoint.monitor auto``: the first of these the setup logs after the first validation (mode beside it)
AUTO_MONITORS = (("val/pert/mrr", "max"), (re.compile(r"val/recall@(\d+)"), "max"), ("val/loss", "min"))
AUTO = "auto"


def default_mode(monitor: str) -> str:
    """``min`` for a loss, ``max`` for anything else (recall, MRR, mAP: higher is better)."""
    return "min" if monitor.rsplit("/", 1)[-1].endswith("loss") else "max"


def resolve_auto(names: list[str]) -> tuple[str, str] | None:
    """The metric ``auto`` selects on among the logged ``names`` (the smallest ``k`` of ``val/recall@k``)."""
    for candidate, mode in AUTO_MONITORS:
        if isinstance(candidate, str):
            if candidate in names:
                return candidate, mode
            continue
        matches = sorted((int(m.group(1)), name) for name in names if (m := candidate.fullmatch(name)))
        if matches:
            return matches[0][1], mode
    return None


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best.ckpt``: the epoch with the best value of ``monitor``.

    Args:
        monitor: a logged validation metric, or ``auto`` (see `AUTO_MONITORS`), resolved at the first
            validation of the fit and kept when the fit is resumed.
        mode: ``min`` or ``max``; by default ``min`` for a loss and ``max`` otherwise.
    """

    def __init__(self, monitor: str = AUTO, mode: str | None = None, **kwargs: Any) -> None:
        self.requested = monitor
        resolved = None if monitor == AUTO else monitor
        super().__init__(filename="best", monitor=resolved, mode=mode or default_mode(resolved or "val/loss"),
                         save_top_k=1, **kwargs)
        # without a monitor Lightning would keep the latest epoch under this name: until ``auto`` is resolved
        # (or when validation is off) nothing is saved
        self.disabled = False

    @property
    def state_key(self) -> str:
        # stable across the resolution of ``auto`` (Lightning's key includes the monitor): a resumed fit
        # finds the best score it had
        return self._generate_state_key(filename="best", monitor=self.requested)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.requested == AUTO and state_dict.get("monitor"):
            self._set_monitor(state_dict["monitor"], state_dict.get("mode") or default_mode(state_dict["monitor"]))
        super().load_state_dict(state_dict)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not validates(trainer):
            self.disabled = True

    def _set_monitor(self, monitor: str, mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"--checkpoint.mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)  # as ModelCheckpoint starts

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.disabled:
            return
        names = [name for name in monitor_candidates if name.startswith("val/")]
        if self.monitor is None:  # ``auto``, at the first validation
            chosen = resolve_auto(names)
            if chosen is None:
                return
            self._set_monitor(*chosen)
        elif self.monitor not in monitor_candidates:
            raise ValueError(
                f"--checkpoint.monitor {self.monitor}: the setup logs no such metric; it logs "
                f"{', '.join(sorted(names)) or 'no validation metric'} (or use --checkpoint.monitor auto)"
            )
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        return  # last.ckpt is LastCheckpoint's


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the latest epoch's weights, rewritten after every epoch (what a fit resumes
    from). Lightning's ``save_last`` only rewrites it when a new best is saved, so it is a separate callback."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(filename="last", monitor=None, enable_version_counter=False, **kwargs)


def validates(trainer: Trainer) -> bool:
    """Whether this fit has a validation loop (a validation split, and ``limit_val_batches`` not 0)."""
    return bool(trainer.limit_val_batches) and trainer.limit_val_batches != 0 and not getattr(
        trainer.datamodule, "without_validation", False)


def fit_checkpoints(monitor: str | None, mode: str | None, existing: list[Any]) -> list[ModelCheckpoint]:
    """The best (unless ``monitor`` is ``none``) and last checkpoints of a fit, except those a callback of the
    config already writes (a ``ModelCheckpoint`` with ``filename: best`` or ``last``)."""
    taken = {getattr(c, "filename", None) for c in existing if isinstance(c, ModelCheckpoint)}
    callbacks: list[ModelCheckpoint] = []
    if monitor is not None and str(monitor).lower() not in ("none", "null", "") and "best" not in taken:
        callbacks.append(BestCheckpoint(monitor=monitor, mode=mode))
    if "last" not in taken:
        callbacks.append(LastCheckpoint())
    return callbacks


class ValidationSwitch(Callback):
    """A fit whose datamodule found no validation split trains without validating: the validation loop
    (and its sanity check) is switched off instead of running on an empty loader."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(trainer.datamodule, "without_validation", False):
            trainer.limit_val_batches = 0
            trainer.num_sanity_val_steps = 0
