"""Sequence: one request's state inside the engine (no torch)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not prefilled, or preempted and waiting to recompute
    RUNNING = "running"      # KV cache resident, decoding
    FINISHED = "finished"


class FinishReason(enum.IntEnum):
    """Mirrors inlaid.v1.FinishReason so values cross the proto boundary unchanged."""

    NONE = 0
    EOS = 1
    LENGTH = 2
    STOP = 3
    CANCELLED = 4
    ERROR = 5


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request (validated by the gateway and again here)."""

    max_tokens: int = 64
    temperature: float = 0.0          # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 → disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler and the model runner see it.

    `token_ids` holds prompt + generated tokens; the first `num_cached_tokens`
    of them already have KV entries in the blocks of `block_table`. The runner
    computes tokens [num_cached_tokens:], so prefill, recompute after
    preemption and decode are one code path.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    task: str = ""                              # adapter name; "" = bare base model
    predicted_output_tokens: int | None = None  # from the predictor; None = unknown
    arrival_s: float = field(default_factory=time.monotonic)
    priority_weight: float = 1.0                # per-task weight for fair queueing
    deadline_s: float | None = None             # the client's deadline (time.monotonic); None = none
    seq_no: int = field(default_factory=lambda: next(_seq_counter))  # FIFO tiebreak

    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: FinishReason = FinishReason.NONE
    num_preemptions: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    # Scheduler-private bookkeeping (policy state such as MLFQ level or WFQ tags).
    sched_state: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens the runner must compute in this sequence's next step."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def predicted_remaining_tokens(self) -> int:
        """SRTF key: predicted minus generated, never below 1 (outrunning a prediction keeps it short)."""
        predicted = self.predicted_output_tokens
        if predicted is None:
            predicted = self.params.max_tokens
        predicted = min(predicted, self.params.max_tokens)
        return max(1, predicted - self.num_output_tokens)

    def waited_s(self, now_s: float) -> float:
        return now_s - self.arrival_s
