"""GPTQ v1 bit packing: codes as a little-endian bitstream in int32 words.

AutoGPTQ packs 4/8-bit codes 32/bits per word and 3-bit codes 32 per three words with
codes straddling word boundaries; both are the same rule — code k of a run occupies bits
[k·bits, (k+1)·bits) of the run's bitstream — which is what this file implements, for
2, 3, 4 and 8 bits. qweight packs along the input dim, qzeros along the output dim.
"""
from __future__ import annotations

import numpy as np
import torch


class PackingError(ValueError):
    """A tensor whose length along the packed dim cannot be packed at this width."""


def _values_per_run(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run that fills whole int32 words."""
    if bits == 3:
        return 32, 3
    if 32 % bits:
        raise PackingError(f"cannot pack {bits}-bit codes")
    return 32 // bits, 1


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int codes [n, m] along dim 0 into int32 [n·bits/32, m]."""
    per_run, words = _values_per_run(bits)
    n, m = codes.shape
    if n % per_run:
        raise PackingError(f"{bits}-bit packing needs a multiple of {per_run} along the packed dim, got {n}")
    c = codes.cpu().numpy().astype(np.uint64)
    if c.size and (c.max() >= 2 ** bits):
        raise PackingError(f"codes exceed {bits} bits")
    c = c.reshape(n // per_run, per_run, m)
    # Build each run as one integer of per_run·bits ≤ 96 bits, split into uint32 words.
    out = np.zeros((n // per_run, words, m), dtype=np.uint64)
    for k in range(per_run):
        bit = k * bits
        word, shift = divmod(bit, 32)
        out[:, word, :] |= (c[:, k, :] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        spill = shift + bits - 32
        if spill > 0:
            out[:, word + 1, :] |= c[:, k, :] >> np.uint64(bits - spill)
    packed = out.reshape(n // per_run * words, m).astype(np.uint32).view(np.int32)
    return torch.from_numpy(packed.copy())


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n·bits/32, m] → int32 codes [n, m]."""
    per_run, words = _values_per_run(bits)
    p = packed.cpu().numpy().view(np.uint32).astype(np.uint64)
    runs = p.shape[0] // words
    p = p.reshape(runs, words, p.shape[1])
    mask = np.uint64(2 ** bits - 1)
    out = np.zeros((runs, per_run, p.shape[2]), dtype=np.uint64)
    for k in range(per_run):
        word, shift = divmod(k * bits, 32)
        val = p[:, word, :] >> np.uint64(shift)
        spill = shift + bits - 32
        if spill > 0:
            val |= p[:, word + 1, :] << np.uint64(bits - spill)
        out[:, k, :] = val & mask
    codes = torch.from_numpy(out.reshape(runs * per_run, -1).astype(np.int32))
    return codes if n is None else codes[:n]


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] → GPTQ qweight int32 [in·bits/32, out]."""
    return pack_rows(codes.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight → codes [out, in]."""
    return unpack_rows(qweight, bits).T.contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros [groups, out] → GPTQ v1 qzeros int32 [groups, out·bits/32], storing zero − 1.

    v1 stores zero − 1 (the historical AutoGPTQ off-by-one); an asymmetric zero of 0 wraps to
    2^bits − 1, and unpack_qzeros undoes that modulo 2^bits.
    """
    stored = (zeros.to(torch.int64) - 1) % (2 ** bits)
    return pack_rows(stored.T.contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 qzeros → zeros [groups, out]."""
    stored = unpack_rows(qzeros.T.contiguous(), bits).T
    return ((stored.to(torch.int64) + 1) % (2 ** bits)).to(torch.int32).contiguous()
