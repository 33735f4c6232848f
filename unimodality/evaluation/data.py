"""The profiles an evaluator scores: one matrix and its metadata, with the perturbation, batch, control and
label columns that describe it, and replicates aggregated per perturbation on demand."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from unimodality.errors import DataError

#: the name of the representation being evaluated (the report's ``value`` column)
EMBEDDING = "embedding"


class EvaluationData:
    """The profiles an evaluator scores: one matrix (rows: samples) and their metadata.

    Args:
        x: ``(n, d)`` profiles (an embedding or a baseline), aligned already.
        obs: ``n`` rows of metadata.
        dataset: the dataset's name (for messages and the report).
        representation: ``embedding`` or a baseline's name.
        perturbation: the column(s) naming each row's perturbation (several: their combination).
        batch: the column naming each row's batch.
        control: the value marking control rows (in ``control_column``).
        control_column: where ``control`` is looked for; default the first perturbation column.
        labels: label columns (MOA, target, cell type) some evaluators score.
        aggregate: how replicates are combined per perturbation: ``mean`` or ``median``.
    """

    def __init__(
        self,
        x: np.ndarray,
        obs: pd.DataFrame,
        dataset: str = "data",
        representation: str = EMBEDDING,
        perturbation: list[str] | None = None,
        batch: str | None = None,
        control: str | None = None,
        control_column: str | None = None,
        labels: list[str] | None = None,
        aggregate: Literal["mean", "median"] = "mean",
    ) -> None:
        if len(x) != len(obs):
            raise ValueError(f"{dataset}: {len(x)} profiles but {len(obs)} rows of metadata")
        self.x = np.asarray(x)
        self.obs = obs.reset_index(drop=True)
        self.dataset = dataset
        self.representation = representation
        self.perturbation = list(perturbation or [])
        self.batch = batch
        self.control = control
        self.control_column = control_column or (self.perturbation[0] if self.perturbation else None)
        self.labels = list(labels or [])
        self.aggregate = aggregate
        #: the perturbation of each row, for aggregated data (see `aggregated`)
        self.names: np.ndarray | None = None
        self._aggregated: dict[bool, EvaluationData] = {}

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def like(self, x: np.ndarray, obs: pd.DataFrame | None = None, **changes: Any) -> EvaluationData:
        """The same description around other profiles (and optionally other rows of metadata)."""
        settings = dict(dataset=self.dataset, representation=self.representation, perturbation=self.perturbation,
                        batch=self.batch, control=self.control, control_column=self.control_column,
                        labels=self.labels, aggregate=self.aggregate)
        return EvaluationData(x, self.obs if obs is None else obs, **{**settings, **changes})

    def subset(self, rows: np.ndarray) -> EvaluationData:
        """The rows selected by a boolean mask or an index array."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        subset = self.like(self.x[rows], self.obs.iloc[rows])
        subset.names = None if self.names is None else self.names[rows]
        return subset

    def require(self, evaluator: str, *what: str) -> None:
        """Fail with one line when a setting an evaluator needs (``perturbation``, ``control``, ``batch``,
        ``labels``) was not given."""
        missing = [w for w in what if not getattr(self, w)]
        if missing:
            options = ", ".join(f"--{w}" for w in missing)
            raise DataError(f"{evaluator} needs {' and '.join(missing)} (options {options}); dataset {self.dataset}")

    def perturbation_key(self) -> pd.Series:
        """Each row's perturbation as one string (several columns joined by `` | ``); missing: ``None``."""
        if not self.perturbation:
            raise DataError(f"{self.dataset}: no perturbation column given (--perturbation)")
        columns = self.obs[self.perturbation]
        missing = columns.isna().any(axis=1)
        if len(self.perturbation) > 1:
            key = columns.astype(str).agg(" | ".join, axis=1)
        else:
            key = columns.iloc[:, 0].astype(str)
        return key.where(~missing, None)

    def control_mask(self) -> np.ndarray:
        """Boolean: is each row a control row (``control`` in ``control_column``)?"""
        if self.control is None or self.control_column is None:
            return np.zeros(len(self), dtype=bool)
        return (self.obs[self.control_column].astype(str) == str(self.control)).to_numpy()

    def aggregated(self, drop_controls: bool = True) -> EvaluationData:
        """One row per perturbation: its replicates' mean (or median); rows without a perturbation are left
        out, and controls too unless ``drop_controls`` is false. ``obs`` keeps the perturbation and label
        columns (a label's first value within the perturbation) and ``n_replicates``."""
        if drop_controls in self._aggregated:
            return self._aggregated[drop_controls]
        key = self.perturbation_key()
        keep = key.notna().to_numpy() & (~self.control_mask() if drop_controls else True)
        key = key[keep]
        codes, names = pd.factorize(key, sort=True)
        frame = pd.DataFrame(self.x[keep])
        grouped = frame.groupby(codes, sort=True)
        x = (grouped.median() if self.aggregate == "median" else grouped.mean()).to_numpy(dtype=self.x.dtype)
        columns = list(dict.fromkeys([*self.perturbation, *self.labels]))
        obs = self.obs.loc[keep, columns].groupby(codes, sort=True).first().reset_index(drop=True)
        obs["n_replicates"] = np.bincount(codes, minlength=len(names))
        aggregated = self.like(x, obs, batch=None)
        aggregated.names = np.asarray(names, dtype=object)
        self._aggregated[drop_controls] = aggregated
        return aggregated
