"""The model in models/predictor loads, knows the demo tasks, stays small, and met its targets."""
import json

import pytest

from services.predictor.config import DEFAULT_MODEL_DIR
from services.predictor.onnx_predictor import OnnxLengthModel

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "metadata.json").exists(),
                                reason="no shipped predictor model")


def test_shipped_model_loads_and_met_targets():
    meta = json.loads((DEFAULT_MODEL_DIR / "metadata.json").read_text())
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size < 25 * 2**20
    report = meta["training"]
    assert report["test"]["kendall_tau"] >= 0.6
    assert report["onnx_max_abs_diff"] < 1e-3
    model = OnnxLengthModel(DEFAULT_MODEL_DIR)
    assert {"arith", "sort_list", "num2words_en"} <= set(model.tasks)
    short, long = model.predict([
        ("arith", "Emma has 13 tickets and gives away 1. How many tickets are left? Answer with the number only."),
        ("sort_list", "Sort these words alphabetically and write them as a numbered list, one per line:\n"
                      "jungle, tunnel, acorn, magnet, silver, castle, pirate, candle, umpire, lemon")])
    assert short.log_tokens < long.log_tokens
