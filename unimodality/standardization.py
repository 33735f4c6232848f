"""Per-feature standardisation of a tower's input with statistics of the training rows.

Cell Painting features (and other tables of measurements) are routinely standardised per feature. Done
inside the tower, the statistics are buffers of the model: computed once from the training rows when a fit
starts, saved in every checkpoint, and applied by `predict`, `validate` and `unimodality.load(...).embed`
exactly as in training, whatever file is embedded later.

Methods:
  - ``zscore``: ``(x - mean) / std``.
  - ``robust``: ``(x - median) / (IQR / 1.349)``, the IQR scaled to equal the standard deviation for normal
    data; insensitive to the outlier wells and cells a screen always has.

A feature whose spread is zero (constant on the training rows) keeps a scale of 1, so it becomes 0 rather
than NaN or infinite.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch

Method = Literal["zscore", "robust"]
METHODS = ("zscore", "robust")
#: rows per process the robust statistics are computed from (quantiles need the values, not sums)
ROBUST_ROWS = 100_000
#: normal distribution's interquartile range in standard deviations
IQR_PER_STD = 1.349


def statistics(
    rows: Iterable[torch.Tensor], method: Method, width: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(center, scale)`` of ``rows`` (batches of shape ``(n, width)``) by ``method``, over every process.

    Under DDP each process passes its own rows: the zscore sums and the robust rows are combined across
    processes, so every process gets the statistics of all training rows (the same as one process would).

    Args:
        rows: the batches of input rows.
        method: ``zscore`` or ``robust``.
        width: the number of features.
        where: what the rows are, for errors (e.g. ``tower 'ph'``).
    """
    if method not in METHODS:
        raise ValueError(f"{where}: standardize must be one of {', '.join(METHODS)}, got {method!r}")
    count = torch.zeros((), dtype=torch.float64)
    total = torch.zeros(width, dtype=torch.float64)
    squares = torch.zeros(width, dtype=torch.float64)
    kept: list[np.ndarray] = []
    for batch in rows:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.shape[1] != width:
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"{where}: standardize needs feature vectors of shape (batch, {width}), got {got}")
        x = batch.detach().to("cpu", torch.float64)
        count += len(x)
        total += x.sum(dim=0)
        squares += (x * x).sum(dim=0)
        if method == "robust" and sum(len(k) for k in kept) < ROBUST_ROWS:
            kept.append(x.to(torch.float32).numpy())
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if method == "zscore":
        if distributed:
            sums = torch.cat([count[None], total, squares])
            torch.distributed.all_reduce(sums)
            count, total, squares = sums[0], sums[1:width + 1], sums[width + 1:]
        if count == 0:
            raise ValueError(f"{where}: no training rows to compute the standardisation statistics from")
        center = total / count
        spread = (squares / count - center * center).clamp(min=0).sqrt()
    else:
        values = np.concatenate(kept)[:ROBUST_ROWS] if kept else np.zeros((0, width), np.float32)
        if distributed:
            gathered: list[np.ndarray | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        if len(values) == 0:
            raise ValueError(f"{where}: no training rows to compute the standardisation statistics from")
        low, center, high = np.quantile(values.astype(np.float64), [0.25, 0.5, 0.75], axis=0)
        center, spread = torch.from_numpy(center), torch.from_numpy((high - low) / IQR_PER_STD)
    scale = torch.where(spread > 1e-8 * center.abs().clamp(min=1), spread, torch.ones_like(spread))
    return center.float(), scale.float()
