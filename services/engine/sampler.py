"""Sampler: greedy, temperature, top-k and top-p sampling, one seeded generator per request."""
from __future__ import annotations

import torch

from services.engine.sequence import SamplingParams


class Sampler:
    """Turns one row of logits per sequence into one token id per sequence.

    A request with a seed gets its own torch.Generator, created on first use and
    kept until `release()`, so its samples do not depend on batch neighbours.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               request_ids: list[str]) -> list[int]:
        """logits [B, V] (fp32) → B token ids."""
        greedy = logits.argmax(dim=-1)
        if all(p.temperature == 0 for p in params):
            return greedy.tolist()
        out = greedy.tolist()
        for i, (p, rid) in enumerate(zip(params, request_ids, strict=True)):
            if p.temperature == 0:
                continue
            probs = self.probs(logits[i], p)
            out[i] = int(torch.multinomial(probs, 1, generator=self._generator(rid, p.seed)))
        return out

    @staticmethod
    def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """Sampling distribution [V] after temperature, top-k and top-p filtering."""
        scaled = logits.float() / p.temperature
        if 0 < p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens ranked above it already cover top_p (the top one stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[0] = False
            scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.softmax(scaled, dim=-1)
