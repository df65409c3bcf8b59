"""Test helper: write real PEFT LoRA adapters (non-zero B) for the SmolLM2 base."""
from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(base_path: Path, out_dir: Path, rank: int, targets: list[str],
                      alpha: float | None = None, seed: int = 0, use_rslora: bool = False,
                      b_scale: float = 0.05) -> Path:
    """Save a PEFT adapter whose A and B are both random (init_lora_weights=False).

    B is scaled down so the adapter is a visible but sane perturbation of the base
    (PEFT's default init of B at init_lora_weights=False is huge for small ranks).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                     target_modules=list(targets), init_lora_weights=False,
                     use_rslora=use_rslora, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)
