"""The fragment-ordered 4-bit layout as the engine serves it (EngineConfig.w4_layout = "frag") beside the
tiled layout, in one process on one GPU.

Both fragment orders are timed (k_width 4 and 2: under Triton 3.6 the first is free for mma.sync's
operand, the second for wgmma's register operand, frag_sass_t36_*.md). Part 1, GEMMs: per issue shape
and M, the GEMM tuner picks a config for each layout from its own candidate list
(gemm_configs.candidate_configs(m, frag)) and the picks are streamed over cold weights beside cuBLAS
fp16 (one CUDA graph over copies of the layer that exceed 3x the L2, as probe_gemm_stream). Part 2,
the graphed decode step of random-weight Llama-2-7B (W4Decoder, 4-bit g128, fused RoPE + attention as
the serving default) per batch size: tiled, then the same model converted to each fragment order, then
tiled again (the drift between the two tiled timings bounds what the comparison can resolve). Every
pick is checked by the tuner against the float32 reference (relative error <= 1e-2). Writes
<out>/<stem>.{json,md}.

  python benchmarks/probe_frag_engine.py --out DIR --commit SHA [--ms 1,4,16,64,128,256] [--batches 1,4,16,64]
      [--k-widths 4,2] [--block-major 4] [--pdl 1]
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import (  # noqa: E402
    DECODE_BLOCK, GEMM_SHAPES, Timer, copy_bandwidth_gbs, decode_floor, decode_inputs, decode_model, time_with_pdl,
)
from benchmarks.probe_gemm_stream import StreamOperands, ratio  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe_parts  # noqa: E402
from services.engine.kernels.gemm_configs import TMA_KINDS  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.gptq_format import to_fragment_order  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402
from services.engine.kernels.w4a16_frag import frag_k_width  # noqa: E402


def frag_layouts(k_widths: list[int], block_major: list[int], tma: bool = False) -> list[tuple[str, int, bool, bool]]:
    """(name, k_width, block-major, TMA kinds tuned) of each fragment layout timed: fragW row-major, fragWb
    block-major, and with tma fragWb_tma, block-major with the tuner free to pick frag_tma (EngineConfig.gemm_tma)."""
    return ([(f"frag{w}", w, False, False) for w in k_widths] + [(f"frag{w}b", w, True, False) for w in block_major]
            + [(f"frag{w}b_tma", w, True, True) for w in (block_major if tma else [])])


def gemm_rows(k: int, n: int, ms: list[int], tuners: tuple[GemmTuner, GemmTuner], timer: Timer,
               frags: list[tuple[str, int, bool, bool]]) -> list[dict]:
    """tuners: (the engine's default, which skips the TMA kinds; one that times them too)."""
    ops = StreamOperands(k, n)
    layouts = [("tiles", ops.kws, False)] + [(name, [to_fragment_order(c, w, bm) for c in ops.kws], tma)
                                              for name, w, bm, tma in frags]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
        row = {"part": "gemm", "K": k, "N": n, "M": m, "fp16_us": timer.stream_ms(ops.fp16_calls(x)) * 1e3}
        for name, kws, tma in layouts:
            cfg = tuners[tma].config_for(x, kws[0])
            row[f"{name}_config"] = str(cfg)
            row[f"{name}_us"] = timer.stream_ms([lambda c=c: w4a16_matmul(x, c, cfg, accumulate=kept)
                                                 for c in kws]) * 1e3
        rows.append(row)
        print(f"K={k:5d} N={n:5d} M={m:3d}  fp16 {row['fp16_us']:.1f}  "
              + "  ".join(f"{name} {row[name + '_us']:.1f} (×fp16 {row['fp16_us'] / row[name + '_us']:.2f})"
                          for name, _ in layouts), flush=True)
    del ops, layouts
    torch.cuda.empty_cache()
    return rows


def decode_rows(batches: list[int], ctx: int, timer: Timer, frags: list[tuple[str, int, bool, bool]],
                pdl_mode: int = 0) -> Iterator[list[dict]]:
    """Per batch size (one part each, so a cut run keeps the batches it timed): the graphed step in
    the tiled layout, in each fragment order, and tiled again, beside the step's floor; with pdl_mode,
    each layout's step also with programmatic dependent launch in that mode (key <layout>_pdl_ms)."""
    bw = copy_bandwidth_gbs(timer)
    model = decode_model(False, ctx, max(batches), 4)
    model.fused_decode_attention = True
    rows = []
    for bsz in batches:
        inputs = decode_inputs(bsz, ctx, DECODE_BLOCK, model.shape.vocab, None)
        floor_ms = decode_floor(model, bsz, ctx, bw)[0]
        row = {"part": "decode", "batch": bsz, "context": ctx, "floor_ms": floor_ms, "copy_gbs": bw}
        for key, frag, bm, tma in [("tiles_ms", 0, False, False)] + [(f"{name}_ms", w, bm, tma)
                                                                      for name, w, bm, tma in frags] \
                + [("tiles_again_ms", 0, False, False)]:
            model.set_layout(frag, bm)
            model.use_gemm_tma(tma)
            row[key] = timer.median_ms(lambda: model.decode(**inputs))
            if pdl_mode and key != "tiles_again_ms":
                time_with_pdl(timer, lambda: model.decode(**inputs), pdl_mode, row, f"{key[:-3]}_pdl_ms")
        rows.append(row)
        print(f"decode B={bsz:2d}: " + "  ".join(f"{key[:-3]} {v:.3f} ms" for key, v in row.items()
                                                   if key.endswith("_ms")), flush=True)
        yield rows[-1:]
        torch.cuda.empty_cache()


def _ms(row: dict, key: str) -> str:
    """A timing cell: the time, or the error that replaced it (time_with_pdl), or a dash."""
    if key in row:
        return f"{row[key]:.3f}"
    return "error" if key + "_error" in row else "–"


def write_markdown(res: dict, path: Path) -> None:
    frags = [name for name, _, _, _ in frag_layouts(res["k_widths"], res.get("block_major", []), res.get("tma", False))]
    lines = [probe_title("The fragment-ordered 4-bit layout in the engine beside the tiled one", res) + "\n",
             probe_command(res) + " `fragW`: codes in the fragment order of k_width W (`fragWb`: stored block-major, "
             "one K block of consecutive 8-column rows contiguous). GEMMs: µs per call streamed "
             f"over cold weights (one CUDA graph over weight copies that exceed 3× the L2), medians of {res['reps']} "
             "replays, each layout at the config its GEMM tuner picked from its own candidate list "
             "(gemm_configs.candidate_configs(m, frag)). Decode: graphed step of random-weight Llama-2-7B, 4-bit "
             "g128, fused RoPE + attention, L2 flushed before each replay; tiled, each fragment order, tiled again.\n",
             "| K×N | M | fp16 µs | tiles µs | " + " | ".join(f"{f} µs" for f in frags) + " | ×fp16 tiles | "
             + " | ".join(f"×fp16 {f}" for f in frags) + " | " + " | ".join(f"{f} config" for f in frags) + " |",
             "|---|---|---|---|" + "---|" * (3 * len(frags) + 1)]
    for r in (r for r in res["rows"] if r["part"] == "gemm"):
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['fp16_us']:.1f} | {r['tiles_us']:.1f} | "
                     + " | ".join(f"{r[f + '_us']:.1f}" for f in frags) + f" | {ratio(r['fp16_us'], r['tiles_us'])} | "
                     + " | ".join(ratio(r['fp16_us'], r[f + '_us']) for f in frags) + " | "
                     + " | ".join(r[f + "_config"] for f in frags) + " |")
    dec = [r for r in res["rows"] if r["part"] == "decode"]
    if dec:
        lines += ["\n| batch | tiles ms | " + " | ".join(f"{f} ms" for f in frags) + " | tiles again ms | "
                  + " | ".join(f"tiles / {f}" for f in frags) + " | floor ms |",
                  "|---|---|" + "---|" * (2 * len(frags) + 2)]
        for r in dec:
            tiles = min(r["tiles_ms"], r["tiles_again_ms"])
            lines.append(f"| {r['batch']} | {r['tiles_ms']:.3f} | " + " | ".join(f"{r[f + '_ms']:.3f}" for f in frags)
                         + f" | {r['tiles_again_ms']:.3f} | " + " | ".join(ratio(tiles, r[f + "_ms"]) for f in frags)
                         + f" | {r['floor_ms']:.3f} |")
        lines.append("\ntiles / fragW uses the faster of the two tiled timings.")
        if any("tiles_pdl_ms" in r for r in dec):
            lines += [f"\nWith programmatic dependent launch (mode {res['pdl']}, kernels/pdl.py), same graphs' layouts:\n",
                      "| batch | tiles ms | tiles PDL ms | " + " | ".join(f"{f} ms | {f} PDL ms" for f in frags)
                      + " | best PDL ÷ floor |", "|---|---|---|" + "---|" * (2 * len(frags) + 1)]
            for r in dec:
                pdl_times = [r[k] for k in r if k.endswith("_pdl_ms")]
                best = f"{min(pdl_times) / r['floor_ms']:.2f}" if pdl_times else "–"
                lines.append(f"| {r['batch']} | {r['tiles_ms']:.3f} | {_ms(r, 'tiles_pdl_ms')} | "
                             + " | ".join(f"{r[f + '_ms']:.3f} | {_ms(r, f + '_pdl_ms')}" for f in frags)
                             + f" | {best} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,4,16,64,128,256")
    ap.add_argument("--shapes", type=int, default=len(GEMM_SHAPES), help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--batches", default="1,4,16,64", help="decode batch sizes (comma-separated; empty: none)")
    ap.add_argument("--context", type=int, default=256, help="decode context length")
    ap.add_argument("--stem", default="frag_engine", help="result file name stem")
    ap.add_argument("--pdl", type=int, default=0, choices=(0, 1, 2),
                    help="also time each layout's decode step with programmatic dependent launch in this mode")
    ap.add_argument("--k-widths", default=None,
                    help="fragment orders to time row-major (comma-separated; default: the installed Triton's, then "
                         "the other; empty: none)")
    ap.add_argument("--tma", action="store_true",
                    help="also time each block-major order with the TMA kinds in its tuner's list (frag_tma)")
    ap.add_argument("--block-major", default=None,
                    help="fragment orders to time stored block-major too (comma-separated; default: the installed "
                         "Triton's; empty: none)")
    args = ap.parse_args()
    k_widths = ([int(w) for w in args.k_widths.split(",") if w] if args.k_widths is not None
                else [frag_k_width(), 6 - frag_k_width()])
    block_major = ([int(w) for w in args.block_major.split(",") if w] if args.block_major is not None
                   else [frag_k_width()])
    frags = frag_layouts(k_widths, block_major, args.tma)
    tuners, timer = (GemmTuner(skip_kinds=TMA_KINDS), GemmTuner()), Timer(args.reps)
    batches = [int(b) for b in args.batches.split(",") if b]

    def parts():
        for k, n in GEMM_SHAPES[:args.shapes]:
            yield gemm_rows(k, n, args.ms, tuners, timer, frags)
        if batches:
            yield from decode_rows(batches, args.context, timer, frags, args.pdl)

    run_probe_parts("probe_frag_engine.py", args.stem, args, parts(), write_markdown, k_widths=k_widths,
                    block_major=block_major, pdl=args.pdl, tma=args.tma)


if __name__ == "__main__":
    main()
