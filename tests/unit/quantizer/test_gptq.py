"""GPTQ against RTN and against a plain float64 OBQ-style reference of the same update."""
from __future__ import annotations

import pytest
import torch

from services.quantizer.config import QuantConfig, QuantConfigError
from services.quantizer.gptq import gptq_quantize, gptq_quantize_many, prepare_hessian
from services.quantizer.grid import dequantize_codes, grid_params, quantize_codes
from services.quantizer.rtn import rtn_quantize


def _layer(seed: int, rows: int = 48, cols: int = 256, tokens: int = 1024):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel scales, as in real activations.
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 3 + 0.1)
    w = torch.randn(rows, cols, generator=g) * 0.05
    h = 2.0 / tokens * x.T @ x
    return w, x, h


def _loss(w, q, x):
    return float(((x @ (w - q).T) ** 2).sum())


def reference_gptq(w, h, bits, group_size, sym, damp):
    """Column by column in float64 with an explicitly downdated inverse Hessian (no Cholesky,
    no blocks): after quantizing column j, remove it from H⁻¹ by a Schur-complement update."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    maxq = 2 ** bits - 1
    gsize = cols if group_size == -1 else group_size
    q_all = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    for j in range(cols):
        if j % gsize == 0:
            scale, zero = grid_params(w[:, j:j + gsize], bits, sym)
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = q
        q_all[:, j] = scale * (q - zero)
        err = (w[:, j] - q_all[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes, q_all


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 32, False), (3, 64, True),
                                                 (2, -1, False), (8, 256, True)])
def test_gptq_matches_float64_reference(bits, group_size, sym):
    w, _, h = _layer(1)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=False)
    ours = gptq_quantize(w, h, cfg, dtype=torch.float64)
    ref_codes, ref_q = reference_gptq(w, h, bits, group_size, sym, cfg.damp_percent)
    mismatch = (ours.codes != ref_codes.to(torch.int32)).float().mean().item()
    assert mismatch < 1e-3, mismatch  # only ties at .5 may round differently
    assert torch.allclose(ours.dequant.double(), ref_q, atol=1e-6) or mismatch > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_loss_below_rtn(bits, desc_act):
    w, x, h = _layer(2)
    # 2-bit symmetric has only 4 levels around an off-centre zero; GPTQ is not reliably better
    # than RTN there (known), so 2 bits is checked asymmetric.
    cfg = QuantConfig(bits=bits, group_size=128, desc_act=desc_act, sym=bits != 2)
    gptq = gptq_quantize(w, h, cfg)
    rtn = rtn_quantize(w, cfg)
    margin = 1.0 if bits == 2 else 0.9
    assert _loss(w, gptq.dequant, x) < margin * _loss(w, rtn.dequant, x)


def test_act_order_g_idx_and_dequant_consistent():
    w, _, h = _layer(3)
    res = gptq_quantize(w, h, QuantConfig(bits=4, group_size=64, desc_act=True))
    assert sorted(torch.bincount(res.g_idx.long()).tolist()) == [64] * 4
    # Dequant is exactly scale[g_idx]·(code − zero[g_idx]) in original column order.
    gi = res.g_idx.long()
    rebuilt = dequantize_codes(res.codes.float(), res.scales[gi].T.float(), res.zeros[gi].T.float())
    assert torch.equal(rebuilt, res.dequant)
    # Act-order is not the identity here (channel scales differ a lot).
    assert not torch.equal(gi, torch.arange(256) // 64)


def test_dead_inputs_zero_weight_columns():
    w, _, h = _layer(4)
    h[:, 5] = 0
    h[5, :] = 0
    res = gptq_quantize(w, h, QuantConfig(bits=4, group_size=128))
    assert torch.all(res.dequant[:, 5] == 0)


def test_singular_hessian_retries_damping():
    # Rank-1 Hessian with a negative eigenvalue nudge: the first Cholesky fails, damping grows.
    v = torch.randn(64, dtype=torch.float64)
    h = torch.outer(v, v) - 0.05 * torch.eye(64, dtype=torch.float64) * torch.mean(v * v)
    u, dead = prepare_hessian(h, 0.01)
    assert torch.isfinite(u).all() and not dead.any()


def test_rtn_round_to_nearest():
    w = torch.randn(8, 64)
    res = rtn_quantize(w, QuantConfig(bits=4, group_size=32, sym=True, desc_act=False))
    scale, zero = grid_params(w[:, :32], 4, True)
    assert torch.equal(res.codes[:, :32], quantize_codes(w[:, :32], scale[:, None], zero[:, None], 15).int())
    assert res.scales.shape == (2, 8)


@pytest.mark.parametrize("kwargs", [dict(bits=5), dict(bits=1), dict(group_size=96), dict(group_size=0),
                                    dict(method="awq"), dict(aggregation="median")])
def test_bad_config_rejected(kwargs):
    with pytest.raises(QuantConfigError):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("desc_act,sym", [(False, True), (True, False)])
def test_many_hessians_equal_one_at_a_time(desc_act, sym):
    """The batched sweep (one weight, several Hessians) gives each Hessian's own result."""
    w, _, h1 = _layer(11)
    _, _, h2 = _layer(12)
    h2[5, :] = 0
    h2[:, 5] = 0  # a dead input in one Hessian only
    cfg = QuantConfig(bits=3, group_size=64, sym=sym, desc_act=desc_act)
    many = gptq_quantize_many(w, [h1, h2], cfg)
    for h, got in zip([h1, h2], many):
        one = gptq_quantize(w, h, cfg)
        assert torch.equal(got.codes, one.codes)
        assert torch.equal(got.g_idx, one.g_idx)
        assert torch.allclose(got.dequant, one.dequant, atol=1e-6)
        assert torch.allclose(got.scales, one.scales)
    assert not torch.equal(many[0].codes, many[1].codes)
    assert torch.all(many[1].dequant[:, 5] == 0) and not torch.all(many[0].dequant[:, 5] == 0)
