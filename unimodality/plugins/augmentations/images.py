"""Augmentations of image batches ``(batch, channels, height, width)``: SimCLR's standard views.

All act per sample with probability ``p`` on the batch where it lies (CPU or GPU, no per-sample Python loop)
and draw from torch's generator (``seed_everything`` applies). Geometric ones (crop, flips, rotations) move
every channel of a sample together; intensity jitter changes each channel on its own, as stains vary
independently. They assume normalised images (each channel about mean 0, std 1: what
`ImageSource` gives).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from unimodality.augmentation import Augmentation
from unimodality.plugins.augmentations.vectors import GaussianNoise


class ImageAugmentation(Augmentation):
    """Base class of augmentations of images ``(batch, channels, height, width)``."""

    ndim = 4
    input_shape = "(batch, channels, height, width)"


def _where(selected: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(selected[:, None, None, None], changed, x)


class RandomResizedCrop(ImageAugmentation):
    """Crop a random box and resize it back to the input size (bilinear), as in SimCLR/Inception.

    The box covers a fraction of the image's area drawn uniformly from ``scale`` and has an aspect ratio
    drawn log-uniformly from ``ratio`` (clipped so the box fits); its position is uniform.

    Args:
        scale: range of the box's area, as a fraction of the image's.
        ratio: range of the box's width / height.
        p: probability that a sample is cropped.
    """

    def __init__(self, scale: tuple[float, float] = (0.4, 1.0), ratio: tuple[float, float] = (0.75, 1.3333),
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCrop: scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCrop: ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        height, width = x.shape[-2:]
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(n, device=device)
        log_ratio = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * torch.rand(
            n, device=device)
        aspect = torch.exp(log_ratio) * height / width  # the box's width/height in pixels -> in grid units
        # box size in normalised coordinates ([-1, 1] spans the image): area = w * h, w / h = aspect
        box_w = torch.sqrt(area * aspect).clamp(max=1.0)
        box_h = torch.sqrt(area / aspect).clamp(max=1.0)
        centre_x = (1 - box_w) * (2 * torch.rand(n, device=device) - 1)
        centre_y = (1 - box_h) * (2 * torch.rand(n, device=device) - 1)
        theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = box_w, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = box_h, centre_y
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        cropped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return _where(selected, cropped, x)


class RandomFlip(ImageAugmentation):
    """Mirror the image: left-right (``horizontal``) or top-bottom (``vertical``).

    Microscopy has no preferred orientation, so a flip keeps the biology; use one of each axis, each with
    ``p = 0.5``, for all four flip combinations.

    Args:
        axis: ``horizontal`` (flip the width axis) or ``vertical`` (flip the height axis).
        p: probability that a sample is flipped.
    """

    def __init__(self, axis: Literal["horizontal", "vertical"] = "horizontal", p: float = 0.5) -> None:
        super().__init__(p=p)
        if axis not in ("horizontal", "vertical"):
            raise ValueError(f"RandomFlip: axis must be horizontal or vertical, got {axis!r}")
        self.axis = axis

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        return _where(selected, x.flip(-1 if self.axis == "horizontal" else -2), x)


class RandomRotation90(ImageAugmentation):
    """Rotate by a multiple of 90 degrees, drawn uniformly from 0, 90, 180 and 270 (pixels are moved, never
    interpolated). Non-square images only turn by 0 or 180 degrees, which keeps their shape.

    Args:
        p: probability that a sample gets a random turn (which may be 0 degrees).
    """

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        square = x.shape[-1] == x.shape[-2]
        turns = torch.randint(0, 4, (x.shape[0],), device=x.device) if square else \
            2 * torch.randint(0, 2, (x.shape[0],), device=x.device)
        turns = torch.where(selected, turns, torch.zeros_like(turns))
        out = x.clone()
        for k in (1, 2, 3):  # one batched rotation per angle
            index = torch.nonzero(turns == k).flatten()
            if len(index):
                out[index] = torch.rot90(x[index], k, dims=(-2, -1))
        return out


class IntensityJitter(ImageAugmentation):
    """Vary each channel's brightness and contrast independently (stains vary from well to well).

    Per sample and channel: ``(x - m) * c + m + b`` with ``m`` the channel's mean over the image, the
    contrast ``c`` uniform in ``[1 - contrast, 1 + contrast]`` and the brightness shift ``b`` uniform in
    ``[-brightness, brightness]``, in the units of the normalised image (channel standard deviations).

    Args:
        brightness: largest brightness shift.
        contrast: largest relative contrast change (below 1).
        per_channel: draw the factors per channel; false: one pair per sample, shared by its channels.
        p: probability that a sample is jittered.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, per_channel: bool = True,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(f"IntensityJitter: need brightness >= 0 and 0 <= contrast < 1, got {brightness}, "
                             f"{contrast}")
        self.brightness = brightness
        self.contrast = contrast
        self.per_channel = per_channel

    def transform(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1] if self.per_channel else 1, 1, 1)
        contrast = 1 + self.contrast * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
        shift = self.brightness * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return _where(selected, (x - mean) * contrast + mean + shift, x)


class ImageNoise(GaussianNoise):
    """Add independent Gaussian noise to every pixel: ``x + std * N(0, 1)`` (camera noise).

    Args:
        std: standard deviation of the noise, in normalised units.
        p: probability that a sample gets noise.
    """

    ndim = ImageAugmentation.ndim
    input_shape = ImageAugmentation.input_shape
