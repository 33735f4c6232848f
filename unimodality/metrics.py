"""Cross-modal retrieval metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def hits_at_k(sim: torch.Tensor, positive: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Boolean ``(queries, len(ks))``: is a positive among each query's ``k`` most similar candidates?"""
    best_positive = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    # rank of the best positive = candidates scoring strictly higher (ties count in its favour)
    rank = (sim > best_positive).sum(dim=1)
    return torch.stack([rank < k for k in ks], dim=1)


class CrossModalRecall(Metric):
    """Recall@k of cross-modal retrieval in both directions, with replicates as positives.

    Every embedding of one modality queries all embeddings of the other; a query is a hit at ``k`` when a
    candidate of the same perturbation (``group``) ranks among the ``k`` most similar. States are
    concatenated across processes, so the value is the one of the whole evaluation set.
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

    def _recall(self, queries: torch.Tensor, candidates: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        hits = []
        for start in range(0, len(queries), self.chunk_size):
            sim = queries[start:start + self.chunk_size] @ candidates.T
            positive = group[start:start + self.chunk_size, None] == group[None, :]
            hits.append(hits_at_k(sim, positive, self.ks))
        return torch.cat(hits).float().mean(dim=0)

    def compute(self) -> dict[str, torch.Tensor]:
        a, b, group = dim_zero_cat(self.a), dim_zero_cat(self.b), dim_zero_cat(self.group)
        forward = self._recall(a, b, group)
        backward = self._recall(b, a, group)
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
