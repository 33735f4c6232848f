"""Known-relationship recall: the EFAAR benchmark of Recursion (Celik et al. 2024, "Building, benchmarking and
exploring perturbative maps of transcriptional and morphological data").

Replicates are aggregated per gene (controls left out), the cosine similarity of every pair of genes is the
null distribution, and the recall of a source (CORUM, HuMAP, Reactome, SIGNOR, StringDB) is the fraction of
its annotated pairs whose similarity lies in the bottom or top 5 % of all pairs. Chance is 0.10.

The annotation files are those shipped in the ``efaar-benchmarking`` package (``pip install
"unimodality[eval]"``); CORUM and SIGNOR are licensed CC BY-NC 4.0 (non-commercial use only), HuMAP and
StringDB CC BY 4.0, Reactome CC0. The numbers equal that package's ``known_relationship_benchmark`` (a test
checks it), but the pairwise similarities are never held at once: the thresholds are exact order
statistics found in two passes over blocks of rows, so 20,000 genes (2 x 10^8 pairs) need memory for one
block, not for the n x n matrix.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from unimodality.errors import DataError
from unimodality.evaluation import EvaluationData, Evaluator, Result, Score

#: the sources of ``efaar-benchmarking`` (its ``BENCHMARK_SOURCES``)
SOURCES = ["CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB"]
#: their licences (the package's benchmark_annotations/LICENSE)
LICENCES = {"CORUM": "CC BY-NC 4.0 (non-commercial)", "SIGNOR": "CC BY-NC 4.0 (non-commercial)",
            "HuMAP": "CC BY 4.0", "Reactome": "CC0 1.0", "StringDB": "CC BY 4.0"}
NON_COMMERCIAL = ("CORUM", "SIGNOR")


def annotation_folder() -> Path:
    """The folder of annotation files shipped in ``efaar-benchmarking`` (read without importing its code)."""
    from importlib import resources

    try:
        return Path(str(resources.files("efaar_benchmarking").joinpath("benchmark_annotations")))
    except ModuleNotFoundError:
        raise DataError(
            "KnownRelationshipRecall: the annotation sources (CORUM, HuMAP, Reactome, SIGNOR, StringDB) come with "
            "the efaar-benchmarking package: pip install \"unimodality[eval]\" (or pip install --no-deps "
            "efaar-benchmarking), or give your own pair files (pair_files) and sources: []"
        ) from None


@functools.lru_cache(maxsize=32)
def read_pairs(path: str) -> pd.DataFrame:
    """The relationships of a pair file: columns ``entity1``, ``entity2`` (else its first two columns), comma
    or tab separated; each unordered pair once and no self pairs (as efaar's ``filter_relationships``)."""
    file = Path(path)
    try:
        with open(file) as handle:
            first = handle.readline()
        frame = pd.read_csv(file, sep="\t" if "\t" in first else ",", dtype=str)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"pair file {file}: not readable as CSV/TSV: {error}") from None
    columns = ["entity1", "entity2"] if {"entity1", "entity2"} <= set(frame.columns) else list(frame.columns[:2])
    if len(columns) < 2:
        raise DataError(f"pair file {file}: needs two columns (entity1, entity2), found {list(frame.columns)}")
    pairs = frame[columns].dropna()
    a, b = pairs.iloc[:, 0].to_numpy(str), pairs.iloc[:, 1].to_numpy(str)
    low, high = np.where(a <= b, a, b), np.where(a <= b, b, a)
    out = pd.DataFrame({"entity1": low, "entity2": high})
    return out[out.entity1 != out.entity2].drop_duplicates().reset_index(drop=True)


def _blocks(x: np.ndarray, block_elements: int):
    """The similarities of every pair ``i < j`` of rows of ``x`` (L2-normalised), one block of rows at a time."""
    n = len(x)
    rows = max(1, block_elements // max(n, 1))
    for start in range(0, n - 1, rows):
        stop = min(start + rows, n - 1)
        sim = x[start:stop] @ x[start:].T
        upper = np.arange(n - start)[None, :] > np.arange(stop - start)[:, None]
        yield sim[upper]


def pair_similarity_order_statistics(x: np.ndarray, ranks: list[int], block_elements: int = 2**22,
                                     bins: int = 2**16) -> np.ndarray:
    """The values at 0-based ``ranks`` of the sorted similarities of all pairs ``i < j`` of rows of ``x``.

    Exact, without the ``n (n - 1) / 2`` values in memory: a first pass counts them in ``bins`` bins over
    ``[-1, 1]``, a second keeps only the values of the bins holding the wanted ranks.

    Args:
        x: ``(n, d)`` L2-normalised rows (float64).
        ranks: positions in the sorted similarities, each in ``[0, n (n - 1) / 2)``.
        block_elements: similarities computed at once (memory: about 25 bytes each).
        bins: histogram bins of the first pass.
    """
    def bin_of(values: np.ndarray) -> np.ndarray:
        return np.clip(((values + 1.0) * (bins / 2)).astype(np.int64), 0, bins - 1)

    counts = np.zeros(bins, dtype=np.int64)
    for values in _blocks(x, block_elements):
        counts += np.bincount(bin_of(values), minlength=bins)
    cumulative = np.cumsum(counts)
    wanted = {rank: int(np.searchsorted(cumulative, rank, side="right")) for rank in ranks}
    kept: dict[int, list[np.ndarray]] = {b: [] for b in set(wanted.values())}
    for values in _blocks(x, block_elements):
        where = bin_of(values)
        for b in kept:
            kept[b].append(values[where == b])
    out = []
    for rank in ranks:
        b = wanted[rank]
        values = np.concatenate(kept[b])
        within = rank - (int(cumulative[b - 1]) if b > 0 else 0)
        out.append(np.partition(values, within)[within])
    return np.asarray(out, dtype=np.float64)


def recall_thresholds(n_pairs: int, low: float, high: float) -> tuple[int, int]:
    """``(k, m)``: a similarity ``q`` is in the bottom ``low`` when at most ``k`` pairs are ``<= q`` and in the
    top when at least ``m`` pairs are ``< q`` (the largest ``k`` with ``k / N <= low``, the smallest ``m``
    with ``m / N >= high``, in floating point as efaar compares them)."""
    k = min(n_pairs, int(math.floor(low * n_pairs)))
    while k + 1 <= n_pairs and (k + 1) / n_pairs <= low:
        k += 1
    while k > 0 and k / n_pairs > low:
        k -= 1
    m = max(0, int(math.ceil(high * n_pairs)))
    while m > 0 and (m - 1) / n_pairs >= high:
        m -= 1
    while m <= n_pairs and m / n_pairs < high:
        m += 1
    return k, m


def pair_similarities(x: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int = 2**20) -> np.ndarray:
    """Similarities of the row pairs ``(first[i], second[i])`` of ``x`` (L2-normalised), in chunks."""
    out = np.empty(len(first), dtype=np.float64)
    for start in range(0, len(first), chunk):
        a, b = first[start:start + chunk], second[start:start + chunk]
        out[start:start + chunk] = np.einsum("ij,ij->i", x[a], x[b])
    return out


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (scikit-learn's ``cosine_similarity`` does so)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class KnownRelationshipRecall(Evaluator):
    """Recall of known gene relationships among the most and least similar pairs of genes (EFAAR benchmark).

    Replicates are aggregated per perturbation (controls left out), so perturbation values must be gene
    symbols as the annotation files spell them (HGNC). For each source, ``recall_<low>_<high>`` is the
    fraction of its pairs (both genes in the data) whose cosine similarity lies at or below the ``low``
    quantile or at or above the ``high`` quantile of all pairs' similarities; ``chance`` is
    ``low + 1 - high``. ``target`` ``mean`` averages the sources that had pairs.

    Args:
        sources: annotation sources shipped in ``efaar-benchmarking`` (CORUM, HuMAP, Reactome, SIGNOR,
            StringDB; CORUM and SIGNOR are for non-commercial use only). ``[]``: only ``pair_files``.
        pair_files: your own sources: name -> CSV/TSV file of gene pairs (columns ``entity1``, ``entity2``, or
            the first two).
        thresholds: ``(low, high)`` quantile pairs; efaar's defaults are ``(0.05, 0.95)`` and ``(0.1, 0.9)``.
        min_genes: fewer aggregated genes than this give no score (efaar's ``MIN_REQ_ENT_CNT``).
        block_elements: pairwise similarities computed at once (bounds memory at about 25 bytes each).
    """

    name = "known_relationship_recall"

    def __init__(
        self,
        sources: list[str] = list(SOURCES),
        pair_files: dict[str, str] | None = None,
        thresholds: list[tuple[float, float]] = [(0.05, 0.95)],
        min_genes: int = 20,
        block_elements: int = 2**22,
    ) -> None:
        self.sources = list(sources)
        self.pair_files = dict(pair_files or {})
        self.thresholds = [(float(min(t)), float(max(t))) for t in thresholds]
        for low, high in self.thresholds:
            if not 0 <= low < high <= 1:
                raise DataError(f"KnownRelationshipRecall: thresholds must be (low, high) with 0 <= low < high <= 1; "
                                f"got ({low}, {high})")
        if not self.sources and not self.pair_files:
            raise DataError("KnownRelationshipRecall: give sources or pair_files")
        self.min_genes = min_genes
        self.block_elements = block_elements
        for name, path in self.pair_files.items():
            if not Path(path).is_file():
                raise DataError(f"KnownRelationshipRecall: pair file {path} (source {name!r}) not found")

    def _source_files(self) -> dict[str, str]:
        files = {}
        if self.sources:
            folder = annotation_folder()
            for source in self.sources:
                path = folder / f"{source}.txt"
                if not path.is_file():
                    known = sorted(p.stem for p in folder.glob("*.txt"))
                    raise DataError(f"KnownRelationshipRecall: no annotation source {source!r} in {folder}; "
                                    f"sources: {', '.join(known)}")
                files[source] = str(path)
        return {**files, **self.pair_files}

    def evaluate(self, data: EvaluationData) -> Result:
        data.require("KnownRelationshipRecall", "perturbation")
        files = self._source_files()
        genes = data.aggregated(drop_controls=True)
        names = pd.Index(genes.names)
        metrics = [f"recall_{low:g}_{high:g}" for low, high in self.thresholds]
        result = Result()
        used_non_commercial = [s for s in files if s in NON_COMMERCIAL and s not in self.pair_files]
        if used_non_commercial:
            result.notes.append(f"annotation sources {', '.join(used_non_commercial)} are licensed CC BY-NC 4.0: "
                                "non-commercial use only")
        if len(names) < self.min_genes:
            result.notes.append(f"{len(names)} perturbations after aggregation, fewer than min_genes={self.min_genes}: "
                                "no recall")
            for source in [*files, "mean"]:
                result.scores += [Score(m, math.nan, source, 0, lo + 1 - hi)
                                  for m, (lo, hi) in zip(metrics, self.thresholds)]
            return result
        x = normalized(genes.x)
        n_pairs = len(names) * (len(names) - 1) // 2
        cuts = [recall_thresholds(n_pairs, low, high) for low, high in self.thresholds]
        ranks = sorted({r for k, m in cuts
                        for r in ([k] if k < n_pairs else []) + ([m - 1] if 1 <= m <= n_pairs else [])})
        values = dict(zip(ranks, pair_similarity_order_statistics(x, ranks, self.block_elements))) if ranks else {}
        rows, recalls = [], {m: [] for m in metrics}
        for source, path in files.items():
            pairs = read_pairs(path)
            first, second = names.get_indexer(pairs.entity1), names.get_indexer(pairs.entity2)
            present = (first >= 0) & (second >= 0)
            sims = pair_similarities(x, first[present], second[present])
            row = {"source": source, "pairs": int(present.sum()), "pairs_in_file": len(pairs),
                   "genes_in_pairs": int(len(np.union1d(first[present], second[present]))),
                   "licence": LICENCES.get(source, "(your file)") if source not in self.pair_files else "(your file)"}
            for metric, (low, high), (k, m) in zip(metrics, self.thresholds, cuts):
                if not len(sims):
                    value = math.nan
                else:
                    in_low = np.ones(len(sims), bool) if k >= n_pairs else sims < values[k]
                    in_high = np.ones(len(sims), bool) if m == 0 else (
                        sims > values[m - 1] if m <= n_pairs else np.zeros(len(sims), bool))
                    value = float(np.mean(in_low | in_high))
                    recalls[metric].append(value)
                row[metric] = value
                result.scores.append(Score(metric, value, source, int(present.sum()), low + 1 - high))
            if not present.any():
                example = ", ".join(map(str, names[:3]))
                result.notes.append(f"source {source}: none of its pairs has both genes in the data (genes look like "
                                    f"{example}; the annotations use HGNC symbols)")
            rows.append(row)
        total = sum(r["pairs"] for r in rows)
        for metric, (low, high) in zip(metrics, self.thresholds):
            mean = float(np.mean(recalls[metric])) if recalls[metric] else math.nan
            result.scores.append(Score(metric, mean, "mean", total, low + 1 - high))
        result.details = pd.DataFrame(rows)
        return result
