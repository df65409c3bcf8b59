#!/usr/bin/env bash
# One GPU device call's worth of work, in priority order, each stage bounded by its own timeout so
# a slow stage cannot eat the next ones. Results land in $OUT (at most 8 files come back from the
# device: each stage writes <= 2).
#
#   bash benchmarks/gpu_session.sh kernels COMMIT   # ~300 s: GPU kernel tests (every tuner candidate), the
#                                                   #   gemm table at M = 1..256 (tuner's top six per shape) + decode
#   bash benchmarks/gpu_session.sh serial COMMIT    # ~480 s: serial split-K's GPU tests (with the direct launch's),
#                                                   #   the gemm/decode table with serial split-K beside the atomics,
#                                                   #   and the eager-step profile with serial split-K on
#   bash benchmarks/gpu_session.sh probe COMMIT     # ~390 s: engine + fused-op GPU tests, where small-M GEMM time goes
#                                                   #   (probe_gemm_overhead.py), the decode table (in place vs zeroed outputs)
#   bash benchmarks/gpu_session.sh inplace COMMIT   # ~390 s: fast-path GPU tests (logits vs the CPU reference, graphed
#                                                   #   decode, fused norms), the decode table, the eager-step profile
#   bash benchmarks/gpu_session.sh lora COMMIT     # ~300 s: LoRA GPU tests (kernels both expand variants, engine logits
#                                                   #   with the per-token expand), the decode table with LoRA rows
#                                                   #   (per-token expand, shrink alone)
#   bash benchmarks/gpu_session.sh lora-engine COMMIT  # ~200 s: the engine runner's batch-64 LoRA decode (graphs) and a
#                                                   #   64 x 64 LoRA prefill, each LoRA expand variant (bench_e2e_gpu lora)
#   bash benchmarks/gpu_session.sh serve COMMIT     # ~450 s: bench_serve_gpu, every section
#   bash benchmarks/gpu_session.sh w3 COMMIT        # ~350 s: W3A16 sweep (gemv_row vs gemv_h2) + gemm/decode
#   bash benchmarks/gpu_session.sh e2e COMMIT       # ~300 s: whole runner decode + LoRA + e2e trace
#   bash benchmarks/gpu_session.sh overload COMMIT  # ~500 s: policies at 0.8 / 1.3 / 1.6 C on 12 s replays + fp16 fifo
#                                                   #   (the 6 s replays of `serve` never saturate)
#   bash benchmarks/gpu_session.sh budget COMMIT    # ~450 s: overload on an emulated 24 GiB card (A10/L4/RTX 4090
#                                                   #   class), up to 256 running: KV memory now differs by base
#   bash benchmarks/gpu_session.sh budget-long COMMIT  # ~400 s: the same card with 4x longer prompts and outputs,
#                                                   #   where the fp16 cache binds (bench_sim_memory.py: sim_memory.md); its FIFO burst runs 20 s
#                                                   #   (at 5 s the 71d9c18 run saw 14 completions: no steady state);
#                                                   #   at 1.6 C the 4-bit engines of 626f90e still finished every
#                                                   #   request, hence 1.6 and 2.4 C
#   bash benchmarks/gpu_session.sh budget-long-high COMMIT  # ~330 s: the same at 2.4 and 3.6 x C, no ablations
#                                                   #   (at 2.4 C of e03242d fifo's SLO was still 0.29, so no policy could show 5x)
#   bash benchmarks/gpu_session.sh budget-long-drain COMMIT  # ~420 s: 2.4 and 3.2 x C drained for 16 s after the
#                                                   #   arrivals, so (nearly) every request finishes and JCT covers all of them
#                                                   #   (7e88663 cut at 6 s left 177 of fifo's 518 requests unfinished)
#   bash benchmarks/gpu_session.sh drain30 COMMIT  # ~340 s: budget-long-drain with the engine's default starvation limit,
#                                                   #   30 s (the benchmark's default was 5 s up to 9662f2e, which made
#                                                   #   the 10 s replays' late requests jump ahead of SRTF; simulated on
#                                                   #   d2add64's cost model: sim_starvation.md); since then every stage
#                                                   #   uses 30 s, and this one names it
#   bash benchmarks/gpu_session.sh drain30-fixed COMMIT  # ~300 s: drain30 with C fixed at 03533be's 15.9 req/s
#                                                   #   (--capacity-req-s): the replays' measured C ranged 15.3-19.8
#   bash benchmarks/gpu_session.sh drain30-repeat COMMIT  # ~320 s (at most 420): 3.2 x C (C fixed at 15.9 req/s) on three traces,
#                                                   #   inlaid and fifo on 4-bit and fifo on fp16 on each (--trace-repeats):
#                                                   #   one replay per cell gave 1.46-1.93x same-base JCT across runs
#   bash benchmarks/gpu_session.sh drain30-tokens COMMIT  # at most 450 s: drain30-repeat with each trace's req/s scaled
#                                                   #   to offer 3.2 x C's output tokens per second (--load-unit tokens)
#   bash benchmarks/gpu_session.sh scale-prefetch COMMIT  # ~330 s: 100 / 1000 tasks at 1.3 x C on the 24 GiB card,
#                                                   #   inlaid with and without background adapter packing
#                                                   #   (EngineConfig.lora_prefetch; 1000 tasks outnumber the 128 host packs)
#   bash benchmarks/gpu_session.sh roofline COMMIT  # ~500 s: reads alone vs the GEMM at M = 1 / 16 (is it the bytes or the
#                                                   #   work per byte?), shift vs fma unpacking; GPU tests under fma
#   bash benchmarks/gpu_session.sh pdl COMMIT       # ~150 s: GPU tests of programmatic dependent launch (graphed
#                                                   #   decode, engine logits), then the decode section (PDL columns)
#   bash benchmarks/gpu_session.sh pdl-all COMMIT   # ~450 s: pdl, pdl-gemm, then the engine's LoRA section
#                                                   #   (bench_e2e_gpu: graphed decode, prefill) with PDL off and in mode 2
#   bash benchmarks/gpu_session.sh pdl1 COMMIT      # ~260 s: PDL mode 1 (the engine's default): engine logits
#                                                   #   with and without it, decode + LoRA rows, the engine's LoRA
#                                                   #   section with PDL off / 1 / off
#   bash benchmarks/gpu_session.sh fused COMMIT     # ~260 s (at most 395): RoPE + KV-cache write inside the decode attention
#                                                   #   kernel, SiLU·mul inside the down GEMM: their GPU tests (kernels
#                                                   #   vs the unfused path, graphed decode, engine logits), the decode
#                                                   #   section (fused columns)
#   bash benchmarks/gpu_session.sh fused-short COMMIT  # ~200 s (at most 250): fused's SiLU·mul part only
#   bash benchmarks/gpu_session.sh glu-probe COMMIT  # ~120 s: down_proj with and without SiLU·mul in its GEMM at
#                                                   #   M = 1 and 16, per tuner config (probe_glu.py: glu_probe.md)
#   bash benchmarks/gpu_session.sh gemm-stream COMMIT  # ~150 s: the GEMMs streamed back to back over cold
#                                                    #   weights beside one call after a flush, ours (PDL 0/1/2) vs
#                                                    #   fp16 vs torch int4 (probe_gemm_stream.py: gemm_stream.md)
#   bash benchmarks/gpu_session.sh stream-k COMMIT  # at most 480 s (not run yet): stream-K (mma8_sk) GPU tests, then
#                                                   #   stream-K vs split-K at M = 1-16 streamed and the 7B decode step
#                                                   #   at batch 1 / 16 with and without them (probe_stream_k.py: stream_k.md)
#   bash benchmarks/gpu_session.sh stream-k-min COMMIT  # 40 s on the H100 at 900b7dc (at most 290): 4-bit tests, M = 1 and 16, decode at batch 1
#   bash benchmarks/gpu_session.sh stream-repeat COMMIT  # ~360 s (at most 585): gemm-stream, then drain30-repeat in
#                                                   #   one call (a second call needs the machine still warm)
#   bash benchmarks/gpu_session.sh pdl1-fused COMMIT  # ~400 s (at most 545): pdl1 and fused-attn in one call:
#                                                   #   the GPU tests of both, the decode section at batch 1/16/64, and
#                                                   #   the engine's LoRA section with PDL off / PDL 1 / PDL 1 + both fusions
#   bash benchmarks/gpu_session.sh pdl-gemm COMMIT  # ~70 s: the GEMM section (its pre-zeroed column is the form
#                                                   #   the engine runs; not measured since it was added)
#   bash benchmarks/gpu_session.sh frag COMMIT      # at most 540 s: fragment-ordered kernels (kernels/w4a16_frag.py):
#                                                   #   probe_frag.py at M = 1/4/16 and 64/128/256 (config
#                                                   #   grids beside the tuned engine GEMM and cuBLAS: frag_small/large.md),
#                                                   #   then their GPU tests
#   bash benchmarks/gpu_session.sh frag-engine COMMIT  # at most 350 s: the fragment-ordered layout in the engine
#                                                   #   (EngineConfig.w4_layout frag): graphed 7B decode and tuned GEMMs
#                                                   #   in both layouts (probe_frag_engine.py), then the GPU tests
#   bash benchmarks/gpu_session.sh frag-engine-short COMMIT  # at most 230 s: its decode at batch 1 / 16 / 4 and tests
#   bash benchmarks/gpu_session.sh frag-major COMMIT  # at most 500 s (36747d6: 246 s with the tests cut at 120 s; alone 167 s): codes stored block-major
#                                                   #   (one K block of consecutive rows contiguous) beside row-major:
#                                                   #   GPU kernel tests, decode at batch 1 / 4 / 16, GEMMs at M <= 64
#   bash benchmarks/gpu_session.sh frag-pdl COMMIT  # at most 500 s (not run yet): PDL mode 1 over the block-major fragment
#                                                   #   layout (decode at batch 1 / 4 / 16), then e2e at 16 running PDL 0 / 1 / 0
#   bash benchmarks/gpu_session.sh attn-sweep COMMIT  # at most 440 s (100 s at 97fe563): decode attention GPU tests, the
#                                                   #   graphed 7B step at batch 1-128 per attention variant, launch
#                                                   #   shapes (BN x warps x double buffer x split-KV x tensor cores)
#                                                   #   at 4 small-batch and 2 large-batch shapes
#   bash benchmarks/gpu_session.sh attn-serve COMMIT  # at most 520 s (not run yet): engine GPU tests with the tensor-core decode
#                                                   #   attention and split-KV on, then drain30-tokens' serving run
#   bash benchmarks/gpu_session.sh attn-frag COMMIT  # at most 190 s (not run yet): attn-serve's engine GPU tests, then the graphed
#                                                   #   decode at batch 1 / 4 / 16, tiled and block-major fragments
#   bash benchmarks/gpu_session.sh attn-frag-pdl COMMIT  # at most 350 s (ran at 180c8f6: 167 s): attn-serve's engine GPU tests, then the graphed
#                                                   #   decode at batch 1 / 4 / 8 / 16, tiled and block-major fragments, each
#                                                   #   with and without PDL mode 1 (attn-frag and frag-pdl's decode in one)
#   bash benchmarks/gpu_session.sh kv-fp8 COMMIT  # at most 230 s (not run yet): the fp8 KV cache (ENGINE_KV_CACHE_DTYPE=fp8_e4m3): its GPU
#                                                   #   tests with the engine's default ones, the graphed 7B step with
#                                                   #   fp16 vs fp8 caches (context 1024)
#   bash benchmarks/gpu_session.sh kv-fp8-all COMMIT  # at most 560 s (ran at 852632c): for one call when device time is short: kv-fp8's GPU
#                                                   #   tests, then kv-fp8-serve on two traces instead of three
#   bash benchmarks/gpu_session.sh kv-fp8-shape COMMIT  # at most 460 s (ran at c8e629e, H200): GPU tests, one launch's GB/s and the graphed step over fp8 caches on the
#                                                   #   CUDA-core loop (DECODE_FP8_DOT off: no byte-wise shared loads of V), with
#                                                   #   V token-major within blocks (vtm: wide loads on tensor cores too), with
#                                                   #   wider tiles / deeper pipelines (DECODE_FP8_BLOCK_N / _STAGES; 852632c: 1.08x)
#   bash benchmarks/gpu_session.sh kv-fp8-default COMMIT  # at most 570 s: the fp8 GPU tests at the launch shape kv-fp8-shape
#                                                   #   chose, then kv-fp8-serve's serving run with it
#   bash benchmarks/gpu_session.sh kv-fp8-step3 COMMIT  # at most 400 s (ran at 180c8f6: 273 s): kv-fp8-default's serving run, inlaid
#                                                   #   with the latency target inlaid_step_time_ratio = 3
#   bash benchmarks/gpu_session.sh kv-fp8-slo COMMIT  # at most 590 s (ran at 180c8f6: 398 s): kv-fp8-step3 with inlaid's deadline-aware
#                                                   #   admission too (inlaid_slo_scale 5; sim_inlaid_grid_slo_a6de4f5.md), and
#                                                   #   on the main trace an ablation without it (latency target alone) and
#                                                   #   clients giving up after 2 s (section timeouts; sim_client_timeouts_72a5f46.md)
#   bash benchmarks/gpu_session.sh kv-fp8-lean COMMIT  # at most 400 s (not run yet): kv-fp8-all on one trace (the main section's)
#   bash benchmarks/gpu_session.sh kv-fp8-min COMMIT  # at most 180 s (not run yet): kv-fp8's fp8 GPU tests, then the graphed step at
#                                                   #   batch 16 / 64 (context 1024), fp16 vs fp8 caches
#   bash benchmarks/gpu_session.sh kv-fp8-serve COMMIT  # at most 440 s (ran at 180c8f6: 269 s): drain30-tokens' serving run with the 4-bit base on
#                                                   #   an fp8 cache of 1830 blocks (its fp16 cache's at 8d39b65; sim_vs_fp16
#                                                   #   what-if: KV reads at half price), fifo on fp16 beside it
#   bash benchmarks/gpu_session.sh frag-e2e COMMIT  # at most 220 s: bench_e2e_gpu's mixed-adapter trace at 16 running,
#                                                   #   w4_layout tiles vs auto (the fragment layout there)
#   bash benchmarks/gpu_session.sh tma COMMIT  # at most 350 s (not run yet): the TMA kinds' GPU tests, the graphed decode
#                                                   #   at batch 1 / 4 / 16 with and without them (probe_frag_engine --tma), then
#                                                   #   TMA-fed probe kernels beside the engine's GEMM at M = 1 / 16 / 64, 4096 x 4096
#   bash benchmarks/gpu_session.sh scale256 COMMIT  # ~350 s: 2 / 10 / 100 / 1000 tasks at 1.3 x C on the 24 GiB card with
#                                                   #   up to 256 running (real engine + simulator; measured so far only at 64)
#
# The device copy has no .git: pass the commit explicitly.
set -u
stage=${1:?stage: kernels | serial | probe | inplace | lora | lora-engine | serve | w3 | e2e | overload | budget | budget-long | budget-long-high | budget-long-drain | drain30 | drain30-fixed | drain30-repeat | drain30-tokens | scale-prefetch | pdl | pdl1 | fused | fused-short | glu-probe | stream-k | stream-k-min | roofline | prefetch | prefetch-l2 | stream-repeat | gemm-stream | pdl1-fused | pdl-gemm | pdl-all | frag | frag-engine | frag-engine-short | frag-e2e | frag-major | frag-pdl | attn-sweep | attn-serve | attn-frag | attn-frag-pdl | kv-fp8 | kv-fp8-serve | kv-fp8-all | kv-fp8-shape | kv-fp8-default | kv-fp8-step3 | kv-fp8-slo | kv-fp8-lean | kv-fp8-min | tma | scale256}
commit=${2:?commit}
out=${OUT:?OUT must be set (the device tool sets it)}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

drain30_tokens() {   # TIMEOUT_S BUDGET_S [EXTRA ARGS]: drain30-repeat's serving run with the load in output tokens
  local timeout_s=$1 budget_s=$2
  shift 2
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  timeout "$timeout_s" python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,repeat,fp16 \
    --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo \
    --rates 3.2 --replay-s 10 --drain-s 16 --starvation-s 30 --budget-s "$budget_s" --capacity-req-s 15.9 \
    --trace-repeats 3 --repeat-policies inlaid,fifo --fp16-policies fifo --load-unit tokens "$@" 2>&1 \
    | grep -v -i warn | tee "$out/serve_gpu.log"
}

engine_gpu_tests() {   # TIMEOUT_S: the engine's GPU logits / graph-replay / long-prefill tests
  timeout "$1" python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py \
    -k "logits_match or graph_replay or long_prefill" 2>&1 | tail -3 | tee "$out/pytest_engine.log"
}

case "$stage" in
  kernels)
    timeout 230 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "every_candidate or tuner" 2>&1 \
      | tail -15 | tee "$out/pytest_kernels.log"
    timeout 240 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections gemm,decode 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    ;;
  serial)
    timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py -k "serial or direct_launch" 2>&1 \
      | tail -15 | tee "$out/pytest_serial.log"
    timeout 280 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections gemm,decode --serial 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    timeout 120 python3 benchmarks/profile_eager_step.py --out "$out" --commit "$commit" --serial-split 2>&1 \
      | grep -v -i warn | tail -8
    ;;
  probe)
    timeout 230 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py tests/gpu/test_kernels.py \
      -k "logits_match or graph_replay or llm_engine or long_prefill or fused_ops or graphed_decode" 2>&1 \
      | tail -15 | tee "$out/pytest_probe.log"
    timeout 150 python3 benchmarks/probe_gemm_overhead.py --out "$out" --commit "$commit" 2>&1 | grep -v -i warn
    timeout 120 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    ;;
  inplace)
    # the engine tests first: at 4808180 the W4 decoder's tuning ate most of a 170 s timeout
    timeout 260 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py tests/gpu/test_kernels.py \
      -k "graphed_decode or fused_ops or (logits_match and not serial) or graph_replay" 2>&1 \
      | tail -15 | tee "$out/pytest_inplace.log"
    timeout 120 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    timeout 100 python3 benchmarks/profile_eager_step.py --out "$out" --commit "$commit" 2>&1 \
      | grep -v -i warn | tail -8
    ;;
  lora)
    timeout 230 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "lora_matches or lora-rows or graphed_decode or stacked_qkv" 2>&1 | tail -15 | tee "$out/pytest_lora.log"
    timeout 150 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    ;;
  pdl)
    timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "graphed_decode or w4-pdl" 2>&1 | tail -15 | tee "$out/pytest_pdl.log"
    timeout 150 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,8,16,64 --lora-adapters 0,32 2>&1 | grep -v -i warn | tee "$out/gpu_kernels.log"
    ;;
  pdl-all)   # one call, 8 files back: pdl, the GEMM table, and the engine's LoRA section (graphed batch-64 decode, prefill) plain vs PDL 2
    timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "graphed_decode or w4-pdl" 2>&1 | tail -15 | tee "$out/pytest_pdl.log"
    timeout 130 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,8,16,64 --lora-adapters 0,32 2>&1 | grep -v -i warn | grep -v "^|"
    timeout 90 python3 benchmarks/bench_gpu_kernels.py --out "$out/gemm" --commit "$commit" --sections gemm 2>&1 \
      | grep -v -i warn | grep -v "^|"
    rm -f "$out/gemm/gpu_kernels.json"
    for mode in 0 2; do
      timeout 110 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e_pdl$mode" --commit "$commit" --skip-hf \
        --sections lora --pdl $mode 2>&1 | grep -v -i warn | grep -v "^|"
    done
    ;;
  pdl1)   # PDL mode 1 (the engine's default since c73667d's run): engine logits with it and without, the decode
           # section (LoRA rows in mode 1), the engine's LoRA section with PDL off, in mode 1, off again (drift check)
    timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py \
      -k "logits_match and w4 and not serial and not lora and not prefetch" 2>&1 | tail -15 | tee "$out/pytest_pdl1.log"
    timeout 100 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,16,64 --lora-adapters 0,32 2>&1 | grep -v -i warn | grep -v "^|"
    for run in 0a 1 0b; do
      timeout 80 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e_pdl$run" --commit "$commit" --skip-hf \
        --sections lora --pdl "${run:0:1}" 2>&1 | grep -v -i warn | grep -v "^|"
    done
    rm -f "$out/e2e_pdl0b/e2e_gpu.json"   # 8 files back at most
    ;;
  fused)   # EngineConfig.fused_decode_attention and fused_mlp_activation: two launches per layer fewer in a decode step
    timeout 200 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "decode_rope_attention or glu_input or fused" 2>&1 | tail -15 | tee "$out/pytest_fused.log"
    timeout 120 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,16,64 --lora-adapters 0 2>&1 | grep -v -i warn | grep -v "^|"
    # the engine's LoRA section in its default configuration (fused attention, PDL off)
    timeout 75 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e" --commit "$commit" --skip-hf --sections lora \
      2>&1 | grep -v -i warn | grep -v "^|"
    ;;
  glu-probe)   # where the fused SiLU·mul GEMM loses (gpu_kernels_v19_fused_d5b34b3.md: 0.76x decode at batch 1)
    timeout 200 python3 benchmarks/probe_glu.py --out "$out" --commit "$commit" --ms 1,16 --top 3 2>&1 \
      | grep -v -i warn | tee "$out/glu_probe.log"
    ;;
  stream-k)   # stream-K for few rows: correctness (runs crossing tiles, bias, residual), then speed
    timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "stream_k" 2>&1 \
      | tail -15 | tee "$out/pytest_stream_k.log"
    timeout 360 python3 benchmarks/probe_stream_k.py --out "$out" --commit "$commit" 2>&1 \
      | grep -v -i warn | tee "$out/stream_k.log"
    ;;
  stream-k-min)   # stream-k in under 300 s: M = 1 and 16, decode at batch 1
    timeout 60 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "stream_k and 4-" 2>&1 \
      | tail -15 | tee "$out/pytest_stream_k.log"
    timeout 230 python3 benchmarks/probe_stream_k.py --out "$out" --commit "$commit" --ms 1,16 --decode-batches 1 2>&1 \
      | grep -v -i warn | tee "$out/stream_k.log"
    ;;
  roofline)   # read-only roofline beside the small-M GEMM (probe_roofline.py), both h2 unpacking forms, then the
              # 4-bit kernel GPU tests (every tuner candidate without act-order, stream-K, GLU) under the fma form
    timeout 400 python3 benchmarks/probe_roofline.py --out "$out" --commit "$commit" 2>&1 \
      | grep -v -i warn | tee "$out/roofline.log"
    INLAID_H2_DEQ=fma timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py \
      -k "every_candidate and 4-False or stream_k and 4- or glu_input" 2>&1 | tail -15 | tee "$out/pytest_fma.log"
    ;;
  prefetch)   # gemv_h2's register double buffer: the roofline probe (its configs with and without it), the tuner's
              # picks streamed at M = 1 / 4 / 16 (probe_gemm_stream), GPU tests of every M <= 4 candidate, the decode table
    timeout 150 python3 benchmarks/probe_roofline.py --out "$out" --commit "$commit" 2>&1 \
      | grep -v -i warn | tee "$out/roofline.log"
    timeout 200 python3 benchmarks/probe_gemm_stream.py --out "$out" --commit "$commit" --ms 1,4,16 2>&1 \
      | grep -v -i warn | tee "$out/gemm_stream.log"
    timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "every_candidate and False-1] or every_candidate and False-3]" 2>&1 \
      | tail -15 | tee "$out/pytest_prefetch.log"
    timeout 150 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,4,16 2>&1 | grep -v -i warn | tail -30
    ;;
  frag)   # fragment-ordered codes: the config grids (the probe rewrites its files after each shape), then GPU tests
    timeout 170 python3 benchmarks/probe_frag.py --out "$out" --commit "$commit" --ms 1,4,16 --stem frag_small 2>&1 \
      | grep "^K="
    timeout 170 python3 benchmarks/probe_frag.py --out "$out" --commit "$commit" --ms 64,128,256 --stem frag_large 2>&1 \
      | grep "^K="
    # the other fragment order at M = 64 (Triton 3.6's wgmma path spills with k_width 4 in the SASS compiled here)
    timeout 100 python3 benchmarks/probe_frag.py --out "$out" --commit "$commit" --ms 64 --k-width 2 --stem frag_m64_kw2 2>&1 \
      | grep "^K="
    timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k fragment 2>&1 | tail -5 | tee "$out/pytest_frag.log"
    ;;
  frag-engine)   # the fragment-ordered layout as the engine serves it, beside the tiled one: decode, the GPU
                 # tests of the layout, then the tuned GEMMs (last: the cap cuts them first)
    timeout 160 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 \
      --batches 1,16,4,64 --stem frag_engine_decode 2>&1 | grep "^decode"
    timeout 90 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py tests/gpu/test_kernels.py \
      -k "w4-frag or fragment_layout" 2>&1 | tail -8 | tee "$out/pytest_frag_engine.log"
    timeout 100 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --batches "" \
      --stem frag_engine_gemm 2>&1 | grep "^K="
    ;;
  frag-major)   # block-major storage of the fragment codes beside row-major (gptq_format.frag_block_major):
                # the GPU test of every fragment kind on both storages, the graphed decode, then the GEMMs at M <= 64
    timeout 200 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "fragment_kernels or w4-fragb" 2>&1 | tail -4 | tee "$out/pytest_frag_major.log"
    timeout 150 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 --batches 1,4,16 \
      --k-widths 4 --block-major 4 --stem frag_major_decode 2>&1 | grep "^decode"
    timeout 150 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --batches "" --ms 1,4,16,64 \
      --k-widths 4 --block-major 4 --stem frag_major_gemm 2>&1 | grep "^K="
    ;;
  frag-pdl)   # programmatic dependent launch (mode 1) over what auto serves at <= 32 running (the block-major
              # fragment layout): PDL gained 1.06x at batch 1 on the tiled layout (ba97a3b) but cost the batch-64
              # LoRA step 6 %, so it is off; at <= 32 running that cost may not apply. Decode at batch 1 / 4 / 16,
              # tiles and frag4b with and without PDL, then the engine end to end at 16 running, PDL 0 / 1 / 0
    timeout 200 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 --batches 1,4,16 \
      --k-widths "" --block-major 4 --pdl 1 --stem frag_pdl_decode 2>&1 | grep "^decode"
    for pdl in 0 1 0; do
      timeout 100 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e_pdl$pdl" --commit "$commit" --skip-hf \
        --sections e2e --max-num-seqs 16 --num-requests 128 --w4-layout auto --pdl "$pdl" 2>&1 | grep "^ours\|Error"
    done
    ;;
  attn-sweep)   # the paged decode attention kernel's launch shapes at Llama-2-7B attention against the copy
                # bandwidth: serving's cost models price a cached token read at ~1.85 TB/s, and at a full cache
                # that is near half a decode step; one program per (sequence, head) leaves most SMs idle at small
                # batches, so split-KV (flash-decoding) is swept there. GPU tests first, then the small batches
                # (BN x warps x double buffer x splits x tensor-core tile math) with the graphed 7B step under the
                # attention variants, after the large batches (BN x warps x double buffer x tensor cores, unsplit)
    timeout 80 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "paged_decode or split_decode" 2>&1 \
      | tail -3 | tee "$out/pytest_attn.log"
    timeout 130 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --shapes "" \
      --step-batches 1,4,16,64,128 --step-variants base,prefetch,dot,split2,split4,dot+split4 \
      --stem decode_attention_step 2>&1 | grep "^step\|Error"
    timeout 120 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" \
      --shapes 1x256,16x256,1x2048,16x1024 --block-n 32,64,128 --warps 4 --prefetch 0,1 --splits 1,2,4,8 \
      --dot 0,1 --step-batches "" --stem decode_attention_split 2>&1 | grep "Error"
    timeout 110 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" \
      --shapes 64x1024,256x1024 --block-n 32,64,128 --warps 4,8 --prefetch 0,1 --dot 0,1 \
      --step-batches "" --stem decode_attention_large 2>&1 | grep "Error"
    ;;
  attn-serve)   # the tensor-core decode attention and split-KV on by default (decode_attention_*_97fe563.md):
                 # the engine's GPU logits / graph / long-prefill tests, then drain30-tokens' serving run
    engine_gpu_tests 120
    drain30_tokens 400 385
    ;;
  attn-frag)   # the short form of attn-serve when device time is short: the engine's GPU tests with the new
               # attention defaults, then the graphed decode at batch 1 / 4 / 16 on the tiled and block-major
               # fragment layouts (issue 5's floor with both the attention and the layout changes)
    engine_gpu_tests 90
    timeout 100 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 --batches 1,4,16 \
      --k-widths "" --block-major 4 --stem frag_attn_decode 2>&1 | grep "^decode\|Error"
    ;;
  attn-frag-pdl)   # attn-frag with frag-pdl's decode: whether the new attention defaults, the block-major layout
                   # and PDL together bring the step at batch 1-16 nearer its floor (issue 5's 1.5x target)
    engine_gpu_tests 120
    timeout 220 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 --batches 1,4,8,16 \
      --k-widths "" --block-major 4 --pdl 1 --stem frag_attn_pdl_decode 2>&1 | grep "^decode\|Error"
    ;;
  tma)   # Hopper's TMA for the fragment layout's codes (frag_tma, EngineConfig.gemm_tma): its GPU tests, the
          # graphed 7B decode with and without it in the tuner's list, then the GEMM-level probe (probe_tma.py)
    timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "fragment_tma or fragb-tma" 2>&1 | tail -4 | tee "$out/tma.pytest.log"
    timeout 170 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 --batches 1,4,16 \
      --k-widths "" --block-major 4 --tma --stem tma_decode 2>&1 | grep "^decode\|Error"
    timeout 80 python3 benchmarks/probe_tma.py --out "$out" --commit "$commit" --ms 1,16,64 --shapes 1 2>&1 \
      | grep -i "error\|done in" | head
    ;;
  kv-fp8-min)   # the least of kv-fp8 worth a device start: the fp8 tests (log written as they run), a short step probe
    e=tests/gpu/test_engine_gpu.py::test_engine_logits_match_cpu_reference
    timeout 110 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py::test_decode_attention_on_an_fp8_cache \
      "$e[graphs-w4-kv-fp8]" "$e[eager-w4-kv-fp8-unfused-attn]" "$e[graphs-w4]" 2>&1 \
      | tee "$out/pytest_kv_fp8.log" | tail -4
    timeout 60 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --shapes "" \
      --step-batches 64,16 --step-context 1024 --step-variants base,kv8 --stem kv_fp8_step 2>&1 | grep "^step\|Error"
    ;;
  kv-fp8-shape)   # fp8 caches' launch shape: the engine's logits on a token-major V cache, one launch's GB/s (fp8 sweep,
                  # fp16 default shapes beside it), then the graphed step (batch 128 at context 256: at 1024 its
                  # fp16 + fp8 caches overflow 80 GB)
    e=tests/gpu/test_engine_gpu.py::test_engine_logits_match_cpu_reference
    # (its summary on stdout only: the four probe runs below bring back the 8 files a call returns)
    # (170 s: at c8e629e 90 s ran out on a cold machine, the summary line never printed; 18 s warm)
    timeout 170 python3 -m pytest -q -m gpu "$e[graphs-w4-kv-fp8-vtm]" "$e[eager-w4-kv-fp8-vtm-unfused-attn]" -rfE 2>&1 \
      | grep "passed\|failed\|FAILED\|ERROR\|Error"
    timeout 80 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --kv-dtype fp8 \
      --shapes 16x1024,64x1024,256x1024 --block-n 64,128 --warps 4,8 --prefetch 0 --dot 0,1 --step-batches "" \
      --stem kv_fp8_kernel 2>&1 | grep "^B=\|Error"
    timeout 40 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --kv-dtype fp16 \
      --shapes 16x1024,64x1024,256x1024 --block-n 64 --warps 4 --prefetch 0 --dot 0,1 --step-batches "" \
      --stem kv_fp16_kernel 2>&1 | grep "^B=\|Error"
    v=base,kv8,kv8+vtm,kv8+vtm+fp8nodot,kv8+fp8nodot,kv8+fp8nodot+fp8bn128,kv8+vtm+fp8bn128,kv8+fp8stages5,kv8+warps8
    timeout 110 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --shapes "" \
      --step-batches 64,16,4 --step-context 1024 --step-variants "$v" --stem kv_fp8_shape 2>&1 | grep "^step\|Error"
    timeout 60 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --shapes "" \
      --step-batches 128 --step-context 256 --step-variants "$v" --stem kv_fp8_shape_ctx256 2>&1 | grep "^step\|Error"
    ;;
  kv-fp8-all|kv-fp8-lean)   # kv-fp8's tests and kv-fp8-serve's run in one call: two traces (all) or one (lean)
    e=tests/gpu/test_engine_gpu.py::test_engine_logits_match_cpu_reference
    timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py::test_decode_attention_on_an_fp8_cache \
      "$e[eager-w4-kv-fp8]" "$e[graphs-w4-kv-fp8]" "$e[graphs-w4-kv-fp8-unfused-attn]" "$e[graphs-w4]" -rfE 2>&1 \
      | tee "$out/pytest_kv_fp8.log" | grep "passed\|failed\|FAILED\|ERROR"
    if [ "$stage" = kv-fp8-all ]; then
      drain30_tokens 430 415 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830 --trace-repeats 2
    else
      drain30_tokens 290 275 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830 --trace-repeats 1
    fi
    ;;
  kv-fp8)   # the fp8 KV cache: kernel and engine GPU tests (the engine's defaults too), the graphed step with
            # fp16 / fp8 caches; kv-fp8-serve then serves with the 4-bit base's cache in fp8 at its fp16 cache's
            # 1830 blocks (8d39b65), so only the price of a cached token read changes
    e=tests/gpu/test_engine_gpu.py::test_engine_logits_match_cpu_reference
    timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py::test_decode_attention_on_an_fp8_cache \
      "$e[eager-w4-kv-fp8]" "$e[graphs-w4-kv-fp8]" "$e[eager-w4-kv-fp8-unfused-attn]" "$e[graphs-w4-kv-fp8-unfused-attn]" \
      "$e[eager-w4]" "$e[graphs-w4]" tests/gpu/test_engine_gpu.py::test_graph_replay_gives_the_eager_tokens -rfE 2>&1 \
      | tee "$out/pytest_kv_fp8.log" | grep "passed\|failed\|FAILED\|ERROR"
    timeout 80 python3 benchmarks/probe_decode_attention.py --out "$out" --commit "$commit" --shapes "" \
      --step-batches 1,16,64 --step-context 1024 --step-variants base,kv8 --stem kv_fp8_step 2>&1 | grep "^step\|Error"
    ;;
  kv-fp8-default)   # the fp8 launch shape chosen from kv-fp8-shape (CUDA cores, BN 128, V token-major: engine
                    # defaults for fp8 caches since c8e629e's timings): the fp8 GPU tests at those defaults, then
                    # kv-fp8-serve's serving run (at c8e629e it ran the old shape: the exported DECODE_FP8_* did nothing)
    e=tests/gpu/test_engine_gpu.py::test_engine_logits_match_cpu_reference
    timeout 170 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py::test_decode_attention_on_an_fp8_cache \
      "$e[eager-w4-kv-fp8]" "$e[graphs-w4-kv-fp8]" "$e[graphs-w4-kv-fp8-unfused-attn]" "$e[graphs-w4]" -rfE 2>&1 \
      | tee "$out/pytest_kv_fp8.log" | grep "passed\|failed\|FAILED\|ERROR"
    if [ "${KV8_TRACES:-3}" = 2 ]; then   # KV8_TRACES=2 when device time is short (c8e629e's 3 traces: 349 s)
      drain30_tokens 330 315 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830 --trace-repeats 2
    else
      drain30_tokens 400 385 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830
    fi
    ;;
  kv-fp8-step3)   # kv-fp8-default's serving run with inlaid's latency target (inlaid_step_time_ratio 3: simulated on
                  # 92d7531's steps, all four targets vs fifo fp16 on 10 of 20 seeds against 0 of 20 off,
                  # sim_vs_fp16_tokens_kvfp8_default_step3_92d7531.md); fifo's runs are unchanged by it
    drain30_tokens 400 385 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830 --inlaid-step-time-ratio 3
    ;;
  kv-fp8-slo)   # kv-fp8-step3 with late requests ranked last (inlaid_slo_scale 5): simulated on 92d7531's steps,
                # all four targets vs fifo fp16 on 13 of 20 seeds against 10 with the latency target alone
                # (sim_inlaid_grid_slo_a6de4f5.md); fifo's runs are unchanged by either
    drain30_tokens 590 570 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830 --inlaid-step-time-ratio 3 --inlaid-slo-scale 5 \
      --sections calib,main,repeat,ablate,timeouts,fp16 --ablations no-slo --client-timeout-s 2
    ;;
  kv-fp8-serve)   # the serving run of kv-fp8 (a second call: both do not fit one)
    drain30_tokens 440 425 --kv-cache-dtype fp8_e4m3 --kv-max-blocks 1830
    ;;
  frag-e2e)   # the engine end to end at 16 running sequences, where w4_layout "auto" takes the fragment layout:
              # bench_e2e_gpu's mixed-adapter trace (prefill + graphed decode, 16 LoRA tasks), tiled then auto
    for layout in tiles auto; do
      timeout 110 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e_$layout" --commit "$commit" --skip-hf \
        --sections e2e --max-num-seqs 16 --num-requests 128 --w4-layout "$layout" 2>&1 | grep "^ours\|^engine\|Error"
    done
    ;;
  frag-engine-short)   # frag-engine for a short budget: decode at batch 1, 16, 4, then the layout's engine tests
    timeout 150 python3 benchmarks/probe_frag_engine.py --out "$out" --commit "$commit" --shapes 0 \
      --batches 1,16,4 --stem frag_engine_decode 2>&1 | grep "^decode"
    timeout 80 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py -k "w4-frag or fragment_layout" 2>&1 \
      | tail -8 | tee "$out/pytest_frag_engine.log"
    ;;
  prefetch-l2)   # not run yet (no device start at 4575bfc). gemv_h2 with block b + 2 also asked of L2 (num_stages 3,
              # out of the tuner's list until timed): the roofline probe (its st3 configs beside st1 / st2), the tuner's
              # picks and top six at M = 1 / 2 / 4 streamed (probe_gemm_stream), the GPU tests of every M = 1 candidate
    timeout 150 python3 benchmarks/probe_roofline.py --out "$out" --commit "$commit" --forms shift 2>&1 \
      | grep -v -i warn | tail -60
    timeout 240 python3 benchmarks/probe_gemm_stream.py --out "$out" --commit "$commit" --ms 1,2,4 2>&1 \
      | grep -v -i warn | tee "$out/gemm_stream.log"
    timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "every_candidate and False-1]" 2>&1 \
      | tail -15 | tee "$out/pytest_prefetch_l2.log"
    ;;
  gemm-stream)   # the decode pass's view of the GEMM table: back to back over cold weights
    timeout 280 python3 benchmarks/probe_gemm_stream.py --out "$out" --commit "$commit" --pdl 2>&1 \
      | grep -v -i warn | tee "$out/gemm_stream.log"
    ;;
  fused-short)   # fused in under 300 s: the SiLU·mul GLU tests and fused graphed decode, decode at batch 1 and 64
    timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "glu_input or fused-all" 2>&1 | tail -15 | tee "$out/pytest_fused.log"
    timeout 100 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,64 --lora-adapters 0 2>&1 | grep -v -i warn | grep -v "^|"
    ;;
  pdl1-fused)   # 8 files back: pytest log, gpu_kernels .json/.md, three e2e .md and two e2e .json
    timeout 200 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py \
      -k "decode_rope_attention or glu_input or graphed_decode or fused or (logits_match and w4 and not serial and not lora and not prefetch)" \
      2>&1 | tail -15 | tee "$out/pytest_pdl1_fused.log"
    timeout 120 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections decode \
      --decode-batches 1,16,64 --lora-adapters 0 2>&1 | grep -v -i warn | grep -v "^|"
    for run in "0 0" "1 0" "1 1"; do   # PDL mode, fused attention and SiLU·mul (no-LoRA steps; LoRA covers down)
      set -- $run
      timeout 75 python3 benchmarks/bench_e2e_gpu.py --out "$out/e2e_pdl$1_fused$2" --commit "$commit" --skip-hf \
        --sections lora --pdl "$1" --fused-attn "$2" --fused-act "$2" 2>&1 | grep -v -i warn | grep -v "^|"
    done
    rm -f "$out/e2e_pdl0_fused0/e2e_gpu.json"
    ;;
  pdl-gemm)
    timeout 200 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --sections gemm 2>&1 \
      | grep -v -i warn | tee "$out/gpu_kernels.log"
    ;;
  lora-engine)
    timeout 300 python3 benchmarks/bench_e2e_gpu.py --out "$out" --commit "$commit" --skip-hf --sections lora 2>&1 \
      | grep -v -i warn | tee "$out/e2e_gpu.log"
    ;;
  serve)
    timeout 560 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --budget-s 520 --scale-s 20 2>&1 \
      | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  w3)
    timeout 150 python3 benchmarks/bench_gemm_sweep.py --out "$out" --commit "$commit" --quick --bits 3 \
      --kinds gemv_row,gemv_h2 --ms 1,4 --stem gemm_sweep_w3_h2 --budget-s 120 --no-decode 2>&1 \
      | grep -v -i warn | grep -v '^|'
    timeout 200 python3 benchmarks/bench_gpu_kernels.py --out "$out" --commit "$commit" --bits 3 \
      --sections gemm,decode 2>&1 | grep -v -i warn | tee "$out/gpu_kernels_w3.log"
    ;;
  e2e)
    timeout 560 python3 benchmarks/bench_e2e_gpu.py --out "$out" --commit "$commit" --skip-hf \
      --sections decode,lora,e2e 2>&1 | grep -v -i warn | tee "$out/e2e_gpu.log"
    ;;
  overload)
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,ablate,fp16 \
      --rates 0.8,1.3,1.6 --replay-s 12 --drain-s 6 --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  budget)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,ablate,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --policies inlaid,fifo,mlfq --rates 0.8,1.3,1.6 --replay-s 10 --drain-s 5 \
      --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  budget-long)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,fp16,ablate \
      --ablations streak2,beta-inf \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo,mlfq \
      --rates 1.6,2.4 --replay-s 10 --drain-s 6 --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  budget-long-high)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo,mlfq \
      --rates 2.4,3.6 --replay-s 10 --drain-s 6 --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  budget-long-drain)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo,mlfq \
      --rates 2.4,3.2 --replay-s 10 --drain-s 16 --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  drain30)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo,mlfq \
      --rates 2.4,3.2 --replay-s 10 --drain-s 16 --starvation-s 30 --budget-s 540 2>&1 | grep -v -i warn \
      | tee "$out/serve_gpu.log"
    ;;
  drain30-fixed)   # drain30 at a fixed C (03533be's 15.9 req/s), so its rates match that run's whatever the burst measures
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo,mlfq \
      --rates 2.4,3.2 --replay-s 10 --drain-s 16 --starvation-s 30 --budget-s 540 --capacity-req-s 15.9 2>&1 \
      | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  drain30-repeat)   # the top rate of drain30-fixed on three traces: how much of the spread is the trace
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 400 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,main,repeat,fp16 \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --length-scale 4x4 --policies inlaid,fifo \
      --rates 3.2 --replay-s 10 --drain-s 16 --starvation-s 30 --budget-s 385 --capacity-req-s 15.9 \
      --trace-repeats 3 --repeat-policies inlaid,fifo --fp16-policies fifo 2>&1 \
      | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  drain30-tokens)   # drain30-repeat with the load in output tokens (--load-unit tokens): at one req/s the three
                    # traces' Zipf orders put 117 / 84 / 89 expected output tokens on a request (the capacity
                    # burst's mix 129), so trace 1 and 2 ran lighter; now each offers 3.2 x C's tokens per second
    drain30_tokens 450 430
    ;;
  stream-repeat)   # gemm-stream, then drain30-repeat, in one call (8 files back); at 285f137 it ran as
    # "glu-repeat 1fc4ef5" (gemm_stream_285f137.md, serve_gpu_24gib_long_drain30_repeat_285f137.md)
    timeout 165 python3 benchmarks/probe_gemm_stream.py --out "$out" --commit "$commit" --pdl 2>&1 \
      | grep -v -i warn | tee "$out/gemm_stream.log"
    bash "$0" drain30-repeat "$commit"
    ;;
  scale-prefetch)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,scale \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --scale-tasks 100,1000 --scale-frac 1.3 \
      --scale-policies inlaid,inlaid-prefetch --scale-s 12 --drain-s 6 --budget-s 540 2>&1 \
      | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  scale256)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 580 python3 benchmarks/bench_serve_gpu.py --out "$out" --commit "$commit" --sections calib,scale \
      --gpu-gib 24 --act-reserve-gib 5 --max-num-seqs 256 --scale-tasks 2,10,100,1000 --scale-frac 1.3 \
      --scale-s 12 --drain-s 6 --budget-s 540 2>&1 | grep -v -i warn | tee "$out/serve_gpu.log"
    ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
