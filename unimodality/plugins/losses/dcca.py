"""Deep CCA (Andrew, Arora, Bilmes, Livescu 2013): maximise the canonical correlations of two towers."""

from __future__ import annotations

import torch

from unimodality.loss import ContrastiveLoss


class DCCALoss(ContrastiveLoss):
    """Minus the sum of the top-``k`` canonical correlations of the two towers' raw outputs.

    With ``H_a``, ``H_b`` the ``(n, d)`` outputs of the global batch, centred (``H - mean``), and ridge
    ``r`` (the regularised covariances of Andrew et al. 2013):

    ``S_aa = H_a^T H_a / (n - 1) + r I``, ``S_bb = H_b^T H_b / (n - 1) + r I``,
    ``S_ab = H_a^T W H_b / (n - 1)``,

    ``T = S_aa^{-1/2} S_ab S_bb^{-1/2}``, and the canonical correlations are the singular values of ``T``:

    ``L = - sum_{c <= k} sigma_c(T)``  (``k = d``: the trace norm ``tr((T^T T)^{1/2})`` of the paper).

    ``W`` is the identity (textbook DCCA: row ``i`` of ``a`` pairs with row ``i`` of ``b``) or, with
    ``use_groups``, the row-normalised same-perturbation matrix: each row pairs with every sample of its
    perturbation, weight ``1/|P(i)|`` (the cross-covariance of ``a`` with the perturbation means of
    ``b``). Its rows and columns both sum to 1, so the pairs' joint distribution keeps the uniform
    marginals the covariances use and the correlations stay in ``[0, 1]``; with distinct groups it is the
    identity. The whitening uses Cholesky factors (``S = L L^T``; ``L^{-1} S_ab L_b^{-T}`` has the
    singular values of ``T``), which is stabler than the eigen-decomposition of the paper's gradient
    derivation, and the singular values' gradients come from ``torch.linalg.svdvals``.

    The canonical correlations do not change under invertible linear maps of either tower's output, so
    DCCA leaves each tower free to rotate and scale its space: the canonical *variates* align, not the
    coordinates, and cosine retrieval between the raw outputs (what the setups' metrics and ``predict``
    use) stays near chance (example data: val/pert/mrr 0.12, chance 0.11). ``alignment > 0`` adds soft
    CCA's distance between the batch-standardised outputs (Chang, Xiang, Hospedales 2018),
    ``||a~ - b~||_F^2 / (2 (n - 1)) = sum_k (1 - corr(a_k, b_k))``, which pushes each coordinate to be its
    own canonical variate: ``L = -sum sigma_c(T) + alignment * sum_k (1 - corr(a_k, b_k))``.
    ``configs/dcca.yaml`` uses ``alignment: 1``; the default 0 is textbook DCCA.

    All statistics are over the global batch (the setup gathers every process's rows with gradients), so
    the loss is exact under DDP. It needs the raw outputs (``normalized_inputs = False``); keep the
    embedding small next to the batch (``model.embed_dim`` well below ``data.batch_size``): with ``d``
    close to ``n`` the sample correlations are all near 1 whatever the towers learn. The ridge keeps the
    covariances invertible then (and when a feature is constant).

    Andrew, Arora, Bilmes, Livescu, "Deep Canonical Correlation Analysis", ICML 2013. Chang, Xiang,
    Hospedales, "Scalable and Effective Deep CCA via Soft Decorrelation", CVPR 2018 (the alignment term).

    Args:
        top_k: number of canonical correlations summed; ``None`` (default): all ``d`` of them.
        ridge: ``r`` added to the diagonal of both auto-covariances (>= 0; Andrew et al. tune it, 1e-3 is
            a common value for embeddings of order 1).
        alignment: weight of the coordinate-alignment term (>= 0; 0: textbook DCCA).
        use_groups: pair each row with every sample of its perturbation (weights ``1/|P(i)|``).
    """

    normalized_inputs = False

    def __init__(self, top_k: int | None = None, ridge: float = 1e-3, alignment: float = 0.0,
                 use_groups: bool = True) -> None:
        super().__init__(use_groups=use_groups)
        if not alignment >= 0:
            raise ValueError(f"DCCALoss: alignment must be >= 0, got {alignment}")
        self.alignment = float(alignment)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"DCCALoss: top_k must be a positive integer or None (all), got {top_k!r}")
        if not ridge >= 0:
            raise ValueError(f"DCCALoss: ridge must be >= 0, got {ridge}")
        self.top_k = top_k
        self.ridge = float(ridge)
        self._correlation: torch.Tensor | None = None

    def _whitener(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """Lower Cholesky factor of the regularised auto-covariance of centred ``h``."""
        n, d = h.shape
        cov = h.T @ h / (n - 1) + self.ridge * torch.eye(d, dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(cov)
        if info.item() != 0:
            raise ValueError(
                f"DCCALoss: the covariance of {name} is singular (a constant or collinear output with too "
                f"few rows: {n} rows, {d} features); raise model.loss.init_args.ridge (now {self.ridge})"
            )
        return factor

    def correlations(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """All ``d`` canonical correlations of ``a`` and ``b``, in decreasing order."""
        n, d = a.shape
        if n < 2:
            raise ValueError(f"DCCALoss needs at least 2 rows in a batch (covariances over the batch), got {n}")
        if b.shape[1] != d:
            raise ValueError(f"DCCALoss: both inputs need the same width, got {d} and {b.shape[1]}")
        a = a - a.mean(dim=0)
        b = b - b.mean(dim=0)
        cross = a.T @ self._paired(b, group) / (n - 1)
        l_a, l_b = self._whitener(a, "the first input"), self._whitener(b, "the second input")
        # T = L_a^{-1} S_ab L_b^{-T}: two triangular solves
        left = torch.linalg.solve_triangular(l_a, cross, upper=False)
        t = torch.linalg.solve_triangular(l_b, left.T, upper=False).T
        return torch.linalg.svdvals(t)

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        d = a.shape[1]
        k = d if self.top_k is None else self.top_k
        if k > d:
            raise ValueError(
                f"DCCALoss: top_k ({k}) is more than the embedding size ({d}): lower "
                f"model.loss.init_args.top_k or raise model.embed_dim"
            )
        correlation = self.correlations(a, b, group)[:k].sum()
        self._correlation = correlation.detach()
        if self.alignment == 0:
            return -correlation
        return -correlation + self.alignment * (1 - self.coordinate_correlations(a, b, group)).sum()

    def coordinate_correlations(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None
                                ) -> torch.Tensor:
        """``corr(a_k, b_k)`` of each output coordinate ``k`` over the batch (``b`` paired as in ``S_ab``)."""
        a = a - a.mean(dim=0)
        b = b - b.mean(dim=0)
        b_paired = self._paired(b, group)
        norms = (a.pow(2).sum(dim=0) * b.pow(2).sum(dim=0)).sqrt()
        return (a * b_paired).sum(dim=0) / norms.clamp(min=torch.finfo(a.dtype).tiny)

    def _paired(self, b: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        """``W b``: each row's partner (without groups) or the mean of its perturbation's rows."""
        if not self.use_groups or group is None:
            return b
        positive = self.positives(group, b.shape[0], b.device).to(b.dtype)
        return (positive / positive.sum(dim=1, keepdim=True)) @ b

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """The sum of the top-k canonical correlations of the last call."""
        return {} if self._correlation is None else {"correlation": self._correlation}
