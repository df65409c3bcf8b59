"""Real-time replay of a request trace against an LLMEngine (shared by bench_serve and bench_serve_gpu)."""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

from services.engine.sequence import SamplingParams
from services.engine.simulator.metrics import RequestRecord, StepRecord
from services.engine.simulator.simulator import step_features
from services.engine.simulator.trace import TraceRequest


class StepRecorder:
    """Wraps a scheduler's schedule() to keep the last SchedulerOutput (the engine does not return it)
    and its StepFeatures, taken at schedule time: after the step, update() has marked the computed
    tokens cached, so a prefill would look like a single new token."""

    def __init__(self, scheduler) -> None:
        self.last = None
        self.features = None
        self.schedule_s = 0.0    # wall time of the last schedule() call: the policy's CPU cost
        self._schedule = scheduler.schedule
        scheduler.schedule = self

    def __call__(self):
        t0 = time.perf_counter()
        self.last = self._schedule()
        self.schedule_s = time.perf_counter() - t0
        self.features = step_features(self.last)
        return self.last


@dataclass
class ReplayResult:
    """What one replay measured: finished requests, executed steps (engine.step wall), the rest."""

    records: list[RequestRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    num_unfinished: int = 0
    wall_s: float = 0.0
    # client_timeout_s: requests cancelled at arrival + timeout, as (request_id, output tokens computed)
    cancelled: list[tuple[str, int]] = field(default_factory=list)


def replay(engine, trace: list[TraceRequest], prompts: dict[str, list[int]], max_tokens: int,
           deadline_s: float = math.inf, client_timeout_s: float = 0.0,
           deadline_to_policy: bool = True) -> ReplayResult:
    """Add each request at its arrival time and step the engine until every request is done.

    Output lengths come from the trace: EOS is ignored and a request is aborted when it reaches
    its trace length, so max_tokens stays a loose cap and leaks nothing to the policies' length
    predictions. At `deadline_s` (seconds from the start) the replay stops and aborts what is open.
    client_timeout_s > 0: each client gives up that long after its request arrived, and the request
    is aborted there as the gateway cancels it (ReplayResult.cancelled); the engine is told each
    deadline (add_request's deadline_s) unless deadline_to_policy is False.
    """
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    recorder = StepRecorder(engine.scheduler)
    by_id = {r.request_id: r for r in trace}
    first_token_s: dict[str, float] = {}
    preemptions: dict[str, int] = {}
    open_ids: set[str] = set()
    computed: dict[str, int] = {}          # output tokens so far per open request
    timeouts: collections.deque[tuple[float, str]] = collections.deque()  # (replay time its client gives up, id)
    result = ReplayResult()
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(trace) or engine.has_unfinished:
        now = time.perf_counter() - t0
        if now > deadline_s:
            break
        while nxt < len(trace) and trace[nxt].arrival_s <= now:
            req = trace[nxt]
            client_deadline = None
            if client_timeout_s:
                timeouts.append((req.arrival_s + client_timeout_s, req.request_id))
                if deadline_to_policy:   # on the engine's clock (time.monotonic)
                    client_deadline = time.monotonic() + req.arrival_s + client_timeout_s - now
            engine.add_request(req.request_id, prompts[req.request_id], params, task=req.task,
                               predicted_output_tokens=req.predicted_output_tokens, deadline_s=client_deadline)
            open_ids.add(req.request_id)
            nxt += 1
        while timeouts and timeouts[0][0] <= now:   # the clients that gave up by now
            _, rid = timeouts.popleft()
            if rid in open_ids:
                engine.abort(rid)
                open_ids.discard(rid)
                result.cancelled.append((rid, computed.pop(rid, 0)))
        if not engine.has_unfinished:
            if nxt == len(trace):       # the last open requests were just cancelled
                break
            time.sleep(max(0.0, min(trace[nxt].arrival_s, deadline_s) - (time.perf_counter() - t0)))
            continue
        t_step = time.perf_counter()
        outputs = engine.step()
        done_s = time.perf_counter()
        out = recorder.last
        if out is not None and not out.is_empty:
            f = recorder.features
            result.steps.append(StepRecord(f.num_prefill_tokens, f.num_decode_seqs, f.num_adapters,
                                           f.num_kv_tokens_read, done_s - t_step, recorder.schedule_s))
            for seq in out.preempted:
                preemptions[seq.request_id] = preemptions.get(seq.request_id, 0) + 1
        for o in outputs:
            rid = o.request_id
            if rid not in open_ids:
                continue
            first_token_s.setdefault(rid, done_s - t0)
            computed[rid] = o.num_output_tokens
            req = by_id[rid]
            if o.num_output_tokens >= req.output_tokens or o.is_finished:
                if not o.is_finished:
                    engine.abort(rid)      # its trace length reached: this replay's "EOS"
                open_ids.discard(rid)
                if client_timeout_s and done_s - t0 > req.arrival_s + client_timeout_s:
                    result.cancelled.append((rid, computed.pop(rid)))   # its client left during the step
                    continue
                computed.pop(rid, None)
                result.records.append(RequestRecord(
                    rid, req.task, req.arrival_s, first_token_s[rid], done_s - t0,
                    req.prompt_tokens, o.num_output_tokens, preemptions.get(rid, 0)))
    result.wall_s = time.perf_counter() - t0
    for rid in open_ids:
        engine.abort(rid)
    result.num_unfinished = len(trace) - len(result.records)
    return result
