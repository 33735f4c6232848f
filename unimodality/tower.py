"""A tower: one modality's encoder followed by a projection head into the shared embedding space."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimodality.encoder import Encoder, load_state_dict_file
from unimodality.grad_cache import take_rows

TowerMode = Literal["trainable", "frozen", "disabled"]
HeadKind = Literal["linear", "orthogonal", "identity"]


class RepresentationCache:
    """A frozen tower's representation of every source row it has seen (`Tower.cache_representations`).

    Filled row by row on first sight, on the representations' device and in their dtype; a plain attribute,
    not a buffer, so checkpoints leave it out and DDP does not broadcast it (each process fills its own).
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        #: rows the encoder computed since the cache was made (tests and benchmarks count them)
        self.computed = 0

    def clear(self) -> None:
        """Forget every row (the encoder's weights or input statistics changed)."""
        self.values = self.filled = None

    def __len__(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    def lookup(self, rows: torch.Tensor, compute: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """The representations of source rows ``rows``; ``compute(positions)`` gives those of the batch
        positions whose rows were not seen yet (each such row once, even when it repeats in the batch;
        ``compute(None)``: the whole batch, when all its rows are new and distinct)."""
        rows = rows.long()
        if self.values is not None and self.values.device != rows.device:  # the model moved
            self.values, self.filled = self.values.to(rows.device), self.filled.to(rows.device)
        size = 0 if self.filled is None else len(self.filled)
        missing = torch.ones_like(rows, dtype=torch.bool)
        if size:
            inside = rows < size
            missing[inside] = ~self.filled[rows[inside]]
        if bool(missing.any()):
            positions = torch.nonzero(missing).squeeze(1)
            new, inverse = torch.unique(rows[positions], return_inverse=True)
            if len(new) == len(rows):  # every row new, none repeated: the batch as it is, without copying rows
                self._store(rows, compute(None).detach())
            else:
                first = torch.full((len(new),), len(positions), device=rows.device).scatter_reduce_(
                    0, inverse, torch.arange(len(positions), device=rows.device), "amin")
                self._store(new, compute(positions[first]).detach())
            self.computed += len(new)
        return self.values[rows]

    def _store(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        needed = int(rows.max()) + 1
        size = 0 if self.filled is None else len(self.filled)
        if needed > size:  # grown geometrically: the source's row count is not known here
            grown = max(needed, 2 * size)
            old_values, old_filled = self.values, self.filled
            self.values = values.new_zeros((grown, *values.shape[1:]))
            self.filled = torch.zeros(grown, dtype=torch.bool, device=values.device)
            if size:
                self.values[:size], self.filled[:size] = old_values, old_filled
        self.values[rows] = values.to(self.values.dtype)
        self.filled[rows] = True


def _forget_representations(tower: Tower, incompatible_keys: Any) -> None:
    if tower.cache is not None:  # weights (or standardisation statistics) were loaded
        tower.cache.clear()


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
        self.register_load_state_dict_post_hook(_forget_representations)

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()  # keep dropout off and batch-norm statistics fixed
        return self

    #: the input standardisation (``zscore``/``robust``, see `unimodality.standardization`), or None
    standardize: str | None = None
    #: the encoder's output per source row of a frozen tower (`cache_representations`), or None
    cache: RepresentationCache | None = None

    def cache_representations(self) -> None:
        """Keep a frozen tower's representation of each source row: `represent` given the batch's source
        ``rows`` runs the encoder only on rows it has not seen. Valid because a frozen encoder is fixed and
        deterministic (eval mode, no gradients) and a row's input never changes; the cache is emptied when a
        state dict loads (weights, standardisation statistics) and when `fit_standardization` runs."""
        if self.mode != "frozen":
            raise ValueError(f"only a frozen tower's representations can be cached; this tower is {self.mode}")
        self.cache = RepresentationCache()

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
        if self.cache is not None:
            self.cache.clear()

    def represent(self, x: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (the input itself for a disabled tower); with ``rows``, the source row of each
        of ``x``'s rows, a cached frozen tower (`cache_representations`) encodes only rows it has not seen."""
        if self.encoder is None:
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.in_features:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"disabled tower expects input of shape (batch, {self.in_features}), got {got}")
            return self._standardized(x)
        self.encoder.check_input(x)
        if rows is not None and self.cache is not None:
            return self.cache.lookup(
                rows, lambda positions: self._encode(x if positions is None else take_rows(x, positions)))
        return self._encode(x)

    def _encode(self, x: Any) -> torch.Tensor:
        x = self._standardized(x)
        if self.mode == "frozen":
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def _standardized(self, x: Any) -> Any:
        if self.standardize is None:
            return x
        return (x - self.input_center.to(x.dtype)) / self.input_scale.to(x.dtype)

    def forward(self, x: Any, normalize: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The L2-normalised embedding of ``x``, or the head's raw output with ``normalize=False`` (for a
        loss that sets ``normalized_inputs = False``); ``rows`` as in `represent`."""
        projected = self.head(self.represent(x, rows))
        return F.normalize(projected, dim=-1) if normalize else projected
