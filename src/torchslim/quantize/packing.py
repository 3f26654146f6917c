"""Pack k-bit unsigned integers into bytes and back (k = 1..8), as a little-endian bit stream.

Element i occupies bits ``[i*k, (i+1)*k)`` of the stream, least significant bit first, so 4-bit
values are two per byte (element 0 in the low nibble) and 2-bit values four per byte. Works on any
device (pure tensor ops), so packed weights can move to a GPU and be unpacked there.
"""

from __future__ import annotations

import torch

from torchslim.errors import ConfigError

_PACK_CHUNK = 1 << 20  # values per step of pack (a multiple of 8)


def packed_size(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` values of ``bits`` bits occupy when packed."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ConfigError(f"bits = {bits!r} is invalid: expected an integer in [1, 8]")


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers below ``2**bits`` into a flat uint8 tensor.

    Args:
        values: integer tensor of any shape with entries in ``[0, 2**bits)``; it is flattened.
        bits: bits per value, 1..8.

    Returns:
        A 1-D uint8 tensor of ``packed_size(values.numel(), bits)`` bytes.

    Raises:
        ConfigError: if ``bits`` is outside 1..8 or a value does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        low, high = int(flat.min()), int(flat.max())
        raise ConfigError(f"values in [{low}, {high}] do not fit in {bits} bits: expected [0, {(1 << bits) - 1}]")
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, no bit stream needed (as unpack)
        per = 8 // bits
        codes = flat.to(torch.uint8)
        if codes.numel() % per:
            codes = torch.cat([codes, codes.new_zeros(per - codes.numel() % per)])
        codes = codes.reshape(-1, per)
        out = codes[:, 0].clone()
        for j in range(1, per):
            out |= codes[:, j] << (bits * j)
        return out
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    weights = 1 << torch.arange(8, device=flat.device, dtype=torch.int32)
    out = torch.empty(packed_size(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    # in chunks of whole bytes (a multiple of 8 values): the bit stream is 4 * bits bytes per value, which for an
    # lm_head of 28M weights would be gigabytes at once
    for start in range(0, flat.numel(), _PACK_CHUNK):
        stream = ((flat[start : start + _PACK_CHUNK].to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(-1)
        padding = (-stream.numel()) % 8
        if padding:
            stream = torch.cat([stream, stream.new_zeros(padding)])
        first = start * bits // 8
        out[first : first + stream.numel() // 8] = (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: return ``numel`` values as a 1-D uint8 tensor.

    Args:
        packed: uint8 tensor made by :func:`pack`.
        bits: bits per value used when packing.
        numel: how many values to read back.

    Returns:
        A 1-D uint8 tensor of length ``numel``.

    Raises:
        ConfigError: if ``bits`` is invalid or ``packed`` is too short for ``numel`` values.
    """
    _check_bits(bits)
    need = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() < need:
        raise ConfigError(
            f"packed data holds {packed.numel()} {packed.dtype} elements: expected at least {need} uint8 bytes "
            f"for {numel} values of {bits} bits"
        )
    data = packed.reshape(-1)[:need]
    if bits == 8:
        return data.clone()
    if 8 % bits == 0:  # fast path (1, 2, 4 bits): whole values per byte, no bit stream needed
        mask = (1 << bits) - 1
        parts = [(data >> (bits * i)) & mask for i in range(8 // bits)]
        return torch.stack(parts, dim=1).reshape(-1)[:numel]
    shifts = torch.arange(8, device=data.device, dtype=torch.int32)
    stream = ((data.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 1 << torch.arange(bits, device=data.device, dtype=torch.int32)
    return (stream.reshape(numel, bits) * weights).sum(dim=1).to(torch.uint8)
