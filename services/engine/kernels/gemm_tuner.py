"""GemmTuner: picks the fastest W4A16 launch config per (M bucket, N, K) by timing CUDA-graph replays."""
from __future__ import annotations

import torch

from services.engine.kernels.gptq_format import KernelWeights
from services.engine.kernels.w4a16 import GemmConfig, candidate_configs, m_bucket, w4a16_matmul


class GemmTuner:
    """Picks the fastest GemmConfig per (M bucket, N, K) on first use, timing each with CUDA events.

    One tuner is shared by all layers of a model (same shapes → one tuning). Tuning runs real
    launches, so do a warm-up forward before CUDA-graph capture. On CPU (TRITON_INTERPRET) it
    returns the first candidate without timing.
    """

    def __init__(self, num_reps: int = 10, flush_l2: bool = True) -> None:
        self.num_reps = num_reps
        self.flush_l2 = flush_l2
        self.best: dict[tuple[int, int, int], GemmConfig] = {}
        self.timings_ms: dict[tuple[int, int, int], list[tuple[GemmConfig, float]]] = {}
        self._flush_buf: torch.Tensor | None = None

    def config_for(self, x: torch.Tensor, kw: KernelWeights) -> GemmConfig:
        m, k = x.shape
        n = kw.out_features
        key = (m_bucket(m), n, k)
        cfg = self.best.get(key)
        if cfg is None:
            cfg = self._tune(key, x, kw)
            self.best[key] = cfg
        return cfg

    def _tune(self, key: tuple[int, int, int], x: torch.Tensor, kw: KernelWeights) -> GemmConfig:
        cands = candidate_configs(key[0])
        if not x.is_cuda:
            return cands[0]
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"GemmTuner: shape {key} first seen during CUDA-graph capture; warm up first")
        xt = torch.randn(key[0], key[2], dtype=torch.float16, device=x.device)
        if self._flush_buf is None and self.flush_l2:
            self._flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=x.device)
        results: list[tuple[GemmConfig, float]] = []
        for cfg in cands:
            try:
                w4a16_matmul(xt, kw, cfg)
            except Exception as exc:  # noqa: BLE001 — a config the compiler rejects is skipped
                results.append((cfg, float("inf")))
                print(f"GemmTuner: {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            # Time CUDA-graph replays: a Python launch (tens of µs) would otherwise swamp
            # kernels of 10-50 µs and make the choice noise.
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                w4a16_matmul(xt, kw, cfg)
            graph.replay()
            times = []
            for _ in range(self.num_reps):
                if self._flush_buf is not None:
                    self._flush_buf.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            del graph
            results.append((cfg, sorted(times)[len(times) // 2]))
        self.timings_ms[key] = results
        return min(results, key=lambda r: r[1])[0]
