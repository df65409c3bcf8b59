"""EngineConfig: every engine knob in one frozen dataclass, built from ENGINE_* variables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.env_config import env_values
from services.engine.scheduler import INLAID_DECODE_TASK_RANKS, SchedulerConfig

if TYPE_CHECKING:
    import torch

_DTYPES = ("auto", "float32", "bfloat16", "float16")
W4_LAYOUTS = ("auto", "tiles", "frag", "frag2", "frag4", "fragb", "frag2b", "frag4b")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
KV_V_LAYOUTS = ("auto", "key", "token_major")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. `device`/`dtype` "auto" resolve at load time (cuda if present;
    float32 on CPU, bfloat16 on CUDA). 0 for the KV and length knobs means "derive"."""

    model: str = "smollm2-135m"            # name for services.common.model_source.resolve_model
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16
    block_size: int = 16                   # tokens per KV block
    num_kv_blocks: int = 0                 # 0 → from kv_cache_bytes
    kv_cache_bytes: int = 0                # 0 → 256 MiB on CPU, 85 % of free memory on CUDA
    # KV cache element type: "auto" the model's dtype; "fp8_e4m3" one byte per element (float8_e4m3fn,
    # values clamped to ±448, no scale), so a byte budget holds twice the tokens and decode attention
    # reads half the bytes; attention math still runs in the model's dtype (kernels/attention.py)
    kv_cache_dtype: str = "auto"
    # V cache layout: "key" as K's; "token_major" tokens contiguous within each block, which the GPU
    # kernels read a block at a time (an fp8 V tile then needs no byte-wise transpose,
    # kernels/attention.py token_major_v; GPU fast path only); "auto" token_major for an fp8 cache on
    # the fast path (the graphed 7B step 4-6% faster at batch 16-64 on the H200,
    # kv_fp8_shape2_c8e629e.md), else K's
    kv_v_layout: str = "auto"
    max_model_len: int = 0                 # prompt + output tokens; 0 → model's max positions
    max_num_seqs: int = 64                 # running sequences at once
    max_num_batched_tokens: int = 4096     # tokens computed in one step
    max_adapters: int = 16                 # adapter slots resident on the device (LRU)
    max_adapters_per_batch: int = 10       # β: distinct tasks in one step (scheduler cap)
    max_lora_rank: int = 64                # larger adapters are rejected
    max_tokens_limit: int = 4096           # largest max_tokens a request may ask for
    policy: str = "inlaid"                 # scheduling policy name (services.engine.policies)
    max_decode_streak: int = 8             # decode steps before prefills are considered
    starvation_limit_s: float = 30.0       # waiting longer than this jumps the queue
    num_threads: int = 0                   # torch CPU threads; 0 = torch's default
    # Quantized base on the device (GPU fast path): 0 = serve the weights as loaded.
    quant_bits: int = 0                    # 0 | 3 | 4: GPTQ 3/4-bit linears (random models: RTN-packed)
    quant_group_size: int = 128            # GPTQ group size when quant_bits is set
    cuda_graphs: bool = True               # capture pure-decode steps at bucketed batch sizes
    gemm_tune_cache: bool = True           # keep GEMM tuner choices in INLAID_CACHE_DIR (fast restarts)
    triton_fast_launch: bool = True        # Triton kernels launched straight through their compiled launcher
    serial_split_k: bool = False           # split-K GEMMs without a zeroed output; slower on H100 (kernels/w4a16.py)
    # The GEMM tuner also times the stream-K kernel at M <= 16 (mma8_sk, kernels/w4a16.py) and picks it
    # where it is faster (H100: by <= 4 % on 3 of 25 GEMM cells, stream_k_*_900b7dc.md); off: split-K only
    gemm_stream_k: bool = True
    # The GEMM tuner also times the TMA kinds (frag_tma at M <= 64, frag_gemv_tma at M <= 4: block-major
    # fragment codes fetched by Hopper's TMA, kernels/w4a16_frag.py) and keeps one only where faster; off
    # by default until a GPU has timed them (docs/results.md, "Codes fetched by TMA")
    gemm_tma: bool = False
    # Programmatic dependent launch of the Triton kernels (kernels/pdl.py; a no-op below sm_90 or
    # without Triton's griddepcontrol): 0 off, 1 each kernel launched while the previous one runs,
    # 2 also the GEMMs' weights asked of L2 before the wait. H100: mode 1 speeds the graphed 7B
    # decode up 1.06x at batch 1 but not at 16-64, and in the engine's batch-64 replay it cost 1.3 %
    # without adapters and 6 % with 32 (gpu_kernels_v18_pdl1_fused_ba97a3b.md, e2e_gpu_lora_pdl*_ba97a3b.md);
    # mode 2 is slower everywhere (gpu_kernels_v17_pdl_c73667d.md). Off by default.
    pdl: int = 0
    # Adapters whose host packs are made ahead on a background thread, taken from the scheduler's
    # next waiting tasks (0: off; acts only when tasks outnumber host packs; 1000 tasks on an H100:
    # +4.1 % req/s, prefill steps -18 %; serve_gpu_24gib_scale_prefetch_7737606.md)
    lora_prefetch: int = 32
    # Pure-decode steps rotate q/k and write the new K/V inside the paged decode attention kernel
    # (kernels/attention.py: one launch per layer instead of two). H100, graphed 7B decode: 1.05-1.09x
    # faster at batch 1-64; the engine's batch-64 replay 8.81 -> 8.33 ms (gpu_kernels_v18_pdl1_fused_ba97a3b.md)
    fused_decode_attention: bool = True
    # Paged decode attention (kernels/attention.py): the tile math on tensor cores, and split-KV where a
    # batch has fewer than this many (sequence, head) programs per SM (0: never split). H100 (97fe563):
    # graphed 7B decode 1.08x at batch 1 and 1.02-1.03x at 4-128 (context 256), 1.49x at batch 1 and
    # 1.10x at 64 (context 1024) (decode_attention_step_97fe563.md, decode_attention_step_ctx1024_97fe563.md)
    decode_attention_dot: bool = True
    decode_split_programs_per_sm: int = 4
    # A 3/4-bit down_proj computes SiLU·mul of gate|up in its GEMM's input load (kernels/w4a16.py, glu):
    # one launch per layer fewer wherever no registered adapter targets down_proj; off: slower on the H100
    # (graphed 7B decode 0.76x at batch 1, 0.82x at 16; gpu_kernels_v19_fused_d5b34b3.md)
    fused_mlp_activation: bool = False
    # 4-bit code layout on the GPU: "tiles" (gptq_format.KernelWeights) or "frag", the codes in the order
    # of the tensor-core operand fragments (kernels/w4a16_frag.py) and the GEMM kinds that read it, in the
    # order the installed Triton gives mma.sync operands (frag_k_width); "frag2" / "frag4" name the order; a
    # trailing "b" stores the codes block-major (gptq_format.frag_block_major): 1.01x the decode step of the
    # row-major storage at batch 1-16 (H100, frag_major_decode_36747d6.md).
    # "auto": fragb where max_num_seqs <= model_runner.AUTO_FRAG_MAX_SEQS, else tiles. H100 (7ff25bc, 2e71b92):
    # graphed 7B decode 1.15-1.17x faster with frag at batch 4-16, 1.04x at 32, 0.97x at 1, 0.99x at 64, its
    # GEMMs 0.68-0.89x at M = 128 (frag_engine_decode_7ff25bc.md, frag_engine_gemm_7ff25bc.md)
    w4_layout: str = "auto"
    lora_expand_rows: bool = True          # LoRA expand per 16 tokens, B gathered per token (kernels/lora.py);
                                           # False: per segment chunk on tensor cores (slower decode on H100)
    # Policy-specific scheduler knobs (each policy reads only its own; see SchedulerConfig).
    mlfq_num_levels: int = 6
    mlfq_base_quantum: int = 8
    mlfq_prefill_tokens_per_quantum: int = 256
    wfq_prefill_token_weight: float = 0.5
    inlaid_task_switch_tokens: int = 32
    inlaid_full_batch_streak_factor: int = 2
    inlaid_decode_task_rank: str = "srtf"
    inlaid_beta_fill: float = 1.0
    inlaid_overload_min_free: float = 0.25
    inlaid_overload_streak_factor: int = 4
    piggyback_decode: bool = True
    admission_reserve_fraction: float = 1.0
    inlaid_preempt_ratio: float = 0.0
    inlaid_step_time_ratio: float = 0.0
    inlaid_slo_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"ENGINE_DTYPE must be one of {_DTYPES}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"ENGINE_DEVICE must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_adapters",
                    "max_lora_rank", "max_tokens_limit")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len", "max_adapters_per_batch",
                     "num_threads", "lora_prefetch", "decode_split_programs_per_sm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_adapters_per_batch > self.max_adapters:
            raise ValueError(
                f"max_adapters_per_batch ({self.max_adapters_per_batch}) cannot exceed the "
                f"adapter slots max_adapters ({self.max_adapters})")
        if self.pdl not in (0, 1, 2):
            raise ValueError(f"ENGINE_PDL must be 0 (off), 1 or 2, got {self.pdl}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"ENGINE_KV_CACHE_DTYPE must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_v_layout not in KV_V_LAYOUTS:
            raise ValueError(f"ENGINE_KV_V_LAYOUT must be one of {KV_V_LAYOUTS}, got {self.kv_v_layout!r}")
        if self.w4_layout not in W4_LAYOUTS:
            raise ValueError(f"ENGINE_W4_LAYOUT must be one of {W4_LAYOUTS}, got {self.w4_layout!r}")
        if self.quant_bits not in (0, 3, 4):
            raise ValueError(f"quant_bits must be 0 (unquantized), 3 or 4, got {self.quant_bits}")
        if self.quant_group_size <= 0 or self.quant_group_size % 32:
            raise ValueError(f"quant_group_size must be a positive multiple of 32, "
                             f"got {self.quant_group_size}")
        if not self.policy:
            raise ValueError("policy must be a non-empty name")
        if self.inlaid_decode_task_rank not in INLAID_DECODE_TASK_RANKS:
            raise ValueError(f"ENGINE_INLAID_DECODE_TASK_RANK must be one of {INLAID_DECODE_TASK_RANKS}, "
                             f"got {self.inlaid_decode_task_rank!r}")

    @property
    def adapters_per_batch_cap(self) -> int:
        """β as the scheduler sees it: 0 (unlimited) still cannot exceed the slot count."""
        return self.max_adapters_per_batch or self.max_adapters

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               max_adapters_per_batch=self.adapters_per_batch_cap,
                               max_decode_streak=self.max_decode_streak,
                               starvation_limit_s=self.starvation_limit_s,
                               mlfq_num_levels=self.mlfq_num_levels,
                               mlfq_base_quantum=self.mlfq_base_quantum,
                               mlfq_prefill_tokens_per_quantum=self.mlfq_prefill_tokens_per_quantum,
                               wfq_prefill_token_weight=self.wfq_prefill_token_weight,
                               inlaid_task_switch_tokens=self.inlaid_task_switch_tokens,
                               inlaid_full_batch_streak_factor=self.inlaid_full_batch_streak_factor,
                               inlaid_decode_task_rank=self.inlaid_decode_task_rank,
                               inlaid_beta_fill=self.inlaid_beta_fill,
                               inlaid_overload_min_free=self.inlaid_overload_min_free,
                               inlaid_overload_streak_factor=self.inlaid_overload_streak_factor,
                               piggyback_decode=self.piggyback_decode,
                               admission_reserve_fraction=self.admission_reserve_fraction,
                               inlaid_preempt_ratio=self.inlaid_preempt_ratio,
                               inlaid_step_time_ratio=self.inlaid_step_time_ratio,
                               inlaid_slo_scale=self.inlaid_slo_scale,
                               max_adapter_slots=self.max_adapters)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> EngineConfig:
        """Build from ENGINE_<FIELD> variables (e.g. ENGINE_MAX_ADAPTERS); overrides win."""
        return cls(**{**env_values(cls, "ENGINE", env), **overrides})

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def check_device(self) -> None:
        """Settings the resolved device cannot serve, as a ValueError (the model runner checks the
        fast path itself; this catches them before the model loads)."""
        device = self.resolved_device()
        self.check_kv_v_layout(device == "cuda", f"on {device}")

    def check_kv_v_layout(self, fast_path: bool, where: str) -> None:
        """A token-major V cache only on the GPU fast path, else a ValueError saying where this engine runs."""
        if self.kv_v_layout == "token_major" and not fast_path:
            raise ValueError("ENGINE_KV_V_LAYOUT=token_major needs the GPU fast path (CUDA with triton); "
                             f"this engine runs {where}")

    def resolved_kv_v_layout(self, fast_path: bool) -> str:
        """The V cache layout an engine allocates: "key" or "token_major" (auto resolved for a runner
        on the fast path or not)."""
        if self.kv_v_layout != "auto":
            return self.kv_v_layout
        return "token_major" if fast_path and self.kv_cache_dtype == "fp8_e4m3" else "key"

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's torch dtype for a model in model_dtype."""
        import torch
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8_e4m3" else model_dtype

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"
