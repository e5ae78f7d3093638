import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.pack import from_int32_words, pack, packed_bytes, to_int32_words, unpack


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 8), n=st.integers(1, 200), rows=st.integers(1, 4), seed=st.integers(0, 999)
)
def test_round_trip(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (rows, packed_bytes(n, bits))
    assert torch.equal(unpack(p, bits, n).long(), codes)


def test_nibble_and_word_order():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    p = pack(codes, 4)
    assert p.tolist() == [[0x21, 0x43, 0x65, 0x87]]
    word = to_int32_words(p)
    assert word.item() & 0xFFFFFFFF == 0x87654321  # first code in the lowest bits
    assert torch.equal(from_int32_words(word), p)


def test_three_bit_stream():
    # 8 codes of 3 bits = 24 bits = 3 bytes, code i at bits [3i, 3i+3)
    codes = torch.tensor([[7, 0, 7, 0, 7, 0, 7, 0]])
    bits = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert pack(codes, 3).tolist() == [[bits & 255, (bits >> 8) & 255, bits >> 16]]


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack(torch.tensor([[1]]), 9)
