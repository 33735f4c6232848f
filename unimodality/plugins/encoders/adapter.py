"""Residual adapter on a fixed embedding (Semi-Clipped's trainable side): ``x + g * f(x)``, identity at start."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from unimodality.encoder import Encoder

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterEncoder(Encoder):
    """A small residual MLP that starts as the identity: ``y = x + g * f(x)``.

    As in Semi-Clipped (Bendidi et al., ICML 2025), the input is a fixed embedding (a frozen foundation
    model's, e.g. scVI's ``obsm`` of an ``.h5ad``) and only a light adapter on it learns, so training starts
    from the input embedding's geometry instead of from scratch. ``f`` is ``Linear -> norm -> activation ->
    dropout`` blocks and a last ``Linear`` back to the input width; the output keeps the input's width.

    At initialisation ``y = x`` exactly: without a gate, ``f``'s last layer starts at zero (as LoRA's ``B``),
    so its gradient is non-zero while its output is zero; with ``gate: true``, ``g = tanh(alpha)`` with one
    learnable ``alpha`` per feature starting at zero (the zero-initialised tanh gate of Flamingo, Alayrac et
    al. 2022) and ``f`` keeps its default initialisation.

    Args:
        in_features: input size (set from the data, not the config).
        hidden_sizes: widths of the hidden blocks of ``f`` (at least one).
        norm: normalisation after each hidden linear layer.
        activation: non-linearity.
        dropout: dropout probability after each hidden block.
        gate: learn a per-feature ``tanh`` gate on ``f(x)``, starting closed.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int] = [256],  # noqa: B006 (jsonargparse shows it in --help)
        norm: Literal["batch", "layer", "none"] = "layer",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu",
        dropout: float = 0.0,
        gate: bool = False,
    ) -> None:
        super().__init__(in_features)
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(
                f"AdapterEncoder: hidden_sizes must name at least one layer, each of width >= 1; got {hidden_sizes}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"AdapterEncoder: dropout must be in [0, 1), got {dropout}")
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            if norms[norm] is not None:
                layers.append(norms[norm](size))
            layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        last = nn.Linear(width, in_features)
        self.residual = nn.Sequential(*layers, last)
        self.out_features = in_features
        if gate:
            self.alpha = nn.Parameter(torch.zeros(in_features))
        else:
            self.register_parameter("alpha", None)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        update = self.residual(x)
        return x + (torch.tanh(self.alpha) * update if self.alpha is not None else update)
