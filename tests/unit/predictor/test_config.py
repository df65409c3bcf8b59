"""PredictorConfig.from_env: defaults, overrides, validation."""
from pathlib import Path

import pytest

from services.predictor.config import DEFAULT_MODEL_DIR, PredictorConfig


def test_defaults():
    cfg = PredictorConfig.from_env({})
    assert (cfg.port, cfg.model_dir, cfg.num_threads, cfg.redis_url) == (
        50052, DEFAULT_MODEL_DIR, 1, None)


def test_overrides_and_redis_fallback():
    cfg = PredictorConfig.from_env({
        "PREDICTOR_PORT": "6000", "PREDICTOR_MODEL_DIR": "/m", "PREDICTOR_MAX_BATCH": "8",
        "PREDICTOR_MAX_PROMPT_CHARS": "99", "PREDICTOR_NUM_THREADS": "2",
        "REDIS_URL": "redis://shared"})
    assert (cfg.port, cfg.model_dir, cfg.max_batch, cfg.max_prompt_chars, cfg.num_threads) == (
        6000, Path("/m"), 8, 99, 2)
    assert cfg.redis_url == "redis://shared"
    assert PredictorConfig.from_env({"REDIS_URL": "redis://a", "PREDICTOR_REDIS_URL": "redis://b"}
                                    ).redis_url == "redis://b"
    assert PredictorConfig.from_env({"PREDICTOR_MODEL_DIR": "none"}).model_dir is None


@pytest.mark.parametrize("env, match", [
    ({"PREDICTOR_PORT": "abc"}, "PREDICTOR_PORT must be an integer"),
    ({"PREDICTOR_PORT": "70000"}, "port"),
    ({"PREDICTOR_MAX_BATCH": "0"}, "max_batch"),
    ({"PREDICTOR_NUM_THREADS": "-1"}, "num_threads"),
])
def test_invalid(env, match):
    with pytest.raises(ValueError, match=match):
        PredictorConfig.from_env(env)
