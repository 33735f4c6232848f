"""CLIP's symmetric InfoNCE loss (Radford et al. 2021), with optional replicate-aware positives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.loss import ContrastiveLoss


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE on L2-normalised embeddings with a learnable logit scale.

    ``loss = (CE(s * a @ b.T, T) + CE(s * b @ a.T, T)) / 2`` where ``T`` is the identity (textbook CLIP)
    or, with ``use_groups``, the row-normalised matrix of same-perturbation pairs (multi-positive soft
    targets, so replicates are not pushed apart as false negatives).

    Args:
        init_scale: initial logit scale (inverse temperature), 1/0.07 as in CLIP.
        max_scale: the scale is clamped to at most this value (CLIP: 100).
        learn_scale: learn the scale (stored in log space) or keep it fixed.
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(
        self,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        learn_scale: bool = True,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if not 0 < init_scale <= max_scale:
            raise ValueError(f"ClipLoss: need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.max_log_scale = math.log(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.scale * a @ b.T
        targets = self.positives(group, a.shape[0], a.device).to(logits.dtype)
        # same-group is symmetric, so the row-normalised targets serve both directions
        targets = targets / targets.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.scale.detach()}
