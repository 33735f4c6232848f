"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), with optional replicate-aware positives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.loss import ContrastiveLoss, Keys, group_index, group_sums


class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss on L2-normalised embeddings with a learnable scale and bias.

    Every pair ``(i, j)`` of the batch is an independent binary classification, positive or negative:

    ``L = -1/|B| * sum_i sum_j log sigmoid(z_ij * (t * a_i . b_j + bias))``

    with ``z_ij = +1`` for positive pairs and ``-1`` otherwise. Positives are the diagonal (textbook
    SigLIP) or, with ``use_groups``, every pair of samples of the same perturbation (so replicates are
    not pushed apart as false negatives). Note the normalisation by the batch size ``|B|``, not by the
    number of pairs, as in the paper: the loss grows with the batch. The scale ``t`` is stored as
    ``log t`` (initial ``t = 10``) and the bias starts at ``-10``, the paper's initialisation, which
    keeps the initial loss small despite the many negatives.

    With `unimodality.loss.Keys` (the setup's ``queue_size``), each modality's rows meet the other
    modality's momentum embeddings, the batch's then the queue's, instead of its online ones: the sum above
    over ``a_i`` and the keys ``k^b_j`` plus the same over ``b_i`` and ``k^a_j``, halved; a queue entry is one
    more negative pair, except for rows of its own group; still divided by ``|B|``.

    Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.

    Args:
        init_scale: initial scale ``t`` (an inverse temperature), 10 as in SigLIP.
        init_bias: initial bias, -10 as in SigLIP.
        max_scale: the scale is clamped to at most this value.
        learn_scale: learn the scale (stored in log space) or keep it fixed.
        learn_bias: learn the bias or keep it fixed.
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(
        self,
        init_scale: float = 10.0,
        init_bias: float = -10.0,
        max_scale: float = 100.0,
        learn_scale: bool = True,
        learn_bias: bool = True,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if not 0 < init_scale <= max_scale:
            raise ValueError(f"SigLipLoss: need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_bias)
        self.max_log_scale = math.log(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    supports_queue = True

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None,
                keys: Keys | None = None) -> torch.Tensor:
        # -log sigmoid(z x) = softplus(x) - [z = +1] x: softplus over every pair, less the positive pairs'
        # logits, which group sums give (sum over groups of sum_a . sum_b, and the bias per pair): no n x n
        # mask nor sign matrix, one n x n matrix (the logits) kept for backward
        scale, n = self.scale, a.shape[0]
        grouped = group is not None and self.use_groups
        index, counts = group_index(group, n, a.device) if grouped else (None, None)
        # the positive pairs' sum built before the logits: the order autograd records them in changes the
        # backward's peak by one n x n matrix (measured at B = 1024, d = 512: 13.8 MiB, 17.9 the other way)
        if keys is None:
            return (-self._positive_sum(scale, a, b, index, counts) + self._softplus_sum(scale, a, b)) / n
        total = a.new_zeros(())
        for rows, columns in ((a, keys.b), (b, keys.a)):  # each modality's rows against the other's keys
            batch, queue = columns[:n], columns[n:]
            total = (total - self._positive_sum(scale, rows, batch, index, counts)
                     + self._softplus_sum(scale, rows, batch))
            if len(queue):  # every queue entry a negative, except those of the row's own group
                queued = F.softplus((scale * rows) @ queue.T + self.bias)
                if group is not None:
                    queued = queued.masked_fill(group[:, None] == keys.group[None, n:], 0.0)
                total = total + queued.sum()
        return total / (2 * n)

    def _softplus_sum(self, scale: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = (scale * x) @ y.T  # scaling x, not the n x n product; the bias added in place
        return F.softplus(logits.add_(self.bias)).sum()

    def _positive_sum(self, scale: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None,
                      counts: torch.Tensor | None) -> torch.Tensor:
        """The positive pairs' logits summed: the diagonal's, or every same-group pair's (``index``)."""
        if index is None:
            return scale * torch.vdot(x.flatten(), y.flatten()) + self.bias * x.shape[0]
        return (scale * (group_sums(x, index, len(counts)) * group_sums(y, index, len(counts))).sum()
                + self.bias * counts.square().sum())

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach(), "bias": self.bias.detach()}
