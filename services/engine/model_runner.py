"""ModelRunner: owns the weights, KV cache, adapter slots and sampler; runs one step on a batch."""
from __future__ import annotations

import torch
from torch import nn

from services.common.adapters import LoraAdapter
from services.common.model_source import RANDOM_SHAPES, ModelSource, cache_dir, resolve_model
from services.engine.attention import AttentionMetadata
from services.engine.kernels.attention import VarlenBatch, set_decode_options
from services.engine.config import EngineConfig
from services.engine.llama import (FUSED_GROUPS, LINEAR_NAMES, LlamaModel, LlamaShape, load_hf_weights,
                                   random_weight_items)
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.kernels.gemm_tuner import GemmTuner
from services.engine.kernels.gptq_format import rtn_kernel_weights
from services.engine.kernels.quant_linear import TritonQuantLinear
from services.engine.kernels import launch as kernel_launch
from services.engine.kernels.pdl import set_pdl
from services.engine.kernels.gemm_configs import STREAM_KINDS, TMA_KINDS
from services.engine.kernels.w4a16 import HAS_TRITON, set_serial_split_k
from services.engine.kernels.w4a16_frag import frag_k_width
from services.engine.lora import LoraManager
from services.engine.sampler import Sampler
from services.engine.sequence import Sequence

_CPU_DEFAULT_KV_BYTES = 256 << 20
_CUDA_KV_FRACTION = 0.85   # of free memory after weights: room for adapter slots, activations


class ModelRunner:
    """Computes tokens [num_cached_tokens:] of each sequence and samples one next token each.

    Sequences of a step may mix prefill, recompute and decode; the runner groups
    them by adapter slot (contiguous token runs for the LoRA matmuls) and returns
    results in the caller's order. Device-agnostic torch; every tensor lives here.
    On CUDA in fp16 the GPU fast path is on: q|k|v and gate|up fused (3/4-bit Triton linears, or
    cuBLAS on an fp16 base), Triton attention/LoRA, and pure-decode steps replayed from CUDA
    graphs (see docs/architecture.md, "GPU fast path").
    """

    def __init__(self, config: EngineConfig, shape: LlamaShape,
                 weights: dict[str, torch.Tensor | nn.Module], device: str,
                 dtype: torch.dtype, consume: bool = False) -> None:
        """consume: empty `weights` once the model holds its tensors, so the caller's dict does not
        keep the unfused originals alive while q|k|v and gate|up are concatenated (on a 24 GiB card
        an fp16 7B base would otherwise need its fused linears twice during the load)."""
        self.config, self.shape = config, shape
        self.device, self.dtype = torch.device(device), dtype
        self.kv_dtype = config.kv_torch_dtype(dtype)
        # GPU fast path: fused linears (3/4-bit Triton or fp16 cuBLAS), fused ops, Triton attention/LoRA,
        # CUDA graphs.
        self.is_fast = (config.quant_bits in (0, 3, 4) and self.device.type == "cuda"
                        and dtype == torch.float16 and HAS_TRITON)
        if self.is_fast:   # process-wide kernel switches (as torch's thread count in load()), set only by
            # a runner that launches the kernels: a CPU runner beside it (a reference) leaves them alone
            kernel_launch.set_enabled(config.triton_fast_launch)
            set_serial_split_k(config.serial_split_k)
            set_pdl(config.pdl)
            set_decode_options(config.decode_attention_dot, config.decode_split_programs_per_sm)
        # one per model (same shapes); its choices persist across restarts unless turned off
        tune_cache = cache_dir() / "gemm_tuner.json" if config.gemm_tune_cache else None
        skip = (() if config.gemm_stream_k else STREAM_KINDS) + (() if config.gemm_tma else TMA_KINDS)
        self.tuner = GemmTuner(cache_path=tune_cache, skip_kinds=skip) if config.quant_bits else None
        given = weights
        if config.quant_bits:
            weights = dict(weights)
            for key in [k for k, v in weights.items() if _is_linear_key(k) and torch.is_tensor(v)]:
                weights[key] = quantize_linear(weights.pop(key), config.quant_group_size, self.tuner,
                                               config.quant_bits)
            for module in weights.values():
                if isinstance(module, TritonQuantLinear):
                    module.tuner = self.tuner
        self.model = LlamaModel(shape, weights)
        if consume:
            given.clear()
        del weights, given
        self.model_epoch = 0        # bumped when a weight swap replaces a module (graphs recapture)
        self.block_size = config.block_size
        self.lora = LoraManager(shape.dims(), config.max_adapters, config.max_lora_rank,
                                self.device, dtype, use_triton=self.is_fast,
                                expand_rows=config.lora_expand_rows,
                                groups=FUSED_GROUPS if self.is_fast else None)
        self.sampler = Sampler(self.device)
        self.num_kv_blocks = self._num_kv_blocks()
        # The fast path keeps one extra scratch block that CUDA-graph padding rows write into.
        num_alloc = self.num_kv_blocks + (1 if self.is_fast else 0)
        cache_shape = (num_alloc, self.block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_v_layout = config.resolved_kv_v_layout(self.is_fast)
        config.check_kv_v_layout(self.is_fast, f"the torch path on {self.device}")

        def v_cache() -> torch.Tensor:
            """V in K's shape; token-major within blocks where configured (a permuted view)."""
            if self.kv_v_layout != "token_major":
                return torch.zeros(cache_shape, device=self.device, dtype=self.kv_dtype)
            return torch.zeros(num_alloc, shape.num_kv_heads, shape.head_dim, self.block_size, device=self.device,
                               dtype=self.kv_dtype).permute(0, 3, 1, 2)

        self.kv_caches = [(torch.zeros(cache_shape, device=self.device, dtype=self.kv_dtype), v_cache())
                          for _ in range(shape.num_layers)]  # per layer: K, V
        self.graphs: DecodeGraphs | None = None
        # 4-bit codes in fragment order with this k_width (0: tiled; KernelWeights.frag), stored block-major?
        self.w4_frag = w4_frag(config.w4_layout, config.max_num_seqs) if self.is_fast and config.quant_bits == 4 else 0
        self.w4_block_major = bool(self.w4_frag) and w4_block_major(config.w4_layout, config.max_num_seqs)
        if self.is_fast:
            max_len = config.max_model_len or shape.max_position_embeddings
            self.model.enable_fast_path(max_len, self.tuner, config.fused_decode_attention,
                                        config.fused_mlp_activation, self.w4_frag, self.w4_block_major)
            if config.cuda_graphs:
                self.graphs = DecodeGraphs(self, config.max_num_seqs,
                                           -(-max_len // self.block_size), self.num_kv_blocks)
        if self.device.type == "cuda":
            # Load temporaries (quantization, the unfused originals) stay cached in the allocator
            # otherwise; a per-process memory cap counts them, and another process could use them.
            torch.cuda.empty_cache()

    @classmethod
    def load(cls, config: EngineConfig, source: ModelSource | None = None) -> ModelRunner:
        """Resolve config.model, load (or randomly initialise) weights on the target device."""
        source = source or resolve_model(config.model)
        if config.num_threads:
            # Oversubscribed CPUs (several processes on few cores) make OpenMP spin-waits
            # 10-100x slower; a service on a shared CPU should pin this to its core share.
            torch.set_num_threads(config.num_threads)
        device = config.resolved_device()
        dtype = getattr(torch, config.resolved_dtype())
        if config.quant_bits and device.startswith("cuda"):
            # The W4A16/W3A16 kernels take fp16 activations.
            if config.dtype not in ("auto", "float16"):
                raise ValueError(f"quant_bits={config.quant_bits} on CUDA runs in float16, not {config.dtype}")
            dtype = torch.float16
        if source.kind == "random":
            shape = LlamaShape.from_hf_config(dict(RANDOM_SHAPES[source.random_shape],
                                                   model_type="llama"))
            weights = {}
            for key, tensor in random_weight_items(shape, device, dtype):
                if config.quant_bits and _is_linear_key(key):
                    # quantized as made: a 7B fp16 copy never sits whole in memory
                    tensor = quantize_linear(tensor, config.quant_group_size, None, config.quant_bits)
                weights[key] = tensor
        else:
            shape = LlamaShape.from_dir(source.path)
            weights = load_hf_weights(source.path, device, dtype)
        return cls(config, shape, weights, device, dtype, consume=True)

    # ---- sizing ----------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        s = self.shape
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        kv_bytes = self.config.kv_cache_bytes
        if not kv_bytes:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()   # load-time temporaries (quantization) count as free
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_bytes = int(free * _CUDA_KV_FRACTION)
            else:
                kv_bytes = _CPU_DEFAULT_KV_BYTES
        num = kv_bytes // self.kv_bytes_per_block
        if num <= 0:
            raise ValueError(f"KV cache of {kv_bytes} bytes holds no block "
                             f"({self.kv_bytes_per_block} bytes each)")
        return num

    # ---- swappable pieces ------------------------------------------------------------
    def base_linear(self, layer_idx: int, name: str) -> nn.Module:
        if name not in LINEAR_NAMES:
            raise KeyError(f"unknown linear {name!r}; one of {LINEAR_NAMES}")
        return self.model.layers[layer_idx].linear(name)

    def set_base_linear(self, layer_idx: int, name: str, module: nn.Module) -> None:
        """Replace one base linear (e.g. by a dequantize-on-the-fly module with forward(x)).

        With a 3/4-bit base, modules of the same width (a GPTQ QuantLinear, a TritonQuantLinear)
        are written into the existing kernel weights in place; a 3/4-bit module of the other width
        becomes a new kernel module; anything else replaces the module."""
        if name not in LINEAR_NAMES:
            raise KeyError(f"unknown linear {name!r}; one of {LINEAR_NAMES}")
        if not self.model.layers[layer_idx].set_linear(name, module):
            self.model_epoch += 1

    def add_adapter(self, adapter: LoraAdapter) -> None:
        self.lora.add_adapter(adapter)

    def remove_adapter(self, name: str) -> None:
        self.lora.remove_adapter(name)

    # ---- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[int]:
        """One sampled token per sequence, in the order given."""
        if not seqs:
            return []
        if self.graphs is not None and self.graphs.can_run(seqs):
            logits = self.graphs.run(seqs, self._acquire_slots(seqs))
            return self.sampler.sample(logits, [s.params for s in seqs],
                                       [s.request_id for s in seqs])
        order, hidden, meta = self._forward(seqs)
        last = meta.last_token_idx
        if last is None:
            last = torch.tensor([meta.query_starts[j + 1] - 1 for j in range(len(order))],
                                device=self.device)
        logits = self.model.logits(hidden[last])                      # [B, V] fp32
        batch = [seqs[i] for i in order]
        tokens = self.sampler.sample(logits, [s.params for s in batch],
                                     [s.request_id for s in batch])
        out = [0] * len(seqs)
        for j, i in enumerate(order):
            out[i] = tokens[j]
        return out

    @torch.inference_mode()
    def compute_logits(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Logits [num_new_tokens, V] for every computed position (tests, scoring)."""
        if self.graphs is not None and seqs and self.graphs.can_run(seqs):
            logits = self.graphs.run(seqs, self._acquire_slots(seqs))
            return [logits[i:i + 1].clone() for i in range(len(seqs))]
        order, hidden, meta = self._forward(seqs)
        logits = self.model.logits(hidden)
        out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
        for j, i in enumerate(order):
            out[i] = logits[meta.query_starts[j]:meta.query_starts[j + 1]]
        return out

    def _acquire_slots(self, seqs: list[Sequence]) -> list[int]:
        slots = self.lora.acquire({s.task for s in seqs if s.task})
        return [slots[s.task] if s.task else -1 for s in seqs]

    def _forward(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor, AttentionMetadata]:
        slot_of = self._acquire_slots(seqs)
        # Group sequences by adapter so each adapter's tokens form one contiguous run.
        order = sorted(range(len(seqs)), key=lambda i: slot_of[i])
        ids, positions, slot_map, starts, ctx_lens, segments = [], [], [], [0], [], []
        bs = self.block_size
        for i in order:
            seq = seqs[i]
            n_tok, n_cached = seq.num_tokens, seq.num_cached_tokens
            if n_tok <= n_cached:
                raise ValueError(f"sequence {seq.request_id}: nothing to compute")
            if len(seq.block_table) * bs < n_tok:
                raise ValueError(f"sequence {seq.request_id}: {len(seq.block_table)} KV blocks "
                                 f"cannot hold {n_tok} tokens")
            toks = seq.token_ids[n_cached:]
            ids.extend(toks)
            pos = range(n_cached, n_tok)
            positions.extend(pos)
            table = seq.block_table
            slot_map.extend(table[p // bs] * bs + p % bs for p in pos)
            segments.append((slot_of[i], starts[-1], starts[-1] + len(toks)))
            starts.append(starts[-1] + len(toks))
            ctx_lens.append(n_tok)
        if self.is_fast:
            hidden, meta = self._forward_fast([seqs[i] for i in order], ids, positions, slot_map,
                                              starts, ctx_lens, [slot_of[i] for i in order])
            return order, hidden, meta
        meta = self._metadata([seqs[i] for i in order], slot_map, starts, ctx_lens)
        self.lora.prepare(_merge_runs(segments))
        dev = self.device
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                            self.kv_caches, meta, self.lora if self.lora.is_active else None)
        return order, hidden, meta

    def _forward_fast(self, batch: list[Sequence], ids: list[int], positions: list[int],
                      slot_map: list[int], starts: list[int], ctx_lens: list[int],
                      slots: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Eager step of the GPU fast path: every index tensor of the step (token ids, positions,
        KV slots, last-token rows, adapter slot per token, attention metadata) goes to the device
        in ONE host→device copy, built once and read by all layers (no per-layer host work)."""
        bs, num_tokens = self.block_size, len(ids)
        q_lens = [starts[j + 1] - starts[j] for j in range(len(batch))]
        tables = [seq.block_table[:-(-ctx_lens[j] // bs)] for j, seq in enumerate(batch)]
        token_slots: list[int] = []
        if any(slot >= 0 for slot in slots):
            for slot, n in zip(slots, q_lens):
                token_slots.extend([slot] * n)
        is_all_decode = all(n == 1 for n in q_lens)
        if is_all_decode:   # graphs off or batch too large for them: the decode kernel, eagerly
            max_nb = max(len(t) for t in tables)
            attn = [b for t in tables for b in t + [0] * (max_nb - len(t))] + ctx_lens
        else:
            attn, dims = VarlenBatch.host_layout(starts[:-1], q_lens, ctx_lens, tables)
        flat = ids + positions + slot_map + [s - 1 for s in starts[1:]] + token_slots + attn
        dev = torch.tensor(flat, dtype=torch.long).to(self.device)
        n_b = len(batch)
        ids_d, pos_d, slot_d, last_d, tok_slots_d, attn_d = dev.split(
            [num_tokens, num_tokens, num_tokens, n_b, len(token_slots), len(attn)])
        meta = AttentionMetadata(slot_mapping=slot_d, query_starts=starts, context_lens=ctx_lens,
                                 prefill_ids=[], prefill_blocks=[], is_all_decode=is_all_decode,
                                 last_token_idx=last_d)
        if is_all_decode:
            meta.decode_blocks = attn_d[:n_b * max_nb].view(n_b, max_nb)
            meta.decode_lens = attn_d[n_b * max_nb:]
        else:
            meta.varlen = VarlenBatch.from_flat(attn_d, dims)
        self.lora.prepare([])
        if token_slots:
            self.lora.prepare_tokens(tok_slots_d)
        hidden = self.model(ids_d, pos_d, self.kv_caches, meta,
                            self.lora if self.lora.is_active else None)
        return hidden, meta

    def _metadata(self, batch: list[Sequence], slot_map: list[int], starts: list[int],
                  ctx_lens: list[int]) -> AttentionMetadata:
        dev, bs = self.device, self.block_size
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_map, device=dev),
                                 query_starts=starts, context_lens=ctx_lens,
                                 prefill_ids=[], prefill_blocks=[])
        decode = []
        for j, seq in enumerate(batch):
            n_blocks = -(-ctx_lens[j] // bs)
            if starts[j + 1] - starts[j] == 1:
                decode.append(j)
            else:
                meta.prefill_ids.append(j)
                meta.prefill_blocks.append(torch.tensor(seq.block_table[:n_blocks], device=dev))
        if decode:
            max_nb = max(-(-ctx_lens[j] // bs) for j in decode)
            table = [batch[j].block_table[:max_nb] for j in decode]
            table = [t + [0] * (max_nb - len(t)) for t in table]
            meta.decode_blocks = torch.tensor(table, device=dev)                   # [D, nb]
            meta.decode_token_idx = torch.tensor([starts[j] for j in decode], device=dev)
            lens = torch.tensor([ctx_lens[j] for j in decode], device=dev)
            meta.decode_mask = (torch.arange(max_nb * bs, device=dev)[None, :]
                                < lens[:, None])[:, None, None, :]                 # [D,1,1,L]
        return meta


def _is_linear_key(key: str) -> bool:
    return key.endswith(".weight") and key.split(".")[-2] in LINEAR_NAMES


# "auto" takes the fragment layout up to this many running sequences: on the H100 its graphed 7B decode
# step was faster at batch 4-32 (1.04-1.17x) and even at 64, while its GEMMs lose 11-34 % at the
# M = 128-256 of large batches' mixed steps (frag_engine_decode_7ff25bc.md, frag_engine_gemm_7ff25bc.md);
# bench_e2e_gpu's mixed-adapter trace at 16 running: 1.11x end to end (e2e_gpu_layout_auto_f419d5b.json).
# It stores the codes block-major: at 36747d6 that decode step was 1.01x the row-major storage's at batch 1,
# 4 and 16 and its GEMMs 0.98-1.05x at M <= 16 (frag_major_decode_36747d6.md, frag_major_gemm_36747d6.md)
AUTO_FRAG_MAX_SEQS = 32


def w4_frag(layout: str, max_num_seqs: int) -> int:
    """KernelWeights.frag of an EngineConfig.w4_layout: 0 tiled, else the fragment order's k_width
    ("auto": the fragment layout when at most AUTO_FRAG_MAX_SEQS sequences run at once)."""
    order = auto_layout(layout, max_num_seqs).removesuffix("b")     # "...b": block-major storage, same order
    return frag_k_width() if order == "frag" else {"tiles": 0, "frag2": 2, "frag4": 4}[order]


def w4_block_major(layout: str, max_num_seqs: int) -> bool:
    """Whether an EngineConfig.w4_layout stores fragment-ordered codes block-major ("fragb", "frag2b", "frag4b",
    and "auto" wherever it takes the fragment layout)."""
    layout = auto_layout(layout, max_num_seqs)
    return layout.startswith("frag") and layout.endswith("b")


def auto_layout(layout: str, max_num_seqs: int) -> str:
    """The layout "auto" stands for at this many running sequences (any other layout as it is)."""
    if layout != "auto":
        return layout
    return "fragb" if max_num_seqs <= AUTO_FRAG_MAX_SEQS else "tiles"


def quantize_linear(weight: torch.Tensor, group_size: int, tuner: GemmTuner | None,
                    bits: int = 4) -> TritonQuantLinear:
    """RTN 3/4-bit of one nn.Linear weight [out, in] into a TritonQuantLinear on its device."""
    out_f, in_f = weight.shape
    if in_f % 128 or group_size % 128:
        raise ValueError(f"quant_bits={bits} needs in_features ({in_f}) and quant_group_size "
                         f"({group_size}) to be multiples of 128 (the W4A16/W3A16 kernel's K block)")
    return TritonQuantLinear(rtn_kernel_weights(weight, group_size, bits), None, tuner)


def _merge_runs(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for slot, start, end in segments:
        if merged and merged[-1][0] == slot and merged[-1][2] == start:
            merged[-1] = (slot, merged[-1][1], end)
        else:
            merged.append((slot, start, end))
    return merged
