"""Engine: multi-LoRA inference on the (quantized) shared base, scheduled step by step."""
