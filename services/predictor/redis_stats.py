"""Optional shared statistics: periodically reload every task's length list `inlaid:stats:{task}` from Redis."""
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.predictor.stats import RunningStats

log = logging.getLogger(__name__)


class RedisStatsSync:
    """Replaces local per-task windows with the lists engines keep in Redis (LPUSH + LTRIM).

    Every predictor replica then sees the lengths of every finished request, not
    only those reported to it; between refreshes ReportLengths updates the local copy.
    """

    def __init__(self, url: str, stats: RunningStats, window: int, refresh_s: float = 2.0,
                 namespace: str = "inlaid") -> None:
        self._client = connect(url)
        self._keys = RedisKeys(namespace)
        self._prefix = self._keys.stats("")
        self._stats = stats
        self._window = window
        self._refresh_s = refresh_s
        self._task: asyncio.Task | None = None

    async def refresh(self) -> int:
        """Reload every task's list into the local statistics; returns the number of tasks."""
        num_tasks = 0
        async for key in self._client.scan_iter(match=f"{self._prefix}*", count=500):
            values = await self._client.lrange(key, 0, self._window - 1)
            lengths = []
            for v in reversed(values):  # oldest first, as RunningStats keeps them
                try:
                    lengths.append(int(v))
                except ValueError:
                    log.warning("ignoring non-integer %r in %s", v, key)
            self._stats.replace(key[len(self._prefix):], lengths)
            num_tasks += 1
        return num_tasks

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except (aioredis.RedisError, OSError) as exc:
                # Statistics are advisory: a Redis outage must not stop predictions.
                log.warning("refreshing length statistics from Redis failed: %s", exc)
            await asyncio.sleep(self._refresh_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._client.aclose()
