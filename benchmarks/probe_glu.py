"""Why SiLU·mul inside the down GEMM made the decode step slower (gpu_kernels_v19_fused_d5b34b3.md).

For Llama-2-7B's down_proj (K 11008, N 4096) at a few row counts, times as CUDA-graph replays after
a clean L2 flush: the separate SiLU·mul kernel alone, the tuned GEMM alone, the two in sequence (the
engine's default) and the fused GLU GEMM (w4a16_matmul(glu=True)); then, for the tuner's fastest
configs of each row count, every config with and without the GLU input, so a slowdown shows which
kernel kinds it comes from. Writes <out>/glu_probe.{json,md}.

  python benchmarks/probe_glu.py --out DIR --commit SHA
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import Timer, quantized_layer  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe  # noqa: E402
from services.engine.kernels.fused_ops import silu_mul  # noqa: E402
from services.engine.kernels.gemm_configs import m_bucket  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

K, N = 11008, 4096


def probe(timer: Timer, ms: list[int], top: int) -> list[dict]:
    tuner = GemmTuner()
    _, _, kw = quantized_layer(torch.randn(K, N, device="cuda") * K ** -0.5, 4)
    rows = []
    for m in ms:
        xg = torch.randn(m, 2 * K, device="cuda").half()
        act = silu_mul(xg)
        cfg = tuner.config_for(act, kw)
        parts = {"silu_mul": lambda: silu_mul(xg), "gemm": lambda: w4a16_matmul(act, kw, cfg),
                 "separate": lambda: w4a16_matmul(silu_mul(xg), kw, cfg),
                 "fused": lambda: w4a16_matmul(xg, kw, cfg, glu=True)}
        row = {"M": m, "config": str(cfg), **{f"{p}_us": timer.median_ms(fn) * 1e3 for p, fn in parts.items()}}
        ranked = sorted(((t, c) for c, t in tuner.timings_ms[(m_bucket(m), N, K, 4)] if t < float("inf")),
                        key=lambda tc: tc[0])
        row["configs"] = [{"config": str(c), "tuner_us": t * 1e3,
                           "plain_us": timer.median_ms(lambda c=c: w4a16_matmul(act, kw, c)) * 1e3,
                           "glu_us": timer.median_ms(lambda c=c: w4a16_matmul(xg, kw, c, glu=True)) * 1e3}
                          for t, c in ranked[:top]]
        rows.append(row)
        print(f"M={m:3d} silu_mul {row['silu_mul_us']:.1f} gemm {row['gemm_us']:.1f} separate "
              f"{row['separate_us']:.1f} fused {row['fused_us']:.1f} µs ({cfg})", flush=True)
        for c in row["configs"]:
            print(f"   {c['config'][:90]:90s} plain {c['plain_us']:.1f} glu {c['glu_us']:.1f}", flush=True)
    return rows


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("SiLU·mul inside the down GEMM, probed", res), "",
             probe_command(res) + " down_proj of "
             f"Llama-2-7B (K {K}, N {N}, 4-bit g128), medians of {res['reps']} CUDA-graph replays after a clean "
             "L2 flush, µs. separate = silu_mul then the GEMM (the engine's default); fused = the GEMM with "
             "the [gate | up] input (w4a16_matmul(glu=True)), same tuned config.", "",
             "| M | silu_mul | GEMM | separate | fused | fused / separate | config |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['M']} | {r['silu_mul_us']:.1f} | {r['gemm_us']:.1f} | {r['separate_us']:.1f} | "
                     f"{r['fused_us']:.1f} | {r['fused_us'] / r['separate_us']:.2f} | {r['config']} |")
    lines += ["", "The tuner's fastest configs, each without and with the GLU input:", "",
              "| M | config | plain µs | GLU µs | GLU / plain |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        for c in r["configs"]:
            lines.append(f"| {r['M']} | {c['config']} | {c['plain_us']:.1f} | {c['glu_us']:.1f} | "
                         f"{c['glu_us'] / c['plain_us']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=30, ms="1,16,64")
    ap.add_argument("--top", type=int, default=4, help="tuner configs per row count timed with and without GLU")
    args = ap.parse_args()
    run_probe("probe_glu.py", "glu_probe", args,
              lambda: probe(Timer(args.reps, clean_flush=True), args.ms, args.top), write_markdown)


if __name__ == "__main__":
    main()
