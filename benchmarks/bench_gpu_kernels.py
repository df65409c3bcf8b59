"""GPU kernel benchmark: W4A16 GEMM vs cuBLAS fp16 vs torch int4, multi-LoRA overhead, W4 Llama decode step.

All weights are random (no model hub here) in the exact shapes of Llama-2-7B/13B. Every timing:
L2 flushed (256 MB written) before each repetition, CUDA events around one CUDA-graph replay of
the work, warm-up first, median of the repetitions. Writes <out>/gpu_kernels.{json,md}.

  python benchmarks/bench_gpu_kernels.py --out DIR [--commit SHA] [--sections gemm,lora,decode]
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

from bench_gpu_kernels_report import PDL_KEYS, write_markdown  # noqa: E402
from services.engine.kernels.gptq_format import (  # noqa: E402
    dequantize_codes, dequantize_reference, quantize_gptq_v1, repack_for_kernel, repack_values, rtn_codes,
    unpack_along_rows,
)
from services.engine.kernels.lora import prepare_lora_batch, triton_lora_apply  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.quant_linear import TritonQuantLinear  # noqa: E402
from services.engine.kernels.w4_decoder import DecoderShape, W4Decoder  # noqa: E402
from services.engine.kernels import pdl  # noqa: E402
from services.engine.kernels import w4a16 as W  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402

GEMM_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (13824, 5120)]  # (K, N)
GEMM_MS = [1, 4, 16, 32, 64, 128, 256]  # 32: the decode-batch bucket between the 16 and 64; 256: large decode batches
GROUP = 128
DECODE_BLOCK = 16  # KV block size of the decode benchmarks


class Timer:
    """Median CUDA-event time of a graph-captured callable with the L2 flushed before each rep."""

    def __init__(self, reps: int, clean_flush: bool = False) -> None:
        self.reps = reps
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        # a write leaves L2 full of dirty lines that the timed work then writes back (as in
        # triton.testing.do_bench); a read (clean_flush) leaves it full of clean ones
        self.clean_flush = clean_flush

    def graph_of(self, fn):
        fn()  # warm-up / compile / tune outside capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    def median_ms(self, fn, use_graph: bool = True) -> float:
        run = self.graph_of(fn) if use_graph else fn
        for _ in range(3):
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            if self.clean_flush:
                torch.amax(self.flush)
            else:
                self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def stream_ms(self, calls: list) -> float:
        """Median time per call of one CUDA graph that makes every call in turn, no flush: back to
        back, as a decode pass runs its layers (calls on weight copies that exceed the L2 read DRAM)."""
        run = self.graph_of(lambda: [c() for c in calls])
        run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / len(calls)


def copy_bandwidth_gbs(timer: Timer) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), use_graph=False)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def torch_int4_pack(t, device):
    """Our quantized layer in torch's _weight_int4pack_mm format (w = (q - 8) * s + zero)."""
    q = unpack_along_rows(t.qweight).t().contiguous()  # [N, K] values 0..15
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    w_packed = torch.ops.aten._convert_weight_to_int4pack(packed.to(device), 8)
    from services.engine.kernels.gptq_format import zeros_of
    s = t.scales.float()
    z = zeros_of(t).float()
    sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
    return w_packed, sz


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def quantized_layer(w: torch.Tensor, bits: int) -> tuple:
    """(4-bit GPTQ tensors for torch int4, float32 reference W, our kernel weights at `bits`) of w [K, N]."""
    t = quantize_gptq_v1(w, GROUP)
    if bits == 4:
        return t, dequantize_reference(t), repack_for_kernel(t)
    codes, zeros, scales, g_idx = rtn_codes(w, GROUP, bits)
    return t, dequantize_codes(codes, zeros, scales, g_idx), repack_values(codes, zeros, scales, g_idx, GROUP, bits)


class serial_split:
    """Within the block, GEMMs take serial split-K (w4a16.SERIAL_SPLIT_K) instead of fp16 atomics."""

    def __enter__(self):
        W.set_serial_split_k(True)

    def __exit__(self, *exc):
        W.set_serial_split_k(False)


def bench_gemm(timer: Timer, bw_gbs: float, quick: bool, tuning_log: dict, bits: int = 4,
               serial: bool = False) -> list[dict]:
    tuner = GemmTuner()
    rows = []
    shapes = GEMM_SHAPES[:2] if quick else GEMM_SHAPES
    for k, n in shapes:
        w = torch.randn(k, n, device="cuda") * k ** -0.5
        t, ref_w, kw = quantized_layer(w, bits)
        lin = TritonQuantLinear(kw, None, tuner)
        w16 = ref_w.t().contiguous().half()  # nn.Linear layout [N, K]
        try:
            w4p, sz = torch_int4_pack(t, "cuda")
        except RuntimeError as exc:
            print(f"torch int4 pack failed for {k}x{n}: {exc}")
            w4p = None
        del w
        for m in GEMM_MS:
            x = torch.randn(m, k, device="cuda").half()
            xb = x.bfloat16()
            ref = x.float() @ ref_w
            row = {"K": k, "N": n, "M": m}
            row["ours_ms"] = timer.median_ms(lambda: lin(x))
            row["ours_rel_err"] = rel_err(lin(x), ref)
            row["fp16_ms"] = timer.median_ms(lambda: F.linear(x, w16))
            row["int4_ms"] = None
            if w4p is not None:
                try:
                    row["int4_ms"] = timer.median_ms(lambda: torch.ops.aten._weight_int4pack_mm(xb, w4p, GROUP, sz))
                    row["int4_rel_err"] = rel_err(torch.ops.aten._weight_int4pack_mm(xb, w4p, GROUP, sz), ref)
                except RuntimeError as exc:
                    print(f"torch int4 mm failed {k}x{n} M={m}: {str(exc)[:200]}")
            ours_bytes = k * n * bits // 8 + 2 * 2 * (k // GROUP) * n + 2 * m * (k + n)
            row["ours_gbs"] = ours_bytes / (row["ours_ms"] * 1e-3) / 1e9
            row["ours_frac_copy_bw"] = row["ours_gbs"] / bw_gbs
            row["fp16_frac_copy_bw"] = (2 * k * n + 2 * m * (k + n)) / (row["fp16_ms"] * 1e-3) / 1e9 / bw_gbs
            row["speedup_vs_fp16"] = row["fp16_ms"] / row["ours_ms"]
            row["speedup_vs_int4"] = row["int4_ms"] / row["ours_ms"] if row["int4_ms"] else None
            cfg = tuner.config_for(x, lin.kw)
            row["config"] = str(cfg)
            split = W.needs_zeroed_output(cfg, k)   # several splits meeting by atomics in a zeroed output
            if split:
                # as in the engine, where the RMSNorm before the GEMM zeroes its split-K output
                kept = torch.zeros(m, n, dtype=torch.float16, device="cuda")
                row["ours_prezeroed_ms"] = timer.median_ms(lambda: w4a16_matmul(x, lin.kw, cfg, accumulate=kept))
            if serial and split:   # the same config, serial split-K
                with serial_split():
                    row["serial_ms"] = timer.median_ms(lambda: w4a16_matmul(x, lin.kw, cfg))
                    row["serial_rel_err"] = rel_err(w4a16_matmul(x, lin.kw, cfg), ref)
                print(f"  serial split-K: {row['serial_ms']*1e3:7.1f} us (err {row['serial_rel_err']:.1e})", flush=True)
            rows.append(row)
            print(f"GEMM K={k:5d} N={n:5d} M={m:3d}: ours {row['ours_ms']*1e3:7.1f} us "
                  f"({row['ours_frac_copy_bw']*100:4.0f}% bw, err {row['ours_rel_err']:.1e})  fp16 {row['fp16_ms']*1e3:7.1f} us  "
                  f"int4 {(row['int4_ms'] or float('nan'))*1e3:7.1f} us  x{row['speedup_vs_fp16']:.2f} vs fp16", flush=True)
        del ref_w, w16, lin
        torch.cuda.empty_cache()
    for key, results in tuner.timings_ms.items():
        best = sorted(results, key=lambda r: r[1])
        tuning_log[str(key)] = [(str(c), round(ms * 1e3, 1)) for c, ms in best[:6]]
    return rows


def bench_lora_layer(timer: Timer, quick: bool) -> list[dict]:
    """One Llama-2-7B layer's projections (qkv, o, gate_up, down) at batch 64, rank-16 adapters."""
    shape = DecoderShape(num_layers=1, vocab=16)
    model = W4Decoder(shape, num_blocks=4, block_size=16, device=torch.device("cuda"))
    layer = model.layers[0]
    bsz = 64
    xs = {
        "qkv": torch.randn(bsz, 4096, device="cuda").half(),
        "o": torch.randn(bsz, 4096, device="cuda").half(),
        "gate_up": torch.randn(bsz, 4096, device="cuda").half(),
        "down": torch.randn(bsz, 11008, device="cuda").half(),
    }
    rows = []
    base_ms = None
    for num_adapters in ([0, 8, 32] if quick else [0, 1, 8, 32, 64]):
        model.set_random_adapters(max(num_adapters, 1), rank=16)
        slot_ids = (torch.arange(bsz, device="cuda") % max(num_adapters, 1)).int()

        def step(num_adapters=num_adapters, slot_ids=slot_ids):
            batch = prepare_lora_batch(slot_ids) if num_adapters else None
            for name, x in xs.items():
                y = layer[name](x)
                if batch is not None:
                    a, b, n_slice = model.lora[0].stacks[name]
                    triton_lora_apply(y, x, a, b, batch, n_slice)

        ms = timer.median_ms(step)
        base_ms = base_ms or ms
        rows.append({"num_adapters": num_adapters, "batch": bsz, "rank": 16, "layer_ms": ms, "vs_no_lora": ms / base_ms})
        print(f"LoRA layer: {num_adapters:2d} adapters, batch {bsz}: {ms*1e3:7.1f} us  x{ms/base_ms:.2f}", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def decode_inputs(bsz: int, ctx: int, block_size: int, vocab: int, slot_ids: torch.Tensor | None) -> dict:
    blocks_per_seq = -(-(ctx + 1) // block_size)
    tables = torch.arange(bsz * blocks_per_seq, device="cuda", dtype=torch.int32).reshape(bsz, blocks_per_seq)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
    pos = (lens - 1).long()
    slot_map = tables[torch.arange(bsz, device="cuda"), pos // block_size].long() * block_size + pos % block_size
    return dict(token_ids=torch.randint(0, vocab, (bsz,), device="cuda"), positions=pos, block_tables=tables,
                context_lens=lens, slot_mapping=slot_map, slot_ids=slot_ids)


def decode_model(quick: bool, ctx: int, max_batch: int, bits: int) -> W4Decoder:
    """Random Llama-2-7B (4 layers with quick) at `bits`, KV blocks for max_batch sequences of ctx."""
    num_blocks = max_batch * -(-(ctx + 1) // DECODE_BLOCK)
    return W4Decoder(DecoderShape(num_layers=4 if quick else 32), num_blocks=num_blocks, block_size=DECODE_BLOCK,
                     device=torch.device("cuda"), bits=bits)


def decode_floor(model: W4Decoder, bsz: int, ctx: int, bw_gbs: float) -> tuple[float, int, int]:
    """(floor ms, weight bytes, KV bytes): one decode step reads every weight and the batch's KV once."""
    shape = model.shape
    weight_bytes = shape.quantized_weight_bytes(GROUP, model.bits) + 2 * shape.vocab * shape.hidden
    kv_bytes = bsz * ctx * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * 2
    return (weight_bytes + kv_bytes) / (bw_gbs * 1e9) * 1e3, weight_bytes, kv_bytes


LORA_VARIANTS = ("segments", "skip")   # W4Decoder.lora_expand values timed beside the default (rows)
PDL_ALSO = 1   # the PDL mode the fused and LoRA rows are also timed in (mode 2 measured slower everywhere)


def time_with_pdl(timer: Timer, fn, mode: int, row: dict, key: str) -> None:
    """row[key] = the graphed time of fn with PDL mode `mode` (kernels/pdl.py), where this GPU and Triton
    have PDL; a failure (e.g. a capture the driver refuses) goes to row[key + "_error"] instead, so the
    plain rows still land. PDL is off again afterwards."""
    try:
        if pdl.set_pdl(mode):
            row[key] = timer.median_ms(fn)
    except Exception as exc:  # noqa: BLE001 -- reported beside the plain rows
        row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()
    finally:
        pdl.set_pdl(0)


def bench_decode(timer: Timer, bw_gbs: float, quick: bool, ctx: int, bits: int = 4,
                 serial: bool = False, batches: tuple = (1, 8, 16, 32, 64),
                 lora_adapters: tuple = (0, 1, 8, 32, 64)) -> tuple[list[dict], list[dict]]:
    """Whole-model decode steps per batch size, then the LoRA steps at the largest batch."""
    model = decode_model(quick, ctx, max(batches), bits)
    shape, block_size = model.shape, DECODE_BLOCK
    rows = []
    for bsz in batches:
        inputs = decode_inputs(bsz, ctx, block_size, shape.vocab, None)
        floor_ms, weight_bytes, kv_bytes = decode_floor(model, bsz, ctx, bw_gbs)
        graph_ms = timer.median_ms(lambda: model.decode(**inputs))
        eager_ms = timer.median_ms(lambda: model.decode(**inputs), use_graph=False)
        model.inplace_outputs = False   # the layout before: zeroing launches, add + RMSNorm after o/down
        zeroed_ms = timer.median_ms(lambda: model.decode(**inputs))
        model.inplace_outputs = True
        rows.append({"batch": bsz, "context": ctx, "graph_ms": graph_ms, "eager_ms": eager_ms, "floor_ms": floor_ms,
                     "graph_vs_floor": graph_ms / floor_ms, "tokens_per_s": bsz / graph_ms * 1e3,
                     "graph_ms_zeroed_outputs": zeroed_ms, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes})
        for mode, key in PDL_KEYS.items():
            time_with_pdl(timer, lambda: model.decode(**inputs), mode, rows[-1], key)
            if key in rows[-1]:
                print(f"  PDL mode {mode}: graph {rows[-1][key]:.3f} ms (x{rows[-1][key] / floor_ms:.2f} of floor)",
                      flush=True)
            elif key + "_error" in rows[-1]:
                print(f"  PDL mode {mode} failed: {rows[-1][key + '_error']}", flush=True)
        # RoPE + KV-cache write inside the decode attention kernel (EngineConfig.fused_decode_attention),
        # PDL off and in mode PDL_ALSO, then also SiLU·mul inside the down GEMM (fused_mlp_activation;
        # no LoRA here): one and two launches fewer per layer
        model.fused_decode_attention = True
        try:
            rows[-1]["graph_ms_fused_attn"] = timer.median_ms(lambda: model.decode(**inputs))
            rows[-1]["fused_attn_pdl_mode"] = PDL_ALSO
            time_with_pdl(timer, lambda: model.decode(**inputs), PDL_ALSO, rows[-1], "graph_ms_fused_attn_pdl")
            model.fused_mlp_activation = True
            time_with_pdl(timer, lambda: model.decode(**inputs), PDL_ALSO, rows[-1], "graph_ms_fused_all_pdl")
            print(f"  fused RoPE + attention: graph {rows[-1]['graph_ms_fused_attn']:.3f} ms"
                  + "".join(f", {label} PDL {PDL_ALSO} {rows[-1][key]:.3f} ms"
                            for label, key in (("", "graph_ms_fused_attn_pdl"),
                                               ("+ SiLU·mul in down,", "graph_ms_fused_all_pdl"))
                            if key in rows[-1]), flush=True)
        finally:
            model.fused_decode_attention = model.fused_mlp_activation = False
        if serial:
            with serial_split():
                rows[-1]["graph_ms_serial"] = timer.median_ms(lambda: model.decode(**inputs))
                rows[-1]["eager_ms_serial"] = timer.median_ms(lambda: model.decode(**inputs), use_graph=False)
            print(f"  serial split-K: graph {rows[-1]['graph_ms_serial']:.3f} ms  eager {rows[-1]['eager_ms_serial']:.3f} ms",
                  flush=True)
        print(f"decode B={bsz:2d} ctx={ctx}: graph {graph_ms:.3f} ms  eager {eager_ms:.3f} ms  floor {floor_ms:.3f} ms  "
              f"x{graph_ms/floor_ms:.2f} of floor (zeroed outputs: graph {zeroed_ms:.3f} ms)", flush=True)
        torch.cuda.empty_cache()
    lora_rows = []
    bsz = max(batches)
    base = None
    for num_adapters in ([0, 32] if quick else lora_adapters):
        model.set_random_adapters(num_adapters, rank=16)
        slot_ids = (torch.arange(bsz, device="cuda") % num_adapters).int() if num_adapters else None
        inputs = decode_inputs(bsz, ctx, block_size, shape.vocab, slot_ids)
        ms = timer.median_ms(lambda: model.decode(**inputs))
        base = base or ms
        lora_rows.append({"num_adapters": num_adapters, "batch": bsz, "rank": 16, "context": ctx, "step_ms": ms,
                          "vs_no_lora": ms / base, "lora_expand": model.lora_expand})
        if num_adapters:   # the per-token expand, and the shrink alone (where the LoRA time goes)
            for variant in LORA_VARIANTS:
                model.lora_expand = variant
                lora_rows[-1][f"step_ms_{variant}"] = timer.median_ms(lambda: model.decode(**inputs))
            model.lora_expand = "rows"
            lora_rows[-1]["pdl_mode"] = PDL_ALSO
            time_with_pdl(timer, lambda: model.decode(**inputs), PDL_ALSO, lora_rows[-1], "step_ms_pdl")
        print(f"decode LoRA B={bsz} {num_adapters:2d} adapters: {ms:.3f} ms  x{ms/base:.2f}"
              + "".join(f"  ({v} expand: {lora_rows[-1][f'step_ms_{v}']:.3f} ms)"
                        for v in LORA_VARIANTS if f"step_ms_{v}" in lora_rows[-1]), flush=True)
        model.set_random_adapters(0, 16)
        torch.cuda.empty_cache()
    return rows, lora_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--sections", default="gemm,lora,decode")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-batches", default="1,8,16,32,64", help="decode section: batch sizes")
    ap.add_argument("--lora-adapters", default="0,1,8,32,64",
                    help="decode section: distinct adapters in the LoRA steps at the largest batch ('' skips them)")
    ap.add_argument("--bits", type=int, default=4, choices=(3, 4),
                    help="weight width of our GEMMs and decoder (torch int4 stays 4-bit); 3 writes gpu_kernels_w3.*")
    ap.add_argument("--serial", action="store_true",
                    help="also time serial split-K (w4a16.SERIAL_SPLIT_K) for the gemm picks and the decode steps")
    args = ap.parse_args()
    import triton

    torch.manual_seed(0)
    timer = Timer(args.reps)
    res = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "commit": args.commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_gpu_kernels.py " + " ".join(sys.argv[1:]),
        "note": "random weights in Llama-2-7B/13B shapes; EOS not involved",
    }
    res["copy_bw_gbs"] = copy_bandwidth_gbs(timer)
    print(f"{res['device']}: copy bandwidth {res['copy_bw_gbs']:.0f} GB/s", flush=True)
    sections = set(args.sections.split(","))
    t0 = time.time()
    out = Path(args.out)
    stem = "gpu_kernels" if args.bits == 4 else f"gpu_kernels_w{args.bits}"
    res["bits"] = args.bits
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out / f"{stem}.md")

    if "gemm" in sections:
        res["tuning_top6_us"] = {}
        res["gemm"] = bench_gemm(timer, res["copy_bw_gbs"], args.quick, res["tuning_top6_us"], args.bits, args.serial)
        save()
        print(f"[gemm done at {time.time()-t0:.0f}s]", flush=True)
    if "lora" in sections:
        res["lora_layer"] = bench_lora_layer(timer, args.quick)
        save()
        print(f"[lora done at {time.time()-t0:.0f}s]", flush=True)
    if "decode" in sections:
        ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())   # noqa: E731
        res["decode"], res["decode_lora"] = bench_decode(timer, res["copy_bw_gbs"], args.quick, args.context,
                                                         args.bits, args.serial, ints(args.decode_batches),
                                                         ints(args.lora_adapters))
        save()
        print(f"[decode done at {time.time()-t0:.0f}s]", flush=True)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
