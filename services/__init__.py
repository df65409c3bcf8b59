"""Inlaid: multi-task LoRA serving on one shared, quantized base LLM."""
