"""Export a PyTorch model to an fp32 ONNX graph, feed tensors to ONNX Runtime, and check both compute the same thing.

Shared by ``torchslim.quantize`` (int8 graphs), ``torchslim.export`` and ``torchslim.models.onnx_graph``: it sits
below them all and imports none of them.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is tried first: it is fast and
folds BatchNorm into the preceding Conv. If it fails (or a future torch drops it) the
``torch.export``-based exporter is used instead. Inputs are named ``input`` (``input_0``,
``input_1`` ... for several), outputs ``output`` (``output_0`` ...), and the batch axis is dynamic
unless ``dynamic_batch=False``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchslim._utils import device_of, eval_mode, first_line
from torchslim.errors import DataError, ModelError, TorchSlimError
from torchslim.fileio import atomic_write_bytes
from torchslim.onnx.runtime import ort_session

# ONNX Runtime >= 1.17 runs opsets up to 20+; 17 is well supported by both exporters' op sets and is
# enough for per-channel QDQ (>= 13). The torch.export-based exporter needs >= 18.
DEFAULT_OPSET = 17
_DYNAMO_MIN_OPSET = 18


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(item, Tensor) for item in example_inputs
    ):
        return tuple(example_inputs)
    raise DataError(
        f"example_inputs is a {type(example_inputs).__name__}: expected a tensor or a non-empty tuple of "
        "tensors"
    )


def io_names(count: int, stem: str) -> list[str]:
    """``["input"]`` for one tensor, ``["input_0", "input_1", ...]`` for several."""
    return [stem] if count == 1 else [f"{stem}_{index}" for index in range(count)]


def _count_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    try:
        with torch.no_grad():
            output = model(*inputs)
    except Exception as exc:  # wrong arity, shapes, dtypes...: say which inputs were tried
        shapes = ", ".join(str(tuple(item.shape)) for item in inputs)
        raise ModelError(
            f"cannot run {type(model).__name__} on example inputs of shape {shapes}: {first_line(exc)}"
        ) from exc
    if isinstance(output, Tensor):
        return 1
    if isinstance(output, (tuple, list)) and output and all(isinstance(item, Tensor) for item in output):
        return len(output)
    raise ModelError(
        f"{type(model).__name__} returns a {type(output).__name__}: ONNX export needs a tensor or a tuple of "
        "tensors"
    )


def _dynamic_axes(inputs, input_names, output_names, dynamic_batch) -> dict | None:
    """Batch axes, and a ``sequence`` axis 1 for integer inputs of two or more dims (token ids, attention masks).

    Token models must take any sequence length, not only the traced one; the outputs' sequence axis follows from
    the graph.
    """
    if not dynamic_batch:
        return None
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in [*input_names, *output_names]}
    for name, tensor in zip(input_names, inputs, strict=True):
        if not tensor.is_floating_point() and tensor.dim() >= 2:
            axes[name][1] = "sequence"
    return axes


def _export_torchscript(model, inputs, input_names, output_names, opset, dynamic_batch) -> bytes:
    axes = _dynamic_axes(inputs, input_names, output_names, dynamic_batch)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter: deprecated (still works), tracer noise
        torch.onnx.export(
            model, inputs, buffer, dynamo=False, input_names=input_names, output_names=output_names,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )
    return buffer.getvalue()


def _export_dynamo(model, inputs, input_names, output_names, opset, dynamic_batch) -> bytes:
    axes = _dynamic_axes(inputs, input_names, output_names, dynamic_batch)
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
    shapes = None if axes is None else [{axis: dims[label] for axis, label in axes[name].items()}
                                        for name in input_names]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, inputs, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=shapes, opset_version=max(opset, _DYNAMO_MIN_OPSET), verbose=False,
        )
    return program.model_proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> bytes:
    """Export ``model`` (in eval mode; its mode is restored) to an fp32 ONNX graph.

    Args:
        model: the model; it must return a tensor or a tuple of tensors.
        example_inputs: a tensor (or tuple of tensors) with a leading batch dimension.
        path: if given, the graph is also written there atomically (``.onnx``).
        opset: ONNX opset (default ``DEFAULT_OPSET``); an integer in [13, 21].
        dynamic_batch: make the batch axis of every input and output dynamic, and axis 1 of integer inputs with
            two or more dims (token ids, attention masks: any sequence length).

    Returns:
        The serialised ONNX model.

    Raises:
        DataError: ``example_inputs`` is not a tensor or tuple of tensors.
        ModelError: the model fails on ``example_inputs`` or does not return tensors, or both exporters
            fail (their messages are kept).
        TorchSlimError: a bad opset, or the file cannot be written.
    """
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= 21:
        raise TorchSlimError(f"opset = {opset!r} is invalid: expected an integer in [13, 21]")
    device = device_of(model)
    inputs = tuple(item.detach().to(device) for item in _as_tuple(example_inputs))
    errors = []
    with eval_mode(model):
        input_names = io_names(len(inputs), "input")
        output_names = io_names(_count_outputs(model, inputs), "output")
        for exporter in (_export_torchscript, _export_dynamo):
            try:
                data = exporter(model, inputs, input_names, output_names, opset, dynamic_batch)
                break
            except Exception as exc:  # exporters raise many types; both messages are reported below
                errors.append(f"{exporter.__name__.removeprefix('_export_')}: {first_line(exc)}")
        else:
            raise ModelError(f"cannot export {type(model).__name__} to ONNX: " + "; ".join(errors))
    if path is not None:
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise TorchSlimError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    return data


def feed_array(tensor: Tensor) -> np.ndarray:
    """A CPU array for ONNX Runtime: floating tensors as float32, integer ones (token ids, masks) as they are."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return np.ascontiguousarray(tensor.numpy())


def run_onnx(session: Any, inputs: Tensor | Sequence[Tensor], batch_size: int = 256) -> list[np.ndarray]:
    """Run an ORT session on tensors in chunks of ``batch_size``; returns each output, concatenated."""
    tensors = _as_tuple(inputs)
    names = [item.name for item in session.get_inputs()]
    if len(names) != len(tensors):
        raise DataError(
            f"the ONNX graph takes {len(names)} input(s) ({', '.join(names)}), got {len(tensors)}"
        )
    chunks: list[list[np.ndarray]] = []
    total = tensors[0].shape[0]
    for start in range(0, total, batch_size):
        feed = {
            name: feed_array(item[start : start + batch_size]) for name, item in zip(names, tensors, strict=True)
        }
        chunks.append(session.run(None, feed))
    return [np.concatenate([chunk[index] for chunk in chunks]) for index in range(len(chunks[0]))]


def check_parity(
    model: nn.Module,
    onnx_bytes: bytes,
    inputs: Tensor | Sequence[Tensor],
    *,
    atol: float | None,
    min_agreement: float = 0.99,
    rtol: float = 0.0,
    min_cosine: float | None = None,
) -> dict[str, float]:
    """Compare ``model`` (PyTorch, eval mode) with the ONNX graph run by ONNX Runtime on ``inputs``.

    Args:
        model: the reference PyTorch model (first output compared when it returns several).
        onnx_bytes: the serialised graph.
        inputs: a batch (tensor or tuple of tensors) of at least one sample.
        atol: largest allowed absolute difference of any output element; None skips this check.
        min_agreement: smallest allowed fraction of samples whose top-1 class (argmax over the last
            dimension) is the same; only checked for outputs with more than one column.
        rtol: added to ``atol`` times the largest absolute model output (a tolerance relative to the
            output's scale); ignored when ``atol`` is None.
        min_cosine: smallest allowed cosine similarity of the flattened outputs; None skips it.

    Returns:
        ``{"max_abs_error": float, "top1_agreement": float, "cosine": float, "samples": int}``.

    Raises:
        DataError: no samples.
        TorchSlimError: the outputs differ beyond ``atol`` or agree less than ``min_agreement``; the
            message gives both numbers and the limits.
    """
    tensors = _as_tuple(inputs)
    samples = int(tensors[0].shape[0]) if tensors[0].dim() else 0
    if samples == 0:
        raise DataError("check_parity: inputs hold no samples: expected a batch of at least one")
    session = ort_session(onnx_bytes, 1 if samples <= 8 else None)
    got = torch.from_numpy(run_onnx(session, tensors)[0])
    device = device_of(model)
    with eval_mode(model), torch.no_grad():
        expected = model(*(item.to(device) for item in tensors))
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    return compare_outputs(expected, got, atol=atol, rtol=rtol, min_agreement=min_agreement, min_cosine=min_cosine)


def compare_outputs(
    expected: Tensor,
    got: Tensor,
    *,
    atol: float | None,
    min_agreement: float = 0.99,
    rtol: float = 0.0,
    min_cosine: float | None = None,
) -> dict[str, float]:
    """Compare a runtime's outputs with the PyTorch model's (the check behind :func:`check_parity` and ``deploy``).

    Args:
        expected: the model's outputs ``(samples, ...)``; got: the runtime's, same shape.
        atol, rtol, min_agreement, min_cosine: as in :func:`check_parity`.

    Returns:
        ``{"max_abs_error", "top1_agreement", "cosine", "samples"}``.

    Raises:
        TorchSlimError: shapes differ, or a limit is not met (the message gives the numbers and the limits).
    """
    expected = expected.detach().to("cpu", torch.float32)
    got = got.detach().to("cpu", torch.float32)
    samples = int(expected.shape[0]) if expected.dim() else 1
    if tuple(got.shape) != tuple(expected.shape):
        raise TorchSlimError(
            f"parity check failed: the runtime returns shape {tuple(got.shape)}, the model "
            f"{tuple(expected.shape)}"
        )
    diff = (got - expected).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not math.isfinite(max_abs) or bool(torch.isnan(diff).any()):
        max_abs = math.inf
    agreement = 1.0
    if expected.dim() >= 2 and expected.shape[-1] > 1:
        agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    # eps far below the default 1e-8: outputs of ~1e-20 (deep random-weight nets) must not read as cosine 0
    cosine = float(torch.nn.functional.cosine_similarity(
        got.reshape(1, -1).double(), expected.reshape(1, -1).double(), eps=1e-300))
    if not math.isfinite(cosine):
        cosine = -1.0
    result = {"max_abs_error": max_abs, "top1_agreement": agreement, "cosine": cosine, "samples": samples}
    limit = None if atol is None else atol + rtol * (float(expected.abs().max()) if expected.numel() else 0.0)
    if (
        (limit is not None and not max_abs <= limit)
        or agreement < min_agreement
        or (min_cosine is not None and not cosine >= min_cosine)
    ):
        raise TorchSlimError(
            f"parity check failed on {samples} sample(s): max_abs_error = {max_abs:.6g} (allowed <= "
            f"{'any' if limit is None else f'{limit:.6g}'}), top1_agreement = {agreement:.4f} (allowed >= "
            f"{min_agreement:.4f}), cosine = {cosine:.6f} (allowed >= "
            f"{'any' if min_cosine is None else f'{min_cosine:.6f}'})"
        )
    return result
