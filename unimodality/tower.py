"""A tower: one modality's encoder followed by a projection head into the shared embedding space."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.encoder import Encoder, load_state_dict_file

TowerMode = Literal["trainable", "frozen", "disabled"]
HeadKind = Literal["linear", "orthogonal", "identity"]


class Tower(nn.Module):
    """``encoder -> projection head -> L2 normalisation`` (the last step skipped with ``normalize=False``).

    Modes:
      - ``trainable``: everything learns.
      - ``frozen``: the encoder's weights are fixed (loaded from ``weights`` when given), it gets no
        gradients and stays in eval mode; the projection head (unless ``identity``) still learns so the
        embedding sizes match.
      - ``disabled``: no encoder, the input features are used as they are and only the head (if any) learns.

    The head always maps to the shared ``embed_dim``, so the loss sees the same kind of embedding from
    every tower, whatever the modes. Its kinds:
      - ``linear``: a learned ``Linear`` with PyTorch's default initialisation.
      - ``orthogonal``: a learned ``Linear`` starting as a semi-orthogonal map with zero bias (orthonormal
        columns when ``embed_dim >= width``): it then preserves inner products, so the tower's embedding
        starts with its representation's cosine geometry (with an ``AdapterEncoder``, the input's).
      - ``identity``: no head, the representation is the embedding (its width must be ``embed_dim``); with a
        disabled tower, an input embedding is used exactly as it is (Semi-Clipped's frozen image side).

    Args:
        in_features: the input's width (from the data).
        embed_dim: the shared embedding size.
        encoder: the encoder (ignored, and may be None, for a disabled tower).
        mode: ``trainable``, ``frozen`` or ``disabled``.
        weights: encoder weights file (state dict or checkpoint) to load.
        weights_prefix: key prefix to select and strip in that file.
        head: ``linear``, ``orthogonal`` or ``identity``.
    """

    def __init__(
        self,
        in_features: int,
        embed_dim: int,
        encoder: Encoder | None,
        mode: TowerMode = "trainable",
        weights: str | None = None,
        weights_prefix: str | None = None,
        head: HeadKind = "linear",
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
        if head == "identity":
            if width != embed_dim:
                raise ValueError(
                    f"an identity head needs the representation's width ({width}) to equal embed_dim "
                    f"({embed_dim}): set embed_dim: {width}, or use a linear or orthogonal head"
                )
            self.head: nn.Module = nn.Identity()
        elif head in ("linear", "orthogonal"):
            self.head = nn.Linear(width, embed_dim)
            if head == "orthogonal":
                nn.init.orthogonal_(self.head.weight)
                nn.init.zeros_(self.head.bias)
        else:
            raise ValueError(f"tower head must be linear, orthogonal or identity, got {head!r}")
        if mode == "frozen":
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()  # keep dropout off and batch-norm statistics fixed
        return self

    #: the input standardisation (``zscore``/``robust``, see `unimodality.standardization`), or None
    standardize: str | None = None

    def standardize_inputs(self, method: str) -> None:
        """Standardise the input features before the encoder, with statistics set by `fit_standardization`
        (buffers: saved in checkpoints and applied wherever the tower embeds)."""
        self.standardize = method
        self.register_buffer("input_center", torch.zeros(self.in_features))
        self.register_buffer("input_scale", torch.ones(self.in_features))
        self.register_buffer("input_standardized", torch.tensor(False))

    def fit_standardization(self, center: torch.Tensor, scale: torch.Tensor) -> None:
        self.input_center.copy_(center)
        self.input_scale.copy_(scale)
        self.input_standardized.fill_(True)

    def represent(self, x: Any) -> torch.Tensor:
        """The encoder's output (the input itself for a disabled tower)."""
        if self.encoder is None:
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.in_features:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"disabled tower expects input of shape (batch, {self.in_features}), got {got}")
            return self._standardized(x)
        self.encoder.check_input(x)
        x = self._standardized(x)
        if self.mode == "frozen":
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def _standardized(self, x: Any) -> Any:
        if self.standardize is None:
            return x
        return (x - self.input_center.to(x.dtype)) / self.input_scale.to(x.dtype)

    def forward(self, x: Any, normalize: bool = True) -> torch.Tensor:
        """The L2-normalised embedding of ``x``, or the head's raw output with ``normalize=False`` (for a
        loss that sets ``normalized_inputs = False``)."""
        projected = self.head(self.represent(x))
        return F.normalize(projected, dim=-1) if normalize else projected
