"""JobRunner: quantization jobs run one at a time in a background thread, FIFO, recorded in Redis.

A job thread is a daemon: a stopping service does not wait for a half-done quantization (its
temporary version directory is never published). Job records live in Redis (JobStore), so a
restarted quantizer knows what it was doing: queued jobs run again, a job that was running is
resumed from its start (quantization is deterministic and nothing of it was published) up to
`max_attempts` times, then marked FAILED with the reason; the served weights never change
unless a version is complete.

Before quantizing, an optional influence screen (influence.py) runs on the job's tasks: a task
it quarantines is marked QUARANTINED at once (no longer served) and left out; the others go on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from services.common.adapter_screening import Verdict
from services.common.errors import NotFoundError
from services.common.metrics import Metrics
from services.common.task_registry import TaskRegistry
from services.quantizer.calibration import TaskSpec
from services.quantizer.job_store import JobStore
from services.quantizer.pipeline import ProgressFn
from services.quantizer.publisher import WeightPublisher

if TYPE_CHECKING:
    from services.quantizer.influence import InfluenceReport

log = logging.getLogger(__name__)
QUEUED, RUNNING, DONE, FAILED = "QUEUED", "RUNNING", "DONE", "FAILED"
STATES = (QUEUED, RUNNING, DONE, FAILED)
MAX_KEPT_JOBS = 256  # finished jobs remembered for GetJob
T = TypeVar("T")
ScreenFn = Callable[["Job"], "dict[str, InfluenceReport]"]


@dataclass
class Job:
    """One StartJob: its tasks, settings (bits, group size; 0 = the service's) and progress."""

    job_id: str
    tasks: list[TaskSpec]
    num_layers_total: int
    state: str = QUEUED
    num_layers_done: int = 0
    message: str = ""
    weight_version: int = 0
    created_s: float = field(default_factory=time.time)
    num_attempts: int = 0              # runs started, counting runs a restart interrupted
    bits: int = 0
    group_size: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)  # task name → screen summary

    @property
    def is_active(self) -> bool:
        return self.state in (QUEUED, RUNNING)

    @property
    def kept_tasks(self) -> list[TaskSpec]:
        """The tasks that join quantization: all but those the influence screen quarantined."""
        return [t for t in self.tasks if t.name not in self.quarantined]


class JobRunner:
    """Queues jobs and runs `quantize(job, progress) -> version dir` for each in turn; on
    success publishes the version and marks the tasks READY, on failure marks them FAILED
    (the served version is untouched: a version is only published once complete).
    `screen(job)` (None: no screening) returns each task's influence report first."""

    def __init__(self, quantize: Callable[[Job, ProgressFn], Path],
                 publisher: WeightPublisher, registry: TaskRegistry, num_layers: int,
                 metrics: Metrics | None = None, store: JobStore | None = None,
                 max_attempts: int = 2, screen: ScreenFn | None = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._quantize = quantize
        self._screen = screen
        self._publisher = publisher
        self._registry = registry
        self._num_layers = num_layers
        self._metrics = metrics
        self._store = store
        self._max_attempts = max_attempts
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass

    async def submit(self, tasks: list[TaskSpec], bits: int = 0, group_size: int = 0) -> Job:
        """Record the job (in Redis first, so an accepted job survives a crash) and queue it."""
        job = Job(job_id=f"q-{uuid.uuid4().hex[:12]}", tasks=list(tasks),
                  num_layers_total=self._num_layers, bits=bits, group_size=group_size)
        await self._save(job, must=True)
        self._remember(job)
        self._queue.put_nowait(job)
        log.info("job %s queued for tasks %s", job.job_id, [t.name for t in tasks])
        return job

    async def recover(self, quantized_task_names: set[str], served_version: int) -> list[Job]:
        """Take over the jobs a previous quantizer process left in Redis (call before start()).

        `quantized_task_names`: tasks in the current version. A RUNNING job whose tasks are all
        in it had published before the crash, so it is DONE. Otherwise it is queued again, or
        FAILED once it has been interrupted `max_attempts` times. Returns the re-queued jobs."""
        if self._store is None:
            return []
        requeued = []
        for job in await self._store.load_all():
            self._remember(job)
            if not job.is_active:
                continue
            names = {t.name for t in job.kept_tasks}
            if job.state == RUNNING and names and names <= quantized_task_names:
                job.state, job.weight_version = DONE, served_version
                job.message = (f"published weight version {served_version} (the quantizer "
                               "restarted before recording it)")
                await self._save(job)
                await self._mark(job, "READY", f"quantized into weight version {served_version}")
                continue
            if job.state == RUNNING and job.num_attempts >= self._max_attempts:
                job.state = FAILED
                job.message = (f"the quantizer stopped while this job was running (layer "
                               f"{job.num_layers_done}/{job.num_layers_total}, attempt "
                               f"{job.num_attempts}/{self._max_attempts}); nothing was published "
                               f"(served weight version {served_version} is unchanged); "
                               "submit the tasks again")
                log.error("job %s: %s", job.job_id, job.message)
                await self._save(job)
                await self._mark(job, "FAILED", f"quantization failed: {job.message}")
                continue
            if job.state == RUNNING:
                job.message = (f"resumed after a quantizer restart (it had reached layer "
                               f"{job.num_layers_done}/{job.num_layers_total})")
            job.state, job.num_layers_done = QUEUED, 0
            await self._save(job)
            self._queue.put_nowait(job)
            requeued.append(job)
            log.warning("job %s re-queued after a restart (%d earlier attempt(s))", job.job_id,
                        job.num_attempts)
        return requeued

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"unknown job {job_id!r} (finished jobs are kept for the "
                                f"last {MAX_KEPT_JOBS})")
        return job

    def pending_task_names(self) -> set[str]:
        return {t.name for j in self._jobs.values() if j.is_active for t in j.tasks}

    async def wait(self, job_id: str, timeout_s: float) -> Job:
        """Poll until a job is finished (tests, tools)."""
        deadline = time.monotonic() + timeout_s
        job = self.get(job_id)
        while job.is_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return job

    def _remember(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        while len(self._jobs) > MAX_KEPT_JOBS:
            oldest = next((j for j in self._jobs.values() if not j.is_active), None)
            if oldest is None:
                break
            del self._jobs[oldest.job_id]

    async def _save(self, job: Job, must: bool = False) -> None:
        """`must`: a new job that cannot be recorded is not accepted (StartJob fails)."""
        if self._store is None:
            return
        try:
            await self._store.save(job)
        except Exception as exc:  # noqa: BLE001 - Redis down: the job runs; its record lags
            if must:
                raise
            log.error("cannot record job %s (%s) in redis: %s", job.job_id, job.state, exc)

    async def _run_forever(self) -> None:
        while True:
            job = await self._queue.get()
            await self._run(job)

    async def _run(self, job: Job) -> None:
        job.state, job.num_attempts = RUNNING, job.num_attempts + 1
        job.quarantined = {}  # a resumed job is screened again (deterministic, nothing kept)
        await self._save(job)
        started = time.perf_counter()
        try:
            warned = await self._screen_tasks(job)
            if not job.kept_tasks:
                message = ("every task was quarantined by the influence screen; nothing was "
                           f"published (served weights untouched): {_quarantine_text(job)}")
                log.warning("job %s: %s", job.job_id, message)
                await self._finish(job, FAILED, message, "FAILED", message)
                self._finish_metrics(job, "failed")
                return
            version_dir = await self._in_thread(job)
            job.weight_version = await self._publisher.publish(version_dir)
        except Exception as exc:  # noqa: BLE001 - any failure fails the job, never the service
            message = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s", job.job_id, message)
            await self._finish(job, FAILED, message, "FAILED", f"quantization failed: {message}")
            self._finish_metrics(job, "failed")
            return
        message = f"published weight version {job.weight_version} ({version_dir})"
        if job.quarantined:
            message += f"; quarantined (left out): {_quarantine_text(job)}"
        if warned:
            message += f"; influence screen warnings: {'; '.join(warned)}"
        log.info("job %s done in %.1f s: %s", job.job_id, time.perf_counter() - started, message)
        await self._finish(job, DONE, message, "READY",
                           f"quantized into weight version {job.weight_version}")
        self._finish_metrics(job, "done")

    async def _finish(self, job: Job, state: str, message: str, task_state: str,
                      task_message: str) -> None:
        """Record the end in Redis and on the tasks first; GetJob reports it only then, so a
        caller that sees DONE/FAILED also sees the tasks READY/FAILED."""
        final = dataclasses.replace(job, state=state, message=message)
        await self._save(final)
        await self._mark(final, task_state, task_message)
        job.state, job.message = state, message

    async def _screen_tasks(self, job: Job) -> list[str]:
        """Screen the job's tasks; quarantined ones leave the job and stop being served now
        (before quantizing, which may take long). Returns the warnings, one line per task."""
        if self._screen is None:
            return []
        reports = await _in_daemon_thread(f"screen-{job.job_id}", lambda: self._screen(job))
        warned = []
        for name, report in reports.items():
            if self._metrics is not None:
                self._metrics.adapter_screenings.labels(report.verdict.value).inc()
            if report.should_quarantine:
                job.quarantined[name] = report.summary()
                log.warning("job %s: task %s quarantined: %s", job.job_id, name, report.summary())
            elif report.verdict is Verdict.WARN:
                warned.append(f"{name}: {report.reason}")
        if job.quarantined:
            await self._save(job)
            for name, summary in job.quarantined.items():
                await self._set_state(name, "QUARANTINED", summary, job.job_id)
        return warned

    async def _in_thread(self, job: Job) -> Path:
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            job.num_layers_done, job.num_layers_total = done, total
            if self._metrics is not None:
                self._metrics.set_quantization_progress(job.job_id, min(1.0, done / max(total, 1)))
            if self._store is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._save_progress(job), loop)
                except RuntimeError:  # the loop is gone: the service is stopping
                    pass

        return await _in_daemon_thread(f"quantize-{job.job_id}",
                                       lambda: self._quantize(job, progress))

    async def _save_progress(self, job: Job) -> None:
        try:
            await self._store.save_progress(job)
        except Exception as exc:  # noqa: BLE001 - progress is advisory
            log.warning("cannot record progress of job %s: %s", job.job_id, exc)

    async def _mark(self, job: Job, state: str, message: str) -> None:
        """Set the state of the job's kept tasks (quarantined ones stay QUARANTINED)."""
        for spec in job.kept_tasks:
            await self._set_state(spec.name, state, message, job.job_id)

    async def _set_state(self, name: str, state: str, message: str, job_id: str) -> None:
        try:
            await self._registry.update(name, state=state, message=message)
        except NotFoundError:  # removed while quantizing: nothing to mark
            log.info("task %s was removed during job %s", name, job_id)
        except Exception as exc:  # noqa: BLE001 - Redis down: the job's own state still tells
            log.error("cannot mark task %s %s: %s", name, state, exc)

    def _finish_metrics(self, job: Job, state: str) -> None:
        if self._metrics is not None:
            self._metrics.finish_quantization(job.job_id, state)


def _quarantine_text(job: Job) -> str:
    return "; ".join(f"{name} ({summary})" for name, summary in job.quarantined.items())


async def _in_daemon_thread(name: str, call: Callable[[], T]) -> T:
    """`call()` in a daemon thread: a stopping service does not wait for it (module doc)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        result, error = None, None
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop as the job's error
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the service stopped meanwhile: nobody waits for this job
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
