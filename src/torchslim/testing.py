"""Small models and data for tests (ours and users'): fast, deterministic, no downloads."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.models import create_model


def blobs(n: int = 256, num_classes: int = 4, features: int = 16, seed: int = 0) -> TensorDataset:
    """Linearly separable Gaussian blobs: x float32 (n, features), y int64 (n,).

    Args:
        n: number of samples.
        num_classes: number of classes (blob centres).
        features: input width.
        seed: generator seed.

    Returns:
        A ``TensorDataset`` of inputs and labels.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, features, generator=generator) * 3
    y = torch.arange(n) % num_classes
    x = centres[y] + torch.randn(n, features, generator=generator)
    return TensorDataset(x.float(), y.long())


def tiny_images(n: int = 64, num_classes: int = 10, size: int = 28, seed: int = 0) -> TensorDataset:
    """Random 1 x size x size images with random labels (for shape/plumbing tests, not accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return TensorDataset(x, y)


def tiny_mlp(features: int = 16, hidden: int = 32, num_classes: int = 4) -> nn.Module:
    """A registered-factory MLP (``student_mlp`` on a 1 x 1 x features 'image'), saveable as .slim."""
    model = create_model("student_mlp", num_classes=num_classes, image_size=1, in_channels=features, hidden=hidden)
    return model
