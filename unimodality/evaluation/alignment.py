"""Alignment before scoring, as the field does it: every batch centred (and optionally scaled) on its control
rows, typical variation normalisation (TVN: PCA-whitening on the controls, then per-batch CORAL)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation.data import EvaluationData


@dataclass(frozen=True)
class Alignment:
    """How profiles are aligned before they are scored: the same steps for the embedding and every baseline.

    Args:
        center: subtract from every batch the mean of its control rows (of all its rows when no control
            value is given). A batch without a control row is an error.
        scale: also divide every batch by its control rows' standard deviation, per feature (a feature
            constant on the controls is left unscaled).
        tvn: typical variation normalisation, as in EFAAR (Celik et al. 2024): the controls' PCA whitens
            every row (centred and scaled on all controls before and after), then CORAL aligns each batch's
            control covariance to the identity (``x @ (C_batch + r I)^(-1/2)``). Needs a control value. The
            dimension becomes at most the number of control rows.
        coral_regularization: ``r`` above: added to each batch's control covariance before it is inverted.
        aggregate: how evaluators that score perturbations (known-relationship recall, consistency mAP,
            cross-modal retrieval) combine a perturbation's replicates: ``mean`` or ``median``.
    """

    center: bool = True
    scale: bool = False
    tvn: bool = False
    coral_regularization: float = 0.5
    aggregate: Literal["mean", "median"] = "mean"

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "median"):
            raise DataError(f"alignment.aggregate must be mean or median, got {self.aggregate!r}")
        if self.coral_regularization < 0:
            raise DataError(f"alignment.coral_regularization must be >= 0, got {self.coral_regularization}")

    def describe(self) -> str:
        steps = [("centre" + ("+scale" if self.scale else "")) + " per batch on controls" if self.center else "",
                 "TVN" if self.tvn else ""]
        return ", ".join(s for s in steps if s) or "none"


def align(data: EvaluationData, alignment: Alignment) -> EvaluationData:
    """``data`` aligned as `Alignment` describes (float64 profiles)."""
    x = np.array(data.x, dtype=np.float64)
    controls = data.control_mask()
    if alignment.center or alignment.scale:
        for batch, rows in _batches(data):
            reference = rows & controls if data.control is not None else rows
            if not reference.any():
                raise DataError(
                    f"{data.dataset}: batch {batch!r} (column {data.batch!r}) has no control row "
                    f"({data.control_column} == {data.control!r}); centring on controls needs one in every batch: "
                    "drop that batch, or set alignment.center false"
                )
            x[rows] = _standardize(x[rows], x[reference], scale=alignment.scale)
    if alignment.tvn:
        if data.control is None:
            raise DataError(f"{data.dataset}: alignment.tvn whitens on the control rows: give --control")
        x = _tvn(data, x, controls, alignment.coral_regularization)
    return data.like(x, aggregate=alignment.aggregate)


def _batches(data: EvaluationData) -> Iterable[tuple[Any, np.ndarray]]:
    if data.batch is None:
        yield "(all rows)", np.ones(len(data), dtype=bool)
        return
    values = data.obs[data.batch]
    for batch in pd.unique(values):
        yield batch, (values == batch).to_numpy() if not pd.isna(batch) else values.isna().to_numpy()


def _standardize(x: np.ndarray, reference: np.ndarray, scale: bool) -> np.ndarray:
    """``x`` centred (and scaled) on ``reference``'s statistics, as scikit-learn's ``StandardScaler``."""
    x = x - reference.mean(axis=0)
    if scale:
        std = reference.std(axis=0)
        x /= np.where(std > 10 * np.finfo(np.float64).eps, std, 1.0)
    return x


def _tvn(data: EvaluationData, x: np.ndarray, controls: np.ndarray, regularization: float) -> np.ndarray:
    from sklearn.decomposition import PCA

    if controls.sum() < 2:
        raise DataError(f"{data.dataset}: alignment.tvn needs at least 2 control rows, found {int(controls.sum())}")
    x = _standardize(x, x[controls], scale=True)
    x = PCA().fit(x[controls]).transform(x)
    x = _standardize(x, x[controls], scale=True)
    if data.batch is None:
        return x
    for batch, rows in _batches(data):
        reference = rows & controls
        if reference.sum() < 2:
            raise DataError(f"{data.dataset}: batch {batch!r} (column {data.batch!r}) has {int(reference.sum())} "
                            "control row(s); CORAL (alignment.tvn) needs at least 2 per batch")
        covariance = np.cov(x[reference], rowvar=False, ddof=1) + regularization * np.eye(x.shape[1])
        values, vectors = np.linalg.eigh(np.atleast_2d(covariance))
        x[rows] = x[rows] @ (vectors * values.clip(min=np.finfo(np.float64).tiny) ** -0.5) @ vectors.T
    return x
