"""W4A16 GEMMs back to back over cold weights (as in a decode pass) beside the single-call timing.

bench_gpu_kernels times one GEMM per CUDA-graph replay after an L2 flush; at M <= 16 that call
pays a ~5 us launch-and-event floor and a cold start of the memory pipeline that a 4-bit layer's
8-45 MB cannot amortise (gemm_overhead_bf0a9f9.md). A decode pass runs its GEMMs one after another
instead. Here each implementation runs as one graph over enough copies of the layer's weights to
exceed 3x the L2 (so every call reads its weights from DRAM, as after a flush), and the time per
call is the replay's time over the number of copies. Both timings are taken in the same run, for
ours (the engine's form: split-K partials into a buffer the preceding norm has zeroed; and as a
standalone call that zeroes its own output), cuBLAS fp16, torch's int4 kernel and a plain read of
the packed weights (torch.amax), at the issue's shapes and M. With --pdl, ours is also streamed
under programmatic dependent launch modes 1 and 2 (kernels/pdl.py). Writes <out>/gemm_stream.{json,md}.

  python benchmarks/probe_gemm_stream.py --out DIR --commit SHA [--ms 1,4,16,64,128] [--pdl]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import GEMM_SHAPES, GROUP, Timer, quantized_layer, torch_int4_pack  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe  # noqa: E402
from services.engine.kernels import pdl  # noqa: E402
from services.engine.kernels.gemm_configs import m_bucket  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner, L2_MULTIPLE, with_clones  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

MAX_COPIES = 64
IMPLS = ["ours", "ours_alone", "fp16", "int4", "read"]   # streamed; ours_pdl1/2 join with --pdl
SINGLE = ["ours", "fp16", "int4"]                         # single call after a flush (bench_gpu_kernels' timing)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return min(MAX_COPIES, max(2, math.ceil(L2_MULTIPLE * l2 / nbytes)))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class StreamOperands:
    """One of the issue's layers in every form the streamed probes time, each with enough copies
    to exceed L2_MULTIPLE x the L2: ours (kws, kw the first), cuBLAS fp16 (w16s) and torch int4
    (int4s, empty where torch's pack fails)."""

    def __init__(self, k: int, n: int) -> None:
        t, ref_w, self.kw = quantized_layer(torch.randn(k, n, device="cuda") * k ** -0.5, 4)
        w16 = ref_w.t().contiguous().half()
        del ref_w
        try:
            w4p, sz = torch_int4_pack(t, "cuda")
        except RuntimeError as exc:
            print(f"torch int4 pack failed for {k}x{n}: {exc}")
            w4p = sz = None
        self.weight_bytes = nbytes(self.kw.qweight, self.kw.zeros, self.kw.scales)
        self.kws = with_clones(self.kw, copies_for(self.weight_bytes))
        self.w16s = [w16] + [w16.clone() for _ in range(copies_for(nbytes(w16)) - 1)]
        self.int4s = [] if w4p is None else \
            [(w4p, sz)] + [(w4p.clone(), sz.clone()) for _ in range(copies_for(nbytes(w4p, sz)) - 1)]

    def fp16_calls(self, x: torch.Tensor) -> list:
        return [lambda w=w: F.linear(x, w) for w in self.w16s]

    def int4_calls(self, x: torch.Tensor) -> list:
        xb = x.bfloat16()
        return [lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(xb, p, GROUP, s) for p, s in self.int4s]


def probe_shape(k: int, n: int, ms: list[int], tuner: GemmTuner, timer: Timer, pdl_modes: list[int]) -> list[dict]:
    ops = StreamOperands(k, n)
    kw, kws, w16s, int4s, ours_bytes = ops.kw, ops.kws, ops.w16s, ops.int4s, ops.weight_bytes
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        cfg = tuner.config_for(x, kw)
        kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
        calls = {
            "ours": [lambda c=c: w4a16_matmul(x, c, cfg, accumulate=kept) for c in kws],
            "ours_alone": [lambda c=c: w4a16_matmul(x, c, cfg) for c in kws],
            "fp16": ops.fp16_calls(x),
            "int4": ops.int4_calls(x),
            "read": [lambda c=c: torch.amax(c.qweight) for c in kws],
        }
        timed = sorted(tuner.timings_ms.get((m_bucket(m), n, k, kw.bits), []), key=lambda r: r[1])
        row = {"K": k, "N": n, "M": m, "config": str(cfg), "weight_bytes": ours_bytes,
               "tuner_top": [[str(c), t * 1e3] for c, t in timed[:6]],   # the tuner's own streamed µs
               "copies": {"ours": len(kws), "fp16": len(w16s), "int4": len(int4s)}}
        for name, fns in calls.items():
            row[f"{name}_stream_us"] = timer.stream_ms(fns) * 1e3 if fns else None
        for mode in pdl_modes:
            pdl.set_pdl(mode)
            try:
                row[f"ours_pdl{mode}_stream_us"] = timer.stream_ms(calls["ours"]) * 1e3
            finally:
                pdl.set_pdl(0)
        single = {"ours": calls["ours"][0], "fp16": calls["fp16"][0], "int4": calls["int4"][0] if int4s else None}
        for name, fn in single.items():
            row[f"{name}_single_us"] = timer.median_ms(fn) * 1e3 if fn else None
        rows.append(row)
        print(f"K={k:5d} N={n:5d} M={m:3d}  stream: " + " ".join(
            f"{name} {row[name + '_stream_us']:.1f}" for name in IMPLS if row[name + "_stream_us"] is not None)
            + "".join(f" pdl{md} {row[f'ours_pdl{md}_stream_us']:.1f}" for md in pdl_modes)
            + "  single: " + " ".join(f"{name} {row[name + '_single_us']:.1f}" for name in SINGLE
                                       if row[name + "_single_us"] is not None) + f"  ({cfg})", flush=True)
    del ops, kws, w16s, int4s
    torch.cuda.empty_cache()
    return rows


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def write_markdown(res: dict, path: Path) -> None:
    pdl_cols = [f"ours_pdl{m}" for m in res["pdl_modes"]]
    lines = [probe_title("W4A16 GEMM streamed over cold weights vs one call after a flush", res) + "\n",
             probe_command(res) + " µs per call, medians of "
             f"{res['reps']} replays. **stream**: one CUDA graph calling the GEMM on copies of the weights that "
             "together exceed 3× the L2 (every call reads DRAM, back to back as in a decode pass), time / copies. "
             "**single**: one call per replay after a 256 MB L2 flush (bench_gpu_kernels' timing). `ours` is the "
             "engine's form (split-K partials into an output the preceding norm zeroed), `alone` zeroes its own "
             "output, `read` is torch.amax over the packed 4-bit weights, `int4` is torch._weight_int4pack_mm.\n",
             "| K×N | M | ours | alone | " + " | ".join(pdl_cols + ["fp16", "int4", "read"])
             + " | ×fp16 stream | ×int4 stream | ×fp16 single | ×int4 single | ours GB/s stream | config |",
             "|---|---|" + "---|" * (len(pdl_cols) + 11)]
    fmt = lambda v: f"{v:.1f}" if v else "–"  # noqa: E731
    for r in res["rows"]:
        best = min(v for v in [r["ours_stream_us"]] + [r[c + "_stream_us"] for c in pdl_cols] if v)
        cells = [fmt(r[c + "_stream_us"]) for c in ["ours", "ours_alone"] + pdl_cols + ["fp16", "int4", "read"]]
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | " + " | ".join(cells)
                     + f" | {ratio(r['fp16_stream_us'], best)} | {ratio(r['int4_stream_us'], best)}"
                     f" | {ratio(r['fp16_single_us'], r['ours_single_us'])} | {ratio(r['int4_single_us'], r['ours_single_us'])}"
                     f" | {r['weight_bytes'] / (best * 1e-6) / 1e9:.0f} | {r['config']} |")
    lines.append("\n×fp16 / ×int4 stream use the fastest streamed form of ours (with or without PDL); "
                 "single uses the engine's form after a flush.")
    for m in sorted({r["M"] for r in res["rows"]}):
        sel = [r for r in res["rows"] if r["M"] == m]
        sf = [r["fp16_stream_us"] / r["ours_stream_us"] for r in sel]
        si = [r["int4_stream_us"] / r["ours_stream_us"] for r in sel if r["int4_stream_us"]]
        lines.append(f"- M = {m}: ours (no PDL) ×fp16 streamed {min(sf):.2f}–{max(sf):.2f}"
                     + (f", ×int4 {min(si):.2f}–{max(si):.2f}" if si else ""))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,4,16,64,128")
    ap.add_argument("--shapes", type=int, default=len(GEMM_SHAPES), help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--pdl", action="store_true", help="also stream ours under PDL modes 1 and 2")
    args = ap.parse_args()
    pdl_modes = [m for m in (1, 2) if args.pdl and pdl.set_pdl(m) == m]
    pdl.set_pdl(0)
    tuner, timer = GemmTuner(), Timer(args.reps)
    run_probe("probe_gemm_stream.py", "gemm_stream", args,
              lambda: [row for k, n in GEMM_SHAPES[:args.shapes]
                       for row in probe_shape(k, n, args.ms, tuner, timer, pdl_modes)],
              write_markdown, pdl_modes=pdl_modes)


if __name__ == "__main__":
    main()
