"""kernels.launch: the direct launch path keeps one compiled kernel per Triton specialization and
passes the launcher what Triton's own path would (runtime arguments, then the constexpr values in
signature order, defaults included). On the CPU the compiled kernel and the driver are stand-ins;
the GPU tests (tests/gpu/test_kernels.py) run the real launcher. Skipped without triton."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from services.engine.kernels import launch as L  # noqa: E402
from services.engine.kernels import pdl  # noqa: E402


@triton.jit
def _kernel(x_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


@triton.jit
def _pdl_kernel(x_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pass


class Compiled:
    """Stand-in for a CompiledKernel: records what its launcher was called with."""
    function, packed_metadata = "function", "packed"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *args) -> None:
        self.calls.append(args)


class Jit:
    """What launch() reads of a JITFunction: fn, params and fn[grid](...) (Triton's path, recorded)."""

    def __init__(self, kernel=_kernel) -> None:
        self.fn, self.params = kernel.fn, kernel.params
        self.compiled = Compiled()
        self.slow: list[tuple] = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.slow.append((grid, args, meta))
            return self.compiled
        return call


class Driver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 77)


@pytest.fixture
def jit(monkeypatch):
    monkeypatch.setattr(L, "ENABLED", True)
    monkeypatch.setattr(L, "driver", Driver)
    monkeypatch.setattr(L, "_kernels", {})
    return Jit()


def test_second_call_of_a_specialization_goes_straight_to_the_launcher(jit) -> None:
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(jit, (4, 2), x, 48, 0.5, BLOCK=128, num_warps=4)
    assert len(jit.slow) == 1 and not jit.compiled.calls
    L.launch(jit, (3,), x, 96, 0.25, BLOCK=128, num_warps=4)     # 96: same specialization as 48
    assert len(jit.slow) == 1
    (call,) = jit.compiled.calls
    # grid padded to 3-D, current stream, metadata, no launch metadata or hooks, then the
    # runtime arguments and the constexprs in signature order (FLAG from its default)
    assert call == (3, 1, 1, 77, "function", "packed", None, None, None, x, 96, 0.25, 128, False)


@pytest.mark.parametrize("first,second", [
    ((48,), (1,)),        # an int equal to 1 is a constant to Triton
    ((48,), (7,)),        # divisibility by 16
    ((48,), (2 ** 33,)),  # i64 instead of i32
])
def test_a_new_int_specialization_takes_tritons_path(jit, first, second) -> None:
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(jit, (1,), x, *first, 0.5, BLOCK=128)
    L.launch(jit, (1,), x, *second, 0.5, BLOCK=128)
    assert len(jit.slow) == 2 and not jit.compiled.calls


def test_alignment_dtype_and_constexprs_are_part_of_the_key(jit) -> None:
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128)
    L.launch(jit, (1,), x[1:], 16, 0.5, BLOCK=128)               # address 2 bytes past alignment
    L.launch(jit, (1,), x.float(), 16, 0.5, BLOCK=128)           # another dtype
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=64)                    # another constexpr
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128, FLAG=True)
    assert len(jit.slow) == 5 and not jit.compiled.calls
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128, FLAG=True)
    assert jit.compiled.calls[-1][-2:] == (128, True)


def test_runtime_argument_by_keyword_is_never_kept(jit) -> None:
    x = torch.zeros(64, dtype=torch.float16)
    for _ in range(2):
        L.launch(jit, (1,), x, 16, scale=0.5, BLOCK=128)
    assert len(jit.slow) == 2 and not jit.compiled.calls


def test_set_enabled_switches_the_direct_path(monkeypatch) -> None:
    monkeypatch.setattr(L, "ENABLED", True)
    L.set_enabled(False)
    assert not L.ENABLED
    L.set_enabled(True)
    assert L.ENABLED is (not L._INTERPRET)


def test_active_launch_hooks_and_the_switch_take_tritons_path(jit, monkeypatch) -> None:
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128)
    hook = triton.knobs.runtime.launch_enter_hook
    if hasattr(hook, "calls"):
        monkeypatch.setattr(hook, "calls", [lambda metadata: None])
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128)
    monkeypatch.undo()
    monkeypatch.setattr(L, "driver", Driver)
    monkeypatch.setattr(L, "ENABLED", False)
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128)
    assert len(jit.slow) == 3 and not jit.compiled.calls


def test_pdl_reaches_only_the_kernels_that_declare_it(jit, monkeypatch) -> None:
    """With PDL on, a kernel with the PDL constexpr is launched as a programmatic dependent (PDL=True
    and Triton's launch_pdl option, kept in its cache key); one without it launches as always."""
    monkeypatch.setattr(pdl, "MODE", 2)
    monkeypatch.setattr(L, "_plans", {})
    x = torch.zeros(64, dtype=torch.float16)
    aware = Jit(_pdl_kernel)
    L.launch(aware, (1,), x, 16, BLOCK=128)
    L.launch(jit, (1,), x, 16, 0.5, BLOCK=128)
    assert aware.slow[-1][2] == {"BLOCK": 128, "PDL": 2, "launch_pdl": True}
    assert jit.slow[-1][2] == {"BLOCK": 128}
    L.launch(aware, (1,), x, 16, BLOCK=128)        # the kept kernel gets the mode as its constexpr
    assert aware.compiled.calls[-1][-2:] == (128, 2)
    monkeypatch.setattr(pdl, "MODE", 0)             # off: another specialization, PDL from its default
    L.launch(aware, (1,), x, 16, BLOCK=128)
    assert aware.slow[-1][2] == {"BLOCK": 128}


def test_set_pdl_stays_off_where_unsupported(monkeypatch) -> None:
    monkeypatch.setattr(pdl, "supported", lambda: False)
    assert pdl.set_pdl(2) == 0 and pdl.MODE == 0
    monkeypatch.setattr(pdl, "supported", lambda: True)
    assert pdl.set_pdl(True) == 1 and pdl.set_pdl(2) == 2
    assert pdl.set_pdl(False) == 0 and pdl.MODE == 0
    with pytest.raises(ValueError, match="PDL mode"):
        pdl.set_pdl(3)


def test_tma_descriptors_key_on_their_box_and_ints() -> None:
    """A host TMA descriptor is cacheable: its element type, box, padding and its shape and strides as
    Triton sees ints (so a kept kernel is reused only where Triton would pick the same one)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    codes = torch.zeros(64, 128, dtype=torch.int32)
    a = L._arg_key(TensorDescriptor.from_tensor(codes, [16, 128]))
    assert a != L._UNCACHEABLE and hash(a) is not None
    assert a == L._arg_key(TensorDescriptor.from_tensor(torch.ones(64, 128, dtype=torch.int32), [16, 128]))
    assert a != L._arg_key(TensorDescriptor.from_tensor(codes, [32, 128]))
    assert a != L._arg_key(TensorDescriptor.from_tensor(codes[:33], [16, 128]))    # 33 rows: not 16-divisible
    assert a != L._arg_key(TensorDescriptor.from_tensor(codes.half(), [16, 128]))
