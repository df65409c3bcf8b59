"""Checkpoint round trip (load gives exactly the weights GPTQ produced) and atomic versions."""
from __future__ import annotations

import json

import pytest
import torch

from services.quantizer.checkpoint import (CheckpointError, QUANT_CONFIG, dequantize, load_checkpoint,
                                           packed_tensors, resolve, write_version)
from services.quantizer.config import QuantConfig
from services.quantizer.gptq import gptq_quantize
from services.quantizer.rtn import rtn_quantize


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 128, True, False), (4, 32, False, True),
                                                          (3, 64, False, False), (8, -1, True, True),
                                                          (2, 64, False, False)])
def test_packed_tensors_dequantize_exactly(bits, group_size, sym, desc_act):
    torch.manual_seed(bits)
    w = torch.randn(64, 128) * 0.1
    x = torch.randn(512, 128) * (torch.rand(128) + 0.2)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    for res in (gptq_quantize(w, 2 / 512 * x.T @ x, cfg), rtn_quantize(w, cfg)):
        t = packed_tensors("l", res, bits)
        assert t["l.scales"].dtype == torch.float16 and t["l.g_idx"].dtype == torch.int32
        assert torch.equal(dequantize(t["l.qweight"], t["l.qzeros"], t["l.scales"], t["l.g_idx"], bits),
                           res.dequant)


def _build(tensors):
    def build(tmp):
        from safetensors.torch import save_file
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / QUANT_CONFIG).write_text(json.dumps({"bits": 4}))
        (tmp / "config.json").write_text("{}")
    return build


def test_versions_and_failed_write_leaves_old(tmp_path):
    v1 = write_version(tmp_path, _build({"a": torch.ones(2)}))
    assert resolve(tmp_path) == v1 and v1.name == "v1"

    def broken(tmp):
        _build({"a": torch.zeros(2)})(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_version(tmp_path, broken)
    assert resolve(tmp_path) == v1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "v1"]
    assert torch.equal(load_checkpoint(tmp_path).tensors["a"], torch.ones(2))
    v2 = write_version(tmp_path, _build({"a": torch.zeros(2)}))
    assert resolve(tmp_path) == v2 and v2.name == "v2"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
