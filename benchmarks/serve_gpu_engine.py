"""bench_serve_gpu's engine side: load a runner (under an emulated memory cap), build engines around
it, replay a trace and summarize it, time the runner on a grid of synthetic batches."""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import engine_replay
from services.engine.simulator.metrics import summarize
from services.engine.simulator.trace import TraceRequest


def load_runner(base_cfg):
    import torch

    from services.engine.model_runner import ModelRunner
    t0 = time.perf_counter()
    runner = ModelRunner.load(base_cfg)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return runner, time.perf_counter() - t0


def set_memory_cap(gib: float, device: str) -> None:
    """Emulate a card with `gib` of memory: the caching allocator refuses anything past it (an
    out-of-memory error, not a silent overrun), for both bases alike."""
    import torch
    if not device.startswith("cuda"):
        return
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise SystemExit(f"--gpu-gib {gib} exceeds the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)


def make_engine(runner, base_cfg, policy: str, beta: int, **overrides):
    """A fresh LLMEngine around the loaded runner; overrides: other EngineConfig fields (policy knobs)."""
    from services.engine.llm_engine import LLMEngine
    cfg = dataclasses.replace(base_cfg, policy=policy, max_adapters_per_batch=beta, **overrides)
    return LLMEngine(cfg, runner=runner, load_tokenizer=False)


def replay_full(engine, trace: list[TraceRequest], max_tokens: int, deadline_s: float, seed: int,
                **timeouts) -> engine_replay.ReplayResult:
    """engine_replay.replay with random prompt ids of each request's length (random weights: the
    ids only set the prompt length); timeouts: its client_timeout_s / deadline_to_policy."""
    import numpy as np
    rng = np.random.default_rng(seed)
    vocab = engine.runner.shape.vocab_size
    prompts = {r.request_id: rng.integers(100, vocab, r.prompt_tokens).tolist() for r in trace}
    return engine_replay.replay(engine, trace, prompts, max_tokens, deadline_s, **timeouts)


def replay(engine, trace: list[TraceRequest], max_tokens: int, deadline_s: float, seed: int):
    """replay_full's (records, steps, #unfinished, wall s)."""
    result = replay_full(engine, trace, max_tokens, deadline_s, seed)
    return result.records, result.steps, result.num_unfinished, result.wall_s


def measure(engine, trace, solo_s, args, label: str, deadline_s: float, client_timeout_s: float = 0.0,
            deadline_to_policy: bool = True, **extra) -> tuple[dict, list]:
    """One replay → one result row (summarize + unfinished-aware SLO), and its step rows.

    solo_s(TraceRequest) -> seconds: the request's latency served alone (the SLO reference).
    client_timeout_s > 0: clients give up that long after arrival (engine_replay.replay); the row
    then also has goodput (finished / all), the cancelled count and the share of computed output
    tokens they took (wasted)."""
    result = replay_full(engine, trace, args.max_tokens, deadline_s, args.seed, client_timeout_s=client_timeout_s,
                         deadline_to_policy=deadline_to_policy)
    records, steps, unfinished, wall = result.records, result.steps, result.num_unfinished, result.wall_s
    by_id = {r.request_id: r for r in trace}
    records = [dataclasses.replace(r, solo_latency_s=solo_s(by_id[r.request_id])) for r in records]
    if records:
        m = summarize(records, steps, args.slo_scale)
        met = sum(r.jct_s <= args.slo_scale * r.solo_latency_s for r in records)
        m["slo_attainment_all"] = met / len(trace)       # unfinished requests count as missed
        # every request's JCT, an unfinished one up to the cut-off: a lower bound that, unlike the
        # finished-only mean, does not improve when a policy leaves requests unfinished
        done = {r.request_id for r in records}
        cut = sum(max(0.0, deadline_s - t.arrival_s) for t in trace if t.request_id not in done)
        m["jct_avg_all_s"] = (sum(r.jct_s for r in records) + cut) / len(trace)
    else:
        m = {"num_requests": 0, "slo_attainment_all": 0.0}
    m.update(variant=label, num_trace_requests=len(trace), num_unfinished=unfinished, replay_wall_s=wall,
             offered_rate_req_s=len(trace) / max(1e-9, trace[-1].arrival_s) if trace else 0.0, **extra)
    if client_timeout_s:
        lost = sum(n for _, n in result.cancelled)
        m.update(client_timeout_s=client_timeout_s, deadline_to_policy=deadline_to_policy,
                 goodput=len(records) / len(trace), num_cancelled=len(result.cancelled),
                 wasted=lost / max(1, lost + sum(r.num_output_tokens for r in records)))
    if steps:   # the policy's CPU time per step: part of every step on the real engine, absent from the cost model
        m["schedule_ms_avg"] = 1e3 * statistics.fmean(st.schedule_s for st in steps)
        m["schedule_share"] = sum(st.schedule_s for st in steps) / max(1e-9, sum(st.step_s for st in steps))
    m["_jct"] = sorted(r.jct_s for r in records)
    m["_records"] = records
    print(f"  {label:40s} thr {m.get('throughput_req_s', 0):7.2f} req/s {m.get('throughput_tok_s', 0):8.0f} tok/s"
          f" | lat {m.get('latency_avg_s_per_token', float('nan')) * 1e3:7.1f} ms/tok"
          f" | JCT {m.get('jct_avg_s', float('nan')):6.2f} p99 {m.get('jct_p99_s', float('nan')):6.2f} s"
          f" | TTFT {m.get('ttft_avg_s', float('nan')):5.2f} s | SLO {m['slo_attainment_all']:.3f}"
          f" | tasks/step {m.get('adapters_per_step_avg', float('nan')):.2f} | unfinished {unfinished}"
          f" | sched {m.get('schedule_ms_avg', float('nan')):.2f} ms/step | {wall:.1f}s", flush=True)
    step_rows = [dict(dataclasses.asdict(s), run=label) for s in steps]
    return m, step_rows


# ---- calibration --------------------------------------------------------------------------
def runner_grid(runner, tasks: list[str], reps: int) -> list[dict]:
    """Time runner.run on synthetic batches (decode at every graph bucket, prefills); doubles as
    warm-up: GEMM tuning and CUDA-graph capture happen here, not inside a timed replay."""
    import torch

    from services.engine.block_manager import BlockManager
    from services.engine.sequence import SamplingParams, Sequence
    cuda = runner.device.type == "cuda"
    sizes = runner.graphs.sizes if runner.graphs is not None else [1, 2, 4, 8, 16, 32, 64, 128]
    sizes = [s for s in sizes if s <= runner.config.max_num_seqs]
    bm = BlockManager(runner.num_kv_blocks, runner.block_size)
    rows = []

    def timed(seqs) -> float:
        runner.run(seqs)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.run(seqs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def batch(n: int, tokens: int, n_adapters: int, decode: bool) -> list:
        seqs = []
        for i in range(n):
            task = tasks[i % min(n_adapters, len(tasks))] if n_adapters else ""
            s = Sequence(f"grid{i}", [(7 * i + j) % 900 + 3 for j in range(tokens)], SamplingParams(), task=task)
            bm.allocate(s)
            s.num_cached_tokens = tokens - 1 if decode else 0
            seqs.append(s)
        return seqs

    # Every replayed request has an adapter, so decode graphs are warmed with LoRA only; prefills
    # cover every GEMM tuning bucket (powers of two) up to the step token budget.
    configs = [(b, ctx, a, True) for b in sizes for a in sorted({1, min(b, 10)}) for ctx in (64, 320)]
    budget = runner.config.max_num_batched_tokens
    prefill_sizes = [1 << k for k in range(3, 13) if 1 << k <= budget]
    configs += [(max(1, n // 64), min(n, 64), a, False) for n in prefill_sizes for a in (1, 4)]
    # a small cache (--gpu-gib) cannot hold the longest contexts at the largest batches: skip those
    configs = [c for c in configs if c[0] * -(-c[1] // runner.block_size) <= runner.num_kv_blocks]
    t_grid = time.perf_counter()
    for n, tokens, n_adapters, decode in configs:
        seqs = batch(n, tokens, n_adapters, decode)
        t0 = time.perf_counter()
        step_s = timed(seqs)
        took = time.perf_counter() - t0
        if took > 1.0:   # tuning / compiling / capturing: where warm-up time goes
            print(f"    grid {'decode' if decode else 'prefill'} {n}x{tokens} tok, {n_adapters} adapters: "
                  f"{took:.1f} s (step {step_s * 1e3:.1f} ms; {time.perf_counter() - t_grid:.0f} s in grid)",
                  flush=True)
        rows.append({"num_prefill_tokens": 0 if decode else n * tokens, "num_decode_seqs": n if decode else 0,
                     "num_adapters": len({s.task for s in seqs if s.task}),
                     "num_kv_tokens_read": n * tokens, "step_s": step_s})
        for s in seqs:
            bm.free(s)
            runner.sampler.release(s.request_id)
    return rows


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
