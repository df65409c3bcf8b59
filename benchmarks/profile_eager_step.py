"""Where an eager engine step's time goes (GPU machine): kernel launches, host time, GPU time.

A step with a prefill cannot replay a CUDA graph: on the H100 an 8 × 64-token prefill step took
23 ms in one run and 44 ms in another at the same commit family, while graph-replayed decode steps
matched (serve_gpu_7277f9a.md). This profiles such steps on the real runner (random Llama-2-7B
shapes, 4-bit base, no adapter) with torch.profiler and times a host-only launch loop, so the
next change to the eager path knows whether launch count, host speed or GPU work dominates:

    python benchmarks/profile_eager_step.py --out /root/out --commit HEAD

Writes profile_eager_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def launch_loop_us(torch, n: int = 2000) -> float:
    """Host time per launch of a tiny elementwise kernel (no sync inside the loop)."""
    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def python_profile(step, reps: int, torch, top: int = 15) -> list:
    """(function, self ms per step, calls per step) of the Python functions with the most self
    time over reps steps (cProfile: its own overhead inflates every entry, so read the ranking)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((f"{Path(file).name}:{line}:{name}", tt, nc) for (file, line, name), (_, nc, tt, _, _)
                   in stats.items()), key=lambda r: -r[1])[:top]
    return [(name, round(tt / reps * 1e3, 3), nc // reps) for name, tt, nc in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--serial-split", action="store_true", help="serial split-K GEMMs (EngineConfig.serial_split_k)")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from services.engine.block_manager import BlockManager
    from services.engine.kernels import launch as fast_launch
    from services.engine.config import EngineConfig
    from services.engine.model_runner import ModelRunner
    from services.engine.sequence import SamplingParams, Sequence
    t_start = time.perf_counter()
    cfg = EngineConfig(model=args.model, device="cuda", dtype="float16", quant_bits=4, cuda_graphs=False,
                       gemm_tune_cache=False, max_num_seqs=64, num_kv_blocks=1024, serial_split_k=args.serial_split)
    runner = ModelRunner.load(cfg)
    bm = BlockManager(runner.num_kv_blocks, runner.block_size)
    host_us = launch_loop_us(torch)

    def batch(n: int, tokens: int, decode: bool) -> list:
        seqs = []
        for i in range(n):
            s = Sequence(f"p{n}x{tokens}{i}", [(7 * i + j) % 900 + 3 for j in range(tokens)], SamplingParams())
            bm.allocate(s)
            s.num_cached_tokens = tokens - 1 if decode else 0
            seqs.append(s)
        return seqs

    rows = []
    for label, n, tokens, decode in (("prefill 1x8", 1, 8, False), ("prefill 8x64", 8, 64, False),
                                     ("prefill 64x64", 64, 64, False), ("decode eager b1", 1, 64, True),
                                     ("decode eager b64", 64, 64, True)):
        seqs = batch(n, tokens, decode)
        for _ in range(2):      # tuning and compiling happen here
            runner.run(seqs)
        torch.cuda.synchronize()

        # the same step through Triton's own launch path and through kernels.launch's direct one,
        # alternating, so a drift of the host's speed hits both
        direct = fast_launch.ENABLED
        walls: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for on in (False, direct):
                fast_launch.ENABLED = on
                t0 = time.perf_counter()
                runner.run(seqs)
                torch.cuda.synchronize()
                walls[on].append(time.perf_counter() - t0)
        fast_launch.ENABLED = direct
        triton_path_ms, wall_ms = (1e3 * statistics.median(walls[on]) for on in (False, direct))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                runner.run(seqs)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        n_kernels = sum(e.count for e in kernels) / args.reps
        gpu_ms = sum(e.self_device_time_total for e in kernels) / args.reps / 1e3
        top = sorted((e for e in events if e.device_type != torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_cpu_time_total)[:12]
        row = {"step": label, "wall_ms": wall_ms, "wall_ms_triton_launch": triton_path_ms,
               "direct_launch": direct, "kernels_per_step": n_kernels,
               "gpu_kernel_ms_per_step": gpu_ms,
               "top_gpu_kernels": [(e.key[:70], round(e.self_device_time_total / args.reps / 1e3, 3),
                                    e.count // args.reps)
                                   for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]],
               "top_host_ops": [(e.key, round(e.self_cpu_time_total / args.reps / 1e3, 3), e.count // args.reps)
                                for e in top],
               "top_python": python_profile(lambda: runner.run(seqs), args.reps, torch)}
        rows.append(row)
        print(f"{label:18s} wall {row['wall_ms']:7.2f} ms (Triton's launch path {triton_path_ms:7.2f}) | "
              f"{n_kernels:6.0f} kernels | GPU {gpu_ms:6.2f} ms", flush=True)
        for s in seqs:
            bm.free(s)
            runner.sampler.release(s.request_id)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit,
           "command": "python benchmarks/profile_eager_step.py " + " ".join(sys.argv[1:]),
           "host_launch_us": host_us, "rows": rows, "wall_s": time.perf_counter() - t_start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_eager_step.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Eager engine steps profiled ({res['device']}, commit {args.commit})\n",
             f"Command: `{res['command']}`; torch {res['torch']}; random {args.model} shapes, 4-bit base, no adapter, "
             f"CUDA graphs off. Host time per tiny kernel launch (torch add_, no sync): {host_us:.1f} µs.\n",
             f"Wall times measured back to back on this host: Triton's own launch path, then kernels.launch's "
             f"direct one ({'on' if rows and rows[0]['direct_launch'] else 'off'}); serial split-K "
             f"{'on' if args.serial_split else 'off'}; "
             "the profiles below are of the latter.\n",
             "| step | wall ms, Triton's launch | wall ms, direct launch | ratio | kernels / step | GPU kernel ms / step "
             "| wall − GPU ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['wall_ms_triton_launch']:.2f} | {r['wall_ms']:.2f} | "
              f"{r['wall_ms_triton_launch'] / r['wall_ms']:.2f} | {r['kernels_per_step']:.0f} | "
              f"{r['gpu_kernel_ms_per_step']:.2f} | {r['wall_ms'] - r['gpu_kernel_ms_per_step']:.2f} |" for r in rows]
    for r in rows:
        lines += ["", f"Top GPU kernels of '{r['step']}' (device ms per step, launches per step):", ""]
        lines += [f"- `{k}`: {ms} ms, {c} launches" for k, ms, c in r["top_gpu_kernels"]]
        lines += ["", f"Top host ops of '{r['step']}' (self CPU ms per step, calls per step):", ""]
        lines += [f"- {k}: {ms} ms, {c} calls" for k, ms, c in r["top_host_ops"]]
        lines += ["", f"Top Python functions of '{r['step']}' (cProfile self ms per step, calls per step):", ""]
        lines += [f"- {k}: {ms} ms, {c} calls" for k, ms, c in r["top_python"]]
    (out / "profile_eager_step.md").write_text("\n".join(lines) + "\n")
    print(f"done in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
