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
    from . import head_epilogue

    def kind(name: str) -> str:
        if name.endswith("_ptr"):
            return {"tgt_ptr": "*i64", "dz_ptr": "*bf16"}.get(name, "*fp32")
        return "fp32" if name in _FP32_SCALARS else "i32"

    aligned = ("V", "stride_z", "stride_dz")
    return _compile_source(fn, constexprs, kind, aligned, head_epilogue.NUM_WARPS, arch)


def _compile_source(fn, constexprs: dict, kind, aligned: tuple[str, ...], num_warps: int, arch: int, **options):
    """Compile ``fn`` with ``constexprs``, each other argument's type from ``kind(name)``, and pointers and the
    integers named in ``aligned`` specialized as 16-divisible (as the launcher's arguments are on real models)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else kind(name) for name in fn.arg_names}
    divisible = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n in aligned]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in divisible},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def norm_variants():
    """(kernel, variant, fn, constexprs, num_warps) of the RMSNorm kernels (``rms_norm``) on bf16 rows, Llama's form
    and Gemma's (``1 + w``, ``offset``)."""
    from . import rms_norm

    for offset, form in ((False, ""), (True, ", Gemma form")):
        for h in (2048, 4096, rms_norm.MAX_H):
            block = {"BLOCK_H": h, "OFFSET": offset}
            warps = rms_norm._num_warps(h)
            yield "rms_norm forward", f"bf16, H={h}{form}", rms_norm._forward_kernel, block, warps
            yield "rms_norm backward", f"bf16, H={h}, dW{form}", rms_norm._backward_kernel, \
                {**block, "WANT_DW": True}, warps  # fmt: skip


def compile_norm(fn, constexprs: dict, num_warps: int, arch: int = 90):
    """Compile an RMSNorm kernel as it runs on a bf16 model: bf16 rows, weight and gradients, fp32 rsqrt and weight
    gradient partials, 16-aligned pointers, width and row strides."""

    def kind(name: str) -> str:
        if name.endswith("_ptr"):
            return "*fp32" if name in ("rstd_ptr", "dw_ptr") else "*bf16"
        return "fp32" if name == "eps" else "i32"

    aligned = tuple(n for n in fn.arg_names if n == "H" or "stride" in n)
    return _compile_source(fn, constexprs, kind, aligned, num_warps, arch)


def swiglu_variants():
    """(kernel, variant, fn, constexprs, num_warps) of the gated-product kernels (``swiglu``) on bf16 blocks: SiLU
    (Llama's), the tanh GELU (Gemma's) and GELU."""
    from . import swiglu

    for activation, code in swiglu.ACTIVATIONS.items():
        block = {"BLOCK": swiglu.BLOCK, "ACT": code}
        yield "gated product", f"bf16, {activation}", swiglu._product_kernel, block, swiglu.NUM_WARPS
        for gate, up, name in ((True, True, "d_gate, d_up"), (True, False, "d_gate"), (False, True, "d_up")):
            yield "gated gradients", f"bf16, {activation}, {name}", swiglu._gradients_kernel, \
                {**block, "WANT_GATE": gate, "WANT_UP": up}, swiglu.NUM_WARPS  # fmt: skip


def compile_swiglu(fn, constexprs: dict, num_warps: int, arch: int = 90):
    """Compile a gated-product kernel as the lean MLP runs it: bf16 gate, up and gradients, 16-aligned pointers and
    element count (a block of tokens times I)."""
    return _compile_source(fn, constexprs, lambda n: "*bf16" if n.endswith("_ptr") else "i32", ("n",), num_warps, arch)


def rope_variants():
    """(kernel, variant, fn, constexprs, num_warps, table type) of the RoPE kernel (``rope``) on bf16 q and k heads:
    Llama-3.2-1B's (32 q / 8 k heads of 64) and Qwen2.5-7B's (28 / 4 of 128), forward and backward; and Llama's
    q heads with fp32 tables and results (autocast's case)."""
    from . import rope

    shapes = [("1B", "q", 32, 64, "bf16"), ("1B", "k", 8, 64, "bf16"), ("7B", "q", 28, 128, "bf16"),
              ("7B", "k", 4, 128, "bf16"), ("1B", "q", 32, 64, "fp32")]  # fmt: skip
    for model, which, heads, dim, tables in shapes:
        block = {"HALF": dim // 2, "BLOCK_D": dim // 2, "BLOCK_HEADS": rope.block_heads(heads, dim)}
        for backward in (False, True):
            name = "rope backward" if backward else "rope forward"
            variant = f"bf16, {model} {which}: {heads} heads of {dim}" + (", fp32 tables" if tables == "fp32" else "")
            yield name, variant, rope._rope_kernel, {**block, "BACKWARD": backward}, rope.num_warps(heads, dim), tables


def compile_rope(fn, constexprs: dict, num_warps: int, tables: str = "bf16", arch: int = 90):
    """Compile the RoPE kernel as the launcher runs it: bf16 heads, ``tables``-typed cos, sin and results (the
    gradient in the backward: ``x_ptr``; the bf16 input gradient: ``y_ptr``), unit strides along the head dimension
    (specialized to 1), the other strides 16-divisible (head dims of 64 and 128), the launcher's options (no fused
    multiply-adds)."""
    from . import rope

    unit = {name: 1 for name in ("sxd", "scd", "ssd", "syd")}
    aligned = tuple(n for n in fn.arg_names if n.startswith("s") and n not in unit and n != "sin_ptr")
    wide = ("cos_ptr", "sin_ptr", "x_ptr" if constexprs["BACKWARD"] else "y_ptr")

    def kind(name: str) -> str:
        if name.endswith("_ptr"):
            return f"*{tables}" if name in wide else "*bf16"
        return "i32"

    return _compile_source(fn, {**constexprs, **unit}, kind, aligned, num_warps, arch, **rope.COMPILE_OPTIONS)


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
    reports += [inspect(compile_swiglu(fn, cx, w, args.arch), kernel, v) for kernel, v, fn, cx, w in swiglu_variants()]
    for kernel, v, fn, cx, w, tables in rope_variants():
        reports.append(inspect(compile_rope(fn, cx, w, tables, args.arch), kernel, v))
    for r in reports:
        cols = (r.kernel, r.variant, r.registers, r.stack_bytes, r.local_loads, r.shared_bytes, r.hgmma)
        print("| " + " | ".join(str(c) for c in cols) + " |")


if __name__ == "__main__":
    main()
