"""Fault injection against real processes: every accepted request completes with exactly the
no-fault greedy output, no token lost or repeated, and cancelled work frees the engine.
Slow (two engines load, each scenario streams N requests on CPU): `pytest -m slow tests/faults`."""
from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.conftest import MAX_TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _assert_clean(row: dict) -> None:
    n = row["n_in_flight"]
    assert row["lost"] == 0, row
    assert row["completed"] == n, row
    assert row["correct"] == n, row
    assert row["duplicated_tokens"] == 0 and row["gap_tokens"] == 0, row


async def test_engine_kill_is_reclaimed(cluster, reference):
    row = await scenarios.engine_kill(cluster, reference, MAX_TOKENS)
    _assert_clean(row)
    assert row["victim_held"] > 0  # the kill hit requests that were streaming


async def test_gateway_restart_clients_resume(cluster, reference):
    row = await scenarios.gateway_restart(cluster, reference, MAX_TOKENS)
    _assert_clean(row)
    assert row["resumes"] >= row["n_in_flight"]  # every stream broke and was resumed


async def test_gateway_sigterm_clients_resume(cluster, reference):
    row = await scenarios.gateway_sigterm(cluster, reference, MAX_TOKENS)
    _assert_clean(row)
    assert row["exit_code"] == 0, row  # the graceful path ran, not a kill after a timeout
    assert row["resumes"] >= 1, row  # the streams outlived the grace period and were resumed


async def test_redis_restart_with_aof_loses_nothing(cluster, reference):
    _assert_clean(await scenarios.redis_restart(cluster, reference, MAX_TOKENS))


async def test_cancel_and_deadline_free_engine(cluster, reference):
    row = await scenarios.cancel_and_deadline(cluster, reference)
    assert row["peak_num_running"] > 0, row  # the engines really held the requests
    assert row["resources_freed"], row
    assert row["completed"] == row["n_in_flight"], row  # every request reached 'finished'
    assert row["correct"] == row["n_in_flight"], row
    assert set(row["errors"]) <= {"CANCELLED (client)", "DEADLINE_EXCEEDED"}, row


async def test_hung_engine_cannot_write_after_takeover(cluster, reference):
    row = await scenarios.engine_pause(cluster, reference, MAX_TOKENS)
    _assert_clean(row)
    assert row["stream_tokens_beyond_max_after_wakeup"] == 0, row
