"""TaskRegistry: the registered tasks (name → adapter record) in Redis, with a change counter."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace

import redis.asyncio as aioredis

from services.common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from services.common.redis_keys import RedisKeys

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# TaskState names of common.proto, stored as text so the records stay readable in redis-cli.
SERVABLE_STATES = ("READY", "QUANTIZING")
STATES = ("READY", "QUANTIZING", "FAILED", "QUARANTINED")


def check_task_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"task name {name!r} is invalid: use 1-64 characters of [A-Za-z0-9_.-]")


@dataclass(frozen=True)
class TaskRecord:
    """One registered task as stored in `inlaid:tasks` (JSON per field)."""

    name: str
    adapter_path: str
    rank: int
    targets: list[str] = field(default_factory=list)
    state: str = "READY"
    message: str = ""
    tenant: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"task state must be one of {STATES}, got {self.state!r}")

    @property
    def is_servable(self) -> bool:
        return self.state in SERVABLE_STATES

    def to_json(self) -> str:
        data = asdict(self)
        del data["name"]  # the hash field is the name
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, name: str, raw: str) -> TaskRecord:
        data = json.loads(raw)
        return cls(name=name, adapter_path=str(data["adapter_path"]), rank=int(data["rank"]),
                   targets=list(data.get("targets", [])), state=str(data.get("state", "READY")),
                   message=str(data.get("message", "")), tenant=str(data.get("tenant", "")),
                   weight=float(data.get("weight", 1.0)))


class TaskRegistry:
    """Reads and changes the task registry; every change bumps `tasks:version` in the same
    transaction, so an engine that sees a version also sees the tasks it describes."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._client = client
        self._keys = keys

    async def version(self) -> int:
        return int(await self._client.get(self._keys.tasks_version) or 0)

    async def get(self, name: str) -> TaskRecord | None:
        raw = await self._client.hget(self._keys.tasks, name)
        return None if raw is None else TaskRecord.from_json(name, raw)

    async def require(self, name: str) -> TaskRecord:
        record = await self.get(name)
        if record is None:
            raise NotFoundError(f"unknown task {name!r}: register it with AddTask "
                                "(`inlaid tasks add`) or list tasks with ListTasks")
        return record

    async def list(self) -> list[TaskRecord]:
        raw = await self._client.hgetall(self._keys.tasks)
        return sorted((TaskRecord.from_json(n, r) for n, r in raw.items()), key=lambda t: t.name)

    async def snapshot(self) -> tuple[int, list[TaskRecord]]:
        """Version and tasks read atomically."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self._keys.tasks_version)
        pipe.hgetall(self._keys.tasks)
        version, raw = await pipe.execute()
        tasks = sorted((TaskRecord.from_json(n, r) for n, r in raw.items()), key=lambda t: t.name)
        return int(version or 0), tasks

    async def add(self, record: TaskRecord) -> int:
        """Register a new task; AlreadyExistsError if the name is taken. Returns the new version."""
        check_task_name(record.name)
        pipe = self._client.pipeline(transaction=True)
        pipe.hsetnx(self._keys.tasks, record.name, record.to_json())
        pipe.incr(self._keys.tasks_version)
        created, version = await pipe.execute()
        if not created:
            raise AlreadyExistsError(f"task {record.name!r} already exists; remove it first "
                                     "or pick another name")
        return int(version)

    async def update(self, name: str, **changes) -> TaskRecord:
        """Change fields of an existing task (state, message, weight ...)."""
        record = replace(await self.require(name), **changes)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._keys.tasks, name, record.to_json())
        pipe.incr(self._keys.tasks_version)
        await pipe.execute()
        return record

    async def remove(self, name: str) -> int:
        """Unregister a task; NotFoundError if it is not registered. Returns the new version."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._keys.tasks, name)
        pipe.incr(self._keys.tasks_version)
        removed, version = await pipe.execute()
        if not removed:
            raise NotFoundError(f"unknown task {name!r}: nothing to remove")
        return int(version)
