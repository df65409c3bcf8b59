"""Programmatic dependent launch (PDL, Hopper and later) for the engine's Triton kernels.

A decode step is ~300 small kernels in a row; between two of them the GPU drains the first grid,
flushes its writes and only then schedules the second one's blocks, which then spend their first
microseconds computing addresses before any load is in flight. With PDL the second kernel is
launched while the first still runs: its blocks are scheduled as soon as every block of the first
has started, and they stop at `griddepcontrol.wait` until the first grid has finished and its
writes are visible. What happens before the wait overlaps the previous kernel's tail.

The contract, which every kernel that takes a `PDL` constexpr keeps: `pdl_enter(PDL)` comes before
any read of memory another kernel writes and before any write, so no program touches what another
kernel produces or consumes before the previous grid has completed (index arithmetic and, in mode 2,
L2 prefetches of the weight codes may precede it; most kernels simply call it first). launch() passes PDL=True (and Triton's launch_pdl option) only to
kernels that declare the parameter and only while set_pdl(True) holds; other kernels, cuBLAS and
torch's own, launch as always and order as always. Completion is transitive: a kernel that waited
finished after its predecessor, so the next one that waits on it sees both.

Modes (EngineConfig.pdl, ENGINE_PDL; set for the process by set_pdl): 0 off; 1 as above; 2 also
lets the GEMM kernels ask L2 for their program's weight codes before the wait (the codes are never
written by a kernel, so no ordering is needed for them), so a GEMM's weight stream starts while
the kernel before it (a norm, RoPE, attention at decode sizes: latency-bound) still runs. It needs
sm_90 or later and a Triton with griddepcontrol (3.4+), and is off under TRITON_INTERPRET.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never launch Triton kernels
    triton = None
    tl = None

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MODES = (0, 1, 2)
MODE = 0        # what launch() passes as PDL to the kernels that declare it (0: they launch as always)


def supported() -> bool:
    """Whether this process can launch with PDL: a CUDA device of compute capability 9+ and a Triton
    that has griddepcontrol; never under the interpreter."""
    if _INTERPRET or gdc_wait is None:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def set_pdl(mode: int) -> int:
    """Set the process's PDL mode (0, 1 or 2; a bool means 0 or 1) and return the mode now in force:
    on a device or Triton without PDL, asking for it leaves it at 0."""
    global MODE
    mode = int(mode)
    if mode not in MODES:
        raise ValueError(f"PDL mode must be one of {MODES}, got {mode}")
    MODE = mode if mode and supported() else 0
    return MODE


if triton is not None:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First statement of a PDL-aware kernel: wait for the previous grid, then let the next
        kernel's blocks be scheduled (they only take what this grid's resident blocks leave)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
