"""Export a trained LengthModel to ONNX (optionally int8 dynamic-quantized) with its metadata.json."""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from services.predictor.features import NUM_DENSE, Featurizer
from services.predictor.model import LengthModel
from services.predictor.onnx_predictor import FORMAT, METADATA_FILE, OnnxLengthModel

ONNX_FILE = "model.onnx"
OPSET = 17


def export_onnx(model: LengthModel, path: Path) -> None:
    """Trace the model with dynamic batch and n-gram axes (TorchScript exporter: no onnxscript here)."""
    model = model.eval()
    example = (
        torch.ones(2, 5, dtype=torch.int64),  # ngram_ids [B, L]
        torch.zeros(2, dtype=torch.int64),  # task_ids [B]
        torch.zeros(2, NUM_DENSE, dtype=torch.float32),  # dense [B, F]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=["ngram_ids", "task_ids", "dense"], output_names=["log_tokens"],
            dynamic_axes={"ngram_ids": {0: "batch", 1: "ngrams"}, "task_ids": {0: "batch"},
                          "dense": {0: "batch"}, "log_tokens": {0: "batch"}},
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights (the embedding table stays fp32).

    Weights per output channel in 7 bits (reduce_range): x86 CPUs without VNNI multiply u8 × s8
    pairs into saturating int16 sums, which full-range weights overflow. On one such host the
    tiny test model's int8 export was off by 0.83 in log tokens with full-range per-tensor weights
    and by 0.03 with this setting (tests/unit/predictor/test_onnx_parity.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True)


def write_model_dir(model: LengthModel, tasks: list[str], featurizer: Featurizer, out_dir: Path,
                    task_log_sigma: dict[str, float] | None = None, quantize: bool = False,
                    extra: dict | None = None) -> Path:
    """Write model.onnx + metadata.json into out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    if quantize:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / ONNX_FILE
            export_onnx(model, fp32)
            quantize_int8(fp32, onnx_path)
    else:
        export_onnx(model, onnx_path)
    meta = {
        "format": FORMAT,
        "onnx_file": ONNX_FILE,
        "tasks": list(tasks),
        "featurizer": featurizer.to_dict(),
        "model": model.cfg.to_dict(),
        "quantized_int8": quantize,
        "task_log_sigma": task_log_sigma or {},
        **(extra or {}),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def max_abs_diff(model: LengthModel, onnx_model: OnnxLengthModel,
                 items: list[tuple[str, str]]) -> float:
    """Largest |torch − onnxruntime| over the items' log-length outputs."""
    ids, dense = onnx_model.featurizer.batch([p for _, p in items])
    task_ids = np.asarray([onnx_model.task_index.get(t, 0) for t, _ in items], dtype=np.int64)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(ids), torch.from_numpy(task_ids),
                           torch.from_numpy(dense)).numpy()
    got = onnx_model.run_raw(ids, task_ids, dense)
    return float(np.max(np.abs(ref - got)))
