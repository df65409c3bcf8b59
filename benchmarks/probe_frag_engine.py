"""The fragment-ordered 4-bit layout as the engine serves it (EngineConfig.w4_layout = "frag") beside the
tiled layout, in one process on one GPU.

Part 1, GEMMs: per issue shape and M, the GEMM tuner picks a config for each layout from its own candidate
list (gemm_configs.candidate_configs(m, frag)) and both picks are streamed over cold weights beside cuBLAS
fp16 (one CUDA graph over copies of the layer that exceed 3x the L2, as probe_gemm_stream). Part 2, the
graphed decode step of random-weight Llama-2-7B (W4Decoder, 4-bit g128, fused RoPE + attention as the
serving default) per batch size: tiled, then the same model converted to fragment order, then tiled again
(the drift between the two tiled timings bounds what the comparison can resolve). Every pick is checked by
the tuner against the float32 reference (relative error <= 1e-2). Writes <out>/<stem>.{json,md}.

  python benchmarks/probe_frag_engine.py --out DIR --commit SHA [--ms 1,4,16,64,128,256] [--batches 1,4,16,64]
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import (  # noqa: E402
    DECODE_BLOCK, GEMM_SHAPES, Timer, copy_bandwidth_gbs, decode_floor, decode_inputs, decode_model,
)
from benchmarks.probe_gemm_stream import StreamOperands, ratio  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe_parts  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.gptq_format import to_fragment_order  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402
from services.engine.kernels.w4a16_frag import frag_k_width  # noqa: E402


def gemm_rows(k: int, n: int, ms: list[int], tuner: GemmTuner, timer: Timer, k_width: int) -> list[dict]:
    ops = StreamOperands(k, n)
    fws = [to_fragment_order(c, k_width) for c in ops.kws]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
        row = {"part": "gemm", "K": k, "N": n, "M": m, "fp16_us": timer.stream_ms(ops.fp16_calls(x)) * 1e3}
        for name, kws in (("tiles", ops.kws), ("frag", fws)):
            cfg = tuner.config_for(x, kws[0])
            row[f"{name}_config"] = str(cfg)
            row[f"{name}_us"] = timer.stream_ms([lambda c=c: w4a16_matmul(x, c, cfg, accumulate=kept)
                                                 for c in kws]) * 1e3
        rows.append(row)
        print(f"K={k:5d} N={n:5d} M={m:3d}  fp16 {row['fp16_us']:.1f}  tiles {row['tiles_us']:.1f}  "
              f"frag {row['frag_us']:.1f}  ×fp16 tiles {row['fp16_us'] / row['tiles_us']:.2f} "
              f"frag {row['fp16_us'] / row['frag_us']:.2f}", flush=True)
    del ops, fws
    torch.cuda.empty_cache()
    return rows


def decode_rows(batches: list[int], ctx: int, timer: Timer, k_width: int) -> Iterator[list[dict]]:
    """Per batch size (one part each, so a cut run keeps the batches it timed): the graphed step in
    the tiled layout, in fragment order, and tiled again, beside the step's floor."""
    bw = copy_bandwidth_gbs(timer)
    model = decode_model(False, ctx, max(batches), 4)
    model.fused_decode_attention = True
    rows = []
    for bsz in batches:
        inputs = decode_inputs(bsz, ctx, DECODE_BLOCK, model.shape.vocab, None)
        floor_ms = decode_floor(model, bsz, ctx, bw)[0]
        row = {"part": "decode", "batch": bsz, "context": ctx, "floor_ms": floor_ms, "copy_gbs": bw}
        for key, frag in (("tiles_ms", 0), ("frag_ms", k_width), ("tiles_again_ms", 0)):
            model.set_layout(frag)
            row[key] = timer.median_ms(lambda: model.decode(**inputs))
        rows.append(row)
        print(f"decode B={bsz:2d}: tiles {row['tiles_ms']:.3f} ms  frag {row['frag_ms']:.3f} ms  tiles again "
              f"{row['tiles_again_ms']:.3f} ms  floor {floor_ms:.3f} ms", flush=True)
        yield rows[-1:]
        torch.cuda.empty_cache()


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("The fragment-ordered 4-bit layout in the engine beside the tiled one", res) + "\n",
             probe_command(res) + f" Fragment order k_width {res['k_width']}. GEMMs: µs per call streamed over "
             f"cold weights (one CUDA graph over weight copies that exceed 3× the L2), medians of {res['reps']} "
             "replays, each layout at the config its GEMM tuner picked from its own candidate list "
             "(gemm_configs.candidate_configs(m, frag)). Decode: graphed step of random-weight Llama-2-7B, 4-bit "
             "g128, fused RoPE + attention, L2 flushed before each replay; tiled, fragment order, tiled again.\n",
             "| K×N | M | fp16 µs | tiles µs | frag µs | ×fp16 tiles | ×fp16 frag | tiles / frag | tiles config | frag config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in res["rows"] if r["part"] == "gemm"):
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['fp16_us']:.1f} | {r['tiles_us']:.1f} | {r['frag_us']:.1f} | "
                     f"{ratio(r['fp16_us'], r['tiles_us'])} | {ratio(r['fp16_us'], r['frag_us'])} | "
                     f"{ratio(r['tiles_us'], r['frag_us'])} | {r['tiles_config']} | {r['frag_config']} |")
    dec = [r for r in res["rows"] if r["part"] == "decode"]
    if dec:
        lines += ["\n| batch | tiles ms | frag ms | tiles again ms | tiles / frag | floor ms | frag / floor |",
                  "|---|---|---|---|---|---|---|"]
        for r in dec:
            tiles = min(r["tiles_ms"], r["tiles_again_ms"])
            lines.append(f"| {r['batch']} | {r['tiles_ms']:.3f} | {r['frag_ms']:.3f} | {r['tiles_again_ms']:.3f} | "
                         f"{ratio(tiles, r['frag_ms'])} | {r['floor_ms']:.3f} | {ratio(r['frag_ms'], r['floor_ms'])} |")
        lines.append("\ntiles / frag uses the faster of the two tiled timings.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,4,16,64,128,256")
    ap.add_argument("--shapes", type=int, default=len(GEMM_SHAPES), help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--batches", default="1,4,16,64", help="decode batch sizes (comma-separated; empty: none)")
    ap.add_argument("--context", type=int, default=256, help="decode context length")
    ap.add_argument("--stem", default="frag_engine", help="result file name stem")
    args = ap.parse_args()
    k_width = frag_k_width()
    tuner, timer = GemmTuner(), Timer(args.reps)
    batches = [int(b) for b in args.batches.split(",") if b]

    def parts():
        for k, n in GEMM_SHAPES[:args.shapes]:
            yield gemm_rows(k, n, args.ms, tuner, timer, k_width)
        if batches:
            yield from decode_rows(batches, args.context, timer, k_width)

    run_probe_parts("probe_frag_engine.py", args.stem, args, parts(), write_markdown, k_width=k_width)


if __name__ == "__main__":
    main()
