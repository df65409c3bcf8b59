"""Tests for services/common/logging.py: JSON lines, context propagation across asyncio tasks."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from services.common.logging import (LoggingConfig, bind_log_context, get_request_id,
                                     new_request_id, set_log_context, setup_logging)


@pytest.fixture
def stream():
    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = setup_logging("DEBUG", json=True, stream=buf)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)


def _lines(buf):
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_has_core_fields_context_and_extra(stream):
    log = logging.getLogger("inlaid.test")
    with bind_log_context(request_id="r1", tenant="acme"):
        log.info("hello %s", "world", extra={"task": "sql", "num_tokens": 3})
    log.info("outside")
    inside, outside = _lines(stream)
    assert inside["msg"] == "hello world"
    assert inside["level"] == "INFO" and inside["logger"] == "inlaid.test"
    assert inside["ts"].endswith("Z")
    assert (inside["request_id"], inside["tenant"], inside["task"], inside["num_tokens"]) == (
        "r1", "acme", "sql", 3)
    assert "request_id" not in outside


def test_nested_context_overrides_and_none_removes(stream):
    with bind_log_context(request_id="outer", task="a"):
        with bind_log_context(task="b", request_id=None):
            logging.getLogger("x").warning("w")
            assert get_request_id() is None
        assert get_request_id() == "outer"
    (line,) = _lines(stream)
    assert line["task"] == "b" and "request_id" not in line


def test_exceptions_and_unserialisable_values_are_logged(stream):
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed", extra={"path": object()})
    (line,) = _lines(stream)
    assert "RuntimeError: boom" in line["exc"]
    assert line["path"].startswith("<object")


async def test_context_is_isolated_between_concurrent_tasks(stream):
    log = logging.getLogger("inlaid.async")

    async def handle(request_id):
        set_log_context(request_id=request_id)
        await asyncio.sleep(0.01)  # interleave with the other task
        log.info("done")

    await asyncio.gather(handle("a"), handle("b"))
    lines = [line for line in _lines(stream) if line["logger"] == "inlaid.async"]
    assert sorted(line["request_id"] for line in lines) == ["a", "b"]
    assert get_request_id() is None  # the tasks' contexts did not leak into ours


def test_second_setup_replaces_the_handler_and_text_mode_works():
    root = logging.getLogger()
    old_level = root.level
    first, second = io.StringIO(), io.StringIO()
    h1 = setup_logging("INFO", json=True, stream=first)
    h2 = setup_logging("INFO", json=False, stream=second)
    try:
        assert h1 not in root.handlers
        with bind_log_context(request_id="r9"):
            logging.getLogger("t").info("plain")
        assert first.getvalue() == ""
        assert "plain request_id=r9" in second.getvalue()
    finally:
        root.removeHandler(h2)
        root.setLevel(old_level)


def test_config_and_bad_levels():
    assert LoggingConfig.from_env({"LOG_LEVEL": "debug", "LOG_FORMAT": "text"}) == LoggingConfig(
        "DEBUG", is_json=False)
    assert LoggingConfig.from_env({}) == LoggingConfig("INFO", is_json=True)
    with pytest.raises(ValueError):
        LoggingConfig.from_env({"LOG_FORMAT": "xml"})
    with pytest.raises(ValueError):
        setup_logging("LOUD")
    assert len(new_request_id()) == 32


async def test_generator_closed_from_another_context_does_not_raise():
    """gRPC may close an abandoned streaming handler from a context other than the one it ran in."""
    async def handler():
        with bind_log_context(request_id="stream"):
            yield 1
            yield 2

    gen = handler()

    async def first_step():
        return await gen.__anext__()

    assert await asyncio.create_task(first_step()) == 1  # entered in the task's context
    await gen.aclose()  # closed from ours: the token is foreign here
    assert get_request_id() is None
