"""WeightPublisher: announces a quantized checkpoint version to the engines (`inlaid:weights`)."""
from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from services.common.redis_keys import RedisKeys

# Engines swap when `version` grows, so a published version must exceed the one in Redis even
# when the checkpoint directory was reset (its numbering restarted at v1) while Redis lived on.
_PUBLISH = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if version <= current then version = current + 1 end
redis.call('HSET', KEYS[1], 'version', version, 'path', ARGV[2])
return version
"""


class WeightPublisher:
    """HSETs {version, path} of a checkpoint version directory, as EngineWorker.sync_weights reads it."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    async def current(self) -> tuple[int, str]:
        """(version, path) being served; (0, "") before the first publication."""
        info = await self._client.hgetall(self._keys.weights)
        return int(info.get("version") or 0), str(info.get("path") or "")

    async def publish(self, version_dir: Path) -> int:
        """Publish a complete version directory (named v<N>); returns the version engines see."""
        number = int(version_dir.name.lstrip("v")) if version_dir.name[1:].isdigit() else 1
        return int(await self._client.eval(_PUBLISH, 1, self._keys.weights, number,
                                           str(version_dir.resolve())))
