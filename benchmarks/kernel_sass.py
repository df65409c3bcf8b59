"""Static SASS of the W4A16/W3A16 kernels, compiled ahead of time for sm_90 on any machine (no GPU).

Triton compiles a kernel down to a cubin with the ptxas it bundles, so the instruction mix of the K
loop can be read without an accelerator: this script compiles each kernel variant for Hopper
(sm_90, pointers and sizes marked 16-divisible as the launcher's specialization does), finds the
K loop (the longest backward branch), and reports its instructions per weight and per class.
Instruction issue is one bound of a GEMV at M = 1 (the other is DRAM bandwidth): an H100 issues
4 warp-instructions per SM per clock, so at 1.755 GHz and 132 SMs a loop of I instructions per
weight costs at least K·N·I / (32 · 4 · 132 · 1.755e9) s (printed as "issue floor").
Static counts, not timings: a faster kernel still has to be shown on the GPU.

    python benchmarks/kernel_sass.py --out benchmarks/results     # writes kernel_sass.{md,json}
    INLAID_H2_DEQ=fma python benchmarks/kernel_sass.py --stem kernel_sass_fma   # the fma unpacking form
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.engine.kernels.aot import compile_gemv, compile_mma, compile_mma_t  # noqa: E402

SHAPE = (4096, 11008)           # K, N for the issue floor
SMS, ISSUE_PER_CLK, CLOCK_HZ = 132, 4, 1.755e9   # H100 SXM
CLASSES = ("fp16x2", "fp32", "cvt", "int/move", "memory", "spill", "mma", "other")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def disassemble(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin, with the toolkit Triton bundles."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path("/tmp") / f"kernel_sass_{time.time_ns()}.cubin"
    path.write_bytes(cubin)
    try:
        return subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink(missing_ok=True)


def instructions(sass: str) -> list[tuple[int, str, int | None]]:
    """(address, opcode, branch target or None) of every instruction."""
    out = []
    for line in sass.splitlines():
        m = INSTR.search(line)
        if not m:
            continue
        op = m.group(3)
        target = re.search(r"\bBRA\S*\s+0x([0-9a-f]+)", line) if op.startswith("BRA") else None
        out.append((int(m.group(1), 16), op, int(target.group(1), 16) if target else None))
    return out


def k_loop(instrs: list[tuple[int, str, int | None]]) -> list[str]:
    """Opcodes of the longest loop body: a backward branch and everything from its target to it."""
    best: list[str] = []
    for addr, _, target in instrs:
        if target is not None and target < addr:
            body = [op for a, op, _ in instrs if target <= a <= addr]
            if len(body) > len(best):
                best = body
    return best


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("HFMA2", "HADD2", "HMUL2"):
        return "fp16x2" if ".F32" not in op else "cvt"
    if base in ("FFMA", "FADD", "FMUL"):
        return "fp32"
    if base in ("LOP3", "SHF", "SGXT", "IADD3", "IMAD", "LEA", "PRMT", "IABS", "ISETP", "VIMNMX", "SEL", "MOV"):
        return "int/move"
    if base in ("LDL", "STL"):
        return "spill"
    if base in ("HMMA", "IMMA", "HGMMA", "WARPGROUP"):
        return "mma"
    if base in ("LDG", "LDS", "STS", "LDSM", "STSM", "STG", "ATOMG", "RED", "LDGSTS", "LDGDEPBAR", "DEPBAR"):
        return "memory"
    return "other"


def analyse(name: str, cubin: bytes, weights_per_thread: int) -> dict:
    instrs = instructions(disassemble(cubin))
    body = k_loop(instrs)
    classes = collections.Counter(classify(op) for op in body)
    ops = collections.Counter(op.split(".")[0] for op in body)
    per_weight = len(body) / weights_per_thread
    k, n = SHAPE
    floor_us = k * n * per_weight / (32 * ISSUE_PER_CLK * SMS * CLOCK_HZ) * 1e6
    return {"variant": name, "total_instructions": len(instrs), "loop_instructions": len(body),
            "weights_per_thread_per_iteration": weights_per_thread, "instructions_per_weight": per_weight,
            "issue_floor_us_4096x11008": floor_us, "classes": dict(classes), "top_ops": ops.most_common(10),
            "loop_loads": {op: ops[op] for op in ("LDG", "LDGSTS", "UTMALDG", "LDS", "LDSM") if ops[op]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--stem", default="kernel_sass", help="result file name (<out>/<stem>.{md,json})")
    args = ap.parse_args()
    import triton
    t0 = time.time()
    rows = []

    def record(name: str, cubin: bytes, wpt: int) -> None:
        row = analyse(name, cubin, wpt)
        rows.append(row)
        print(f"{name:48s} loop {row['loop_instructions']:4d} instr for {wpt:3d} weights/thread "
              f"= {row['instructions_per_weight']:.2f}/weight, issue floor {row['issue_floor_us_4096x11008']:.1f} us"
              f" | {row['classes']}", flush=True)

    for kind, bits, h2 in (("gemv_row", 4, False), ("gemv_h2", 4, True), ("gemv_row", 3, False), ("gemv_h2", 3, True)):
        for bn, warps in ((32, 2), (32, 4), (64, 4)):
            # one 128-row block of a [16, BN] tile per iteration
            record(f"{kind} W{bits} BN={bn} warps={warps}", compile_gemv(bn, warps, 1, bits, h2),
                   16 * bn * 8 // (32 * warps))
    for bn, warps, st in ((128, 1, 1), (128, 1, 2), (128, 1, 3), (128, 2, 1), (128, 2, 2), (32, 4, 2)):
        # the big per-thread tiles and gemv_h2's register double buffer (num_stages 2; 3 adds the L2 prefetch)
        record(f"gemv_h2 W4 BN={bn} warps={warps} stages={st}", compile_gemv(bn, warps, 1, 4, True, stages=st),
               16 * bn * 8 // (32 * warps))
    for bits, bm, bn, st, fd, zs, w in ((4, 16, 128, 2, False, False, 4), (4, 16, 128, 2, True, False, 4),
                                        (4, 16, 128, 2, True, True, 4), (4, 16, 64, 3, True, False, 4),
                                        (4, 16, 64, 3, True, True, 4), (4, 128, 128, 3, True, False, 4),
                                        (4, 128, 128, 3, True, True, 4), (4, 128, 128, 3, True, False, 8),
                                        (4, 128, 128, 3, True, True, 8), (3, 16, 128, 2, True, False, 4),
                                        (3, 16, 128, 2, True, True, 4)):
        # one 128-row block of BN columns over the CTA's threads per iteration
        record(f"mma8 W{bits} BM={bm} BN={bn} stages={st} warps={w}{' fast_deq' if fd else ''}"
               f"{' zsub+h2deq' if zs else ''}", compile_mma(bm, bn, w, st, bits, fd, False, zs), 128 * bn // (32 * w))
    for bits, bm, bn, w in ((4, 16, 64, 4), (4, 64, 64, 4), (4, 128, 128, 8), (3, 16, 64, 4)):
        if bm == 64:  # the mma8 zsub twin at this tile, for the comparison below
            record(f"mma8 W{bits} BM={bm} BN={bn} stages=3 warps={w} fast_deq zsub+h2deq",
                   compile_mma(bm, bn, w, 3, bits, True, False, True), 128 * bn // (32 * w))
        record(f"mma8t W{bits} BM={bm} BN={bn} stages=3 warps={w}", compile_mma_t(bm, bn, w, 3, bits),
               128 * bn // (32 * w))
    from services.engine.kernels.h2_ptx import H2_DEQ_FORM
    res = {"what": "static SASS of the GEMM kernels' K loop, compiled AOT for sm_90 (no GPU run)",
           "triton": triton.__version__, "commit": args.commit, "h2_deq_form": H2_DEQ_FORM,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/kernel_sass.py " + " ".join(sys.argv[1:]),
           "issue_model": {"sms": SMS, "warp_instr_per_sm_clk": ISSUE_PER_CLK, "clock_hz": CLOCK_HZ},
           "rows": rows, "wall_s": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    lines = ["# Static SASS of the GEMM kernels (compiled for sm_90 on a CPU machine; nothing here ran on a GPU)\n",
             f"triton {res['triton']}, commit `{res['commit']}`, {res['date']}, 4-bit unpacking form "
             f"`{res['h2_deq_form']}` (INLAID_H2_DEQ). Command: `{res['command']}`. "
             "Each kernel is compiled ahead of time with Triton's bundled ptxas for sm_90, with the launcher's "
             "16-byte alignment specialization; the K loop is the longest backward branch of the SASS. "
             "Issue floor = the time an H100 (132 SMs, 4 warp-instructions per SM per clock, 1.755 GHz) needs "
             "to issue the loop for a 4096×11008 layer at M = 1; DRAM needs ≥ 7.5 µs for the same layer "
             "(22.5 MB at ~3 TB/s). Static counts only: speed has to be measured on the GPU.\n",
             "| variant | loop instructions | weights / thread / iteration | instructions / weight | issue floor µs | "
             "fp16x2 | fp32 | cvt | int/move | memory | spill (LDL/STL) | mma | other |", "|" + "---|" * 13]
    for r in rows:
        c = r["classes"]
        lines.append(f"| {r['variant']} | {r['loop_instructions']} | {r['weights_per_thread_per_iteration']} | "
                     f"{r['instructions_per_weight']:.2f} | {r['issue_floor_us_4096x11008']:.1f} | "
                     + " | ".join(str(c.get(k, 0)) for k in CLASSES)
                     + " |")
    ipw = {r["variant"]: r["instructions_per_weight"] for r in rows}
    reading = ["", "## Reading", ""]

    def compare(label: str, before: str, after: str, what: str, why: str = "", old: str = "the old path's") -> None:
        a, b = ipw.get(before), ipw.get(after)
        if a and b:
            change = f"{1 - b / a:.0%} fewer" if b <= a else f"{b / a - 1:.0%} more"
            reading.append(f"- {label}: {what} issues {b:.2f} instructions per weight against {old} {a:.2f} "
                           f"({change}){why}.")

    for bits in (4, 3):
        compare(f"W{bits}, M = 1 (BN 32, 2 warps)", f"gemv_row W{bits} BN=32 warps=2",
                f"gemv_h2 W{bits} BN=32 warps=2", "gemv_h2", old="gemv_row's")
    compare("M ≤ 16 tensor-core path (BM 16, BN 128)", "mma8 W4 BM=16 BN=128 stages=2 warps=4 fast_deq",
            "mma8 W4 BM=16 BN=128 stages=2 warps=4 fast_deq zsub+h2deq", "zsub",
            ": the per-block Σx reductions (FADD, SHFL, shared memory) go, and the codes come from one lop3 "
            "and one sub.f16x2 per pair (H2_DEQ_ASM)")
    compare("M ≥ 128 (BM 128, BN 128, wgmma, 4 warps)", "mma8 W4 BM=128 BN=128 stages=3 warps=4 fast_deq",
            "mma8 W4 BM=128 BN=128 stages=3 warps=4 fast_deq zsub+h2deq", "zsub",
            ": at large BM the Σx correction on the [BM, BN] accumulator dominates the old loop. With 4 warps "
            "that accumulator spills (LDL/STL in the loop); with 8 it does not, so the BM = 128 candidates take "
            "8 warps")
    compare("W3, M ≤ 16 (BM 16, BN 128)", "mma8 W3 BM=16 BN=128 stages=2 warps=4 fast_deq",
            "mma8 W3 BM=16 BN=128 stages=2 warps=4 fast_deq zsub+h2deq", "zsub")
    for bm, bn, w in ((16, 64, 4), (64, 64, 4), (128, 128, 8)):
        compare(f"swapped operands (BM {bm}, BN {bn}, {w} warps)",
                f"mma8 W4 BM={bm} BN={bn} stages=3 warps={w} fast_deq zsub+h2deq",
                f"mma8t W4 BM={bm} BN={bn} stages=3 warps={w}", "mma8t", old="mma8 zsub's")
    reading.append("- mma8t feeds the dequantized weights to wgmma from registers: no shared-memory stores of "
                   "them, and wgmma rather than mma.sync at BM 16. Whether that pays is for the GPU to time.")
    reading.append("- Compare with the measured H100 times of the same layer (`gpu_kernels.md`): where a kernel "
                   "takes several times its issue floor, it waits on latency rather than on issue or DRAM.")
    (out / f"{args.stem}.md").write_text("\n".join(lines + reading) + "\n")
    print((out / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
