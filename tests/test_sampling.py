"""Replicate-aware training batches: k replicates per perturbation, distinct perturbations across processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

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


class GroupRecorder(Callback):
    """Writes the perturbation ids of every training batch of this process to ``folder/rank<r>.npy``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.batches: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[GROUP].numpy().copy())

    def on_train_end(self, trainer, pl_module) -> None:
        np.save(Path(self.folder) / f"rank{trainer.global_rank}.npy", np.stack(self.batches))


def test_under_ddp_no_perturbation_is_on_two_processes_in_one_step(tmp_path, example_data_dir):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    recorder = json.dumps({"class_path": "tests.test_sampling.GroupRecorder", "init_args": {"folder": str(tmp_path)}})
    configs = root / "configs"
    args = [sys.executable, "-m", "unimodality", "fit", "--config", str(configs / "clip_embeddings_format.yaml"),
            "--config", str(configs / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices",
            "2", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            f"--trainer.callbacks+={recorder}", "--data.init_args.batch_size", "16"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    assert ranks[0].shape == ranks[1].shape and len(ranks[0]) > 1  # equal steps on both processes
    for step in range(len(ranks[0])):
        first, second = set(ranks[0][step].tolist()), set(ranks[1][step].tolist())
        assert not first & second, f"step {step}: perturbations {first & second} on both processes"
        counts = [np.unique(r[step], return_counts=True)[1] for r in ranks]
        assert all((c == 2).all() for c in counts)  # replicates_per_key: 2 on every process
