"""The encoder interface: a module mapping one modality's input features to a representation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of encoders (plugin group ``unimodality.encoders``).

    An encoder is built with its input size as the first argument (the data decides it, the config does
    not), and declares ``in_features`` and ``out_features`` so a tower can check inputs and size its
    projection head.
    """

    in_features: int
    out_features: int

    def __init__(self, in_features: int) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"{type(self).__name__}: in_features must be >= 1, got {in_features}")
        self.in_features = in_features

    def check_input(self, x: torch.Tensor) -> None:
        """Fail with expected-vs-got when the input has the wrong shape."""
        if x.dim() != 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )


def load_state_dict_file(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Read weights from a plain state dict file or a Lightning/unimodality checkpoint.

    ``prefix`` selects and strips a sub-module's keys (e.g. ``"towers.tx.encoder."``).
    """
    from unimodality.checkpoint import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = load_file(path)  # the safe reader: a truncated or pickled file gets a clear error
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with a 'state_dict' entry")
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path}: no weights start with the prefix {prefix!r}")
    return state
