"""Learning-rate schedules a config can name that torch has no single class for."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warmup, then cosine annealing (as in SimCLR, CLIP and open_clip).

    At scheduler step ``t`` every parameter group's learning rate is its base rate times

    * ``start_factor + (1 - start_factor) * t / warmup_steps`` while ``t < warmup_steps``;
    * ``m + (1 - m) * (1 + cos(pi * s)) / 2`` after, with ``s = (t - warmup_steps) / (total_steps -
      warmup_steps)`` capped at 1 and ``m = min_factor``.

    A step is an optimizer step with ``lr_scheduler_interval: step`` and an epoch with ``epoch``. Per-group
    rates (``tower_optim``) keep their ratios.

    Args:
        optimizer: the optimizer (passed by the setup).
        warmup_steps: length of the linear warmup; 0 for none.
        total_steps: length of the whole schedule. Unset (null): the setup fills in the run's length
            (``trainer.estimated_stepping_batches`` with interval ``step``, ``trainer.max_epochs`` with ``epoch``).
            A run shorter than the warmup (e.g. ``fast_dev_run``) ends during the warmup.
        start_factor: fraction of the base rate at the first step.
        min_factor: fraction of the base rate at the end of the cosine.
        last_epoch: index of the last step, for resuming (-1: a new schedule).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        start_factor: float = 0.0,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise ValueError("WarmupCosineLR needs total_steps (the setup fills it in from the trainer)")
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"WarmupCosineLR: need warmup_steps >= 0 and total_steps >= 1, got warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}"
            )
        for name, value in (("start_factor", start_factor), ("min_factor", min_factor)):
            if not 0 <= value <= 1:
                raise ValueError(f"WarmupCosineLR: {name} must be in [0, 1], got {value}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.start_factor, self.min_factor = start_factor, min_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiple of the base learning rate at scheduler step ``step``."""
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr
