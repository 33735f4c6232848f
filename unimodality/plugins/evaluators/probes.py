"""Label probes: how well a label (cell type, MOA, sample of origin) can be read off the profiles, by
k-nearest neighbours and by a linear classifier (scikit-learn), cross-validated."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData, Evaluator, Result, Score


class LabelProbe(Evaluator):
    """Base of the cross-validated label probes: folds, grouping by perturbation, scores.

    Scores per label column (``target``): ``accuracy`` (``chance``: the majority class's share),
    ``balanced_accuracy`` (``chance``: ``1 / classes``) and ``macro_f1``; ``n``: rows scored. Rows without a
    label and classes with fewer than two rows are left out (noted). When a perturbation column is given
    (and is not the label), folds never split a perturbation's replicates, so a replicate is never
    classified by its own twin.
    """

    def __init__(self, label: str | None = None, folds: int = 5, group_by_perturbation: bool = True,
                 aggregate: bool = False, max_rows: int | None = 50000, seed: int = 0) -> None:
        if folds < 2:
            raise DataError(f"{type(self).__name__}: folds must be >= 2, got {folds}")
        self.label = label
        self.folds = folds
        self.group_by_perturbation = group_by_perturbation
        self.aggregate = aggregate
        self.max_rows = max_rows
        self.seed = seed

    def model(self):  # the scikit-learn estimator
        raise NotImplementedError

    def evaluate(self, data: EvaluationData) -> Result:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict

        labels = [self.label] if self.label else data.labels
        if not labels:
            raise DataError(f"{type(self).__name__} needs a label column (its label option, or --labels); "
                            f"dataset {data.dataset}")
        if self.label and self.label not in data.labels:
            data = data.like(data.x, labels=[*data.labels, self.label])
        if self.aggregate:
            data = data.aggregated(drop_controls=True)
        result = Result()
        for label in labels:
            if label not in data.obs.columns:
                raise DataError(f"{data.dataset}: {type(self).__name__}: no label column {label!r}")
            y = data.obs[label]
            keep = y.notna().to_numpy()
            grouped = (self.group_by_perturbation and bool(data.perturbation) and label not in data.perturbation
                       and not self.aggregate)
            if grouped:
                # a class of one perturbation can never be predicted when its replicates share a fold
                units = data.perturbation_key()
                keep &= units.notna().to_numpy()
                counts = pd.Series(units[keep].to_numpy()).groupby(y[keep].astype(str).to_numpy()).nunique()
            else:
                counts = y[keep].astype(str).value_counts()
            rare = counts[counts < 2].index
            keep &= ~y.astype(str).isin(rare).to_numpy()
            if len(rare):
                unit = "perturbation" if grouped else "row"
                result.notes.append(f"label {label}: {len(rare)} class(es) with a single {unit} left out")
            rows = np.flatnonzero(keep)
            rng = np.random.default_rng(self.seed)
            if self.max_rows is not None and len(rows) > self.max_rows:
                rows = np.sort(rng.choice(rows, self.max_rows, replace=False))
                result.notes.append(f"label {label}: a random {self.max_rows} of the rows scored (max_rows)")
            target = y.iloc[rows].astype(str).to_numpy()
            classes = np.unique(target)
            if len(classes) < 2:
                result.notes.append(f"label {label}: fewer than two classes: no probe")
                result.scores += [Score("accuracy", math.nan, label, len(rows))]
                continue
            groups = data.perturbation_key().iloc[rows].to_numpy() if grouped else None
            folds = min(self.folds, int(pd.Series(target).value_counts().max()))
            if groups is not None:
                folds = min(folds, len(np.unique(groups)))
                splitter = StratifiedGroupKFold(n_splits=max(2, folds), shuffle=True, random_state=self.seed)
            else:
                splitter = StratifiedKFold(n_splits=max(2, folds), shuffle=True, random_state=self.seed)
            with warnings.catch_warnings():
                # rare classes trigger "least populated class" warnings: the scores account for them
                warnings.simplefilter("ignore", UserWarning)
                predicted = cross_val_predict(self.model(), data.x[rows], target, groups=groups, cv=splitter)
            majority = pd.Series(target).value_counts(normalize=True).iloc[0]
            n = len(rows)
            result.scores += [
                Score("accuracy", float(accuracy_score(target, predicted)), label, n, float(majority)),
                Score("balanced_accuracy", float(balanced_accuracy_score(target, predicted)), label, n,
                      1.0 / len(classes)),
                Score("macro_f1", float(f1_score(target, predicted, average="macro")), label, n),
            ]
        return result


class KNNClassification(LabelProbe):
    """k-nearest-neighbour classification of a label (cosine distance, majority vote), cross-validated.

    Args:
        label: the label column; default every column of the evaluation's ``labels``.
        k: neighbours voting.
        folds: cross-validation folds (fewer when a class or the perturbations are too few).
        group_by_perturbation: keep a perturbation's replicates in one fold.
        aggregate: classify perturbations (replicates aggregated, controls left out) instead of rows.
        max_rows: score a random subset of at most this many rows (``null``: all).
        seed: seed of the folds and the subset.
    """

    name = "knn_classification"

    def __init__(self, label: str | None = None, k: int = 5, folds: int = 5, group_by_perturbation: bool = True,
                 aggregate: bool = False, max_rows: int | None = 50000, seed: int = 0) -> None:
        super().__init__(label, folds, group_by_perturbation, aggregate, max_rows, seed)
        if k < 1:
            raise DataError(f"KNNClassification: k must be >= 1, got {k}")
        self.k = k

    def model(self):
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=self.k, metric="cosine")


class LinearProbe(LabelProbe):
    """A linear probe: logistic regression on standardised profiles, cross-validated.

    Args:
        label: the label column; default every column of the evaluation's ``labels``.
        regularization: inverse regularisation strength ``C`` of the logistic regression.
        max_iter: solver iterations.
        folds: cross-validation folds (fewer when a class or the perturbations are too few).
        group_by_perturbation: keep a perturbation's replicates in one fold.
        aggregate: classify perturbations (replicates aggregated, controls left out) instead of rows.
        max_rows: score a random subset of at most this many rows (``null``: all).
        seed: seed of the folds and the subset.
    """

    name = "linear_probe"

    def __init__(self, label: str | None = None, regularization: float = 1.0, max_iter: int = 1000, folds: int = 5,
                 group_by_perturbation: bool = True, aggregate: bool = False, max_rows: int | None = 50000,
                 seed: int = 0) -> None:
        super().__init__(label, folds, group_by_perturbation, aggregate, max_rows, seed)
        if regularization <= 0:
            raise DataError(f"LinearProbe: regularization must be > 0, got {regularization}")
        self.regularization = regularization
        self.max_iter = max_iter

    def model(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=self.regularization, max_iter=self.max_iter))
