"""The exported ONNX model (fp32 and int8) matches the torch model; it learned the synthetic task."""
import numpy as np
import pytest

from services.predictor.export import max_abs_diff, write_model_dir
from services.predictor.features import Featurizer
from services.predictor.onnx_predictor import ModelLoadError, OnnxLengthModel

from .conftest import TASKS, synthetic_rows


def _items(num=64):
    return [(r["task"], r["prompt"]) for r in synthetic_rows(num, seed=7)]


def test_onnx_matches_torch(tiny_model_dir):
    out_dir, model = tiny_model_dir
    onnx_model = OnnxLengthModel(out_dir)
    assert max_abs_diff(model, onnx_model, _items()) < 1e-3


def test_tiny_model_ranks_lengths(tiny_model_dir):
    out_dir, _ = tiny_model_dir
    onnx_model = OnnxLengthModel(out_dir)
    rows = synthetic_rows(40, seed=3)
    preds = onnx_model.predict([(r["task"], r["prompt"]) for r in rows])
    spell = [(np.expm1(p.log_tokens), r["output_tokens"]) for p, r in zip(preds, rows)
             if r["task"] == "spell"]
    assert np.corrcoef([p for p, _ in spell], [t for _, t in spell])[0, 1] > 0.8
    short = [np.expm1(p.log_tokens) for p, r in zip(preds, rows) if r["task"] == "short"]
    assert np.median(short) < 10
    assert all(0.0 <= p.confidence <= 1.0 for p in preds)


def test_int8_export_stays_close(tiny_model_dir, tmp_path):
    _, model = tiny_model_dir
    write_model_dir(model, TASKS, Featurizer(num_buckets=1024, max_ngrams=64), tmp_path,
                    quantize=True)
    # int8 weights: not bit-exact, but a few percent in length at most.
    assert max_abs_diff(model, OnnxLengthModel(tmp_path), _items()) < 0.1


def test_missing_model_files_raise(tmp_path):
    with pytest.raises(ModelLoadError, match="metadata.json"):
        OnnxLengthModel(tmp_path)
    (tmp_path / "metadata.json").write_text('{"format": "something-else"}')
    with pytest.raises(ModelLoadError, match="format"):
        OnnxLengthModel(tmp_path)
