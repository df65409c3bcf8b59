"""Predictor service: output-length prediction (ONNX model on CPU + running per-task statistics)."""
