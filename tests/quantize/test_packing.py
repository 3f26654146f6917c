import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.errors import ConfigError
from torchslim.quantize.packing import pack, packed_size, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), length=st.integers(0, 77), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_any_bits_and_odd_lengths(bits, length, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (length,), generator=generator, dtype=torch.int32)
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(length, bits) == (length * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, length), values.to(torch.uint8))


def test_four_bit_layout_is_two_per_byte_low_nibble_first():
    packed = pack(torch.tensor([1, 2, 15, 0, 7]), 4)
    assert packed.tolist() == [0x21, 0x0F, 0x07]


def test_two_bit_layout_is_four_per_byte():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def test_values_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match=r"do not fit in 3 bits: expected \[0, 7\]"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ConfigError, match=r"bits = 9 is invalid"):
        pack(torch.tensor([0]), 9)
    with pytest.raises(ConfigError, match="expected at least 3 uint8 bytes"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 7)
