"""LengthPredictor: model vs statistics vs default, blend, validation, micro-batching."""
import asyncio
import math

import pytest

from services.predictor.config import PredictorConfig
from services.predictor.onnx_predictor import MicroBatcher, OnnxLengthModel
from services.predictor.predictor import (
    SOURCE_BLEND, SOURCE_DEFAULT, SOURCE_MODEL, SOURCE_STATISTICS, InvalidInputError,
    LengthPredictor)
from services.predictor.stats import RunningStats

SPELL = "Spell out: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10"


def _predictor(model=None, **cfg):
    config = PredictorConfig(model_dir=None, **cfg)
    return LengthPredictor(config, RunningStats(window=config.stats_window), model)


async def test_default_then_statistics_without_model():
    p = _predictor(default_output_tokens=77)
    [pred] = await p.predict([("t", "hello")])
    assert (pred.output_tokens, pred.source, pred.confidence) == (77, SOURCE_DEFAULT, 0.0)
    p.report([("t", 10), ("t", 20), ("t", 30)])
    [pred] = await p.predict([("t", "hello")])
    assert (pred.output_tokens, pred.source) == (20, SOURCE_STATISTICS)
    assert 0.0 < pred.confidence < 1.0
    # Another task with no reports gets the global median, still marked DEFAULT.
    [pred] = await p.predict([("other", "x")])
    assert (pred.output_tokens, pred.source) == (20, SOURCE_DEFAULT)


async def test_model_known_task_unknown_task_and_empty_prompt(tiny_model_dir):
    p = _predictor(OnnxLengthModel(tiny_model_dir[0]))
    p.report([("nobody-knows", 5)])
    preds = await p.predict([("spell", SPELL), ("nobody-knows", SPELL), ("spell", "")])
    assert [x.source for x in preds] == [SOURCE_MODEL, SOURCE_STATISTICS, SOURCE_DEFAULT]
    assert preds[0].output_tokens > 10  # 10 items → ~42 tokens in the synthetic data


async def test_blend_shifts_model_toward_reported_level(tiny_model_dir):
    p = _predictor(OnnxLengthModel(tiny_model_dir[0]), blend_prior_count=10)
    [alone] = await p.predict([("spell", SPELL)])
    # The adapter now answers 4x longer than the model learned; 30 reports say so.
    p.report([("spell", 4 * alone.output_tokens)] * 30)
    [blended] = await p.predict([("spell", SPELL)])
    assert blended.source == SOURCE_BLEND
    w = 30 / (30 + 10)
    expected = math.expm1(math.log1p(alone.output_tokens) + w * math.log(4))
    assert blended.output_tokens == pytest.approx(expected, rel=0.05)
    # A shift, not an average: the model's order within the task survives.
    short, long = await p.predict([("spell", "Spell out: 1, 2"), ("spell", SPELL + ", 11, 12, 13")])
    assert short.output_tokens < long.output_tokens


async def test_invalid_inputs():
    p = _predictor(max_prompt_chars=10, max_items=2)
    with pytest.raises(InvalidInputError, match="item 0: prompt has 11 characters; at most 10"):
        await p.predict([("t", "x" * 11)])
    with pytest.raises(InvalidInputError, match="3 items"):
        await p.predict([("t", "a")] * 3)
    with pytest.raises(InvalidInputError, match="task name"):
        await p.predict([("t" * 300, "a")])
    with pytest.raises(InvalidInputError, match="output_tokens must be >= 0"):
        p.report([("t", 3), ("t", -1)])
    assert p._stats.summary("t") is None  # the valid report before the bad one was not kept
    assert await p.predict([]) == []


async def test_micro_batcher_merges_concurrent_calls(tiny_model_dir):
    model = OnnxLengthModel(tiny_model_dir[0])
    sizes = []
    real_predict = model.predict

    def spy(items):
        sizes.append(len(items))
        return real_predict(items)

    model.predict = spy
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=20)
    batcher.start()
    try:
        direct = real_predict([("spell", SPELL)])[0]
        results = await asyncio.gather(*[batcher.predict([("spell", SPELL)]) for _ in range(16)])
    finally:
        await batcher.close()
    assert all(r[0].log_tokens == pytest.approx(direct.log_tokens, abs=1e-5) for r in results)
    assert sum(sizes) == 16 and max(sizes) <= 8 and len(sizes) < 16
