"""Markdown report of bench_gpu_kernels.py's results (GEMM, multi-LoRA, decode sections): a writer
that raises on the device would lose the run's report, so it is tested on recorded results."""
from __future__ import annotations

import re
from pathlib import Path

PDL_KEYS = {1: "graph_ms_pdl", 2: "graph_ms_pdl_prefetch"}   # PDL mode -> a decode row's graphed time in it


def short_config(text: str | None) -> str:
    """'mma8 zsub BM16 BN64 sk8 w4 st3' from a GemmConfig repr (the table's last column)."""
    if not text:
        return ""
    f = dict(re.findall(r"(\w+)=('?[\w.]+'?)", text))
    kind = f.get("kind", "?").strip("'")
    if kind == "dense":
        return "dense"
    zsub = " zsub" if f.get("zsub") == "True" and kind == "mma8" else ""
    return (f"{kind}{zsub} BM{f.get('block_m')} BN{f.get('block_n')} sk{f.get('split_k')} w{f.get('num_warps')} "
            f"st{f.get('num_stages')}")


def write_markdown(res: dict, path: Path) -> None:
    b = res.get("bits", 4)
    lines = [f"# GPU kernels: W{b}A16 GEMM, multi-LoRA, W{b} decode\n",
             f"Device **{res['device']}**, torch {res['torch']}, triton {res['triton']}, commit `{res['commit']}`, "
             f"{res['date']}. Command: `{res['command']}`. Random weights in Llama-2 shapes (no model hub here); "
             f"L2 flushed before every rep, CUDA-event medians of CUDA-graph replays. Measured copy bandwidth "
             f"{res['copy_bw_gbs']:.0f} GB/s (read+write).\n"]
    if res.get("gemm"):
        lines += [f"## GEMM (y = x W, W {b}-bit g128; torch int4 is 4-bit)\n",
                  "| K×N | M | ours µs | fp16 cuBLAS µs | torch int4 µs | ×fp16 | ×int4 | ours % copy BW | fp16 % copy BW | "
                  "ours rel err | tuner's pick | ours µs, output zeroed beforehand (engine) | its ×int4 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["gemm"]:
            i4 = f"{r['int4_ms']*1e3:.1f}" if r["int4_ms"] else "n/a"
            si4 = f"{r['speedup_vs_int4']:.2f}" if r["speedup_vs_int4"] else "n/a"
            lines.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['ours_ms']*1e3:.1f} | {r['fp16_ms']*1e3:.1f} | {i4} | "
                         f"{r['speedup_vs_fp16']:.2f} | {si4} | {r['ours_frac_copy_bw']*100:.0f} | "
                         f"{r['fp16_frac_copy_bw']*100:.0f} | {r['ours_rel_err']:.1e} | {short_config(r.get('config'))} | "
                         + (f"{r['ours_prezeroed_ms']*1e3:.1f} | " + (f"{r['int4_ms'] / r['ours_prezeroed_ms']:.2f} |"
                                                                     if r["int4_ms"] else "n/a |")
                            if "ours_prezeroed_ms" in r else "– | – |"))
    serial_rows = [r for r in res.get("gemm") or [] if "serial_ms" in r]
    if serial_rows:
        lines += ["\n## Serial split-K against fp16 atomics into a zeroed output (the tuner's pick, same config)\n",
                  "| K×N | M | atomics µs (incl. zeroing) | serial µs | atomics / serial | serial rel err |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['K']}×{r['N']} | {r['M']} | {r['ours_ms']*1e3:.1f} | {r['serial_ms']*1e3:.1f} | "
                  f"{r['ours_ms'] / r['serial_ms']:.2f} | {r['serial_rel_err']:.1e} |" for r in serial_rows]
    if res.get("lora_layer"):
        lines += ["\n## Multi-LoRA overhead, one Llama-2-7B layer (qkv, o, gate_up, down), batch 64, rank 16\n",
                  "| adapters | layer µs | × no-LoRA |", "|---|---|---|"]
        lines += [f"| {r['num_adapters']} | {r['layer_ms']*1e3:.1f} | {r['vs_no_lora']:.2f} |" for r in res["lora_layer"]]
    if res.get("decode"):
        lines += [f"\n## Decode step, random Llama-2-7B, {b}-bit g128, fp16 lm_head\n",
                  "o and down add onto the residual stream in place and each norm zeroes the next split-K "
                  "GEMM's output; the last columns time the same graphed step in the layout before (a zeroing "
                  "launch per split-K GEMM, a fused add + RMSNorm after o and down).\n",
                  "| batch | context | CUDA graph ms | eager ms | floor ms | graph / floor | tok/s "
                  "| graph ms, zeroed outputs | zeroed / in place |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['context']} | {r['graph_ms']:.3f} | {r['eager_ms']:.3f} | {r['floor_ms']:.3f} | "
                  f"{r['graph_vs_floor']:.2f} | {r['tokens_per_s']:.0f} | "
                  + (f"{r['graph_ms_zeroed_outputs']:.3f} | {r['graph_ms_zeroed_outputs'] / r['graph_ms']:.2f} |"
                     if "graph_ms_zeroed_outputs" in r else "n/a | n/a |") for r in res["decode"]]
        errors = [(r["batch"], k, v) for r in res["decode"] for k, v in r.items() if k.endswith("_error")]
        if errors:
            lines += ["\nPDL runs that failed: " + "; ".join(f"batch {b} {k[:-6]}: {v}" for b, k, v in errors)]
        if any("graph_ms_pdl" in r for r in res["decode"]):
            lines += ["\nWith programmatic dependent launch (EngineConfig.pdl, kernels/pdl.py; same steps, same "
                      "graphs). Mode 1: each Triton kernel launched while the previous one runs, waiting on it "
                      "before its first read; mode 2: the GEMMs also ask L2 for their weights before the wait.\n",
                      "| batch | plain graph ms | PDL 1 ms | plain / PDL 1 | PDL 2 ms | plain / PDL 2 | best / floor |",
                      "|---|---|---|---|---|---|---|"]
            for r in res["decode"]:
                if "graph_ms_pdl" not in r:
                    continue
                p2 = r.get("graph_ms_pdl_prefetch")
                best = min(r["graph_ms_pdl"], p2 or r["graph_ms_pdl"])
                lines.append(f"| {r['batch']} | {r['graph_ms']:.3f} | {r['graph_ms_pdl']:.3f} | "
                             f"{r['graph_ms'] / r['graph_ms_pdl']:.2f} | "
                             + (f"{p2:.3f} | {r['graph_ms'] / p2:.2f} | " if p2 else "– | – | ")
                             + f"{best / r['floor_ms']:.2f} |")
        fused = [r for r in res["decode"] if "graph_ms_fused_attn" in r]
        if fused:
            m = fused[0].get("fused_attn_pdl_mode", 1)
            pk = PDL_KEYS.get(m)
            lines += ["\nWith RoPE and the KV-cache write inside the decode attention kernel "
                      "(EngineConfig.fused_decode_attention: one launch per layer fewer), then also SiLU·mul "
                      "inside the down GEMM's input load (fused_mlp_activation: one more); same steps:\n",
                      f"| batch | plain graph ms | fused attn ms | plain / fused attn | PDL {m} ms | fused attn + PDL {m} ms "
                      f"| both fused + PDL {m} ms | PDL {m} / both fused + PDL {m} | both fused + PDL {m} / floor |",
                      "|---|---|---|---|---|---|---|---|---|"]

            def cell(v: float | None, fmt: str = ".3f") -> str:
                return f"{v:{fmt}} | " if v else "– | "
            for r in fused:
                fp, fa = r.get("graph_ms_fused_attn_pdl"), r.get("graph_ms_fused_all_pdl")
                p1 = r.get(pk) if pk else None
                lines.append(f"| {r['batch']} | {r['graph_ms']:.3f} | {r['graph_ms_fused_attn']:.3f} | "
                             f"{r['graph_ms'] / r['graph_ms_fused_attn']:.2f} | " + cell(p1) + cell(fp) + cell(fa)
                             + cell(p1 / fa if p1 and fa else None, ".2f")
                             + cell(fa / r["floor_ms"] if fa else None, ".2f").rstrip(" "))
        if any("graph_ms_serial" in r for r in res["decode"]):
            lines += ["\nWith serial split-K (same steps):\n", "| batch | CUDA graph ms | eager ms | graph / floor |",
                      "|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['graph_ms_serial']:.3f} | {r['eager_ms_serial']:.3f} | "
                      f"{r['graph_ms_serial'] / r['floor_ms']:.2f} |" for r in res["decode"] if "graph_ms_serial" in r]
    if res.get("decode_lora"):
        expand = res["decode_lora"][-1].get("lora_expand", "segments")   # (runs before the key: segments)
        lines += [f"\n## Decode step with multi-LoRA on all projections (batch 64, rank 16, {expand} expand)\n",
                  "| adapters | step ms | × no-LoRA |", "|---|---|---|"]
        lines += [f"| {r['num_adapters']} | {r['step_ms']:.3f} | {r['vs_no_lora']:.2f} |" for r in res["decode_lora"]]
        pdl_rows = [r for r in res["decode_lora"] if "step_ms_pdl" in r]
        if pdl_rows:
            mode = pdl_rows[0].get("pdl_mode", 2)   # (runs before the key timed mode 2)
            base_pdl = res["decode"][-1].get(PDL_KEYS[mode]) if res.get("decode") else None
            lines += [f"\nThe same steps with PDL mode {mode}:\n",
                      f"| adapters | step ms | × the PDL {mode} no-LoRA step (decode, batch 64) |",
                      "|---|---|---|"]
            lines += [f"| {r['num_adapters']} | {r['step_ms_pdl']:.3f} | "
                      + (f"{r['step_ms_pdl'] / base_pdl:.2f} |" if base_pdl and r["batch"] == res["decode"][-1]["batch"]
                         else "– |") for r in pdl_rows]
        variants = [v for v in ("rows", "segments", "skip") if any(f"step_ms_{v}" in r for r in res["decode_lora"])]
        if variants:
            base = res["decode_lora"][0]["step_ms"]
            label = {"rows": "per-token expand ms", "segments": "segment expand ms", "skip": "shrink only ms"}
            lines += ["\nThe same steps with other LoRA expands: per token (16 tokens per program, B gathered per "
                      "token, no idle programs), per segment chunk (tensor cores, a program per token and N tile, "
                      "most of them idle; the default until 03533be), and the shrink alone "
                      "(expand skipped: wrong logits, it only splits the LoRA time between the two launches):\n",
                      "| adapters | " + " | ".join(f"{label[v]} | × no-LoRA" for v in variants) + " |",
                      "|---|" + "---|---|" * len(variants)]
            lines += [f"| {r['num_adapters']} | " + " | ".join(
                f"{r[f'step_ms_{v}']:.3f} | {r[f'step_ms_{v}'] / base:.2f}" for v in variants) + " |"
                for r in res["decode_lora"] if f"step_ms_{variants[0]}" in r]
    path.write_text("\n".join(lines) + "\n")
