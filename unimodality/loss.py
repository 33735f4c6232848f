"""The contrastive loss interface."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unimodality.config import RecordsInitArgs


class ContrastiveLoss(RecordsInitArgs, nn.Module):
    """Base class of losses (plugin group ``unimodality.losses``).

    ``forward(a, b, group)`` takes L2-normalised embeddings of the *global* batch (the setup gathers them
    across processes with gradients first), row ``i`` of ``a`` paired with row ``i`` of ``b``, and the
    integer perturbation id of each row. Rows sharing a group are positives of each other when
    ``use_groups`` is on; off, only the diagonal is positive (the textbook loss). Losses are computed in
    fp32 even under mixed precision.

    A loss whose method needs the projection heads' raw outputs (statistics of the features themselves,
    e.g. VICReg's variance and covariance terms or CCA's correlations) sets the class attribute
    ``normalized_inputs = False``; the setups then hand it the un-normalised outputs instead (their
    retrieval metrics and ``predict`` still use the L2-normalised embeddings).
    """

    #: whether ``forward`` receives L2-normalised embeddings (the default) or the heads' raw outputs
    normalized_inputs: ClassVar[bool] = True

    def __init__(self, use_groups: bool = True) -> None:
        super().__init__()
        self.use_groups = use_groups

    def positives(self, group: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """Boolean ``(n, n)`` matrix of positive pairs."""
        if group is None or not self.use_groups:
            return torch.eye(n, dtype=torch.bool, device=device)
        return group[:, None] == group[None, :]

    def __call__(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        # losses in fp32 whatever the towers run in: under bf16/fp16 autocast the logits (scaled up to 100x)
        # lose precision, and a loss computed in bf16 would come out in bf16
        with torch.autocast(device_type=a.device.type, enabled=False):
            return super().__call__(_at_least_fp32(a), _at_least_fp32(b), group)

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging (temperatures in linear units, biases)."""
        return {}


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float64 stays (reference tests)
