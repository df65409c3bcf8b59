"""What background packing (LoraManager.prefetch) takes off the step's path, on the CPU.

A stream of adapter requests over many tasks (Zipf popularity, more tasks than host packs) is
served step by step: each step loads its tasks into the device slots (LoraManager.acquire; on
this CPU the "device" store is host memory, so a load is one memcpy) and then stands for the
GPU's work with a sleep of --step-ms, during which the host is free. With --prefetch N the
step first hands the next N tasks of the stream to LoraManager.prefetch, whose worker thread
packs them during that sleep. Measured: the main thread's time inside acquire per step, and
where the packs were made. Llama-2-7B shapes, rank-16 adapters on q/k/v/o (33.5 MB per slot
row), 8 distinct weight sets shared by name. Writes <out>.json and <out>.md.

  python benchmarks/bench_lora_prefetch.py --commit $(git rev-parse --short HEAD)
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402
from services.common.adapters import BaseDims, LoraAdapter  # noqa: E402
from services.engine.lora import LoraManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = BaseDims(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, head_dim=128)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FRAME_BYTES = LLAMA_7B.num_layers * sum(16 * sum(LLAMA_7B.features(m)) for m in TARGETS) * 2   # fp16 slot row


def adapters(num_tasks: int, num_sets: int, rank: int) -> list[LoraAdapter]:
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(num_sets):
        weights = {}
        for layer in range(LLAMA_7B.num_layers):
            for m in TARGETS:
                in_f, out_f = LLAMA_7B.features(m)
                weights[(layer, m)] = (torch.randn(rank, in_f, generator=gen).half(),
                                       torch.randn(out_f, rank, generator=gen).half())
        sets.append(weights)
    return [LoraAdapter(name=f"t{i}", path=Path("/none"), rank=rank, targets=TARGETS, weights=sets[i % num_sets],
                        scaling={k: 0.5 for k in sets[i % num_sets]}) for i in range(num_tasks)]


def stream(num_tasks: int, length: int, zipf_a: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    order = list(range(num_tasks))
    rng.shuffle(order)
    weights = [1.0 / (r + 1) ** zipf_a for r in range(num_tasks)]
    return [f"t{order[i]}" for i in rng.choices(range(num_tasks), weights=weights, k=length)]


def run(ads: list[LoraAdapter], tasks: list[str], args, prefetch: int) -> dict:
    mgr = LoraManager(LLAMA_7B, num_slots=args.slots, max_rank=16, device="cpu", dtype=torch.float16,
                      use_triton=True, host_cache_bytes=args.packs * FRAME_BYTES)
    for ad in ads:
        mgr.add_adapter(ad)
    packs_inline = []
    pack = mgr._layout.pack

    def counting_pack(adapter, row):   # packs made on the main thread (in the step)
        if not threading.current_thread().name.startswith("lora-pack"):
            packs_inline.append(adapter.name)
        pack(adapter, row)
    mgr._layout.pack = counting_pack
    blocked, loads0 = [], mgr.num_loads
    per_step = args.tasks_per_step
    steps = len(tasks) // per_step
    t_start = time.perf_counter()
    for s in range(steps):
        names = set(tasks[s * per_step:(s + 1) * per_step])
        t0 = time.perf_counter()
        with torch.inference_mode():
            mgr.acquire(names)
        blocked.append(time.perf_counter() - t0)
        if prefetch:
            ahead = tasks[(s + 1) * per_step:(s + 1) * per_step + 4 * prefetch]
            mgr.prefetch(list(dict.fromkeys(ahead)), prefetch)
        time.sleep(args.step_ms / 1e3)     # the GPU's share of the step: the host is free
    wall = time.perf_counter() - t_start
    mgr.close()
    return {"prefetch": prefetch, "steps": steps, "wall_s": wall, "loads": mgr.num_loads - loads0,
            "packs_in_step": len(packs_inline), "packs_in_background": mgr.num_prefetched,
            "acquire_ms_mean": 1e3 * statistics.fmean(blocked), "acquire_ms_p90": 1e3 * sorted(blocked)[int(0.9 * steps)],
            "acquire_ms_total": 1e3 * sum(blocked)}


def pack_ms(ads: list[LoraAdapter], threads: int, reps: int = 7) -> float:
    """Median time of one pack (SlotLayout.pack of a whole slot row) with this many torch threads."""
    torch.set_num_threads(threads)
    mgr = LoraManager(LLAMA_7B, num_slots=1, max_rank=16, device="cpu", dtype=torch.float16, use_triton=True,
                      host_cache_bytes=0)
    mgr.add_adapter(ads[0])
    frame = torch.empty(mgr._layout.numel, dtype=torch.float16)
    times = []
    with torch.inference_mode():
        for rep in range(reps + 2):                # 2 warm-ups
            t0 = time.perf_counter()
            mgr._layout.pack(ads[0], frame)
            if rep >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def report(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Background adapter packing (LoraManager.prefetch), CPU (commit {m['commit']})", "",
             "Device: this machine's CPU (2 cores; the store is host memory, so a slot load is a memcpy, not a PCIe "
             f"copy). Packing worker: {m.get('worker_threads', 'the same intra-op threads as the main thread')}. "
             f"Command: `{m['command']}` ({m['wall_s']:.0f} s).", "",
             f"{m['num_tasks']} tasks (Llama-2-7B shapes, rank-16 adapters on q/k/v/o, {m['frame_mb']:.1f} MB per slot "
             f"row), Zipf({m['zipf_a']}) popularity, {m['slots']} device slots, {m['packs']} host packs; "
             f"{m['tasks_per_step']} task(s) acquired per step, then {m['step_ms']} ms standing for the GPU's work. "
             "Acquire = the main thread's time inside LoraManager.acquire per step (packing a missing pack, the "
             "slot copy). Each configuration ran alternately, repeats below. One pack alone (median of 7): "
             + ", ".join(f"{ms:.1f} ms with {t} thread(s)" for t, ms in m.get("pack_ms", {}).items()) + ".", "",
             "| torch threads | prefetch | run | steps | loads | packs in the step | packs in the background | "
             "acquire ms/step mean | p90 | total s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['threads']} | {r['prefetch']} | {r['repeat']} | {r['steps']} | {r['loads']} | {r['packs_in_step']} | "
                     f"{r['packs_in_background']} | {r['acquire_ms_mean']:.2f} | {r['acquire_ms_p90']:.2f} | "
                     f"{r['acquire_ms_total'] / 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-tasks", type=int, default=1000)
    ap.add_argument("--sets", type=int, default=8, help="distinct weight sets shared by the tasks")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--packs", type=int, default=32, help="host packs (frames)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks-per-step", type=int, default=1)
    ap.add_argument("--step-ms", type=float, default=15.0)
    ap.add_argument("--prefetch", default="0,4", help="prefetch depths to compare (0: off)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts to compare (main and worker share them)")
    ap.add_argument("--zipf-a", type=float, default=1.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_prefetch_cpu"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    ads = adapters(args.num_tasks, args.sets, 16)
    tasks = stream(args.num_tasks, args.steps * args.tasks_per_step, args.zipf_a, seed=1)
    pack_times = {t: pack_ms(ads, int(t)) for t in args.threads.split(",")}
    print("one pack: " + ", ".join(f"{ms:.1f} ms ({t} threads)" for t, ms in pack_times.items()), flush=True)
    runs = []
    for repeat in range(args.repeats):
        for threads, depth in ((t, d) for t in args.threads.split(",") for d in args.prefetch.split(",")):
            torch.set_num_threads(int(threads))
            r = run(ads, tasks, args, int(depth))
            r.update(repeat=repeat, threads=int(threads))
            runs.append(r)
            print(f"threads {threads} prefetch {depth}: acquire {r['acquire_ms_mean']:.2f} ms/step (p90 {r['acquire_ms_p90']:.2f}), "
                  f"{r['loads']} loads, {r['packs_in_step']} packs in the step, "
                  f"{r['packs_in_background']} in the background", flush=True)
    frame_mb = FRAME_BYTES / 1e6
    meta = {"commit": args.commit, "command": " ".join(["python", "benchmarks/bench_lora_prefetch.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0, "num_tasks": args.num_tasks,
            "worker_threads": "one intra-op thread (its own OpenMP setting, BackgroundPacker)",
            "zipf_a": args.zipf_a, "slots": args.slots, "packs": args.packs, "tasks_per_step": args.tasks_per_step,
            "step_ms": args.step_ms, "frame_mb": frame_mb, "pack_ms": pack_times}
    res = {"meta": meta, "runs": runs}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
