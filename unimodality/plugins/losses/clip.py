"""CLIP's symmetric InfoNCE loss (Radford et al. 2021), with optional replicate-aware positives."""

from __future__ import annotations

import math

import torch
from torch import nn

from unimodality.loss import ContrastiveLoss, Keys, contrast_terms, group_index, queue_logsumexp


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE on L2-normalised embeddings with a learnable logit scale.

    ``loss = (CE(s * a @ b.T, T) + CE(s * b @ a.T, T)) / 2`` where ``T`` is the identity (textbook CLIP)
    or, with ``use_groups``, the row-normalised matrix of same-perturbation pairs (multi-positive soft
    targets, so replicates are not pushed apart as false negatives).

    Computed without forming ``T``: with ``l = s * a @ b.T`` and ``P_i`` the positives of row ``i``,
    ``CE_i = logsumexp_j l_ij - mean_{j in P_i} l_ij``, and the positive term summed over the rows is
    ``s * sum_g (A_g . B_g) / n_g`` over the groups (``A_g``, ``B_g``: the group's summed embeddings,
    ``n_g`` its size), the same in both directions. Only the ``B x B`` logits are kept for backward
    (`unimodality.loss.contrast_terms`), so time and memory are those of one ``B x B`` matrix,
    groups or not.

    With `unimodality.loss.Keys` (the setup's ``queue_size``: ALBEF's momentum contrast, Li et al. 2021,
    after MoCo, He et al. 2020), each modality's rows are contrasted with the *momentum* embeddings of the
    other modality, the batch's ``n`` then ``K`` queued ones, instead of with its online embeddings:
    ``CE_i = log(sum_{j<n} exp(s a_i . k^b_j) + sum_{j>=n: g_j != g_i} exp(s a_i . k^b_j)) - mean_{j in P_i}
    s a_i . k^b_j``, likewise from ``b`` to ``k^a``, averaged (ALBEF's ``loss_ita`` without its distillation
    term). The positives stay the batch's; a queue entry of the row's own group is left out. Time and memory:
    one ``n x (n + K)`` matrix per direction.

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

    supports_queue = True

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None,
                keys: Keys | None = None) -> torch.Tensor:
        scale = self.scale
        index = weights = None  # without groups: the diagonal, textbook CLIP
        if group is not None and self.use_groups:
            index, counts = group_index(group, a.shape[0], a.device)
            weights = 1 / counts.to(a.dtype)  # row i's positives share its target mass: 1 / |P_i|
        if keys is None:
            terms = contrast_terms(a, b, scale, index, weights)
            # both directions have the same positive sum: the groups are symmetric
            return (terms.rows.mean() + terms.columns.mean()) / 2 - terms.positive / a.shape[0]
        n = a.shape[0]
        directions = []
        for rows, columns in ((a, keys.b), (b, keys.a)):  # each modality's rows against the other's keys
            terms = contrast_terms(rows, columns[:n], scale, index, weights, columns=False)
            lse = terms.rows
            if len(columns) > n:  # the queue's entries join each row's softmax
                lse = torch.logaddexp(lse, queue_logsumexp(rows, columns[n:], scale, group, keys.group[n:]))
            directions.append(lse.mean() - terms.positive / n)
        return (directions[0] + directions[1]) / 2

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.scale.detach()}
