"""Do Hopper's TMA loads lift the small-M W4A16 GEMM's read rate? Probe kernels beside the engine's.

Our M <= 16 GEMMs stream their packed weights at 1.1-1.9 TB/s where cuBLAS fp16 reaches 2.1-2.7, and a
kernel with the GEMV's access pattern that only reads gets within 1.15x of a flat read
(docs/results.md, "Reads alone beside the GEMM"): the gap is how each warp overlaps its loads with
the dequantize-and-dot. Both engine kernels load the codes into registers (gemv_h2, or mma8 through
cp.async with Triton's software pipelining). A TMA load is one bulk copy into shared memory that a
single thread issues and an mbarrier completes, so a program can keep several 128-row blocks in
flight with no registers or address math per thread. This probe streams, per issue shape (one CUDA
graph over weight copies above 3x the L2, as probe_gemm_stream):
- `tma read BN/split/stages`: the codes of the GEMV's grid fetched by TMA ([16, BN] boxes of the tiled
  layout's [K/8, 128] column tiles), one integer op per word;
- `tma mma BN/split/warps/stages`: the zsub mma8 body (h2_ptx dequantize, eight K=16 dots per
  block) on TMA-fed codes;
- `tma gemv BN/split/warps/stages` (M = 1): gemv_h2's packed dequantize-and-dot on TMA-fed codes;
- `tma frag BM/BN/split/warps/stages`: the engine's frag_tma (w4a16_frag: block-major fragment codes in the
  installed Triton's k_width, zero subtracted in fp16, [BN/8, 128] code boxes fetched by TMA);
- the engine's GEMM at its tuner's pick, and cuBLAS fp16.
Every config's output is checked against the dequantized reference. Writes <out>/<stem>.{json,md}.

  python benchmarks/probe_tma.py --out DIR --commit SHA [--ms 1,4,16,64] [--shapes 5]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe_parts  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below only run on the GPU machine
    triton = None

# (BN, split_k, stages) of the TMA read; (BN, split_k, warps, stages) of the TMA GEMMs
READ_GRIDS = [(64, 8, 3), (128, 8, 3), (128, 16, 4), (128, 8, 6), (64, 16, 6)]
MMA_GRIDS = [(16, 64, 8, 4, 3), (16, 64, 8, 4, 5), (16, 128, 8, 4, 4), (16, 128, 4, 4, 6), (16, 64, 4, 4, 6),
             (16, 128, 16, 4, 3)]
FRAG_GRIDS = [(16, 256, 4, 4, 3), (16, 256, 8, 4, 4), (16, 128, 8, 4, 4), (16, 256, 2, 4, 6), (16, 128, 16, 4, 3)]
LARGE_GRIDS = [(64, 128, 1, 4, 3), (64, 128, 2, 4, 4), (64, 64, 2, 4, 4), (64, 128, 1, 8, 4)]  # M = 64, mma and frag
GEMV_GRIDS = [(64, 8, 2, 3), (128, 8, 4, 3), (128, 16, 4, 4), (128, 8, 2, 5), (64, 16, 1, 4)]

if triton is not None:
    from services.engine.kernels.w4a16_frag import frag_k_width, frag_matmul
    from services.engine.kernels.w4a16_tiles import fp16_bits, h2_block_dot, h2_deq, x_pair

    @triton.jit
    def _k_range(pid_k, K, blocks_per_split):
        b_start = pid_k * blocks_per_split
        return b_start, tl.minimum(b_start + blocks_per_split, K // 128)

    @triton.jit
    def tma_read(qw_desc, out_ptr, N, K, blocks_per_split, BN: tl.constexpr, STAGES: tl.constexpr):
        """Read one column tile's K range of codes by TMA; one xor per word (the probe's floor)."""
        pid_n = tl.program_id(0)
        b_start, b_end = _k_range(tl.program_id(1), K, blocks_per_split)
        row0 = ((pid_n * BN) // 128) * (K // 8)
        col = (pid_n * BN) % 128
        acc = tl.zeros((16, BN), dtype=tl.int32)
        for b in tl.range(b_start, b_end, num_stages=STAGES):
            acc ^= qw_desc.load([row0 + b * 16, col])
        offs_n = pid_n * BN + tl.arange(0, BN)
        tl.store(out_ptr + tl.program_id(1) * N + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)

    @triton.jit
    def tma_mma(x_ptr, qw_desc, z_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, group_size,
                blocks_per_split, BM: tl.constexpr, BN: tl.constexpr):
        """The engine's zsub mma8 (H2DEQ) body with the codes fetched by TMA; split-K by fp16 atomics."""
        pid_n = tl.program_id(0)
        b_start, b_end = _k_range(tl.program_id(1), K, blocks_per_split)
        offs_m = tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        row0 = ((pid_n * BN) // 128) * (K // 8)
        col = (pid_n * BN) % 128
        offs_i = tl.arange(0, 16)
        x_row = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for b in range(b_start, b_end):
            q = qw_desc.load([row0 + b * 16, col])
            g = (b * 128) // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z16 = (z + 1024.0).to(tl.float16)[None, :]
            ws = h2_deq(q, q, fp16_bits(z16) * 65537, 4)
            part = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_row + (b * 128 + 16 * j + offs_i)[None, :], mask=mask_m[:, None], other=0.0)
                part = tl.dot(xj, ws[j], part)
            acc += part * s[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.atomic_add(out, acc.to(tl.float16), mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")

    @triton.jit
    def tma_gemv(x_ptr, qw_desc, z_ptr, s_ptr, out_ptr, N, K, group_size, blocks_per_split, BN: tl.constexpr,
                 STAGES: tl.constexpr):
        """gemv_h2's packed dequantize-and-dot (one row of x) with the codes fetched by TMA."""
        pid_n = tl.program_id(0)
        b_start, b_end = _k_range(tl.program_id(1), K, blocks_per_split)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        offs_i = tl.arange(0, 16)
        row0 = ((pid_n * BN) // 128) * (K // 8)
        col = (pid_n * BN) % 128
        acc = tl.zeros((16, BN), dtype=tl.float32)
        for b in tl.range(b_start, b_end, num_stages=STAGES):   # no dot: the loop asks for its pipelining
            q = qw_desc.load([row0 + b * 16, col])
            g = (b * 128) // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            x_blk = x_ptr + b * 128
            acc += h2_block_dot(q, q, s, z, x_pair(x_blk, 0, offs_i, K, False, False),
                                x_pair(x_blk, 1, offs_i, K, False, False), x_pair(x_blk, 2, offs_i, K, False, False),
                                x_pair(x_blk, 3, offs_i, K, False, False), 4, False)
        tl.atomic_add(out_ptr + offs_n, (tl.sum(acc, axis=0) * 32.0).to(tl.float16), mask=mask_n, sem="relaxed")


def code_desc(kw, bn: int):
    """A TMA descriptor over the tiled layout's codes viewed as [N/128 · K/8, 128] int32, box [16, bn]."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    k, n = kw.in_features, kw.out_features
    if n % 128 or k % 128:
        raise ValueError(f"TMA probe needs K and N divisible by 128, got {k}x{n}")
    return TensorDescriptor.from_tensor(kw.qweight.view(n // 128 * k // 8, 128), [16, bn])


def tma_call(kind: str, x, kw, out, grid_cfg: tuple):
    """A launch closure of one probe kernel on one copy of the weights (out accumulates: the caller zeroes
    it for a checked call)."""
    k, n = kw.in_features, kw.out_features
    bm = 1
    if kind == "read":
        bn, sk, stages = grid_cfg
        warps = 4
    elif kind == "gemv":
        bn, sk, warps, stages = grid_cfg
    else:
        bm, bn, sk, warps, stages = grid_cfg
    if x is not None and x.shape[0] > bm:
        raise ValueError(f"{kind} BM {bm} < M {x.shape[0]}: the probe runs one row tile")
    bps = triton.cdiv(k // 128, sk)
    grid = (n // bn, triton.cdiv(k // 128, bps))
    if kind == "frag":   # the engine's kernel, as its tuner would launch a frag_tma config
        return lambda: frag_matmul(x, kw, "frag_tma", bm, bn, sk, num_warps=warps, num_stages=stages, zsub=True,
                                   fma=True, accumulate=out)
    desc = code_desc(kw, bn)
    if kind == "read":
        return lambda: tma_read[grid](desc, out, n, k, bps, BN=bn, STAGES=stages, num_warps=warps, num_stages=stages)
    if kind == "mma":
        return lambda: tma_mma[grid](x, desc, kw.zeros, kw.scales, out, x.shape[0], n, k, x.stride(0), out.stride(0),
                                     kw.group_size, bps, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    return lambda: tma_gemv[grid](x, desc, kw.zeros, kw.scales, out, n, k, kw.group_size, bps, BN=bn,
                                  STAGES=stages, num_warps=warps, num_stages=stages)


def shape_rows(args):
    """Per issue shape, a one-row list, measured lazily (run_probe_parts rewrites the files after each)."""
    import torch
    from benchmarks.bench_gpu_kernels import GEMM_SHAPES, Timer
    from benchmarks.probe_gemm_stream import StreamOperands
    from services.engine.kernels.gemm_tuner import GemmTuner
    from services.engine.kernels.gptq_format import to_fragment_order
    from services.engine.kernels.w4a16 import dequantize_fp16, w4a16_matmul

    torch.manual_seed(0)
    timer = Timer(args.reps)
    tuner = GemmTuner()
    for k, n in GEMM_SHAPES[:args.shapes]:
        ops = StreamOperands(k, n)
        kws = ops.kws
        kwfs = [to_fragment_order(c, frag_k_width(), block_major=True) for c in kws]
        row = {"K": k, "N": n, "weight_bytes": ops.weight_bytes, "code_bytes": kws[0].qweight.numel() * 4,
               "reads": {}, "fp16": {}, "ours": {}, "tma": {}}
        for g in READ_GRIDS:
            sink = torch.empty(g[1] + 1, n, dtype=torch.int32, device="cuda")
            try:
                row["reads"][f"tma read {g[0]}/{g[1]}/{g[2]}st"] = timer.stream_ms(
                    [tma_call("read", None, c, sink, g) for c in kws]) * 1e3
            except Exception as exc:  # noqa: BLE001 — a config the compiler rejects is recorded as such
                row["reads"][f"tma read {g[0]}/{g[1]}/{g[2]}st"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        row["reads"]["torch.amax"] = timer.stream_ms([lambda c=c: torch.amax(c.qweight) for c in kws]) * 1e3
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").half()
            ref = x.float() @ dequantize_fp16(kws[0]).float()
            row["fp16"][m] = timer.stream_ms(ops.fp16_calls(x)) * 1e3
            cfg = tuner.config_for(x, kws[0])
            kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
            row["ours"][m] = {"config": str(cfg), "us": timer.stream_ms(
                [lambda c=c: w4a16_matmul(x, c, cfg, accumulate=kept) for c in kws]) * 1e3}
            if m > 16:
                kinds = [("mma", g) for g in LARGE_GRIDS] + [("frag", g) for g in LARGE_GRIDS]
            else:
                kinds = [("mma", g) for g in MMA_GRIDS] + [("frag", g) for g in FRAG_GRIDS] + \
                    ([("gemv", g) for g in GEMV_GRIDS] if m == 1 else [])
            for kind, g in kinds:
                name = f"M{m} tma {kind} " + "/".join(map(str, g))
                out = torch.zeros(m, n, dtype=torch.float16, device="cuda")
                weights = kwfs if kind == "frag" else kws
                try:
                    tma_call(kind, x, weights[0], out, g)()
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    us = timer.stream_ms([tma_call(kind, x, c, out, g) for c in weights]) * 1e3
                except Exception as exc:  # noqa: BLE001
                    row["tma"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    continue
                row["tma"][name] = {"us": us, "rel_err": err, "M": m}
        del ops, kws, kwfs
        torch.cuda.empty_cache()
        yield [row]


def markdown(res: dict, path: Path) -> None:
    lines = [probe_title("TMA-fed W4A16 kernels beside the engine's GEMM", res) + "\n",
             probe_command(res) + " µs per call, each streamed as one CUDA graph over weight copies above 3× the L2 "
             f"(medians of {res['reps']} replays). GB/s: the layer's packed codes + scales + zeros over the time "
             "(reads: the codes only). Ours: the engine's GEMM at its tuner's pick. err: relative error against "
             "the dequantized reference.\n"]
    for r in res["rows"]:
        wb, cb = r["weight_bytes"], r["code_bytes"]
        lines += [f"## {r['K']}×{r['N']} ({wb / 1e6:.1f} MB)\n", "| read | µs | GB/s |", "|---|---|---|"]
        for name, us in r["reads"].items():
            lines.append(f"| {name} | {us:.1f} | {cb / (us * 1e-6) / 1e9:.0f} |" if isinstance(us, float)
                         else f"| {name} | {us[:60]} | – |")
        lines += ["", "| M | kernel | µs | err | ×fp16 | ÷ ours | GB/s |", "|---|---|---|---|---|---|---|"]
        for m, f16 in r["fp16"].items():
            ours = r["ours"][m]
            lines.append(f"| {m} | fp16 cuBLAS | {f16:.1f} | | 1.00 | | |")
            lines.append(f"| {m} | ours ({ours['config']}) | {ours['us']:.1f} | | {f16 / ours['us']:.2f} | 1.00 | "
                         f"{wb / (ours['us'] * 1e-6) / 1e9:.0f} |")
            for name, t in r["tma"].items():
                if not name.startswith(f"M{m} "):
                    continue
                if "us" not in t:
                    lines.append(f"| {m} | {name[len(f'M{m} '):]} | {t['error'][:70]} | | | | |")
                    continue
                lines.append(f"| {m} | {name[len(f'M{m} '):]} | {t['us']:.1f} | {t['rel_err']:.0e} | "
                             f"{f16 / t['us']:.2f} | {ours['us'] / t['us']:.2f} | {wb / (t['us'] * 1e-6) / 1e9:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,4,16")
    ap.add_argument("--shapes", type=int, default=5, help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--stem", default="tma")
    args = ap.parse_args()
    run_probe_parts("probe_tma.py", args.stem, args, shape_rows(args), markdown)


if __name__ == "__main__":
    main()
