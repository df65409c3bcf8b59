"""The GPU serving benchmark's workload: per-family lengths, task names, traces, in-memory adapters."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from services.engine.simulator.trace import TraceRequest

CHAT_OVERHEAD_TOKENS = 30     # SmolLM2 chat template around a user prompt (system + role tags)


def family_lengths(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(prompt tokens, output tokens) per task family; prompt ≈ chars/4 + chat template."""
    out: dict[str, list[tuple[int, int]]] = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            prompt = max(1, round(len(row["prompt"]) / 4)) + CHAT_OVERHEAD_TOKENS
            out.setdefault(row["task"], []).append((prompt, int(row["output_tokens"])))
    return out


def scaled(lengths: dict[str, list[tuple[int, int]]], prompt_x: float, output_x: float) -> dict:
    """Every (prompt, output) length multiplied (at least 1 token): longer-request scenarios."""
    return {f: [(max(1, round(p * prompt_x)), max(1, round(o * output_x))) for p, o in rows]
            for f, rows in lengths.items()}


def parse_length_scale(text: str) -> tuple[float, float]:
    """'PxO' (e.g. '4x4') -> (prompt multiplier, output multiplier), both > 0."""
    try:
        px, ox = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"length scale must look like PxO (e.g. 4x4), got {text!r}") from None
    if px <= 0 or ox <= 0:
        raise ValueError(f"length scale multipliers must be > 0, got {text!r}")
    return px, ox


def task_names(num: int, families: list[str]) -> list[str]:
    """The workload kit's naming: the families, then variants `family#k` cycling through them."""
    f = len(families)
    return [families[i % f] + (f"#{i // f}" if i >= f else "") for i in range(num)]


def family_of(task: str) -> str:
    return task.split("#")[0]


def zipf_weights(num: int, rng: random.Random, zipf_a: float) -> list[float]:
    """Zipf(zipf_a) popularity of `num` tasks over an order shuffled by rng (rank r weighs 1 / r^a)."""
    order = list(range(num))
    rng.shuffle(order)
    weights = [0.0] * num
    for rank, i in enumerate(order):
        weights[i] = 1.0 / (rank + 1) ** zipf_a
    return weights


def expected_output_tokens(tasks: list[str], lengths, seed: int, *, zipf_a: float = 1.0,
                           pooled: bool = False) -> float:
    """Mean output tokens per request of make_trace(tasks, lengths, ..., seed, zipf_a=..., pooled=...)'s
    task mix, in expectation (its popularity weights × each family's mean output length). Seeds shuffle
    the Zipf order, so the popular task, and with it the work per request, differs between traces:
    2.4x between seeds 100-119 of the 4x-length workload (63-149 tokens)."""
    rows = [row for rs in lengths.values() for row in rs]
    if pooled:
        return sum(o for _, o in rows) / len(rows)
    weights = zipf_weights(len(tasks), random.Random(seed), zipf_a)
    means = {f: sum(o for _, o in rs) / len(rs) for f, rs in lengths.items()}
    return sum(w * means[family_of(t)] for w, t in zip(weights, tasks)) / sum(weights)


LOAD_UNITS = ("requests", "tokens")


def trace_rate(rate_req_s: float, load_unit: str, tasks: list[str], lengths, seed: int, ref_seed: int,
               zipf_a: float = 1.0) -> float:
    """Request rate of the trace drawn with `seed` at a load of rate_req_s: as it is ("requests"), or
    ("tokens") scaled so the trace offers the output tokens per second that rate_req_s offers at the
    task mix of ref_seed (the capacity burst's, which C is measured on), so every seed's trace puts the
    same work per second on the engine."""
    if load_unit == "requests":
        return rate_req_s
    if load_unit != "tokens":
        raise ValueError(f"load unit must be one of {LOAD_UNITS}, got {load_unit!r}")
    return rate_req_s * (expected_output_tokens(tasks, lengths, ref_seed, zipf_a=zipf_a)
                         / expected_output_tokens(tasks, lengths, seed, zipf_a=zipf_a))


def make_trace(tasks: list[str], lengths, rate: float, window_s: float, seed: int, *,
               weights: list[float] | None = None, zipf_a: float = 1.0, pred_sigma: float = 0.25,
               prefix: str = "r", burst: int = 0, pooled: bool = False) -> list[TraceRequest]:
    """Poisson arrivals over window_s (or `burst` requests all at t=0); Zipf task popularity
    over a shuffled task order unless `weights`; lengths drawn from the task family's rows.

    predicted_output_tokens emulates the length predictor: true length × log-normal noise of
    sd pred_sigma (the trained ONNX predictor is not on the GPU machine; its held-out MAE on
    this data is ~1 token, see predictor.md, i.e. better than this emulation). With `pooled`,
    a request's lengths come from all families' rows whatever its task, so traces with different
    task counts carry the same work and differ only in adapters."""
    rng = random.Random(seed)
    pool = [row for rows in lengths.values() for row in rows] if pooled else None
    if weights is None:
        weights = zipf_weights(len(tasks), rng, zipf_a)
    cum, acc = [], 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    out, t = [], 0.0
    while True:
        if burst:
            if len(out) >= burst:
                break
        else:
            t += rng.expovariate(rate)
            if t >= window_s:
                break
        task = rng.choices(tasks, cum_weights=cum)[0]
        prompt, output = rng.choice(pool if pooled else lengths[family_of(task)])
        predicted = max(1, round(output * math.exp(rng.gauss(0.0, pred_sigma))))
        out.append(TraceRequest(arrival_s=t, task=task, prompt_tokens=prompt, output_tokens=output,
                                predicted_output_tokens=predicted, request_id=f"{prefix}{len(out)}"))
    return out


def make_adapters(dims, names: list[str], num_sets: int, seed: int):
    """LoraAdapter objects for every name; `num_sets` distinct weight sets (ranks 8 and 16,
    q/k/v/o) shared among names, so 1000 tasks fit in host memory. Each name still gets its
    own device slot when used, so slot loads and per-batch adapter counts are real."""
    import torch

    from services.common.adapters import ATTN_MODULES, LoraAdapter
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for k in range(num_sets):
        rank = (8, 16)[k % 2]
        weights = {}
        for layer in range(dims.num_layers):
            for module in ATTN_MODULES:
                d_in, d_out = dims.features(module)
                weights[(layer, module)] = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5,
                                            0.01 * torch.randn(d_out, rank, generator=gen))
        sets.append((rank, weights, dict.fromkeys(weights, 2.0)))
    return [LoraAdapter(name, Path(f"<memory:{name}>"), sets[i % num_sets][0], ATTN_MODULES,
                        sets[i % num_sets][1], sets[i % num_sets][2]) for i, name in enumerate(names)]
