"""Losses under distribution: 2 gloo processes give the loss and gradients of 1 process on the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unimodality import registry
from unimodality.distributed import gather, gather_with_grad

#: every built-in loss, with replicate-aware positives and without
LOSSES = sorted(name for name, plugins in registry.registered("losses").items()
                if any(p.dist == "unimodality" for p in plugins))
CASES = [(name, use_groups) for name in LOSSES for use_groups in (True, False)]
#: rows per process; unequal on purpose (gathering must not assume equal batches)
ROWS = (5, 7)


def build(name: str, use_groups: bool, seed: int = 0):
    torch.manual_seed(seed)
    cls = registry.registered("losses")[name][0].cls
    loss = cls(use_groups=use_groups).double()
    towers = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 4), "b": torch.nn.Linear(5, 4)}).double()
    generator = torch.Generator().manual_seed(seed + 1)
    n = sum(ROWS)
    data = {
        "a": torch.randn(n, 6, generator=generator, dtype=torch.float64),
        "b": torch.randn(n, 5, generator=generator, dtype=torch.float64),
        "group": torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7]),  # replicates across both processes
    }
    return loss, towers, data


def loss_and_grads(name, use_groups, rows=slice(None)):
    loss_fn, towers, data = build(name, use_groups)
    a, b = towers["a"](data["a"][rows]), towers["b"](data["b"][rows])
    if loss_fn.normalized_inputs:  # as the setups do; VICReg and DCCA take the raw outputs
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    loss = loss_fn(gather_with_grad(a), gather_with_grad(b), gather(data["group"][rows]))
    loss.backward()
    params = [*towers.parameters(), *loss_fn.parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if dist.is_initialized():  # what DDP does with parameter gradients: average over processes
        for g in grads:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return loss.detach(), grads


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start = sum(ROWS[:rank])
    results = {case: loss_and_grads(*case, rows=slice(start, start + ROWS[rank])) for case in CASES}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    # the same two processes also compute the contrast case (each spawn pays ~10 s of imports per process)
    _no_grad_gather(rank, world, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_folder(tmp_path_factory) -> Path:
    """What two gloo processes wrote: rank<r>.pt (every case) and naive<r>.pt (the no-gradient gather)."""
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def distributed_results(distributed_folder):
    return [torch.load(distributed_folder / f"rank{r}.pt") for r in range(2)]


def test_every_builtin_loss_is_covered():
    assert {"ClipLoss", "SigLipLoss", "HopfieldLoss", "NTXentLoss", "VICRegLoss", "DCCALoss", "S2LLoss",
            "CWCLLoss", "SinkhornLoss"} <= set(LOSSES)
    assert {name for name in LOSSES if not registry.registered("losses")[name][0].cls.normalized_inputs} >= {
        "VICRegLoss", "DCCALoss"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'groups' if c[1] else 'nogroups'}")
def test_two_processes_match_one(distributed_results, case):
    expected_loss, expected_grads = loss_and_grads(*case)
    for rank, results in enumerate(distributed_results):
        loss, grads = results[case]
        torch.testing.assert_close(loss, expected_loss, atol=1e-10, rtol=1e-9, msg=f"loss on rank {rank}")
        assert len(grads) == len(expected_grads)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"gradient on rank {rank}")
        assert any(g.abs().sum() > 0 for g in grads)


def _no_grad_gather(rank: int, world: int, out: str) -> None:
    """The classic bug, for contrast: gathering without gradients loses the other processes' terms."""
    loss_fn, towers, data = build("ClipLoss", False)
    start = sum(ROWS[:rank])
    rows = slice(start, start + ROWS[rank])
    a = F.normalize(towers["a"](data["a"][rows]), dim=1)
    b = F.normalize(towers["b"](data["b"][rows]), dim=1)
    ga, gb = gather(a), gather(b)  # no gradient through the other ranks' rows
    ga[start:start + ROWS[rank]] = a
    gb[start:start + ROWS[rank]] = b
    loss_fn(ga, gb).backward()
    grad = towers["a"].weight.grad.clone()
    dist.all_reduce(grad)
    torch.save(grad / world, Path(out) / f"naive{rank}.pt")


def test_gathering_without_gradients_would_be_caught(distributed_folder):
    _, expected = loss_and_grads("ClipLoss", False)
    naive = torch.load(distributed_folder / "naive0.pt")
    assert not torch.allclose(naive, expected[0], atol=1e-5)
