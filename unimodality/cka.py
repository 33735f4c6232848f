"""Linear centred kernel alignment (CKA) between two representations of the same rows."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of Kornblith et al. (2019, "Similarity of Neural Network Representations Revisited",
    eq. 5): with ``X``, ``Y`` centred column-wise (rows are samples),

    ``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``,

    computed with the Gram matrices ``K = X X^T``, ``L = Y Y^T`` (``<K, L> / (||K||_F ||L||_F)``, the same
    number) when there are fewer rows than features. It lies in [0, 1], is 1 for representations equal up
    to an orthogonal transform, an isotropic scale and a translation, and is invariant to exactly these;
    it is differentiable, and 0 when either side is constant.

    Args:
        x: ``(n, ...)``, flattened to ``(n, p)``.
        y: ``(n, ...)``, flattened to ``(n, q)``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x and y must have the same rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)  # no fp16 4th powers
    x, y = x.flatten(1).to(dtype), y.flatten(1).to(dtype)
    x, y = x - x.mean(0), y - y.mean(0)
    # scaled to unit Frobenius norm first (CKA is scale-invariant): the 4th powers below cannot overflow
    tiny = torch.finfo(dtype).tiny
    x = x / x.norm().clamp_min(tiny)
    y = y / y.norm().clamp_min(tiny)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (p + q) < n * (p * q + p * p + q * q):  # the cheaper of the two equal forms
        k, ell = x @ x.T, y @ y.T
        cross, self_x, self_y = (k * ell).sum(), k.square().sum(), ell.square().sum()
    else:
        cross, self_x, self_y = (y.T @ x).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()
    return cross / (self_x.sqrt() * self_y.sqrt()).clamp_min(tiny)
