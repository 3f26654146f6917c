"""A small ResNet with BatchNorm for 28x28 inputs: the teacher of the worked example."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.errors import ModelError
from torchslim.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv, then one stage per width (stride 1 first, 2 after), global pool, linear head."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int, in_channels: int):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ModelError(f"resnet: widths {widths!r} and blocks {blocks!r} must be non-empty and equally long")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


@register_model("resnet")
def resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    widths: tuple[int, ...] | list[int] = (32, 64, 128, 256),
    blocks: tuple[int, ...] | list[int] = (1, 1, 1, 2),
) -> SmallResNet:
    """ResNet-style teacher with BatchNorm for 1x28x28 (2,409,066 parameters, 5.6x LeNet-5)."""
    return SmallResNet(tuple(widths), tuple(blocks), num_classes, in_channels)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """ResNet-18 depth (2 blocks per stage, widths 64-512) for 28x28 inputs (about 11M parameters)."""
    return SmallResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)
