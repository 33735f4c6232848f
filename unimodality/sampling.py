"""Training batches that hold several replicates of each perturbation, with distinct perturbations across all
processes of a step.

A contrastive loss with ``use_groups`` treats rows of one perturbation as positives, but a batch drawn one
perturbation at a time never holds two of them. `ReplicateBatchSampler` draws ``keys_per_batch``
perturbations per process and step and repeats each ``replicates`` times (the dataset draws distinct
replicates for the repeats). Every process walks one seeded permutation of the keys per pass, taking its own
slice of each step, so no perturbation is on two processes in one step and every process has the same
number of steps. ``passes`` permutations make one epoch: each perturbation is drawn that many times, with
fresh replicates (oversampling).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class ReplicateBatchSampler(DistributedSampler):
    """Yields one training batch per item: a tuple of key indices, each key ``replicates`` times.

    A ``DistributedSampler`` (with ``batch_size=None`` in the DataLoader) so that Lightning neither wraps nor
    replaces it and calls ``set_epoch``.

    Args:
        dataset: the training dataset (its length is the number of keys).
        keys_per_batch: perturbations per batch and process.
        replicates: rows drawn for each perturbation of a batch.
        passes: permutations of the keys per epoch (each perturbation is drawn this many times).
        num_replicas: number of processes.
        rank: this process.
        seed: seed of the permutations (with the epoch).
    """

    def __init__(self, dataset: Dataset, keys_per_batch: int, replicates: int, passes: int, num_replicas: int,
                 rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n_keys = len(dataset)
        self.keys_per_batch = keys_per_batch
        self.replicates = replicates
        self.passes = passes

    def steps_per_pass(self) -> int:
        return self.n_keys // (self.keys_per_batch * self.num_replicas)

    def __len__(self) -> int:
        return self.steps_per_pass() * self.passes

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        step = self.keys_per_batch * self.num_replicas
        mine = slice(self.rank * self.keys_per_batch, (self.rank + 1) * self.keys_per_batch)
        for _ in range(self.passes):
            # one permutation per pass, cut into whole steps: within a step every key is distinct
            order = torch.randperm(self.n_keys, generator=generator).numpy()
            for start in range(0, self.steps_per_pass() * step, step):
                keys = order[start:start + step][mine]
                yield tuple(np.repeat(keys, self.replicates).tolist())


class BatchesOf(Dataset):
    """A dataset whose items are whole batches: item ``indices`` is ``dataset.__getitems__(indices)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: tuple[int, ...]):
        return self.dataset.__getitems__(list(indices))
