"""kernels/pdl.py: the programmatic-dependent-launch form of a kernel waits on the previous grid
before anything else and lets the next one launch; the plain form has neither instruction.
Compiled for Hopper (sm_90) on this machine with Triton's bundled ptxas, no GPU needed; the GPU
tests (tests/gpu) run both forms against the reference. Skipped without triton."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("triton")
pdl = pytest.importorskip("services.engine.kernels.pdl")


def test_pdl_form_waits_first_and_plain_form_has_no_grid_control() -> None:
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol")
    from services.engine.kernels.aot import compile_mma
    args = dict(bm=16, bn=64, warps=4, stages=3, bits=4, fast_deq=True, single_dot=False, zsub=True, asm="ptx")
    with_pdl, plain = compile_mma(**args, pdl=True), compile_mma(**args)
    assert "griddepcontrol" not in plain
    body = with_pdl[with_pdl.index(".entry"):]
    wait, go = body.index("griddepcontrol.wait"), body.index("griddepcontrol.launch_dependents")
    first_load = min(m.start() for m in re.finditer(r"\bld\.global|\bcp\.async|\batom\.", body))
    assert wait < go and wait < first_load     # nothing is read before the previous grid has finished


def test_prefetch_mode_asks_l2_for_the_weights_before_the_wait() -> None:
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol")
    from services.engine.kernels.aot import compile_mma
    ptx = compile_mma(bm=16, bn=64, warps=4, stages=3, bits=4, fast_deq=True, single_dot=False, zsub=True,
                      asm="ptx", pdl=2)
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert "prefetch.global.L2" in body[:wait]
    first_load = min(m.start() for m in re.finditer(r"\bld\.global|\bcp\.async|\batom\.", body))
    assert wait < first_load


def _cubin(kind: str, bits: int, mode: int) -> bytes:
    """sm_90 cubin of one GEMM kernel (zsub mma8 BM16 BN64, gemv_h2 BN32, mma1t BM16 BN64) in a PDL mode."""
    from services.engine.kernels import aot
    if kind == "mma8":
        return aot.compile_mma(16, 64, 4, 3, bits, True, False, zsub=True, pdl=mode)
    if kind == "gemv_h2":
        return aot.compile_gemv(32, 4, 1, bits, True, pdl=mode)
    return aot.compile_mma_t(16, 64, 4, 3, bits, one_dot=True, pdl=mode)


@pytest.mark.parametrize("kind,bits,mode", [("mma8", 4, 1), ("mma8", 4, 2), ("mma8", 3, 2), ("gemv_h2", 4, 2),
                                            ("gemv_h2", 3, 2), ("mma1t", 4, 2)])
def test_sass_waits_before_the_first_global_access_and_keeps_the_k_loop(kind: str, bits: int, mode: int) -> None:
    """Past ptxas: in the sm_90 SASS the wait (ACQBULK) precedes every global load, store and
    reduction; mode 2's prefetches (CCTL.E.PF2) precede the wait; the K loop does not grow (ptxas
    schedules it a few instructions differently: 4-bit mma8 equal, gemv_h2 7 fewer) and nothing spills."""
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
    from kernel_sass import disassemble, instructions, k_loop
    plain = instructions(disassemble(_cubin(kind, bits, 0)))
    ins = instructions(disassemble(_cubin(kind, bits, mode)))
    ops = [op for _, op, _ in ins]
    wait = ops.index("ACQBULK")
    global_ops = [i for i, op in enumerate(ops) if op.startswith(("LDG.", "LDGSTS", "STG", "REDG", "ATOMG"))]
    assert global_ops and wait < min(global_ops)
    assert "PREEXIT" in ops[wait:]                       # launch_dependents, after the wait
    prefetches = [i for i, op in enumerate(ops) if op.startswith("CCTL") and "PF2" in op]
    assert (bool(prefetches) and max(prefetches) < wait) if mode == 2 else not prefetches
    assert len(k_loop(ins)) <= 1.05 * len(k_loop(plain))   # scheduling may shift a few (mma8 4-bit: equal)
    assert not any(op.startswith(("LDL", "STL")) for op in ops)


# The other PDL-aware kernels: (module, kernel, parameter types that are not fp16 pointers, constexprs).
_OTHER_KERNELS = {
    "paged_decode": ("attention", "_paged_decode_kernel",
                     {"bt_ptr": "*i32", "lens_ptr": "*i32", "scale": "fp32"},
                     {"D": 128, "BN": 64, "PREFETCH": False, "DOT": False, "V_BS": 0}),
    "paged_decode_prefetch": ("attention", "_paged_decode_kernel",
                              {"bt_ptr": "*i32", "lens_ptr": "*i32", "scale": "fp32"},
                              {"D": 128, "BN": 32, "PREFETCH": True, "DOT": False, "V_BS": 0}),
    "paged_decode_rope": ("attention", "_paged_decode_rope_kernel",
                          {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
                           "bt_ptr": "*i64", "lens_ptr": "*i32", "scale": "fp32"},
                          {"D": 128, "BN": 64, "STEP_STOP": 0, "PREFETCH": False, "SPLIT": False, "DOT": False,
                           "V_BS": 0}),
    "paged_decode_rope_prefetch": ("attention", "_paged_decode_rope_kernel",
                                   {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
                                    "bt_ptr": "*i64", "lens_ptr": "*i32", "scale": "fp32"},
                                   {"D": 128, "BN": 32, "STEP_STOP": 0, "PREFETCH": True, "SPLIT": False,
                                    "DOT": False, "V_BS": 0}),
    "paged_decode_rope_split": ("attention", "_paged_decode_rope_kernel",
                                {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
                                 "bt_ptr": "*i64", "lens_ptr": "*i32", "part_ptr": "*fp32", "scale": "fp32"},
                                {"D": 128, "BN": 64, "STEP_STOP": 0, "PREFETCH": False, "SPLIT": True, "DOT": True,
                                 "V_BS": 0}),
    "split_combine": ("attention", "_split_combine_kernel", {"part_ptr": "*fp32"}, {"D": 128, "SP": 8}),
    "paged_varlen": ("attention", "_paged_varlen_kernel",
                     {"bt_ptr": "*i32", "q_start_ptr": "*i32", "q_len_ptr": "*i32", "ctx_ptr": "*i32",
                      "tile_seq_ptr": "*i32", "tile_m_ptr": "*i32", "scale_log2": "fp32"},
                     {"D": 128, "BM": 64, "BN": 64, "STEP_STOP": 0, "V_BS": 0}),
    "add_rmsnorm": ("fused_ops", "_add_rmsnorm_kernel", {"eps": "fp32"},
                    {"HAS_RES": True, "BLOCK": 4096, "WRITE_RES": True, "ZERO": True, "ZBLOCK": 1024}),
    "silu_mul": ("fused_ops", "_silu_mul_kernel", {}, {"BLOCK": 1024}),
    "rope_cache": ("fused_ops", "_rope_cache_kernel",
                   {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64"}, {"HALF": 64, "V_BS": 0}),
    "lora_shrink": ("lora", "_shrink_kernel",
                    {"v_ptr": "*fp32", "order_ptr": "*i64", "slots_ptr": "*i32", "seg_start_ptr": "*i32",
                     "seg_end_ptr": "*i32"}, {"BM": 16, "BK": 128, "RB": 16}),
    "lora_expand": ("lora", "_expand_kernel",
                    {"v_ptr": "*fp32", "order_ptr": "*i64", "slots_ptr": "*i32", "seg_start_ptr": "*i32",
                     "seg_end_ptr": "*i32"}, {"RANK": 16, "BM": 16, "BN": 64, "SPLIT": 2}),
    "lora_expand_rows": ("lora", "_expand_rows_kernel",
                         {"v_ptr": "*fp32", "order_ptr": "*i64", "slots_ptr": "*i32"},
                         {"RANK": 16, "BM": 16, "BN": 64, "SPLIT": 2}),
}


@pytest.mark.parametrize("name", sorted(_OTHER_KERNELS))
def test_every_other_pdl_kernel_waits_before_its_first_global_access(name: str) -> None:
    """Attention, the fused ops and the LoRA kernels in PDL mode 1, sm_90 SASS: the wait comes
    before any global load, store or atomic, and the plain form has no grid dependency control."""
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol")
    import importlib
    import sys
    from pathlib import Path

    from services.engine.kernels.aot import compile_kernel
    sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
    from kernel_sass import disassemble, instructions
    module, kernel_name, types, consts = _OTHER_KERNELS[name]
    fn = getattr(importlib.import_module(f"services.engine.kernels.{module}"), kernel_name)
    names = [p.name for p in fn.params]

    def sass_ops(mode: int) -> list[str]:
        sig = {n: "constexpr" if n in consts or n == "PDL" else types.get(n, "*fp16" if n.endswith("_ptr") else "i32")
               for n in names if n in consts or n == "PDL" or not fn.params[names.index(n)].is_constexpr}
        cubin = compile_kernel(fn, sig, {**consts, "PDL": mode}, warps=4, stages=3, aligned=())
        return [op for _, op, _ in instructions(disassemble(cubin))]

    plain, ops = sass_ops(0), sass_ops(1)
    assert "ACQBULK" not in plain and "PREEXIT" not in plain
    wait = ops.index("ACQBULK")
    global_ops = [i for i, op in enumerate(ops) if op.startswith(("LDG", "STG", "REDG", "ATOMG", "RED.", "ATOM."))]
    assert global_ops and wait < min(global_ops)
    assert "PREEXIT" in ops[wait:]
