"""Every fused log-prob kernel variant compiles to H100 (sm_90) machine code, on this GPU-less machine.

The interpreter runs kernels in numpy and accepts code the real compiler rejects (and vice versa); this test
closes that gap without a GPU by compiling with Triton's bundled ptxas. It checks what can be checked off the
device: compilation, Hopper's warpgroup tensor-core instructions (HGMMA) in every kernel that multiplies
matrices, and no register spills in the plain bf16 atomic backward, the kernel most steps run.
"""

from __future__ import annotations

import os

import pytest
import torch
from fastdpo.kernels import compile_report, triton_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not triton_available() or not compile_report.available(), reason="needs triton's NVIDIA tools"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels: not under the interpreter"
    ),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_kernel_compiles_for_sm90_on_tensor_cores(dtype):
    reports = compile_report.report(dtype, arch=90)
    assert len(reports) == len(list(compile_report.variants(dtype)))
    for r in reports:
        if dtype == torch.bfloat16 and r.kernel == "backward (atomic)" and r.variant == "dh, dW":
            assert r.stack_bytes == 0 and r.local_loads == 0, f"the table's backward config now spills: {r}"
        if r.kernel != "combine":
            assert r.hgmma > 0, f"{r.kernel} ({r.variant}) does not use HGMMA"


def test_epilogue_kernels_compile_without_spills_and_with_16_byte_loads():
    # they stream each chunk of logits once: the loads of the raw fp32 logits must be 16 bytes wide, the bf16 dz
    # stores too, and nothing may spill to local memory
    for kernel, variant, fn, constexprs in compile_report.epilogue_variants():
        compiled = compile_report.compile_epilogue(fn, constexprs, arch=90)
        r = compile_report.inspect(compiled, kernel, variant)
        assert r.stack_bytes == 0 and r.local_loads == 0, r
        assert "ld.global.v4.b32" in compiled.asm["ptx"], f"{kernel} ({variant}): loads are not 16 bytes wide"
        if kernel == "epilogue dz":
            assert "st.global.v4.b32" in compiled.asm["ptx"], f"{kernel} ({variant}): dz stores are not 16 bytes wide"


def wide_and_unspilled(compiled, kernel: str, variant: str) -> str:
    """Assert that a row or element-wise kernel spills nothing and loads and stores 16 bytes at a time; its PTX."""
    r = compile_report.inspect(compiled, kernel, variant)
    assert r.stack_bytes == 0 and r.local_loads == 0, r
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, f"{kernel} ({variant}): not 16 bytes wide"
    return ptx


def test_norm_kernels_compile_without_spills_and_with_16_byte_row_accesses():
    # one read of each bf16 row (and of its gradient): 16-byte loads and stores, nothing spilled, at H 2048, 4096
    # and the widest the kernels take (MAX_H)
    for kernel, variant, fn, constexprs, warps in compile_report.norm_variants():
        wide_and_unspilled(compile_report.compile_norm(fn, constexprs, warps, arch=90), kernel, variant)


def test_rope_kernel_compiles_without_spills_fused_multiply_adds_or_narrow_accesses():
    # bit for bit torch's RoPE needs each product rounded before the sum: with fp32 tables and results (autocast's
    # case) Triton's default FP fusion would contract them into FMAs (16 in the forward's PTX when enabled); the
    # launcher turns it off. Every variant reads and writes its bf16 heads 16 bytes at a time, nothing spilled
    import re

    for kernel, variant, fn, constexprs, warps, tables in compile_report.rope_variants():
        compiled = compile_report.compile_rope(fn, constexprs, warps, tables, arch=90)
        ptx = wide_and_unspilled(compiled, kernel, variant)
        assert not re.search(r"\bfma\.", ptx), f"{kernel} ({variant}): fused multiply-adds"


def test_swiglu_kernels_compile_without_spills_and_with_16_byte_accesses():
    # element-wise over [block, I] bf16 tensors: every load and store 16 bytes wide, nothing spilled
    for kernel, variant, fn, constexprs, warps in compile_report.swiglu_variants():
        ptx = wide_and_unspilled(compile_report.compile_swiglu(fn, constexprs, warps, arch=90), kernel, variant)
        assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx, f"{kernel} ({variant}): 2-byte accesses"
