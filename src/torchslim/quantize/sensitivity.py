"""Per-layer sensitivity: how much accuracy and fidelity each layer loses when quantized alone.

The budget planner uses it to decide which layers get fewer bits; users read it to pick per-layer
overrides for mixed precision.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.measure.accuracy import accuracy, fidelity
from torchslim.quantize.api import quantize_


@dataclasses.dataclass
class LayerSensitivity:
    """One layer quantized alone: accuracy, its drop from the float model, fidelity to it."""

    layer: str
    accuracy: float
    accuracy_drop: float
    agreement: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


def sensitivity(
    model: nn.Module, data: Any, config: Config, *, layers: list[str] | None = None, batch_size: int = 256
) -> list[LayerSensitivity]:
    """Quantize each layer alone with ``config`` and measure the damage on labelled data.

    Args:
        model: the float model (left unchanged; each trial works on a copy).
        data: labelled evaluation data (``DataSplits`` -> its test split, a ``Dataset`` or loader).
        config: the quantization config to try per layer (``IntQuant``, ``CodebookQuant`` ...).
        layers: layer names to try (default: every layer ``quantize_`` would quantize).
        batch_size: evaluation batch size.

    Returns:
        One entry per layer, most sensitive (largest accuracy drop, then lowest cosine) first.

    Raises:
        ConfigError: if ``layers`` names a layer that ``quantize_`` cannot quantize.
    """
    candidates = sorted(quantize_(copy.deepcopy(model), config).quantized)
    chosen = candidates if layers is None else list(layers)
    unknown = [name for name in chosen if name not in candidates]
    if unknown:
        raise ConfigError(
            f"layers names {unknown[0]!r}, which cannot be quantized: expected one of {', '.join(candidates)}"
        )
    baseline = accuracy(model, data, batch_size)
    results = []
    for name in chosen:
        trial = copy.deepcopy(model)
        quantize_(trial, config, filter_fn=lambda _module, layer_name, target=name: layer_name == target)
        acc = accuracy(trial, data, batch_size)
        agreement = fidelity(trial, model, data, batch_size)
        results.append(LayerSensitivity(name, acc, baseline - acc, agreement["agreement"], agreement["cosine"]))
    results.sort(key=lambda r: (-r.accuracy_drop, r.cosine))
    return results
