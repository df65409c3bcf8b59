"""Run a module's check_interpreted(*args) under TRITON_INTERPRET=1 in a fresh Python process.

Triton reads TRITON_INTERPRET when it is imported, so the test process itself cannot switch to the
interpreter; each check runs in a child process on one CPU thread. Skips without triton.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]


def run_interpreted(module: str, *args: object, timeout_s: float = 300, func: str = "check_interpreted") -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    code = (f"import torch; torch.set_num_threads(1); from {module} import {func}; "
            f"{func}({', '.join(map(repr, args))})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
