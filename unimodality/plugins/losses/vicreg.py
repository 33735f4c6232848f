"""VICReg (Bardes, Ponce, LeCun 2022): variance-invariance-covariance regularisation of two branches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimodality.loss import ContrastiveLoss


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class VICRegLoss(ContrastiveLoss):
    """VICReg on the projection heads' raw (un-normalised) outputs of the global batch.

    With ``a``, ``b`` the ``(n, d)`` outputs of the two towers (or two views), ``gamma = std_target``:

    - invariance ``s(a, b) = 1/(n d) * sum_i 1/|P(i)| * sum_{j in P(i)} ||a_i - b_j||^2``
      (the mean squared error of the pairs: ``F.mse_loss(a, b)`` when ``P(i) = {i}``);
    - variance ``v(x) = 1/d * sum_k max(0, gamma - sqrt(Var(x_{:,k}) + eps))``, unbiased variance over the
      batch, applied to both branches: ``(v(a) + v(b)) / 2``;
    - covariance ``c(x) = 1/d * sum_{k != l} C(x)_{kl}^2`` with ``C(x) = (x - mean)^T (x - mean) / (n - 1)``,
      summed over both branches: ``c(a) + c(b)``;

    ``L = sim_coeff * s(a, b) + std_coeff * (v(a) + v(b)) / 2 + cov_coeff * (c(a) + c(b))``, exactly the
    weighting of the reference implementation (facebookresearch/vicreg ``main_vicreg.py``; paper defaults
    25 / 25 / 1, ``gamma = 1``, ``eps = 1e-4``). ``P(i)`` is ``{i}`` (textbook VICReg) or, with
    ``use_groups``, every sample of ``i``'s perturbation, so replicates are pulled together too (the
    variance and covariance terms do not involve pairs). The statistics are over the *global* batch: the
    setup gathers every process's rows (with gradients) before the loss, as the reference code does with
    its ``FullGatherLayer``; a 2-process run therefore computes the single-process loss and gradients
    (the reference computes the invariance term per process, which equals the global one only for equal
    per-process batches).

    The loss needs the raw head outputs (``normalized_inputs = False``): on the unit sphere the variance
    and covariance terms would measure something else. Retrieval metrics still use L2-normalised ones.

    Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
    Learning", ICLR 2022.

    Args:
        sim_coeff: weight ``lambda`` of the invariance term (paper: 25).
        std_coeff: weight ``mu`` of the variance term (paper: 25).
        cov_coeff: weight ``nu`` of the covariance term (paper: 1).
        std_target: the standard deviation ``gamma`` each feature is pushed to (paper: 1).
        eps: added to the variance under the square root (paper: 1e-4).
        use_groups: treat samples of the same perturbation as positives of the invariance term.
    """

    normalized_inputs = False

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        std_target: float = 1.0,
        eps: float = 1e-4,
        use_groups: bool = True,
    ) -> None:
        super().__init__(use_groups=use_groups)
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            if not value >= 0:
                raise ValueError(f"VICRegLoss: {name} must be >= 0, got {value}")
        if not sim_coeff + std_coeff + cov_coeff > 0:
            raise ValueError("VICRegLoss: at least one of sim_coeff, std_coeff, cov_coeff must be > 0")
        if not std_target > 0:
            raise ValueError(f"VICRegLoss: std_target must be > 0, got {std_target}")
        if not eps > 0:
            raise ValueError(f"VICRegLoss: eps must be > 0, got {eps}")
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.std_target, self.eps = float(std_target), float(eps)
        self._terms: dict[str, torch.Tensor] = {}

    def invariance(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        """Mean squared distance of the positive pairs (each row's positives weigh 1/|P(i)|)."""
        n, d = a.shape
        positive = self.positives(group, n, a.device)
        rows, cols = positive.nonzero(as_tuple=True)
        if len(rows) == n:  # one positive per row: the diagonal, the textbook term
            return F.mse_loss(a, b)
        weight = 1.0 / positive.sum(dim=1).to(a.dtype)[rows]
        return (weight * (a[rows] - b[cols]).pow(2).sum(dim=1)).sum() / (n * d)

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """Hinge on each feature's standard deviation over the batch."""
        std = torch.sqrt(x.var(dim=0) + self.eps)
        return F.relu(self.std_target - std).mean()

    @staticmethod
    def covariance(x: torch.Tensor) -> torch.Tensor:
        """Sum of the squared off-diagonal covariances, divided by the number of features."""
        n, d = x.shape
        x = x - x.mean(dim=0)
        cov = (x.T @ x) / (n - 1)
        return off_diagonal(cov).pow(2).sum() / d

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        n = a.shape[0]
        if n < 2:
            raise ValueError(f"VICRegLoss needs at least 2 rows in a batch (variances over the batch), got {n}")
        invariance = self.invariance(a, b, group)
        variance = (self.variance(a) + self.variance(b)) / 2
        covariance = self.covariance(a) + self.covariance(b)
        self._terms = {"invariance": invariance.detach(), "variance": variance.detach(),
                       "covariance": covariance.detach()}
        return self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """The three unweighted terms of the last call."""
        return dict(self._terms)
