"""Per-task running statistics of finished requests' output lengths (online, windowed)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


def _quantile(sorted_values: list[int], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


@dataclass(frozen=True)
class TaskSummary:
    """Snapshot of one task's recent output lengths."""

    count: int
    median: float
    mean: float
    # Spread of log-lengths, (log q75 - log q25) / 1.349: a robust sigma.
    log_sigma: float

    @property
    def confidence(self) -> float:
        """Grows with evidence, shrinks with spread; in [0, 1)."""
        return (self.count / (self.count + 4.0)) * math.exp(-self.log_sigma)


@dataclass
class _Window:
    lengths: deque[int]
    total_seen: int = 0
    summary: TaskSummary | None = None  # cached; None when stale


@dataclass
class RunningStats:
    """Recent output lengths per task, most recent `window` kept.

    Also keeps, per task, recent model predictions so a blend can correct a
    model's per-task bias (the statistics know the level, the model the ranking).
    """

    window: int = 512
    # Bound on tracked tasks: reports name tasks freely, memory must not grow without end.
    max_tasks: int = 100_000
    _tasks: dict[str, _Window] = field(default_factory=dict)
    _predicted: dict[str, deque[float]] = field(default_factory=dict)
    _global_median: float | None = None
    _global_stale: bool = True

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def _get(self, task: str) -> _Window:
        win = self._tasks.get(task)
        if win is None:
            if len(self._tasks) >= self.max_tasks:
                # Forget the task first seen longest ago (dicts keep insertion order).
                oldest = next(iter(self._tasks))
                del self._tasks[oldest]
                self._predicted.pop(oldest, None)
            win = _Window(deque(maxlen=self.window))
            self._tasks[task] = win
        return win

    def observe(self, task: str, output_tokens: int) -> None:
        """Record one finished request's true output length (negative lengths are rejected)."""
        if output_tokens < 0:
            raise ValueError(f"output_tokens must be >= 0, got {output_tokens}")
        win = self._get(task)
        win.lengths.append(int(output_tokens))
        win.total_seen += 1
        win.summary = None
        self._global_stale = True

    def replace(self, task: str, lengths: list[int]) -> None:
        """Replace a task's window (e.g. with the shared list read from Redis, newest last)."""
        win = self._get(task)
        win.lengths.clear()
        win.lengths.extend(max(0, int(n)) for n in lengths[-self.window:])
        win.summary = None
        self._global_stale = True

    def summary(self, task: str) -> TaskSummary | None:
        """Median, mean and spread of the task's window; None when nothing was reported."""
        win = self._tasks.get(task)
        if win is None or not win.lengths:
            return None
        if win.summary is None:
            values = sorted(win.lengths)
            logs_q25 = math.log1p(_quantile(values, 0.25))
            logs_q75 = math.log1p(_quantile(values, 0.75))
            win.summary = TaskSummary(
                count=len(values),
                median=_quantile(values, 0.5),
                mean=sum(values) / len(values),
                log_sigma=(logs_q75 - logs_q25) / 1.349,
            )
        return win.summary

    def global_median(self) -> float | None:
        """Median over every task's window, or None when nothing was reported."""
        if self._global_stale:
            values = sorted(n for win in self._tasks.values() for n in win.lengths)
            self._global_median = _quantile(values, 0.5) if values else None
            self._global_stale = False
        return self._global_median

    def tasks(self) -> list[str]:
        """Tasks with at least one report."""
        return [t for t, w in self._tasks.items() if w.lengths]

    def observe_prediction(self, task: str, log_tokens: float) -> None:
        """Record a model prediction (log1p tokens) made for the task."""
        preds = self._predicted.get(task)
        if preds is None:
            preds = deque(maxlen=self.window)
            self._predicted[task] = preds
        preds.append(float(log_tokens))

    def log_bias(self, task: str) -> float | None:
        """log1p(median true length) - median model prediction; None without both."""
        summary = self.summary(task)
        preds = self._predicted.get(task)
        if summary is None or not preds:
            return None
        return math.log1p(summary.median) - _quantile(sorted(preds), 0.5)
