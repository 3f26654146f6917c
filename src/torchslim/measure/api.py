"""``measure``: one call that reports size, compute, accuracy/fidelity, latency and memory.

``bits_per_weight`` is taken from the saved artifact when there is one: 8 x (bytes of every
tensor stored in the ``.slim`` file, per ``torchslim.artifact.tensor_table``) / logical parameter
count. It therefore shows sparse (bitmask + values) and packed low-bit storage honestly, and it
includes stored buffers such as BatchNorm running statistics and quantization scales (so a dense
fp32 model with BatchNorm reads slightly above 32). Without an artifact it falls back to the
in-memory storage bits from :func:`parameter_stats`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchslim.artifact import tensor_table
from torchslim.errors import ArtifactError, DataError, TorchSlimError
from torchslim.measure._common import first_input, first_samples, iter_batches, unwrap_splits
from torchslim.measure.accuracy import accuracy as top1_accuracy
from torchslim.measure.accuracy import fidelity
from torchslim.measure.latency import measure_latency
from torchslim.measure.macs import count_macs
from torchslim.measure.memory import peak_memory_bytes
from torchslim.measure.size import parameter_stats, saved_artifact

_DERIVED = ("compression_ratio", "sparsity")


@dataclasses.dataclass
class Measurement:
    """What ``measure`` found; ``None`` marks a value that could not be measured (no data, ...)."""

    artifact_bytes: int | None
    fp32_bytes: int
    parameters: int
    nonzero_parameters: int
    bits_per_weight: float
    macs: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    latency: dict = dataclasses.field(default_factory=dict)
    peak_memory_bytes: int | None = None

    @property
    def compression_ratio(self) -> float | None:
        """``fp32_bytes / artifact_bytes`` (how many times smaller than fp32 weights), or ``None``."""
        if not self.artifact_bytes:
            return None
        return self.fp32_bytes / self.artifact_bytes

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are zero (0.0 for a model without parameters)."""
        if not self.parameters:
            return 0.0
        return 1.0 - self.nonzero_parameters / self.parameters

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (latency keys as strings) including the derived properties."""
        out = dataclasses.asdict(self)
        out["latency"] = {str(batch): dict(stats) for batch, stats in self.latency.items()}
        for name in _DERIVED:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of :meth:`to_dict` (derived keys are ignored, latency keys become ints)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in fields}
        kwargs["latency"] = {int(batch): dict(stats) for batch, stats in (data.get("latency") or {}).items()}
        return cls(**kwargs)


def measure(
    model: nn.Module,
    data: Any = None,
    example_inputs: Any = None,
    reference: nn.Module | None = None,
    *,
    artifact_path: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    latency: bool = True,
    num_threads: int | None = None,
) -> Measurement:
    """Measure ``model``: size on disk and in parameters, MACs, accuracy, fidelity, latency, memory.

    Args:
        model: the model to measure (its train/eval mode is left as it was).
        data: a labelled ``Dataset``/``DataLoader``, ``DataSplits`` (its test split), a tensor of
            inputs (no accuracy), or ``None``.
        example_inputs: a batch for MACs (first sample), latency and peak memory (first sample);
            defaults to the first sample of ``data``. Without either, those are ``None``/empty.
        reference: a model to compare logits with (agreement, cosine) on ``data``, or on
            ``example_inputs`` when there is no data.
        artifact_path: an already saved ``.slim`` file of this model; otherwise the model is saved to
            a temporary file (if it cannot be saved, a warning is issued and artifact values are None).
        batch_sizes: batch sizes for latency.
        latency: time the model (the slowest part); ``False`` leaves ``latency`` empty.
        num_threads: threads for latency timing (default ``torch.get_num_threads()``).

    Returns:
        A :class:`Measurement`.

    Raises:
        ArtifactError: if ``artifact_path`` does not exist.
        DataError: for empty data, or a reference without any inputs to compare on.
    """
    data = unwrap_splits(data)
    if example_inputs is None:
        example_inputs = first_input(data)
    stats = parameter_stats(model)
    artifact_size, stored_bytes = _artifact_sizes(model, artifact_path)
    params = stats["parameters"]
    if not params:
        bits = 0.0
    elif stored_bytes is not None:
        bits = 8 * stored_bytes / params
    else:
        bits = stats["storage_bits"] / params

    result = Measurement(
        artifact_bytes=artifact_size,
        fp32_bytes=stats["fp32_bytes"],
        parameters=params,
        nonzero_parameters=stats["nonzero"],
        bits_per_weight=bits,
    )
    if data is not None and _has_labels(data):
        result.accuracy = top1_accuracy(model, data)
    if reference is not None:
        compare_on = data if data is not None else example_inputs
        if compare_on is None:
            raise DataError("measure: a reference model needs data or example_inputs to compare outputs on")
        scores = fidelity(model, reference, compare_on)
        result.agreement, result.cosine = scores["agreement"], scores["cosine"]
    if example_inputs is not None:
        result.macs = count_macs(model, example_inputs)
        result.peak_memory_bytes = peak_memory_bytes(model, first_samples(example_inputs, 1))
        if latency:  # a tensor, or a tuple of tensors for a model with several inputs
            result.latency = measure_latency(model, example_inputs, batch_sizes, num_threads=num_threads)
    return result


def _has_labels(data: Any) -> bool:
    """Whether ``data``'s batches carry targets (an empty dataset counts as labelled, so it errors)."""
    if isinstance(data, Tensor):
        return False
    for _, targets in iter_batches(data, batch_size=1):
        return targets is not None
    return True


def _stored_bytes(path: Path) -> int:
    return sum(int(row["bytes"]) for row in tensor_table(path))


def _artifact_sizes(
    model: nn.Module, artifact_path: str | os.PathLike | None
) -> tuple[int | None, int | None]:
    """Return ``(file bytes, stored tensor bytes)`` of the model's artifact, or ``(None, None)``."""
    if artifact_path is not None:
        path = Path(artifact_path)
        if not path.is_file():
            raise ArtifactError(f"artifact {str(path)!r} does not exist")
        return os.path.getsize(path), _stored_bytes(path)
    try:
        with saved_artifact(model) as path:
            return os.path.getsize(path), _stored_bytes(path)
    except (ImportError, TorchSlimError) as exc:
        warnings.warn(
            f"measure: the model could not be saved as a .slim artifact ({exc}); artifact_bytes is None "
            "and bits_per_weight counts in-memory storage",
            stacklevel=3,
        )
        return None, None


def format_measurement(m: Measurement) -> list[tuple[str, str]]:
    """Human-readable ``(label, value)`` rows for tables (the CLI prints them); unmeasured values are skipped.

    Args:
        m: a measurement.

    Returns:
        Rows such as ``("artifact size", "97.3 KiB")``, ``("compression", "4.02x vs fp32")``.
    """
    rows: list[tuple[str, str]] = []
    if m.artifact_bytes is not None:
        rows.append(("artifact size", format_bytes(m.artifact_bytes)))
    rows.append(("fp32 weights", format_bytes(m.fp32_bytes)))
    if m.compression_ratio is not None:
        rows.append(("compression", f"{m.compression_ratio:.2f}x vs fp32"))
    rows.append(("parameters", f"{m.parameters:,}"))
    rows.append(("nonzero parameters", f"{m.nonzero_parameters:,} ({_percent(1.0 - m.sparsity)})"))
    rows.append(("sparsity", _percent(m.sparsity)))
    rows.append(("bits per weight", f"{m.bits_per_weight:.2f}"))
    if m.macs is not None:
        rows.append(("MACs per sample", f"{m.macs:,}"))
    for label, value in (("accuracy", m.accuracy), ("top-1 agreement", m.agreement)):
        if value is not None:
            rows.append((label, _percent(value)))
    if m.cosine is not None:
        rows.append(("logit cosine", f"{m.cosine:.4f}"))
    for batch, stats in sorted(m.latency.items(), key=lambda item: int(item[0])):
        rows.append((
            f"latency (batch {batch})",
            f"{stats['median_ms']:.3f} ms median, {stats['p90_ms']:.3f} ms p90, "
            f"{stats['throughput_per_s']:,.0f} samples/s",
        ))
    if m.peak_memory_bytes is not None:
        rows.append(("peak memory", format_bytes(m.peak_memory_bytes)))
    return rows


def format_bytes(n: int) -> str:
    """Format a byte count as B, KiB, MiB or GiB (binary units)."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"
