"""W4A16 launch-config sweep on the GPU: every candidate kernel and config, cold weights, side by side
with cuBLAS fp16 and torch's int4 kernel; then the whole-model decode step with the sweep's winners.

Two timings per cell:
  rotate: one CUDA graph of R back-to-back calls, each on its own copy of the weights, the copies
          together over 3x the L2, so every call reads its weights from DRAM as in a decode pass
          (per-call time = graph time / R). Nothing dirty is left in the L2 by the timer.
  flush:  bench_gpu_kernels' method (256 MB written before each single call), for the winners only.

  python benchmarks/bench_gemm_sweep.py --out DIR [--commit SHA] [--budget-s 420] [--quick] [--bits 3]
Writes DIR/gemm_sweep.{json,md} (--bits 3: gemm_sweep_w3.*).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import (  # noqa: E402
    DECODE_BLOCK, GROUP, Timer, copy_bandwidth_gbs, decode_floor, decode_inputs, decode_model, quantized_layer,
    torch_int4_pack,
)
from services.engine.kernels.gemm_tuner import num_copies, with_clones  # noqa: E402
from services.engine.kernels.gemm_configs import GemmConfig, candidate_configs, m_bucket  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

# (K, N): the Llama-2-7B shapes and the decode step's fused q|k|v and gate|up.
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016)]
MS = [1, 4, 8, 16]
L2_BYTES = 50 * 2**20


def sweep_configs(m: int) -> list[GemmConfig]:
    """A wider grid than the engine's tuner tries, kept to about 30 Triton compiles (the first
    run's ~100 took 274 s of a 380 s budget): split-K only changes a runtime argument, so the
    grid spends its variety there; gemv_row also tries software pipelining (num_stages 3)."""
    cands: list[GemmConfig] = []
    if m <= 4:
        cands += [GemmConfig("gemv_row", 1, bn, sk, w, st, u)
                  for bn in (32, 64) for u in (1, 2) for sk in (4, 8, 16) for st in (1, 3)
                  for w in ((2, 4) if bn == 32 else (4,))]
        cands += [GemmConfig("gemv_h2", 1, bn, sk, w, st, u)
                  for bn in (32, 64) for u in (1, 2) for sk in (4, 8, 16, 32) for st in (1, 3)
                  for w in ((2, 4) if bn == 32 else (4,))]
    cands += [GemmConfig("mma8", 16, bn, sk, 4, st, fast_deq=fd, zsub=zs)
              for fd, zs in ((True, False), (True, True), (False, False)) for bn in (64, 128)
              for sk in (2, 4, 8, 16) for st in (2, 3) if fd or st == 3]
    cands += [GemmConfig("mma", 16, bn, sk, 4, 3, fast_deq=True) for bn in (64, 128) for sk in (2, 4, 8)]
    # swapped operands: BM is wgmma's N side, so it follows M (16 up to 64 rows)
    bm_t = min(64, max(16, 1 << (max(m, 1) - 1).bit_length()))
    cands += [GemmConfig("mma8t", bm_t, bn, sk, 4, st, fast_deq=True, zsub=True)
              for bn in (64, 128) for sk in (2, 4, 8, 16) for st in (2, 3)]
    return cands


class RotTimer:
    """Median time per call of a graph of back-to-back calls over rotating inputs."""

    def __init__(self, reps: int) -> None:
        self.reps = reps

    def per_call_ms(self, fns: list) -> float:
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for fn in fns:
                fn()
        g.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            s.record()
            g.replay()
            e.record()
        torch.cuda.synchronize()
        del g
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / len(fns)


def sweep_shape(k: int, n: int, rot: RotTimer, flush: Timer, bw: float, deadline: float, log: list,
                winners: dict, bits: int = 4, kinds: set | None = None, ms: list[int] = MS) -> list[dict]:
    w = torch.randn(k, n, device="cuda") * k ** -0.5
    t, ref_w, kw = quantized_layer(w, bits)   # t: the 4-bit layer torch int4 gets
    q_bytes = k * n * bits // 8 + 4 * (k // GROUP) * n
    nq = num_copies(q_bytes, L2_BYTES)
    kws = with_clones(kw, nq)
    w16 = ref_w.t().contiguous().half()
    n16 = num_copies(2 * k * n, L2_BYTES)
    w16s = [w16] + [w16.clone() for _ in range(n16 - 1)]
    try:
        w4p, sz = torch_int4_pack(t, "cuda")
        i4s = [(w4p, sz)] + [(w4p.clone(), sz.clone()) for _ in range(nq - 1)]
    except RuntimeError as exc:
        print(f"torch int4 pack failed: {exc}")
        i4s = []
    del w
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        xb = x.bfloat16()
        ref = x.float() @ ref_w
        row = {"K": k, "N": n, "M": m, "weight_copies": nq}
        row["fp16_rot_ms"] = rot.per_call_ms([lambda w_=w_: F.linear(x, w_) for w_ in w16s])
        row["int4_rot_ms"] = (rot.per_call_ms([lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p[0], GROUP, p[1])
                                               for p in i4s]) if i4s else None)
        results = []
        for cfg in [c for c in sweep_configs(m) if kinds is None or c.kind in kinds]:
            if time.time() > deadline:
                row["truncated"] = True
                break
            try:
                out = w4a16_matmul(x, kw, cfg)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    results.append((cfg, float("inf"), err))
                    continue
                ms = rot.per_call_ms([lambda kw_=kw_, cfg=cfg: w4a16_matmul(x, kw_, cfg) for kw_ in kws])
            except Exception as exc:  # noqa: BLE001 — a config the compiler rejects is recorded and skipped
                log.append(f"{k}x{n} M={m} {cfg}: {type(exc).__name__}: {str(exc)[:160]}")
                results.append((cfg, float("inf"), float("nan")))
                continue
            results.append((cfg, ms, err))
        if not results:  # the budget ran out before this cell's first config
            break
        results.sort(key=lambda r: r[1])
        best_cfg, best_ms, best_err = results[0]
        old_best = min((r for r in results if r[0] in set(candidate_configs(m))), key=lambda r: r[1],
                       default=None)
        row.update({
            "best_config": str(best_cfg), "best_rot_ms": best_ms, "best_rel_err": best_err,
            "tuner_set_best_config": str(old_best[0]) if old_best else None,
            "tuner_set_best_rot_ms": old_best[1] if old_best else None,
            "top8": [(str(c), round(ms * 1e3, 2)) for c, ms, _ in results[:8]],
            "best_by_kind": {kind: min((round(ms * 1e3, 2) for c, ms, _ in results if c.kind == kind and
                                        (kind != "mma8" or (c.fast_deq and not c.zsub))), default=None)
                             for kind in ("gemv_row", "gemv_h2", "mma8", "mma8t", "mma")},
            "mma8_zsub_best_us": min((round(ms * 1e3, 2) for c, ms, _ in results if c.kind == "mma8" and c.zsub),
                                     default=None),
            "mma8_slow_deq_best_us": min((round(ms * 1e3, 2) for c, ms, _ in results
                                          if c.kind == "mma8" and not c.fast_deq), default=None),
            "num_configs": len(results),
        })
        winners[(m_bucket(m), n, k, kw.bits)] = best_cfg
        row["best_flush_ms"] = flush.median_ms(lambda: w4a16_matmul(x, kw, best_cfg))
        row["fp16_flush_ms"] = flush.median_ms(lambda: F.linear(x, w16))
        row["int4_flush_ms"] = (flush.median_ms(lambda: torch.ops.aten._weight_int4pack_mm(xb, i4s[0][0], GROUP, i4s[0][1]))
                                if i4s else None)
        row["best_rot_frac_copy_bw"] = (q_bytes + 2 * m * (k + n)) / (best_ms * 1e-3) / 1e9 / bw
        row["fp16_rot_frac_copy_bw"] = (2 * k * n + 2 * m * (k + n)) / (row["fp16_rot_ms"] * 1e-3) / 1e9 / bw
        rows.append(row)
        i4 = row["int4_rot_ms"]
        print(f"{k:5d}x{n:5d} M={m:2d}: best {best_ms*1e3:6.1f} us [{best_cfg}] err {best_err:.1e} | "
              f"tuner-set best {old_best[1]*1e3 if old_best else float('nan'):6.1f} | fp16 {row['fp16_rot_ms']*1e3:6.1f} | "
              f"int4 {i4*1e3 if i4 else float('nan'):6.1f} us (rotate) | x{row['fp16_rot_ms']/best_ms:.2f} fp16, "
              f"{row['best_rot_frac_copy_bw']*100:.0f}% copy BW", flush=True)
    del kws, w16s, i4s, ref_w
    torch.cuda.empty_cache()
    return rows


def bench_decode_winners(winners: dict, flush: Timer, bw: float, quick: bool, bits: int = 4) -> list[dict]:
    """Decode step at batch 1/8/16 with the engine tuner's own choice vs the sweep's winners."""
    ctx = 256
    batches = [1, 8, 16]
    model = decode_model(quick, ctx, max(batches), bits)
    out = []
    for bsz in batches:
        inputs = decode_inputs(bsz, ctx, DECODE_BLOCK, model.shape.vocab, None)
        floor_ms = decode_floor(model, bsz, ctx, bw)[0]
        model.tuner.best = {}
        tuned_ms = flush.median_ms(lambda: model.decode(**inputs))
        tuned = {str(k): str(v) for k, v in model.tuner.best.items()}
        model.tuner.best = dict(winners)
        sweep_ms = flush.median_ms(lambda: model.decode(**inputs))
        out.append({"batch": bsz, "context": ctx, "floor_ms": floor_ms, "tuner_ms": tuned_ms, "sweep_ms": sweep_ms,
                    "tuner_vs_floor": tuned_ms / floor_ms, "sweep_vs_floor": sweep_ms / floor_ms,
                    "tuner_configs": tuned})
        print(f"decode B={bsz:2d}: engine tuner {tuned_ms:.3f} ms (x{tuned_ms/floor_ms:.2f} floor) | sweep winners "
              f"{sweep_ms:.3f} ms (x{sweep_ms/floor_ms:.2f} floor) | floor {floor_ms:.3f} ms", flush=True)
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = [
        "# W4A16 launch-config sweep\n",
        f"Device **{res['device']}**, torch {res['torch']}, triton {res['triton']}, commit `{res['commit']}`, {res['date']}. "
        f"Command: `{res['command']}`. Copy bandwidth {res['copy_bw_gbs']:.0f} GB/s (read+write).\n",
        "rotate = per-call time inside one CUDA graph of back-to-back calls over weight copies totalling > 3× the L2 "
        "(cold weights, nothing dirty in the L2); flush = bench_gpu_kernels' method (256 MB written before each single "
        "call). 'tuner set' = the best of the configs the engine's GemmTuner tries for that M.\n",
        "| K×N | M | best config | best µs rot | tuner set µs rot | fp16 µs rot | int4 µs rot | ×fp16 rot | ×int4 rot | "
        "% copy BW | best µs flush | fp16 µs flush | int4 µs flush | ×fp16 flush | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["gemm"]:
        i4r, i4f = r["int4_rot_ms"], r["int4_flush_ms"]
        ts = r["tuner_set_best_rot_ms"]
        lines.append(
            f"| {r['K']}×{r['N']} | {r['M']} | `{r['best_config']}` | {r['best_rot_ms']*1e3:.1f} | "
            f"{ts*1e3 if ts else float('nan'):.1f} | {r['fp16_rot_ms']*1e3:.1f} | {i4r*1e3 if i4r else float('nan'):.1f} | "
            f"{r['fp16_rot_ms']/r['best_rot_ms']:.2f} | {i4r/r['best_rot_ms'] if i4r else float('nan'):.2f} | "
            f"{r['best_rot_frac_copy_bw']*100:.0f} | {r['best_flush_ms']*1e3:.1f} | {r['fp16_flush_ms']*1e3:.1f} | "
            f"{i4f*1e3 if i4f else float('nan'):.1f} | {r['fp16_flush_ms']/r['best_flush_ms']:.2f} | {r['best_rel_err']:.1e} |")
    lines += ["\nBest per kernel kind (µs, rotate; mma8 = fast dequant with the Σx zero path; zsub = the zero "
              "subtracted in fp16 before the dot; 'mma8 slow deq' = int→float converts):\n",
              "| K×N | M | gemv_row | gemv_h2 | mma8 | mma8 zsub | mma8t | mma | mma8 slow deq |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        b = r["best_by_kind"]
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {b['gemv_row']} | {b.get('gemv_h2')} | {b['mma8']} | "
                     f"{r.get('mma8_zsub_best_us')} | {b.get('mma8t')} | {b['mma']} | {r['mma8_slow_deq_best_us']} |")
    if res.get("decode"):
        lines += ["\n## Decode step (random Llama-2-7B, 4-bit g128, ctx 256, CUDA graph, flush method)\n",
                  "| batch | floor ms | engine tuner ms | × floor | sweep winners ms | × floor |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['batch']} | {d['floor_ms']:.3f} | {d['tuner_ms']:.3f} | {d['tuner_vs_floor']:.2f} | "
                  f"{d['sweep_ms']:.3f} | {d['sweep_vs_floor']:.2f} |" for d in res["decode"]]
    if res.get("errors"):
        lines += ["\nConfigs that failed to compile or run:\n"] + [f"- {e}" for e in res["errors"][:30]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping new configs after this long")
    ap.add_argument("--quick", action="store_true", help="two shapes, 4-layer decoder")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--bits", type=int, default=4, choices=(3, 4), help="weight width swept (and decoded)")
    ap.add_argument("--kinds", default="", help="comma list: sweep only these kernel kinds (default: all)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of row counts M")
    ap.add_argument("--stem", default="", help="output file stem (default gemm_sweep, gemm_sweep_w3 at --bits 3)")
    args = ap.parse_args()
    import triton

    t0 = time.time()
    torch.manual_seed(0)
    flush = Timer(args.reps)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": args.commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/bench_gemm_sweep.py " + " ".join(sys.argv[1:]), "gemm": [], "errors": []}
    res["copy_bw_gbs"] = copy_bandwidth_gbs(flush)
    print(f"{res['device']}: copy bandwidth {res['copy_bw_gbs']:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("gemm_sweep" if args.bits == 4 else f"gemm_sweep_w{args.bits}")
    kinds = set(args.kinds.split(",")) if args.kinds else None
    ms = [int(v) for v in args.ms.split(",")]
    res["bits"] = args.bits
    rot = RotTimer(args.reps)
    shapes = SHAPES[:2] if args.quick else SHAPES
    deadline = t0 + args.budget_s
    winners: dict = {}
    for k, n in shapes:
        res["gemm"] += sweep_shape(k, n, rot, flush, res["copy_bw_gbs"], deadline, res["errors"], winners,
                                   args.bits, kinds, ms)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"[{k}x{n} done at {time.time()-t0:.0f}s]", flush=True)
    if not args.no_decode:
        res["decode"] = bench_decode_winners(winners, flush, res["copy_bw_gbs"], args.quick, args.bits)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, out / f"{stem}.md")
    print(f"[all done at {time.time()-t0:.0f}s]", flush=True)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
