"""Background incremental-quantization jobs: one at a time, progress per layer, failures recorded."""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.quantizer.calibration import TaskSpec
from services.quantizer.incremental import add_tasks

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


@dataclass
class Job:
    """State of one add-tasks job (mutated only by its worker thread, read by RPCs)."""

    job_id: str
    tasks: list[TaskSpec]
    state: str = QUEUED
    num_layers_done: int = 0
    num_layers_total: int = 0
    message: str = ""
    version: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False)


class JobManager:
    """Runs add_tasks jobs on a checkpoint root, serially (each re-quantizes every layer and
    the next one must build on the version the previous one published)."""

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu"):
        self.root, self.device = Path(checkpoint_root), device
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # one job runs at a time

    def start(self, tasks: list[TaskSpec]) -> Job:
        if not tasks:
            raise ValueError("a job needs at least one task")
        job = Job(job_id=uuid.uuid4().hex[:12], tasks=list(tasks))
        self._jobs[job.job_id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"quant-{job.job_id}").start()
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self._jobs:
            raise KeyError(f"unknown job {job_id!r}")
        return self._jobs[job_id]

    def _progress(self, job: Job):
        def update(done: int, total: int) -> None:
            job.num_layers_done, job.num_layers_total = done, total
        return update

    def _run(self, job: Job) -> None:
        with self._lock:
            job.state = RUNNING
            try:
                version = add_tasks(self.root, job.tasks, device=self.device,
                                    progress=self._progress(job), show_progress=False)
                job.version = int(version.name.lstrip("v"))
                job.message, job.state = f"published {version}", DONE
            except Exception as exc:  # noqa: BLE001 - any failure is reported through GetJob
                job.message, job.state = f"{type(exc).__name__}: {exc}", FAILED
            finally:
                job.done.set()
