"""Workload kit: generated tasks with checkable answers, metrics, adapter training, evaluation, traces."""
