"""Per-linear input statistics H = 2/n·Σ x xᵀ, gathered with forward hooks on one decoder layer."""
from __future__ import annotations

import torch
from torch import nn

# Linears that read the same input share one Hessian (computed once, on the first member).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
LINEAR_NAMES: tuple[str, ...] = tuple(n for group in INPUT_GROUPS.values() for n in group)


class HessianAccumulator:
    """Sums x xᵀ over every token seen by one linear; `hessian()` normalises per token.

    Each batch's x xᵀ is a fp32 matmul (fp64 matmuls are ~2× slower on CPU), accumulated
    across batches in fp64 so many batches lose no precision. Per-token normalisation keeps
    a task with a big calibration set from dominating the aggregate.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.sum += (x.T @ x).double()
        self.num_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.num_tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return (2.0 / self.num_tokens * self.sum).float()


class LayerHessians:
    """Context manager: hooks one decoder layer and collects a Hessian per input group."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerHessians":
        for group in INPUT_GROUPS:
            linear = self.layer.get_submodule(group)
            acc = HessianAccumulator(linear.in_features, linear.weight.device)
            self.accumulators[group] = acc
            self._handles.append(linear.register_forward_pre_hook(
                lambda _mod, args, acc=acc: acc.add(args[0].detach())))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hessians(self) -> dict[str, torch.Tensor]:
        return {group: acc.hessian() for group, acc in self.accumulators.items()}
