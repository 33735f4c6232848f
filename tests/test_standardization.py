"""Per-feature standardisation of a tower's input: statistics of the training rows, kept in the checkpoint,
applied wherever the tower embeds, the same under two processes as under one."""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.standardization import IQR_PER_STD, statistics

ROWS = (7, 12)  # rows of each process in the two-process test (unequal)


def data(seed: int = 0) -> torch.Tensor:
    x = torch.randn(sum(ROWS), 5, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1, 10, 0.1, 3, 1])
    x[:, 4] = 2.5  # a constant feature
    x[3, 0] = 1e3  # an outlier
    return x


def batches(x: torch.Tensor, size: int = 4) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def test_zscore_and_robust_statistics_match_numpy():
    x = data()
    center, scale = statistics(batches(x), "zscore", 5, "test")
    values = x.double().numpy()
    np.testing.assert_allclose(center.numpy(), values.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale[:4].numpy(), values[:, :4].std(axis=0), rtol=1e-5)
    assert scale[4] == 1  # constant: scaled by 1, so it becomes 0, not NaN
    center, scale = statistics(batches(x), "robust", 5, "test")
    low, median, high = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
    np.testing.assert_allclose(center.numpy(), median, rtol=1e-6)
    np.testing.assert_allclose(scale[:4].numpy(), (high - low)[:4] / IQR_PER_STD, rtol=1e-5)
    assert abs(center[0]) < 5  # the outlier moves the mean, not the median
    with pytest.raises(ValueError, match=r"tower 'ph': standardize needs feature vectors of shape \(batch, 5\)"):
        statistics([torch.zeros(3, 4)], "zscore", 5, "tower 'ph'")
    with pytest.raises(ValueError, match="no training rows"):
        statistics([], "zscore", 5, "tower 'ph'")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start = sum(ROWS[:rank])
    rows = data()[start:start + ROWS[rank]]
    torch.save({m: statistics(batches(rows, 3), m, 5, "test") for m in ("zscore", "robust")},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_get_the_statistics_of_all_their_rows(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for method in ("zscore", "robust"):
            expected = statistics(batches(data()), method, 5, "test")
            torch.testing.assert_close(got[method], expected, rtol=1e-5, atol=1e-6)


def model(**kwargs) -> CrossModalSetup:
    encoder = partial(MLPEncoder, hidden_sizes=[16], dropout=0.0)
    return CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, **kwargs)


def test_a_fit_standardises_with_the_training_rows_and_the_checkpoint_keeps_it(tmp_path):
    datamodule = example_datamodule()
    seen: list[torch.Tensor] = []
    calls = []
    train_dataloader = datamodule.train_dataloader

    def recording():  # Lightning asks for the training loader first, the statistics pass second
        calls.append(1)
        loader = train_dataloader()
        if len(calls) != 2:
            return loader

        def batches():
            for batch in loader:
                seen.append(batch["ph"].clone())
                yield batch

        return batches()

    datamodule.train_dataloader = recording
    setup = model(standardize={"ph": "zscore"})
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(setup, datamodule=datamodule)
    rows = torch.cat(seen).double()
    tower = setup.towers["ph"]
    torch.testing.assert_close(tower.input_center, rows.mean(dim=0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tower.input_scale, rows.std(dim=0, unbiased=False).float(), rtol=1e-4, atol=1e-6)
    assert bool(tower.input_standardized)
    assert not hasattr(setup.towers["tx"], "input_center")  # only the named tower

    x = rows[:5].float()
    setup.eval()
    with torch.no_grad():
        expected = F.normalize(tower.head(tower.encoder((x - tower.input_center) / tower.input_scale)), dim=-1)
        torch.testing.assert_close(tower(x), expected)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = CrossModalSetup.load_from_checkpoint(path)
    reloaded.eval()
    torch.testing.assert_close(reloaded.towers["ph"].input_center, tower.input_center)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.towers["ph"](x), expected)

    # a fit resumed from it keeps the statistics (they are not recomputed from other rows)
    calls.clear()
    more = quiet_trainer(max_epochs=2, default_root_dir=tmp_path)
    resumed = model(standardize={"ph": "zscore"})
    more.fit(resumed, datamodule=datamodule, ckpt_path=path)
    torch.testing.assert_close(resumed.towers["ph"].input_center, tower.input_center)
    assert len(calls) == 1  # no statistics pass: only Lightning's own loader was asked for


def test_standardize_names_a_tower_and_a_method():
    datamodule = example_datamodule()
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"model\.init_args\.standardize\.ph must be one of zscore, robust"):
        model(standardize={"ph": "minmax"})
    with pytest.raises(ValueError, match=r"model\.init_args\.standardize names \['rna'\]"):
        model(standardize={"rna": "zscore"}).build(datamodule.schema)
