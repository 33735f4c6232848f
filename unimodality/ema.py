"""Exponential moving averages of modules: DINO's teachers and the momentum towers of a queue's keys."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter; buffers (e.g.
    batch-norm statistics) are copied."""
    for p_student, p_teacher in zip(student.parameters(), teacher.parameters(), strict=True):
        p_teacher.mul_(momentum).add_(p_student.detach(), alpha=1 - momentum)
    for b_student, b_teacher in zip(student.buffers(), teacher.buffers(), strict=True):
        b_teacher.copy_(b_student)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that gets no gradients and stays in eval mode (an EMA teacher)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher.eval()
