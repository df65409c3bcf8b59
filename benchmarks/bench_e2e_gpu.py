"""GPU end-to-end benchmark: our engine (4-bit, Triton, CUDA graphs) vs Hugging Face generate + PEFT.

Random weights in the exact Llama-2-7B shapes (no model hub here), the same weights on both sides
(ours RTN-quantized to 4-bit g128 at load, HF in fp16). Sections, all in one process:
  e2e    a mixed-adapter trace (N requests over A rank-16 adapters on all seven projections,
         fixed prompt+output lengths, EOS ignored) through LLMEngine vs HF generate+PEFT
         (fp16, mixed adapters per batch via adapter_names), generated tokens per second;
  decode one decode step through ModelRunner.run at several batch sizes vs the byte floor
         (4-bit weights + fp16 LM head + KV read) / measured copy bandwidth;
  lora   the batch-64 decode step with 0/1/8/32/64 distinct adapters;
  prefill an eager prefill step through ModelRunner.run at several (sequences × prompt) shapes, and
         the attention of that step alone (32 layers): the varlen Triton kernel (one launch per
         layer) vs the previous per-sequence gather + SDPA loop.
Writes <out>/e2e_gpu.{json,md}. --skip-hf: the e2e section runs ours only.

  python benchmarks/bench_e2e_gpu.py --out DIR [--commit SHA] [--sections e2e,decode,lora,prefill]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.adapters import TARGET_MODULES, LoraAdapter  # noqa: E402
from services.engine.block_manager import BlockManager  # noqa: E402
from services.engine.config import W4_LAYOUTS, EngineConfig  # noqa: E402
from services.engine.llama import random_weight_items  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.model_runner import w4_block_major, w4_frag  # noqa: E402
from services.engine.sequence import SamplingParams, Sequence  # noqa: E402

MODEL = "llama-2-7b"
RANK = 16


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth, bytes read + written per second (median of 20 1-GiB copies)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del src, dst
    return 2 * 2**30 / (statistics.median(times[2:]) / 1e3) / 1e9


def write_peft_adapter(out_dir: Path, dims, num_layers: int, seed: int) -> Path:
    """A PEFT LoRA directory (rank 16, all seven projections, random A and small random B)."""
    from safetensors.torch import save_file
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for m in TARGET_MODULES:
            in_f, out_f = dims.features(m)
            sub = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{layer}.{sub}.{m}"
            a = torch.randn(RANK, in_f, device="cuda", generator=gen) * in_f ** -0.5
            b = torch.randn(out_f, RANK, device="cuda", generator=gen) * 0.01
            tensors[p + ".lora_A.weight"] = a.half().cpu()
            tensors[p + ".lora_B.weight"] = b.half().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0, "target_modules": list(TARGET_MODULES), "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": None}))
    return out_dir


def trace(num_requests: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(num_requests)]


class RunTimer:
    """Wraps runner.run: wall time and step counts split by graph replay vs eager."""

    def __init__(self, runner) -> None:
        self.runner, self.inner = runner, runner.run
        self.reset()
        runner.run = self

    def reset(self) -> None:
        self.steps = self.graph_steps = 0
        self.run_s = self.graph_s = 0.0

    def __call__(self, seqs):
        is_graph = self.runner.graphs is not None and self.runner.graphs.can_run(seqs)
        t0 = time.perf_counter()
        out = self.inner(seqs)
        dt_s = time.perf_counter() - t0
        self.steps += 1
        self.run_s += dt_s
        if is_graph:
            self.graph_steps += 1
            self.graph_s += dt_s
        return out


def build_engine(args) -> tuple[LLMEngine, float]:
    config = EngineConfig(model=f"random:{MODEL}", device="cuda", quant_bits=4, cuda_graphs=True,
                          gemm_tune_cache=False,  # every run tunes afresh
                          max_num_seqs=args.max_num_seqs, max_adapters=64,
                          max_adapters_per_batch=args.num_adapters,
                          max_num_batched_tokens=args.max_batched_tokens,
                          kv_cache_bytes=args.kv_gib << 30, max_model_len=1024, policy="fifo", pdl=args.pdl,
                          fused_decode_attention=bool(args.fused_attn), fused_mlp_activation=bool(args.fused_act),
                          w4_layout=args.w4_layout)
    t0 = time.perf_counter()
    engine = LLMEngine(config, load_tokenizer=False)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    print(f"engine loaded (random init + RTN 4-bit) in {load_s:.1f} s", flush=True)
    return engine, load_s


def tuner_picks(tuner) -> dict[str, str]:
    """The GEMM tuner's pick per key (M bucket, N, K, bits[, layout]) as strings, for the result file."""
    if tuner is None:
        return {}
    return {",".join(map(str, key)): str(cfg) for key, cfg in sorted(tuner.best.items())}


def bench_ours(args, engine: LLMEngine) -> dict:
    config = engine.config
    runner = engine.runner
    timer = RunTimer(runner)
    prompts = trace(args.num_requests, args.prompt_len, runner.shape.vocab_size)
    tasks = [f"t{i % args.num_adapters}" for i in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    runs = []
    for rep in range(2):   # the first run compiles, tunes GEMMs and captures graphs
        timer.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = engine.generate(prompts, params, tasks=tasks)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        n_out = sum(len(r.token_ids) for r in results)
        runs.append({"wall_s": wall, "output_tokens": n_out, "tok_per_s": n_out / wall,
                     "steps": timer.steps, "graph_steps": timer.graph_steps,
                     "runner_s": timer.run_s, "graph_runner_s": timer.graph_s})
        print(f"ours rep {rep}: {n_out} tokens in {wall:.2f} s = {n_out / wall:.0f} tok/s, "
              f"{timer.steps} steps ({timer.graph_steps} graphed), runner {timer.run_s:.2f} s",
              flush=True)
    runner.run = timer.inner
    return {"runs": runs, "tok_per_s": runs[-1]["tok_per_s"],
            "graph_captures": runner.graphs.num_captures,
            # each process tunes afresh (gemm_tune_cache off): near-tie picks can differ between two runs
            # of one command, so the picks go with the timings
            "tuner_picks": tuner_picks(runner.tuner),
            "config": {"max_num_seqs": config.max_num_seqs,
                       "max_num_batched_tokens": config.max_num_batched_tokens,
                       "max_adapters_per_batch": config.max_adapters_per_batch,
                       "policy": config.policy, "w4_layout": config.w4_layout,
                       "w4_frag": w4_frag(config.w4_layout, config.max_num_seqs),
                       "w4_block_major": w4_block_major(config.w4_layout, config.max_num_seqs)}}


def bench_hf(args, paths: dict[str, Path]) -> dict:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.common.model_source import RANDOM_SHAPES
    from services.engine.llama import LlamaShape
    shape = LlamaShape.from_hf_config(dict(RANDOM_SHAPES[MODEL], model_type="llama"))
    cfg = LlamaConfig(**RANDOM_SHAPES[MODEL])
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in random_weight_items(shape, "cuda", torch.float16):  # == our base (seed 0)
            state[key].copy_(tensor)
    model.eval()
    names = list(paths)
    peft_model = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(paths[name]), adapter_name=name)
    peft_model.eval()
    prompts = trace(args.hf_requests, args.prompt_len, shape.vocab_size)
    tasks = [f"t{i % args.num_adapters}" for i in range(args.hf_requests)]

    def generate(batch_prompts, batch_tasks, new_tokens):
        ids = torch.tensor(batch_prompts, device="cuda")
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, adapter_names=batch_tasks, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    generate(prompts[:2], tasks[:2], 2)   # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_out = 0
    for i in range(0, args.hf_requests, args.hf_batch):
        n_out += generate(prompts[i:i + args.hf_batch], tasks[i:i + args.hf_batch], args.output_len)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"hf+peft: {n_out} tokens in {wall:.2f} s = {n_out / wall:.1f} tok/s", flush=True)
    del peft_model, model, state
    return {"wall_s": wall, "output_tokens": n_out, "tok_per_s": n_out / wall,
            "batch": args.hf_batch, "requests": args.hf_requests}


def decode_seqs(runner, batch: int, context: int, tasks: list[str]) -> tuple[list[Sequence], BlockManager]:
    bm = BlockManager(runner.num_kv_blocks, runner.block_size)
    seqs = []
    for i in range(batch):
        s = Sequence(f"d{i}", [(7 * i + j) % 30000 + 3 for j in range(context)], SamplingParams(),
                     task=tasks[i % len(tasks)] if tasks else "")
        bm.allocate(s)
        s.num_cached_tokens = context - 1   # every position but the last is "cached"
        seqs.append(s)
    return seqs, bm


def time_step(runner, seqs, reps: int) -> dict:
    """Wall time of runner.run (host prep + replay + sampler sync) and GPU time of the replay alone."""
    for _ in range(3):
        runner.run(seqs)
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.run(seqs)
        walls.append((time.perf_counter() - t0) * 1e3)
    out = {"run_ms": statistics.median(walls)}
    graphs = runner.graphs
    if graphs is not None and graphs.can_run(seqs):
        from services.engine.cuda_graphs import bucket_for
        key = (bucket_for(len(seqs), graphs.sizes), any(s.task for s in seqs))
        graph = graphs._graphs[key][0]
        gpu = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            e.synchronize()
            gpu.append(s.elapsed_time(e))
        out["replay_ms"] = statistics.median(gpu)
    return out


def weight_bytes(runner) -> int:
    """Bytes a decode step reads for weights: 4-bit linears (codes, scales, zeros) + LM head."""
    total = runner.model.lm_head.numel() * runner.model.lm_head.element_size()
    for layer in runner.model.layers:
        mods = list(layer.fused.values()) + [getattr(layer, n) for n in
                                             ("q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj")]
        for m in mods:
            if m is None:
                continue
            kw = m.inner.kw if hasattr(m, "inner") else m.kw
            total += sum(t.numel() * t.element_size() for t in (kw.qweight, kw.zeros, kw.scales))
    return total


def bench_decode(runner, batches: list[int], context: int, bw_gbs: float, reps: int) -> list[dict]:
    s = runner.shape
    w_bytes = weight_bytes(runner)
    rows = []
    for b in batches:
        seqs, _ = decode_seqs(runner, b, context, [])
        t = time_step(runner, seqs, reps)
        kv_bytes = b * context * s.num_layers * 2 * s.num_kv_heads * s.head_dim * 2
        floor_ms = (w_bytes + kv_bytes) / (bw_gbs * 1e9) * 1e3   # as gpu_kernels.md: bytes / copy BW
        row = {"batch": b, "context": context, **t, "floor_ms": floor_ms,
               "weight_bytes": w_bytes, "kv_bytes": kv_bytes,
               "tok_per_s": b / (t["run_ms"] / 1e3)}
        row["run_over_floor"] = t["run_ms"] / floor_ms
        if "replay_ms" in t:
            row["replay_over_floor"] = t["replay_ms"] / floor_ms
        rows.append(row)
        print(f"decode B={b}: {row}", flush=True)
    return rows


def bench_lora(runner, counts: list[int], batch: int, context: int, reps: int) -> list[dict]:
    """Batch-64 decode step with k distinct adapters (in-memory adapters sharing one set of tensors)."""
    dims = runner.shape.dims()
    gen = torch.Generator().manual_seed(5)
    weights = {}
    for layer in range(dims.num_layers):
        for m in TARGET_MODULES:
            in_f, out_f = dims.features(m)
            weights[(layer, m)] = (torch.randn(RANK, in_f, generator=gen) * in_f ** -0.5,
                                   torch.randn(out_f, RANK, generator=gen) * 0.01)
    scaling = {k: 2.0 for k in weights}
    for i in range(max(counts)):
        runner.add_adapter(LoraAdapter(name=f"L{i}", path=Path("/none"), rank=RANK,
                                       targets=TARGET_MODULES, weights=weights, scaling=scaling))
    rows, base = [], None
    for k in counts:
        seqs, _ = decode_seqs(runner, batch, context, [f"L{i}" for i in range(k)])
        t = time_step(runner, seqs, reps)
        base = base or t
        row = {"adapters": k, "expand_rows": runner.lora.expand_rows, **t, "run_x": t["run_ms"] / base["run_ms"]}
        if "replay_ms" in t:
            row["replay_x"] = t["replay_ms"] / base["replay_ms"]
        if k:   # the other LoRA expand variant on the same step (graphs recaptured)
            with other_expand(runner):
                other = time_step(runner, seqs, reps)
            row["other_run_ms"] = other["run_ms"]
            row["other_replay_ms"] = other.get("replay_ms", float("nan"))
        rows.append(row)
        print(f"lora k={k}: {row}", flush=True)
    return rows


@contextlib.contextmanager
def other_expand(runner):
    """Run with the LoRA expand variant that is not configured (EngineConfig.lora_expand_rows)."""
    runner.lora.expand_rows = not runner.lora.expand_rows
    runner.model_epoch += 1          # graphs captured with the other variant recapture
    try:
        yield
    finally:
        runner.lora.expand_rows = not runner.lora.expand_rows
        runner.model_epoch += 1


def bench_lora_prefill(runner, counts: list[int], num_seqs: int, prompt: int, reps: int = 5) -> list[dict]:
    """Eager prefill step with k distinct adapters (bench_lora's), each expand variant."""
    rows = []
    for k in counts:
        row = {"adapters": k, "num_seqs": num_seqs, "prompt_len": prompt}
        for rows_variant in (False, True):
            runner.lora.expand_rows = rows_variant
            walls = []
            for rep in range(reps + 2):
                bm = BlockManager(runner.num_kv_blocks, runner.block_size)
                seqs = []
                for i in range(num_seqs):
                    seq = Sequence(f"q{i}", [(13 * i + j) % 30000 + 3 for j in range(prompt)], SamplingParams(),
                                   task=f"L{i % k}" if k else "")
                    bm.allocate(seq)
                    seqs.append(seq)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.run(seqs)
                if rep >= 2:
                    walls.append((time.perf_counter() - t0) * 1e3)
            row["rows_ms" if rows_variant else "segments_ms"] = statistics.median(walls)
        runner.lora.expand_rows = runner.config.lora_expand_rows
        rows.append(row)
        print(f"lora prefill k={k}: {row}", flush=True)
    return rows


def legacy_attention(q, k_cache, v_cache, meta) -> torch.Tensor:
    """The GPU path's attention before the varlen kernel (per sequence: block gather + SDPA)."""
    import torch.nn.functional as F
    out = torch.empty_like(q)
    gqa = q.shape[1] != k_cache.shape[2]
    for j, ctx in enumerate(meta.context_lens):
        start, end = meta.query_starts[j], meta.query_starts[j + 1]
        table = meta.blocks[j]
        keys = k_cache[table].flatten(0, 1)[:ctx].transpose(0, 1)     # [Hkv, ctx, D]
        vals = v_cache[table].flatten(0, 1)[:ctx].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys, vals,
                                           is_causal=True, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)
    return out


def bench_prefill(runner, shapes: list[tuple[int, int]], reps: int = 5) -> list[dict]:
    """Eager prefill step (no adapters) through runner.run, and its attention alone (all layers)."""
    from types import SimpleNamespace

    from services.engine.kernels.attention import VarlenBatch, paged_varlen_attention
    s = runner.shape
    rows = []
    for num_seqs, prompt in shapes:
        walls = []
        for rep in range(reps + 2):   # 2 warm-ups: GEMM tuning of this M, kernel compiles
            bm = BlockManager(runner.num_kv_blocks, runner.block_size)
            seqs = []
            for i in range(num_seqs):
                seq = Sequence(f"p{i}", [(11 * i + j) % 30000 + 3 for j in range(prompt)],
                               SamplingParams())
                bm.allocate(seq)
                seqs.append(seq)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.run(seqs)          # ends in the sampler's host sync
            if rep >= 2:
                walls.append((time.perf_counter() - t0) * 1e3)
        tokens = num_seqs * prompt
        q = torch.randn(tokens, s.num_heads, s.head_dim, device="cuda", dtype=runner.dtype)
        starts = [i * prompt for i in range(num_seqs + 1)]
        tables = [seq.block_table[:-(-prompt // runner.block_size)] for seq in seqs]
        varlen = VarlenBatch.build(starts[:-1], [prompt] * num_seqs, [prompt] * num_seqs, tables, "cuda")
        legacy = SimpleNamespace(query_starts=starts, context_lens=[prompt] * num_seqs,
                                 blocks=[torch.tensor(t, device="cuda") for t in tables])
        attn = {}
        for name, fn in (("varlen_ms", lambda kc, vc: paged_varlen_attention(q, kc, vc, varlen)),
                         ("legacy_ms", lambda kc, vc: legacy_attention(q, kc, vc, legacy))):
            times = []
            for rep in range(reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for kc, vc in runner.kv_caches:   # one call per layer, as in the step
                    fn(kc, vc)
                torch.cuda.synchronize()
                if rep:
                    times.append((time.perf_counter() - t0) * 1e3)
            attn[name] = statistics.median(times)
        row = {"num_seqs": num_seqs, "prompt_len": prompt, "tokens": tokens,
               "run_ms": statistics.median(walls), "us_per_token": statistics.median(walls) * 1e3 / tokens,
               "attn_layers": s.num_layers, **attn}
        rows.append(row)
        print(f"prefill {num_seqs}x{prompt}: {row}", flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = ["# End-to-end GPU: engine (4-bit, Triton, CUDA graphs) vs HF generate + PEFT", "",
             f"Device **{res['device']}**, torch {res['torch']}, commit `{res['commit']}`, {res['date']}. "
             f"Command: `{res['command']}`. Random weights in Llama-2-7B shapes (no model hub here), "
             "the same weights on both sides: ours RTN 4-bit g128 (quantized at load), HF fp16.", ""]
    e = res.get("e2e")
    if e and not ("hf" in e and "ours" in e):
        lines += ["## Mixed-adapter trace (incomplete)", "", f"```\n{json.dumps(e)[:2000]}\n```", ""]
    if e and "hf" in e and "ours" in e:
        a = res["args"]
        lines += ["## Mixed-adapter trace", "",
                  f"{a['num_requests']} requests (ours) over {a['num_adapters']} rank-{RANK} adapters on all "
                  f"seven projections, {a['prompt_len']} prompt + {a['output_len']} output tokens, EOS ignored. "
                  f"HF: {e['hf']['requests']} requests in batches of {e['hf']['batch']} (mixed adapters per "
                  "batch via `adapter_names`), greedy. Tokens/s = generated tokens / wall time, prefill "
                  "included. Ours: second of two identical runs (the first warms up: GEMM tuning of the "
                  "prefill shapes, the graphs the decode/LoRA sections did not capture).", "",
                  "| system | requests | output tokens | wall s | tok/s |", "|---|---|---|---|---|",
                  f"| ours (LLMEngine, {e['ours']['config']['policy']}, max_num_seqs "
                  f"{e['ours']['config']['max_num_seqs']}) | {a['num_requests']} | "
                  f"{e['ours']['runs'][-1]['output_tokens']} | {e['ours']['runs'][-1]['wall_s']:.2f} | "
                  f"{e['ours']['tok_per_s']:.0f} |",
                  f"| HF generate + PEFT (fp16) | {e['hf']['requests']} | {e['hf']['output_tokens']} | "
                  f"{e['hf']['wall_s']:.2f} | {e['hf']['tok_per_s']:.1f} |", "",
                  f"**Ratio: {e['ratio']:.1f}×** (target ≥ 10×). Ours: {e['ours']['runs'][-1]['steps']} steps, "
                  f"{e['ours']['runs'][-1]['graph_steps']} of them CUDA-graph decode steps; "
                  f"{e['ours']['runs'][-1]['runner_s']:.2f} s inside ModelRunner.run "
                  f"({e['ours']['runs'][-1]['graph_runner_s']:.2f} s of it in graphed decode steps); model "
                  f"load (random init + RTN 4-bit on the GPU) {res.get('load_s', float('nan')):.1f} s.", ""]
    if res.get("decode"):
        lines += ["## Decode step through ModelRunner.run (no adapters)", "",
                  f"Floor = (4-bit weights + fp16 LM head + KV read) / copy bandwidth "
                  f"({res['copy_bw_gbs']:.0f} GB/s, read+write, as in gpu_kernels.md). run = wall time of `runner.run` "
                  "(input staging, graph replay, sampling, one host sync); replay = CUDA-event time of "
                  "the graph alone.", "",
                  "| batch | context | run ms | replay ms | floor ms | run / floor | replay / floor | tok/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["decode"]:
            lines.append(f"| {r['batch']} | {r['context']} | {r['run_ms']:.3f} | {r.get('replay_ms', float('nan')):.3f} | "
                         f"{r['floor_ms']:.3f} | {r['run_over_floor']:.2f} | {r.get('replay_over_floor', float('nan')):.2f} | "
                         f"{r['tok_per_s']:.0f} |")
        lines.append("")
    if res.get("lora"):
        lora = res["lora"]
        variant = "per-token (rows)" if lora[0].get("expand_rows") else "segment"
        other = "segment" if lora[0].get("expand_rows") else "per-token (rows)"
        base = lora[0]
        lines += ["## LoRA overhead, batch-64 decode step (rank 16, all seven projections)", "",
                  f"Configured expand: {variant}; the last columns time the same steps with the {other} expand "
                  "(graphs recaptured).", "",
                  "| distinct adapters | run ms | × none | replay ms | × none | other expand: run ms | × none | "
                  "replay ms | × none |", "|---|---|---|---|---|---|---|---|---|"]
        nan = float("nan")
        for r in lora:
            o_run, o_rep = r.get("other_run_ms", nan), r.get("other_replay_ms", nan)
            lines.append(f"| {r['adapters']} | {r['run_ms']:.3f} | {r['run_x']:.2f} | "
                         f"{r.get('replay_ms', nan):.3f} | {r.get('replay_x', nan):.2f} | {o_run:.3f} | "
                         f"{o_run / base['run_ms']:.2f} | {o_rep:.3f} | {o_rep / base.get('replay_ms', nan):.2f} |")
        lines.append("")
    if res.get("lora_prefill"):
        lines += ["## Eager prefill step with adapters, each LoRA expand variant", "",
                  "| distinct adapters | seqs × prompt | segment expand ms | per-token expand ms | segment / per-token |",
                  "|---|---|---|---|---|"]
        for r in res["lora_prefill"]:
            lines.append(f"| {r['adapters']} | {r['num_seqs']} × {r['prompt_len']} | {r['segments_ms']:.2f} | "
                         f"{r['rows_ms']:.2f} | {r['segments_ms'] / r['rows_ms']:.2f} |")
        lines.append("")
    if res.get("prefill"):
        lines += ["## Eager prefill step through ModelRunner.run (no adapters)", "",
                  "run = wall time of `runner.run` (host prep, one H2D copy, eager forward, sampling); "
                  "attention = host-timed, synchronized, all layers, for the same step layout: the varlen "
                  "Triton kernel (one launch per layer) vs the previous per-sequence gather + SDPA loop.", "",
                  "| seqs × prompt | tokens | run ms | µs/token | attention varlen ms | attention loop ms |",
                  "|---|---|---|---|---|---|"]
        for r in res["prefill"]:
            lines.append(f"| {r['num_seqs']} × {r['prompt_len']} | {r['tokens']} | {r['run_ms']:.1f} | "
                         f"{r['us_per_token']:.1f} | {r['varlen_ms']:.2f} | {r['legacy_ms']:.2f} |")
        lines.append("")
    for k, v in res.get("errors", {}).items():
        lines.append(f"Section {k} failed: `{v}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--sections", default="e2e,decode,lora,prefill")
    ap.add_argument("--skip-hf", action="store_true", help="e2e: measure ours only")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--num-adapters", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--kv-gib", type=int, default=16)
    ap.add_argument("--hf-requests", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--pdl", type=int, default=EngineConfig.pdl, choices=(0, 1, 2),
                    help="EngineConfig.pdl: programmatic dependent launch mode (services/engine/kernels/pdl.py; "
                         "default: the engine's)")
    ap.add_argument("--fused-attn", type=int, default=int(EngineConfig.fused_decode_attention), choices=(0, 1),
                    help="EngineConfig.fused_decode_attention: RoPE + KV-cache write inside the decode attention "
                         "kernel (default: the engine's)")
    ap.add_argument("--fused-act", type=int, default=int(EngineConfig.fused_mlp_activation), choices=(0, 1),
                    help="EngineConfig.fused_mlp_activation: SiLU·mul inside down_proj's GEMM where no adapter "
                         "targets down_proj (default: the engine's)")
    ap.add_argument("--w4-layout", default=EngineConfig.w4_layout, choices=W4_LAYOUTS,
                    help="EngineConfig.w4_layout: 4-bit code layout (default: the engine's, auto)")
    args = ap.parse_args()
    torch.set_num_threads(4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections.split(","))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/bench_e2e_gpu.py " + " ".join(sys.argv[1:]),
           "args": vars(args), "errors": {}}

    def save():
        (out / "e2e_gpu.json").write_text(json.dumps(res, indent=1))
        (out / "e2e_gpu.md").write_text(markdown(res))

    res["copy_bw_gbs"] = copy_bandwidth_gbs()
    from services.common.model_source import RANDOM_SHAPES
    from services.engine.llama import LlamaShape
    shape = LlamaShape.from_hf_config(dict(RANDOM_SHAPES[MODEL], model_type="llama"))
    tmp = Path(tempfile.mkdtemp())
    paths = {f"t{i}": write_peft_adapter(tmp / f"t{i}", shape.dims(), shape.num_layers, 100 + i)
             for i in range(args.num_adapters)} if "e2e" in sections else {}
    engine = None
    if "e2e" in sections and not args.skip_hf:   # HF first: it needs the memory ours would hold
        try:
            res["e2e"] = {"hf": bench_hf(args, paths)}
        except Exception as exc:  # noqa: BLE001 — keep what was measured, record the failure
            import traceback
            traceback.print_exc()
            res["errors"]["hf"] = f"{type(exc).__name__}: {exc}"
            res["e2e"] = {}
        gc.collect()
        torch.cuda.empty_cache()
        save()
    try:
        engine, res["load_s"] = build_engine(args)
        # decode and LoRA first: they capture every graph bucket the trace will use
        if "decode" in sections:
            res["decode"] = bench_decode(engine.runner, [1, 8, 16, 32, 64], 256, res["copy_bw_gbs"],
                                         args.reps)
            save()
        if "lora" in sections:
            res["lora"] = bench_lora(engine.runner, [0, 1, 8, 32, 64], 64, 256, args.reps)
            save()
            res["lora_prefill"] = bench_lora_prefill(engine.runner, [1, 16], 64, 64)
            save()
        if "prefill" in sections:
            res["prefill"] = bench_prefill(engine.runner, [(64, 64), (16, 256), (4, 1000), (1, 1000)])
            save()
        if "e2e" in sections:
            res.setdefault("e2e", {})
            for name, path in paths.items():
                engine.add_adapter(name, path)
            ours = bench_ours(args, engine)
            res["e2e"]["ours"] = ours
            if "hf" in res["e2e"]:
                res["e2e"]["ratio"] = ours["tok_per_s"] / res["e2e"]["hf"]["tok_per_s"]
            save()
    except Exception as exc:  # noqa: BLE001 — keep what was measured, record the failure
        import traceback
        traceback.print_exc()
        res["errors"]["ours"] = f"{type(exc).__name__}: {exc}"
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
