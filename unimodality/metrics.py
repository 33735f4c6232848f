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

Ranking metrics are computed for blocks of queries at once from one similarity matrix (no per-query
loop): they equal torchmetrics' functional retrieval metrics (hit rate, reciprocal rank, average precision)
whenever scores are untied; ties, which torchmetrics breaks by an unstable sort, are resolved
deterministically (see `retrieval_scores`). Large sets are processed in blocks of query rows, so
memory stays ``block x candidates``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

#: target value of a candidate that is not a candidate at all (the query itself): left out of its ranking
EXCLUDED = -1
#: similarity entries of one block of query rows (16 MiB in fp32): bounds the metrics' memory on large sets
BLOCK_ELEMENTS = 2**22


def _blocks(rows: int, columns: int) -> range:
    return range(0, rows, max(1, BLOCK_ELEMENTS // max(1, columns)))


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
    ks: tuple[int, ...], chunk_size: int | None = None,
) -> torch.Tensor:
    """Recall@k (one value per ``k``) of retrieving a candidate of the query's group, over all queries.

    Args:
        queries: ``(n, d)`` L2-normalised embeddings.
        candidates: ``(m, d)`` L2-normalised embeddings.
        query_group: ``(n,)`` perturbation ids of the queries.
        candidate_group: ``(m,)`` perturbation ids of the candidates.
        ks: the cut-offs.
        chunk_size: queries per similarity block (default: `BLOCK_ELEMENTS` entries per block).
    """
    step = chunk_size or _blocks(len(queries), len(candidates)).step
    hits = []
    for start in range(0, len(queries), step):
        sim = queries[start:start + step] @ candidates.T
        positive = query_group[start:start + step, None] == candidate_group[None, :]
        hits.append(hits_at_k(sim, positive, ks))
    return torch.cat(hits).float().mean(dim=0)


def cross_recall(
    a: torch.Tensor, b: torch.Tensor, group_a: torch.Tensor, group_b: torch.Tensor, ks: tuple[int, ...],
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-level recall@k in both directions (``a`` queries ``b``, ``b`` queries ``a``) from one similarity matrix.

    When ``a @ b.T`` fits in `BLOCK_ELEMENTS` entries it is computed once and read both ways;
    beyond, each direction runs over blocks of its query rows (see `row_recall`).

    Args:
        a: ``(n, d)`` L2-normalised embeddings of one modality.
        b: ``(m, d)`` of the other.
        group_a: ``(n,)`` perturbation ids of ``a``.
        group_b: ``(m,)`` perturbation ids of ``b``.
        ks: the cut-offs.
        chunk_size: force blocks of this many query rows (see `row_recall`).

    Returns:
        ``(forward, backward)``: one value per ``k`` each.
    """
    if chunk_size or len(a) * len(b) > BLOCK_ELEMENTS:
        return (row_recall(a, b, group_a, group_b, ks, chunk_size),
                row_recall(b, a, group_b, group_a, ks, chunk_size))
    sim = a @ b.T
    positive = group_a[:, None] == group_b[None, :]
    return (hits_at_k(sim, positive, ks).float().mean(dim=0),
            hits_at_k(sim.T, positive.T, ks).float().mean(dim=0))


def retrieval_scores(
    sim: torch.Tensor,
    target: torch.Tensor,
    ks: tuple[int, ...] = (),
    mrr: bool = False,
    average_precision: bool = False,
) -> dict[str, torch.Tensor]:
    """Ranking metrics of every query (row of ``sim``) averaged over the queries that have a right answer.

    Vectorised over the queries (blocks of `BLOCK_ELEMENTS` entries): ``recall@k`` is a right
    answer among the ``k`` best, ``mrr`` the reciprocal rank of the best right answer, ``map`` the mean
    over right answers ``p`` of the precision among the candidates scored at least ``s_p``. With untied
    scores these are torchmetrics' ``retrieval_hit_rate``, ``retrieval_reciprocal_rank`` and
    ``retrieval_average_precision``. Ties are resolved deterministically: in favour of the right answer
    for ``recall@k`` and ``mrr`` (as `hits_at_k`), and as scikit-learn's
    ``average_precision_score`` does for ``map`` (a tied block counts as one threshold).

    Args:
        sim: ``(queries, candidates)`` similarities (any real values).
        target: ``(queries, candidates)``: 1 for a right answer, 0 for a wrong one, ``EXCLUDED`` (-1) for an
            entry that is not a candidate (e.g. the query itself).
        ks: cut-offs of ``recall@k``.
        mrr: also compute the mean reciprocal rank of the first right answer (``mrr``).
        average_precision: also compute the mean average precision (``map``).

    Returns:
        ``{"recall@k": ..., "mrr": ..., "map": ..., "queries": number of answerable queries}``; with no
        answerable query, only ``{"queries": 0}``.
    """
    names = [f"recall@{k}" for k in ks] + (["mrr"] if mrr else []) + (["map"] if average_precision else [])
    totals = {name: torch.zeros((), dtype=torch.float64, device=sim.device) for name in names}
    answerable = 0
    step = _blocks(*sim.shape).step
    for start in range(0, len(sim), step):
        block, block_target = sim[start:start + step], target[start:start + step]
        candidate = block_target != EXCLUDED
        positive = block_target == 1
        keep = positive.any(dim=1)  # nothing to find: not a query
        if not keep.any():
            continue
        block, candidate, positive = block[keep].float(), candidate[keep], positive[keep]
        answerable += len(block)
        if ks or mrr:
            best = block.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
            rank = ((block > best) & candidate).sum(dim=1)  # candidates strictly better than the best answer
            for k in ks:
                totals[f"recall@{k}"] += (rank < k).sum()
            if mrr:
                totals["mrr"] += (1.0 / (rank + 1).double()).sum()
        if average_precision:
            totals["map"] += _average_precision(block, candidate, positive).sum()
    if answerable == 0:
        return {"queries": torch.tensor(0)}
    return {**{name: (total / answerable).float() for name, total in totals.items()},
            "queries": torch.tensor(answerable)}


#: most right answers per query for which AP compares each right answer's score with the row (``O(m R)``);
#: beyond, rows are sorted (``O(m log m)``)
COMPARE_MAX_POSITIVES = 32


def _average_precision(sim: torch.Tensor, candidate: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-query AP: mean over right answers ``p`` of (right answers >= ``s_p``) / (candidates >= ``s_p``)."""
    low = torch.tensor(float("-inf"), device=sim.device)
    count = positive.sum(dim=1)
    most = int(count.max())
    if most <= COMPARE_MAX_POSITIVES:
        # the right answers' scores, padded with -inf; each compared with its row
        scores = torch.where(positive, sim, low).topk(most, dim=1).values
        real = torch.arange(most, device=sim.device)[None, :] < count[:, None]
        right_at_least = (scores[:, None, :] >= scores[:, :, None]).logical_and_(real[:, None, :]).sum(dim=2)
        at_least = torch.empty_like(right_at_least)
        step = max(1, BLOCK_ELEMENTS // max(1, most * sim.shape[1]))
        for start in range(0, len(sim), step):
            block = slice(start, start + step)
            at_least[block] = (sim[block, None, :] >= scores[block, :, None]).logical_and_(
                candidate[block, None, :]).sum(dim=2)
        precision = torch.where(real, right_at_least.double() / at_least.clamp(min=1).double(), 0.0)
        return precision.sum(dim=1) / count
    # ascending rows; non-candidates (resp. wrong answers) at -inf: below every score that is counted
    all_sorted = torch.where(candidate, sim, low).sort(dim=1).values
    positive_sorted = torch.where(positive, sim, low).sort(dim=1).values
    queries = torch.where(positive, sim, low)
    width = sim.shape[1]
    at_least = width - torch.searchsorted(all_sorted, queries, side="left")  # candidates scored >= s_p
    right_at_least = width - torch.searchsorted(positive_sorted, queries, side="left")
    precision = torch.where(positive, right_at_least.double() / at_least.clamp(min=1).double(), 0.0)
    return precision.sum(dim=1) / count


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
        a: ``(n, d)`` embeddings of modality A (duplicates already removed, see `unique_rows`).
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


def replicate_map(
    embedding: torch.Tensor, group: torch.Tensor, chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean average precision of retrieving a replicate's own perturbation within one modality.

    Every row queries all other rows (cosine similarity, itself excluded); the right answers are the
    other replicates of its perturbation. Rows without another replicate are not queries (they still
    serve as candidates).

    Args:
        embedding: ``(n, d)`` embeddings (duplicates already removed, see `unique_rows`).
        group: ``(n,)`` perturbation ids.
        chunk_size: queries per block (default: `BLOCK_ELEMENTS` similarities per block).

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
    step = chunk_size or _blocks(len(x), len(x)).step
    for start in range(0, len(x), step):
        stop = min(start + step, len(x))
        sim = x[start:stop] @ x.T
        target = (group[start:stop, None] == group[None, :]).to(torch.int8)
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
        chunk_size: queries per similarity block (default: one shared matrix when it is small enough).
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk_size: int | None = None) -> None:
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
        forward, backward = cross_recall(a, b, group, group, self.ks, self.chunk_size)
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
