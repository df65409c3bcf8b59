"""Markdown report and plots of bench_serve_gpu.py's JSON (also runnable on its own to redo them).

    python benchmarks/bench_serve_gpu_report.py benchmarks/results/serve_gpu.json
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from serve_gpu_ratios import TARGETS, by as _by, ratios, repeats_md

COLS = [("variant", "policy", ""), ("offered_rate_req_s", "offered req/s", ".1f"),
        ("throughput_req_s", "req/s", ".2f"), ("throughput_tok_s", "tok/s", ".0f"),
        ("latency_avg_s_per_token", "latency avg s/tok", ".4f"), ("latency_p99_s_per_token", "latency p99 s/tok", ".4f"),
        ("jct_avg_s", "JCT avg s", ".2f"), ("jct_p99_s", "JCT p99 s", ".2f"),
        ("jct_avg_all_s", "JCT avg s, all (≥)", ".2f"), ("ttft_avg_s", "TTFT avg s", ".3f"),
        ("ttft_p99_s", "TTFT p99 s", ".2f"), ("slo_attainment_all", "SLO", ".3f"),
        ("adapters_per_step_avg", "tasks/step", ".2f"), ("num_preemptions", "preempt", "d"),
        ("num_unfinished", "unfinished", "d"), ("num_steps", "steps", "d"),
        ("schedule_ms_avg", "policy ms/step", ".2f")]


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if not spec:
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def table(rows: list[dict], cols=COLS) -> str:
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c[0]), c[2]) for c in cols) + " |")
    return "\n".join(lines)


def write_report(data: dict, md_path: Path, png_path: Path | None = None) -> None:
    meta = data.get("meta", {})
    has_plot = png_path is not None and plot(data, png_path)
    md = ["# GPU serving benchmark: inlaid vs fifo (S-LoRA) vs mlfq (FastServe) vs wfq", "",
          f"Device: **{meta.get('device')}**; commit {meta.get('git_commit')}; {meta.get('date_utc')}; "
          f"{meta.get('wall_s', 0):.0f} s wall in one process.", "",
          *([f"Host: {meta['host_cpu']}, {meta.get('host_cores')} cores; a fixed pure-Python loop "
             f"(results_io.python_loop_ms) took {meta['host_python_loop_ms']:.1f} ms. The scheduler and the eager, "
             "launch-bound prefill steps run at the host's speed: compare absolute times across runs only where "
             "this reference agrees.", ""] if "host_python_loop_ms" in meta else []),
          f"Command: `{meta.get('command')}`", "",
          *([f"Decode attention launch settings (kernels/attention.py): {_launch_text(meta['decode_launch'])}; "
             f"V cache layout of the quantized base: {meta.get('kv_v_layout', 'key')}.", ""]
            if meta.get("decode_launch") else []),
          f"Model: {meta.get('model')}, base quantized to {meta.get('quant_bits')} bits (RTN, g128) at load; "
          f"loaded once ({meta.get('load_s', 0):.1f} s), each replay builds a fresh LLMEngine (policy, β) "
          f"around the same ModelRunner. {meta.get('num_kv_blocks')} KV blocks of {meta.get('block_size')} tokens"
          + (f" (**{meta['kv_cache_dtype']} KV cache** on the quantized base"
             + (f", capped at {meta['kv_max_blocks']} blocks" if meta.get("kv_max_blocks") else "")
             + "; the fp16 base keeps an fp16 cache)" if meta.get("kv_cache_dtype", "auto") != "auto" else "")
          + "; "
          f"max {meta.get('max_num_seqs')} running, {meta.get('max_batched_tokens')} tokens per step, "
          f"β = {meta.get('beta')}, {meta.get('adapter_slots')} adapter slots (LRU), decode streak "
          f"{meta.get('max_decode_streak')}, starvation limit {meta.get('starvation_limit_s')} s"
          + (f"; **inlaid's latency target**: its running pool capped so a decode-only step takes at most "
             f"{meta['inlaid_step_time_ratio']:g}× the fastest one seen (`inlaid_step_time_ratio`)"
             if meta.get("inlaid_step_time_ratio") else "")
          + (f"; **inlaid's deadline-aware admission**: a waiting request that can no longer finish within "
             f"{meta['inlaid_slo_scale']:g}× its predicted latency served alone ranks after every one that still "
             "can (`inlaid_slo_scale`)" if meta.get("inlaid_slo_scale") else "") + ".", "",
          "What is synthetic, said plainly: the base weights are random (exact Llama-2-7B shapes); the "
          f"{meta.get('num_adapters_registered')} adapters are random rank-8/16 LoRAs on q/k/v/o made in memory "
          f"({meta.get('adapter_sets')} distinct weight sets shared by name; every name still takes its own "
          "device slot); EOS is ignored and a request ends at its trace length. Output and prompt lengths "
          f"are drawn from the workload kit's measured per-task distributions ({meta.get('lengths')}; prompt "
          "tokens ≈ chars/4 + 30 for the chat template); tasks are the 7 families and their `family#k` "
          f"variants (same length distribution per family), Zipf({meta.get('zipf_a')}) popularity over a "
          "shuffled order, Poisson arrivals. Predicted lengths emulate the predictor: true length × "
          f"log-normal noise (sd {meta.get('pred_sigma')}); the trained ONNX predictor (held-out MAE ≈ 1 token, "
          "predictor.md) is more accurate than this.", "",
          f"Definitions: latency = JCT / output tokens; JCT = finish − arrival (finished requests); JCT, all (≥) = "
          "the mean over every request of the trace, an unfinished one counted up to the cut-off (a lower bound, "
          "which does not reward leaving requests unfinished); TTFT = first token − arrival; "
          f"SLO attained when JCT ≤ {meta.get('slo_scale')} × the request's latency served alone (a fit to "
          "requests measured alone on this engine, below); SLO counts requests "
          "unfinished at the replay's cut-off as missed; throughput = finished requests / (last finish − "
          "first arrival); tasks/step = distinct adapters per executed step. Each replay's arrivals last "
          f"{meta.get('replay_window_s')} s; it is cut {max(meta.get('drain_s', 0), 0.5 * (meta.get('replay_window_s') or 0))} s "
          "later. One replay per cell: see the note on noise below.", ""]
    if meta.get("load_unit") == "tokens":
        md += ["**Load in output tokens** (`--load-unit tokens`): a trace's request rate is x × C scaled by the "
               "capacity burst's mean output length over that trace's own (the expectation of its task mix), so "
               "every trace offers x × C's output tokens per second whichever tasks its Zipf order favours; the "
               "req/s in the headings and tables are the scaled ones.", ""]
    md += _memory(meta)
    if meta.get("notes"):
        md += ["Notes on this run:", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    md += ["## Sections", "", "| section | status | estimate s | wall s |", "|---|---|---|---|"]
    for name, info in data.get("sections", {}).items():
        md.append(f"| {name} | {info.get('status', 'not reached')} | {_fmt(info.get('estimate_s'), '.0f')} | "
                  f"{_fmt(info.get('wall_s'), '.0f')} |")
    md.append("")
    md += _calibration(data)
    md += _main(data)
    md += _ablations(data)
    md += _fp16(data)
    md += repeats_md(data)
    md += _scale(data)
    md += _timeouts(data)
    md += _wfq(data)
    md += _sim_rates(data)
    md += _targets(data)
    if has_plot:
        md += [f"![latency CDF, SLO vs rate, task scaling]({png_path.name})", ""]
    md_path.write_text("\n".join(md))


def _calibration(data: dict) -> list[str]:
    cal = data.get("calibration")
    if not cal:
        return []
    c = cal.get("cost_model", {})
    out = ["## Calibration and the fitted cost model", "",
           f"FIFO burst ({cal.get('burst_requests')} requests at t = 0, cut at {_fmt(cal.get('burst_wall_s'), '.1f')} s): "
           + (f"saturated throughput {_fmt(cal.get('measured_capacity_req_s'), '.1f')} req/s, completions after "
              f"the first quarter; the rates below are fractions of **C = {_fmt(cal.get('fifo_capacity_req_s'), '.1f')} "
              "req/s, given** (`--capacity-req-s`), not of this measurement." if cal.get("capacity_given") else
              f"saturated throughput **C = {_fmt(cal.get('fifo_capacity_req_s'), '.1f')} req/s** "
              f"({_fmt(cal.get('fifo_capacity_tok_s'), '.0f')} output tok/s), completions after the first quarter. "
              "The rates below are fractions of C.") + (
               f" The same burst drained on the fitted cost model (simulator, to the last request): "
               f"{_fmt(cal.get('sim_fifo_drain_req_s'), '.1f')} req/s." if cal.get("sim_fifo_drain_req_s") else "")
           + (f" **Warning: {cal['capacity_warning']}.**" if cal.get("capacity_warning") else ""), ""]
    if c:
        out += [f"Cost model (`services/engine/simulator/cost_model.py`) fitted to "
                f"the engine's measured step times (engine.step wall: schedule + run + update): "
                f"t = {c['a_s']:.3e} + {c['b_s_per_prefill_token']:.3e}·prefill_tokens + "
                f"{c['c_s_per_decode_seq']:.3e}·decode_seqs + {c['d_s_per_adapter']:.3e}·adapters + "
                f"{c['e_s_per_kv_token']:.3e}·kv_tokens_read + {c.get('g_s_per_prefill_step', 0):.3e}·[prefill step] s "
                f"({c.get('source')}).", ""]
    rf = data.get("refit")
    if rf:
        device_fit, c = c, rf["cost_model"]
        same = all(abs(device_fit.get(k, 0) - v) <= 1e-12 + 1e-6 * abs(v)
                   for k, v in c.items() if isinstance(v, float))
        out += ["**Refit after the run** (on the CPU, from the same measured steps, `serve_gpu.steps.csv`; "
                f"command `{data['meta'].get('refit_command')}`): least squares with a per-step term for steps "
                "that hold a prefill (they run eagerly instead of replaying a CUDA graph), residuals weighted by "
                f"1/sqrt(t): t = {c['a_s']:.3e} + {c['b_s_per_prefill_token']:.3e}·prefill_tokens + "
                f"{c['c_s_per_decode_seq']:.3e}·decode_seqs + {c['d_s_per_adapter']:.3e}·adapters + "
                f"{c['e_s_per_kv_token']:.3e}·kv_tokens_read + {c.get('g_s_per_prefill_step', 0):.3e}·[prefill step] s"
                + (" (the same as the on-device fit: the run's code already fitted this form)." if same else ".")
                + " The simulated rows below use the refit.", ""]
    out += ["| fit | evaluated on | steps | median abs rel err | mean abs rel err | p90 abs rel err | error of summed time |",
            "|---|---|---|---|---|---|---|"]
    for label, fit_on, err in (
            ("70 % of calibration steps", "the other 30 % (held out)", cal.get("fit_70_30", {}).get("heldout")),
            ("all calibration steps", "calibration steps", cal.get("cost_model_on_calib_steps")),
            ("all calibration steps", "every step of the main section (never fitted)", cal.get("cost_model_on_main_steps")),
            ("runner grid (runner.run only)", "calibration engine steps", cal.get("grid_fit", {}).get("on_engine_steps")),
            ("**refit**: 70 % of calibration steps", "the other 30 % (held out)",
             data.get("refit", {}).get("fit_70_30", {}).get("heldout")),
            ("**refit**: all calibration steps", "every main-section step (never fitted)",
             data.get("refit", {}).get("on_main_steps")),
            ("**refit**: all calibration steps", "every 4-bit replay step (never fitted)",
             data.get("refit", {}).get("on_all_4bit_replay_steps"))):
        if err:
            out.append(f"| {label} | {fit_on} | {err['num_steps']} | {err['median_abs_rel_err']:.1%} | "
                       f"{err['mean_abs_rel_err']:.1%} | {err['p90_abs_rel_err']:.1%} | {err['total_time_rel_err']:+.1%} |")
    out.append("")
    solo = cal.get("solo")
    if solo:
        f = solo["fit"]
        out += ["SLO reference: requests served alone on this engine (each family at its p10/p50/p90 output "
                "length), fitted as solo(prompt, output) = "
                f"{f['intercept_s'] * 1e3:.2f} ms + {f['s_per_prompt_token'] * 1e6:.2f} µs·prompt + "
                f"{f['s_per_output_token'] * 1e3:.3f} ms·output (median |rel err| {f['median_abs_rel_err']:.1%}); "
                "the cost model's solo prediction is shown for comparison.", "",
                "| task | prompt tok | output tok | measured s | solo fit s | cost model s |", "|---|---|---|---|---|---|"]
        for r in solo["rows"]:
            out.append(f"| {r['task']} | {r['prompt_tokens']} | {r['output_tokens']} | {_fmt(r['measured_s'], '.3f')} | "
                       f"{_fmt(r['fit_s'], '.3f')} | {_fmt(r['cost_model_s'], '.3f')} |")
        out.append("")
    return out


def _main(data: dict) -> list[str]:
    rows = data.get("main")
    if not rows:
        return []
    out = ["## Policies at three request rates (same trace per rate)", ""]
    fracs = list(dict.fromkeys(r["load_frac"] for r in rows))
    for frac in fracs:
        rs = [r for r in rows if r["load_frac"] == frac]
        out += [f"### {rs[0]['rate_req_s']:.1f} req/s ({frac:.0%} of C), {rs[0]['num_trace_requests']} requests", "",
                table(rs), ""]
    out += ["### Ratios (> 1 = inlaid better)", "",
            "| rate | vs | throughput | avg latency | JCT | JCT, all (≥) | TTFT | SLO |", "|---|---|---|---|---|---|---|---|"]
    for frac in fracs:
        ours = _by(rows, load_frac=frac, variant="inlaid")
        for base in ("fifo", "mlfq", "wfq"):
            b = _by(rows, load_frac=frac, variant=base)
            if ours and b:
                q = ratios(ours, b)
                out.append(f"| {frac:.0%} of C | {base} | {q['throughput']:.2f}× | {q['avg_latency']:.2f}× | "
                           f"{q['jct']:.2f}× | {q['jct_all']:.2f}× | {q['ttft']:.2f}× | {q['slo']:.2f}× |")
    out.append("")
    return out


def _sim_rates(data: dict) -> list[str]:
    rows = data.get("sim_rates")
    if not rows:
        return []
    cols = [("variant", "policy", ""), ("rate_req_s", "req/s offered", ".1f"), ("throughput_req_s", "req/s", ".2f"),
            ("latency_avg_s_per_token", "latency avg s/tok", ".4f"), ("jct_avg_s", "JCT avg s", ".2f"),
            ("jct_p99_s", "JCT p99 s", ".2f"), ("ttft_avg_s", "TTFT avg s", ".2f"), ("slo_attainment", "SLO", ".3f"),
            ("adapters_per_step_avg", "tasks/step", ".2f"), ("num_preemptions", "preempt", "d")]
    out = ["## Simulated: the same policies on longer traces and past saturation (refitted cost model)", "",
           f"Same workload generator, {rows[0]['num_trace_requests']}+ requests per trace (vs ~100-160 per real "
           "replay); step times from the refitted cost model, SLO reference = the cost model's solo latency. "
           "Simulated, not measured.", ""]
    for frac in dict.fromkeys(r["load_frac"] for r in rows):
        rs = [r for r in rows if r["load_frac"] == frac]
        out += [f"### {frac:.0%} of C ({rs[0]['rate_req_s']:.1f} req/s), {rs[0]['num_trace_requests']} requests", "",
                table(rs, cols), ""]
    return out


def _ablations(data: dict) -> list[str]:
    rows = data.get("ablations")
    if not rows:
        return []
    main = data.get("main") or []
    top = max((r["load_frac"] for r in main), default=None)
    ref = [r for r in main if r.get("load_frac") == top and r["variant"] in ("inlaid", "fifo")]
    return ["## Ablations at the highest rate (inlaid; same trace as the main section's highest rate)", "",
            table(ref + rows), ""]


def _memory(meta: dict) -> list[str]:
    """The emulated card (--gpu-gib): what each base left for KV blocks and its measured peak."""
    mem = meta.get("memory") or {}
    if not meta.get("gpu_gib"):
        return []
    out = [f"**Memory budget: {meta['gpu_gib']} GiB** (an allocator cap, torch.cuda.set_per_process_memory_fraction; "
           f"{meta.get('act_reserve_gib')} GiB kept for activations, graphs and workspaces; each base's KV cache is "
           "what the rest leaves, measured by a probe load).", "",
           "| base | weights + adapter slots GiB | KV GiB | KV tokens | KV dtype | peak allocated GiB |",
           "|---|---|---|---|---|---|"]
    for label, m in mem.items():
        out.append(f"| {label} | {_fmt(m.get('weights_and_adapters_gib'), '.2f')} | {_fmt(m.get('kv_gib'), '.2f')} | "
                   f"{m.get('kv_tokens', '')} | {m.get('kv_cache_dtype', 'float16')}"
                   + (" (V token-major)" if m.get("kv_v_layout") == "token_major" else "")
                   + f" | {_fmt(m.get('peak_gib'), '.2f')} |")
    return out + [""]


def _launch_text(launch: dict) -> str:
    """kernels/attention.launch_settings() as one line: the launch each cache dtype resolves to."""
    def shape(meta: dict) -> str:
        return (f"BN {meta['BN']}, {meta['num_warps']} warps, stages {meta.get('num_stages', 'default')}, "
                f"{'tensor cores' if meta['DOT'] else 'CUDA cores'}")
    split = f"split-KV below {launch.get('split_programs_per_sm')} programs per SM"
    if "fp16" not in launch:   # results written before the resolved shapes were recorded: the raw constants
        return ", ".join(f"{k} {v}" for k, v in launch.items() if k != "split_programs_per_sm") + f"; {split}"
    return f"{shape(launch['fp16'])} (fp8 caches: {shape(launch['fp8'])}), {split}"


def _fp16(data: dict) -> list[str]:
    rows = data.get("fp16")
    if not rows:
        return []
    fm = data.get("fp16_meta", {})
    main = data.get("main") or []
    top = max((r["load_frac"] for r in main), default=None)
    inlaid4 = _by(main, load_frac=top, variant="inlaid")
    out = ["## fp16 base (S-LoRA's configuration) vs the 4-bit base, highest rate, same trace", "",
           f"fp16 runner: {fm.get('num_kv_blocks')} KV blocks, CUDA graphs {fm.get('graphs')}, Triton fast path "
           f"{fm.get('fast_path')} (with the fast path on, both bases run the same Triton LoRA/attention "
           "and CUDA-graph decode; only the linears differ: cuBLAS fp16 vs the W4A16 kernels).", "",
           table(([dict(inlaid4, variant="inlaid, 4-bit base")] if inlaid4 else []) + rows), ""]
    fifo16 = _by(rows, variant="fifo, fp16 base")
    if inlaid4 and fifo16:
        q = ratios(inlaid4, fifo16)
        out += [f"inlaid on 4-bit vs fifo on fp16: throughput {q['throughput']:.2f}×, avg latency "
                f"{q['avg_latency']:.2f}× lower, JCT {q['jct']:.2f}× lower (over every request, unfinished ones "
                f"to the cut-off: {q['jct_all']:.2f}×), SLO {q['slo']:.2f}×.", ""]
    return out


def scale_loss(rows: list[dict], policy: str, lo: int = 2, hi: int = 100) -> float | None:
    a = _by(rows, policy=policy, num_tasks=lo)
    b = _by(rows, policy=policy, num_tasks=hi)
    if not a or not b or not a.get("throughput_req_s") or not b.get("throughput_req_s"):
        return None
    return 1.0 - b["throughput_req_s"] / a["throughput_req_s"]


def _scale(data: dict) -> list[str]:
    sc = data.get("scale")
    if not sc:
        return []
    cols = [("num_tasks", "tasks", "d")] + COLS + [("adapter_loads", "slot loads", "d")]
    rate = (sc.get("real") or sc.get("sim") or [{}])[0].get("rate_req_s")
    load = sc.get("slot_load") or {}
    out = ["## Task-count scaling at a fixed rate", "",
           f"Every run at {_fmt(rate, '.1f')} req/s, above FIFO's saturated throughput C, so throughput "
           "measures capacity with that many tasks. Request lengths are drawn from all families' rows "
           "whatever the task, so every task count carries the same work and only the number of adapters "
           "changes; Zipf popularity over the task list; tasks beyond the adapter slots are loaded from "
           "host memory on use (LRU).", "", "Real engine:", "", table(sc.get("real", []), cols), ""]
    if load.get("num_timed"):
        out += [f"One slot load ({load['slot_bytes'] / 2**20:.1f} MiB, one copy from a pinned host pack; "
                f"{load['num_packed']} adapters packed at registration; median of {load['num_timed']}): "
                f"{_fmt(load['host_ms_median'], '.3f')} ms of host time, "
                f"{_fmt(load['done_ms_median'], '.3f')} ms until the copy is done.", ""]
    out += ["Simulator (the engine's policy classes on a virtual clock, step times from the "
           f"{'refitted' if data.get('refit') else 'fitted'} cost model; longer traces; the model has no term "
           "for adapter slot loads beyond its per-adapter cost):", "",
           table(sc.get("sim", []), [("num_tasks", "tasks", "d"), ("variant", "run", ""),
                                     ("throughput_req_s", "req/s", ".2f"), ("throughput_tok_s", "tok/s", ".0f"),
                                     ("jct_avg_s", "JCT avg s", ".2f"), ("slo_attainment", "SLO", ".3f"),
                                     ("adapters_per_step_avg", "tasks/step", ".2f")]), ""]
    stats = sc.get("step_stats")
    if stats:
        out += ["Where the real engine's time goes (measured steps of each scaling replay):", "",
                table(stats, [("run", "run", ""), ("busy_s", "busy s", ".2f"), ("decode_steps", "decode steps", "d"),
                              ("decode_ms", "decode ms", ".1f"), ("decode_batch", "decode batch", ".1f"),
                              ("decode_adapters", "adapters/decode", ".1f"), ("prefill_steps", "prefill steps", "d"),
                              ("prefill_ms", "prefill ms", ".1f"), ("prefill_tokens", "tokens/prefill", ".0f"),
                              ("prefill_adapters", "adapters/prefill", ".1f"),
                              ("prefill_busy_s", "prefill busy s", ".2f")]), "",
                "Prefill steps are where a task enters the batch, so where adapters are copied host → device "
                "into one of the LRU slots (slot loads above): compare prefill ms and prefill busy s across task "
                "counts for what loads cost, decode steps and decode batch for what spreading the requests over "
                "more tasks (at most β per step) costs. The cost model has no slot-load term.", ""]
    for kind in ("real", "sim"):
        for policy in dict.fromkeys(r.get("policy") for r in sc.get(kind, [])):
            loss = scale_loss(sc.get(kind, []), policy)
            if loss is not None:
                out.append(f"- {kind}, {policy}: throughput loss 2 → 100 tasks {loss:+.1%}")
    out.append("")
    return out


def _timeouts(data: dict) -> list[str]:
    rows = data.get("timeouts")
    if not rows:
        return []
    r0 = rows[0]
    return [f"## Clients that give up after {r0['client_timeout_s']:g} s", "",
            f"The main trace at its highest rate ({r0.get('rate_req_s', float('nan')):.1f} req/s); each request is "
            "aborted that long after its arrival unless it finished, as the gateway cancels a request at its "
            "client's gRPC deadline. \"Told\": the engine gets each deadline (what the gateway does); \"not "
            "told\": the same aborts, the policy blind to them. Goodput = finished in time / all requests; wasted = "
            "output tokens computed for cancelled requests / all computed.", "",
            table(rows, [("arm", "replay", ""), ("goodput", "goodput", ".3f"), ("num_cancelled", "cancelled", "d"),
                         ("wasted", "wasted", ".3f"), ("jct_avg_s", "finished JCT s", ".2f"),
                         ("slo_attainment_all", "SLO", ".3f"), ("throughput_req_s", "finished req/s", ".2f")]), ""]


def _wfq(data: dict) -> list[str]:
    rows = data.get("wfq_hog")
    if not rows:
        return []
    r0 = rows[0]
    return ["## WFQ: one task at 10× each other task's rate", "",
            f"Ten tasks, hog `{r0['hog_task']}` (a middle-length family), total {r0['rate_req_s']:.1f} req/s = "
            f"{r0['hog_overload']}× C. The no-hog run replays the same arrivals without the hog's requests. "
            "Target: others' p99 with the hog ≤ 2× without.", "",
            table(rows, [("variant", "policy", ""), ("others_jct_p99_no_hog_s", "others JCT p99 no hog s", ".2f"),
                         ("others_jct_p99_with_hog_s", "with hog s", ".2f"), ("others_p99_ratio", "ratio", ".2f"),
                         ("others_latency_p99_ratio", "per-token latency p99 ratio", ".2f"),
                         ("others_ttft_p99_no_hog_s", "others TTFT p99 no hog s", ".2f"),
                         ("others_ttft_p99_with_hog_s", "with hog s", ".2f"),
                         ("others_unfinished_with_hog", "others unfinished (hog)", "d"),
                         ("hog_finished", "hog finished", "d"), ("hog_throughput_tok_s", "hog tok/s", ".0f")]), ""]


def _targets(data: dict) -> list[str]:
    out = ["## Targets (the paper's maxima vs S-LoRA) — measured here", "",
           "| target | measured | met? |", "|---|---|---|"]
    main = data.get("main") or []

    def line(name: str, value: float | None, goal: float, fmt: str, higher_is_better: bool = True) -> None:
        if value is None or math.isnan(value):
            out.append(f"| {name} | not measured | – |")
            return
        ok = value >= goal if higher_is_better else value < goal
        out.append(f"| {name} | {format(value, fmt)} | {'yes' if ok else '**no**'} |")

    if main:
        top = max(r["load_frac"] for r in main)
        ours, fifo = _by(main, load_frac=top, variant="inlaid"), _by(main, load_frac=top, variant="fifo")
        q = ratios(ours, fifo) if ours and fifo else {}
        line(f"throughput ≥ {TARGETS['throughput']}× fifo at the highest rate", q.get("throughput"), TARGETS["throughput"], ".2f")
        line(f"avg latency ≥ {TARGETS['avg_latency']}× lower", q.get("avg_latency"), TARGETS["avg_latency"], ".2f")
        line(f"JCT ≥ {TARGETS['jct']}× lower", q.get("jct"), TARGETS["jct"], ".2f")
        line(f"JCT over every request, unfinished ones to the cut-off (a lower bound) ≥ {TARGETS['jct']}× lower",
             q.get("jct_all"), TARGETS["jct"], ".2f")
        line(f"SLO attainment ≥ {TARGETS['slo']}×", q.get("slo"), TARGETS["slo"], ".2f")
        fifo16 = _by(data.get("fp16") or [], variant="fifo, fp16 base")
        if ours and fifo16:
            q16 = ratios(ours, fifo16)
            for key, name in (("throughput", "throughput"), ("avg_latency", "avg latency lower"),
                              ("jct", "JCT lower"), ("jct_all", "JCT over every request (lower bound) lower"),
                              ("slo", "SLO attainment")):
                goal = TARGETS["jct" if key == "jct_all" else key]
                line(f"inlaid 4-bit vs fifo fp16 (S-LoRA's configuration): {name} ≥ {goal}×", q16[key], goal, ".2f")
    sim = data.get("sim_rates") or []
    if sim:
        top = max(r["load_frac"] for r in sim)
        ours, fifo = _by(sim, load_frac=top, variant="inlaid"), _by(sim, load_frac=top, variant="fifo")
        if ours and fifo:
            q = ratios(ours, fifo)
            for key, name in (("throughput", "throughput"), ("avg_latency", "avg latency lower"),
                              ("jct", "JCT lower"), ("slo", "SLO attainment")):
                line(f"(simulated, {top:.0%} of C) {name} ≥ {TARGETS[key]}×", q[key], TARGETS[key], ".2f")
    sc = data.get("scale") or {}
    for kind in ("real", "sim"):
        loss = scale_loss(sc.get(kind, []), "inlaid")
        line(f"throughput loss 2 → 100 tasks < 10 % (inlaid, {kind})", loss, TARGETS["scale_loss"], "+.1%",
             higher_is_better=False)
    wfq = _by(data.get("wfq_hog") or [], variant="wfq")
    line("wfq: others' p99 latency (per output token, this report's latency) with hog ≤ 2× no-hog",
         wfq.get("others_latency_p99_ratio") if wfq else None, TARGETS["hog_p99"] + 1e-12, ".2f",
         higher_is_better=False)
    line("wfq: others' p99 JCT with hog ≤ 2× no-hog", wfq.get("others_p99_ratio") if wfq else None,
         TARGETS["hog_p99"] + 1e-12, ".2f", higher_is_better=False)
    out += ["", "Ratios are oriented so that > 1 means inlaid is better. Below saturation every policy's "
            "throughput equals the offered rate, so throughput can only differ at the highest rate. A ratio "
            "of SLO attainments is huge (or infinite) where the baseline attains almost none; read the "
            "attainments themselves in the tables.", ""]
    return out


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    main = data.get("main") or []
    if not main:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    top = max(r["load_frac"] for r in main)
    for r in main:
        if r["load_frac"] == top and r.get("_jct"):
            jct = r["_jct"]
            axes[0].plot(jct, [(i + 1) / r["num_trace_requests"] for i in range(len(jct))], label=r["variant"])
    for r in data.get("ablations") or []:
        if r.get("_jct"):
            axes[0].plot(r["_jct"], [(i + 1) / r["num_trace_requests"] for i in range(len(r["_jct"]))],
                         label=r["variant"], linestyle="--")
    axes[0].set(xscale="log", xlabel="JCT (s)", ylabel="fraction of requests finished",
                title=f"JCT CDF at {top:.0%} of C")
    if axes[0].get_legend_handles_labels()[0]:   # none yet while the top rate runs: no empty-legend warning
        axes[0].legend(fontsize=7)
    for policy in dict.fromkeys(r["variant"] for r in main):
        rs = [r for r in main if r["variant"] == policy]
        axes[1].plot([r["rate_req_s"] for r in rs], [r["slo_attainment_all"] for r in rs], marker="o", label=policy)
    axes[1].set(xlabel="request rate (req/s)", ylabel="SLO attainment", title="SLO attainment vs rate", ylim=(0, 1.05))
    axes[1].legend(fontsize=7)
    sc = data.get("scale") or {}
    for kind, style in (("real", "-"), ("sim", ":")):
        rows = sc.get(kind) or []
        for policy in dict.fromkeys(r.get("policy") for r in rows):
            rs = [r for r in rows if r.get("policy") == policy]
            axes[2].plot([r["num_tasks"] for r in rs], [r.get("throughput_req_s", float("nan")) for r in rs],
                         marker="o", linestyle=style, label=f"{policy} ({kind})")
    axes[2].set(xscale="log", xlabel="number of tasks", ylabel="throughput (req/s)", title="task-count scaling")
    if sc:
        axes[2].legend(fontsize=7)
    meta = data.get("meta", {})
    fig.suptitle(f"{meta.get('model')} {meta.get('quant_bits')}-bit on {meta.get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    write_report(data, src.with_suffix(".md"), src.with_suffix(".png"))
    print(f"wrote {src.with_suffix('.md')} and .png")


if __name__ == "__main__":
    main()
