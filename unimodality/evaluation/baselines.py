"""The baselines every number is read against: the raw features, their PCA to the embedding's dimension, and
a random projection of them."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from unimodality.errors import DataError

#: the baselines scored beside every embedding
BASELINES = ("raw", "pca", "random")


def baseline_profiles(raw: np.ndarray, dim: int, baselines: Iterable[str], seed: int = 0) -> dict[str, np.ndarray]:
    """The baselines of an embedding of dimension ``dim`` computed from the raw features.

    ``raw``: the features themselves; ``pca``: their first ``dim`` principal components (the field's
    strongest simple baseline); ``random``: a Gaussian random projection to ``dim`` dimensions.
    """
    out: dict[str, np.ndarray] = {}
    for name in baselines:
        if name == "raw":
            out[name] = raw
        elif name == "pca":
            from sklearn.decomposition import PCA

            components = max(1, min(dim, raw.shape[0], raw.shape[1]))
            out[name] = PCA(n_components=components, random_state=seed).fit_transform(raw.astype(np.float64))
        elif name == "random":
            rng = np.random.default_rng(seed)
            projection = rng.standard_normal((raw.shape[1], dim)) / math.sqrt(dim)
            out[name] = raw.astype(np.float64) @ projection
        else:
            raise DataError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")
    return out
