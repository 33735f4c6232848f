"""Replicate-aware training batches: k replicates per perturbation, distinct perturbations across processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.datamodule import GROUP
from unimodality.sampling import ReplicateBatchSampler


class Keys(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("replicates, passes", [(1, 1), (2, 1), (4, 3)])
def test_each_step_holds_distinct_keys_on_every_process_and_ranks_have_equal_length(world, replicates, passes):
    samplers = [ReplicateBatchSampler(Keys(103), keys_per_batch=8, replicates=replicates, passes=passes,
                                      num_replicas=world, rank=r, seed=5) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(2)
    epochs = [list(s) for s in samplers]
    assert len({len(e) for e in epochs}) == 1 and len(epochs[0]) == (103 // (8 * world)) * passes
    seen = np.zeros(103, dtype=int)
    for step in zip(*epochs):
        keys = [np.asarray(batch) for batch in step]
        for batch in keys:
            unique, counts = np.unique(batch, return_counts=True)
            assert len(unique) == 8 and (counts == replicates).all()
        everyone = np.concatenate([np.unique(b) for b in keys])
        assert len(np.unique(everyone)) == len(everyone)  # no perturbation on two processes in one step
        seen[everyone] += 1
    assert seen.max() <= passes and (seen == passes).sum() >= 103 - passes * (103 % (8 * world)) - 8 * world
    again = ReplicateBatchSampler(Keys(103), 8, replicates, passes, world, 0, seed=5)
    again.set_epoch(3)
    assert list(again) != epochs[0]  # a new order each epoch


def test_repeated_keys_draw_distinct_replicates(example_data_dir):
    dm = example_datamodule(batch_size=32)
    dm.setup("fit")
    train = dm.datasets["train"]
    counts = {name: m.counts() for name, m in train.members.items()}
    keys = np.flatnonzero((counts["tx"] >= 3) & (counts["ph"] >= 3))[:5]
    batch_keys = np.repeat(keys, 3)
    for _ in range(5):
        batch = train.__getitems__(batch_keys.tolist())
        for name in ("tx", "ph"):
            rows = batch[name].reshape(5, 3, -1)
            for replicates in rows:  # three replicates of one key are three different rows of the file
                assert len({tuple(r.tolist()) for r in replicates}) == 3
        assert (batch[GROUP].reshape(5, 3) == batch[GROUP].reshape(5, 3)[:, :1]).all()


def test_fit_with_replicates_and_oversampling_has_the_expected_steps(example_data_dir):
    from functools import partial

    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    dm = example_datamodule(batch_size=32, replicates_per_key=4, examples_per_key=3)
    model = CrossModalSetup(encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]),
                                      "ph": partial(MLPEncoder, hidden_sizes=[32])}, embed_dim=8)
    dm.setup("fit")
    n_keys = len(dm.datasets["train"])
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == (n_keys // 8) * 3


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 30, "replicates_per_key": 4}, "multiple of replicates_per_key"),
    ({"replicates_per_key": 0}, "replicates_per_key=0"),
    ({"examples_per_key": 2, "streaming": True}, "streaming"),
])
def test_replicate_settings_are_checked(example_data_dir, options, message):
    with pytest.raises(ValueError, match=message):
        example_datamodule(**options)
