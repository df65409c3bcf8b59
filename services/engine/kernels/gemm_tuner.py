"""GemmTuner: the fastest W4A16/W3A16 launch config per (M bucket, N, K, bits, layout), timed as CUDA-graph replays."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from services.engine.kernels.gptq_format import KernelWeights, frag_block_major
from services.engine.kernels.gemm_configs import GemmConfig, candidate_configs, m_bucket
from services.engine.kernels.w4a16 import dequantize_fp16, w4a16_matmul

# Weight copies a timing rotates through must together exceed the L2 this many times over, so
# every call reads its weights from DRAM, as each layer's GEMM does in a decode pass.
L2_MULTIPLE = 3
MAX_COPIES = 512  # bounds graph capture for tiny layers (a model that small sits in the L2 anyway)
# A candidate whose output differs from the dequantize-then-matmul reference by more than this
# (relative Frobenius error) is never picked: a miscompile or a bad fast path cannot be chosen for speed.
MAX_REL_ERR = 1e-2
log = logging.getLogger(__name__)


class TunerCache:
    """GemmTuner choices on disk, so a restarted engine skips the timing (a JSON file).

    Entries are valid only for the identity they were timed under: the GPU model, the Triton
    version and a digest of the candidate lists (a change to either re-tunes). A missing,
    unreadable or foreign file is ignored; writes go through a temporary file and a rename, so a
    crash cannot leave a torn file.
    """

    def __init__(self, path: Path, identity: str) -> None:
        self.path, self.identity = Path(path), identity
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("identity") == identity:
                self.entries = dict(data.get("best", {}))
        except (OSError, ValueError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("GEMM tuner cache %s ignored: %s", self.path, exc)

    @staticmethod
    def _key(key: tuple) -> str:
        return ",".join(map(str, key))

    def get(self, key: tuple) -> GemmConfig | None:
        entry = self.entries.get(self._key(key))
        try:
            return GemmConfig(**entry) if entry else None
        except TypeError:      # fields of another GemmConfig version
            return None

    def put(self, key: tuple, cfg: GemmConfig) -> None:
        self.entries[self._key(key)] = dataclasses.asdict(cfg)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"identity": self.identity, "best": self.entries}, indent=1))
            tmp.replace(self.path)
        except OSError as exc:  # a read-only cache directory costs a re-tune, nothing else
            log.warning("GEMM tuner cache %s not written: %s", self.path, exc)


def candidates_digest() -> str:
    """Digest of every candidate list the tuner can time (M buckets up to 8192)."""
    lists = [repr(candidate_configs(1 << e, frag)) for e in range(14) for frag in (0, 2, 4)]
    return hashlib.sha1("\n".join(lists).encode()).hexdigest()[:16]


def tuner_identity(device: torch.device, skip_kinds: tuple[str, ...] = ()) -> str:
    import triton
    skipped = f" | without {','.join(skip_kinds)}" if skip_kinds else ""
    return f"{torch.cuda.get_device_name(device)} | triton {triton.__version__} | candidates {candidates_digest()}{skipped}"


class GemmTuner:
    """Picks the fastest GemmConfig per (M bucket, N, K, bits, layout) on first use, timing each with CUDA events.

    Each candidate is timed as one CUDA graph of back-to-back calls, each call on its own copy of
    the weights, the copies together over L2_MULTIPLE × the L2: cold weights and no launch gaps,
    the situation of a decode pass (a single call after an L2 flush also pays for writing back
    the flush's dirty lines and for the graph launch, which favours different configs). The
    copies exist only while a shape is tuned. One tuner is shared by all layers of a model (same
    shapes → one tuning). A candidate whose output is off the dequantized reference by more than
    MAX_REL_ERR is rejected. Tuning runs real launches, so do a warm-up forward before CUDA-graph
    capture. On CPU (TRITON_INTERPRET) it returns the first candidate without timing. With a
    cache_path, choices persist across restarts (TunerCache). skip_kinds: kernel kinds never timed
    (e.g. gemm_configs.STREAM_KINDS, EngineConfig.gemm_stream_k off), unless a bucket has no other.
    """

    def __init__(self, num_reps: int = 10, cache_path: Path | None = None, skip_kinds: tuple[str, ...] = ()) -> None:
        self.num_reps = num_reps
        self.skip_kinds = tuple(skip_kinds)
        self.best: dict[tuple[int, ...], GemmConfig] = {}
        self.timings_ms: dict[tuple[int, ...], list[tuple[GemmConfig, float]]] = {}
        self.cache_path = cache_path
        self.cache: TunerCache | None = None     # opened on the first CUDA shape (needs the device)

    def config_for(self, x: torch.Tensor, kw: KernelWeights) -> GemmConfig:
        m, k = x.shape
        n = kw.out_features
        key = (m_bucket(m), n, k, kw.bits)   # tiled weights; a fragment order adds its k_width (and 1: block-major)
        if kw.frag:
            key += (kw.frag, 1) if frag_block_major(kw) else (kw.frag,)
        cfg = self.best.get(key)
        if cfg is None:
            if x.is_cuda and self.cache_path is not None and self.cache is None:
                self.cache = TunerCache(self.cache_path, tuner_identity(x.device, self.skip_kinds))
            cfg = self.cache.get(key) if self.cache is not None else None
            if cfg is None:
                cfg = self._tune(key, x, kw)
                if self.cache is not None:
                    self.cache.put(key, cfg)
            self.best[key] = cfg
        return cfg

    def _tune(self, key: tuple[int, ...], x: torch.Tensor, kw: KernelWeights) -> GemmConfig:
        cands = candidate_configs(key[0], key[4] if len(key) > 4 else 0)   # the layout's own list
        cands = [c for c in cands if c.kind not in self.skip_kinds] or cands
        if not x.is_cuda:
            return cands[0]
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"GemmTuner: shape {key} first seen during CUDA-graph capture; warm up first")
        xt = torch.randn(key[0], key[2], dtype=torch.float16, device=x.device)
        xr = xt if kw.perm is None else xt[:, kw.perm]
        ref = xr.float() @ dequantize_fp16(kw).float()
        copies = weight_copies(kw, x.device)
        results: list[tuple[GemmConfig, float]] = []
        for cfg in cands:
            try:
                out = w4a16_matmul(xt, kw, cfg)
            except Exception as exc:  # noqa: BLE001 — a config the compiler rejects is skipped
                results.append((cfg, float("inf")))
                print(f"GemmTuner: {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err <= MAX_REL_ERR:  # (NaN too)
                results.append((cfg, float("inf")))
                print(f"GemmTuner: {cfg} rejected: relative error {err:.2e} > {MAX_REL_ERR:g}")
                continue
            results.append((cfg, self._time_ms(xt, copies, cfg)))
        del copies
        self.timings_ms[key] = results
        return min(results, key=lambda r: r[1])[0]

    def _time_ms(self, x: torch.Tensor, copies: list[KernelWeights], cfg: GemmConfig) -> float:
        """Median per-call time of one graph replay over all copies (CUDA events)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for kw in copies:
                w4a16_matmul(x, kw, cfg)
        graph.replay()
        times = []
        for _ in range(self.num_reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(copies))
        del graph
        return sorted(times)[len(times) // 2]


def num_copies(weight_bytes: int, l2_bytes: int) -> int:
    """How many copies of a layer's weights a timing rotates through: enough to exceed
    L2_MULTIPLE × the L2, at least 2, at most MAX_COPIES."""
    return min(MAX_COPIES, max(2, math.ceil(L2_MULTIPLE * l2_bytes / max(weight_bytes, 1))))


def weight_copies(kw: KernelWeights, device: torch.device) -> list[KernelWeights]:
    """kw plus clones enough for all of them to exceed L2_MULTIPLE × the device's L2."""
    nbytes = sum(t.numel() * t.element_size() for t in (*kw.planes, kw.zeros, kw.scales))
    return with_clones(kw, num_copies(nbytes, torch.cuda.get_device_properties(device).L2_cache_size))


def with_clones(kw: KernelWeights, count: int) -> list[KernelWeights]:
    """kw and count - 1 clones of it (every code plane, zeros and scales; perm is shared)."""
    return [kw] + [kw.with_planes(tuple(p.clone() for p in kw.planes), kw.zeros.clone(), kw.scales.clone(), kw.perm)
                   for _ in range(count - 1)]
