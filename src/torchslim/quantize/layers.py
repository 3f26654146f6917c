"""Modules that hold compressed weights and rebuild them in ``forward``.

``IntQuantLayer`` stores k-bit codes packed into bytes plus per-(row, group) scales and zero
points; ``CodebookLayer`` stores packed indices into a small learnable codebook (weight sharing);
``HalfLayer`` stores 16-bit floats. Each replaces an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``
and computes the same operation with the rebuilt weight, in the input's dtype. The saved ``.slim``
file holds exactly these buffers, so its bytes show the compression.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.artifact import register_load_hook, register_module_codec
from torchslim.errors import ConfigError
from torchslim.kernels.lowbit import dispatch_reason, lowbit_linear
from torchslim.quantize.affine import compute_qparams, grouped_view, quantize_affine
from torchslim.quantize.packing import pack, packed_size, unpack
from torchslim.quantize.runtime import fast_forward, rebind_, set_runtime_

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ROW_CHUNK = 1 << 20  # weights quantized per step in from_float/from_qparams (bounds the float temporaries)


def describe_layer(module: nn.Module) -> dict[str, Any]:
    """The operation a Linear/Conv performs, as constructor arguments of a replacement layer.

    Args:
        module: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` with ``padding_mode="zeros"``.

    Returns:
        ``{"op", "weight_shape", "bias", "conv"}`` (``conv`` holds stride/padding/dilation/groups).

    Raises:
        ConfigError: for other module types or padding modes (the caller reports it as skipped).
    """
    if isinstance(module, nn.Embedding):
        # a subclass may scale or offset in its forward (BART's scaled embeddings): replacing it would lose that
        if type(module) is not nn.Embedding or module.max_norm is not None:
            raise ConfigError(f"{type(module).__name__} (max_norm={module.max_norm}) is not supported: expected a "
                              "plain nn.Embedding without max_norm")
        return {"op": "embedding", "weight_shape": list(module.weight.shape), "bias": False, "conv": {}}
    if isinstance(module, nn.Linear):
        return {"op": "linear", "weight_shape": list(module.weight.shape), "bias": module.bias is not None, "conv": {}}
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ConfigError(f"padding_mode={module.padding_mode!r}, padding={module.padding!r} is not supported")
        conv = {
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
        }
        op = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        return {"op": op, "weight_shape": list(module.weight.shape), "bias": module.bias is not None, "conv": conv}
    raise ConfigError(f"{type(module).__name__} is not supported: expected Linear, Conv1d or Conv2d")


class _WeightOnlyLayer(nn.Module):
    """Shared plumbing: the op (linear/conv), its bias and its constructor spec."""

    def __init__(self, op: str, weight_shape: list[int], bias: bool, conv: dict[str, Any] | None) -> None:
        super().__init__()
        if op not in ("linear", "conv1d", "conv2d", "embedding"):
            raise ConfigError(f"op = {op!r} is invalid: expected 'linear', 'conv1d', 'conv2d' or 'embedding'")
        self.op = op
        self.weight_shape = [int(d) for d in weight_shape]
        self.conv = dict(conv or {})
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None

    def _layer_spec(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "weight_shape": list(self.weight_shape),
            "bias": self.bias is not None,
            "conv": dict(self.conv),
        }

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply the layer's op with ``weight`` (cast to the input's dtype; an embedding keeps the weight's)."""
        if self.op == "embedding":
            return F.embedding(x, weight)
        weight = weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.op == "linear":
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.op == "conv1d" else F.conv2d
        return conv(x, weight, bias, **self.conv)

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    # The replaced conv's attributes, read by model code around it (HF MobileNetV2 pads TF-style from the conv's
    # stride and kernel_size); a linear op has none.
    def _conv_attr(self, name: str) -> Any:
        if self.op in ("linear", "embedding"):
            raise AttributeError(f"{type(self).__name__} (op linear) has no attribute {name!r}")
        if name in ("stride", "padding", "dilation"):
            return tuple(self.conv[name])
        if name == "groups":
            return int(self.conv["groups"])
        if name == "kernel_size":
            return tuple(self.weight_shape[2:])
        return self.weight_shape[0] if name == "out_channels" else self.weight_shape[1] * int(self.conv["groups"])

    stride = property(lambda self: self._conv_attr("stride"))
    padding = property(lambda self: self._conv_attr("padding"))
    dilation = property(lambda self: self._conv_attr("dilation"))
    groups = property(lambda self: self._conv_attr("groups"))
    kernel_size = property(lambda self: self._conv_attr("kernel_size"))
    in_channels = property(lambda self: self._conv_attr("in_channels"))
    out_channels = property(lambda self: self._conv_attr("out_channels"))
    # an embedding's attributes, read by model code (transformers resizes and inspects its input embeddings)
    num_embeddings = property(lambda self: self.weight_shape[0] if self.op == "embedding" else None)
    embedding_dim = property(lambda self: self.weight_shape[1] if self.op == "embedding" else None)
    padding_idx = None

    # Derived run-time state (fp32 copies, kernel codes; quantize.runtime) is rebuilt after whatever replaces or
    # rewrites the stored tensors: .to()/.half(), load_state_dict, and training (then back to eval).
    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        rebind_(self)
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        rebind_(self)

    def train(self, mode: bool = True):
        if self.training and not mode:
            rebind_(self)
        return super().train(mode)

    def _bias_bits(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size() * 8

    def to_float(self) -> nn.Module:
        """A plain fp32 ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Embedding`` (eval mode) with this ``weight``.

        ``weight`` is what the layer computes with: the decoded weight of a packed layer (so the float layer computes
        the same function), the float weight of a QAT layer (without its fake quantization). Exporters use it so the
        unpacking arithmetic is not traced into a graph.

        Returns:
            The new layer, on this layer's device; this layer is not changed.
        """
        weight = self.weight.detach().to(torch.float32)
        shape = self.weight_shape
        bias = self.bias is not None
        if self.op == "linear":
            module: nn.Module = nn.Linear(shape[1], shape[0], bias=bias)
        elif self.op == "embedding":
            module = nn.Embedding(shape[0], shape[1])
        else:
            conv = nn.Conv1d if self.op == "conv1d" else nn.Conv2d
            groups = self.conv.get("groups", 1)
            module = conv(shape[1] * groups, shape[0], tuple(shape[2:]), bias=bias, **self.conv)
        module = module.to(weight.device)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias:
                module.bias.copy_(self.bias.detach().float())
        return module.eval()

    def extra_repr(self) -> str:
        return f"op={self.op}, weight_shape={tuple(self.weight_shape)}, bias={self.bias is not None}"


class _DequantizingLayer(_WeightOnlyLayer):
    """A layer whose weight is rebuilt by ``dequantize_weight`` on every forward."""

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fast_forward(self, x)  # the path chosen by the runtime policy (None: reference)
        if fast is not None:
            return fast
        return self.run(x, self.dequantize_weight(x.dtype if x.is_floating_point() else torch.float32))

    def _stats(self, stored_bits: int) -> dict[str, int]:
        """``slim_stats`` from the bits this layer stores for its weight (the bias is added here)."""
        bias = 0 if self.bias is None else self.bias.numel()
        nonzero = int(torch.count_nonzero(self.dequantize_weight()))
        nonzero += 0 if self.bias is None else int(torch.count_nonzero(self.bias))
        return {"parameters": self.numel + bias, "nonzero": nonzero, "storage_bits": stored_bits + self._bias_bits()}


class IntQuantLayer(_DequantizingLayer):
    """k-bit affine-quantized weight, packed; dequantized on the fly in ``forward``.

    Buffers: ``packed`` (uint8 bit stream of ``(q - zero_point) mod 2**bits``, padded groups
    included, so zero weights are zero bits), ``scale``
    (``(rows, groups)`` in ``scale_dtype``), ``zero_point`` (packed ``bits``-bit codes; empty when
    symmetric, since the zero point is then fixed at ``2**(bits-1)``).
    """

    def __init__(
        self,
        op: str,
        weight_shape: list[int],
        bias: bool,
        conv: dict[str, Any] | None,
        bits: int,
        granularity: str,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: str = "float16",
    ) -> None:
        super().__init__(op, weight_shape, bias, conv)
        self.bits, self.granularity, self.group_size = bits, granularity, group_size
        self.symmetric, self.scale_dtype = symmetric, scale_dtype
        rows, groups, group_len = self._grouped_shape()
        self.register_buffer("packed", torch.zeros(packed_size(rows * groups * group_len, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=SCALE_DTYPES[scale_dtype]))
        zp_bytes = 0 if symmetric else packed_size(rows * groups, bits)
        self.register_buffer("zero_point", torch.zeros(zp_bytes, dtype=torch.uint8))

    def _grouped_shape(self) -> tuple[int, int, int]:
        fan_in = self.numel // self.weight_shape[0]
        if self.granularity == "tensor":
            return 1, 1, self.numel
        if self.granularity == "channel":
            return self.weight_shape[0], 1, fan_in
        groups = -(-fan_in // self.group_size)
        return self.weight_shape[0], groups, self.group_size

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        bits: int,
        granularity: str,
        group_size: int | None,
        symmetric: bool,
        rounding: str = "nearest",
        scale_dtype: str = "float16",
    ) -> IntQuantLayer:
        """Quantize a Linear/Conv module's weight with min/max scales; the bias stays float32."""
        weight = module.weight.detach().float()
        dtype = SCALE_DTYPES[scale_dtype]
        if granularity == "tensor":
            scale, zero_point = compute_qparams(grouped_view(weight, granularity), bits, symmetric, dtype)
        else:  # rows at a time: no whole padded (or absolute-value) copy of an lm_head-sized weight
            step = max(1, _ROW_CHUNK // max(1, weight[0].numel()))
            parts = [
                compute_qparams(grouped_view(weight[r : r + step], granularity, group_size, pad=True), bits,
                                symmetric, dtype)
                for r in range(0, weight.shape[0], step)
            ]
            scale, zero_point = (torch.cat(p) for p in zip(*parts, strict=True))
            del parts
        return cls.from_qparams(
            module, scale, zero_point, bits, granularity, group_size, symmetric, rounding, scale_dtype
        )

    @classmethod
    def from_qparams(
        cls,
        module: nn.Module,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        granularity: str,
        group_size: int | None,
        symmetric: bool,
        rounding: str = "nearest",
        scale_dtype: str = "float16",
    ) -> IntQuantLayer:
        """Quantize a Linear/Conv module's weight with given scales and zero points.

        Used by :meth:`from_float` (min/max scales) and by QAT's ``convert_`` (learned scales).

        Args:
            module: the float layer (its weight and bias are read).
            scale: ``(rows, groups)`` positive scales.
            zero_point: ``(rows, groups)`` integer zero points in ``[0, 2**bits)`` (ignored when
                ``symmetric``: the zero point is then ``2**(bits-1)``).
            bits, granularity, group_size, symmetric, rounding, scale_dtype: as in ``IntQuant``.

        Returns:
            The packed layer on the module's device.
        """
        layer = cls._blank(module, scale, bits, granularity, group_size, symmetric, scale_dtype)
        weight = module.weight.detach().float()

        def grouped(start: int, stop: int) -> torch.Tensor:  # rows [start, stop) grouped (a padded copy if need be)
            if granularity == "tensor":  # one row: the whole tensor
                return grouped_view(weight, granularity, group_size, pad=True)
            return grouped_view(weight[start:stop], granularity, group_size, pad=True)

        scale, zero_point = layer._checked_qparams(scale, zero_point)
        # Stored relative to the zero point (mod 2**bits): a zero weight is stored as code 0, so
        # pruned weights give zero bytes that the .slim file's sparse encodings compress.
        row = grouped(0, 1)
        rows = 1 if granularity == "tensor" else weight.shape[0]
        stored = torch.empty((rows, *row.shape[1:]), dtype=torch.uint8, device=weight.device)
        # rows at a time: temporaries (and a padded copy, when the group size does not divide a row) stay small
        step = max(1, _ROW_CHUNK // max(1, row[0].numel()))
        zero_bytes, mask = zero_point.to(torch.uint8).unsqueeze(-1), (1 << bits) - 1  # uint8 wrap-around: exact
        for r in range(0, rows, step):
            codes = quantize_affine(grouped(r, r + step), scale[r : r + step], zero_point[r : r + step], bits,
                                    rounding)
            stored[r : r + step] = codes.sub_(zero_bytes[r : r + step]).bitwise_and_(mask)
        return layer._filled(module, stored, scale, zero_point)

    @classmethod
    def from_codes(
        cls,
        module: nn.Module,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        granularity: str,
        group_size: int | None,
        symmetric: bool,
        scale_dtype: str = "float16",
    ) -> IntQuantLayer:
        """A Linear/Conv module's replacement from codes computed elsewhere (GPTQ's), without a float copy.

        Args:
            module: the float layer (its shape and bias are read; its weight is not).
            codes: ``(rows, fan_in)`` integer codes in ``[0, 2**bits)``; the weight they stand for is
                ``(codes - zero_point) * scale`` group by group.
            scale, zero_point: ``(rows, groups)``, as in :meth:`from_qparams`.
            bits, granularity, group_size, symmetric, scale_dtype: as in ``IntQuant`` (``"channel"`` or
                ``"group"``).

        Returns:
            The packed layer on the module's device: the same bytes :meth:`from_qparams` gives for the weight the
            codes stand for.

        Raises:
            ConfigError: ``granularity = "tensor"``, or codes or scales whose shape does not match the module.
        """
        if granularity == "tensor":
            raise ConfigError("granularity = 'tensor' is invalid for from_codes: expected 'channel' or 'group'")
        layer = cls._blank(module, scale, bits, granularity, group_size, symmetric, scale_dtype)
        rows, groups, group_len = layer._grouped_shape()
        fan_in = layer.numel // rows
        if tuple(codes.shape) != (rows, fan_in):
            raise ConfigError(f"codes shape {tuple(codes.shape)} is invalid: expected {(rows, fan_in)}")
        scale, zero_point = layer._checked_qparams(scale, zero_point)
        stored = torch.empty((rows, groups, group_len), dtype=torch.uint8, device=codes.device)
        # (codes - zero point) mod 2**bits in uint8, whose wrap-around (mod 256) keeps it exact: byte-sized
        # temporaries, a few rows at a time
        zero_bytes, mask = zero_point.to(torch.uint8), (1 << bits) - 1
        step = max(1, _ROW_CHUNK // (groups * group_len))
        for r in range(0, rows, step):
            column_zero = zero_bytes[r : r + step].repeat_interleave(group_len, dim=1)[:, :fan_in]
            shifted = (codes[r : r + step].to(torch.uint8) - column_zero).bitwise_and_(mask)
            stored[r : r + step] = grouped_view(shifted, granularity, group_size, pad=True)
        return layer._filled(module, stored, scale, zero_point)

    @classmethod
    def _blank(
        cls, module: nn.Module, scale: torch.Tensor, bits: int, granularity: str, group_size: int | None,
        symmetric: bool, scale_dtype: str,
    ) -> IntQuantLayer:
        """An empty layer shaped for ``module``; raises ConfigError when ``scale`` does not fit it."""
        layer = cls(
            **describe_layer(module),
            bits=bits,
            granularity=granularity,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
        )
        if tuple(scale.shape) != tuple(layer.scale.shape):
            raise ConfigError(f"scale shape {tuple(scale.shape)} is invalid: expected {tuple(layer.scale.shape)}")
        return layer

    def _checked_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales in the storage dtype (positive, finite) and int32 zero points in range (``2**(bits-1)`` when
        symmetric)."""
        scale = _clamp_to_dtype(scale.detach().to(SCALE_DTYPES[self.scale_dtype]))
        if self.symmetric:
            zero_point = torch.full(scale.shape, 1 << (self.bits - 1), dtype=torch.int32)
        zero_point = zero_point.detach().round().clamp(0, (1 << self.bits) - 1).to(torch.int32)
        return scale, zero_point

    def _filled(
        self, module: nn.Module, stored: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> IntQuantLayer:
        """Write the stored codes (relative to the zero point), scales, zero points and the module's bias; returns
        the layer on the module's device."""
        self.packed.copy_(pack(stored, self.bits))
        self.scale.copy_(scale)
        if not self.symmetric:
            self.zero_point.copy_(pack(zero_point, self.bits))
        if getattr(module, "bias", None) is not None:  # an nn.Embedding has none
            self.bias.data.copy_(module.bias.detach().float())
        return self.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "embedding":
            return self.embed(x)
        # CUDA fp16/bf16 inputs of a 4/8-bit linear run the Triton kernel on the packed weights.
        if x.is_cuda and self.op == "linear":
            if dispatch_reason(self, x) is None:
                return lowbit_linear(x, self)
        return super().forward(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows ``ids`` of the weight (an embedding lookup), decoding only those rows.

        Args:
            ids: integer indices of any shape.

        Returns:
            ``(*ids.shape, embedding_dim)`` float32 rows, equal to ``F.embedding(ids, dequantize_weight())``.
        """
        rows, groups, group_len = self._grouped_shape()
        row_bits = groups * group_len * self.bits
        if rows != self.weight_shape[0] or row_bits % 8:  # rows are not whole bytes: decode everything
            return F.embedding(ids, self.dequantize_weight())
        flat = ids.reshape(-1).long()
        row_bytes = row_bits // 8
        stored = unpack(self.packed[: rows * row_bytes].view(rows, row_bytes)[flat].reshape(-1), self.bits,
                        flat.numel() * groups * group_len).reshape(-1, groups, group_len).to(torch.int32)
        levels = 1 << self.bits
        zero_point = self.zero_points()[flat].unsqueeze(-1)
        centred = torch.where(stored >= levels - zero_point, stored - levels, stored).to(torch.float32)
        restored = (centred * self.scale[flat].to(torch.float32).unsqueeze(-1)).reshape(flat.numel(), -1)
        return restored[:, : self.weight_shape[1]].reshape(*ids.shape, self.weight_shape[1])

    def share_codes_(self, other: IntQuantLayer) -> None:
        """Use ``other``'s packed codes, scales and zero points (the same tensors, stored once when saved): an
        embedding and the ``lm_head`` tied to it.

        Raises:
            ConfigError: ``other`` stores a weight of another shape or format.
        """
        if (other.weight_shape, other.spec() | {"op": self.op, "bias": self.bias is not None}) != (
                self.weight_shape, self.spec()):
            raise ConfigError(f"cannot share codes between {self.extra_repr()} and {other.extra_repr()}: the "
                              "weight shapes and formats differ")
        for name in ("packed", "scale", "zero_point"):
            self._buffers[name] = other._buffers[name]
        rebind_(self)

    def codes(self) -> torch.Tensor:
        """The affine codes ``q`` in ``[0, 2**bits)`` shaped ``(rows, groups, group_size)`` (uint8).

        ``packed`` holds ``(q - zero_point) mod 2**bits`` so that zero weights are zero bytes.
        """
        rows, groups, group_len = self._grouped_shape()
        stored = unpack(self.packed, self.bits, rows * groups * group_len).reshape(rows, groups, group_len)
        return ((stored.to(torch.int32) + self.zero_points().unsqueeze(-1)) % (1 << self.bits)).to(torch.uint8)

    def zero_points(self) -> torch.Tensor:
        """Zero points shaped like ``scale`` (int32)."""
        if self.symmetric:
            return torch.full(self.scale.shape, 1 << (self.bits - 1), dtype=torch.int32, device=self.scale.device)
        return unpack(self.zero_point, self.bits, self.scale.numel()).reshape(self.scale.shape).to(torch.int32)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rebuild the float weight ``(q - zero_point) * scale`` in its original shape.

        Each (row, group) has only ``2**bits`` possible values, so they are tabulated once and the
        stored codes index the table (1.7x faster on CPU than decoding every element, same bits).
        """
        rows, groups, group_len = self._grouped_shape()
        stored = unpack(self.packed, self.bits, rows * groups * group_len).reshape(rows, groups, group_len)
        levels = 1 << self.bits
        codes = torch.arange(levels, dtype=torch.int32, device=self.packed.device)
        zero_point = self.zero_points().unsqueeze(-1)
        centred = torch.where(codes >= levels - zero_point, codes - levels, codes).to(torch.float32)
        table = centred * self.scale.to(torch.float32).unsqueeze(-1)  # (rows, groups, 2**bits)
        restored = torch.gather(table, 2, stored.long()).to(dtype)
        fan_in = self.numel // rows
        return restored.reshape(rows, -1)[:, :fan_in].reshape(self.weight_shape)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe), used by the ``.slim`` codec."""
        return {
            **self._layer_spec(),
            "bits": self.bits,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
        }

    def slim_stats(self) -> dict[str, int]:
        """Logical parameter count and the bits actually stored (codes, scales, zero points, bias)."""
        stored = (self.packed.numel() + self.zero_point.numel()) * 8
        return self._stats(stored + self.scale.numel() * self.scale.element_size() * 8)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (
            f"{super().extra_repr()}, bits={self.bits}, granularity={self.granularity}{group}, "
            f"symmetric={self.symmetric}"
        )


class CodebookLayer(_DequantizingLayer):
    """Weight sharing (Deep Compression): packed ``bits``-bit indices into a learnable codebook.

    When the original weight had exact zeros (it was pruned), entry 0 of the codebook is pinned to
    0.0 so the sparsity survives clustering and fine-tuning.
    """

    def __init__(
        self,
        op: str,
        weight_shape: list[int],
        bias: bool,
        conv: dict[str, Any] | None,
        bits: int,
        pinned_zero: bool = False,
    ) -> None:
        super().__init__(op, weight_shape, bias, conv)
        self.bits, self.pinned_zero = bits, pinned_zero
        self.codebook = nn.Parameter(torch.zeros((1 << bits) - int(pinned_zero)))
        self.register_buffer("packed", torch.zeros(packed_size(self.numel, bits), dtype=torch.uint8))

    @classmethod
    def from_float(cls, module: nn.Module, bits: int, iterations: int = 30) -> CodebookLayer:
        """Cluster a Linear/Conv weight with 1-D k-means (linear initialisation, Lloyd iterations)."""
        weight = module.weight.detach().float().reshape(-1)
        pinned = bool((weight == 0).any())
        layer = cls(**describe_layer(module), bits=bits, pinned_zero=pinned)
        values = weight[weight != 0] if pinned else weight
        centroids = kmeans_1d(values, layer.codebook.numel(), iterations)
        indices = nearest_centroid(weight, centroids)
        if pinned:  # nonzero weights keep a nonzero centroid; exact zeros point at the pinned 0.0
            indices = torch.where(weight == 0, torch.zeros_like(indices), indices + 1)
        layer.codebook.data.copy_(centroids)
        layer.packed.copy_(pack(indices, bits))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer.to(module.weight.device)

    def full_codebook(self) -> torch.Tensor:
        """The codebook with the pinned zero entry (if any) in front."""
        if self.pinned_zero:
            return torch.cat([self.codebook.new_zeros(1), self.codebook])
        return self.codebook

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rebuild the weight by codebook lookup; differentiable w.r.t. the codebook."""
        indices = unpack(self.packed, self.bits, self.numel).long()
        return self.full_codebook()[indices].reshape(self.weight_shape).to(dtype)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe), used by the ``.slim`` codec."""
        return {**self._layer_spec(), "bits": self.bits, "pinned_zero": self.pinned_zero}

    def slim_stats(self) -> dict[str, int]:
        """Logical parameter count and the bits stored (indices, codebook, bias)."""
        return self._stats(self.packed.numel() * 8 + self.codebook.numel() * 32)


class HalfLayer(_WeightOnlyLayer):
    """Weight and bias stored in 16 bits (fp16 or bf16); computed in the input's dtype."""

    def __init__(
        self, op: str, weight_shape: list[int], bias: bool, conv: dict[str, Any] | None, dtype: str = "fp16"
    ) -> None:
        super().__init__(op, weight_shape, bias, conv)
        self.dtype_name = dtype
        half = HALF_DTYPES[dtype]
        self.weight = nn.Parameter(torch.zeros(self.weight_shape, dtype=half))
        if self.bias is not None:
            self.bias = nn.Parameter(torch.zeros(self.weight_shape[0], dtype=half))

    @classmethod
    def from_float(cls, module: nn.Module, dtype: str = "fp16") -> HalfLayer:
        """Round a Linear/Conv module's weight and bias to 16 bits."""
        layer = cls(**describe_layer(module), dtype=dtype)
        layer.weight.data.copy_(module.weight.detach())
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fast_forward(self, x)
        return fast if fast is not None else self.run(x, self.weight)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-safe), used by the ``.slim`` codec."""
        return {**self._layer_spec(), "dtype": self.dtype_name}


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """1-D k-means with linear initialisation over ``[min, max]`` (Han et al. 2016's best init).

    Args:
        values: the numbers to cluster (any shape; flattened).
        k: number of centroids.
        iterations: Lloyd iterations (stops early when assignments no longer change).

    Returns:
        ``k`` sorted centroids (float32). Empty clusters keep their previous centroid.
    """
    data = values.reshape(-1).float()
    if data.numel() == 0:
        return torch.zeros(k)
    centroids = torch.linspace(float(data.min()), float(data.max()), k)
    previous = None
    for _ in range(iterations):
        assignment = nearest_centroid(data, centroids)
        if previous is not None and torch.equal(assignment, previous):
            break
        sums = torch.zeros(k).index_add_(0, assignment, data)
        counts = torch.zeros(k).index_add_(0, assignment, torch.ones_like(data))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids, _ = torch.sort(centroids)
        previous = assignment
    return centroids


def nearest_centroid(values: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ``sorted_centroids`` for each value (ties go to the lower one)."""
    midpoints = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.bucketize(values.reshape(-1).float(), midpoints.float())


def _clamp_to_dtype(scale: torch.Tensor) -> torch.Tensor:
    """Keep scales positive and finite in their storage dtype (fp16 underflows below ~6e-8)."""
    info = torch.finfo(scale.dtype)
    return scale.float().clamp(min=info.tiny, max=info.max).to(scale.dtype)


def _register_codecs() -> None:
    register_load_hook(set_runtime_)
    for cls in (IntQuantLayer, CodebookLayer, HalfLayer):
        register_module_codec(cls, f"{__name__}:{cls.__name__}", lambda m: m.spec(), lambda spec, c=cls: c(**spec))


_register_codecs()
