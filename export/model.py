"""SE-ResNet registry: one ResNet builder, squeeze-and-excitation as a block option.

Follows timm's layout (``timm/models/resnet.py``): every variant is a three-line function
registered by ``@register`` over the shared ``ResNet`` builder, and SE is a block option rather
than a second network class. The SE block is Hu et al., "Squeeze-and-Excitation Networks"
(CVPR 2018): squeeze = global average pool, excitation = FC-ReLU-FC-sigmoid with reduction
r=16, and the channel re-weighting is applied to the residual branch before the residual add.

The ``slim`` variants are for the node's small crops (median cone ~25 px): narrower widths and
a stem without early downsampling (one 3x3 stride-1 conv, no max-pool), so a 32x32 crop still
ends in a 4x4 feature map. The 64-px variant halves in its first stage instead, which keeps it
as cheap per crop as the 32-px one while its stem sees full resolution.
"""

from __future__ import annotations

import export.train_extra  # noqa: F401 (before torch: a one-line hint when it is missing)

# isort: split

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes:
        name: registry name (recorded in checkpoints and model metadata as ``arch``).
        build: ``build(num_classes) -> nn.Module``.
        input_size: default square input side in pixels.
    """

    name: str
    build: Callable[[int], nn.Module]
    input_size: int


REGISTRY: dict[str, ModelSpec] = {}


def register(input_size: int) -> Callable[[Callable[[int], nn.Module]], Callable]:
    """Register a variant function ``fn(num_classes) -> nn.Module`` under its own name."""

    def wrap(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if fn.__name__ in REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        REGISTRY[fn.__name__] = ModelSpec(fn.__name__, fn, input_size)
        return fn

    return wrap


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a registered architecture with ``num_classes`` outputs (logits)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return REGISTRY[name].build(num_classes)


class SqueezeExcite(nn.Module):
    """Channel attention of SE-Net: x * sigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)  # 1x1 convs == FCs on the pooled vector
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with optional SE before the residual add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, se: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch) if se else nn.Identity()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return torch.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """ResNet over ``BasicBlock`` stages.

    Args:
        layers: blocks per stage.
        widths: channels per stage.
        num_classes: outputs of the final linear layer.
        se: use squeeze-and-excitation in every block.
        stem: ``standard`` (7x7/2 conv + 3x3/2 max-pool, ImageNet) or ``slim`` (3x3/1 conv,
            no pooling, for small crops).
        stem_width: channels of the stem conv (defaults to ``widths[0]``).
        first_stride: stride of the first stage (the later stages always halve).
    """

    def __init__(self, layers: tuple[int, ...], widths: tuple[int, ...], num_classes: int,
                 se: bool = False, stem: str = "standard", stem_width: int | None = None,
                 first_stride: int = 1) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} differ in length")
        stem_width = stem_width or widths[0]
        if stem == "standard":
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "slim":
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem must be 'standard' or 'slim', got {stem!r}")
        blocks: list[nn.Module] = []
        in_ch = stem_width
        for i, (n, width) in enumerate(zip(layers, widths)):
            for j in range(n):
                stride = (2 if i > 0 else first_stride) if j == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride, se))
                in_ch = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as identity.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(x.mean(dim=(2, 3), keepdim=True), 1))


PAPER_WIDTHS = (64, 128, 256, 512)
SLIM32_WIDTHS = (16, 32, 64, 128)
SLIM64_WIDTHS = (24, 48, 96, 192)


@register(input_size=224)
def se_resnet18(num_classes: int) -> nn.Module:
    return ResNet((2, 2, 2, 2), PAPER_WIDTHS, num_classes, se=True)


@register(input_size=224)
def resnet18(num_classes: int) -> nn.Module:
    return ResNet((2, 2, 2, 2), PAPER_WIDTHS, num_classes, se=False)


@register(input_size=32)
def se_resnet_slim32(num_classes: int) -> nn.Module:
    return ResNet((1, 1, 1, 1), SLIM32_WIDTHS, num_classes, se=True, stem="slim")


@register(input_size=32)
def resnet_slim32(num_classes: int) -> nn.Module:
    return ResNet((1, 1, 1, 1), SLIM32_WIDTHS, num_classes, se=False, stem="slim")


@register(input_size=32)
def se_resnet_slim32_s2(num_classes: int) -> nn.Module:
    """``se_resnet_slim32`` whose first stage halves the resolution (16x16 after the stem):
    about a third of the multiply-adds, for a CPU without a GPU."""
    return ResNet((1, 1, 1, 1), SLIM32_WIDTHS, num_classes, se=True, stem="slim", first_stride=2)


@register(input_size=64)
def se_resnet_slim64(num_classes: int) -> nn.Module:
    return ResNet((1, 1, 1, 1), SLIM64_WIDTHS, num_classes, se=True, stem="slim", first_stride=2)


@register(input_size=64)
def resnet_slim64(num_classes: int) -> nn.Module:
    return ResNet((1, 1, 1, 1), SLIM64_WIDTHS, num_classes, se=False, stem="slim",
                  first_stride=2)
