"""Trace-driven simulator: the engine's real policies on a virtual clock with a fitted step-time model."""
