"""Fragment-ordered W4A16 kernels (kernels/w4a16_frag.py) streamed beside the engine's tuned GEMM and cuBLAS.

Per issue shape and M, in one process on one GPU: cuBLAS fp16, the engine's GEMM with the config its
tuner picks (both streamed over cold weights as probe_gemm_stream does: one CUDA graph over copies of
the layer that exceed 3x the L2), and a grid of fragment-kernel configs on the same codes in
fragment order. Every config's output is checked against the float32 dequantized reference first
(relative max error, must be <= 1e-2). Writes <out>/frag.{json,md}.

  python benchmarks/probe_frag.py --out DIR --commit SHA [--ms 1,4,16,64] [--shapes 5]
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import GEMM_SHAPES, Timer  # noqa: E402
from benchmarks.probe_gemm_stream import StreamOperands, ratio  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe_parts  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.gptq_format import dequantize_kernel_weights  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402
from services.engine.kernels.gptq_format import to_fragment_order  # noqa: E402
from services.engine.kernels.w4a16_frag import frag_k_width, frag_matmul  # noqa: E402

MAX_REL_ERR = 1e-2


def frag_configs(m: int, k: int, n: int) -> list[dict]:
    """The grid timed at M rows: tensor-core tiles (BM 16 up to M = 16, then 32-128) with the register
    double buffer or Triton's 2-stage pipeline, and at M = 1 the CUDA-core GEMV; split-K so that the
    programs cover the SMs one to four times. Zero taken off in fp16 by the one-shift unpacking (the
    fastest form in the first run, frag_m1_16_fcd1f62.md)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks = k // 128
    out = []
    bms = [16] if m <= 16 else [32, 64] if m <= 64 else [64, 128]
    bns = (64, 128, 256) if m <= 64 else (64, 128)
    for bm, bn, warps, pf in itertools.product(bms, bns, (2, 4, 8), (False, True)):
        if (bm > 16 and warps == 2) or (bn == 64 and warps == 8):
            continue
        tiles = -(-m // bm) * -(-n // bn)
        for split in (1, 2, 4, 8, 16, 32):
            if split <= blocks and sms <= tiles * split <= 4 * sms:
                out.append(dict(kind="frag", block_m=bm, block_n=bn, split_k=split, num_warps=warps,
                                num_stages=1 if pf else 2, zsub=True, fma=True, prefetch=pf))
    if m == 1:
        for bn, warps, split, pf in itertools.product((64, 128), (1, 2), (8, 16, 32), (False, True)):
            if split <= blocks:
                out.append(dict(kind="frag_gemv", block_m=1, block_n=bn, split_k=split, num_warps=warps,
                                num_stages=1, prefetch=pf))
    return out


def label(c: dict) -> str:
    if c["kind"] == "frag_gemv":
        return f"gemv BN{c['block_n']} w{c['num_warps']} s{c['split_k']}" + (" pf" if c["prefetch"] else "")
    form = "fma" if c.get("fma") else ("shift" if c.get("zsub") else "magic+Σx")
    return (f"BM{c['block_m']} BN{c['block_n']} w{c['num_warps']} s{c['split_k']} "
            f"{'pf' if c.get('prefetch') else 'st' + str(c['num_stages'])} {form}")


def probe_shape(k: int, n: int, ms: list[int], tuner: GemmTuner, timer: Timer, k_width: int) -> list[dict]:
    ops = StreamOperands(k, n)
    kw = ops.kw
    ref_w = dequantize_kernel_weights(kw).float()
    fws = [to_fragment_order(c, k_width) for c in ops.kws]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        ref = x.float() @ ref_w
        cfg = tuner.config_for(x, kw)
        kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
        row = {"K": k, "N": n, "M": m, "config": str(cfg), "weight_bytes": ops.weight_bytes,
               "fp16_us": timer.stream_ms(ops.fp16_calls(x)) * 1e3,
               "ours_us": timer.stream_ms([lambda c=c: w4a16_matmul(x, c, cfg, accumulate=kept)
                                           for c in ops.kws]) * 1e3,
               "frag": []}
        for fc in frag_configs(m, k, n):
            args = {key: v for key, v in fc.items() if key not in ("kind", "block_m")}
            call = lambda c: frag_matmul(x, c, fc["kind"], fc["block_m"], **args, accumulate=kept)  # noqa: E731
            try:
                kept.zero_()
                y = call(fws[0]).float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                us = timer.stream_ms([lambda c=c: call(c) for c in fws]) * 1e3
            except Exception as exc:   # a config that fails to compile or launch is reported, not fatal
                row["frag"].append({"config": label(fc), "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"  {label(fc)}: {type(exc).__name__}: {exc}"[:300], flush=True)
                continue
            row["frag"].append({"config": label(fc), "us": us, "rel_err": err, "ok": err <= MAX_REL_ERR})
        ok = sorted((f for f in row["frag"] if f.get("ok")), key=lambda f: f["us"])
        row["frag_best"] = ok[0] if ok else None
        rows.append(row)
        best = ok[0] if ok else {"us": float("nan"), "config": "none"}
        print(f"K={k:5d} N={n:5d} M={m:3d}  fp16 {row['fp16_us']:.1f}  ours {row['ours_us']:.1f}  "
              f"frag {best['us']:.1f} ({best['config']})  ×fp16 ours {row['fp16_us'] / row['ours_us']:.2f} "
              f"frag {row['fp16_us'] / best['us']:.2f}", flush=True)
    del ops, fws
    torch.cuda.empty_cache()
    return rows


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("Fragment-ordered W4A16 kernels beside the engine's GEMM, streamed", res) + "\n",
             probe_command(res) + f" Codes in fragment order k_width {res.get('k_width', 2)}. µs per call over "
             f"cold weights (one CUDA graph over weight copies that exceed 3× the L2), medians of {res['reps']} "
             "replays. `ours`: the engine's GEMM at its tuner's config; `frag`: the fastest fragment-order "
             "config whose output is within 1e-2 of the float32 reference.\n",
             "| K×N | M | fp16 | ours | frag | ×fp16 ours | ×fp16 frag | ours / frag | frag config | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        b = r["frag_best"]
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['fp16_us']:.1f} | {r['ours_us']:.1f} | "
                     + (f"{b['us']:.1f} | {ratio(r['fp16_us'], r['ours_us'])} | {ratio(r['fp16_us'], b['us'])} | "
                        f"{ratio(r['ours_us'], b['us'])} | {b['config']} | "
                        f"{max(f['rel_err'] for f in r['frag'] if 'rel_err' in f):.1e} |" if b else
                        f"– | {ratio(r['fp16_us'], r['ours_us'])} | – | – | none passed | – |"))
    bad = [(r, f) for r in res["rows"] for f in r["frag"] if not f.get("ok")]
    lines.append(f"\nConfigs that failed or exceeded the error bound: {len(bad)}.")
    for r, f in bad[:20]:
        why = f.get("error") or f"rel err {f['rel_err']:.1e}"
        lines.append(f"- {r['K']}×{r['N']} M={r['M']} {f['config']}: {why}")
    lines.append("\nThe five fastest fragment configs per row:\n")
    for r in res["rows"]:
        top = sorted((f for f in r["frag"] if f.get("ok")), key=lambda f: f["us"])[:5]
        lines.append(f"- {r['K']}×{r['N']} M={r['M']}: " + "; ".join(f"{f['config']} {f['us']:.1f}" for f in top))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,4,16,64,128")
    ap.add_argument("--shapes", type=int, default=len(GEMM_SHAPES), help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--stem", default="frag", help="result file name stem")
    ap.add_argument("--k-width", type=int, default=None,
                    help="fragment order (2 or 4; default: the installed Triton's, w4a16_frag.frag_k_width)")
    args = ap.parse_args()
    k_width = frag_k_width() if args.k_width is None else args.k_width
    tuner, timer = GemmTuner(), Timer(args.reps)
    run_probe_parts("probe_frag.py", args.stem, args,
                    (probe_shape(k, n, args.ms, tuner, timer, k_width) for k, n in GEMM_SHAPES[:args.shapes]),
                    write_markdown, k_width=k_width)


if __name__ == "__main__":
    main()
