"""Retrieval metrics: row-level cross-modal recall, perturbation-level retrieval, replicate mean average precision.

Three views of how well embeddings retrieve what they should:

- **row level** (``recall@k``): every evaluation embedding of one modality queries all embeddings of the
  other; a hit is any replicate of the same perturbation among the ``k`` nearest.
- **perturbation level** (``pert/recall@k``, ``pert/mrr``): the replicates of each perturbation are averaged
  per modality (then L2-normalised), and each perturbation's mean queries the other modality's means. There
  is exactly one right answer per query, so the chance levels are simple: ``k / P`` and ``H_P / P`` for ``P``
  perturbations. This is what a biologist asks: "given this compound's RNA profile, which compound is it?"
- **replicate retrieval** (``map/<modality>``): within one modality, every replicate queries all others;
  mean average precision of finding its own perturbation's other replicates (the mAP of Cell Painting
  "phenotypic activity"), next to the mAP of a random ranking.

Ranking metrics come from torchmetrics' functional retrieval metrics (hit rate, reciprocal rank, average
precision); this module only decides what is a query, a candidate and a right answer.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_hit_rate,
    retrieval_reciprocal_rank,
)
from torchmetrics.utilities import dim_zero_cat

#: target value of a candidate that is not a candidate at all (the query itself): torchmetrics drops it
EXCLUDED = -1


def hits_at_k(sim: torch.Tensor, positive: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Boolean ``(queries, len(ks))``: is a positive among each query's ``k`` most similar candidates?

    Args:
        sim: ``(queries, candidates)`` similarities.
        positive: ``(queries, candidates)`` boolean mask of right answers.
        ks: the cut-offs.
    """
    best_positive = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    # rank of the best positive = candidates scoring strictly higher (ties count in its favour)
    rank = (sim > best_positive).sum(dim=1)
    return torch.stack([rank < k for k in ks], dim=1)


def row_recall(
    queries: torch.Tensor, candidates: torch.Tensor, query_group: torch.Tensor, candidate_group: torch.Tensor,
    ks: tuple[int, ...], chunk_size: int = 1024,
) -> torch.Tensor:
    """Recall@k (one value per ``k``) of retrieving a candidate of the query's group, over all queries.

    Args:
        queries: ``(n, d)`` L2-normalised embeddings.
        candidates: ``(m, d)`` L2-normalised embeddings.
        query_group: ``(n,)`` perturbation ids of the queries.
        candidate_group: ``(m,)`` perturbation ids of the candidates.
        ks: the cut-offs.
        chunk_size: queries per similarity block (bounds memory to ``chunk_size x m``).
    """
    hits = []
    for start in range(0, len(queries), chunk_size):
        sim = queries[start:start + chunk_size] @ candidates.T
        positive = query_group[start:start + chunk_size, None] == candidate_group[None, :]
        hits.append(hits_at_k(sim, positive, ks))
    return torch.cat(hits).float().mean(dim=0)


def retrieval_scores(
    sim: torch.Tensor,
    target: torch.Tensor,
    ks: tuple[int, ...] = (),
    mrr: bool = False,
    average_precision: bool = False,
) -> dict[str, torch.Tensor]:
    """Ranking metrics of every query (row of ``sim``) averaged over the queries that have a right answer.

    Each query is scored with torchmetrics' functional retrieval metrics (``retrieval_hit_rate``,
    ``retrieval_reciprocal_rank``, ``retrieval_average_precision``). The modular ``Retrieval*`` classes
    compute the same, but sort and regroup a flattened ``queries x candidates`` table first, which was about
    40 times slower here for a few hundred queries.

    Args:
        sim: ``(queries, candidates)`` similarities (any real values).
        target: ``(queries, candidates)``: 1 for a right answer, 0 for a wrong one, ``EXCLUDED`` (-1) for an
            entry that is not a candidate (e.g. the query itself).
        ks: cut-offs of ``recall@k`` (torchmetrics' hit rate: a right answer among the ``k`` best).
        mrr: also compute the mean reciprocal rank of the first right answer (``mrr``).
        average_precision: also compute the mean average precision (``map``).

    Returns:
        ``{"recall@k": ..., "mrr": ..., "map": ..., "queries": number of answerable queries}``; with no
        answerable query, only ``{"queries": 0}``.
    """
    functions = {f"recall@{k}": partial(retrieval_hit_rate, top_k=k) for k in ks}
    if mrr:
        functions["mrr"] = retrieval_reciprocal_rank
    if average_precision:
        functions["map"] = retrieval_average_precision
    # torchmetrics' retrieval functions read their scores as probabilities and count a right answer scored
    # <= 0 as missed; cosine similarities are often negative, so shift each row to be positive (same order)
    sim = sim.float()
    scores = sim - sim.amin(dim=1, keepdim=True) + 1.0
    totals = dict.fromkeys(functions, 0.0)
    answerable = 0
    for row, row_target in zip(scores, target):
        keep = row_target != EXCLUDED
        row, row_target = row[keep], row_target[keep].bool()
        if not row_target.any():
            continue  # nothing to find: not a query
        answerable += 1
        for name, function in functions.items():
            totals[name] += float(function(row, row_target))
    if answerable == 0:
        return {"queries": torch.tensor(0)}
    return {**{name: torch.tensor(total / answerable) for name, total in totals.items()},
            "queries": torch.tensor(answerable)}


def chance_levels(n_candidates: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Expected recall@k and MRR of a random ranking with one right answer among ``n_candidates``."""
    harmonic = sum(1.0 / r for r in range(1, n_candidates + 1))
    return {**{f"recall@{k}": min(k, n_candidates) / n_candidates for k in ks}, "mrr": harmonic / n_candidates}


def random_average_precision(n_candidates: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
    """Expected average precision of a random ranking of ``n_candidates`` with ``n_relevant`` right answers.

    ``E[AP] = (H_M + (R - 1) / (M - 1) * (M - H_M)) / M`` for ``M`` candidates, ``R`` relevant (the
    expectation of ``1/R * sum over relevant positions k of precision@k``).

    Args:
        n_candidates: ``M`` per query (tensor of ints).
        n_relevant: ``R`` per query (tensor of ints, at least 1).
    """
    m, r = n_candidates.double(), n_relevant.double()
    harmonic = torch.special.digamma(m + 1) + 0.5772156649015329  # H_M
    expected = (harmonic + (r - 1) / (m - 1).clamp(min=1) * (m - harmonic)) / m
    return torch.where(m <= 1, torch.ones_like(m), expected)


def unique_rows(embedding: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with duplicates removed: the same replicate seen twice (identical group and embedding).

    Evaluation pairs a perturbation's replicates across modalities by cycling through the modality with
    fewer replicates (and a distributed sampler pads ranks with repeated rows), so some replicates appear
    more than once. Counted twice, a replicate would retrieve itself (inflating mAP) and weigh double in its
    perturbation's mean. Two genuinely different rows with bit-identical embeddings are merged too.
    """
    rows = torch.cat([group[:, None].to(embedding.dtype), embedding], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
    keep = first.sort().values  # first occurrence of each distinct row, in input order
    return embedding[keep], group[keep]


def group_means(embedding: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised mean embedding of each group, and the sorted group ids.

    Args:
        embedding: ``(n, d)`` embeddings.
        group: ``(n,)`` perturbation ids.
    """
    groups, inverse = torch.unique(group, return_inverse=True)
    sums = torch.zeros(len(groups), embedding.shape[1], dtype=torch.float32, device=embedding.device)
    sums.index_add_(0, inverse, embedding.float())
    return F.normalize(sums, dim=1), groups  # normalising the sum = normalising the mean


def perturbation_retrieval(
    a: torch.Tensor, group_a: torch.Tensor, b: torch.Tensor, group_b: torch.Tensor, ks: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """Perturbation-level retrieval between two modalities, in both directions.

    Replicates are averaged per perturbation in each modality; only perturbations present in both count.
    Each perturbation's mean queries all means of the other modality; the right answer is the same
    perturbation.

    Args:
        a: ``(n, d)`` embeddings of modality A (duplicates already removed, see :func:`unique_rows`).
        group_a: ``(n,)`` their perturbation ids.
        b: ``(m, d)`` embeddings of modality B.
        group_b: ``(m,)`` their perturbation ids.
        ks: cut-offs of recall@k.

    Returns:
        ``recall@k/forward``, ``mrr/forward`` (A queries B), the same ``/backward``, ``chance@k`` and
        ``chance_mrr`` (a random ranking), and ``count`` (number of perturbations). Empty when no
        perturbation is in both.
    """
    mean_a, ids_a = group_means(a, group_a)
    mean_b, ids_b = group_means(b, group_b)
    common = ids_a[torch.isin(ids_a, ids_b)]
    if len(common) == 0:
        return {}
    mean_a = mean_a[torch.searchsorted(ids_a, common)]
    mean_b = mean_b[torch.searchsorted(ids_b, common)]
    sim = mean_a @ mean_b.T
    target = torch.eye(len(common), dtype=torch.long, device=sim.device)
    result: dict[str, torch.Tensor] = {}
    for direction, matrix in (("forward", sim), ("backward", sim.T)):
        scores = retrieval_scores(matrix, target, ks, mrr=True)
        result |= {f"{name}/{direction}": value for name, value in scores.items() if name != "queries"}
    chance = chance_levels(len(common), ks)
    result |= {f"chance@{k}": torch.tensor(chance[f"recall@{k}"]) for k in ks}
    result["chance_mrr"] = torch.tensor(chance["mrr"])
    result["count"] = torch.tensor(len(common))
    return result


def replicate_map(embedding: torch.Tensor, group: torch.Tensor, chunk_size: int = 512) -> dict[str, torch.Tensor]:
    """Mean average precision of retrieving a replicate's own perturbation within one modality.

    Every row queries all other rows (cosine similarity, itself excluded); the right answers are the
    other replicates of its perturbation. Rows without another replicate are not queries (they still
    serve as candidates).

    Args:
        embedding: ``(n, d)`` embeddings (duplicates already removed, see :func:`unique_rows`).
        group: ``(n,)`` perturbation ids.
        chunk_size: queries per block.

    Returns:
        ``map``, ``chance`` (mean over the queries of a random ranking's expected AP) and ``queries``;
        empty when no perturbation has two replicates.
    """
    x = F.normalize(embedding.float(), dim=1)
    inverse = torch.unique(group, return_inverse=True)[1]
    per_row = torch.bincount(inverse)[inverse]  # replicates of each row's perturbation, itself included
    if not (per_row > 1).any():
        return {}
    totals, queries = 0.0, 0
    for start in range(0, len(x), chunk_size):
        stop = min(start + chunk_size, len(x))
        sim = x[start:stop] @ x.T
        target = (group[start:stop, None] == group[None, :]).long()
        rows = torch.arange(stop - start, device=x.device)
        target[rows, start + rows] = EXCLUDED
        scores = retrieval_scores(sim, target, average_precision=True)
        n = int(scores["queries"])
        if n:
            totals += float(scores["map"]) * n
            queries += n
    answerable = per_row > 1
    chance = random_average_precision(torch.full_like(per_row[answerable], len(x) - 1), per_row[answerable] - 1)
    return {"map": torch.tensor(totals / queries), "chance": chance.mean().float(), "queries": torch.tensor(queries)}


class EmbeddingCollector(Metric):
    """Embeddings of one modality seen during an evaluation epoch, gathered from every process.

    ``compute`` returns the ``(embedding, group)`` rows of the whole evaluation set. When updates carry
    each sample's dataset ``index``, rows repeated by the distributed sampler's padding are dropped (the
    first occurrence is kept); without it, they count twice in row-level metrics (a few rows at most:
    fewer than the number of processes).

    Args:
        dedupe_index: drop rows whose ``index`` was seen already.
    """

    full_state_update = False

    def __init__(self, dedupe_index: bool = True) -> None:
        super().__init__()
        self.dedupe_index = dedupe_index
        self.add_state("embedding", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, embedding: torch.Tensor, group: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            embedding: ``(batch, d)`` embeddings.
            group: ``(batch,)`` perturbation ids.
            index: ``(batch,)`` position of each sample in the evaluation dataset, if the batch carries it.
        """
        self.embedding.append(embedding.detach().float())
        self.group.append(group.detach())
        if index is not None:
            self.index.append(index.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.embedding, list) and not self.embedding:
            return torch.empty(0, 0, device=self.device), torch.empty(0, dtype=torch.long, device=self.device)
        embedding, group = dim_zero_cat(self.embedding), dim_zero_cat(self.group)
        index = dim_zero_cat(self.index) if not (isinstance(self.index, list) and not self.index) else None
        if self.dedupe_index and index is not None and len(index) == len(group):
            _, inverse = torch.unique(index, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(index), dtype=torch.long, device=index.device)
            first = first.scatter_reduce(0, inverse, torch.arange(len(index), device=index.device), reduce="amin")
            keep = first.sort().values
            embedding, group = embedding[keep], group[keep]
        return embedding, group


class CrossModalRecall(Metric):
    """Recall@k of cross-modal retrieval in both directions, with replicates as positives.

    Every embedding of one modality queries all embeddings of the other; a query is a hit at ``k`` when a
    candidate of the same perturbation (``group``) ranks among the ``k`` most similar. States are
    concatenated across processes, so the value is the one of the whole evaluation set.

    Args:
        ks: the cut-offs.
        chunk_size: queries per similarity block.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 1024) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.add_state("a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")

    def update(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor) -> None:
        self.a.append(a.detach().float())
        self.b.append(b.detach().float())
        self.group.append(group.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        a, b, group = dim_zero_cat(self.a), dim_zero_cat(self.b), dim_zero_cat(self.group)
        forward = row_recall(a, b, group, group, self.ks, self.chunk_size)
        backward = row_recall(b, a, group, group, self.ks, self.chunk_size)
        return {
            **{f"recall@{k}/forward": forward[i] for i, k in enumerate(self.ks)},
            **{f"recall@{k}/backward": backward[i] for i, k in enumerate(self.ks)},
        }


class SameGroupRecall(Metric):
    """Recall@k of retrieving another sample of the same group within one set, the query itself excluded.

    Every representation queries all others (cosine similarity); a query is a hit at ``k`` when a sample
    of its group (perturbation) other than itself ranks among the ``k`` most similar. Queries whose group
    has no other sample in the set have nothing to find and are left out; with none left, ``compute``
    returns an empty dict. States are concatenated across processes.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 1024) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.add_state("x", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")

    def update(self, x: torch.Tensor, group: torch.Tensor) -> None:
        self.x.append(F.normalize(x.detach().float(), dim=-1))
        self.group.append(group.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.x, list) and not self.x:
            return {}
        x, group = dim_zero_cat(self.x), dim_zero_cat(self.group)
        hits, answerable = [], []
        for start in range(0, len(x), self.chunk_size):
            sim = x[start:start + self.chunk_size] @ x.T
            rows = torch.arange(sim.shape[0], device=x.device)
            is_self = torch.zeros_like(sim, dtype=torch.bool)
            is_self[rows, start + rows] = True
            sim = sim.masked_fill(is_self, float("-inf"))  # the query never retrieves itself
            positive = (group[start:start + self.chunk_size, None] == group[None, :]) & ~is_self
            hits.append(hits_at_k(sim, positive, self.ks))
            answerable.append(positive.any(dim=1))
        hits, answerable = torch.cat(hits), torch.cat(answerable)
        if not answerable.any():
            return {}
        recall = hits[answerable].float().mean(dim=0)
        return {f"recall@{k}": recall[i] for i, k in enumerate(self.ks)}
