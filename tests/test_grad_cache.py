"""Gradient caching (GradCache) on the cross-modal setup: the loss and every gradient of the plain step, with
every loss, with and without groups, dropout, frozen and disabled towers, under automatic optimization and
under 2-process DDP."""

from __future__ import annotations

import copy
import json
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

import tests.test_bad_inputs as bad_inputs
from tests.helpers import PoisonedLoss, quiet_trainer
from tests.test_bad_inputs import fit as fit_args
from tests.test_bad_inputs import run
from tests.test_bad_options import one_line_error
from unimodality import registry
from unimodality.batch import GROUP
from unimodality.grad_cache import cached_gradients, chunks, take_rows
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.setup import NonFiniteLossError

#: the built-in losses of a modality pair (DINO's and distillation's belong to setups of their own)
LOSSES = sorted(name for name, plugins in registry.registered("losses").items()
                if any(p.dist == "unimodality" for p in plugins) and name not in ("DINOLoss", "KDLoss"))
CASES = [(name, use_groups) for name in LOSSES for use_groups in (True, False)]
SCHEMA = {"tx": {"features": [f"g{i}" for i in range(10)]}, "ph": {"features": [f"f{i}" for i in range(8)]}}
N = 13  # rows; not a multiple of the chunk sizes on purpose
#: rows per process in the DDP tests; unequal on purpose
ROWS = (6, 7)
data = bad_inputs.data  # the fixture: small copies of the example files


def loss_of(name: str, use_groups: bool):
    return registry.registered("losses")[name][0].cls(use_groups=use_groups)


def model(name: str = "ClipLoss", use_groups: bool = True, dropout: float = 0.0, chunk: int | None = None,
          **kwargs) -> CrossModalSetup:
    torch.manual_seed(0)
    setup = CrossModalSetup(
        encoders={name_: partial(MLPEncoder, hidden_sizes=[12], dropout=dropout) for name_ in SCHEMA},
        loss=loss_of(name, use_groups), embed_dim=6, grad_cache_chunk=chunk, **kwargs,
    )
    setup.build(SCHEMA)
    setup.is_logging_step = lambda: False  # no trainer to log to
    return setup


def batch(n: int = N, seed: int = 3, dtype=torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(n, len(entry["features"]), generator=generator, dtype=dtype)
           for name, entry in SCHEMA.items()}
    return out | {GROUP: torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9][:n])}


def loss_and_grads(setup: CrossModalSetup, data: dict[str, torch.Tensor], seed: int = 5):
    setup.train()
    setup.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = setup.training_step(data, 0)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in setup.named_parameters()}
    if dist.is_initialized():  # what DDP does with parameter gradients: average over processes
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return loss.detach(), grads


def assert_same(got, want, atol: float = 1e-8, rtol: float = 1e-6) -> None:
    (loss, grads), (expected_loss, expected_grads) = got, want
    torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=rtol)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=atol, rtol=rtol, msg=name)
    assert sum(g.abs().sum() for g in grads.values()) > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'groups' if c[1] else 'nogroups'}")
def test_every_loss_gets_the_plain_steps_loss_and_gradients(case):
    plain = model(*case).double()
    data = batch()
    expected = loss_and_grads(plain, data)
    for chunk in (1, 4, N, 64):
        cached = copy.deepcopy(plain)
        cached.grad_cache_chunk = chunk
        assert_same(loss_and_grads(cached, data), expected)
    # every learnable parameter of the loss (logit scale, bias) is among them, once
    assert {n for n, p in plain.loss.named_parameters() if p.requires_grad} <= {
        n.removeprefix("loss.") for n in expected[1] if n.startswith("loss.")}


def test_float32_within_1e_5():
    plain = model("SigLipLoss")
    data = batch(dtype=torch.float32)
    cached = copy.deepcopy(plain)
    cached.grad_cache_chunk = 4
    assert_same(loss_and_grads(cached, data), loss_and_grads(plain, data), atol=1e-5, rtol=1e-4)


def test_dropout_masks_are_replayed():
    """With dropout, the chunks' masks are not the whole batch's draw; the gradient is exactly that of the
    loss the no-graph pass computed, i.e. of a graph built chunk by chunk from the same random state."""
    plain = model(dropout=0.3).double()
    data = batch()
    cached = copy.deepcopy(plain)
    cached.grad_cache_chunk = 4

    def chunked_with_graphs(setup, seed):
        setup.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        parts = [setup.loss_inputs({n: data[n][rows] for n in SCHEMA}) for rows in chunks(N, 4)]
        loss = setup._training_loss({n: torch.cat([p[n] for p in parts]) for n in SCHEMA}, data, N)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in setup.named_parameters() if p.grad is not None}

    got = loss_and_grads(cached, data, seed=5)
    assert_same(got, chunked_with_graphs(copy.deepcopy(plain), seed=5))
    # the masks matter: another draw gives another loss (so a re-run with fresh masks would be caught)
    other = chunked_with_graphs(copy.deepcopy(plain), seed=6)
    assert not torch.allclose(other[0], got[0])
    # one chunk holding the batch draws the plain step's masks
    whole = copy.deepcopy(plain)
    whole.grad_cache_chunk = N
    assert_same(loss_and_grads(whole, data), loss_and_grads(plain, data))
    # and the step leaves the random stream where the no-graph pass left it (the replays are forked)
    torch.manual_seed(5)
    cached.training_step(data, 0)
    after = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        for rows in chunks(N, 4):
            cached.loss_inputs({n: data[n][rows] for n in SCHEMA})
    torch.testing.assert_close(after, torch.rand(3))


@pytest.mark.parametrize("settings", [
    {"modes": {"tx": "frozen"}},
    {"modes": {"ph": "disabled"}},
    {"modes": {"ph": "disabled"}, "heads": {"ph": "identity"}, "embed_dim": 8},  # nothing to learn on that side
    {"preservation": {"tx": 1.5, "ph": 0.0}},
    {"pair_weights": {"tx-ph": 2.0}},
], ids=["frozen", "disabled", "disabled-identity", "preservation", "pair-weights"])
def test_frozen_disabled_towers_and_preservation(settings):
    embed_dim = settings.pop("embed_dim", 6)
    torch.manual_seed(0)
    plain = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            embed_dim=embed_dim, **settings)
    plain.build(SCHEMA)
    plain.is_logging_step = lambda: False
    plain.double()
    data = batch()
    cached = copy.deepcopy(plain)
    cached.grad_cache_chunk = 5
    assert_same(loss_and_grads(cached, data), loss_and_grads(plain, data))


def test_bad_values_and_batch_norm_are_refused():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"grad_cache_chunk \(rows per chunk\) must be an integer >= 1"):
            CrossModalSetup(grad_cache_chunk=bad)
    torch.manual_seed(0)
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], norm="batch") for n in SCHEMA},
                            embed_dim=6, grad_cache_chunk=4)
    setup.build(SCHEMA)
    setup.is_logging_step = lambda: False
    with pytest.raises(ValueError, match=r"grad_cache_chunk: tower 'tx' uses batch normalisation \(BatchNorm1d\)"):
        setup.training_step(batch(dtype=torch.float32), 0)
    setup.towers["tx"].mode = setup.towers["ph"].mode = "frozen"  # frozen: eval-mode statistics, allowed
    setup.train()
    setup.training_step(batch(dtype=torch.float32), 0)
    from unimodality.plugins.setups.distillation import ClassDistillationSetup
    with pytest.raises(ValueError, match="ClassDistillationSetup: grad_cache_chunk is not supported"):
        ClassDistillationSetup(teacher="tx", student="ph", grad_cache_chunk=4)
    with pytest.raises(TypeError, match="cannot split a list"):
        take_rows([1, 2, 3], slice(0, 2))


class Batches(Dataset):
    """Fixed global batches; under DDP each process reads its own consecutive rows of each (`ROWS`)."""

    def __init__(self, steps: int) -> None:
        self.batches = [batch(sum(ROWS), seed=10 + i, dtype=torch.float32) for i in range(steps)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        data = self.batches[i]
        if not dist.is_initialized():
            return data
        rank = dist.get_rank()
        rows = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
        return {k: v[rows] for k, v in data.items()}


def fit(chunk: int | None, steps: int = 4, loss: str = "SigLipLoss", **trainer) -> CrossModalSetup:
    torch.manual_seed(0)
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            loss=loss_of(loss, True), embed_dim=6, grad_cache_chunk=chunk,
                            optimizer=partial(torch.optim.AdamW, lr=1e-2))
    setup.build(SCHEMA)
    loader = DataLoader(Batches(steps), batch_size=None, shuffle=False)
    quiet_trainer(max_steps=steps, num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
                  **trainer).fit(setup, train_dataloaders=loader)
    return setup


def assert_same_weights(got: CrossModalSetup, want: CrossModalSetup, atol: float = 1e-5) -> None:
    start = fit_start()
    moved = False
    for (name, p), q, s in zip(got.state_dict().items(), want.state_dict().values(), start.values()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-4, msg=name)
        moved |= not torch.allclose(p, s)
    assert moved  # the runs trained


def fit_start() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            loss=loss_of("SigLipLoss", True), embed_dim=6)
    setup.build(SCHEMA)
    return setup.state_dict()


def test_training_run_matches_the_plain_run():
    """Automatic optimization as usual: gradient clipping, accumulation and logging (diagnostics) included."""
    options = dict(gradient_clip_val=0.05, accumulate_grad_batches=2)
    assert_same_weights(fit(4, steps=6, **options), fit(None, steps=6, **options))


def test_non_finite_loss_stops_before_the_weights_change():
    torch.manual_seed(0)
    setup = CrossModalSetup(encoders={n: partial(MLPEncoder, hidden_sizes=[12], dropout=0.0) for n in SCHEMA},
                            loss=PoisonedLoss(after=3), embed_dim=6, grad_cache_chunk=4)
    setup.build(SCHEMA)
    loader = DataLoader(Batches(5), batch_size=None, shuffle=False)
    trainer = quiet_trainer(max_steps=5, num_sanity_val_steps=0, use_distributed_sampler=False)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 0\): the loss is nan \(tx-ph=nan\)"):
        trainer.fit(setup, train_dataloaders=loader)
    assert all(torch.isfinite(p).all() for p in setup.parameters())


# -- 2 processes (gloo) with chunks vs 1 process plain on the global batch -----------------------------------
def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
    data = {k: v[rows] for k, v in batch(sum(ROWS)).items()}
    results = {case: loss_and_grads(model(*case, chunk=4).double(), data) for case in CASES}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_cache_ddp")
    # forked, not spawned: the children have torch imported already (a spawn pays ~10 s per process)
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'groups' if c[1] else 'nogroups'}")
def test_two_processes_with_chunks_match_one_plain(distributed_results, case):
    expected = loss_and_grads(model(*case).double(), batch(sum(ROWS)))
    for results in distributed_results:
        assert_same(results[case], expected)


def _ddp_fit_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    setup = fit(4, strategy="ddp", devices=world)
    torch.save(setup.state_dict(), Path(out) / f"fit{rank}.pt")


def test_lightning_ddp_run_with_chunks_matches_one_plain_process(tmp_path):
    """Through Lightning's DDP strategy (its reducer all-reduces the cached gradients once per step)."""
    mp.start_processes(_ddp_fit_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    want = fit(None)
    for rank in range(2):
        got = copy.deepcopy(want)
        got.load_state_dict(torch.load(tmp_path / f"fit{rank}.pt"))
        assert_same_weights(got, want)


# -- from the command line / YAML ----------------------------------------------------------------------------
def test_the_option_from_the_command_line(data):
    code, printed = run(fit_args(data, "--model.init_args.grad_cache_chunk", "8"))
    assert code == 0, printed
    one_line_error(fit_args(data, "--model.init_args.grad_cache_chunk", "0"),
                   r"grad_cache_chunk \(rows per chunk\) must be an integer >= 1 or null \(off\), got 0",
                   folder=data["dir"])


def test_molecule_batches_split_into_graphs():
    from torch_geometric.data import Batch, Data

    graphs = [Data(x=torch.full((k + 1, 3), float(k)), edge_index=torch.zeros(2, 0, dtype=torch.long))
              for k in range(5)]
    part = take_rows(Batch.from_data_list(graphs), slice(1, 3))
    assert part.num_graphs == 2
    torch.testing.assert_close(part.x, torch.cat([graphs[1].x, graphs[2].x]))
    torch.testing.assert_close(part.batch, torch.tensor([0, 0, 1, 1, 1]))


@pytest.mark.slow  # two interpreters (the script and its measuring child): ~10 s
def test_the_benchmark_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gradcache.py"
    out = tmp_path / "gradcache.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--rows", "64", "--chunks", "16", "--features",
                    "20", "--hidden", "16", "--repeats", "1", "--output", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["plain", "chunk 16"]
    assert all(r["agree"] for r in rows) and rows[1]["time_ratio"]["median"] > 0


def test_a_loss_scale_is_divided_out():
    """Under fp16 loss scaling the cached gradients are scaled during the towers' backward, then unscaled."""
    setup = model("ClipLoss").double()
    data = batch()
    params = [p for p in setup.parameters() if p.requires_grad]

    def grads(scale: float) -> list[torch.Tensor]:
        _, surrogate = cached_gradients(
            N, 4, lambda rows: setup.loss_inputs({n: data[n][rows] for n in SCHEMA}),
            lambda local: setup._training_loss(local, data, N), params, torch.device("cpu"), scale)
        return torch.autograd.grad(surrogate, params)

    for got, want in zip(grads(1024.0), grads(1.0)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
