"""Lossless tensor encodings for ``.slim`` files: dense, bitmask + values, indices + values (COO), deflate.

Every model tensor is stored as one or more safetensors arrays ("parts"). ``encode_tensor`` picks
the encoding with the fewest bytes; ``decode_tensor`` restores the tensor bit for bit. An element is
"present" when its bit pattern is non-zero, so ``-0.0`` and NaN payloads survive exactly; a pruned
weight therefore compresses only where it holds ``+0.0`` (zero weights with ``masked_fill``/
``torch.where``, not by multiplying negative weights by 0, which gives ``-0.0``).

Byte tensors (the packed codes of k-bit layers, int8 weights) may also be stored ``deflate``-compressed
(zlib): a pruned layer quantized to 2-4 bits packs several codes per byte, so whole zero bytes are rarer than zero
weights and the bitmask saves little, while an entropy coder still finds the zeros (Deep Compression's Huffman
stage plays this part).

New encodings register in :data:`ENCODINGS`; the manifest names the encoding per tensor.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from torchslim.errors import ArtifactError

# element size in bytes -> integer dtype used to look at the raw bits
_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT32_MAX = 2**31 - 1


@dataclass
class TensorInfo:
    """A flattened tensor with its presence mask, computed once per tensor."""

    flat: torch.Tensor
    shape: tuple[int, ...]
    mask: torch.Tensor | None  # raw bits != 0 (None: the dtype has no same-size integer view)
    nnz: int
    deflated: bytes | None = None  # zlib of the raw bytes, computed once for cost and encode (byte tensors)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def itemsize(self) -> int:
        return self.flat.element_size()


@dataclass(frozen=True)
class Encoding:
    """One way of storing a tensor.

    Attributes:
        name: recorded in the manifest (``"dense"``, ``"bitmask"``, ``"coo"``).
        parts: suffixes of the stored arrays; the stored key is ``name`` for ``""``, else
            ``f"{tensor_name}.{suffix}"``.
        cost: bytes this encoding needs for a tensor, or None if it cannot store it.
        encode: suffix -> array to store.
        decode: ``(parts, dtype, shape, where) -> tensor``; raises ArtifactError starting with ``where``
            (e.g. ``"model.slim: tensor 'fc1.weight'"``).
    """

    name: str
    parts: tuple[str, ...]
    cost: Callable[[TensorInfo], int | None]
    encode: Callable[[TensorInfo], dict[str, torch.Tensor]]
    decode: Callable[[dict[str, torch.Tensor], torch.dtype, tuple[int, ...], str], torch.Tensor]


def _expect(
    part: torch.Tensor, where: str, what: str, dtype: torch.dtype | tuple, shape: tuple[int, ...]
) -> None:
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if part.dtype not in dtypes or tuple(part.shape) != shape:
        wanted = " or ".join(dtype_name(d) for d in dtypes)
        raise ArtifactError(
            f"{where}: stored {what} has dtype {dtype_name(part.dtype)} and shape "
            f"{list(part.shape)}, expected {wanted} and {list(shape)}"
        )


# --- dense ------------------------------------------------------------------------------------
def _dense_decode(parts, dtype, shape, where):
    tensor = parts[""]
    _expect(tensor, where, "array", dtype, shape)
    return tensor


DENSE = Encoding(
    name="dense",
    parts=("",),
    cost=lambda info: info.numel * info.itemsize,
    encode=lambda info: {"": info.flat.reshape(info.shape)},
    decode=_dense_decode,
)


# --- bitmask: packed presence bits + present values ---------------------------------------------
def _bitmask_cost(info: TensorInfo) -> int | None:
    if info.mask is None:
        return None
    return info.nnz * info.itemsize + math.ceil(info.numel / 8)


def _bitmask_encode(info: TensorInfo) -> dict[str, torch.Tensor]:
    packed = np.packbits(info.mask.numpy())
    return {"values": info.flat[info.mask], "mask": torch.from_numpy(packed)}


def _bitmask_decode(parts, dtype, shape, where):
    numel = math.prod(shape)
    mask, values = parts["mask"], parts["values"]
    _expect(mask, where, "mask", torch.uint8, (math.ceil(numel / 8),))
    present = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).astype(bool))
    count = int(present.sum())
    _expect(values, where, "values", dtype, (count,))
    return _scatter(present, values, dtype, numel, where).reshape(shape)


BITMASK = Encoding("bitmask", ("values", "mask"), _bitmask_cost, _bitmask_encode, _bitmask_decode)


# --- coo: flat indices + values -----------------------------------------------------------------
def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_MAX else torch.int64


def _coo_cost(info: TensorInfo) -> int | None:
    if info.mask is None:
        return None
    index_bytes = 4 if _index_dtype(info.numel) == torch.int32 else 8
    return info.nnz * (info.itemsize + index_bytes)


def _coo_encode(info: TensorInfo) -> dict[str, torch.Tensor]:
    indices = torch.nonzero(info.mask).reshape(-1).to(_index_dtype(info.numel))
    return {"indices": indices, "values": info.flat[info.mask]}


def _coo_decode(parts, dtype, shape, where):
    numel = math.prod(shape)
    indices, values = parts["indices"], parts["values"]
    if indices.dim() != 1:
        raise ArtifactError(f"{where}: stored indices have shape {list(indices.shape)}, expected 1-D")
    _expect(indices, where, "indices", (torch.int32, torch.int64), (indices.numel(),))
    _expect(values, where, "values", dtype, (indices.numel(),))
    flat_index = indices.to(torch.int64)
    if flat_index.numel():
        if int(flat_index.min()) < 0 or int(flat_index.max()) >= numel:
            raise ArtifactError(f"{where}: stored indices fall outside [0, {numel}) (corrupted file)")
        if flat_index.numel() > 1 and not bool((flat_index[1:] > flat_index[:-1]).all()):
            raise ArtifactError(f"{where}: stored indices are not strictly increasing (corrupted file)")
    present = torch.zeros(numel, dtype=torch.bool)
    present[flat_index] = True
    return _scatter(present, values, dtype, numel, where).reshape(shape)


COO = Encoding("coo", ("indices", "values"), _coo_cost, _coo_encode, _coo_decode)


# --- deflate: zlib-compressed raw bytes (byte tensors only) -------------------------------------
_DEFLATE_MIN_BYTES = 64  # below this the zlib header and checksum outweigh any saving


def _deflated(info: TensorInfo) -> bytes | None:
    if info.itemsize != 1 or info.numel < _DEFLATE_MIN_BYTES:
        return None
    if info.deflated is None:
        info.deflated = zlib.compress(info.flat.view(torch.uint8).numpy(), 9)  # the buffer itself: no copy
    return info.deflated


def _deflate_cost(info: TensorInfo) -> int | None:
    data = _deflated(info)
    return None if data is None else len(data)


def _deflate_encode(info: TensorInfo) -> dict[str, torch.Tensor]:
    data = _deflated(info)
    return {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def _deflate_decode(parts, dtype, shape, where):
    numel = math.prod(shape)
    data = parts["data"]
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ArtifactError(f"{where}: stored data has dtype {dtype_name(data.dtype)} and shape {list(data.shape)}, "
                            "expected uint8 and 1-D")
    if torch.empty(0, dtype=dtype).element_size() != 1:
        raise ArtifactError(f"{where}: deflate stores 1-byte dtypes only, not {dtype_name(dtype)} (corrupted file)")
    inflater = zlib.decompressobj()
    try:
        # at most the expected size plus one byte: a stream that inflates further is refused, not expanded
        raw = inflater.decompress(data.numpy().tobytes(), numel + 1)
    except zlib.error as exc:
        raise ArtifactError(f"{where}: deflate data does not decompress ({exc}; corrupted file)") from exc
    if len(raw) > numel:
        problem = f"inflates past the {numel} bytes expected"
    elif not inflater.eof:
        problem = "stream is truncated"
    elif len(raw) != numel:
        problem = f"holds {len(raw)} bytes, expected {numel}"
    elif inflater.unused_data:
        problem = "has bytes after its end"
    else:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    raise ArtifactError(f"{where}: deflate data {problem} (corrupted file)")


DEFLATE = Encoding("deflate", ("data",), _deflate_cost, _deflate_encode, _deflate_decode)


def _scatter(
    present: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, numel: int, where: str
) -> torch.Tensor:
    """Place ``values`` at ``present`` positions of an all-zero-bits tensor, working on raw bits."""
    probe = torch.empty(0, dtype=dtype)
    bits_dtype = _BITS_DTYPES.get(probe.element_size())
    if bits_dtype is None:
        raise ArtifactError(f"{where}: dtype {dtype_name(dtype)} cannot be stored sparsely (corrupted file)")
    out = torch.zeros(numel, dtype=bits_dtype)
    out[present] = values.contiguous().view(bits_dtype)
    return out.view(dtype)


# name -> encoding; encode_tensor tries them in this order and keeps the first cheapest one
ENCODINGS: dict[str, Encoding] = {e.name: e for e in (DENSE, BITMASK, COO, DEFLATE)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the manifest spelling)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object, where: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`.

    Raises:
        ArtifactError: if ``name`` is not a torch dtype name.
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{where}: dtype {name!r} is not a torch dtype (e.g. 'float32', 'uint8')")
    return dtype


def stored_key(name: str, suffix: str) -> str:
    """Key of one stored array of tensor ``name``."""
    return name if suffix == "" else f"{name}.{suffix}"


def tensor_info(tensor: torch.Tensor) -> TensorInfo:
    """Flatten ``tensor`` (detached, on CPU) and compute its presence mask."""
    shape = tuple(tensor.shape)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    bits_dtype = _BITS_DTYPES.get(flat.element_size())
    if bits_dtype is None or flat.numel() == 0:
        return TensorInfo(flat, shape, None, 0)
    mask = flat.view(bits_dtype) != 0
    return TensorInfo(flat, shape, mask, int(torch.count_nonzero(mask)))  # sum() would make an int64 copy


def choose_encoding(info: TensorInfo) -> list[Encoding]:
    """Encodings able to store ``info``, cheapest first (ties keep registry order)."""
    costed = [
        (cost, index, enc)
        for index, enc in enumerate(ENCODINGS.values())
        if (cost := enc.cost(info)) is not None
    ]
    return [enc for _, _, enc in sorted(costed, key=lambda item: (item[0], item[1]))]


def encode_tensor(encoding: Encoding, info: TensorInfo) -> dict[str, torch.Tensor]:
    """Encode with ``encoding``; returns suffix -> contiguous CPU array."""
    return {suffix: part.contiguous() for suffix, part in encoding.encode(info).items()}


def decode_tensor(
    encoding_name: object,
    parts: dict[str, torch.Tensor],
    dtype: torch.dtype,
    shape: tuple[int, ...],
    where: str,
) -> torch.Tensor:
    """Decode one tensor; ``parts`` maps suffix -> stored array.

    Raises:
        ArtifactError: unknown encoding, or a stored array of the wrong dtype/shape/content.
    """
    encoding = ENCODINGS.get(encoding_name) if isinstance(encoding_name, str) else None
    if encoding is None:
        raise ArtifactError(
            f"{where}: encoding {encoding_name!r} is unknown: expected one of "
            f"{', '.join(ENCODINGS)} "
            "(a newer torchslim may have written this file; upgrade torchslim)"
        )
    return encoding.decode(parts, dtype, shape, where)


def parts_digest(parts: Iterable[torch.Tensor]) -> str:
    """SHA-256 (hex) of the raw bytes of ``parts``, in order: the checksum a manifest records per tensor.

    The bytes are those safetensors stores (C order, little-endian), read without copying.
    """
    digest = hashlib.sha256()
    for part in parts:
        flat = part.detach().contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
