"""Augmentations of feature vectors (expression profiles, morphology features, embeddings).

All act per sample with probability ``p`` and draw from torch's generator (``seed_everything`` applies).
They assume features on a roughly comparable scale (log-normalised counts, standardised features), as
the noise level or the mixing is the same for every feature.
"""

from __future__ import annotations

import torch

from unimodality.augmentation import Augmentation


class GaussianNoise(Augmentation):
    """Add independent Gaussian noise to every feature: ``x + std * N(0, 1)``.

    Args:
        std: standard deviation of the noise, in the units of the (transformed) features.
        p: probability that a sample gets noise.
    """

    def __init__(self, std: float = 0.1, p: float = 1.0) -> None:
        super().__init__(p=p)
        if std < 0:
            raise ValueError(f"GaussianNoise: std must be >= 0, got {std}")
        self.std = std

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x) * self.std
        return x + noise * selected.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)  # vectors or images


class FeatureMask(Augmentation):
    """Set a random subset of features to zero, each with probability ``rate`` (independently per sample).

    Without rescaling (the default) the kept features are unchanged, so a masked profile looks like one
    with more dropout events (a zero count in scRNA-seq, the mean of a standardised feature). With
    ``rescale`` the kept features are multiplied by ``1 / (1 - rate)`` as in inverted dropout, which keeps
    each feature's expected value; that changes the values a model sees at inference, so it is off by
    default.

    Args:
        rate: probability that a feature is masked.
        p: probability that a sample is masked at all.
        rescale: multiply the kept features by ``1 / (1 - rate)``.
    """

    def __init__(self, rate: float = 0.2, p: float = 1.0, rescale: bool = False) -> None:
        super().__init__(p=p)
        if not 0 <= rate < 1:
            raise ValueError(f"FeatureMask: rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.rescale = rescale

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        keep = torch.rand_like(x) >= self.rate
        keep |= ~selected[:, None]
        factor = keep.to(x.dtype)
        if self.rescale:
            factor = torch.where(selected[:, None], factor / (1 - self.rate), factor)
        return x * factor


class RandomScaling(Augmentation):
    """Multiply each sample by one factor drawn uniformly from ``[low, high]`` (e.g. library-size or
    staining-intensity variation).

    Args:
        low: smallest factor.
        high: largest factor.
        p: probability that a sample is scaled.
    """

    def __init__(self, low: float = 0.8, high: float = 1.2, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not low <= high:
            raise ValueError(f"RandomScaling: need low <= high, got {low} and {high}")
        self.low = low
        self.high = high

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        factor = self.low + (self.high - self.low) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        factor = torch.where(selected, factor, torch.ones_like(factor))
        return x * factor[:, None]


class Mixup(Augmentation):
    """Mix each sample with another sample of the batch: ``lam * x_i + (1 - lam) * x_j``, ``j != i``.

    ``lam`` is drawn from ``Beta(alpha, alpha)`` per sample and folded to ``max(lam, 1 - lam) >= 0.5``,
    so a mixed sample stays mostly itself (its group, its positives). The partner ``j`` is drawn uniformly
    among the other samples of the batch, from the batch as it came in (partners are not themselves
    mixed first). A batch of one sample is left unchanged.

    Args:
        alpha: Beta concentration; small values keep ``lam`` near 1 (light mixing), 1 is uniform on
            ``[0.5, 1]``.
        p: probability that a sample is mixed.
    """

    def __init__(self, alpha: float = 0.4, p: float = 1.0) -> None:
        super().__init__(p=p)
        if alpha <= 0:
            raise ValueError(f"Mixup: alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def sample_partners(self, n: int, device: torch.device) -> torch.Tensor:
        """A partner for every sample, uniform among the other ``n - 1``."""
        return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n

    def sample_lambda(self, n: int, device: torch.device) -> torch.Tensor:
        """Mixing weights of the samples themselves, in ``[0.5, 1]``."""
        concentration = torch.tensor(float(self.alpha), device=device)
        lam = torch.distributions.Beta(concentration, concentration).sample((n,))
        return torch.maximum(lam, 1 - lam)

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < 2:
            return x
        partner = self.sample_partners(n, x.device)
        lam = self.sample_lambda(n, x.device).to(x.dtype)
        lam = torch.where(selected, lam, torch.ones_like(lam))[:, None]
        return lam * x + (1 - lam) * x[partner]
