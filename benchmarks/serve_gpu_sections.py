"""bench_serve_gpu's repeat-trace, task-scaling, wfq-hog and fp16-base sections (a mixin of its Bench class).

Each section reads the run's state from Bench (args, runner, capacity, cost model, traces' task
names) and appends its rows to `self.data`; Bench.section() runs them under the time budget.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time

from serve_gpu_engine import runner_grid
from serve_gpu_fit import scale_variant, scheduler_overrides, step_stats
from serve_gpu_workload import family_of, make_trace, trace_rate
from services.engine.policies import POLICIES
from services.engine.simulator.metrics import summarize
from services.engine.simulator.simulator import Simulator


# sec_timeouts' replays: (label, policy, the engine is told each client's deadline)
TIMEOUT_ARMS = (("inlaid, told the deadlines", "inlaid", True), ("inlaid, not told", "inlaid", False),
                ("fifo", "fifo", True))


class ExtraSections:
    """Sections beyond calibration, the policy comparison and the ablations."""

    def sec_scale(self) -> None:
        a = self.args
        real, sim = [], []
        self.data["scale"] = {"real": real, "sim": sim, "slot_load": self.time_slot_loads()}
        rate = a.scale_frac * self.capacity
        for count in a.scale_tasks:
            tasks = self.names[:count]
            trace = make_trace(tasks, self.lengths, rate, a.scale_s, a.seed + 20, zipf_a=a.zipf_a,
                               pred_sigma=a.pred_sigma, prefix=f"s{count}-", pooled=True)
            for name in a.scale_policies:
                policy, overrides, desc = scale_variant(name)
                loads = self.runner.lora.num_loads
                m = self.run_replay((policy, a.beta), trace, f"{desc}, {count} tasks", a.scale_s, overrides,
                                    num_tasks=count, rate_req_s=rate)
                m["policy"] = name           # the variant (the engine policy is in `engine_policy`)
                m["engine_policy"] = policy
                m["adapter_loads"] = self.runner.lora.num_loads - loads
                m.pop("_jct")
                real.append(m)
                self.data["scale"]["step_stats"] = [step_stats(self.all_steps, r["variant"]) for r in real]
                self.save()
        # The simulator with the fitted cost model: longer traces, same rate and task counts.
        sched = self.base_cfg.scheduler_config()
        sim_cfg = self.sim_config()
        for count in a.scale_tasks:
            trace = make_trace(self.names[:count], self.lengths, rate, a.sim_s, a.seed + 20,
                               zipf_a=a.zipf_a, pred_sigma=a.pred_sigma, prefix=f"sim{count}-", pooled=True)
            for name in dict.fromkeys((*a.scale_policies, "fifo")):
                policy, overrides, desc = scale_variant(name)
                if scheduler_overrides(sched, overrides) != overrides:   # e.g. lora_prefetch: the sim would
                    print(f"  sim {name}: skipped (engine-only settings; see sim_adapter_store.py)", flush=True)
                    continue                                                # replay plain inlaid again
                t0 = time.perf_counter()
                res = Simulator(POLICIES[policy], dataclasses.replace(sched, **scheduler_overrides(sched, overrides)),
                                self.cost, sim_cfg).run(trace)
                sim.append(dict(res.metrics, variant=f"{desc}, {count} tasks (sim)", policy=name,
                                num_tasks=count, rate_req_s=rate, sim_wall_s=time.perf_counter() - t0))
                print(f"  sim {name:10s} {count:5d} tasks thr {res.metrics['throughput_req_s']:.2f} req/s "
                      f"JCT {res.metrics['jct_avg_s']:.2f} s", flush=True)

    def time_slot_loads(self, n: int = 16) -> dict:
        """One adapter slot load (LoraManager.acquire of a packed, non-resident adapter): host
        time of the call, and time until the device copy has finished."""
        import torch
        lora, cuda = self.runner.lora, self.runner.device.type == "cuda"
        names = [x for x in lora.packed_names if x not in lora.loaded_names][:n]
        host, done = [], []
        for name in names:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lora.acquire({name})
            host.append(time.perf_counter() - t0)
            if cuda:
                torch.cuda.synchronize()
            done.append(time.perf_counter() - t0)
        row = {"num_timed": len(names), "slot_bytes": lora.slot_bytes, "num_packed": len(lora.packed_names),
               "host_ms_median": 1e3 * statistics.median(host) if host else None,
               "done_ms_median": 1e3 * statistics.median(done) if done else None}
        print(f"  slot load: {row}", flush=True)
        return row

    def sec_wfq(self) -> None:
        a = self.args
        rows = []
        self.data["wfq_hog"] = rows
        tasks = self.names[:10]
        means = {t: statistics.fmean(o for _, o in self.lengths[family_of(t)]) for t in tasks}
        hog = sorted(tasks, key=means.get)[len(tasks) // 2]      # a middle-length task
        weights = [10.0 if t == hog else 1.0 for t in tasks]
        rate = a.hog_overload * self.capacity
        trace = make_trace(tasks, self.lengths, rate, a.hog_s, a.seed + 30, weights=weights,
                           pred_sigma=a.pred_sigma, prefix="w")
        no_hog = [r for r in trace if r.task != hog]
        for policy in a.hog_policies:
            with_m = self.run_replay((policy, a.beta), trace, f"{policy}, with hog", a.hog_s)
            base_m = self.run_replay((policy, a.beta), no_hog, f"{policy}, no hog", a.hog_s)
            others_with = [r for r in with_m["_records"] if r.task != hog]
            n_others = len(no_hog)
            row = {"variant": policy, "hog_task": hog, "rate_req_s": rate, "hog_overload": a.hog_overload,
                   "num_requests": len(trace), "num_others": n_others,
                   "others_unfinished_with_hog": n_others - len(others_with),
                   "others_unfinished_no_hog": base_m["num_unfinished"]}
            for key, recs in (("with_hog", others_with), ("no_hog", base_m["_records"])):
                if recs:
                    s = summarize(recs)
                    row[f"others_jct_p99_{key}_s"] = s["jct_p99_s"]
                    row[f"others_latency_p99_{key}_s_per_token"] = s["latency_p99_s_per_token"]
                    row[f"others_ttft_p99_{key}_s"] = s["ttft_p99_s"]
            if "others_jct_p99_with_hog_s" in row and "others_jct_p99_no_hog_s" in row:
                row["others_p99_ratio"] = row["others_jct_p99_with_hog_s"] / row["others_jct_p99_no_hog_s"]
                row["others_latency_p99_ratio"] = (row["others_latency_p99_with_hog_s_per_token"]
                                                   / row["others_latency_p99_no_hog_s_per_token"])
            hog_recs = [r for r in with_m["_records"] if r.task == hog]
            row["hog_finished"] = len(hog_recs)
            row["hog_throughput_tok_s"] = (sum(r.num_output_tokens for r in hog_recs) / with_m["replay_wall_s"]
                                           if hog_recs else 0.0)
            rows.append(row)
            print(f"  hog {policy}: others p99 JCT {row.get('others_jct_p99_no_hog_s', float('nan')):.2f} → "
                  f"{row.get('others_jct_p99_with_hog_s', float('nan')):.2f} s "
                  f"(×{row.get('others_p99_ratio', float('nan')):.2f})", flush=True)
            self.save()

    def sec_timeouts(self) -> None:
        """Clients that give up --client-timeout-s after arrival (their requests aborted there, as the
        gateway cancels them) on the main trace at the highest rate: inlaid told the deadlines (the
        engine's behaviour), inlaid not told (the same aborts) and fifo; goodput and wasted work."""
        a = self.args
        rows = []
        self.data["timeouts"] = rows
        rate, trace = self.rate_at(a.rates[-1]), self.trace_at(a.rates[-1])
        for label, policy, told in TIMEOUT_ARMS:
            m = self.run_replay((policy, a.beta), trace, f"{label}, {a.client_timeout_s:g} s clients", a.replay_s,
                                client_timeout_s=a.client_timeout_s, deadline_to_policy=told, rate_req_s=rate,
                                load_frac=a.rates[-1])
            m["arm"] = label
            rows.append(m)
            self.save()

    def sec_fp16(self) -> None:
        import torch
        a = self.args
        rows = []
        self.data["fp16"] = rows
        self.note_peak(self.runner_label)
        self.runner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        fp16_cfg = dataclasses.replace(self.base_cfg, quant_bits=0, kv_cache_dtype="auto",   # S-LoRA's fp16 cache
                                       kv_v_layout="auto",
                                       dtype="float16" if a.device.startswith("cuda") else a.dtype)
        self.base_cfg = fp16_cfg
        left = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        if left > 2**30:   # under --gpu-gib the fp16 base would run short: say why instead of an OOM
            print(f"  warning: {left / 2**30:.1f} GiB still allocated after freeing the 4-bit runner", flush=True)
        load_s, _ = self.load(fp16_cfg, self.names[:a.num_tasks], "fp16")
        runner_grid(self.runner, self.names[:4], 1)          # warm-up (allocator, kernels)
        if a.warm_burst_s > 0:   # unmeasured, as for the 4-bit base: CUDA-graph captures, kernel compiles
            self.fifo_burst(a.seed + 7, "w16-", a.warm_burst_s)
        self.data["fp16_meta"] = {"load_s": load_s, "num_kv_blocks": self.runner.num_kv_blocks,
                                  "graphs": self.runner.graphs is not None, "fast_path": self.runner.is_fast}
        for k in range(a.trace_repeats):
            trace = self.trace_at(a.rates[-1], k)
            for policy in a.fp16_policies:
                m = self.run_replay((policy, a.beta), trace, f"{policy}, fp16 base", a.replay_s,
                                    rate_req_s=self.rate_at(a.rates[-1], k), load_frac=a.rates[-1], base="fp16",
                                    **self.trace_key(k))
                if k == 0:
                    rows.append(m)
                else:
                    m.pop("_jct")
                    self.data.setdefault("fp16_repeats", []).append(m)
                self.save()

    @staticmethod
    def trace_key(k: int) -> dict:
        """The row field naming a repeat trace (none on the main section's, k = 0)."""
        return {"trace_no": k} if k else {}

    def rate_at(self, frac: float, k: int = 0) -> float:
        """Request rate of trace k at frac × C: frac × C itself, or with --load-unit tokens scaled to
        the trace's task mix (the capacity burst's seed is the reference)."""
        a = self.args
        return trace_rate(frac * self.capacity, a.load_unit, self.tasks, self.lengths, a.seed + 10 + 1000 * k,
                          a.seed + 1, a.zipf_a)

    def trace_at(self, frac: float, k: int = 0) -> list:
        """Trace k at frac × C: k = 0 is the one every section replays at that rate (seed + 10); k >= 1
        are further draws of the same rate, task popularity and length distributions (--trace-repeats)."""
        a = self.args
        prefix = f"m{frac}-" + (f"t{k}-" if k else "")
        return make_trace(self.tasks, self.lengths, self.rate_at(frac, k), a.replay_s, a.seed + 10 + 1000 * k,
                          zipf_a=a.zipf_a, pred_sigma=a.pred_sigma, prefix=prefix)

    def sec_repeat(self) -> None:
        """The highest rate again on --trace-repeats - 1 more traces, each replayed by every
        --repeat-policies policy: one replay per cell is noisy (three drained replays of one command
        gave 1.46-1.93x same-base JCT), so the report shows each trace's ratios and their spread."""
        a = self.args
        rows = []
        self.data["repeats"] = rows
        for k in range(1, a.trace_repeats):
            rate, trace = self.rate_at(a.rates[-1], k), self.trace_at(a.rates[-1], k)
            print(f" trace {k}: {len(trace)} requests at {rate:.1f} req/s", flush=True)
            for policy in a.repeat_policies:
                m = self.run_replay((policy, a.beta), trace, policy, a.replay_s, rate_req_s=rate,
                                    load_frac=a.rates[-1], trace_no=k)
                m.pop("_jct")
                rows.append(m)
                self.save()
