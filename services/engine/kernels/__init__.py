"""GPU kernels (Triton) for the engine: W4A16 GEMM over GPTQ v1 weights, multi-LoRA, paged attention.

Modules: gptq_format (layout, reference dequant, repack), w4a16 (GEMM kernels, configs), gemm_tuner,
quant_linear (TritonQuantLinear, the drop-in for set_base_linear),
lora (shrink/expand over slot-sorted tokens), attention (paged decode, varlen prefill), fused_ops
(add+RMSNorm, SiLU·mul, RoPE + KV write), w4_decoder (benchmark decoder built from all of them).
Every module imports on machines without triton; kernels then raise and torch references remain.
"""
