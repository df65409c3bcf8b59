"""Optional sharing of per-task length statistics through Redis lists `inlaid:stats:{task}`."""
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from services.predictor.stats import RunningStats

log = logging.getLogger(__name__)
STATS_KEY_PREFIX = "inlaid:stats:"


def stats_key(task: str) -> str:
    """Redis key of a task's recent output lengths (newest first)."""
    return f"{STATS_KEY_PREFIX}{task}"


class RedisStatsSync:
    """Writes reports through to Redis and periodically reloads every task's list.

    Several predictor replicas then share one view; Redis holds the window
    (LPUSH + LTRIM), the local RunningStats is a cache refreshed every refresh_s.
    """

    def __init__(self, url: str, stats: RunningStats, window: int, refresh_s: float = 2.0) -> None:
        self._client = aioredis.from_url(url, decode_responses=True)
        self._stats = stats
        self._window = window
        self._refresh_s = refresh_s
        self._task: asyncio.Task | None = None

    async def push(self, reports: list[tuple[str, int]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for task, output_tokens in reports:
            pipe.lpush(stats_key(task), int(output_tokens))
        for task in {task for task, _ in reports}:
            pipe.ltrim(stats_key(task), 0, self._window - 1)
        await pipe.execute()

    async def refresh(self) -> int:
        """Reload every `inlaid:stats:*` list into the local statistics; returns the task count."""
        num_tasks = 0
        async for key in self._client.scan_iter(match=f"{STATS_KEY_PREFIX}*", count=500):
            values = await self._client.lrange(key, 0, self._window - 1)
            lengths = []
            for v in reversed(values):  # oldest first, as RunningStats keeps them
                try:
                    lengths.append(int(v))
                except ValueError:
                    log.warning("ignoring non-integer %r in %s", v, key)
            self._stats.replace(key[len(STATS_KEY_PREFIX):], lengths)
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
