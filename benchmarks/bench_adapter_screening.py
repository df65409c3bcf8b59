"""Adapter screening cost: Gram-matrix norms of s·B@A vs materialising B@A, on Llama-2-7B shapes.

Random adapters (rank 16, all seven linears, 32 layers = 224 modules) in the exact shapes of
Llama-2-7B; both methods run in this process on this CPU, 1 thread. Also times a full
`screen_modules` pass. Writes benchmarks/results/adapter_screening.{md,json}.
Usage: .venv/bin/python benchmarks/bench_adapter_screening.py [--rank 16] [--layers 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.adapter_screening import delta_norms, screen_modules  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 11008  # Llama-2-7B
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTERMEDIATE),
          "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}  # (in, out)


def make_adapter(rank: int, layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pairs = {}
    for layer in range(layers):
        for module, (in_f, out_f) in SHAPES.items():
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            b = torch.randn(out_f, rank, generator=gen) * 0.01
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            pairs[f"model.layers.{layer}.{block}.{module}"] = (a, b)
    return pairs


def materialised_fro(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    delta = scaling * (b @ a)  # [out, in] fp32: what a straightforward screen would do
    return float(torch.linalg.matrix_norm(delta))


def materialised_spectral(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    delta = scaling * (b.double() @ a.double())  # [out, in]; full SVD: minutes on one core
    return float(torch.linalg.matrix_norm(delta, ord=2))


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--naive-modules", type=int, default=7,
                        help="modules timed with the materialised product (one layer by default)")
    parser.add_argument("--with-svd", action="store_true",
                        help="also time the spectral norm by SVD of the materialised q_proj delta")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = make_adapter(args.rank, args.layers)
    names = list(pairs)

    start = time.perf_counter()
    gram = {m: delta_norms(*pairs[m], 2.0) for m in names}
    gram_s = time.perf_counter() - start

    naive = {m: timed(materialised_fro, *pairs[m], 2.0) for m in names[:args.naive_modules]}
    naive_s = sum(t for _, t in naive.values())
    max_rel_err = max(abs(gram[m][0] - f) / f for m, (f, _) in naive.items())
    svd = None
    if args.with_svd:
        spectral, svd_s = timed(materialised_spectral, *pairs[names[0]], 2.0)
        svd = {"module": names[0], "seconds": svd_s,
               "relative_error": abs(gram[names[0]][1] - spectral) / spectral}

    start = time.perf_counter()
    report = screen_modules(pairs, {m: 2.0 for m in names})
    screen_s = time.perf_counter() - start

    per_gram = gram_s / len(names)
    per_naive = naive_s / len(naive)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), torch threads 1",
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "shapes": "Llama-2-7B linears (random weights)", "rank": args.rank,
        "num_modules": len(names),
        "gram_ms_per_module": per_gram * 1e3, "materialised_ms_per_module": per_naive * 1e3,
        "speedup": per_naive / per_gram, "max_relative_error_fro": max_rel_err, "svd": svd,
        "screen_modules_s": screen_s, "verdict": report.verdict.value,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_screening.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "adapter_screening.md").write_text(
        "# Adapter screening cost\n\n"
        f"{result['date']}, commit {result['git_commit'][:10]}, {result['device']}.\n"
        f"Command: `{result['command']}`\n\n"
        f"Random rank-{args.rank} adapter on all seven linears of {args.layers} Llama-2-7B layers "
        f"({len(names)} modules), weights random (no real 7B adapter exists here).\n\n"
        "| method | ms / module |\n|---|---|\n"
        f"| Gram matrices (r×r), Frobenius + spectral | {per_gram * 1e3:.2f} |\n"
        f"| materialised s·B@A [out, in] fp32, Frobenius only (first {len(naive)} modules) "
        f"| {per_naive * 1e3:.1f} |\n"
        + (f"| materialised, spectral norm by fp64 SVD ({svd['module']}) | {svd['seconds'] * 1e3:.0f} |\n"
           if svd else "")
        + f"\nFrobenius-only speed-up {per_naive / per_gram:.1f}× (the Gram path also gives the "
        f"spectral norm); largest relative Frobenius difference {max_rel_err:.1e}"
        + (f", spectral {svd['relative_error']:.1e}" if svd else "")
        + f". Whole `screen_modules` pass (norms, z-scores, verdict): {screen_s:.2f} s → "
        f"{report.verdict.value}.\n")


if __name__ == "__main__":
    main()
