"""The contrastive loss interface."""

from __future__ import annotations

import torch
from torch import nn

from unimodality.config import RecordsInitArgs


class ContrastiveLoss(RecordsInitArgs, nn.Module):
    """Base class of losses (plugin group ``unimodality.losses``).

    ``forward(a, b, group)`` takes L2-normalised embeddings of the *global* batch (the setup gathers them
    across processes with gradients first), row ``i`` of ``a`` paired with row ``i`` of ``b``, and the
    integer perturbation id of each row. Rows sharing a group are positives of each other when
    ``use_groups`` is on; off, only the diagonal is positive (the textbook loss).
    """

    def __init__(self, use_groups: bool = True) -> None:
        super().__init__()
        self.use_groups = use_groups

    def positives(self, group: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """Boolean ``(n, n)`` matrix of positive pairs."""
        if group is None or not self.use_groups:
            return torch.eye(n, dtype=torch.bool, device=device)
        return group[:, None] == group[None, :]

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging (temperatures in linear units, biases)."""
        return {}
