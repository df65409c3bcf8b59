"""Is the small-M W4A16 GEMM held by its reads or by its work per byte? A read-only roofline beside it.

At M <= 16 our GEMMs read DRAM at 1.1-1.9 TB/s of the ~3 TB/s a copy reaches (stream_k_*.md). The
per-call floor and the per-program pipeline depth are ruled out (stops 24-25). This probe streams,
over weight copies above 3x the L2 (as probe_gemm_stream), per issue shape:
- `flat`: a Triton kernel that reads the packed weights as one flat int32 array (16-byte loads, the
  best case of the bytes alone);
- `tiles BN/split/warps/stages`: a Triton kernel with the GEMV's grid and access pattern (a [16, BN] code
  tile per 128-row block of a [K/8, 128] column tile, the group's scales and zeros, split-K over K),
  doing one integer op per word instead of the dequantize-and-dot;
- our kernel at a fixed list of configs (gemv_h2 with BN 32 to 128 and 1 to 4 warps, each without and
  with its register double buffer; zsub mma8), and cuBLAS fp16.
If `tiles` is near `flat` and our kernel well above both, the work per byte holds it; if `tiles`
is as slow as our kernel, the access pattern does. Both 4-bit unpacking forms of h2_ptx
(INLAID_H2_DEQ=shift / fma) run, each in its own process (the form is fixed at import), in the same
call; each config's output is checked against the dequantized reference. Writes <out>/roofline.{json,md}.

  python benchmarks/probe_roofline.py --out DIR --commit SHA [--ms 1,16] [--shapes 5]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe  # noqa: E402
from services.engine.kernels.gemm_configs import GemmConfig  # noqa: E402
from services.engine.kernels.h2_ptx import H2_DEQ_FORMS  # noqa: E402

# (BN, split_k, warps, stages) of the read-only tile kernel: the GEMV's grids (gemv_h2 runs 1 stage), and two
# with Triton's software pipelining of the loads (3 stages)
TILE_GRIDS = [(32, 8, 2, 1), (32, 8, 4, 1), (64, 8, 4, 1), (128, 8, 1, 1), (128, 16, 1, 1), (128, 16, 2, 1),
              (128, 32, 1, 1), (32, 8, 4, 3), (128, 16, 1, 3)]
FLAT = [(1024, 4), (2048, 4), (4096, 8)]   # (words per program, warps) of the flat read

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below only run on the GPU machine
    triton = None

if triton is not None:
    @triton.jit
    def read_flat(p, out, n_words, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(p + offs, mask=offs < n_words, other=0)
        tl.store(out + tl.program_id(0), tl.sum(v ^ (v >> 7), axis=0))

    @triton.jit
    def read_tiles(qw_ptr, z_ptr, s_ptr, out_ptr, N, K, group_size, blocks_per_split, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_i = tl.arange(0, 16)
        offs_n = pid_n * BN + tl.arange(0, BN)
        tile = tl.multiple_of(((pid_n * BN) // 128) * (K // 8 * 128), 128)
        offs_c = tl.max_contiguous(tl.multiple_of((pid_n * BN) % 128 + tl.arange(0, BN), BN), BN)
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, K // 128)
        acc = tl.zeros((16, BN), dtype=tl.int32)
        zs = tl.zeros((BN,), dtype=tl.int32)
        for b in range(b_start, b_end):
            acc ^= tl.load(qw_ptr + tile + (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :])
            g = (b * 128) // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
            z = tl.load(z_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
            zs ^= s.to(tl.int16, bitcast=True).to(tl.int32) + z.to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(out_ptr + pid_k * N + offs_n, tl.sum(acc, axis=0) + zs, mask=offs_n < N)


def configs_for(m: int) -> list[GemmConfig]:
    """Our configs timed at m rows: gemv_h2 with its per-thread tile from 8 to 64 words (BN × rows
    over the warps), each without and with its register double buffer (num_stages 1 / 2), the buffer
    with the L2 prefetch of the block after (num_stages 3, not in the tuner's list until timed here),
    and the zsub mma8 the tuner picks at M <= 16."""
    mma = [GemmConfig("mma8", 16, bn, sk, 4, st, fast_deq=True, zsub=True)
           for bn, sk, st in ((64, 4, 3), (64, 8, 3), (64, 8, 2))]
    if m > 4:
        return mma
    return [GemmConfig("gemv_h2", 1, bn, sk, w, st, 1) for bn, sk, w in
            ((32, 8, 4), (32, 16, 4), (128, 16, 1), (128, 32, 1), (128, 16, 2), (128, 32, 2), (128, 16, 4),
             (128, 32, 4)) for st in (1, 2)] + \
        [GemmConfig("gemv_h2", 1, 128, sk, w, 3, 1) for sk in (4, 8, 16) for w in (1, 2)] + mma


def worker(args) -> list[dict]:
    """One process, one unpacking form: every shape's rows (reads, ours at each config, fp16)."""
    import torch
    from benchmarks.bench_gpu_kernels import GEMM_SHAPES, Timer
    from benchmarks.probe_gemm_stream import StreamOperands
    from services.engine.kernels.h2_ptx import H2_DEQ_FORM
    from services.engine.kernels.w4a16 import dequantize_fp16, w4a16_matmul

    timer = Timer(args.reps)
    rows = []
    for k, n in GEMM_SHAPES[:args.shapes]:
        ops = StreamOperands(k, n)
        kws = ops.kws
        words = [c.qweight.view(-1) for c in kws]
        row = {"form": H2_DEQ_FORM, "K": k, "N": n, "weight_bytes": ops.weight_bytes,
               "code_bytes": kws[0].qweight.numel() * 4, "reads": {}, "ours": {}, "fp16": {}}
        for block, warps in FLAT:
            out = torch.empty(triton.cdiv(words[0].numel(), block), dtype=torch.int32, device="cuda")
            row["reads"][f"flat {block}/{warps}w"] = timer.stream_ms(
                [lambda w=w: read_flat[(out.numel(),)](w, out, w.numel(), BLOCK=block, num_warps=warps)
                 for w in words]) * 1e3
        for bn, sk, warps, stages in TILE_GRIDS:
            bps = triton.cdiv(k // 128, sk)
            out = torch.empty(sk, n, dtype=torch.int32, device="cuda")
            grid = (triton.cdiv(n, bn), triton.cdiv(k // 128, bps))
            row["reads"][f"tiles {bn}/{sk}/{warps}w/{stages}st"] = timer.stream_ms(
                [lambda c=c: read_tiles[grid](c.qweight, c.zeros, c.scales, out, n, k, c.group_size, bps,
                                              BN=bn, num_warps=warps, num_stages=stages) for c in kws]) * 1e3
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").half()
            ref = x.float() @ dequantize_fp16(kws[0]).float()
            row["fp16"][m] = timer.stream_ms(ops.fp16_calls(x)) * 1e3
            for cfg in configs_for(m):
                name = f"M{m} {cfg.kind} BM{cfg.block_m} BN{cfg.block_n} sk{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"
                try:
                    got = w4a16_matmul(x, kws[0], cfg).float()
                except Exception as exc:  # noqa: BLE001 — a config the compiler rejects is recorded as such
                    row["ours"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    continue
                err = ((got - ref).norm() / ref.norm()).item()
                us = timer.stream_ms([lambda c=c: w4a16_matmul(x, c, cfg) for c in kws]) * 1e3
                row["ours"][name] = {"us": us, "rel_err": err, "M": m}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del ops, kws, words
        torch.cuda.empty_cache()
    return rows


def markdown(res: dict, path: Path) -> None:
    lines = [probe_title("Read-only roofline beside the small-M GEMM", res) + "\n",
             probe_command(res) + " µs per call, each "
             f"streamed as one CUDA graph over weight copies above 3× the L2 (medians of {res['reps']} replays). "
             "GB/s = the layer's packed codes + scales + zeros over the time (flat: the codes only). `flat`: "
             "the codes read as one int32 array; `tiles BN/split/warps/stages`: the GEMV's grid and access pattern "
             "with one integer op per word; ours: the GEMM at that config (gemv_h2 `st2`: its register double "
             "buffer; `st3`: with the L2 prefetch of the block after), with each h2_ptx unpacking form "
             "(`shift`, `fma`) in its own process; err = relative error against the dequantized reference.\n"]
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in res["rows"]:
        by_shape.setdefault((r["K"], r["N"]), {})[r["form"]] = r
    for (k, n), forms in by_shape.items():
        first = next(iter(forms.values()))
        wb, cb = first["weight_bytes"], first["code_bytes"]
        lines += [f"## {k}×{n} ({wb / 1e6:.1f} MB)\n", "| read | " + " | ".join(f"{f} µs" for f in forms)
                  + " | GB/s (best) |", "|---|" + "---|" * (len(forms) + 1)]
        for name in first["reads"]:
            t = [forms[f]["reads"][name] for f in forms]
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in t)
                         + f" | {(cb if name.startswith('flat') else wb) / (min(t) * 1e-6) / 1e9:.0f} |")
        lines += ["", "| ours | " + " | ".join(f"{f} µs (err)" for f in forms) + " | fp16 µs | ×fp16 (best form) | GB/s |",
                  "|---|" + "---|" * (len(forms) + 3)]
        for name in first["ours"]:
            cells, best = [], None
            for f in forms:
                o = forms[f]["ours"].get(name, {})
                if "us" in o:
                    cells.append(f"{o['us']:.1f} ({o['rel_err']:.0e})")
                    best = o["us"] if best is None else min(best, o["us"])
                else:
                    cells.append(o.get("error", "–")[:40])
            m = int(name.split()[0][1:])
            f16 = first["fp16"][str(m)] if str(m) in first["fp16"] else first["fp16"].get(m)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {f16:.1f} | "
                         + (f"{f16 / best:.2f} | {wb / (best * 1e-6) / 1e9:.0f} |" if best else "– | – |"))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1,16")
    ap.add_argument("--shapes", type=int, default=5, help="how many of bench_gpu_kernels' GEMM shapes")
    ap.add_argument("--worker", action="store_true", help="(internal) time one form, print its rows as JSON")
    ap.add_argument("--forms", default=",".join(H2_DEQ_FORMS))
    args = ap.parse_args()
    if args.worker:
        import torch
        torch.manual_seed(0)
        worker(args)
        return

    def rows() -> list[dict]:
        out = []
        for form in args.forms.split(","):
            env = dict(os.environ, INLAID_H2_DEQ=form, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton_{form}_"))
            cmd = [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--shapes", str(args.shapes),
                   "--ms", ",".join(map(str, args.ms))]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 and not got:
                raise RuntimeError(f"the {form} worker failed (rc {proc.returncode})")
            out += got
        return out

    run_probe("probe_roofline.py", "roofline", args, rows, markdown, forms=args.forms.split(","))


if __name__ == "__main__":
    main()
