"""Llama-family decoder over a flat token batch: RMSNorm, RoPE, GQA, SwiGLU, swappable linears."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.common.adapters import ATTN_MODULES, MLP_MODULES, BaseDims
from services.engine.attention import AttentionMetadata, paged_attention, paged_attention_cuda
from services.engine.kernels.quant_linear import FusedParts

LINEAR_NAMES = ATTN_MODULES + MLP_MODULES
# Linears that share an input and run as one GEMM on the GPU fast path.
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers the forward needs (from a HF config.json or RANDOM_SHAPES)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: tuple = ()                # sorted (key, value) pairs of a llama3 rope config
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: dict) -> LlamaShape:
        if cfg.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}; need a Llama model")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("Llama variants with linear biases are not supported")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (default and llama3 are)")
        scaling = tuple(sorted((k, v) for k, v in rope.items() if k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        )) if rope_type == "llama3" else ()
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = int(cfg["num_attention_heads"])
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]),
                   num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                   num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   rope_scaling=scaling, eos_token_ids=eos_ids)

    @classmethod
    def from_dir(cls, path: Path) -> LlamaShape:
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))

    def dims(self) -> BaseDims:
        return BaseDims(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                        num_layers=self.num_layers, num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)


class BaseLinear(nn.Module):
    """y = x Wᵀ. A quantized replacement only needs the same `forward(x)` contract."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedDenseLinear(FusedParts):
    """Dense linears sharing one input (q|k|v, gate|up) as one GEMM over concatenated rows: the
    fp16 base's counterpart of FusedQuantLinear, with the same `bounds` / `part` contract."""

    def __init__(self, parts: dict[str, BaseLinear]) -> None:
        super().__init__(parts)
        self.weight = nn.Parameter(torch.cat([p.weight for p in parts.values()]), requires_grad=False)
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def part(self, name: str) -> BaseLinear:
        """A standalone copy of one part."""
        start, end = self.bounds(name)
        return BaseLinear(self.weight[start:end].clone())

    def load_part_(self, name: str, kw) -> None:
        raise ValueError(f"{name}: a dense fused layer takes no 3/4-bit weights in place")


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(shape: LlamaShape) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3's long-context rescaling when configured."""
    d = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if not shape.rope_scaling:
        return inv
    sc = dict(shape.rope_scaling)
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D] already in x's dtype."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def _norm_onto(stream: torch.Tensor, pending: torch.Tensor | None, weight: torch.Tensor,
               eps: float, zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(stream + pending) * weight, stream + pending) with Triton; pending None: already
    added. The same launch zeroes `zero` (the next GEMM's split-K output) when given."""
    from services.engine.kernels.fused_ops import add_rmsnorm, rmsnorm
    if pending is None:
        return rmsnorm(stream, weight, eps, zero), stream
    return add_rmsnorm(pending, weight, eps, stream, zero)


class LlamaLayer(nn.Module):
    """One decoder layer; q/k/v/o/gate/up/down are separate swappable BaseLinear-like modules."""

    def __init__(self, shape: LlamaShape, idx: int, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.idx = idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shape.num_heads, shape.num_kv_heads, shape.head_dim)
        self.input_layernorm = RMSNorm(w["input_layernorm"], shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w["post_attention_layernorm"], shape.rms_norm_eps)
        self.eps = shape.rms_norm_eps
        for name in LINEAR_NAMES:
            setattr(self, name, w[name] if isinstance(w[name], nn.Module) else BaseLinear(w[name]))
        self.fused: dict[str, nn.Module] = {}   # GPU fast path: group name → Fused{Quant,Dense}Linear
        self.fused_decode_attention = False      # GPU fast path: RoPE + cache write inside decode attention
        self.fused_mlp_activation = False        # GPU fast path: SiLU·mul inside down_proj's GEMM

    def _linear(self, name: str, x: torch.Tensor, lora) -> torch.Tensor:
        y = getattr(self, name)(x)
        return y if lora is None else lora.apply(self.idx, name, x, y)

    def _linear_onto(self, stream: torch.Tensor, name: str, x: torch.Tensor, lora) -> torch.Tensor | None:
        """Adds linear(x) (+ its LoRA delta) onto the residual stream in place and returns None when
        the linear is a Triton quantized one (its GEMM's partials land on the stream: no zeroed
        output, no add kernel); otherwise returns the output for the next norm to add."""
        from services.engine.kernels.quant_linear import TritonQuantLinear
        if not isinstance(getattr(self, name), TritonQuantLinear):
            return self._linear(name, x, lora)
        getattr(self, name)(x, accumulate=stream)
        if lora is not None:
            lora.apply(self.idx, name, x, stream)
        return None

    # ---- swappable linears (fused groups included) -------------------------------------
    def _group_of(self, name: str) -> str | None:
        return next((g for g, names in FUSED_GROUPS.items() if name in names and g in self.fused), None)

    def linear(self, name: str) -> nn.Module:
        """The module computing `name` (a fused part comes back as a standalone copy)."""
        group = self._group_of(name)
        return self.fused[group].part(name) if group else getattr(self, name)

    def set_linear(self, name: str, module: nn.Module) -> bool:
        """Replace one linear; True when it was overwritten in place (captured graphs stay valid)."""
        from services.engine.kernels.gptq_format import frag_block_major
        from services.engine.kernels.quant_linear import TritonQuantLinear, kernel_weights_of
        kw = kernel_weights_of(module) if self.fused or _is_quant(getattr(self, name)) else None
        group = self._group_of(name)
        if group and kw is not None:
            try:
                self.fused[group].load_part_(name, kw)
                return True
            except ValueError:
                pass
        if group:  # cannot write into the fused layer: split the group back into its parts
            fused = self.fused.pop(group)
            for part in FUSED_GROUPS[group]:
                setattr(self, part, fused.part(part))
        current = getattr(self, name)
        if kw is not None and isinstance(current, TritonQuantLinear) and current.bias is None:
            try:
                current.load_weights_(kw)
                return True
            except ValueError:  # another layout (e.g. act-order): a new kernel module below
                pass
        if kw is not None and isinstance(current, TritonQuantLinear) and not isinstance(module, TritonQuantLinear):
            module = TritonQuantLinear(kw, None, current.tuner)  # keep the Triton kernel path and layout
            module.set_layout(current.kw.frag, frag_block_major(current.kw))
        setattr(self, name, module)
        return False

    def fuse(self, tuner) -> None:
        """Fuse q|k|v and gate|up where all parts are 3/4-bit Triton linears of one layout and width,
        or all are dense linears of one dtype (the fp16 base)."""
        from services.engine.kernels.quant_linear import FusedQuantLinear
        for group, names in FUSED_GROUPS.items():
            parts = {n: getattr(self, n) for n in names}
            if group in self.fused:
                continue
            if all(type(p) is BaseLinear for p in parts.values()):
                if len({(p.in_features, p.weight.dtype) for p in parts.values()}) == 1:
                    self.fused[group] = FusedDenseLinear(parts)
                    for n in names:
                        setattr(self, n, None)
                continue
            if not all(_is_quant(p) and p.kw.perm is None for p in parts.values()):
                continue
            if len({(p.in_features, p.kw.group_size, p.kw.bits) for p in parts.values()}) != 1:
                continue
            self.fused[group] = FusedQuantLinear(parts, tuner)
            for n in names:   # the fused copy is the only one kept
                setattr(self, n, None)

    def _group(self, group: str, x: torch.Tensor, lora, zeroed: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of a fused group's linears side by side [T, ΣN], LoRA added per part; zeroed:
        the output from _output_to_zero, already zeroed, that the GEMM accumulates into."""
        fused = self.fused.get(group)
        if fused is None:
            return torch.cat([self._linear(n, x, lora) for n in FUSED_GROUPS[group]], dim=-1)
        y = fused(x) if zeroed is None else fused(x, accumulate=zeroed)
        if lora is not None and not lora.apply_group(self.idx, group, x, y):
            for n in FUSED_GROUPS[group]:
                start, end = fused.bounds(n)
                lora.apply(self.idx, n, x, y[:, start:end])
        return y

    def _output_to_zero(self, group: str, like: torch.Tensor) -> torch.Tensor | None:
        """The fused quantized group's split-K output for the norm before it to zero (or None)."""
        from services.engine.kernels.quant_linear import FusedQuantLinear
        fused = self.fused.get(group)
        return fused.inner.output_to_zero(like) if isinstance(fused, FusedQuantLinear) else None

    def forward_fast(self, stream: torch.Tensor, pending: torch.Tensor | None, positions: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor],
                     meta: AttentionMetadata, lora) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GPU fast path (fp16, Triton): RMSNorm, one GEMM for q|k|v and for gate|up, RoPE fused
        with the KV-cache write, paged decode attention. The residual stream [T, hidden] is updated
        in place by quantized o_proj / down_proj (_linear_onto); a dense one's output stays
        `pending` and the next norm adds it (fused add + RMSNorm). Each norm also zeroes the
        split-K output of the quantized GEMM after it, so no GEMM launches a zeroing of its own.
        The stream must be a tensor this forward may overwrite (the embedding gather's output,
        then its own). Returns (stream, pending)."""
        from services.engine.kernels.attention import paged_decode_rope_attention
        from services.engine.kernels.fused_ops import rope_and_cache, silu_mul
        from services.engine.kernels.quant_linear import TritonQuantLinear
        t = stream.shape[0]
        zeroed = self._output_to_zero("qkv_proj", stream)
        x, stream = _norm_onto(stream, pending, self.input_layernorm.weight, self.eps, zeroed)
        qkv = self._group("qkv_proj", x, lora, zeroed)                # [T, (H + 2 Hkv) D]
        if self.fused_decode_attention and meta.is_all_decode:      # one launch instead of two
            attn = paged_decode_rope_attention(qkv, positions, rope[0], rope[1], kv_cache[0], kv_cache[1],
                                               meta.slot_mapping, meta.decode_blocks, meta.decode_lens,
                                               self.num_heads)
        else:
            q = rope_and_cache(qkv, positions, rope[0], rope[1], kv_cache[0], kv_cache[1],
                               meta.slot_mapping, self.num_heads, self.num_kv_heads)  # [T, H, D]
            attn = paged_attention_cuda(q, kv_cache[0], kv_cache[1], meta)
        pending = self._linear_onto(stream, "o_proj", attn.reshape(t, -1), lora)
        zeroed = self._output_to_zero("gate_up_proj", stream)
        x, stream = _norm_onto(stream, pending, self.post_attention_layernorm.weight, self.eps, zeroed)
        gate_up = self._group("gate_up_proj", x, lora, zeroed)       # [T, 2I]
        down = self.down_proj
        if (self.fused_mlp_activation and isinstance(down, TritonQuantLinear)
                and not (lora is not None and lora.covers(self.idx, "down_proj"))):
            down(gate_up, accumulate=stream, glu=True)   # silu(gate) · up in the GEMM's input load
            return stream, None
        return stream, self._linear_onto(stream, "down_proj", silu_mul(gate_up), lora)   # act [T, I]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora) -> torch.Tensor:
        t = x.shape[0]
        h = self.input_layernorm(x)
        q = self._linear("q_proj", h, lora).view(t, self.num_heads, self.head_dim)
        k = self._linear("k_proj", h, lora).view(t, self.num_kv_heads, self.head_dim)
        v = self._linear("v_proj", h, lora).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta)  # [T, H, D]
        x = x + self._linear("o_proj", attn.reshape(t, -1), lora)
        h = self.post_attention_layernorm(x)
        act = F.silu(self._linear("gate_proj", h, lora)) * self._linear("up_proj", h, lora)
        return x + self._linear("down_proj", act, lora)


class LlamaModel(nn.Module):
    """Embedding → layers → final norm; `logits()` applies the (possibly tied) LM head."""

    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        layers = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            w = {"input_layernorm": weights[p + "input_layernorm.weight"],
                 "post_attention_layernorm": weights[p + "post_attention_layernorm.weight"]}
            for name in LINEAR_NAMES:
                sub = "self_attn." if name in ATTN_MODULES else "mlp."
                w[name] = weights[p + sub + name + ".weight"]
            layers.append(LlamaLayer(shape, i, w))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(weights["model.norm.weight"], shape.rms_norm_eps)
        head = weights.get("lm_head.weight")
        if head is None:
            if not shape.tie_word_embeddings:
                raise ValueError("checkpoint has no lm_head.weight and embeddings are not tied")
            head = self.embed_tokens  # tied: one tensor, no copy
        self.lm_head = head if isinstance(head, nn.Parameter) else nn.Parameter(head, requires_grad=False)
        inv_freq = rope_inv_freq(shape).to(self.embed_tokens.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # set = fast path on

    def enable_fast_path(self, max_positions: int, tuner, fused_decode_attention: bool = False,
                         fused_mlp_activation: bool = False, w4_frag: int = 0, w4_block_major: bool = False) -> None:
        """Switch to the fused Triton forward (CUDA, fp16; 3/4-bit or dense linears fused where possible).
        fused_decode_attention: pure-decode steps rotate and cache K/V inside the attention kernel;
        fused_mlp_activation: a 3/4-bit down_proj computes SiLU·mul in its GEMM's input load (not
        where an adapter targets it: its LoRA needs the activation); w4_frag: 4-bit codes in
        fragment order with that k_width (KernelWeights.frag; 0 keeps the tiled layout), stored block-major
        with w4_block_major (gptq_format.frag_block_major; fused layers keep their first part's storage)."""
        for layer in self.layers:
            if w4_frag:
                for name in LINEAR_NAMES:
                    if _is_quant(getattr(layer, name, None)):
                        getattr(layer, name).set_layout(w4_frag, w4_block_major)
            layer.fuse(tuner)
            layer.fused_decode_attention = fused_decode_attention
            layer.fused_mlp_activation = fused_mlp_activation
        ang = torch.arange(max_positions, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        self.rope_tables = (ang.cos().contiguous(), ang.sin().contiguous())  # fp32 [P, D/2]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                lora=None) -> torch.Tensor:
        """input_ids, positions [T] → hidden states [T, hidden] (before the final norm)."""
        if self.rope_tables is not None:
            stream, pending = F.embedding(input_ids, self.embed_tokens), None
            for layer, cache in zip(self.layers, kv_caches, strict=True):
                stream, pending = layer.forward_fast(stream, pending, positions, self.rope_tables, cache, meta, lora)
            return stream if pending is None else stream + pending
        x = F.embedding(input_ids, self.embed_tokens)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]     # [T, D/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, meta, lora)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] → fp32 logits [N, vocab]."""
        return F.linear(self.norm(hidden), self.lm_head).float()


def load_hf_weights(path: Path, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All *.safetensors of a HF directory, cast to dtype on device (never pickle)."""
    from safetensors.torch import load_file
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickle checkpoints are refused)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f), device=device).items():
            out[k] = v.to(dtype)
    return out


def random_weights(shape: LlamaShape, device: str, dtype: torch.dtype,
                   seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights made on the device in dtype (fast for 7B+); small std keeps activations finite."""
    return dict(random_weight_items(shape, device, dtype, seed, std))


def random_weight_items(shape: LlamaShape, device: str, dtype: torch.dtype, seed: int = 0,
                        std: float = 0.02):
    """(name, tensor) of random_weights one at a time, so a caller can quantize each linear
    as it is made and never hold the whole fp16 model."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        return torch.empty(size, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    h = shape.hidden_size
    dims = shape.dims()
    yield "model.embed_tokens.weight", normal(shape.vocab_size, h)
    yield "model.norm.weight", torch.ones(h, device=device, dtype=dtype)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", normal(shape.vocab_size, h)
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        yield p + "post_attention_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        for name in LINEAR_NAMES:
            in_f, out_f = dims.features(name)
            sub = "self_attn." if name in ATTN_MODULES else "mlp."
            yield p + sub + name + ".weight", normal(out_f, in_f)


def _is_quant(module) -> bool:
    from services.engine.kernels.quant_linear import TritonQuantLinear
    return isinstance(module, TritonQuantLinear) and module.bias is None
