"""A FIFO queue of past momentum embeddings per modality: the extra negatives of `CrossModalSetup`'s
``queue_size``.

MoCo (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning") keeps the
keys of the last batches, embedded by a momentum (EMA) copy of the encoder, as negatives; it gathers every
process's keys before queueing them, so all processes hold one queue. lightly's ``MemoryBankModule``
queued each process's own rows (lightly issue #1018; later versions gather on request,
``gather_distributed``), so a 2-process run saw other negatives than one process on the same global batch.
The setup queues the *gathered* keys: every process writes the same rows and the queues stay identical.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unimodality.loss import Keys


class EmbeddingQueue(nn.Module):
    """The last ``size`` rows of every modality's momentum embeddings, with their group ids.

    A ring buffer: rows are written over the oldest once it is full. The rows and group ids are
    persistent buffers and the fill level is the module's extra state, so a checkpoint holds the queue and
    a resumed run continues with it.

    Args:
        names: the modalities, each with its queue.
        size: rows kept per modality.
        dim: embedding width.
    """

    def __init__(self, names: list[str], size: int, dim: int) -> None:
        super().__init__()
        self.names = list(names)
        self.size = size
        self.register_buffer("embeddings", torch.zeros(len(self.names), size, dim))
        self.register_buffer("group", torch.zeros(size, dtype=torch.long))
        # host integers, not tensors: reading a device scalar every step would wait for the device
        self.filled = 0
        self.position = 0  # the next row written

    @torch.no_grad()
    def push(self, embeddings: dict[str, torch.Tensor], group: torch.Tensor) -> None:
        """Queue one batch (every modality's rows, in the order of ``group``), dropping the oldest rows.

        Args:
            embeddings: ``(n, dim)`` rows per modality (all of `names`).
            group: ``(n,)`` their group ids.
        """
        n = len(group)
        keep = min(n, self.size)  # a batch longer than the queue leaves its last rows
        first = min(keep, self.size - self.position)  # rows up to the end of the ring; the rest wrap round
        start = self.position
        for i, name in enumerate(self.names):
            rows = embeddings[name][n - keep:].detach()
            self.embeddings[i, start:start + first] = rows[:first]
            self.embeddings[i, :keep - first] = rows[first:]
        rows = group[n - keep:]
        self.group[start:start + first] = rows[:first]
        self.group[:keep - first] = rows[first:]
        self.position = (start + keep) % self.size
        self.filled = min(self.size, self.filled + keep)

    def keys(self, batch: dict[str, torch.Tensor], group: torch.Tensor, a: str, b: str) -> Keys:
        """The momentum embeddings a loss contrasts the pair ``a``, ``b`` with: the batch's rows, then the
        queue's (new tensors: the batch may be queued in place before the backward pass runs).

        Args:
            batch: ``(n, dim)`` momentum embeddings of the batch per modality.
            group: ``(n,)`` the batch's group ids.
            a: first modality.
            b: second modality.
        """
        return self.keys_of_pairs(batch, group, [(a, b)])[0]

    def keys_of_pairs(self, batch: dict[str, torch.Tensor], group: torch.Tensor,
                      pairs: list[tuple[str, str]]) -> list[Keys]:
        """`keys` of every pair, each modality's rows joined with its queue once: with three modalities and
        more, a pair's keys share their tensors with the other pairs' (losses read keys, never write them).

        Args:
            batch: ``(n, dim)`` momentum embeddings of the batch per modality.
            group: ``(n,)`` the batch's group ids.
            pairs: the modality pairs, in the order of the result.
        """
        queued = self.embeddings[:, :self.filled]  # until full, the filled rows are the first ones
        names = dict.fromkeys(name for pair in pairs for name in pair)
        rows = {name: torch.cat([batch[name], queued[self.names.index(name)]]) for name in names}
        groups = torch.cat([group, self.group[:self.filled]])
        return [Keys(rows[a], rows[b], groups) for a, b in pairs]

    def ordered(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The queue's rows oldest first, per modality, and their groups (for inspection)."""
        shift = -self.position if self.filled == self.size else 0
        rows = self.embeddings[:, :self.filled].roll(shift, dims=1)
        return dict(zip(self.names, rows)), self.group[:self.filled].roll(shift)

    def get_extra_state(self) -> dict[str, Any]:
        return {"filled": self.filled, "position": self.position}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.filled, self.position = int(state["filled"]), int(state["position"])

    def extra_repr(self) -> str:
        return f"names={self.names}, size={self.size}, filled={self.filled}"
