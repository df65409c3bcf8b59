"""Where a small-M W4A16 GEMM's time goes on the GPU, for the four GEMMs of a Llama-2-7B decode layer.

Each is timed as CUDA-graph replays (bench_gpu_kernels.Timer) after two kinds of L2 flush: a 256 MB
write, which leaves the cache full of dirty lines that the timed work must write back (what
triton.testing.do_bench and bench_gpu_kernels do), and a 256 MB read, which leaves it clean (as
weights are in a decode step: read-only). Beside the engine's GEMM (zeroed output + split-K kernel)
it times its parts and references: one tiny kernel (the launch floor), the zeroing alone, the GEMM
kernel alone (accumulating into a kept buffer), a plain read of the same weight bytes (torch.amax)
and cuBLAS fp16. Writes <out>/gemm_overhead.{json,md}.

  python benchmarks/probe_gemm_overhead.py --out DIR --commit SHA
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import Timer, quantized_layer  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.quant_linear import TritonQuantLinear  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

LAYER = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)]
PARTS = ["tiny", "zero", "gemm_only", "engine", "read", "fp16"]


def probe(timers: dict[str, Timer], ms: list[int]) -> list[dict]:
    tuner = GemmTuner()
    tiny = torch.zeros(1, device="cuda")
    rows = []
    for name, k, n in LAYER:
        _, ref_w, kw = quantized_layer(torch.randn(k, n, device="cuda") * k ** -0.5, 4)
        lin = TritonQuantLinear(kw, None, tuner)
        w16 = ref_w.t().contiguous().half()
        weight_bytes = sum(p.numel() * p.element_size() for p in (kw.qweight, kw.scales, kw.zeros))
        del ref_w
        for m in ms:
            x = torch.randn(m, k, device="cuda").half()
            lin(x)   # tunes this shape
            cfg = tuner.config_for(x, kw)
            kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
            work = {"tiny": lambda: tiny.add_(1), "zero": lambda: kept.zero_(),
                    "gemm_only": lambda: w4a16_matmul(x, kw, cfg, accumulate=kept),
                    "engine": lambda: lin(x), "read": lambda: torch.amax(kw.qweight),
                    "fp16": lambda: F.linear(x, w16)}
            row = {"gemm": name, "K": k, "N": n, "M": m, "config": str(cfg), "weight_bytes": weight_bytes}
            for flush, timer in timers.items():
                for part, fn in work.items():
                    row[f"{part}_{flush}_us"] = timer.median_ms(fn) * 1e3
            rows.append(row)
            print(f"{name:8s} M={m:2d} " + " ".join(f"{p} {row[p + '_clean_us']:.1f}/{row[p + '_dirty_us']:.1f}"
                                                   for p in PARTS) + f"  ({cfg})", flush=True)
    return rows


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("Small-M W4A16 GEMM: where the time goes", res) + "\n",
             probe_command(res) + " Medians of "
             f"{res['reps']} CUDA-graph replays, µs, each after an L2 flush that leaves the cache clean (256 MB "
             "read) / dirty (256 MB written, as bench_gpu_kernels and triton's do_bench do). "
             "`engine` = zeroed output + split-K GEMM kernel (what the engine runs); `gemm only` = the "
             "kernel accumulating into a kept buffer; `read` = torch.amax over the same packed weights; "
             "`tiny` = one 1-element kernel (the launch and event floor). Weight GB/s from the clean column.\n",
             "| GEMM | K×N | M | tiny | zero | gemm only | engine | read | fp16 | engine GB/s | read GB/s "
             "| ×fp16 clean | ×fp16 dirty | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cells = " | ".join(f"{r[p + '_clean_us']:.1f} / {r[p + '_dirty_us']:.1f}" for p in PARTS)
        gbs = lambda us: r["weight_bytes"] / (us * 1e-6) / 1e9  # noqa: E731
        lines.append(f"| {r['gemm']} | {r['K']}×{r['N']} | {r['M']} | {cells} | {gbs(r['engine_clean_us']):.0f} | "
                     f"{gbs(r['read_clean_us']):.0f} | {r['fp16_clean_us'] / r['engine_clean_us']:.2f} | "
                     f"{r['fp16_dirty_us'] / r['engine_dirty_us']:.2f} | {r['config']} |")
    for m in sorted({r["M"] for r in res["rows"]}):
        layer = [r for r in res["rows"] if r["M"] == m]
        total = {p: sum(r[p + "_clean_us"] for r in layer) for p in PARTS}
        lines.append(f"\nM = {m}, the layer's four GEMMs (clean flush): engine {total['engine']:.1f} µs, "
                     f"kernels alone {total['gemm_only']:.1f} µs, plain reads of the weights {total['read']:.1f} µs, "
                     f"fp16 {total['fp16']:.1f} µs; × 32 layers: engine {total['engine'] * 32 / 1e3:.2f} ms.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = probe_parser(__doc__, reps=30, ms="1,16").parse_args()
    timers = {"clean": Timer(args.reps, clean_flush=True), "dirty": Timer(args.reps)}
    run_probe("probe_gemm_overhead.py", "gemm_overhead", args, lambda: probe(timers, args.ms), write_markdown)


if __name__ == "__main__":
    main()
