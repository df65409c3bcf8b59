"""bench_serve_gpu.py's command line: its sections, the ablation table and the options.

    python benchmarks/bench_serve_gpu.py --help
"""
from __future__ import annotations

import argparse
from pathlib import Path

from serve_gpu_fit import SCALE_VARIANTS, scale_variant
from serve_gpu_workload import LOAD_UNITS, parse_length_scale
from services.engine.config import EngineConfig
from services.engine.policies import POLICIES

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("calib", "main", "repeat", "ablate", "timeouts", "wfq", "scale", "fp16")
# --ablations NAME: (label, prediction mode, β (None: the run's --beta; 0: ∞), EngineConfig overrides)
ABLATIONS = {
    "task-mean": ("inlaid, no prediction (task mean)", "task-mean", None, {}),
    "beta-inf": ("inlaid, beta=inf", "predictor", 0, {}),
    "oracle": ("inlaid, oracle lengths", "oracle", None, {}),
    "strict": ("inlaid, strict beta cap (no fill)", "predictor", None, scale_variant("inlaid-strict")[1]),
    "no-overload": ("inlaid, no overload prefill rule", "predictor", None, {"inlaid_overload_min_free": 0.0}),
    "no-piggyback": ("inlaid, prefill-only steps (no piggyback)", "predictor", None,
                     scale_variant("inlaid-separate")[1]),
    "r025": ("inlaid, reserve 1/4 of predicted output", "predictor", None, scale_variant("inlaid-r025")[1]),
    "streak2": ("inlaid, decode streak 2", "predictor", None, scale_variant("inlaid-streak2")[1]),
    "step3": ("inlaid, decode steps within 3x the fastest", "predictor", None, {"inlaid_step_time_ratio": 3.0}),
    "step3-slo5": ("inlaid, decode steps within 3x the fastest, late requests last (k = 5)", "predictor", None,
                   {"inlaid_step_time_ratio": 3.0, "inlaid_slo_scale": 5.0}),
    "no-slo": ("inlaid, late requests not ranked last (inlaid_slo_scale 0)", "predictor", None, {"inlaid_slo_scale": 0.0}),
}
TINY_SHAPE = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def length_scale_arg(text: str) -> tuple[float, float]:
    try:
        return parse_length_scale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GPU serving benchmark: every scheduling policy on one loaded engine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--commit", default="unknown", help="git commit of the code (the device copy has no .git)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=525.0, help="skip a section whose estimate exceeds what is left")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random model, fp32, no quantization")
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quant-bits", type=int, default=4)
    ap.add_argument("--policies", default="inlaid,fifo,mlfq,wfq")
    ap.add_argument("--num-tasks", type=int, default=21)
    ap.add_argument("--rates", default="0.5,0.8,1.1", help="fractions of FIFO's saturated throughput")
    ap.add_argument("--replay-s", type=float, default=6.0, help="arrival window of one replay")
    ap.add_argument("--drain-s", type=float, default=3.0, help="a replay is cut at window + max(this, window/2)")
    ap.add_argument("--burst-requests", type=int, default=3000)
    ap.add_argument("--burst-s", type=float, default=None,
                    help="measured FIFO burst (C); default 5 s times the --length-scale output factor (at least 1), "
                         "so the burst outlives its first generation of requests")
    ap.add_argument("--capacity-req-s", type=float, default=0.0,
                    help="C to scale --rates by instead of the one this run's burst measures (the burst still runs "
                         "for the cost model): replays of one command then offer the same req/s (0: measured)")
    ap.add_argument("--load-unit", choices=LOAD_UNITS, default="requests",
                    help="requests: every trace at rate x C req/s; tokens: each trace's req/s scaled by the capacity "
                         "burst's mean output length over its own, so traces whose Zipf order favours short or long "
                         "tasks offer the same output tokens per second (serve_gpu_workload.trace_rate)")
    ap.add_argument("--warm-burst-s", type=float, default=2.0,
                    help="unmeasured FIFO burst before the measured one (kernel compiles, GEMM tuning); 0: none")
    ap.add_argument("--calib-half-s", type=float, default=4.0)
    ap.add_argument("--grid-reps", type=int, default=3)
    ap.add_argument("--ablations", default="", help=f"comma list of {tuple(ABLATIONS)}; empty: all")
    ap.add_argument("--scale-tasks", default="2,10,100,1000")
    ap.add_argument("--scale-policies", default="inlaid,inlaid-strict",
                    help=f"variants replayed on each scaling trace: a policy name or one of {sorted(SCALE_VARIANTS)}")
    ap.add_argument("--scale-frac", type=float, default=1.3,
                    help="rate of the scaling runs as a fraction of C: above 1, so throughput is capacity")
    ap.add_argument("--scale-s", type=float, default=12.0,
                    help="arrival window of one scaling replay (5 s runs were dominated by the drain after it)")
    ap.add_argument("--sim-s", type=float, default=60.0)
    ap.add_argument("--client-timeout-s", type=float, default=2.0,
                    help="section timeouts: each client gives up this long after its request arrives")
    ap.add_argument("--hog-policies", default="wfq,fifo")
    ap.add_argument("--hog-overload", type=float, default=1.5)
    ap.add_argument("--hog-s", type=float, default=5.0)
    ap.add_argument("--fp16-policies", default="fifo,inlaid")
    ap.add_argument("--trace-repeats", type=int, default=1,
                    help="traces at the highest rate: the main section's and N-1 more draws of the same rate, "
                         "task mix and lengths (section repeat: --repeat-policies on the 4-bit base; the fp16 "
                         "section runs its policies on each); the report gives every trace's ratios")
    ap.add_argument("--repeat-policies", default="inlaid,fifo")
    ap.add_argument("--beta", type=int, default=10)
    ap.add_argument("--slots", type=int, default=32, help="adapter slots on the device (LRU)")
    ap.add_argument("--adapter-sets", type=int, default=8, help="distinct random weight sets shared by the tasks")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-decode-streak", type=int, default=4)
    ap.add_argument("--starvation-s", type=float, default=EngineConfig.starvation_limit_s,
                    help="inlaid's starvation limit (default: the engine's; runs up to commit 9662f2e used 5 s unless set, which "
                         "under overload let most late requests jump ahead of SRTF: results/sim_starvation.md)")
    ap.add_argument("--num-kv-blocks", type=int, default=0, help="0: from --kv-gib")
    ap.add_argument("--kv-gib", type=float, default=16.0,
                    help="KV cache per runner (same for the 4-bit and fp16 bases; ample for this workload)")
    ap.add_argument("--gpu-gib", type=float, default=0.0,
                    help="emulate a card of this much memory (e.g. 24: A10, L4, RTX 4090): an allocator cap, "
                         "and each runner's KV cache is what the cap leaves (overrides --kv-gib); 0: off")
    ap.add_argument("--act-reserve-gib", type=float, default=3.0,
                    help="with --gpu-gib: memory kept free of KV blocks for activations, graphs, workspaces")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8_e4m3"), default="auto",
                    help="the quantized base's KV cache (EngineConfig.kv_cache_dtype); the fp16 section keeps "
                         "S-LoRA's fp16 cache")
    ap.add_argument("--inlaid-step-time-ratio", type=float, default=0.0,
                    help="inlaid's latency target in every section (EngineConfig.inlaid_step_time_ratio: its running "
                         "pool capped so a decode-only step takes at most this many times the fastest; 0: off)")
    ap.add_argument("--inlaid-slo-scale", type=float, default=0.0,
                    help="inlaid's deadline-aware admission in every section (EngineConfig.inlaid_slo_scale: a waiting "
                         "request that can no longer finish within this many times its latency served alone ranks "
                         "after every one that still can; 0: off)")
    ap.add_argument("--kv-v-layout", choices=("auto", "key", "token_major"), default="auto",
                    help="the quantized base's V cache layout (EngineConfig.kv_v_layout; auto: token-major for an "
                         "fp8 cache on the GPU fast path, else K's)")
    ap.add_argument("--kv-max-blocks", type=int, default=0,
                    help="at most this many KV blocks for the quantized base (0: what the budget leaves; without "
                         "--gpu-gib this sets the count), e.g. an fp8 cache at the token count the fp16 one had, "
                         "to price the halved reads alone")
    ap.add_argument("--max-tokens", type=int, default=512, help="loose cap; requests end at their trace length")
    ap.add_argument("--length-scale", type=length_scale_arg, default=(1.0, 1.0),
                    help="PxO: multiply the trace's prompt lengths by P and output lengths by O (longer "
                         "requests, where the KV cache binds; see bench_sim_memory.py)")
    ap.add_argument("--slo-scale", type=float, default=5.0)
    ap.add_argument("--pred-sigma", type=float, default=0.25)
    ap.add_argument("--zipf-a", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.burst_s is None:
        args.burst_s = 5.0 * max(1.0, args.length_scale[1])
    args.ablations = [k for k in args.ablations.split(",") if k]
    unknown = set(args.ablations) - set(ABLATIONS)
    if unknown:
        ap.error(f"unknown ablations {sorted(unknown)}; choose from {tuple(ABLATIONS)}")
    args.policies = args.policies.split(",")
    args.rates = [float(x) for x in args.rates.split(",")]
    args.scale_tasks = [int(x) for x in args.scale_tasks.split(",") if x]
    args.scale_policies = args.scale_policies.split(",")
    unknown = [v for v in args.scale_policies if scale_variant(v)[0] not in POLICIES]
    if unknown:
        ap.error(f"unknown scale variants {unknown}; choose policies {sorted(POLICIES)} or {sorted(SCALE_VARIANTS)}")
    args.hog_policies = args.hog_policies.split(",")
    args.fp16_policies = args.fp16_policies.split(",")
    args.repeat_policies = args.repeat_policies.split(",")
    unknown = [p for p in args.repeat_policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown repeat policies {unknown}; choose from {sorted(POLICIES)}")
    if args.trace_repeats < 1:
        ap.error("--trace-repeats must be at least 1 (the main section's trace)")
    if args.client_timeout_s <= 0:
        ap.error("--client-timeout-s must be > 0")
    if args.tiny:
        from services.common.model_source import RANDOM_SHAPES
        RANDOM_SHAPES.setdefault("tiny-serve", TINY_SHAPE)   # only inside this process
        args.model, args.device, args.quant_bits, args.kv_gib = "random:tiny-serve", "cpu", 0, 0.25
        if args.dtype == "auto":
            args.dtype = "float32"
    return args
