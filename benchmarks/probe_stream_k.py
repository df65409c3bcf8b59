"""Stream-K against split-K for few rows: do equal pipelined runs across column tiles read faster?

At M <= 16 the tuner's split-K kernels read their weights at 1.1-1.8 TB/s streamed where cuBLAS fp16
reads 2.1-2.7 (gemm_stream_285f137.md). The stream kind (mma8_sk, w4a16._w4a16_stream_kernel)
gives each program one long software-pipelined run of (column tile, K block) units instead of a few
blocks of one tile. For the issue's shapes and each M, the GEMM tuner times every candidate (streamed
over cold weight copies, its own method); this reports the best split-K and the best stream-K config
from those timings, then streams both in the engine's form (into an output the norm zeroed) beside
cuBLAS fp16 and torch int4 with probe_gemm_stream's timing. Writes <out>/stream_k.{json,md}.

  python benchmarks/probe_stream_k.py --out DIR --commit SHA [--ms 1,2,4,8,16]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import (  # noqa: E402
    DECODE_BLOCK, GEMM_SHAPES, Timer, copy_bandwidth_gbs, decode_floor, decode_inputs, decode_model,
)
from benchmarks.probe_gemm_stream import StreamOperands, ratio  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe  # noqa: E402
from services.engine.kernels.gemm_configs import STREAM_KINDS, m_bucket  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

TOP = 3
CONTEXT = 256   # the decode table's context (bench_gpu_kernels --context default)


def best_of(timings: list, stream: bool) -> tuple:
    """(config, µs) fastest among the stream kinds (stream) or the others, (None, None) if none ran."""
    ran = [(t, c) for c, t in timings if (c.kind in STREAM_KINDS) == stream and t < float("inf")]
    if not ran:
        return None, None
    t, c = min(ran, key=lambda tc: tc[0])
    return c, t * 1e3


def probe_shape(k: int, n: int, ms: list[int], tuner: GemmTuner, timer: Timer) -> list[dict]:
    ops = StreamOperands(k, n)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        picked = tuner.config_for(x, ops.kw)
        timings = tuner.timings_ms[(m_bucket(m), n, k, 4)]
        split_cfg, split_tuner_us = best_of(timings, stream=False)
        sk_cfg, sk_tuner_us = best_of(timings, stream=True)
        kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
        row = {"K": k, "N": n, "M": m, "picked": str(picked), "split_config": str(split_cfg),
               "stream_config": str(sk_cfg), "split_tuner_us": split_tuner_us, "stream_tuner_us": sk_tuner_us,
               "rejected": [str(c) for c, tm in timings if tm == float("inf")],
               "stream_top": [{"config": str(c), "tuner_us": tm * 1e3} for c, tm in sorted(
                   ((c, tm) for c, tm in timings if c.kind in STREAM_KINDS and tm < float("inf")),
                   key=lambda ct: ct[1])[:TOP]]}
        for name, cfg in (("split", split_cfg), ("stream", sk_cfg)):
            row[f"{name}_us"] = None if cfg is None else timer.stream_ms(
                [lambda c=c, cfg=cfg: w4a16_matmul(x, c, cfg, accumulate=kept) for c in ops.kws]) * 1e3
        row["fp16_us"] = timer.stream_ms(ops.fp16_calls(x)) * 1e3
        row["int4_us"] = timer.stream_ms(ops.int4_calls(x)) * 1e3 if ops.int4s else None
        row["weight_bytes"] = ops.weight_bytes
        rows.append(row)
        print(f"K={k:5d} N={n:5d} M={m:3d}  split {fmt(row['split_us'])} stream {fmt(row['stream_us'])} "
              f"fp16 {row['fp16_us']:.1f} int4 {fmt(row['int4_us'])} µs  (stream: {sk_cfg}; "
              f"rejected {len(row['rejected'])})", flush=True)
    del ops
    torch.cuda.empty_cache()
    return rows


def probe_decode(timer: Timer, batches: list[int], bw_gbs: float) -> list[dict]:
    """The graphed Llama-2-7B 4-bit decode step (engine defaults: RoPE folded into the decode
    attention, PDL off) with the tuner restricted to split-K, then free to pick stream-K; the
    tuner re-tunes every shape in between."""
    model = decode_model(False, CONTEXT, max(batches), 4)
    model.fused_decode_attention = True
    rows = []
    for label, skip in (("split", STREAM_KINDS), ("stream", ())):
        model.tuner.skip_kinds = skip
        model.tuner.best.clear()
        for bsz in batches:
            inputs = decode_inputs(bsz, CONTEXT, DECODE_BLOCK, model.shape.vocab, None)
            floor_ms = decode_floor(model, bsz, CONTEXT, bw_gbs)[0]
            ms = timer.median_ms(lambda: model.decode(**inputs))
            picks = sorted({str(c) for c in model.tuner.best.values()})
            rows.append({"tuner": label, "batch": bsz, "context": CONTEXT, "graph_ms": ms, "floor_ms": floor_ms,
                         "vs_floor": ms / floor_ms, "configs": picks})
            print(f"decode ({label}) B={bsz:2d}: graph {ms:.3f} ms, floor {floor_ms:.3f} ms, x{ms / floor_ms:.2f} "
                  f"of floor; stream-K picks {sum(any(k in p for k in STREAM_KINDS) for p in picks)} of "
                  f"{len(picks)} shapes", flush=True)
        torch.cuda.empty_cache()
    return rows


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("Stream-K vs split-K at few rows", res) + "\n",
             probe_command(res) + " µs per call, each streamed "
             f"as one CUDA graph over weight copies above 3× the L2 (medians of {res['reps']} replays), in the "
             "engine's form (into an output the norm zeroed). split = the fastest split-K config of the tuner's "
             "list, stream = the fastest stream-K config (mma8_sk; up to 900b7dc also gemv_sk), both chosen by the tuner's own "
             "streamed timing (which zeroes its own output; its µs are in the JSON).\n",
             "| K×N | M | split | stream | fp16 | int4 | stream ×split | ×fp16 split | ×fp16 best | ×int4 best "
             "| best GB/s | stream config |", "|---|---|" + "---|" * 10]
    for r in res["rows"]:
        best = min(v for v in (r["split_us"], r["stream_us"]) if v)
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {fmt(r['split_us'])} | {fmt(r['stream_us'])} | "
                     f"{r['fp16_us']:.1f} | {fmt(r['int4_us'])} | {ratio(r['split_us'], r['stream_us'])} | "
                     f"{ratio(r['fp16_us'], r['split_us'])} | {ratio(r['fp16_us'], best)} | "
                     f"{ratio(r['int4_us'], best)} | {r['weight_bytes'] / (best * 1e-6) / 1e9:.0f} | "
                     f"{r['stream_config']} |")
    lines.append("")
    for m in sorted({r["M"] for r in res["rows"]}):
        sel = [r for r in res["rows"] if r["M"] == m and r["split_us"] and r["stream_us"]]
        if sel:
            sp = [r["split_us"] / r["stream_us"] for r in sel]
            bf = [r["fp16_us"] / min(r["split_us"], r["stream_us"]) for r in sel]
            lines.append(f"- M = {m}: stream ×split {min(sp):.2f}–{max(sp):.2f}; best of both ×fp16 "
                         f"{min(bf):.2f}–{max(bf):.2f}")
    dec = res.get("decode_ab") or {}
    if dec.get("rows"):
        lines += ["", f"Whole 7B decode step, graphed (engine defaults), context {CONTEXT}, byte floor at the "
                  f"measured copy bandwidth ({dec['copy_bw_gbs']:.0f} GB/s):", "",
                  "| batch | split-K only ms | ×floor | with stream-K ms | ×floor | speed-up |", "|---|---|---|---|---|---|"]
        by = {(r["tuner"], r["batch"]): r for r in dec["rows"]}
        for bsz in sorted({r["batch"] for r in dec["rows"]}):
            a, b = by[("split", bsz)], by[("stream", bsz)]
            lines.append(f"| {bsz} | {a['graph_ms']:.3f} | {a['vs_floor']:.2f} | {b['graph_ms']:.3f} | "
                         f"{b['vs_floor']:.2f} | {a['graph_ms'] / b['graph_ms']:.3f} |")
        lines.append("")
    rejected = sorted({c for r in res["rows"] for c in r["rejected"]})
    lines.append(f"- configs the tuner rejected (output off the reference, or failed to compile): "
                 f"{', '.join(rejected) if rejected else 'none'}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,2,4,8,16")
    ap.add_argument("--shapes", type=int, default=len(GEMM_SHAPES), help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--decode-batches", type=lambda v: [int(b) for b in v.split(",") if b], default="1,16",
                    help="decode A/B batch sizes ('' skips it)")
    args = ap.parse_args()
    tuner, timer = GemmTuner(), Timer(args.reps)
    decode_ab: dict = {}    # filled after the GEMM rows (the header holds the same dict)

    def rows() -> list[dict]:
        out = [row for k, n in GEMM_SHAPES[:args.shapes] for row in probe_shape(k, n, args.ms, tuner, timer)]
        if args.decode_batches:
            decode_ab["copy_bw_gbs"] = copy_bandwidth_gbs(timer)
            decode_ab["rows"] = probe_decode(timer, args.decode_batches, decode_ab["copy_bw_gbs"])
        return out

    run_probe("probe_stream_k.py", "stream_k", args, rows, write_markdown, decode_ab=decode_ab)


if __name__ == "__main__":
    main()
