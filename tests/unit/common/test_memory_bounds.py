"""Per-task metric series are dropped with their task; malloc_trim is callable (glibc here)."""
from __future__ import annotations

from services.common.memory import MallocTrimmer
from services.common.metrics import create_metrics


def test_forget_task_drops_every_series_of_the_task():
    metrics = create_metrics()
    for task in ("gone", "kept"):
        metrics.observe_finished(task, "eos", 3, 4, 0.1, 0.5)
        metrics.observe_finished(task, "length", 3, 4, 0.1, 0.5)
        metrics.add_generated_tokens(task, 3)
    metrics.set_queue_depths({"gone": 2, "kept": 1})
    metrics.forget_task("gone")
    metrics.forget_task("never-seen")  # unknown tasks are fine
    text = metrics.render().decode()
    assert 'task="gone"' not in text
    assert text.count('task="kept"') > 10
    metrics.observe_finished("gone", "eos", 1, 1, None, 0.1)  # a re-added task starts afresh
    assert 'inlaid_requests_total{finish_reason="eos",task="gone"} 1.0' in metrics.render().decode()


def test_process_memory_is_exported():
    assert "process_resident_memory_bytes" in create_metrics().render().decode()


def test_malloc_trim_runs():
    trimmer = MallocTrimmer()
    assert trimmer.is_available  # the project's images and this machine use glibc
    blocks = [bytearray(1 << 16) for _ in range(256)]
    del blocks
    assert trimmer.trim() in (True, False)
