"""LeNet-300-100 and Caffe's LeNet-5, the reference models of Deep Compression (Han et al. 2015)."""

from __future__ import annotations

from torch import nn

from torchslim.models.registry import register_model


@register_model("lenet300")
def lenet300(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """LeNet-300-100 MLP: 784-300-100-10 with ReLU (266,610 parameters at 28x28x1)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """Caffe LeNet-5: conv 20 -> pool -> conv 50 -> pool -> fc 500 -> fc 10 (431,080 parameters)."""
    side = ((image_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side * side, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
