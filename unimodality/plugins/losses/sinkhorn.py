"""Entropic optimal transport between the two towers' batches (Sinkhorn), as a contrastive loss.

The loss is the inverse-OT view of contrastive learning (Shi, Zhang, Ma, Hu, "Understanding and
Generalizing Contrastive Learning from the Inverse Optimal Transport Perspective", ICML 2023): InfoNCE
normalises the similarity kernel over rows only, one Sinkhorn half-step; here the kernel is balanced by
Sinkhorn's algorithm (Cuturi, "Sinkhorn Distances", NeurIPS 2013) into the entropic transport plan between
the two batches, and the loss is the cross entropy of the known pairing against that plan.

Written in torch rather than called from POT or geomloss: geomloss's ``SamplesLoss`` computes the OT cost
between the two point clouds, which ignores which row pairs with which (it aligns distributions, not
pairs), and POT's torch backend differentiates by unrolling every iteration (memory ``iterations x n^2``);
the envelope-theorem gradient below needs one extra half-step. ``tests/test_field_losses.py`` checks plan,
cost, loss and gradients against POT (``ot.sinkhorn``, ``ot.sinkhorn2``) when it is installed
(``pip install ".[ot]"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unimodality.loss import ContrastiveLoss

#: how often (in iterations) the convergence test runs: each one syncs a GPU with the host
CHECK_EVERY = 5


class SinkhornLoss(ContrastiveLoss):
    """Cross entropy of the pairing against the entropic OT plan between the batches of ``a`` and ``b``.

    With logits ``K_ij = s * a_i . b_j`` (L2-normalised embeddings; cost ``C = -a . b``, entropic
    regularisation ``eps = 1/s``) and uniform marginals ``mu = nu = 1/n``, the plan is

    ``P = argmin_{P 1 = mu, P^T 1 = nu} <P, C> + eps * sum_ij P_ij log P_ij``,
    ``P_ij = exp(u_i + v_j + K_ij)``,

    with the log-domain Sinkhorn updates ``u = log mu - LSE_j(K + v)``, ``v = log nu - LSE_i(K + u)`` from
    ``u = v = 0`` until the row marginals are within ``tol`` (relative) or ``max_iter`` iterations. The
    loss compares the plan with the target coupling ``T`` (``T_ij = 1/n`` on the diagonal: textbook; or,
    with ``use_groups``, ``1/(n |P(i)|)`` for every pair of one perturbation; ``T`` has the same uniform
    marginals):

    ``L = -1/2 * sum_ij T_ij [ log(n P^row_ij) + log(n P^col_ij) ]``,

    where ``P^row`` and ``P^col`` are the plans after a last row (``u`` from ``v``) and column (``v`` from
    ``u``) half-step; at convergence both equal ``P`` and ``L = (<T, C> - OT_eps) / eps + log n``, zero iff
    the plan is the pairing. With ``max_iter = 0`` it is exactly ``ClipLoss`` (one half-step each way is
    InfoNCE). Gradients flow through the last half-steps only, with the potentials of the loop held fixed:
    by the envelope theorem that is the exact gradient ``(P - T) / eps`` of the converged loss (the tests
    compare it with differentiating POT's unrolled iterations), at the memory of one ``n x n`` kernel.

    The scale ``s`` is learned in log space and clamped (init 1/0.07, max 100, as CLIP). Sinkhorn needs
    more iterations at large scales (small ``eps``); ``train/sinkhorn_iterations`` logs how many the last
    call used. Everything is a function of the global batch (gathered by the setup), so DDP is exact.

    Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013; Shi, Zhang,
    Ma, Hu, "Understanding and Generalizing Contrastive Learning from the Inverse Optimal Transport
    Perspective", ICML 2023.

    Args:
        init_scale: initial logit scale ``s = 1/eps``, 1/0.07 as in CLIP.
        max_scale: the scale is clamped to at most this value.
        learn_scale: learn the scale (stored in log space) or keep it fixed.
        max_iter: most Sinkhorn iterations per call (0: InfoNCE, i.e. ``ClipLoss``).
        tol: stop when every row marginal is within this relative error (> 0).
        use_groups: treat samples of the same perturbation as positives.
    """

    def __init__(
        self,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        learn_scale: bool = True,
        max_iter: int = 100,
        tol: float = 1e-4,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        if not 0 < init_scale <= max_scale:
            raise ValueError(f"SinkhornLoss: need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"SinkhornLoss: max_iter must be an integer >= 0, got {max_iter!r}")
        if not tol > 0:
            raise ValueError(f"SinkhornLoss: tol must be > 0, got {tol}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.max_log_scale = math.log(max_scale)
        self.max_iter = max_iter
        self.tol = float(tol)
        self._iterations = 0

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    @torch.no_grad()
    def potentials(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sinkhorn's dual potentials ``(u, v)`` of the kernel ``logits`` (no gradient), and the
        iterations used."""
        n, m = logits.shape
        log_mu, log_nu = -math.log(n), -math.log(m)
        u = logits.new_zeros(n)
        v = logits.new_zeros(m)
        iterations = 0
        while iterations < self.max_iter:
            u_next = log_mu - torch.logsumexp(logits + v[None, :], dim=1)
            # |u_next - u| is the log of the row marginals' relative error of the plan (u, v)
            change = (u_next - u).abs().max() if (iterations + 1) % CHECK_EVERY == 0 else None
            u = u_next
            v = log_nu - torch.logsumexp(logits + u[:, None], dim=0)
            iterations += 1
            if change is not None and change.item() < self.tol:
                break
        return u, v, iterations

    def log_plans(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log P^row`` and ``log P^col``: the plan after a last row and a last column half-step."""
        n, m = logits.shape
        u, v, self._iterations = self.potentials(logits.detach())
        u_row = -math.log(n) - torch.logsumexp(logits + v[None, :], dim=1)
        v_col = -math.log(m) - torch.logsumexp(logits + u[:, None], dim=0)
        return u_row[:, None] + v[None, :] + logits, u[:, None] + v_col[None, :] + logits

    def plan(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The entropic transport plan between the rows of ``a`` and ``b`` (rows sum to ``1/n``)."""
        return self.log_plans(self.scale * a @ b.T)[0].exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        n = a.shape[0]
        logits = self.scale * a @ b.T
        log_row, log_col = self.log_plans(logits)
        target = self.positives(group, n, a.device).to(logits.dtype)
        target = target / (n * target.sum(dim=1, keepdim=True))  # uniform marginals 1/n
        return -(target * (log_row + log_col)).sum() / 2 - math.log(n)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.scale.detach(),
                "sinkhorn_iterations": torch.tensor(float(self._iterations))}
