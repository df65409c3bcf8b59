"""Static SASS of the fragment-ordered kernels (kernels/w4a16_frag.py), both fragment orders, compiled
for sm_90 on any machine (no GPU), with whatever Triton is importable.

Which fragment order costs nothing depends on the operand layout the Triton version picks (see
w4a16_frag's docstring), so run it once per Triton version; an older Triton can be put ahead of the
installed one without touching the venv:

    python benchmarks/frag_sass.py --out benchmarks/results --stem frag_sass_t39
    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/frag_sass.py --out benchmarks/results --stem frag_sass_t36
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_sass import analyse  # noqa: E402
from services.engine.kernels.aot import compile_frag  # noqa: E402
from services.engine.kernels.gemm_configs import GemmConfig  # noqa: E402

# (kind, BM, BN, warps, prefetch): the configs the H100 probes ranked first
# (frag_m1_16_fcd1f62.md, frag_m4_64_fcd1f62.md), and the swapped-operand kind at the tile sizes of its candidates
VARIANTS = [("frag", 16, 256, 4, True), ("frag", 16, 64, 4, True), ("frag", 64, 128, 4, True),
            ("frag", 128, 64, 4, False), ("frag_gemv", 1, 128, 1, False), ("frag_t", 16, 64, 4, False),
            ("frag_t", 64, 128, 4, False), ("frag_t", 128, 64, 4, False), ("frag_t", 128, 128, 8, False)]
# the same kernels on codes stored block-major (gptq_format.frag_block_major): the block step a runtime stride
BLOCK_MAJOR_VARIANTS = [("frag", 16, 256, 4, True), ("frag", 64, 128, 4, True), ("frag_gemv", 1, 128, 1, False),
                        ("frag_t", 64, 128, 4, False)]
# the TMA kinds (block-major only; (kind, BM, BN, warps, Triton stages)): the codes reach shared memory by bulk
# copies, so their K loops hold no global loads of codes, but a shared-memory read of each box
TMA_VARIANTS = [("frag_tma", 16, 256, 4, 3), ("frag_tma", 16, 128, 4, 4), ("frag_tma", 64, 128, 4, 3),
                ("frag_gemv_tma", 1, 128, 1, 4), ("frag_gemv_tma", 1, 64, 1, 4)]


def compile_variant(kind: str, bm: int, bn: int, warps: int, prefetch: bool, k_width: int,
                    block_major: bool = False, stages: int | None = None) -> bytes:
    if stages is None:
        stages = 1 if prefetch or kind == "frag_gemv" else 2
    cfg = GemmConfig(kind, bm, bn, 1, warps, stages, fast_deq=True, zsub=kind in ("frag", "frag_t", "frag_tma"),
                     prefetch=prefetch)
    return compile_frag(cfg, k_width, block_major=block_major)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--stem", default="frag_sass")
    args = ap.parse_args()
    import triton
    rows = []
    variants = ([v + (False, None) for v in VARIANTS] + [v + (True, None) for v in BLOCK_MAJOR_VARIANTS]
                + [(kind, bm, bn, warps, False, True, stages) for kind, bm, bn, warps, stages in TMA_VARIANTS])
    for kind, bm, bn, warps, prefetch, block_major, stages in variants:
        for k_width in (2, 4):
            name = (f"{kind} BM{bm} BN{bn} w{warps}{' pf' if prefetch else ''}"
                    f"{f' st{stages}' if stages else ''} k_width {k_width}" + (" block-major" if block_major else ""))
            row = analyse(name, compile_variant(kind, bm, bn, warps, prefetch, k_width, block_major, stages),
                          128 * bn // (32 * warps))
            rows.append(row)
            print(f"{name}: {row['loop_instructions']} loop instructions, "
                  f"{row['instructions_per_weight']:.2f} / weight, "
                  f"{row['classes']}", flush=True)
    res = {"triton": triton.__version__, "commit": args.commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
           "command": "python benchmarks/frag_sass.py " + " ".join(sys.argv[1:]), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Static SASS of the fragment-ordered kernels (sm_90, Triton {res['triton']}, no GPU)\n",
             f"Commit `{args.commit}`, {res['date']}. Command: `{res['command']}`. K loop = the longest backward "
             "branch; zero taken off in fp16 by the one-shift unpacking. SHFL + SEL and STS + LDS: counted when "
             "among the loop's 10 most frequent opcodes (else 0).\n",
             "| variant | loop instructions | instructions / weight | SHFL + SEL | STS + LDS | spills | loop loads |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = dict(r["top_ops"])
        loads = ", ".join(f"{op} {n}" for op, n in r.get("loop_loads", {}).items()) or "–"
        lines.append(f"| {r['variant']} | {r['loop_instructions']} | {r['instructions_per_weight']:.2f} | "
                     f"{ops.get('SHFL', 0) + ops.get('SEL', 0)} | {ops.get('STS', 0) + ops.get('LDS', 0)} | "
                     f"{r['classes'].get('spill', 0)} | {loads} |")
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.stem}.md")


if __name__ == "__main__":
    main()
