"""GPTQ v1 packing: round trips and the exact bit layout AutoGPTQ uses."""
from __future__ import annotations

import pytest
import torch

from services.quantizer.packing import (PackingError, pack_qweight, pack_qzeros, unpack_qweight,
                                        unpack_qzeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (96, 64), dtype=torch.int32)  # [out, in]
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * bits // 32, 96)
    assert torch.equal(unpack_qweight(qweight, bits), codes)
    zeros = torch.randint(0, 2 ** bits, (2, 96), dtype=torch.int32)  # [groups, out]
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (2, 96 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits), zeros)


def test_4bit_layout_is_gptq_v1():
    codes = torch.randint(0, 16, (3, 16), dtype=torch.int32)
    qweight = pack_qweight(codes, 4)
    for row in range(2):
        for out in range(3):
            expect = sum(int(codes[out, row * 8 + j]) << (4 * j) for j in range(8))
            assert qweight[row, out].item() & 0xFFFFFFFF == expect
    # v1 stores zero - 1: a symmetric 4-bit zero of 8 is stored as 7 in every nibble.
    qzeros = pack_qzeros(torch.full((1, 8), 8, dtype=torch.int32), 4)
    assert qzeros[0, 0].item() & 0xFFFFFFFF == 0x77777777


def test_3bit_layout_matches_autogptq_word_pattern():
    codes = torch.randint(0, 8, (1, 32), dtype=torch.int32)
    words = [w & 0xFFFFFFFF for w in pack_qweight(codes, 3)[:, 0].tolist()]
    c = codes[0].tolist()
    # AutoGPTQ: 10 codes, 2 low bits of code 10 | its high bit, 10 codes, low bit of 21 | 2 bits, 10 codes.
    w0 = sum(c[j] << (3 * j) for j in range(10)) | ((c[10] << 30) & 0xFFFFFFFF)
    w1 = ((c[10] >> 2) & 1) | sum(c[11 + j] << (3 * j + 1) for j in range(10)) | ((c[21] << 31) & 0xFFFFFFFF)
    w2 = ((c[21] >> 1) & 3) | sum(c[22 + j] << (3 * j + 2) for j in range(10))
    assert words == [w0, w1, w2]


def test_zero_zero_wraps_and_round_trips():
    zeros = torch.zeros(1, 8, dtype=torch.int32)
    assert torch.equal(unpack_qzeros(pack_qzeros(zeros, 4), 4), zeros)


@pytest.mark.parametrize("bits,n", [(3, 48), (4, 12), (8, 6)])
def test_bad_lengths_rejected(bits, n):
    with pytest.raises(PackingError):
        pack_qweight(torch.zeros(4, n, dtype=torch.int32), bits)


def test_codes_out_of_range_rejected():
    with pytest.raises(PackingError):
        pack_qweight(torch.full((4, 8), 16, dtype=torch.int32), 4)
