"""Cross-modal retrieval at the perturbation level: the metric ``fit`` logs (``val/pert/...``), on any two
embedded datasets sharing perturbations."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData, Evaluator, Result, Score
from unimodality.metrics import perturbation_retrieval


class CrossModalRetrieval(Evaluator):
    """Perturbation-level retrieval between datasets embedded in one space (e.g. the transcriptomics and
    phenomics files of a CLIP model): replicates are averaged per perturbation in each dataset (controls
    left out); each perturbation's mean in one queries all means of the other, and the right answer is the
    same perturbation. Only perturbations present in both count.

    Scores per direction (``target`` ``a->b``): ``recall@k`` (``chance`` ``k / P``) and ``mrr`` (``chance``
    ``H_P / P``); ``n``: ``P``, the shared perturbations. Baselines do not apply (the raw features of two
    modalities live in different spaces): read the values against chance.

    Args:
        ks: the cut-offs of recall@k.
        pairs: which datasets to compare, as ``[a, b]`` name pairs; default every pair, in input order.
    """

    name = "cross_modal_retrieval"
    across_datasets = True

    def __init__(self, ks: list[int] = [1, 5, 10], pairs: list[tuple[str, str]] | None = None) -> None:
        if not ks or any(k < 1 for k in ks):
            raise DataError(f"CrossModalRetrieval: ks must be positive integers, got {ks}")
        self.ks = [int(k) for k in ks]
        self.pairs = [tuple(p) for p in pairs] if pairs else None

    def evaluate_datasets(self, datasets: Mapping[str, EvaluationData]) -> Result:
        if len(datasets) < 2:
            raise DataError("CrossModalRetrieval compares two datasets (e.g. two embedded files); got "
                            f"{len(datasets)}: {', '.join(datasets)}")
        pairs = self.pairs or list(itertools.combinations(datasets, 2))
        result = Result()
        rows = []
        for a, b in pairs:
            for name in (a, b):
                if name not in datasets:
                    raise DataError(f"CrossModalRetrieval: no dataset {name!r}; datasets: {', '.join(datasets)}")
                datasets[name].require("CrossModalRetrieval", "perturbation")
            first, second = datasets[a], datasets[b]
            if first.dim != second.dim:
                raise DataError(f"CrossModalRetrieval: {a} and {b} have embeddings of different dimensions "
                                f"({first.dim} and {second.dim}): they are not in one space")
            keys = [d.perturbation_key().where(~d.control_mask(), None) for d in (first, second)]
            keep = [k.notna().to_numpy() for k in keys]
            codes, _ = pd.factorize(pd.concat([keys[0][keep[0]], keys[1][keep[1]]], ignore_index=True))
            group_a = torch.from_numpy(codes[: keep[0].sum()].astype(np.int64))
            group_b = torch.from_numpy(codes[keep[0].sum():].astype(np.int64))
            found = perturbation_retrieval(torch.from_numpy(first.x[keep[0]]).float(), group_a,
                                           torch.from_numpy(second.x[keep[1]]).float(), group_b, tuple(self.ks))
            if not found:
                result.notes.append(f"{a} and {b} share no perturbation: no cross-modal retrieval")
                continue
            count = int(found["count"])
            for direction, target in (("forward", f"{a}->{b}"), ("backward", f"{b}->{a}")):
                for k in self.ks:
                    result.scores.append(Score(f"recall@{k}", float(found[f"recall@{k}/{direction}"]), target, count,
                                               float(found[f"chance@{k}"])))
                result.scores.append(Score("mrr", float(found[f"mrr/{direction}"]), target, count,
                                           float(found["chance_mrr"])))
            rows.append({"a": a, "b": b, "perturbations": count})
        if not result.scores:
            result.scores = [Score("mrr", math.nan, "", 0)]
        result.details = pd.DataFrame(rows) if rows else None
        return result
