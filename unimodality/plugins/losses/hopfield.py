"""CLOOB's loss (Fürst et al. 2022): modern Hopfield retrieval followed by InfoLOOB, as in CLOOME."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.loss import ContrastiveLoss, group_index, group_sums


def hopfield_retrieval(state: torch.Tensor, stored: torch.Tensor, beta: float) -> torch.Tensor:
    """Retrieve from ``stored`` with each row of ``state`` as query, one modern Hopfield update step.

    ``u_i = normalize(sum_k softmax_k(beta * stored_k . state_i) * stored_k)``; rows are samples.
    """
    attention = torch.softmax(beta * state @ stored.T, dim=1)
    return F.normalize(attention @ stored, dim=1)


def cross_retrieval(a: torch.Tensor, b: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``hopfield_retrieval(b, a, beta)`` and ``hopfield_retrieval(a, b, beta)`` from one product.

    Their logits are each other's transpose, so one ``n x n`` product (and its backward) serves both.
    """
    logits = beta * b @ a.T
    return (F.normalize(torch.softmax(logits, dim=1) @ a, dim=1),
            F.normalize(torch.softmax(logits, dim=0).T @ b, dim=1))


class HopfieldLoss(ContrastiveLoss):
    """CLOOB: InfoLOOB on patterns retrieved from modern Hopfield networks, with optional groups.

    With ``x = a`` and ``y = b`` (rows are L2-normalised samples), each sample retrieves from the batch
    of either modality with one Hopfield update of inverse temperature ``beta = scale_hopfield``:

    ``hopfield(S, X)_i = normalize(X^T softmax(beta * X s_i))``  (query ``s_i``, stored patterns ``X``)

    ``U_x = hopfield(x, x)``, ``V_x = hopfield(y, x)``, ``U_y = hopfield(y, y)``, ``V_y = hopfield(x, y)``
    (e.g. ``V_x``: each ``y_i`` retrieves from the ``x`` of the batch), and the loss is

    ``L = InfoLOOB(U_x, V_x) + InfoLOOB(U_y, V_y)``  (a sum, not a mean, as in CLOOB's code), where

    ``InfoLOOB(u, v) = tau/N * sum_i [ -mean_{j in P(i)} k_ij + log sum_{j not in P(i)} exp(k_ij) ]``,
    ``k_ij = u_i . v_j / tau``, ``tau = 1 / inv_tau``.

    ``P(i)`` is ``{i}`` (textbook CLOOB, ``infoLOOB_loss`` of ml-jku/cloob ``src/training/methods.py``)
    or, with ``use_groups``, every sample of ``i``'s perturbation; the mean over positives then equals
    CLOOB's single positive when groups are all distinct. InfoLOOB is "leave one out": the positives are
    *excluded* from the denominator (masked, rather than CLOOB's ``-1000`` fill). A row with no
    negatives at all (every sample of the batch in one group) has an empty sum: its negatives term is
    defined as 0 (``log 1``), so that row contributes only its alignment term and the loss stays finite.

    Fürst, Rumetshofer, Lehner, Tran, Tang, Ramsauer, Kreil, Kopp, Klambauer, Bitto-Nemling, Hochreiter,
    "CLOOB: Modern Hopfield Networks with InfoLOOB Outperform CLIP", NeurIPS 2022.
    Used for molecules <-> Cell Painting images by CLOOME: Sanchez-Fernandez, Rumetshofer, Hochreiter,
    Klambauer, "CLOOME: contrastive learning unlocks bioimaging databases for queries with chemical
    structures", Nature Communications 2023.

    Args:
        scale_hopfield: inverse temperature ``beta`` of the Hopfield retrieval (CLOOB: 14.3), fixed.
        inv_tau: inverse temperature of InfoLOOB (CLOOB: 14.3).
        learn_inv_tau: learn ``inv_tau`` (stored in log space) or keep it fixed (CLOOB's default).
        max_inv_tau: a learned ``inv_tau`` is clamped to at most this value.
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(
        self,
        scale_hopfield: float = 14.3,
        inv_tau: float = 14.3,
        learn_inv_tau: bool = False,
        max_inv_tau: float = 100.0,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if scale_hopfield <= 0:
            raise ValueError(f"HopfieldLoss: scale_hopfield must be > 0, got {scale_hopfield}")
        if not 0 < inv_tau <= max_inv_tau:
            raise ValueError(f"HopfieldLoss: need 0 < inv_tau <= max_inv_tau, got {inv_tau} and {max_inv_tau}")
        self.scale_hopfield = float(scale_hopfield)
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(inv_tau)), requires_grad=learn_inv_tau)
        self.max_log_inv_tau = math.log(max_inv_tau)

    @property
    def inv_tau(self) -> torch.Tensor:
        return self.log_inv_tau.clamp(max=self.max_log_inv_tau).exp()

    def info_loob(self, u: torch.Tensor, v: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
                  same: torch.Tensor | None) -> torch.Tensor:
        """InfoLOOB of anchors ``u`` against candidates ``v``, pairs given by dense group ids.

        Args:
            u: ``(n, d)`` anchors.
            v: ``(n, d)`` candidates.
            index: ``(n,)`` dense group ids (`unimodality.loss.group_index`).
            counts: ``(G,)`` group sizes.
            same: ``(n, n)`` boolean mask of same-group pairs, or ``None``: each row's only positive is its
                own column.
        """
        inv_tau = self.inv_tau
        n = u.shape[0]
        k = (inv_tau * u) @ v.T
        if same is None:  # a row's one positive is its own column (copied: the fills below overwrite it)
            positives = k.diagonal().clone()
        else:  # the mean over the row's group, from group sums (O(n d), no n x n product with the mask)
            positives = inv_tau * (u * group_sums(v, index, len(counts))[index]).sum(dim=1) / counts[index]
        # leave-one-out: positives out of the denominator. The fills are in place and outside autograd: the
        # product's backward does not read k, and the logsumexp's gradient is already zero at every filled
        # entry (exp(-inf) = 0; a filled row's term is dropped by the where below), so no mask is kept for
        # backward. A row with no negatives gets zeros, not -inf (a logsumexp over only -inf has NaN
        # gradients); no test of whether any row is one, as that would wait for the device every step.
        has_negative = counts[index] < n
        with torch.no_grad():
            if same is not None:
                k.masked_fill_(same, float("-inf"))
            else:
                k.fill_diagonal_(float("-inf"))
            k.masked_fill_(~has_negative[:, None], 0.0)
        negatives = torch.where(has_negative, torch.logsumexp(k, dim=1), torch.zeros_like(positives))
        return (negatives - positives).mean() / inv_tau

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        beta = self.scale_hopfield
        u_a, u_b = hopfield_retrieval(a, a, beta), hopfield_retrieval(b, b, beta)
        v_a, v_b = cross_retrieval(a, b, beta)
        grouped = group is not None and self.use_groups
        index, counts = group_index(group if grouped else None, a.shape[0], a.device)
        same = index[:, None] == index[None, :] if grouped else None
        return self.info_loob(u_a, v_a, index, counts, same) + self.info_loob(u_b, v_b, index, counts, same)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"inv_tau": self.inv_tau.detach()}
