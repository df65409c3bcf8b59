"""MSE clipping search: never worse than min/max per row, batch-independent, exact checkpoints."""
from __future__ import annotations

import pytest
import torch

from services.quantizer import grid
from services.quantizer.checkpoint import dequantize, packed_tensors
from services.quantizer.config import QuantConfig, QuantConfigError
from services.quantizer.gptq import gptq_quantize, gptq_quantize_many
from services.quantizer.grid import clip_error, grid_params, group_params, mse_grid_params
from services.quantizer.rtn import rtn_quantize

NORM = 2.4


def _weights(kind: str, rows: int = 40, cols: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    if kind == "outliers":  # heavy tails: where clipping the range pays off
        w = torch.distributions.StudentT(2.0).sample((rows, cols)) * 0.02
        w[3, 7] = 1.5
    elif kind == "special-rows":
        w[0] = 0.0                        # all-zero row: the [-1, 1] fallback
        w[1] = 0.25                       # constant positive row
        w[2] = torch.rand(cols, generator=g) * 1e-7  # range that underflows an fp16 scale
        w[4] = -w[4].abs()                # all-negative row
    return w


def _row_errors(w: torch.Tensor, dequant: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups, rows] Σ|dequant − w|^NORM per row of each group (natural column order)."""
    gsize = w.shape[1] if group_size == -1 else group_size
    return torch.stack([((dequant[:, s:s + gsize] - w[:, s:s + gsize]).abs() ** NORM).sum(dim=1)
                        for s in range(0, w.shape[1], gsize)])


CASES = [(bits, sym, group_size, kind)
         for bits in (2, 3, 4, 8) for sym in (False, True)
         for group_size, kind in ((128, "gauss"), (32, "outliers"), (-1, "special-rows"), (128, "outliers"))]


@pytest.mark.parametrize("bits,sym,group_size,kind", CASES)
def test_rtn_mse_never_worse_than_min_max_per_row(bits, sym, group_size, kind):
    w = _weights(kind, seed=bits)
    base = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    plain = rtn_quantize(w, base)
    mse = rtn_quantize(w, QuantConfig(bits=bits, group_size=group_size, sym=sym, mse=True, mse_norm=NORM))
    err_plain, err_mse = _row_errors(w, plain.dequant, group_size), _row_errors(w, mse.dequant, group_size)
    assert torch.all(err_mse <= err_plain)
    if kind == "outliers" and bits <= 4:
        assert (err_mse < err_plain).float().mean() > 0.5  # the search does shrink most ranges


@pytest.mark.parametrize("bits,sym", [(3, False), (4, True), (4, False)])
def test_search_error_is_the_checkpoints_error_and_at_most_min_max(bits, sym):
    w = _weights("outliers", rows=24, cols=64, seed=5).view(2, 12, 64)  # a batch of groups
    maxq = 2 ** bits - 1
    scale, zero = mse_grid_params(w, bits, sym, 100, 0.8, NORM)
    s0, z0 = grid_params(w, bits, sym)
    assert torch.all(clip_error(w, scale, zero, maxq, NORM) <= clip_error(w, s0, z0, maxq, NORM))
    assert torch.equal(scale.half().float(), scale)  # fp16-representable
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= maxq
    if sym:
        assert torch.all(zero == (maxq + 1) // 2)


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_no_shrink_is_exactly_the_min_max_rule(bits, sym):
    """With one candidate (p = 1) the search path reproduces mse off bit for bit: RTN and GPTQ."""
    w = _weights("special-rows", rows=32, cols=128, seed=2)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3))
    h = 2 / 512 * x.T @ x
    off = QuantConfig(bits=bits, group_size=32, sym=sym)
    one = QuantConfig(bits=bits, group_size=32, sym=sym, mse=True, mse_max_shrink=0.0)
    for quant in (lambda c: rtn_quantize(w, c), lambda c: gptq_quantize(w, h, c)):
        a, b = quant(off), quant(one)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        assert torch.equal(a.zeros, b.zeros) and torch.equal(a.dequant, b.dequant)


def test_mse_off_uses_the_min_max_rule():
    w = _weights("outliers")
    for sym in (False, True):
        cfg = QuantConfig(bits=4, sym=sym)
        assert not cfg.mse
        for got, want in zip(group_params(w, cfg), grid_params(w, 4, sym)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("budget", [1, 1000, 1 << 30])
def test_batched_equals_per_item_whatever_the_pass_size(monkeypatch, budget):
    w = torch.stack([_weights(k, rows=16, cols=128, seed=s)
                     for s, k in enumerate(("gauss", "outliers", "special-rows"))])  # [3, 16, 128]
    want = [mse_grid_params(w[c], 4, False, 100, 0.8, NORM) for c in range(3)]
    monkeypatch.setattr(grid, "MAX_SEARCH_ELEMENTS", budget)
    scale, zero = mse_grid_params(w, 4, False, 100, 0.8, NORM)
    for c in range(3):
        assert torch.equal(scale[c], want[c][0]) and torch.equal(zero[c], want[c][1])


@pytest.mark.parametrize("desc_act,sym", [(True, False), (False, True)])
def test_gptq_many_with_mse_equals_one_at_a_time(desc_act, sym):
    g = torch.Generator().manual_seed(7)
    w = _weights("outliers", rows=48, cols=256, seed=7)
    hs = []
    for _ in range(2):
        x = torch.randn(1024, 256, generator=g) * (torch.rand(256, generator=g) * 3 + 0.1)
        hs.append(2 / 1024 * x.T @ x)
    cfg = QuantConfig(bits=3, group_size=64, sym=sym, desc_act=desc_act, mse=True)
    many = gptq_quantize_many(w, hs, cfg)
    for h, got in zip(hs, many):
        one = gptq_quantize(w, h, cfg)
        assert torch.equal(got.codes, one.codes) and torch.equal(got.scales, one.scales)
        assert torch.equal(got.zeros, one.zeros) and torch.equal(got.dequant, one.dequant)
    plain = gptq_quantize(w, hs[0], QuantConfig(bits=3, group_size=64, sym=sym, desc_act=desc_act))
    assert not torch.equal(plain.scales, many[0].scales)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 128, False, True), (3, 32, True, False),
                                                          (2, 64, False, False), (8, -1, True, True)])
def test_checkpoint_round_trip_exact_with_mse(bits, group_size, sym, desc_act):
    torch.manual_seed(bits)
    w = _weights("outliers", rows=64, cols=128, seed=bits)
    x = torch.randn(512, 128) * (torch.rand(128) + 0.2)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, mse=True)
    for res in (gptq_quantize(w, 2 / 512 * x.T @ x, cfg), rtn_quantize(w, cfg)):
        t = packed_tensors("l", res, bits)
        assert torch.equal(t["l.scales"].float(), res.scales)
        assert torch.equal(dequantize(t["l.qweight"], t["l.qzeros"], t["l.scales"], t["l.g_idx"], bits),
                           res.dequant)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mse_grid=0), "mse_grid"), (dict(mse_grid=2.5), "mse_grid"), (dict(mse_grid=True), "mse_grid"),
    (dict(mse_max_shrink=1.0), "mse_max_shrink"), (dict(mse_max_shrink=-0.1), "mse_max_shrink"),
    (dict(mse_norm=0.0), "mse_norm"), (dict(mse_norm=-2.0), "mse_norm"),
])
def test_bad_mse_settings_rejected(kwargs, message):
    with pytest.raises(QuantConfigError, match=message):
        QuantConfig(mse=True, **kwargs)


def test_mse_settings_survive_the_config_dict():
    cfg = QuantConfig(mse=True, mse_grid=50, mse_max_shrink=0.5, mse_norm=2.0)
    assert QuantConfig(**cfg.to_dict()) == cfg
