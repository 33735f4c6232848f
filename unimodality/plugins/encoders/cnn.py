"""Convolutional encoder for multi-channel images: a small ResNet, or a torchvision backbone."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from unimodality.encoder import Encoder, load_state_dict_file

Norm = Literal["batch", "group", "none"]


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels) if channels % min(groups, channels) == 0 else 1, channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with a residual connection (a 1x1 projection when the
    width or resolution changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        bias = norm == "none"  # a norm layer's shift makes the conv's bias redundant
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_channels, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias), _norm(norm, out_channels, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError(
            "CNNEncoder(backbone=...) needs torchvision (pip install torchvision, the build matching your torch); "
            "without it use the built-in ResNet (backbone: null)"
        ) from err
    return torchvision


class CNNEncoder(Encoder):
    """ResNet-style convolutional encoder of images ``(batch, channels, height, width)``, any channel count.

    ``stem (3x3 conv, norm, ReLU) -> stages of residual basic blocks -> global average pooling``. Stage
    ``i`` has ``width * 2**i`` channels and (after the first) halves the resolution; global average pooling
    makes the output independent of the image size, so a model trained on crops embeds whole images. The
    input channel count comes from the data (the source's channels).

    With ``backbone`` (e.g. ``resnet18``, needs torchvision) a torchvision model is used instead: its first
    convolution takes ``in_features`` channels, its classifier is dropped, and weights are only read from
    ``backbone_weights`` (a local state dict file, never downloaded); a 3-channel first convolution in the
    file is adapted by averaging its RGB filters for every channel.

    Args:
        in_features: input channels (set from the data, not the config).
        width: channels of the stem and the first stage.
        blocks: residual blocks per stage; its length is the number of stages.
        stem_stride: stride of the stem (2 halves large images early, for speed).
        norm: normalisation after each convolution (``group`` suits small or per-device batches).
        groups: groups of group normalisation.
        dropout: dropout on the pooled representation.
        backbone: a torchvision model name (e.g. ``resnet18``) used instead of the built-in network.
        backbone_weights: a state dict file for the backbone.
    """

    def __init__(
        self,
        in_features: int,
        width: int = 32,
        blocks: list[int] = [1, 1, 1],  # noqa: B006 (jsonargparse shows it in --help)
        stem_stride: int = 1,
        norm: Norm = "batch",
        groups: int = 8,
        dropout: float = 0.0,
        backbone: str | None = None,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__(in_features)
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"CNNEncoder: norm must be batch, group or none, got {norm!r}")
        if width < 1 or stem_stride < 1 or groups < 1 or not blocks or min(blocks) < 1:
            raise ValueError("CNNEncoder: width, stem_stride, groups and every entry of blocks must be at least 1")
        if backbone_weights is not None and backbone is None:
            raise ValueError("CNNEncoder: backbone_weights needs a backbone (e.g. backbone: resnet18)")
        self.backbone_name = backbone
        self.dropout = nn.Dropout(dropout)
        if backbone is not None:
            self.net, self.out_features = _build_backbone(backbone, in_features, backbone_weights)
            return
        layers: list[nn.Module] = [
            nn.Conv2d(in_features, width, 3, stride=stem_stride, padding=1, bias=norm == "none"),
            _norm(norm, width, groups),
            nn.ReLU(),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride, norm, groups))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = channels

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"CNNEncoder expects images of shape (batch, {self.in_features}, height, width), got {got}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.dropout(self.net(x))


def _first_conv(model: nn.Module) -> tuple[str, nn.Module, str, nn.Conv2d]:
    """The first convolution: its qualified name, parent module, attribute name and itself."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attribute = name.rpartition(".")
            return name, model.get_submodule(parent_name), attribute, module
    raise ValueError(f"{type(model).__name__} has no convolution to adapt to the input channels")


def _build_backbone(name: str, channels: int, weights: str | None) -> tuple[nn.Module, int]:
    torchvision = _torchvision()
    try:
        model = torchvision.models.get_model(name, weights=None)  # weights=None: nothing is downloaded
    except ValueError as err:
        raise ValueError(f"CNNEncoder: unknown torchvision backbone {name!r} ({err})") from err
    state = load_state_dict_file(weights) if weights is not None else None
    conv_name, parent, attribute, conv = _first_conv(model)
    conv_key = f"{conv_name}.weight"
    if conv.in_channels != channels:
        new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        conv.groups, conv.bias is not None)
        setattr(parent, attribute, new)
    if state is not None:
        kernel = state.get(conv_key)
        if kernel is not None and kernel.shape[1] != channels:
            # RGB filters -> every channel: the mean filter, scaled so the summed response keeps its size
            state[conv_key] = kernel.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1) * kernel.shape[1] / channels
    for head in ("fc", "classifier", "head", "heads"):  # classification heads: the representation is before them
        if isinstance(getattr(model, head, None), nn.Module):
            setattr(model, head, nn.Identity())
            if state is not None:
                state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
            break
    if state is not None:
        model.load_state_dict(state)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, channels, 64, 64))
    model.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"CNNEncoder: backbone {name!r} gives outputs of shape {tuple(out.shape)}, expected (batch, "
                         "features) once its classifier is removed")
    return model, int(out.shape[1])

