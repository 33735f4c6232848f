"""The augmentation interface: random transformations of a batch (feature vectors, images) for
self-supervised setups."""

from __future__ import annotations

import torch
from torch import nn

from unimodality.config import RecordsInitArgs


class Augmentation(RecordsInitArgs, nn.Module):
    """Base class of augmentations (plugin group ``unimodality.augmentations``).

    An augmentation maps a batch to a randomly transformed batch of the same shape: feature vectors
    ``(batch, features)`` by default, images ``(batch, channels, height, width)`` for subclasses that set
    ``ndim = 4`` (the class attributes ``ndim`` and ``input_shape`` say what one accepts). ``forward``
    transforms only in training mode and is the identity in eval mode, so a model never augments what it
    validates on or embeds by accident; `augment` always transforms
    (a setup calls it explicitly where it wants augmented views outside training, e.g. a validation loss).

    Each sample is transformed with probability ``p``, drawn independently per sample. Randomness comes
    from torch's generator on the input's device, so ``seed_everything`` makes runs reproducible.
    Subclasses implement `transform`, given the whole batch and the boolean mask of samples to change.

    Args:
        p: probability that a sample is transformed.
    """

    #: dimensions of the batches it accepts, and how messages name that shape
    ndim: int = 2
    input_shape: str = "(batch, features)"

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x) if self.training else x

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed batch, whatever the mode."""
        if x.dim() != self.ndim:
            raise ValueError(f"{type(self).__name__} expects input of shape {self.input_shape}, got {tuple(x.shape)}")
        if self.p == 0 or x.shape[0] == 0:
            return x
        if self.p == 1:
            selected = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            selected = torch.rand(x.shape[0], device=x.device) < self.p
        return self.transform(x, selected)

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """``x`` with the rows where ``selected`` is true transformed (and the others unchanged)."""
        raise NotImplementedError


class Compose(Augmentation):
    """Augmentations applied one after the other, in the order given (each with its own ``p``).

    An empty list is the identity.

    Args:
        augmentations: the augmentations, in order.
    """

    def __init__(self, augmentations: list[Augmentation] | None = None) -> None:
        super().__init__(p=1.0)
        self.augmentations = nn.ModuleList(augmentations or [])

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        for augmentation in self.augmentations:
            x = augmentation.augment(x)
        return x

    def __len__(self) -> int:
        return len(self.augmentations)
