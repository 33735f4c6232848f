"""Mean average precision with permutation p-values, computed by copairs (Kalinin et al. 2025, "A versatile
information retrieval framework for evaluating profile strength and similarity", Nature Communications).

- **replicate retrieval** (phenotypic activity): each replicate of a perturbation ranks the perturbation's
  other replicates against the control rows; a perturbation's mAP is the mean of its replicates' average
  precisions, and its p-value comes from copairs' null of random rankings. Benjamini-Hochberg corrected
  (q) values below ``threshold`` mark a perturbation as retrieved; ``fraction_retrieved`` ("percent
  retrieved" / "percent active" in the Cell Painting literature) is their share.
- **consistency**: perturbations (replicates aggregated, controls left out) sharing a label (MOA, target)
  rank each other against perturbations of other labels; mAP, p- and q-values per label.

Our torchmetrics mAP (``unimodality.metrics.replicate_map``) remains the fast in-training metric; a test
checks that both give the same average precisions on the same rankings.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData, Evaluator, Result, Score


def _copairs():
    try:
        import copairs.map as copairs_map
    except ModuleNotFoundError:
        raise DataError("mAP evaluators use the copairs package: pip install \"unimodality[eval]\" (or pip install "
                        "copairs)") from None
    return copairs_map


def chance_map(ap: pd.DataFrame, by: str) -> float:
    """The mAP of random rankings: per query copairs' expected AP for its positives and negatives, averaged as
    the mAP is (over each group's queries, then over groups)."""
    from copairs.map.normalization import expected_ap

    valid = ap[(ap["n_pos_pairs"] > 0) & ap["average_precision"].notna()]
    if valid.empty:
        return math.nan
    expected = [expected_ap(int(m), int(t - m)) for m, t in zip(valid["n_pos_pairs"], valid["n_total_pairs"])]
    return float(valid.assign(expected=expected).groupby(by, observed=True)["expected"].mean().mean())


def map_scores(meta: pd.DataFrame, x: np.ndarray, group: str, pos_sameby: list[str], pos_diffby: list[str],
               neg_sameby: list[str], neg_diffby: list[str], null_size: int, threshold: float, seed: int,
               batch_size: int, multilabel: bool = False) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """copairs' average precision of every query and mAP, p-value, q-value of every ``group``; ``None`` when
    no positive (or no negative) pair exists."""
    copairs_map = _copairs()
    from copairs.matching import UnpairedException

    try:
        if multilabel:
            ap = copairs_map.multilabel.average_precision(meta, x, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                                                          multilabel_col=group, batch_size=batch_size,
                                                          progress_bar=False)
        else:
            ap = copairs_map.average_precision(meta, x, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                                               batch_size=batch_size, progress_bar=False)
    except UnpairedException:
        return None
    if not ((ap["n_pos_pairs"] > 0) & ap["average_precision"].notna()).any():
        return None
    maps = copairs_map.mean_average_precision(ap, [group], null_size=null_size, threshold=threshold, seed=seed,
                                              progress_bar=False)
    return ap, maps.drop(columns=["indices"], errors="ignore")


class ReplicateRetrievalMAP(Evaluator):
    """Replicate retrieval (phenotypic activity): do a perturbation's replicates find each other among the
    controls? copairs' mAP per perturbation with permutation p-values, FDR-corrected.

    Scores: ``mAP`` (mean over perturbations; ``chance``: random rankings), ``fraction_retrieved`` (share of
    perturbations with q < ``threshold``; about 0 for random profiles) and ``mean_normalized_mAP`` (copairs'
    scale-free mAP: 0 at chance, 1 perfect). ``n``: perturbations with at least two replicates.

    Args:
        null_size: random rankings in each null distribution (the smallest p-value is ``1 / (null_size + 1)``).
        threshold: q-value below which a perturbation counts as retrieved.
        different_batch: replicates count as positives only across batches (guards against plate effects).
        seed: seed of the null distributions.
        batch_size: pairs per similarity block in copairs.
    """

    name = "replicate_retrieval_map"
    distribution = "mean_average_precision"

    def __init__(self, null_size: int = 10000, threshold: float = 0.05, different_batch: bool = False,
                 seed: int = 0, batch_size: int = 20000) -> None:
        if null_size < 1:
            raise DataError(f"ReplicateRetrievalMAP: null_size must be >= 1, got {null_size}")
        self.null_size = null_size
        self.threshold = threshold
        self.different_batch = different_batch
        self.seed = seed
        self.batch_size = batch_size

    def evaluate(self, data: EvaluationData) -> Result:
        data.require("ReplicateRetrievalMAP", "perturbation", "control")
        if self.different_batch:
            data.require("ReplicateRetrievalMAP (different_batch)", "batch")
        return activity(data, self.null_size, self.threshold, self.seed, self.batch_size, self.different_batch)


def activity(data: EvaluationData, null_size: int, threshold: float, seed: int, batch_size: int,
             different_batch: bool = False) -> Result:
    """Replicate-retrieval mAP of every perturbation (see `ReplicateRetrievalMAP`)."""
    key = data.perturbation_key()
    keep = key.notna().to_numpy()
    controls = data.control_mask()[keep]
    meta = pd.DataFrame({"perturbation": key[keep].to_numpy()})
    # copairs' convention: every control row its own reference index, the others -1, so replicates pair
    # with each other and every non-control row pairs negatively with the controls only
    meta["reference"] = np.where(controls, np.arange(len(meta)), -1)
    columns = ["perturbation", "reference"]
    if different_batch:
        meta["batch"] = data.obs.loc[keep, data.batch].astype(str).to_numpy()
    result = Result()
    found = map_scores(meta, np.ascontiguousarray(data.x[keep]), "perturbation", columns,
                       ["batch"] if different_batch else [], [], columns, null_size, threshold, seed, batch_size)
    if found is None:
        result.notes.append("no perturbation has two replicates (or there are no controls): no replicate retrieval")
        result.scores = [Score("mAP", math.nan, n=0), Score("fraction_retrieved", math.nan, n=0)]
        return result
    ap, maps = found
    replicates = meta[~controls].groupby("perturbation").size()
    maps["n_replicates"] = maps["perturbation"].map(replicates).astype(int)
    n = len(maps)
    result.scores = [
        Score("mAP", float(maps["mean_average_precision"].mean()), n=n, chance=chance_map(ap, "perturbation")),
        Score("fraction_retrieved", float(maps["below_corrected_p"].mean()), n=n),
        Score("mean_normalized_mAP", float(maps["mean_normalized_average_precision"].mean()), n=n, chance=0.0),
    ]
    result.details = maps
    return result


class ConsistencyMAP(Evaluator):
    """Consistency: do perturbations sharing a label (MOA, target) retrieve each other? copairs' mAP per label
    with permutation p-values, FDR-corrected, on replicates aggregated per perturbation (controls left out).

    Scores per label column (``target``): ``mAP`` (mean over label values; ``chance``: random rankings),
    ``fraction_retrieved`` (share of label values with q < ``threshold``) and ``mean_normalized_mAP``. ``n``:
    label values shared by at least two perturbations.

    Args:
        label: the label column; default every column of the evaluation's ``labels``.
        separator: a label cell may hold several values separated by this (``"|"`` in the Drug Repurposing
            Hub's MOA and target columns); each value is then a label of its own (copairs' multilabel mAP).
        active_only: score only perturbations whose replicate retrieval has q < ``threshold`` (the field's
            practice: an inactive compound has no phenotype to be consistent with). Needs a control value.
        null_size: random rankings in each null distribution.
        threshold: q-value below which a label counts as retrieved.
        seed: seed of the null distributions.
        batch_size: pairs per similarity block in copairs.
    """

    name = "consistency_map"
    distribution = "mean_average_precision"

    def __init__(self, label: str | None = None, separator: str | None = None, active_only: bool = False,
                 null_size: int = 10000, threshold: float = 0.05, seed: int = 0, batch_size: int = 20000) -> None:
        self.label = label
        self.separator = separator
        self.active_only = active_only
        self.null_size = null_size
        self.threshold = threshold
        self.seed = seed
        self.batch_size = batch_size

    def evaluate(self, data: EvaluationData) -> Result:
        data.require("ConsistencyMAP", "perturbation")
        labels = [self.label] if self.label else data.labels
        if not labels:
            raise DataError(f"ConsistencyMAP needs a label column (its label option, or --labels); "
                            f"dataset {data.dataset}")
        missing = [c for c in labels if c not in data.obs.columns]
        if missing:
            raise DataError(f"{data.dataset}: ConsistencyMAP: no label column {missing[0]!r}")
        if self.label and self.label not in data.labels:
            data = data.like(data.x, labels=[*data.labels, self.label])
        profiles = data.aggregated(drop_controls=True)
        result = Result()
        if self.active_only:
            data.require("ConsistencyMAP (active_only)", "control")
            active = activity(data, self.null_size, self.threshold, self.seed, self.batch_size).details
            names = set(active.loc[active["below_corrected_p"], "perturbation"]) if active is not None else set()
            profiles = profiles.subset(np.isin(profiles.names, list(names)))
            result.notes.append(f"{len(profiles)} perturbations with replicate-retrieval q < {self.threshold} scored")
        frames = []
        for label in labels:
            values = profiles.obs[label]
            keep = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
            meta = pd.DataFrame({"label": values[keep].astype(str).to_numpy(),
                                 "perturbation": profiles.names[keep]})
            multilabel = self.separator is not None
            if multilabel:
                meta["label"] = meta["label"].map(lambda v: sorted({p.strip() for p in v.split(self.separator)
                                                                     if p.strip()}))
            found = None
            if len(meta) > 1:
                found = map_scores(meta, np.ascontiguousarray(profiles.x[keep]), "label", ["label"], [], [], ["label"],
                                   self.null_size, self.threshold, self.seed, self.batch_size, multilabel=multilabel)
            if found is None:
                result.notes.append(f"label {label}: no two perturbations share a value: no consistency score")
                result.scores += [Score("mAP", math.nan, label, 0), Score("fraction_retrieved", math.nan, label, 0)]
                continue
            ap, maps = found
            n = len(maps)
            result.scores += [
                Score("mAP", float(maps["mean_average_precision"].mean()), label, n, chance_map(ap, "label")),
                Score("fraction_retrieved", float(maps["below_corrected_p"].mean()), label, n),
                Score("mean_normalized_mAP", float(maps["mean_normalized_average_precision"].mean()), label, n, 0.0),
            ]
            frames.append(maps.rename(columns={"label": "label_value"}).assign(label=label))
        result.details = pd.concat(frames, ignore_index=True) if frames else None
        return result
