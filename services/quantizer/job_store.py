"""JobStore: quantization job records in Redis, so GetJob and recovery outlive a quantizer restart."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from services.common.redis_keys import RedisKeys
from services.quantizer.calibration import TaskSpec

if TYPE_CHECKING:
    from services.quantizer.jobs import Job

log = logging.getLogger(__name__)
FINISHED_TTL_S = 7 * 24 * 3600   # a finished job's record stays readable for a week


class JobStore:
    """One hash per job (`inlaid:qjob:{id}`) and an index by creation time (`inlaid:qjobs`).

    The index holds at most `max_kept` jobs: the oldest finished ones are dropped from it and
    deleted; queued and running jobs are never dropped (recovery needs them)."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, max_kept: int) -> None:
        self._client = client
        self._keys = keys
        self._max_kept = max_kept

    async def save(self, job: Job) -> None:
        key = self._keys.quant_job(job.job_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(key, mapping=_to_fields(job))
        if job.is_active:
            pipe.persist(key)
        else:
            pipe.expire(key, FINISHED_TTL_S)
        pipe.zadd(self._keys.quant_jobs, {job.job_id: job.created_s})
        await pipe.execute()
        if not job.is_active:
            await self._trim()

    async def save_progress(self, job: Job) -> None:
        await self._client.hset(self._keys.quant_job(job.job_id), mapping={
            "num_layers_done": job.num_layers_done, "num_layers_total": job.num_layers_total})

    async def load_all(self) -> list[Job]:
        """Every indexed job, oldest first; ids whose record expired or is corrupt are dropped."""
        ids = await self._client.zrange(self._keys.quant_jobs, 0, -1)
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._keys.quant_job(job_id))
        jobs, gone = [], []
        for job_id, fields in zip(ids, await pipe.execute()):
            try:
                jobs.append(_from_fields(job_id, fields))
            except (KeyError, ValueError, TypeError) as exc:
                if fields:
                    log.error("dropping unreadable quantization job record %s: %s", job_id, exc)
                gone.append(job_id)
        if gone:
            await self._client.zrem(self._keys.quant_jobs, *gone)
        return jobs

    async def _trim(self) -> None:
        ids = await self._client.zrange(self._keys.quant_jobs, 0, -1)
        excess = len(ids) - self._max_kept
        if excess <= 0:
            return
        pipe = self._client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self._keys.quant_job(job_id), "state")
        states = await pipe.execute()
        old = [j for j, s in zip(ids, states) if s not in ("QUEUED", "RUNNING")][:excess]
        if old:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(self._keys.quant_jobs, *old)
            pipe.delete(*(self._keys.quant_job(j) for j in old))
            await pipe.execute()


def _to_fields(job: Job) -> dict[str, str]:
    return {"tasks": json.dumps([asdict(t) for t in job.tasks]), "state": job.state,
            "num_layers_done": str(job.num_layers_done),
            "num_layers_total": str(job.num_layers_total), "message": job.message,
            "weight_version": str(job.weight_version), "created_s": repr(job.created_s),
            "num_attempts": str(job.num_attempts), "bits": str(job.bits),
            "group_size": str(job.group_size), "quarantined": json.dumps(job.quarantined)}


def _from_fields(job_id: str, fields: dict[str, str]) -> Job:
    from services.quantizer.jobs import STATES, Job
    if fields["state"] not in STATES:
        raise ValueError(f"unknown state {fields['state']!r}")
    tasks = [TaskSpec(name=str(t["name"]), adapter_path=t.get("adapter_path"),
                      calibration_path=str(t["calibration_path"]))
             for t in json.loads(fields["tasks"])]
    return Job(job_id=job_id, tasks=tasks, num_layers_total=int(fields["num_layers_total"]),
               state=fields["state"], num_layers_done=int(fields.get("num_layers_done", 0)),
               message=fields.get("message", ""),
               weight_version=int(fields.get("weight_version", 0)),
               created_s=float(fields["created_s"]),
               num_attempts=int(fields.get("num_attempts", 0)),
               bits=int(fields.get("bits", 0)), group_size=int(fields.get("group_size", 0)),
               quarantined={str(k): str(v) for k, v in
                            json.loads(fields.get("quarantined") or "{}").items()})
