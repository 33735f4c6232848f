"""A tower: one modality's encoder followed by a projection head into the shared embedding space."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.encoder import Encoder, load_state_dict_file

TowerMode = Literal["trainable", "frozen", "disabled"]


class Tower(nn.Module):
    """``encoder -> projection head -> L2 normalisation`` (the last step skipped with ``normalize=False``).

    Modes:
      - ``trainable``: everything learns.
      - ``frozen``: the encoder's weights are fixed (loaded from ``weights`` when given), it gets no
        gradients and stays in eval mode; the projection head still learns so the embedding sizes match.
      - ``disabled``: no encoder, the input features are used as they are and only the head learns.

    The head always maps to the shared ``embed_dim``, so the loss sees the same kind of embedding from
    every tower, whatever the modes.
    """

    def __init__(
        self,
        in_features: int,
        embed_dim: int,
        encoder: Encoder | None,
        mode: TowerMode = "trainable",
        weights: str | None = None,
        weights_prefix: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("trainable", "frozen", "disabled"):
            raise ValueError(f"tower mode must be trainable, frozen or disabled, got {mode!r}")
        self.mode = mode
        self.in_features = in_features
        if mode == "disabled":
            encoder = None
        elif encoder is None:
            raise ValueError(f"a {mode} tower needs an encoder")
        elif encoder.in_features != in_features:
            raise ValueError(f"encoder expects {encoder.in_features} input features, data has {in_features}")
        self.encoder = encoder
        if encoder is not None and weights is not None:
            encoder.load_state_dict(load_state_dict_file(weights, weights_prefix))
        width = encoder.out_features if encoder is not None else in_features
        self.head = nn.Linear(width, embed_dim)
        if mode == "frozen":
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()  # keep dropout off and batch-norm statistics fixed
        return self

    def represent(self, x: Any) -> torch.Tensor:
        """The encoder's output (the input itself for a disabled tower)."""
        if self.encoder is None:
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.in_features:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"disabled tower expects input of shape (batch, {self.in_features}), got {got}")
            return x
        self.encoder.check_input(x)
        if self.mode == "frozen":
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def forward(self, x: Any, normalize: bool = True) -> torch.Tensor:
        """The L2-normalised embedding of ``x``, or the head's raw output with ``normalize=False`` (for a
        loss that sets ``normalized_inputs = False``)."""
        projected = self.head(self.represent(x))
        return F.normalize(projected, dim=-1) if normalize else projected
