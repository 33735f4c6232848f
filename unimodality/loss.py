"""The contrastive loss interface."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from unimodality.config import RecordsInitArgs


class Keys(NamedTuple):
    """What a loss with ``supports_queue`` contrasts the towers' rows with instead of each other (MoCo, He et
    al. 2020; ALBEF, Li et al. 2021): the batch's rows and a queue of earlier batches' rows, all embedded by
    momentum (EMA) copies of the towers. Constants: no gradient flows into them.

    Rows ``0..n-1`` of ``a`` and ``b`` are the batch's own rows in batch order (row ``i``'s positives are
    among them, as in the plain loss), the rest the queue's; ``a`` gives the columns of ``b``'s rows (the
    ``b -> a`` direction), ``b`` those of ``a``'s rows. Queue entries of a row's own group are neither
    positives nor negatives of it (they may be that very sample, embedded a few steps ago). With three
    modalities or more, pairs share a modality's tensors: a loss reads them and never writes them in place.
    """

    #: ``(n + k, d)`` momentum embeddings of the first modality: the batch's ``n`` rows, then ``k`` queued ones
    a: torch.Tensor
    #: ``(n + k, d)`` the same of the second modality
    b: torch.Tensor
    #: ``(n + k,)`` their group ids
    group: torch.Tensor


class ContrastiveLoss(RecordsInitArgs, nn.Module):
    """Base class of losses (plugin group ``unimodality.losses``).

    ``forward(a, b, group)`` takes L2-normalised embeddings of the *global* batch (the setup gathers them
    across processes with gradients first), row ``i`` of ``a`` paired with row ``i`` of ``b``, and the
    integer perturbation id of each row. Rows sharing a group are positives of each other when
    ``use_groups`` is on; off, only the diagonal is positive (the textbook loss). Losses are computed in
    fp32 even under mixed precision.

    A loss whose method needs the projection heads' raw outputs (statistics of the features themselves,
    e.g. VICReg's variance and covariance terms or CCA's correlations) sets the class attribute
    ``normalized_inputs = False``; the setups then hand it the un-normalised outputs instead (their
    retrieval metrics and ``predict`` still use the L2-normalised embeddings).

    A loss that can contrast each tower's rows with momentum embeddings and a queue of past ones instead
    (MoCo-style, `CrossModalSetup`'s ``queue_size``) sets ``supports_queue = True`` and takes
    ``forward(a, b, group, keys)``, ``keys`` `Keys` (or ``None``: the plain loss).
    """

    #: whether ``forward`` receives L2-normalised embeddings (the default) or the heads' raw outputs
    normalized_inputs: ClassVar[bool] = True
    #: whether ``forward`` takes `Keys` (momentum embeddings of the batch and a queue of past ones)
    supports_queue: ClassVar[bool] = False

    def __init__(self, use_groups: bool = True) -> None:
        super().__init__()
        self.use_groups = use_groups

    def positives(self, group: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """Boolean ``(n, n)`` matrix of positive pairs."""
        if group is None or not self.use_groups:
            return torch.eye(n, dtype=torch.bool, device=device)
        return group[:, None] == group[None, :]

    def __call__(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None,
                 keys: Keys | None = None) -> torch.Tensor:
        # losses in fp32 whatever the towers run in: under bf16/fp16 autocast the logits (scaled up to 100x)
        # lose precision, and a loss computed in bf16 would come out in bf16
        with torch.autocast(device_type=a.device.type, enabled=False):
            a, b = _at_least_fp32(a), _at_least_fp32(b)
            if keys is None:  # the plain call: losses without a queue keep their three-argument forward
                return super().__call__(a, b, group)
            if not self.supports_queue:
                raise ValueError(f"{type(self).__name__} takes no momentum keys nor queue (supports_queue is False)")
            if keys.a.requires_grad or keys.b.requires_grad:
                raise ValueError(f"{type(self).__name__}: the keys (momentum embeddings) must be constants; "
                                 "detach them")
            return super().__call__(a, b, group, Keys(keys.a.to(a.dtype), keys.b.to(a.dtype), keys.group))

    def forward(self, a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging (temperatures in linear units, biases)."""
        return {}


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float64 stays (reference tests)


# -- helpers shared by the softmax losses: no dense target, at most one B x B matrix kept ------------------
#: elements of one temporary block of `contrast_terms` (256 KiB in fp32): bounds its extra memory
BLOCK_ELEMENTS = 2**16
#: fewest rows of a block: each block's matrix products read the whole other side, so thin blocks are slow
MIN_BLOCK_ROWS = 128


def group_index(group: torch.Tensor | None, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense id ``0..G-1`` of each row's group and the size of every group.

    Args:
        group: ``(n,)`` perturbation ids (any integers), or ``None``: every row is its own group.
        n: number of rows.
        device: where the results live.

    Returns:
        ``(index, counts)``: ``(n,)`` long and ``(G,)`` long.
    """
    if group is None:
        return torch.arange(n, device=device), torch.ones(n, dtype=torch.long, device=device)
    _, index, counts = torch.unique(group, return_inverse=True, return_counts=True)
    return index, counts


def group_sums(x: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(G, d)`` sum of the rows of ``x`` in each group (differentiable; ``O(n d)``, no ``n x n`` mask).

    Args:
        x: ``(n, d)`` rows.
        index: ``(n,)`` dense group ids in ``0..n_groups-1`` (see `group_index`).
        n_groups: ``G``.
    """
    return x.new_zeros(n_groups, x.shape[1]).index_add(0, index, x)


def _row_blocks(rows: int, columns: int) -> int:
    """Rows per block of a ``rows x columns`` matrix."""
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, columns))


class ContrastTerms(NamedTuple):
    """What a softmax contrastive loss needs of its logits ``l = scale * a @ b.T`` (see `contrast_terms`)."""

    #: ``(n,)`` logsumexp of each row
    rows: torch.Tensor
    #: ``(m,)`` logsumexp of each column (``None`` when not asked for, or symmetric)
    columns: torch.Tensor | None
    #: scalar ``sum_g w_g * (sum of l_ij over the pairs i, j of group g)``
    positive: torch.Tensor


class _ContrastTerms(torch.autograd.Function):
    """Forward and analytic backward of `contrast_terms`; keeps only the logits (and the inputs)."""

    @staticmethod
    def forward(ctx, a, b, scale, index, weights, need_columns):  # noqa: ANN001, ANN205 (autograd API)
        symmetric = b is None
        other = a if symmetric else b
        logits = (scale * a) @ other.T
        if symmetric:
            logits.fill_diagonal_(float("-inf"))  # a view is neither its own negative nor its own positive
        step = _row_blocks(*logits.shape)
        rows = logits.new_empty(len(a))
        for start in range(0, len(a), step):  # block by block: the exp temporaries stay one block
            rows[start:start + step] = torch.logsumexp(logits[start:start + step], dim=1)
        columns = None
        if need_columns:
            top = logits.amax(dim=0)
            top = top.masked_fill(top.isinf(), 0.0)
            total = logits.new_zeros(logits.shape[1])
            for start in range(0, len(a), step):
                total += (logits[start:start + step] - top).exp_().sum(dim=0)
            columns = total.log_() + top
        positive = scale * _positive_sum(a, other, index, weights, symmetric)
        ctx.save_for_backward(a, other, scale, logits, rows, columns if need_columns else rows, index, weights)
        ctx.symmetric, ctx.need_columns = symmetric, need_columns
        ctx.set_materialize_grads(False)  # an unused output gets no gradient: its softmax is not computed
        if columns is None:
            columns = rows.new_zeros(0)
            ctx.mark_non_differentiable(columns)
        return rows, columns, positive

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, grad_columns, grad_positive):  # noqa: ANN001, ANN205
        a, b, scale, logits, rows, columns, index, weights = ctx.saved_tensors
        symmetric = ctx.symmetric
        grad_a = torch.zeros_like(a)  # returned as they are: no further copies
        grad_b = grad_a if symmetric else torch.zeros_like(b)  # symmetric: both sides land in one gradient
        use_columns = ctx.need_columns and grad_columns is not None
        # d/dl_ij = g_i softmax_row(l)_ij + h_j softmax_column(l)_ij, one block of rows at a time
        step = _row_blocks(*logits.shape)
        buffer = logits.new_empty(min(step, len(a)), logits.shape[1]) if grad_rows is not None and use_columns \
            else None
        for start in range(0, len(a) if grad_rows is not None or use_columns else 0, step):
            stop = min(start + step, len(a))
            block = logits[start:stop]
            if grad_rows is not None:
                g = (block - rows[start:stop, None]).exp_().mul_(grad_rows[start:stop, None])
                if use_columns:
                    h = torch.sub(block, columns[None, :], out=buffer[:stop - start])
                    g.add_(h.exp_().mul_(grad_columns[None, :]))
            else:
                g = (block - columns[None, :]).exp_().mul_(grad_columns[None, :])
            grad_a[start:stop].addmm_(g, b)
            grad_b.addmm_(g.T, a[start:stop])
        # sum_ij G_ij a_i . b_j = a . (G b); symmetric: both sides were summed into one gradient, so half
        grad_scale = torch.vdot(a.reshape(-1), grad_a.reshape(-1)) / (2 if symmetric else 1)
        grad_a.mul_(scale)
        if not symmetric:
            grad_b.mul_(scale)
        if grad_positive is not None:
            grad_scale = grad_scale + grad_positive * _positive_sum(a, b, index, weights, symmetric)
            _add_positive_grad(grad_a, grad_b, a, b, index, weights, symmetric, grad_positive * scale)
        return grad_a, (None if symmetric else grad_b), grad_scale.reshape(scale.shape), None, None, None


def _positive_sum(a, b, index, weights, symmetric):  # noqa: ANN001, ANN202
    if index is None:  # every row its own group, weight 1: the diagonal
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    n_groups = len(weights)
    sums_a = group_sums(a, index, n_groups)
    sums_b = sums_a if symmetric else group_sums(b, index, n_groups)
    total = ((sums_a * sums_b).sum(dim=1) * weights).sum()
    if symmetric:  # the pairs (i, i) are not positives
        total = total - torch.einsum("ij,ij,i->", a, a, weights[index])
    return total


def _add_positive_grad(grad_a, grad_b, a, b, index, weights, symmetric, factor):  # noqa: ANN001, ANN202
    """``grad += factor * d(positive sum)/d(input)``, in place, with temporaries of one block of rows."""
    if index is None:
        grad_a.addcmul_(b, factor)
        grad_b.addcmul_(a, factor)
        return
    n_groups, step = len(weights), _row_blocks(len(a), a.shape[1])
    coef = weights * factor * (2 if symmetric else 1)  # symmetric: z_i is on both sides of its pairs
    sums_a = group_sums(a, index, n_groups) * coef[:, None]
    sums_b = sums_a if symmetric else group_sums(b, index, n_groups) * coef[:, None]
    for start in range(0, len(a), step):
        rows = index[start:start + step]
        grad_a[start:start + step] += sums_b[rows]
        if symmetric:
            grad_a[start:start + step].addcmul_(a[start:start + step], coef[rows, None], value=-1)
        else:
            grad_b[start:start + step] += sums_a[rows]


def contrast_terms(
    a: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor, index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, columns: bool = True,
) -> ContrastTerms:
    """The terms of a softmax contrastive loss on ``l = scale * a @ b.T``, with exact gradients.

    ``rows``/``columns``: logsumexp over each row/column (the negatives' side of InfoNCE); ``positive``:
    ``sum_g w_g * sum_{i, j in g} l_ij`` (the positives' side), from group sums in ``O(n d)``, without an
    ``n x n`` mask. Only the logits are kept for backward, and every temporary is a block of
    `BLOCK_ELEMENTS` elements: memory is that of one ``n x m`` matrix. No dense target, no
    transposed copy, no softmax matrices kept by autograd. Twice differentiating is not supported.

    Args:
        a: ``(n, d)`` rows.
        b: ``(m, d)`` columns, or ``None``: ``b = a`` and the diagonal ``i = j`` is excluded from every
            sum (NT-Xent: a view is neither its own negative nor its own positive); ``columns`` is then
            not computed (it equals ``rows``).
        scale: scalar tensor multiplying the dot products (an inverse temperature).
        index: ``(n,)`` dense group ids (see `group_index`); ``None``: each row ``i`` pairs with
            column ``i`` only, weight 1 (then ``b`` is required).
        weights: ``(G,)`` weight ``w_g`` of each group's pairs (with ``index``).
        columns: also compute the column logsumexps.
    """
    scale = torch.as_tensor(scale, dtype=a.dtype, device=a.device)
    if (index is None) != (weights is None) or (b is None and index is None):
        raise ValueError("contrast_terms: give index and weights together (required when b is None)")
    need_columns = columns and b is not None
    rows, cols, positive = _ContrastTerms.apply(a, b, scale, index, weights, need_columns)
    return ContrastTerms(rows, cols if need_columns else None, positive)


# -- a queue of past embeddings as extra columns (see `Keys`) ----------------------------------------------
class _QueueLogSumExp(torch.autograd.Function):
    """Forward and analytic backward of `queue_logsumexp`; keeps only the ``n x k`` logits (and the inputs)."""

    @staticmethod
    def forward(ctx, x, keys, scale, group, key_group):  # noqa: ANN001, ANN205 (autograd API)
        logits = (scale * x) @ keys.T
        step = _row_blocks(*logits.shape)
        rows = logits.new_empty(len(x))
        for start in range(0, len(x), step):
            block = logits[start:start + step]
            if group is not None:  # a row's own group: out of its sum
                block.masked_fill_(group[start:start + step, None] == key_group[None, :], float("-inf"))
            rows[start:start + step] = torch.logsumexp(block, dim=1)  # -inf when no entry is left
        ctx.save_for_backward(x, keys, scale, logits, rows)
        ctx.set_materialize_grads(False)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):  # noqa: ANN001, ANN205
        x, keys, scale, logits, rows = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None
        grad_x = torch.zeros_like(x)
        top = rows.masked_fill(rows.isinf(), 0.0)  # a row without entries: exp(-inf - 0) = 0, not nan
        step = _row_blocks(*logits.shape)
        for start in range(0, len(x), step):
            g = (logits[start:start + step] - top[start:start + step, None]).exp_()
            grad_x[start:start + step].addmm_(g.mul_(grad_rows[start:start + step, None]), keys)
        grad_scale = torch.vdot(x.reshape(-1), grad_x.reshape(-1))  # sum_ik G_ik x_i . k_k, as in contrast_terms
        return grad_x.mul_(scale), None, grad_scale.reshape(scale.shape), None, None


def queue_logsumexp(
    x: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, group: torch.Tensor | None = None,
    key_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(n,)`` logsumexp of each row of ``scale * x @ keys.T`` over the keys of other groups than the row's.

    The negatives a queue (the rows of `Keys` past the batch's) adds to a softmax loss: combine with the
    batch's logsumexp by ``torch.logaddexp``. A row with no key left (an empty queue, or only its own
    group) gets ``-inf`` (``logaddexp`` then leaves the batch's term as it is, gradient included). ``keys``
    are constants (no gradient); memory is one ``n x k`` matrix, temporaries one block of `BLOCK_ELEMENTS`.

    Args:
        x: ``(n, d)`` rows.
        keys: ``(k, d)`` past embeddings.
        scale: scalar tensor multiplying the dot products (an inverse temperature).
        group: ``(n,)`` group ids of the rows; ``None``: no key is left out.
        key_group: ``(k,)`` group ids of the keys (with ``group``).
    """
    if keys.requires_grad:
        raise ValueError("queue_logsumexp: the keys (past embeddings) must be constants; detach them")
    if group is not None and key_group is None:
        raise ValueError("queue_logsumexp: give key_group with group")
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return _QueueLogSumExp.apply(x, keys, scale, group, key_group)
