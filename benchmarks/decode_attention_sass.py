"""Static sm_90 SASS of the paged decode attention kernels (kernels/attention.py) per launch shape,
compiled on any machine (no GPU) with whatever Triton is importable: instructions, global loads,
asynchronous copies (LDGSTS: Triton pipelined the loop) and local-memory spills (STL), with and
without the KV loop's register double buffer (PREFETCH).

It says which launch shapes benchmarks/probe_decode_attention.py should time on the GPU. Writes
<out>/<stem>.{json,md}.

  PYTHONPATH=/tmp/t36 python benchmarks/decode_attention_sass.py --out benchmarks/results --stem decode_attention_sass_t36
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_sass import disassemble, instructions  # noqa: E402
from benchmarks.results_io import git_commit  # noqa: E402
from services.engine.kernels import attention as A  # noqa: E402
from services.engine.kernels.aot import compile_kernel  # noqa: E402

_CACHE = {"stride_cb": "i32", "stride_ct": "i32", "stride_ch": "i32", "stride_btb": "i32",
          "stride_ob": "i32", "stride_oh": "i32"}
ROPE_SIGNATURE = {
    "qkv_ptr": "*fp16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
    "k_ptr": "*fp16", "v_ptr": "*fp16", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp16",
    "part_ptr": "*fp32", "scale": "fp32", "block_size": "i32", "num_heads": "i32", "num_kv_heads": "i32",
    "q_per_kv": "i32", "stride_qkv": "i32", **_CACHE, "D": "constexpr", "BN": "constexpr", "STEP_STOP": "constexpr",
    "PDL": "constexpr", "PREFETCH": "constexpr", "SPLIT": "constexpr", "DOT": "constexpr", "V_BS": "constexpr"}
PLAIN_SIGNATURE = {
    "q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp16",
    "scale": "fp32", "block_size": "i32", "q_per_kv": "i32", "stride_qb": "i32", "stride_qh": "i32", **_CACHE,
    "D": "constexpr", "BN": "constexpr", "PDL": "constexpr", "PREFETCH": "constexpr", "DOT": "constexpr",
    "V_BS": "constexpr"}


# Arguments a launch at Llama-2-7B's shapes passes as multiples of 16 (pointers; block size 16, 32 heads,
# strides of whole heads or rows), which Triton's JIT marks divisible by 16 at run time: marked here too,
# so the loads vectorize as they do on the GPU. The block-table row stride (blocks per sequence) varies.
ROPE_ALIGNED = (*range(11), 12, 13, 14, 16, 17, 18, 19, 21, 22)
PLAIN_ALIGNED = (*range(6), 7, 9, 10, 11, 12, 13, 15, 16)


def count(kernel: str, block_n: int, warps: int, stages: int, prefetch: bool = False, head_dim: int = 128,
          dot: bool = False, kv: str = "fp16", v_layout: str = "k") -> dict:
    """Static SASS counts of one decode kernel's launch shape; kv: the cache's element type (fp16 | fp8);
    v_layout: V in K's layout ("k") or token-major within 16-token blocks ("token_major")."""
    if kernel == "rope":
        fn, sig, aligned = A._paged_decode_rope_kernel, ROPE_SIGNATURE, ROPE_ALIGNED
        consts = {"STEP_STOP": 0, "SPLIT": False}
    else:
        fn, sig, consts, aligned = A._paged_decode_kernel, PLAIN_SIGNATURE, {}, PLAIN_ALIGNED
    if kv == "fp8":
        sig = {**sig, "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"}
    cubin = compile_kernel(fn, sig, {"D": head_dim, "BN": block_n, "PDL": False, "PREFETCH": prefetch, "DOT": dot,
                                     "V_BS": 16 if v_layout == "token_major" else 0, **consts},
                           warps, stages, aligned=aligned)
    ops = [op for _, op, _ in instructions(disassemble(cubin))]
    return {"kernel": kernel, "kv": kv, "v_layout": v_layout, "block_n": block_n, "num_warps": warps, "num_stages": stages, "prefetch": prefetch,
            "dot": dot,
            "instructions": len(ops),
            "global_loads": sum(op.split(".")[0] == "LDG" for op in ops),
            "async_copies": sum(op.startswith("LDGSTS") for op in ops),
            "byte_shared_loads": sum(op.startswith("LDS.U8") for op in ops),
            "ldmatrix": sum(op.startswith("LDSM") for op in ops),
            "spill_stores": sum(op.startswith("STL") for op in ops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="decode_attention_sass")
    ap.add_argument("--block-n", default="16,32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,3", help="Triton pipeline depths to compile")
    ap.add_argument("--prefetch", default="0,1", help="the KV loop's register double buffer off / on")
    ap.add_argument("--dot", default="0", help="the tile math on tensor cores off / on (DOT ignores prefetch)")
    ap.add_argument("--kv", default="fp16", help="cache element types to compile for: fp16, fp8 (e4m3)")
    ap.add_argument("--v-layout", default="k", help="V cache layouts: k (K's), token_major (within blocks)")
    args = ap.parse_args()
    import triton
    t0 = time.time()
    ints = lambda text: [int(v) for v in text.split(",") if v]   # noqa: E731
    kvs = [kv for kv in args.kv.split(",") if kv]
    if set(kvs) - {"fp16", "fp8"}:
        raise SystemExit(f"--kv takes fp16 and/or fp8, got {args.kv!r}")
    layouts = [v for v in args.v_layout.split(",") if v]
    if set(layouts) - {"k", "token_major"}:
        raise SystemExit(f"--v-layout takes k and/or token_major, got {args.v_layout!r}")
    rows = [count(kernel, bn, w, s, bool(pf) and not dot, dot=bool(dot), kv=kv, v_layout=vl)
            for kernel in ("rope", "plain")
            for kv, vl, dot, pf, bn, w, s in itertools.product(kvs, layouts, ints(args.dot), ints(args.prefetch),
                                                               ints(args.block_n), ints(args.warps), ints(args.stages))
            if not (dot and pf)]
    res = {"triton": triton.__version__, "commit": git_commit(), "arch": "sm_90", "head_dim": 128,
           "default": {"block_n": A.DECODE_BLOCK_N, "num_warps": A.DECODE_WARPS, "num_stages": A.DECODE_STAGES,
                       "dot": A.DECODE_DOT},
           "command": "python benchmarks/decode_attention_sass.py " + " ".join(sys.argv[1:]), "rows": rows,
           "wall_s": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Paged decode attention: static sm_90 SASS per launch shape (Triton {res['triton']}, commit "
             f"{res['commit']})", "",
             f"Command: `{res['command']}` (no GPU: compiled for sm_90 here). Head dim 128, the "
             "arguments that are multiples of 16 at Llama-2-7B's shapes marked so (as Triton's JIT does). The engine's "
             f"default: BN {A.DECODE_BLOCK_N}, {A.DECODE_WARPS} warps, Triton's default stages, tile math on "
             f"{'tensor' if A.DECODE_DOT else 'CUDA'} cores. LDGSTS > 0 means Triton pipelined the KV loop; LDS.U8: "
             "shared-memory loads of one byte (an fp8 tile read element by element); LDSM: ldmatrix; STL counts "
             "spill stores to local memory.", "",
             "| kernel | cache | V layout | prefetch | dot | BN | warps | stages | instructions | LDG | LDGSTS | LDS.U8 "
             "| LDSM | STL (spills) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r.get('kv', 'fp16')} | {r.get('v_layout', 'k')} | {'on' if r['prefetch'] else 'off'} "
              f"| {'on' if r.get('dot') else 'off'} | "
              f"{r['block_n']} | {r['num_warps']} | "
              f"{r['num_stages']} | {r['instructions']} | "
              f"{r['global_loads']} | {r['async_copies']} | {r.get('byte_shared_loads', '–')} "
              f"| {r.get('ldmatrix', '–')} "
              f"| {r['spill_stores']} |" for r in rows]
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.stem}.md ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
