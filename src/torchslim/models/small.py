"""Tiny students for distillation: a small MLP and a small CNN."""

from __future__ import annotations

from torch import nn

from torchslim.models.registry import register_model


@register_model("student_mlp")
def student_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 32) -> nn.Sequential:
    """Student MLP: 784-32-10 (25,450 parameters at the defaults)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("student_cnn")
def student_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 8) -> nn.Sequential:
    """Student CNN: two 3x3 convs (8, 16 channels) with pooling and one linear layer."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, num_classes),
    )
