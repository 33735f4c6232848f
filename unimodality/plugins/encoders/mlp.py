"""Multi-layer perceptron encoder for feature vectors (expression profiles, morphology embeddings)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from unimodality.encoder import Encoder

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}


class MLPEncoder(Encoder):
    """Stack of ``Linear -> norm -> activation -> dropout`` blocks.

    Args:
        in_features: input size (set from the data, not the config).
        hidden_sizes: width of each block; the last one is the representation size.
        norm: normalisation after each linear layer.
        activation: non-linearity.
        dropout: dropout probability after each block.
        residual: add a skip connection around blocks whose input and output widths match.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int] = [512, 256],  # noqa: B006 (jsonargparse shows it in --help)
        norm: Literal["batch", "layer", "none"] = "layer",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu",
        dropout: float = 0.1,
        residual: bool = False,
    ) -> None:
        super().__init__(in_features)
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(
                f"MLPEncoder: hidden_sizes must name at least one layer, each of width >= 1; got {hidden_sizes}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"MLPEncoder: dropout must be in [0, 1), got {dropout}")
        self.residual = residual
        blocks = []
        width = in_features
        for size in hidden_sizes:
            layers: list[nn.Module] = [nn.Linear(width, size)]
            if _NORMS[norm] is not None:
                layers.append(_NORMS[norm](size))
            layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout)]
            blocks.append(nn.Sequential(*layers))
            width = size
        self.blocks = nn.ModuleList(blocks)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        for block in self.blocks:
            y = block(x)
            x = x + y if self.residual and y.shape == x.shape else y
        return x
