"""The CKA preservation term: linear CKA against a numpy reference, its invariances, exactness under DDP, and
what it does (and does not do) to training."""

from __future__ import annotations

import copy
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
from unimodality.batch import GROUP
from unimodality.cka import linear_cka
from unimodality.distributed import gather, gather_with_grad
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.setups.simclr import SimCLRSetup


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. 5, in its feature-space form."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize(("n", "p", "q"), [(10, 30, 20), (200, 5, 3), (50, 50, 8)])  # Gram and feature forms
def test_linear_cka_matches_the_numpy_reference(n, p, q):
    rng = np.random.default_rng(n + p + q)
    x = rng.normal(size=(n, p))
    y = x[:, :min(p, q)] @ rng.normal(size=(min(p, q), q)) + rng.normal(size=(n, q))
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert got == pytest.approx(reference_cka(x, y), rel=1e-10)
    assert 0 < got < 1


def test_linear_cka_invariances():
    torch.manual_seed(0)
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    y = y + x[:, :6]
    value = linear_cka(x, y)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    torch.testing.assert_close(linear_cka(x @ rotation, y), value)  # orthogonal transform
    torch.testing.assert_close(linear_cka(7.5 * x, 0.01 * y), value)  # isotropic scale
    torch.testing.assert_close(linear_cka(x + 3.0, y - 1.0), value)  # translation
    torch.testing.assert_close(linear_cka(x, x @ rotation * 2), torch.tensor(1.0, dtype=torch.float64))
    # not invariant to an anisotropic scale: the test above could fail
    assert abs(linear_cka(x * torch.linspace(0.1, 10, 12, dtype=torch.float64), y) - value) > 1e-3
    # images are flattened; a constant side gives 0, not NaN
    torch.testing.assert_close(linear_cka(x.reshape(40, 3, 2, 2), y), value)
    assert linear_cka(torch.ones(40, 3), y).item() == 0.0
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, y[:5])


def test_linear_cka_gradient():
    torch.manual_seed(0)
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: linear_cka(x, e), (y,))
    low = linear_cka(torch.randn(9, 4, dtype=torch.float32).half(), y.detach().half())
    assert low.dtype == torch.float32 and torch.isfinite(low)


# -- under DDP: two gloo processes give the value and gradients of one process on the global batch --------
ROWS = (5, 7)


def _cka_and_grads(rows: slice = slice(None)):
    torch.manual_seed(0)
    tower = torch.nn.Linear(6, 4).double()
    x = torch.randn(sum(ROWS), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))[rows]
    embedding = gather_with_grad(F.normalize(tower(x), dim=1))  # as the setups gather the loss's inputs
    cka = linear_cka(gather(x) ** 2, embedding)  # squared: a non-linear relation to its input
    cka.backward()
    grads = [p.grad.clone() for p in tower.parameters()]
    if dist.is_initialized():  # what DDP does with parameter gradients
        for g in grads:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return cka.detach(), grads


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start = sum(ROWS[:rank])
    torch.save(_cka_and_grads(slice(start, start + ROWS[rank])), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_cka_under_two_processes_matches_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # forked, not spawned: the children have torch imported already (a spawn pays ~10 s per process)
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected_cka, expected_grads = _cka_and_grads()
    for rank in range(2):
        cka, grads = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(cka, expected_cka, atol=1e-12, rtol=1e-10)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
        assert any(g.abs().sum() > 0 for g in grads)


# -- in a setup ---------------------------------------------------------------------------------------------

def model(**kwargs) -> CrossModalSetup:
    encoder = partial(MLPEncoder, hidden_sizes=[32], dropout=0.0)
    return CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, **kwargs)


def test_the_loss_gains_weight_times_one_minus_cka():
    datamodule = example_datamodule()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    plain = model()
    plain.build(datamodule.schema)
    preserved = model(preservation={"tx": 2.5})
    preserved.build(datamodule.schema)
    preserved.load_state_dict(plain.state_dict())
    for setup in (plain, preserved):
        setup.is_logging_step = lambda: False  # no trainer to log to
    main = plain.training_step(batch, 0)
    total = preserved.training_step(batch, 0)
    cka = linear_cka(batch["tx"], plain.towers["tx"](batch["tx"]))
    torch.testing.assert_close(total, main + 2.5 * (1 - cka))
    assert preserved.loss_terms["preservation/tx"] == pytest.approx(cka.item())
    total.backward()  # the term's gradient reaches the tower
    assert preserved.towers["tx"].head.weight.grad.abs().sum() > 0


def fit(setup: CrossModalSetup, steps: int = 6, **trainer) -> CrossModalSetup:
    datamodule = example_datamodule()
    torch.manual_seed(0)
    setup.build(datamodule.schema)
    quiet_trainer(max_steps=steps, limit_val_batches=0, **trainer).fit(setup, datamodule=datamodule)
    return setup


def test_weight_zero_leaves_training_unchanged_bit_for_bit_and_logs_the_cka():
    plain = fit(model())
    monitored = fit(model(preservation={"tx": 0.0}), log_every_n_steps=1)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, monitored.state_dict()[key]), key
    logged = monitored.trainer.logged_metrics
    assert 0 < float(logged["train/preservation/tx"]) <= 1
    assert "train/preservation/ph" not in logged


def test_a_positive_weight_keeps_the_embedding_closer_to_its_input():
    datamodule = example_datamodule()
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    x = batch["tx"]
    scores = {}
    for weight in (None, 20.0):
        setup = fit(model(preservation={"tx": weight} if weight else None), steps=12)
        setup.eval()
        with torch.no_grad():
            scores[weight] = linear_cka(x, setup.towers["tx"](x)).item()
    assert scores[20.0] > scores[None] + 0.02, scores


def test_preservation_names_are_checked():
    with pytest.raises(ValueError, match=r"model\.init_args\.preservation\.tx must be a finite number >= 0"):
        model(preservation={"tx": -1.0})
    with pytest.raises(ValueError, match=r"model settings name modalities \['mol'\]"):
        model(preservation={"mol": 1.0}).build(example_datamodule().schema)


def test_simclr_preservation_compares_views_with_representations():
    setup = SimCLRSetup(encoder=partial(MLPEncoder, hidden_sizes=[16], dropout=0.0), preservation={"tx": 1.0})
    schema = {"tx": example_datamodule().schema["tx"]}
    setup.build(schema)
    plain = copy.deepcopy(setup)
    plain.preservation = {}
    for s in (setup, plain):
        s.is_logging_step = lambda: False
    x = torch.rand(6, len(schema["tx"]["features"]))
    batch = {"tx": x, GROUP: torch.arange(6)}
    torch.manual_seed(1)
    total = setup.training_step(batch, 0)
    torch.manual_seed(1)
    main = plain.training_step(batch, 0)  # no augmentations: the views are x twice
    views = torch.cat([x, x])
    torch.testing.assert_close(total, main + 1 - linear_cka(views, setup.encoder(views)))


# -- the whole training step under DDP: contrastive loss + preservation term, 2 processes vs 1 ------------
_STEP: dict = {}  # the schema and batch, set before forking (the children inherit them)


def _setup_loss_and_grads(rows: slice = slice(None)):
    torch.manual_seed(0)
    setup = model(preservation={"tx": 1.5, "ph": 0.5})
    setup.build(_STEP["schema"])
    setup.double()
    setup.is_logging_step = lambda: False  # no trainer to log to
    loss = setup.training_step({key: value[rows] for key, value in _STEP["batch"].items()}, 0)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in setup.parameters()]
    if dist.is_initialized():
        for g in grads:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return loss.detach(), grads


def _step_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start = sum(ROWS[:rank])
    torch.save(_setup_loss_and_grads(slice(start, start + ROWS[rank])), Path(out) / f"step{rank}.pt")
    dist.destroy_process_group()


def test_training_step_with_preservation_under_two_processes_matches_one(tmp_path):
    schema = example_datamodule().schema
    generator = torch.Generator().manual_seed(3)
    n = sum(ROWS)
    _STEP["schema"] = schema
    _STEP["batch"] = {name: torch.rand(n, len(entry["features"]), generator=generator, dtype=torch.float64)
                      for name, entry in schema.items()} | {GROUP: torch.arange(n)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_step_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected_loss, expected_grads = _setup_loss_and_grads()
    for rank in range(2):
        loss, grads = torch.load(tmp_path / f"step{rank}.pt")
        torch.testing.assert_close(loss, expected_loss, atol=1e-10, rtol=1e-9)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)
