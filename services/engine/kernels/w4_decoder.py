"""A minimal Llama decoder built only from this package's kernels, for GPU decode benchmarks.

Random weights in real Llama shapes (4-bit GPTQ g128 linears, fp16 embeddings/lm_head), paged
KV caches, optional multi-LoRA on every projection, and CUDA-graph capture of a decode step at a
fixed batch size. It is a benchmark vehicle for the kernels, not the serving runner
(services/engine/model_runner.py), which swaps TritonQuantLinear in through set_base_linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.kernels.attention import paged_decode_attention, paged_decode_rope_attention
from services.engine.kernels.fused_ops import add_rmsnorm, rmsnorm, rope_and_cache, rope_tables, silu_mul
from services.engine.kernels.gptq_format import rtn_kernel_weights
from services.engine.kernels.lora import LoraBatch, lora_shrink, prepare_lora_batch, triton_lora_apply
from services.engine.kernels.gemm_configs import TMA_KINDS
from services.engine.kernels.gemm_tuner import GemmTuner
from services.engine.kernels.quant_linear import TritonQuantLinear


@dataclass(frozen=True)
class DecoderShape:
    """Llama dimensions (defaults: Llama-2-7B)."""

    hidden: int = 4096
    intermediate: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    vocab: int = 32000
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def quantized_weight_bytes(self, group_size: int = 128, bits: int = 4) -> int:
        """Bytes of all quantized linears as the kernel stores them (codes + fp16 scales and zeros)."""
        h, i = self.hidden, self.intermediate
        qkv_n = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = [(h, qkv_n), (self.num_heads * self.head_dim, h), (h, 2 * i), (i, h)]
        total = sum(k * n * bits // 8 + 2 * 2 * (k // group_size) * n for k, n in per_layer)
        return total * self.num_layers


@dataclass
class LayerLora:
    """Stacked adapter slots of one layer's four projections: name → (a_stack, b_stack, n_slice)."""

    stacks: dict[str, tuple[torch.Tensor, torch.Tensor, int]]


class W4Decoder:
    """Random-weight quantized Llama with paged KV caches; decode(...) runs one step for a batch."""

    def __init__(self, shape: DecoderShape, num_blocks: int, block_size: int, device: torch.device,
                 max_positions: int = 4096, seed: int = 0, bits: int = 4) -> None:
        self.shape = shape
        self.bits = bits
        self.block_size = block_size
        self.device = device
        self.tuner = GemmTuner(skip_kinds=TMA_KINDS)     # the engine's default (EngineConfig.gemm_tma off)
        gen = torch.Generator(device=device).manual_seed(seed)
        s = shape
        qkv_n = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

        def qlinear(k: int, n: int) -> TritonQuantLinear:
            w = torch.randn(k, n, device=device, generator=gen) * (k ** -0.5)
            return TritonQuantLinear(rtn_kernel_weights(w.t(), 128, bits), None, self.tuner)

        self.layers = []
        for _ in range(s.num_layers):
            self.layers.append({
                "qkv": qlinear(s.hidden, qkv_n),
                "o": qlinear(s.num_heads * s.head_dim, s.hidden),
                "gate_up": qlinear(s.hidden, 2 * s.intermediate),
                "down": qlinear(s.intermediate, s.hidden),
                "in_norm": torch.ones(s.hidden, dtype=torch.float16, device=device),
                "post_norm": torch.ones(s.hidden, dtype=torch.float16, device=device),
            })
        self.embed = (torch.randn(s.vocab, s.hidden, device=device, generator=gen) * 0.02).half()
        self.lm_head = (torch.randn(s.vocab, s.hidden, device=device, generator=gen) * s.hidden ** -0.5).half()
        self.final_norm = torch.ones(s.hidden, dtype=torch.float16, device=device)
        cache_shape = (num_blocks, block_size, s.num_kv_heads, s.head_dim)
        self.k_caches = [torch.randn(cache_shape, device=device, generator=gen).half() for _ in range(s.num_layers)]
        self.v_caches = [torch.randn(cache_shape, device=device, generator=gen).half() for _ in range(s.num_layers)]
        self.cos, self.sin = rope_tables(max_positions, s.head_dim, s.rope_theta, device)
        self.lora: list[LayerLora] | None = None
        # The serving runner's layout: o and down add onto the residual stream in place and each
        # norm zeroes the next split-K GEMM's output (no zeroing launches). False: the layout
        # before, zeroed GEMM outputs and a fused add + RMSNorm after o and down (for comparison).
        self.inplace_outputs = True
        # LoRA expand: "rows" (16 tokens per program, B gathered per token: the default),
        # "segments" (tensor-core chunks of one adapter), or "skip" (shrink only: wrong logits, for
        # benchmarks that split the LoRA cost between its two launches)
        self.lora_expand = "rows"
        # RoPE + KV-cache write inside the decode attention kernel (one launch per layer instead of
        # two; the serving runner's EngineConfig.fused_decode_attention)
        self.fused_decode_attention = False
        # SiLU·mul inside the down GEMM's input load (EngineConfig.fused_mlp_activation), without LoRA
        self.fused_mlp_activation = False

    def use_gemm_tma(self, on: bool) -> None:
        """Whether the GEMM tuner may pick the TMA kinds (EngineConfig.gemm_tma); a change drops its picks for
        fragment-ordered weights (the only layout with TMA kinds: keys longer than the tiled layout's), so the
        next call tunes those again (outside a CUDA-graph capture)."""
        skip = () if on else TMA_KINDS
        if self.tuner.skip_kinds != skip:
            self.tuner.skip_kinds = skip
            self.tuner.best = {key: cfg for key, cfg in self.tuner.best.items() if len(key) <= 4}

    def set_layout(self, frag: int, block_major: bool = False) -> None:
        """Every 4-bit linear's codes in the layout KernelWeights.frag = frag (0: tiled; 2 / 4: fragment
        order, kernels/w4a16_frag.py; block_major: stored block-major), converted in place (a captured
        graph must be captured again)."""
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                layer[name].set_layout(frag, block_major)

    def set_random_adapters(self, num_slots: int, rank: int, seed: int = 1) -> None:
        """num_slots random adapters of this rank on every projection (None to drop with num_slots=0)."""
        if num_slots == 0:
            self.lora = None
            return
        s = self.shape
        gen = torch.Generator(device=self.device).manual_seed(seed)
        qkv_n = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

        def stacks(k: int, n: int, n_slice: int):
            slices = n // n_slice
            a = (torch.randn(num_slots, slices * rank, k, device=self.device, generator=gen) * k ** -0.5).half()
            b = (torch.randn(num_slots, n, rank, device=self.device, generator=gen) * 0.01).half()
            return a, b, n_slice

        qkv_slice = s.num_heads * s.head_dim if s.num_kv_heads == s.num_heads else qkv_n
        self.lora = [LayerLora({
            "qkv": stacks(s.hidden, qkv_n, qkv_slice),
            "o": stacks(s.num_heads * s.head_dim, s.hidden, s.hidden),
            "gate_up": stacks(s.hidden, 2 * s.intermediate, s.intermediate),
            "down": stacks(s.intermediate, s.hidden, s.hidden),
        }) for _ in range(s.num_layers)]

    def _proj(self, li: int, name: str, x: torch.Tensor, lora_batch: LoraBatch | None,
              onto: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layers[li][name](x, accumulate=onto)
        if lora_batch is not None and self.lora is not None:
            a, b, n_slice = self.lora[li].stacks[name]
            if self.lora_expand == "skip":
                lora_shrink(x, a, lora_batch)
            else:
                triton_lora_apply(y, x, a, b, lora_batch, n_slice, rows=self.lora_expand == "rows")
        return y

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, slot_mapping: torch.Tensor,
               slot_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for B sequences → logits [B, vocab] fp16 (the caller samples).

        positions [B] (= context_lens - 1), slot_mapping [B]: where the new token's K/V goes,
        slot_ids [B] adapter slot per sequence (-1 none) or None for no LoRA.
        """
        s = self.shape
        lora_batch = prepare_lora_batch(slot_ids) if slot_ids is not None and self.lora is not None else None
        h = self.embed[token_ids]   # a gathered copy: with inplace_outputs, the stream updated in place
        residual = None
        onto = h if self.inplace_outputs else None
        for li, layer in enumerate(self.layers):
            zeroed = self._to_zero(layer["qkv"], h)
            x, residual = self._norm(h, residual, layer["in_norm"], zeroed)
            qkv = self._proj(li, "qkv", x, lora_batch, zeroed)
            if self.fused_decode_attention:
                attn = paged_decode_rope_attention(qkv, positions, self.cos, self.sin, self.k_caches[li],
                                                   self.v_caches[li], slot_mapping, block_tables, context_lens,
                                                   s.num_heads)
            else:
                q = rope_and_cache(qkv, positions, self.cos, self.sin, self.k_caches[li], self.v_caches[li],
                                   slot_mapping, s.num_heads, s.num_kv_heads)
                attn = paged_decode_attention(q, self.k_caches[li], self.v_caches[li], block_tables, context_lens)
            o = self._proj(li, "o", attn.reshape(-1, s.num_heads * s.head_dim), lora_batch, onto)
            zeroed = self._to_zero(layer["gate_up"], o)
            x, residual = self._norm(o, residual, layer["post_norm"], zeroed)
            gate_up = self._proj(li, "gate_up", x, lora_batch, zeroed)
            if self.fused_mlp_activation and lora_batch is None:    # (its LoRA covers down: needs act)
                h = layer["down"](gate_up, accumulate=onto, glu=True)
            else:
                h = self._proj(li, "down", silu_mul(gate_up), lora_batch, onto)
        x, _ = self._norm(h, residual, self.final_norm)
        return x @ self.lm_head.t()

    def _to_zero(self, linear: TritonQuantLinear, like: torch.Tensor) -> torch.Tensor | None:
        return linear.output_to_zero(like) if self.inplace_outputs else None

    def _norm(self, y: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the next block's normed input, residual). With inplace_outputs y is the stream itself
        and the launch also zeroes `zero`; otherwise y is the last block's output and the residual
        is added first."""
        if self.inplace_outputs:
            return rmsnorm(y, weight, self.shape.eps, zero), None
        return add_rmsnorm(y, weight, self.shape.eps, residual)


class GraphedDecode:
    """A W4Decoder decode step captured in a CUDA graph for one batch size (static inputs)."""

    def __init__(self, model: W4Decoder, inputs: dict[str, torch.Tensor | None]) -> None:
        self.inputs = inputs
        model.decode(**inputs)  # warm-up: compiles kernels and tunes every GEMM shape first
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model.decode(**inputs)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
