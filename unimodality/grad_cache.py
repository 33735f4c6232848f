"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", GradCache): the exact gradient of a loss over a batch whose activations do not fit in memory at once.

A contrastive loss couples every row with every other, so the batch cannot simply be split into
accumulated micro-batches. It only couples them through the embeddings, though: the towers' activations
are needed chunk by chunk, the embeddings (rows x dim) all at once. So:

1. embed the batch chunk by chunk without autograd graphs (recording each chunk's random state);
2. compute the loss on all the embeddings (gathered across processes as usual) and its gradient with
   respect to them (and to the loss's own parameters, e.g. a logit scale);
3. re-run each chunk with autograd, replaying its random state (the same dropout masks), and
   back-propagate the cached embedding gradient of its rows into the towers' parameters.

Peak memory is one chunk's activations plus the embeddings; the cost is a second forward pass of the
towers. The parameter gradients are then handed to the trainer as the gradient of a surrogate whose value
is the loss (`cached_gradients`), so automatic optimization (DDP's all-reduce, gradient clipping,
accumulation, loss scaling, the non-finite loss check) works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class RandomState:
    """The CPU (and the CUDA device's) random state at one point, to replay a chunk's dropout masks.

    Args:
        device: the device the towers run on.
    """

    def __init__(self, device: torch.device) -> None:
        self.devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state, leaving the process's random streams as they were."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def take_rows(x: Any, rows: slice | torch.Tensor) -> Any:
    """Rows ``rows`` of one modality's batch input: a tensor's rows, or the graphs of a ``torch_geometric``
    batch (as a batch again).

    Args:
        x: the batch input of one modality.
        rows: the rows to take: a slice, or a tensor of row indices.
    """
    if isinstance(x, torch.Tensor):
        return x[rows]
    if hasattr(x, "index_select") and hasattr(x, "from_data_list"):  # a torch_geometric Batch
        index = range(*rows.indices(x.num_graphs)) if isinstance(rows, slice) else rows
        return type(x).from_data_list(x.index_select(index))
    raise TypeError(f"gradient caching splits batch inputs into chunks of rows; cannot split a {type(x).__name__}")


def chunks(rows: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``0..rows``."""
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


class _CachedGradients(torch.autograd.Function):
    """``value`` in forward; in backward, the given gradients for ``params`` (times the incoming gradient,
    so a loss scaler's factor or gradient accumulation's ``1/n`` apply as to any loss)."""

    @staticmethod
    def forward(ctx, value, grads, *params):  # noqa: ANN001, ANN205 (autograd API)
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        # in place, and let go of them: autograd can then take each as the parameter's .grad without a copy
        grads, ctx.grads = ctx.grads, None
        return None, None, *(g.mul_(grad.to(g.dtype)) for g in grads)


def cached_gradients(
    rows: int,
    chunk: int,
    embed: Callable[[slice], dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: list[nn.Parameter],
    device: torch.device,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss over all ``rows`` and a surrogate of the same value whose gradient is the loss's, by
    gradient caching.

    Args:
        rows: rows of the (local) batch.
        chunk: rows embedded at once.
        embed: embeddings of the batch's rows ``slice`` per name (what the loss takes).
        loss_fn: the loss of the embeddings of all ``rows`` (it may gather them across processes).
        params: the trainable parameters, towers' and loss's.
        device: where the towers run (whose random state each chunk replays).
        scale: factor on the cached embedding gradients during the towers' backward, divided out after
            (a mixed-precision loss scale, so fp16 activations' gradients do not underflow).

    Returns:
        ``(loss, surrogate)``: the loss, with its graph down to the embeddings, and a tensor of the same
        value whose backward gives every parameter in ``params`` its gradient.
    """
    slices = chunks(rows, chunk)
    states, parts = [], []
    with torch.no_grad():
        for rows_ in slices:
            states.append(RandomState(device))
            parts.append(embed(rows_))
    names = list(parts[0])
    leaves = {name: torch.cat([part[name] for part in parts]).requires_grad_() for name in names}
    del parts
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, [*leaves.values(), *params], allow_unused=True)
    cached = {name: g if g is None else g * scale for name, g in zip(names, grads[:len(names)])}
    # the loss's own parameters (logit scale, bias) get their gradient here, once; the towers' below
    totals = [g if g is None else g.clone() for g in grads[len(names):]]
    for rows_, state in zip(slices, states):
        with state.replay():
            outputs = embed(rows_)
        pairs = [(outputs[n], cached[n][rows_]) for n in names if outputs[n].requires_grad and cached[n] is not None]
        if not pairs:  # e.g. disabled towers with identity heads only: nothing to learn upstream
            continue
        chunk_grads = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
        for i, g in enumerate(chunk_grads):
            if g is not None:
                g = g / scale if scale != 1.0 else g
                totals[i] = g if totals[i] is None else totals[i].add_(g)
    totals = [torch.zeros_like(p) if g is None else g for p, g in zip(params, totals)]
    return loss, _CachedGradients.apply(loss.detach(), totals, *params)
