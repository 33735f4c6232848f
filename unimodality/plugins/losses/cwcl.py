"""CWCL (Srinivasa et al. 2023): contrastive loss with continuous targets from intra-modal similarity."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.loss import ContrastiveLoss


class CWCLLoss(ContrastiveLoss):
    """Continuously weighted contrastive loss: InfoNCE whose targets are a teacher modality's similarities.

    With logits ``z_ij = s * a_i . b_j`` (L2-normalised embeddings, learnable scale ``s``), a direction
    whose anchors come from the teacher modality ``u`` (its embeddings ``u_i``) has the target weights

    ``w_ij = (1 + u_i . u_j) / 2``  (in ``[0, 1]``, ``w_ii = 1``)

    and the loss (Srinivasa et al. 2023)

    ``L_{u -> v} = -1/n * sum_i 1/(sum_j w_ij) * sum_j w_ij log( exp(z_ij) / sum_k exp(z_ik) )``;

    the other direction keeps the usual one-hot (or, with ``use_groups``, same-perturbation) targets, as in
    CWCL's one-frozen-modality setting and CellCLIP's ``cwcl_loss``. With ``use_groups`` same-perturbation
    pairs also get the full weight ``w_ij = 1``. The result is the mean of the two directions (ClipLoss's
    convention; CellCLIP sums them):

    ``L = (L_{a -> b} + L_{b -> a}) / 2``.

    ``teacher`` picks which direction is weighted: ``"a"`` (anchors ``a``, weights from ``a``), ``"b"``, or
    ``"both"`` (each direction weighted by its own anchors' similarities, as CellCLIP's ``bi_cwcl_loss``,
    which however leaves one direction's weights un-normalised). In
    CWCL the teacher is a frozen pre-trained tower; here the weights come from the teacher's current
    embeddings (the only thing a loss sees), detached by default so they act as targets: use a frozen
    tower (``model.modes``) for CWCL's setting. The scale is learned in log space and clamped (init
    1/0.07, max 100, as CLIP).

    Srinivasa, Cho, Yang, Saidutta, Lee, Shen, Jin, "CWCL: Cross-Modal Transfer with Continuously Weighted
    Contrastive Loss", NeurIPS 2023. Used for Cell Painting by CellCLIP: Lu et al., "CellCLIP -- Learning
    Perturbation Effects in Cell Painting via Text-Guided Contrastive Learning", 2025.

    Args:
        teacher: the modality whose intra-modal similarities weigh its direction: ``"a"``, ``"b"`` (the
            first or second modality of each pair, in the data's order) or ``"both"``.
        init_scale: initial logit scale (inverse temperature), 1/0.07 as in CLIP.
        max_scale: the scale is clamped to at most this value.
        learn_scale: learn the scale (stored in log space) or keep it fixed.
        detach_weights: compute the weights without gradient (as targets).
        use_groups: treat samples of the same perturbation as positives (weight 1).
    """

    def __init__(
        self,
        teacher: Literal["a", "b", "both"] = "b",
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        learn_scale: bool = True,
        detach_weights: bool = True,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if teacher not in ("a", "b", "both"):
            raise ValueError(f"CWCLLoss: teacher must be 'a', 'b' or 'both', got {teacher!r}")
        if not 0 < init_scale <= max_scale:
            raise ValueError(f"CWCLLoss: need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        self.teacher = teacher
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.max_log_scale = math.log(max_scale)
        self.detach_weights = detach_weights

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def weights(self, u: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Row-normalised targets ``w_ij / sum_j w_ij`` from the anchors' own embeddings ``u``."""
        if self.detach_weights:
            u = u.detach()
        w = ((1 + u @ u.T) / 2).masked_fill(positive, 1.0)
        return w / w.sum(dim=1, keepdim=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.scale * a @ b.T
        positive = self.positives(group, a.shape[0], a.device)  # the diagonal without groups
        hard = positive.to(logits.dtype)
        hard = hard / hard.sum(dim=1, keepdim=True)  # symmetric: serves both directions
        a_targets = self.weights(a, positive) if self.teacher in ("a", "both") else hard
        b_targets = self.weights(b, positive) if self.teacher in ("b", "both") else hard
        return (F.cross_entropy(logits, a_targets) + F.cross_entropy(logits.T, b_targets)) / 2

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.scale.detach()}
