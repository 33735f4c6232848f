"""SimCLR's NT-Xent loss (Chen et al. 2020), with optional replicate-aware positives."""

from __future__ import annotations

import math

import torch
from torch import nn

from unimodality.loss import ContrastiveLoss, contrast_terms, group_index


class NTXentLoss(ContrastiveLoss):
    """Normalized-temperature cross entropy over the ``2N`` views ``z = cat(a, b)``.

    ``s_ij = z_i . z_j / temperature``; each view ``i`` is an anchor whose softmax runs over all other
    views (its own similarity excluded):

    ``L = 1/(2N) * sum_i -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{k != i} exp(s_ik) )``

    ``P(i)`` is the other view of the same sample (``i <-> i + N``: textbook SimCLR) or, with
    ``use_groups``, every other view of a sample of the same perturbation, both views and both halves
    (the supervised-contrastive "L_out" form of Khosla et al. 2020: the mean of the log-probabilities
    over the positives). The view itself is never a positive nor in the denominator. Works for SimCLR
    (``a``, ``b``: two augmentations of the same samples) and cross-modally (``a``, ``b``: two modalities;
    unlike CLIP's loss, samples of the same modality are then negatives too).

    Computed without a mask: the sum of ``z_i . z_p`` over the positives is ``z_i . Z_g - z_i . z_i``
    (``Z_g``: the summed views of ``i``'s group, ``|P(i)| = 2 n_g - 1``), and only the ``2N x 2N``
    logits are kept for backward (`unimodality.loss.contrast_terms`).

    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020.

    Args:
        temperature: softmax temperature ``tau`` (SimCLR: 0.1 to 0.5).
        learn_temperature: learn the temperature (stored in log space) or keep it fixed (SimCLR).
        min_temperature: a learned temperature is clamped to at least this value.
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        min_temperature: float = 0.01,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if not 0 < min_temperature <= temperature:
            raise ValueError(
                f"NTXentLoss: need 0 < min_temperature <= temperature, got {min_temperature} and {temperature}")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.min_log_temperature = math.log(min_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.clamp(min=self.min_log_temperature).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        n = a.shape[0]
        z = torch.cat([a, b])
        # positives across both halves; without groups: the other view of the same sample
        index, counts = group_index(group if self.use_groups else None, n, z.device)
        weights = 1 / (2 * counts - 1).to(z.dtype)  # 1 / |P(i)|: the other views of the group
        terms = contrast_terms(z, None, 1 / self.temperature, index.repeat(2), weights)
        return terms.rows.mean() - terms.positive / (2 * n)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"temperature": self.temperature.detach()}
