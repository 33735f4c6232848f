"""MolPhenix's S2L loss (Fradkin et al. 2024): a sigmoid loss with soft labels from a teacher modality."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.loss import ContrastiveLoss


def s2l_similarity(t: torch.Tensor, distance_scale: float, threshold: float) -> torch.Tensor:
    """Soft labels from pairwise squared distances within one modality's batch.

    ``s_ij = 1 - (4 / pi) * arctan(||t_i - t_j||^2 / distance_scale)``, set to 0 where below ``threshold``;
    ``s_ii = 1``, decreasing with distance towards -1.
    """
    squared = t.pow(2).sum(dim=1)
    distance = (squared[:, None] + squared[None, :] - 2 * t @ t.T).clamp(min=0)
    distance = distance.masked_fill(torch.eye(len(t), dtype=torch.bool, device=t.device), 0.0)
    similarity = 1 - torch.atan(distance / distance_scale) * (4 / math.pi)
    return torch.where(similarity < threshold, torch.zeros_like(similarity), similarity)


class S2LLoss(ContrastiveLoss):
    """Soft-weighted sigmoid locked loss (S2L): SigLIP's pairwise sigmoid loss with soft labels.

    Every pair ``(i, j)`` of the batch is a binary classification whose label ``s_ij`` in ``[0, 1]`` is how
    close samples ``i`` and ``j`` are *within the teacher modality* (MolPhenix: the phenomics embeddings),
    so inactive molecules, whose phenotypes all look alike, are not pushed apart as hard negatives:

    ``l_ij = t * a_i . b_j + bias``,
    ``L = -1/n * sum_i sum_j [ s_ij log sigmoid(l_ij) + (gamma - delta * s_ij) log sigmoid(-l_ij) ]``,

    ``s_ij = 1 - (4/pi) arctan(||u_i - u_j||^2 / c)``, zeroed below ``threshold`` (``u``: the teacher's
    L2-normalised embeddings, ``c = distance_scale``). With ``use_groups`` every pair of samples of the same
    perturbation gets the full label ``s_ij = 1`` (replicates are positives whatever their embeddings);
    ``s_ii = 1`` in any case. The labels are targets: no gradient flows through them (``detach_labels``).
    ``gamma = delta = threshold = 1`` gives SigLIP's loss (``SigLipLoss``) exactly. The scale ``t`` is
    learned in log space and clamped at ``max_scale``; scale and bias start at SigLIP's 10 and -10.

    Fradkin et al., "How Molecules Impact Cells: Unlocking Contrastive PhenoMolecular Retrieval"
    (MolPhenix), NeurIPS 2024 (arXiv:2409.08302). The constants (``c = 0.3``, ``threshold = 0.75``,
    ``gamma = 1.7``, ``delta = 0.75``) and the form above are those of the public re-implementation in
    CellCLIP (Lu et al. 2025, github.com/suinleelab/CellCLIP, ``src/clip/methods.py: s2l_loss``), which
    the tests transcribe; no code from the MolPhenix authors was available to compare with.

    Args:
        teacher: which input defines the soft labels: ``"a"`` or ``"b"`` (the first or second modality of
            each pair, in the data's order; MolPhenix: the phenomics side).
        init_scale: initial scale ``t`` (an inverse temperature), 10 as in SigLIP.
        init_bias: initial bias, -10 as in SigLIP.
        max_scale: the scale is clamped to at most this value.
        learn_scale: learn the scale (stored in log space) or keep it fixed.
        learn_bias: learn the bias or keep it fixed.
        distance_scale: ``c``, the squared distance at which ``arctan`` reaches ``pi/4`` (``s = 0``).
        threshold: labels below it are set to 0 (in ``(-1, 1]``).
        gamma: weight of the negative term of a pair with label 0.
        delta: how much a pair's label lowers the weight of its negative term (``0 <= delta <= gamma``).
        detach_labels: compute the labels without gradient (as targets).
        use_groups: samples of the same perturbation get label 1.
    """

    def __init__(
        self,
        teacher: Literal["a", "b"] = "b",
        init_scale: float = 10.0,
        init_bias: float = -10.0,
        max_scale: float = 100.0,
        learn_scale: bool = True,
        learn_bias: bool = True,
        distance_scale: float = 0.3,
        threshold: float = 0.75,
        gamma: float = 1.7,
        delta: float = 0.75,
        detach_labels: bool = True,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if teacher not in ("a", "b"):
            raise ValueError(f"S2LLoss: teacher must be 'a' or 'b', got {teacher!r}")
        if not 0 < init_scale <= max_scale:
            raise ValueError(f"S2LLoss: need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        if not distance_scale > 0:
            raise ValueError(f"S2LLoss: distance_scale must be > 0, got {distance_scale}")
        if not -1 < threshold <= 1:
            raise ValueError(f"S2LLoss: threshold must be in (-1, 1], got {threshold}")
        if not 0 <= delta <= gamma:
            raise ValueError(f"S2LLoss: need 0 <= delta <= gamma (negative weights >= 0), got delta {delta} "
                             f"and gamma {gamma}")
        self.teacher = teacher
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_bias)
        self.max_log_scale = math.log(max_scale)
        self.distance_scale, self.threshold = float(distance_scale), float(threshold)
        self.gamma, self.delta = float(gamma), float(delta)
        self.detach_labels = detach_labels

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def labels(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(n, n)`` soft labels ``s_ij``."""
        teacher = a if self.teacher == "a" else b
        if self.detach_labels:
            teacher = teacher.detach()
        labels = s2l_similarity(teacher, self.distance_scale, self.threshold)
        if self.use_groups and group is not None:
            labels = labels.masked_fill(self.positives(group, len(a), a.device), 1.0)
        return labels

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.scale * a @ b.T + self.bias
        labels = self.labels(a, b, group)
        pairs = labels * F.logsigmoid(logits) + (self.gamma - self.delta * labels) * F.logsigmoid(-logits)
        return -pairs.sum() / a.shape[0]

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.detach(), "bias": self.bias.detach()}
