"""Compile the fused log-prob kernels for a GPU architecture on any machine, and report what the compiler made.

No GPU is needed: Triton's bundled ``ptxas`` and ``cuobjdump`` turn the kernels into sm_90 (H100) machine code
here, which shows, before any device time is spent, whether every kernel variant compiles, how many registers
and how much stack (spilled registers) and shared memory each uses, and whether the products run on Hopper's
warpgroup tensor-core instructions (``HGMMA``). Run ``python -m fastdpo.kernels.compile_report``.
Numbers come from the Triton installed here, which may be newer than a GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from .configs import TABLE, TileConfig

_POINTERS_16 = ("h_ptr", "w_ptr", "b_ptr")
_FP32_POINTERS = ("part_ptr", "tgt_logit_ptr", "lse_ptr", "grad_ptr", "dh_ptr", "dw_ptr", "db_ptr", "out_ptr")
_FP32_SCALARS = ("scale_over_t", "scale_over_cap", "cap_over_t", "filter_eps")
_ALIGNED_INTS = ("H", "stride_h", "stride_w")


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    variant: str
    registers: int
    stack_bytes: int
    local_loads: int
    shared_bytes: int
    hgmma: int


def _tools() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return path if shutil.which("cuobjdump", path=path) else None


def available() -> bool:
    """Whether this Triton ships the NVIDIA tools needed to compile and inspect without a GPU."""
    try:
        return _tools() is not None
    except ImportError:
        return False


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    elem = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS_16:
            sig[name] = elem
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in ("rows_ptr", "tgt_ptr"):
            sig[name] = "*i64"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn, dtype: torch.dtype, constexprs: dict, *, num_warps: int, num_stages: int, arch: int = 90):
    """Compile one kernel variant for ``sm_<arch>``; returns Triton's compiled kernel object."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(fn, dtype, constexprs)
    # What Triton's launcher would specialize on for real inputs: 16-byte aligned pointers, and H and the row
    # strides divisible by 16 (true of every common model); without these hints loads are not vectorized or
    # pipelined and the report would describe a slower kernel than the one that runs.
    aligned = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*") or name in _ALIGNED_INTS]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def inspect(compiled, kernel: str, variant: str) -> KernelReport:
    """Registers, stack, local loads, shared memory and HGMMA count of a compiled kernel."""
    tools = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", path], capture_output=True, text=True)
        sass = subprocess.run([f"{tools}/cuobjdump", "--dump-sass", path], capture_output=True, text=True).stdout
    fields = {}
    for line in usage.stdout.splitlines():
        for item in line.split():
            if ":" in item and item.split(":")[0] in ("REG", "STACK"):
                key, value = item.split(":", 1)
                fields[key] = int(value)
    return KernelReport(
        kernel=kernel,
        variant=variant,
        registers=fields.get("REG", -1),
        stack_bytes=fields.get("STACK", -1),
        local_loads=sass.count("LDL"),
        shared_bytes=int(compiled.metadata.shared),
        hgmma=sass.count("HGMMA"),
    )


def _meta(cfg: TileConfig, dtype: torch.dtype) -> dict:
    return {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k,
            "DOT_PRECISION": "tf32" if dtype == torch.float32 else "ieee"}  # fmt: skip


def variants(dtype: torch.dtype, bucket: str = "large"):
    """(kernel, variant, fn, constexprs, config) for every kernel at the table's config for this dtype."""
    from . import linear_logprobs as k

    dtype_class = "fp32" if dtype == torch.float32 else "16bit"
    fwd, bwd = TABLE[(dtype_class, bucket, "forward")], TABLE[(dtype_class, bucket, "backward")]
    plain = {"HAS_BIAS": False, "SOFTCAP": False}
    full = {"HAS_BIAS": True, "SOFTCAP": True}
    none = dict.fromkeys(("WANT_ENTROPY", "WANT_MEAN", "WANT_TOP1", "WANT_SQ"), False)
    every = dict.fromkeys(none, True)
    f_meta = {"GROUP_N": fwd.group_n, **_meta(fwd, dtype)}
    b_meta = _meta(bwd, dtype)
    atomic = {"NEED_DH": True, "NEED_DW": True, "GROUP_N": bwd.group_n, **b_meta}
    combine_cfg = TileConfig(0, 0, 0, num_warps=4, num_stages=1)
    yield "forward", "logp only", k._forward_kernel, {**plain, **none, **f_meta}, fwd
    yield "forward", "all outputs, bias, softcap", k._forward_kernel, {**full, **every, **f_meta}, fwd
    yield "combine", "-", k._combine_kernel, {"BLOCK": 128}, combine_cfg
    yield "backward (atomic)", "dh, dW", k._backward_kernel, {**plain, "FILTER": False, "NEED_DB": False, **atomic}, bwd
    yield "backward (atomic)", "dh, dW, db, bias, softcap, filter", k._backward_kernel, {
        **full, "FILTER": True, "NEED_DB": True, **atomic}, bwd  # fmt: skip
    yield "backward rows (deterministic)", "dh", k._backward_rows_kernel, {**plain, "FILTER": False, **b_meta}, bwd
    yield "backward vocab (deterministic)", "dW, db, bias, softcap", k._backward_vocab_kernel, {
        **full, "FILTER": False, "NEED_DW": True, "NEED_DB": True, **b_meta}, bwd  # fmt: skip


def epilogue_variants():
    """(kernel, variant, fn, constexprs) of the chunked head's epilogue kernels (``head_epilogue``), bf16 dz."""
    from . import head_epilogue as e

    every = dict.fromkeys(("WANT_ENTROPY", "WANT_MEAN", "WANT_TOP1", "WANT_SQ"), True)
    none = dict.fromkeys(every, False)
    block = {"BLOCK_N": e.BLOCK_N, "BLOCK_V": e.BLOCK_V}
    plain, full = {"HAS_BIAS": False, "SOFTCAP": False}, {"HAS_BIAS": True, "SOFTCAP": True}
    yield "epilogue stats", "lse, logp", e._row_stats_kernel, {**plain, **none, **block}
    yield "epilogue stats", "all outputs, bias, softcap", e._row_stats_kernel, {**full, **every, **block}
    yield "epilogue dz", "bf16 dz", e._grad_kernel, {**plain, **block}
    yield "epilogue dz", "bf16 dz, bias, softcap", e._grad_kernel, {**full, **block}


def compile_epilogue(fn, constexprs: dict, arch: int = 90):
    """Compile an epilogue kernel as it runs: fp32 raw logits, bias and statistics, int64 targets, bf16 dz, and the
    launcher's specialization of 16-aligned pointers, strides and vocabulary size (true of every common model)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import head_epilogue

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"tgt_ptr": "*i64", "dz_ptr": "*bf16"}.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in _FP32_SCALARS else "i32"
    aligned = [
        i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n in ("V", "stride_z", "stride_dz")
    ]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": head_epilogue.NUM_WARPS})


def norm_variants():
    """(kernel, variant, fn, constexprs, num_warps) of the RMSNorm kernels (``rms_norm``) on bf16 rows."""
    from . import rms_norm

    for h in (2048, 4096, rms_norm.MAX_H):
        block = {"BLOCK_H": h}
        warps = rms_norm._num_warps(h)
        yield "rms_norm forward", f"bf16, H={h}", rms_norm._forward_kernel, block, warps
        yield "rms_norm backward", f"bf16, H={h}, dW", rms_norm._backward_kernel, {**block, "WANT_DW": True}, warps


def compile_norm(fn, constexprs: dict, num_warps: int, arch: int = 90):
    """Compile an RMSNorm kernel as it runs on a bf16 model: bf16 rows, weight and gradients, fp32 rsqrt and weight
    gradient partials, 16-aligned pointers, width and row strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("rstd_ptr", "dw_ptr") else "*bf16"
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    aligned = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n == "H" or "stride" in n]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def report(dtype: torch.dtype, arch: int = 90) -> list[KernelReport]:
    found = []
    for kernel, variant, fn, constexprs, cfg in variants(dtype):
        compiled = compile_kernel(fn, dtype, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch)
        found.append(inspect(compiled, kernel, variant))
    return found


def main(argv: list[str] | None = None) -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (90 = H100)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"sm_{args.arch}, {args.dtype}, triton {triton.__version__}, tile table 'large' (H > 1024)\n")
    print("| kernel | variant | registers | stack bytes | local loads | shared bytes | HGMMA |")
    print("|---|---|---:|---:|---:|---:|---:|")
    reports = report(dtype, args.arch)
    reports += [inspect(compile_epilogue(fn, cx, args.arch), kernel, v) for kernel, v, fn, cx in epilogue_variants()]
    reports += [inspect(compile_norm(fn, cx, w, args.arch), kernel, v) for kernel, v, fn, cx, w in norm_variants()]
    for r in reports:
        cols = (r.kernel, r.variant, r.registers, r.stack_bytes, r.local_loads, r.shared_bytes, r.hgmma)
        print("| " + " | ".join(str(c) for c in cols) + " |")


if __name__ == "__main__":
    main()
