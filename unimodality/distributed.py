"""Gathering the global batch across processes, so a loss sees every process's negatives.

The setup gathers embeddings before the loss; the loss itself stays a plain function of the global
batch. Every process computes the same global loss, so in the backward pass the gradient of a process's
own rows is the sum over processes of the gradient flowing into their copy of those rows; DDP then
averages parameter gradients over processes, which gives exactly the single-process gradient of the
global loss. Gathering without gradients (a common bug) silently drops most of the signal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenated rows of every process (sizes may differ) and the row count of each."""
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over processes and keeps this rank's rows.

    Built from ``all_gather`` and ``all_reduce`` only, so it runs on every backend (gloo included).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gathered, sizes = _all_gather_rows(x.detach().contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in rank order; gradients flow back to each process's own rows."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in rank order, without gradients (group ids, evaluation)."""
    return _all_gather_rows(x.detach().contiguous())[0] if is_distributed() else x
