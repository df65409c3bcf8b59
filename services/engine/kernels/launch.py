"""launch(): start a @triton.jit kernel without Triton's per-call argument binding once the
kernel has been compiled for the arguments' specialization.

An eager engine step launches ~290 Triton kernels. Triton's own launch path binds the arguments,
specializes each one (alignment, value 1, divisibility by 16), hashes the result into its kernel
cache and only then calls the compiled launcher: on the H100 hosts that path was the largest
Python cost of an eager step (`profile_eager_step_e1630af.md`: `JITFunction.run` and its helpers
first among Python functions). Here the first call for a specialization goes through Triton and
keeps the compiled kernel; later calls with the same specialization call its launcher directly.

The cache key holds every property Triton specializes on, so the kept kernel is the one Triton
would pick: each tensor's dtype and whether its address is 16-byte aligned; each int's range
(i32 / i64), whether it equals 1 and whether 16 divides it; bools, floats and None by kind; the
constexpr and launch options by value; the device. Kernels must take their runtime arguments
positionally (a runtime argument passed by keyword would be frozen into the cache: such calls,
and calls while Triton's launch hooks hold a hook, e.g. under a Triton profiler, always take
Triton's path). The direct call skips the empty hook chain and its launch metadata, which
Triton 3.6 builds on every launch. EngineConfig.triton_fast_launch (ENGINE_TRITON_FAST_LAUNCH) turns it
off through set_enabled; under TRITON_INTERPRET it is always off.
"""
from __future__ import annotations

import inspect
import os

from services.engine.kernels import pdl

try:
    import triton
    from triton.runtime.driver import driver
except ImportError:  # CPU-only installs never launch Triton kernels
    triton = None
    driver = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:     # no Triton, or one without host TMA descriptors
    _TensorDescriptor = None

# Triton reads TRITON_INTERPRET once, at import; the interpreter has no compiled launcher to call.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = not _INTERPRET
_I32_MIN, _I32_MAX = -(2 ** 31), 2 ** 31 - 1
_UNCACHEABLE, _FLOAT, _BOOL = ("uncacheable",), ("f",), ("u1",)
_plans: dict[int, tuple | None] = {}        # id(fn) -> (parameter names, defaults, constexpr flags, takes PDL) or None
_kernels: dict[tuple, tuple] = {}           # (id(fn), key) -> (compiled kernel, trailing constexpr values)
_sm_counts: dict[int, int] = {}             # CUDA device index -> SMs (sm_count)


def _arg_key(a):
    """What Triton's specialization sees of one runtime argument (dispatch on the exact type: the
    isinstance chain was a visible share of an eager step's host time)."""
    t = type(a)
    if t is int:
        return ("i", _I32_MIN <= a <= _I32_MAX, a == 1, a % 16 == 0)
    if t is float:
        return _FLOAT
    if a is None:
        return None
    if t is bool:
        return _BOOL
    try:
        return (a.dtype, a.data_ptr() % 16 == 0)
    except AttributeError:      # not a tensor (nor an exact int, float or bool): Triton's path
        pass
    if t is _TensorDescriptor:  # a host TMA descriptor: its element type and box, and its shape and strides as ints
        return ("desc", a.base.dtype, tuple(a.block_shape), a.padding, tuple(map(_arg_key, (*a.shape, *a.strides))))
    return _UNCACHEABLE


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids (triton.cdiv is a constexpr function in Triton 3.6: ~3 µs a call)."""
    return -(-a // b)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (a torch.device; cached per index), 8 elsewhere, i.e.
    under TRITON_INTERPRET, so the stream kinds still cut their units into several runs there."""
    if device.type != "cuda":
        return 8
    import torch
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length()


def _plan(fn) -> tuple | None:
    """(names, defaults, constexpr flags, whether it declares the PDL constexpr of pdl.py) of fn's
    parameters, or None where they cannot be read."""
    key = id(fn)
    if key not in _plans:
        try:
            params = list(inspect.signature(fn.fn).parameters.values())
            flags = [p.is_constexpr for p in fn.params]
            names = [p.name for p in params]
            _plans[key] = (names, [p.default for p in params], flags, "PDL" in names)
        except (AttributeError, TypeError, ValueError):
            _plans[key] = None
    return _plans[key]


def _hook_active(hook) -> bool:
    """A launch hook that would run: Triton 3.6-3.9 keep an always-present chain of hooks
    (HookChain, active when it holds a call); older ones None or a callable."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    rt = triton.knobs.runtime
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


def set_enabled(on: bool) -> None:
    """Turn the direct path on or off for the process (the engine applies its config here)."""
    global ENABLED
    ENABLED = on and not _INTERPRET


def _pdl_aware(fn) -> bool:
    plan = _plan(fn)
    return plan is not None and plan[3]


def launch(fn, grid: tuple, *args, **meta) -> None:
    """fn[grid](*args, **meta), through the kept compiled kernel when this specialization has one;
    with a PDL mode set, a kernel that declares the PDL constexpr is launched as a programmatic
    dependent of the previous one and gets the mode (pdl.py)."""
    if pdl.MODE and _pdl_aware(fn):
        meta = {**meta, "PDL": pdl.MODE, "launch_pdl": True}
    if not ENABLED:
        fn[grid](*args, **meta)
        return
    device = driver.active.get_current_device()
    key = (id(fn), device, tuple(meta.items()), tuple(map(_arg_key, args)))
    entry = _kernels.get(key)
    if entry is not None:
        if _hooks_set():    # kept already; the hooks need Triton's path
            fn[grid](*args, **meta)
            return
        kernel, tail = entry
        stream = driver.active.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        return
    kernel = fn[grid](*args, **meta)
    plan = _plan(fn)
    if plan is None or kernel is None or hasattr(kernel, "result") or _UNCACHEABLE in key[3]:
        return
    names, defaults, constexpr, _ = plan
    if len(args) > len(names) or not all(constexpr[len(args):]):
        return      # a runtime argument given by keyword: Triton's path every time
    tail = []
    for name, default in zip(names[len(args):], defaults[len(args):]):
        if name in meta:
            tail.append(meta[name])
        elif default is not inspect.Parameter.empty:
            tail.append(default)
        else:
            return
    _kernels[key] = (kernel, tuple(tail))
