"""RedisKeys: the one place that names Inlaid's Redis keys (schema in docs/architecture.md)."""
from __future__ import annotations

import re
from dataclasses import dataclass

_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class RedisKeys:
    """Key names under one namespace; `pool` selects the request stream a set of engines serves.

    Tests give each case its own namespace so they can share one Redis server.
    """

    namespace: str = "inlaid"
    pool: str = "default"

    def __post_init__(self) -> None:
        for name in ("namespace", "pool"):
            value = getattr(self, name)
            if not _SAFE.match(value):
                raise ValueError(f"redis {name} must match [A-Za-z0-9_.-]+, got {value!r}")

    #: consumer group of the engines on the request stream
    group: str = "engines"

    @property
    def requests(self) -> str:
        """Stream of queued requests (field `req` = JSON)."""
        return f"{self.namespace}:{self.pool}:requests"

    def request(self, request_id: str) -> str:
        """Hash: state, engine_id, task, created_ts."""
        return f"{self.namespace}:req:{request_id}"

    def output(self, request_id: str) -> str:
        """Stream of output chunks (o, t, x, f, e, np, no)."""
        return f"{self.namespace}:req:{request_id}:out"

    def cancel(self, request_id: str) -> str:
        """String set by the gateway when the client cancels."""
        return f"{self.namespace}:req:{request_id}:cancel"

    @property
    def tasks(self) -> str:
        """Hash: task name → JSON task record."""
        return f"{self.namespace}:tasks"

    @property
    def tasks_version(self) -> str:
        """Counter bumped on every task change."""
        return f"{self.namespace}:tasks:version"

    @property
    def weights(self) -> str:
        """Hash: version, path of the current quantized checkpoint."""
        return f"{self.namespace}:weights"

    def stats(self, task: str) -> str:
        """List of recent output lengths of a task, newest first."""
        return f"{self.namespace}:stats:{task}"

    def quant_job(self, job_id: str) -> str:
        """Hash: one quantization job's record (services.quantizer.job_store)."""
        return f"{self.namespace}:qjob:{job_id}"

    @property
    def quant_jobs(self) -> str:
        """Sorted set: quantization job ids by creation time."""
        return f"{self.namespace}:qjobs"
