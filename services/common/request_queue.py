"""RequestQueue: the Redis request stream and per-request output streams shared by gateway and engines."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from services.common.redis_keys import RedisKeys

log = logging.getLogger(__name__)

OUTPUT_TTL_S = 3600          # finished output streams stay readable (Resume) for an hour
REQUEST_TTL_S = 24 * 3600    # upper bound for state of requests nobody finished


# KEYS: output stream, request hash, request stream, cancel key.
# ARGV: offset, number of tokens, is_final, group, entry id, ttl, then the chunk's fields.
_APPEND_SCRIPT = """
local stream_end = tonumber(redis.call('HGET', KEYS[2], 'end') or '0')
if tonumber(ARGV[1]) ~= stream_end or redis.call('HGET', KEYS[2], 'state') == 'finished' then
  return 0
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 7))
redis.call('HSET', KEYS[2], 'end', stream_end + tonumber(ARGV[2]))
if ARGV[3] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('HSET', KEYS[2], 'state', 'finished')
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('DEL', KEYS[4])
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
  redis.call('XDEL', KEYS[3], ARGV[5])
end
return 1
"""
_APPEND_SHA = hashlib.sha1(_APPEND_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True)
class QueuedRequest:
    """A validated, tokenized request as it travels through the request stream."""

    request_id: str
    task: str
    prompt_token_ids: list[int]
    params: dict                          # services.engine.sequence.SamplingParams fields
    predicted_output_tokens: int | None = None
    tenant: str = ""
    arrival_ts: float = field(default_factory=time.time)
    deadline_ts: float | None = None      # the client's deadline (time.time()); None = none

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> QueuedRequest:
        data = json.loads(raw)
        return cls(request_id=str(data["request_id"]), task=str(data.get("task", "")),
                   prompt_token_ids=[int(t) for t in data["prompt_token_ids"]],
                   params=dict(data.get("params") or {}),
                   predicted_output_tokens=data.get("predicted_output_tokens"),
                   tenant=str(data.get("tenant", "")),
                   arrival_ts=float(data.get("arrival_ts", time.time())),
                   deadline_ts=None if data.get("deadline_ts") is None else float(data["deadline_ts"]))

    def deadline_monotonic(self) -> float | None:
        """The client's deadline on this process's time.monotonic clock (None: no deadline)."""
        return None if self.deadline_ts is None else time.monotonic() + (self.deadline_ts - time.time())


@dataclass(frozen=True)
class OutputChunk:
    """Tokens [offset, offset + len(token_ids)) of one request's output; final when finish_reason != 0."""

    offset: int
    token_ids: list[int]
    text: str = ""
    finish_reason: int = 0                # services.engine.sequence.FinishReason value
    error: str = ""
    num_prompt_tokens: int = 0            # final chunk only
    num_output_tokens: int = 0            # final chunk only

    @property
    def is_final(self) -> bool:
        return self.finish_reason != 0

    @property
    def end(self) -> int:
        return self.offset + len(self.token_ids)

    def to_fields(self) -> dict[str, str]:
        fields = {"o": str(self.offset), "t": json.dumps(self.token_ids), "x": self.text}
        if self.is_final:
            fields.update(f=str(self.finish_reason), np=str(self.num_prompt_tokens),
                          no=str(self.num_output_tokens))
            if self.error:
                fields["e"] = self.error
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> OutputChunk:
        return cls(offset=int(fields["o"]), token_ids=json.loads(fields.get("t", "[]")),
                   text=fields.get("x", ""), finish_reason=int(fields.get("f", 0)),
                   error=fields.get("e", ""), num_prompt_tokens=int(fields.get("np", 0)),
                   num_output_tokens=int(fields.get("no", 0)))


@dataclass(frozen=True)
class Delivery:
    """A request handed to an engine: its stream entry id is what gets acked."""

    entry_id: str
    request: QueuedRequest


class RequestQueue:
    """Gateway side: enqueue, follow outputs, cancel. Engine side: read, claim, publish, ack.

    Invariants: an entry is XACKed (and deleted, so XLEN is the backlog) in the same script
    that writes its final chunk, so a crash before that leaves it pending for XAUTOCLAIM;
    an output stream only grows at its end (offset == `end`), so it never repeats tokens.
    """

    def __init__(self, client: aioredis.Redis, keys: RedisKeys,
                 output_ttl_s: int = OUTPUT_TTL_S) -> None:
        if output_ttl_s <= 0:
            raise ValueError(f"output_ttl_s must be > 0, got {output_ttl_s}")
        self.client = client
        self.keys = keys
        self.output_ttl_s = output_ttl_s   # how long a finished request stays resumable
        self._append_sha = _APPEND_SHA

    async def ensure_group(self) -> None:
        try:
            # id 0: entries added before the first engine started are delivered too.
            await self.client.xgroup_create(self.keys.requests, self.keys.group, id="0",
                                            mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # gateway side -------------------------------------------------------------------
    async def backlog(self) -> int:
        """Requests queued or in flight (finished entries are deleted)."""
        return int(await self.client.xlen(self.keys.requests))

    async def exists(self, request_id: str) -> bool:
        return bool(await self.client.exists(self.keys.request(request_id)))

    async def owner(self, request_id: str) -> str | None:
        """Tenant that created the request; None if the request is unknown (or expired)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self.keys.request(request_id))
        pipe.hget(self.keys.request(request_id), "tenant")
        exists, tenant = await pipe.execute()
        return (tenant or "") if exists else None

    async def median_output_tokens(self, task: str, window: int = 64) -> int | None:
        """Median of the task's most recent finished lengths (engines LPUSH them); None if
        the task has no finished requests yet. The gateway's fallback when the predictor
        is unreachable: scheduling keeps a per-task length estimate instead of none."""
        raw = await self.client.lrange(self.keys.stats(task), 0, window - 1)
        lengths = sorted(int(v) for v in raw)
        if not lengths:
            return None
        return lengths[len(lengths) // 2]

    async def enqueue(self, request: QueuedRequest) -> str | None:
        """Queue the request and return its entry id; None if its id already exists (two
        clients sending one idempotency key at once: only the first one queues it)."""
        rid = request.request_id
        if not await self.client.hsetnx(self.keys.request(rid), "state", "queued"):
            return None
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.request(rid), mapping={"task": request.task,
                                                   "tenant": request.tenant,
                                                   "created_ts": str(request.arrival_ts)})
        pipe.expire(self.keys.request(rid), REQUEST_TTL_S)
        pipe.xadd(self.keys.requests, {"req": request.to_json()})
        results = await pipe.execute()
        return results[-1]

    async def cancel(self, request_id: str) -> bool:
        """Ask engines to stop the request; True if it was still queued or running."""
        state = await self.client.hget(self.keys.request(request_id), "state")
        if state is None or state == "finished":
            return False
        await self.client.set(self.keys.cancel(request_id), "1", ex=REQUEST_TTL_S)
        return True

    async def follow(self, request_id: str, block_ms: int = 1000,
                     deadline_s: float | None = None) -> AsyncIterator[OutputChunk]:
        """Yield the request's chunks in order, waiting for new ones, until the final chunk.

        `deadline_s` (a time.monotonic() instant) ends the wait early: the caller's own
        deadline check, so a client whose deadline passed stops holding the request even
        when the gRPC runtime is late to cancel the handler.
        """
        key, last_id = self.keys.output(request_id), "0-0"
        while True:
            wait_ms = block_ms
            if deadline_s is not None:
                left_s = deadline_s - time.monotonic()
                if left_s <= 0:     # only once it has passed: the caller then reports the deadline
                    return
                wait_ms = max(1, min(block_ms, math.ceil(left_s * 1000)))
            reply = await self.client.xread({key: last_id}, block=wait_ms, count=256)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    chunk = OutputChunk.from_fields(fields)
                    yield chunk
                    if chunk.is_final:
                        return

    # engine side --------------------------------------------------------------------
    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        reply = await self.client.xreadgroup(self.keys.group, consumer, {self.keys.requests: ">"},
                                             count=count, block=block_ms or None)
        entries = [e for _stream, batch in reply or () for e in batch]
        return await self._decode(entries)

    async def autoclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries other engines left pending longer than min_idle_ms."""
        _next, entries, *_deleted = await self.client.xautoclaim(
            self.keys.requests, self.keys.group, consumer, min_idle_ms, "0-0", count=count)
        return await self._decode([e for e in entries if e and e[1] is not None])

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this engine is still working on (a heartbeat),
        so long generations are not mistaken for a dead engine's."""
        if entry_ids:
            await self.client.xclaim(self.keys.requests, self.keys.group, consumer, 0,
                                     entry_ids, justid=True)

    async def num_pending(self) -> int:
        info = await self.client.xpending(self.keys.requests, self.keys.group)
        return int(info["pending"])

    async def _decode(self, entries) -> list[Delivery]:
        deliveries = []
        for entry_id, fields in entries:
            try:
                deliveries.append(Delivery(entry_id, QueuedRequest.from_json(fields["req"])))
            except (KeyError, ValueError, TypeError) as exc:
                log.error("dropping malformed request entry %s: %s", entry_id, exc)
                await self.ack(entry_id)
        return deliveries

    async def ack(self, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.requests, self.keys.group, entry_id)
        pipe.xdel(self.keys.requests, entry_id)
        await pipe.execute()

    async def mark_running(self, request_id: str, engine_id: str) -> None:
        await self.client.hset(self.keys.request(request_id),
                               mapping={"state": "running", "engine_id": engine_id})

    async def cancelled(self, request_ids: list[str]) -> set[str]:
        if not request_ids:
            return set()
        flags = await self.client.mget([self.keys.cancel(r) for r in request_ids])
        return {r for r, flag in zip(request_ids, flags) if flag is not None}

    async def written(self, request_id: str) -> tuple[list[int], bool]:
        """Output tokens already in the request's stream (a dead engine's work) and whether
        its final chunk is among them."""
        entries = await self.client.xrange(self.keys.output(request_id))
        token_ids: list[int] = []
        for _entry_id, fields in entries:
            chunk = OutputChunk.from_fields(fields)
            if chunk.is_final:
                return token_ids + chunk.token_ids, True
            token_ids += chunk.token_ids
        return token_ids, False

    async def publish(self, items: list[tuple[str, str, OutputChunk]]) -> list[bool]:
        """Write (entry_id, request_id, chunk) items in one round trip; finals ack their entry.

        A chunk is written only if its offset is exactly where the stream ends (the request
        hash's `end`), atomically in a script: an engine wrongly presumed dead that keeps
        writing after another took its request over is refused instead of duplicating
        tokens. Returns, per item, whether it was written."""
        if not items:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, request_id, chunk in items:
            fields = [x for kv in chunk.to_fields().items() for x in kv]
            keys = [self.keys.output(request_id), self.keys.request(request_id),
                    self.keys.requests, self.keys.cancel(request_id)]
            args = [chunk.offset, len(chunk.token_ids), int(chunk.is_final), self.keys.group,
                    entry_id, self.output_ttl_s, *fields]
            pipe.evalsha(self._append_sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute()
        except NoScriptError:  # the server restarted (or never saw the script): load and retry
            self._append_sha = await self.client.script_load(_APPEND_SCRIPT)
            return await self.publish(items)
        return [bool(r) for r in results]
