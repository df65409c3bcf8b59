"""Discrete-event replay of a trace through a real scheduling policy with modelled step times."""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus
from services.engine.simulator.adapter_store import AdapterStoreConfig, AdapterStoreSim
from services.engine.simulator.cost_model import CostModel, StepFeatures
from services.engine.simulator.metrics import RequestRecord, StepRecord, summarize
from services.engine.simulator.trace import TraceRequest

# A policy class (or any callable with its signature): (config, block_manager, clock) -> Scheduler.
SchedulerFactory = Callable[..., Scheduler]


@dataclass(frozen=True)
class SimConfig:
    """The simulated engine: its KV cache and the request length cap."""

    num_kv_blocks: int = 2048
    block_size: int = 16
    max_tokens: int = 2048           # every request's max_tokens; its true length ends it earlier (EOS)
    slo_scale: float = 5.0           # SLO: JCT <= slo_scale x latency served alone
    # Adapter slot loads and host packs on the clock (None: their cost is only what the fitted
    # cost model's per-adapter term absorbed, which misses them once tasks outnumber the slots)
    adapter_store: AdapterStoreConfig | None = None
    # Clients that give up: every request is cancelled this many seconds after its arrival unless it
    # finished (as the gateway cancels at a client's gRPC deadline; the work spent on it is lost).
    # 0: clients wait forever. deadline_to_policy: the policy is told each deadline (Sequence.deadline_s),
    # as the engine is; False replays the same cancellations with a policy that does not know them.
    client_timeout_s: float = 0.0
    deadline_to_policy: bool = True

    def __post_init__(self) -> None:
        if self.num_kv_blocks <= 0 or self.block_size <= 0 or self.max_tokens <= 0:
            raise ValueError("num_kv_blocks, block_size and max_tokens must be > 0")
        if self.client_timeout_s < 0:
            raise ValueError(f"client_timeout_s must be >= 0 (0: no timeout), got {self.client_timeout_s}")


@dataclass
class SimResult:
    requests: list[RequestRecord]
    steps: list[StepRecord]
    metrics: dict = field(default_factory=dict)
    # client_timeout_s: requests cancelled at their deadline, as (request_id, output tokens computed for them)
    cancelled: list[tuple[str, int]] = field(default_factory=list)


def step_features(out: SchedulerOutput) -> StepFeatures:
    return StepFeatures(
        num_prefill_tokens=sum(s.num_new_tokens for s in out.prefill),
        num_decode_seqs=len(out.decode),
        num_adapters=len({s.task for s in out.seqs if s.task}),
        num_kv_tokens_read=sum(s.num_tokens for s in out.seqs),
    )


def solo_latency_s(cost: CostModel, req: TraceRequest) -> float:
    """Latency of req served alone: one prefill step, then output_tokens − 1 decode steps."""
    num_adapters = 1 if req.task else 0
    prefill = cost.step_time_s(StepFeatures(req.prompt_tokens, 0, num_adapters, req.prompt_tokens))
    n = req.output_tokens - 1
    # Decode step i (1..n) reads prompt + i cached tokens.
    kv_read = n * req.prompt_tokens + n * (n + 1) // 2
    decode = n * (cost.a_s + cost.c_s_per_decode_seq + cost.d_s_per_adapter * num_adapters)
    return prefill + decode + cost.e_s_per_kv_token * kv_read


class Simulator:
    """Drives an unmodified policy class on a virtual clock.

    Each step: admit arrivals up to now, `schedule()`, advance the clock by
    the cost model's time for that batch, `update()` with dummy tokens, and
    finish every sequence that reached its trace output length (the real
    engine would see EOS there). Nothing sleeps, so thousands of requests
    replay in seconds.
    """

    def __init__(self, factory: SchedulerFactory, sched_config: SchedulerConfig,
                 cost: CostModel, sim_config: SimConfig = SimConfig()) -> None:
        self.factory = factory
        self.sched_config = sched_config
        self.cost = cost
        self.sim_config = sim_config
        self._now_s = 0.0

    def _clock(self) -> float:
        return self._now_s

    def _validate(self, requests: list[TraceRequest]) -> None:
        cfg = self.sim_config
        capacity = cfg.num_kv_blocks * cfg.block_size
        for req in requests:
            if req.output_tokens > cfg.max_tokens:
                raise ValueError(f"{req.request_id}: output_tokens {req.output_tokens} > max_tokens {cfg.max_tokens}")
            if req.prompt_tokens + req.output_tokens > capacity:
                raise ValueError(f"{req.request_id}: {req.prompt_tokens}+{req.output_tokens} tokens "
                                 f"exceed the KV cache ({capacity} tokens); it could never finish")

    def run(self, requests: list[TraceRequest]) -> SimResult:
        self._validate(requests)
        requests = sorted(requests, key=lambda r: r.arrival_s)
        cfg = self.sim_config
        self._now_s = 0.0
        bm = BlockManager(cfg.num_kv_blocks, cfg.block_size)
        sched = self.factory(self.sched_config, bm, clock=self._clock)
        params = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True)
        target: dict[int, TraceRequest] = {}
        records: list[RequestRecord] = []
        steps: list[StepRecord] = []
        num_added = 0
        store = AdapterStoreSim(cfg.adapter_store) if cfg.adapter_store else None
        self.adapter_store = store
        timeouts: list[tuple[float, int, Sequence]] = []     # (deadline, seq_no, seq): client_timeout_s
        cancelled: list[tuple[str, int]] = []
        while num_added < len(requests) or sched.has_unfinished:
            while num_added < len(requests) and requests[num_added].arrival_s <= self._now_s:
                req = requests[num_added]
                seq = Sequence(request_id=req.request_id, prompt_token_ids=[0] * req.prompt_tokens,
                               params=params, task=req.task,
                               predicted_output_tokens=req.predicted_output_tokens,
                               arrival_s=req.arrival_s, priority_weight=req.priority_weight)
                if cfg.client_timeout_s:
                    deadline = req.arrival_s + cfg.client_timeout_s
                    seq.deadline_s = deadline if cfg.deadline_to_policy else None
                    heapq.heappush(timeouts, (deadline, seq.seq_no, seq))
                target[id(seq)] = req
                sched.add(seq)
                num_added += 1
            while timeouts and timeouts[0][0] <= self._now_s:    # the clients that gave up by now
                _, _, seq = heapq.heappop(timeouts)
                if seq.status is not SequenceStatus.FINISHED:
                    sched.abort(seq.request_id)
                    cancelled.append((seq.request_id, seq.num_output_tokens))
            if not (num_added < len(requests) or sched.has_unfinished):
                break
            out = sched.schedule() if sched.has_unfinished else SchedulerOutput()
            if out.is_empty:   # idle until the next arrival or client timeout (a policy may hold late requests)
                events = ([requests[num_added].arrival_s] if num_added < len(requests) else []) + \
                         ([timeouts[0][0]] if timeouts else [])
                if not events:
                    raise RuntimeError(f"policy {sched.name!r} scheduled nothing with "
                                       f"{len(sched.waiting)} waiting, {len(sched.running)} running")
                self._now_s = max(self._now_s, min(events))
                continue
            feats = step_features(out)
            dt = self.cost.step_time_s(feats)
            if store is not None:
                loads_s = store.step(self._now_s, {s.task for s in out.seqs if s.task})
                if cfg.adapter_store.prefetch:
                    store.prefetch(self._now_s + loads_s, sched.upcoming_tasks(cfg.adapter_store.prefetch))
                dt += loads_s
            self._now_s += dt
            steps.append(StepRecord(feats.num_prefill_tokens, feats.num_decode_seqs,
                                    feats.num_adapters, feats.num_kv_tokens_read, dt))
            sched.update(out, [0] * len(out.seqs))
            for seq in out.seqs:
                req = target[id(seq)]
                if seq.num_output_tokens >= req.output_tokens:
                    sched.finish(seq)
                    if cfg.client_timeout_s and self._now_s > req.arrival_s + cfg.client_timeout_s:
                        cancelled.append((seq.request_id, seq.num_output_tokens))   # its client left mid-step
                        continue
                    records.append(RequestRecord(
                        request_id=req.request_id, task=req.task, arrival_s=req.arrival_s,
                        first_token_s=seq.first_token_s, finished_s=self._now_s,
                        num_prompt_tokens=req.prompt_tokens, num_output_tokens=seq.num_output_tokens,
                        num_preemptions=seq.num_preemptions,
                        solo_latency_s=solo_latency_s(self.cost, req)))
        metrics = summarize(records, steps, cfg.slo_scale) if records else {"num_requests": 0}
        return SimResult(records, steps, metrics, cancelled)
