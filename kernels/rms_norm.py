"""RMSNorm forward and backward, one read of each row: the lean norms' kernels on a GPU (``fastdpo.ops.rms_norm``).

transformers' Llama-form RMSNorm (the forward of 140 model families in transformers 5.24) computes, per row of
``H`` values::

    x32 = x.float();  r = rsqrt(mean(x32²) + eps);  y = weight * (x32 · r).to(x.dtype)

as seven element-wise passes over the row (several in fp32), and its autograd backward as a dozen more. Here:

- ``forward``: per row, one program: the sum of squares in fp32, ``r``, the normalized row rounded to the input
  dtype (as ``.to(x.dtype)`` rounds it), times the weight, rounded once to the output dtype (that of
  ``weight * normalized`` in torch: the wider of the two); ``r`` is kept ([rows] fp32), nothing else.
- ``backward``: per program a contiguous range of rows, each read once with its incoming gradient ``dy``:
  ``dn = dy · w`` rounded to the input dtype (what autograd hands the cast back), then
  ``dx = r·dn − r³·x·Σ(dn·x)/H``, written in the input dtype; ``Σ dy·n̂`` over the program's rows accumulates the
  weight's gradient in fp32 (one partial row per program, summed by the launcher), where autograd sums rounded
  products.

With ``offset`` the kernels compute the Gemma-form RMSNorm instead (Gemma 1–3, Qwen3.5, Qwen3-Next, ...: 13
families in transformers 5.24), all in fp32 and rounded once, to the input dtype::

    y = (x32 · r · (1 + weight.float())).to(x.dtype)

and its backward without the roundings above (``dn = dy · (1 + w)`` and the weight's products stay fp32, as
autograd keeps them there).

Rows longer than ``MAX_H`` are not handled here (the caller keeps the module's own forward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import INTERPRETED

MAX_H = 8192
"""The widest row one program holds without spilling registers in the backward (sm_90: none at 8192, 72 bytes of
stack at 16384); wider norms (Llama-3-405B's 16384) keep the recomputing lean norm."""
PROGRAMS_PER_SM = 8
"""Backward programs per streaming multiprocessor: each accumulates the weight gradient over its rows."""
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _normed(x, rstd, x_ptr, OFFSET: tl.constexpr):
    """The normalized row as the form uses it: rounded to the input dtype (Llama's), or fp32 (Gemma's)."""
    if OFFSET:
        return x * rstd
    return (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _scale(w_ptr, cols, ok, OFFSET: tl.constexpr):
    """The weight as the form multiplies by it, in fp32: ``w``, or Gemma's ``1 + w``."""
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if OFFSET:
        w = 1.0 + w
    return w


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, H, stride_x, stride_y, eps, OFFSET: tl.constexpr, BLOCK_H: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = _normed(x, rstd, x_ptr, OFFSET)
    w = _scale(w_ptr, cols, ok, OFFSET)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, rows_per_program, H, stride_dy, stride_x, stride_dx,
    WANT_DW: tl.constexpr, OFFSET: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    w = _scale(w_ptr, cols, ok, OFFSET)
    dw = tl.zeros((BLOCK_H,), tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for offset in range(0, rows_per_program):  # the last program's range may run past the rows: masked
        row = first + offset
        live = cols < tl.where(row < n_rows, H, 0)  # the row's columns, none past the last row
        x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))  # a real row's (its products are masked anyway)
        dn = dy * w
        if not OFFSET:  # Llama's: what autograd hands back through the cast to the input dtype
            dn = dn.to(x_ptr.dtype.element_ty).to(tl.float32)
        dot = tl.sum(dn * x, axis=0) / H
        dx = rstd * dn - (rstd * rstd * rstd * dot) * x
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
        if WANT_DW:
            dw += dy * _normed(x, rstd, x_ptr, OFFSET)
    if WANT_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=ok)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether these kernels take ``x`` ``[..., H]`` and ``weight`` ``[H]``: their dtypes, and ``H ≤ MAX_H``."""
    return x.dtype in _DTYPES and weight.dtype in _DTYPES and weight.dim() == 1 and 0 < x.shape[-1] <= MAX_H


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, H]`` with unit column stride (rows may keep any stride: the kernels take it)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _block_h(h: int) -> int:
    return triton.next_power_of_2(h)


def _num_warps(h: int) -> int:
    return 1 if INTERPRETED else min(16, max(4, _block_h(h) // 512))


def forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * normalize(x)`` over the last dimension (``offset``: Gemma's ``(1 + weight)``, see above), and the
    fp32 ``rsqrt(mean(x²) + eps)`` of each row."""
    h = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype if offset else torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)  # fmt: skip
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _forward_kernel[(rows.shape[0],)](
            rows, weight.contiguous(), out, rstd, h, rows.stride(0), out.stride(0), eps, OFFSET=offset,
            BLOCK_H=_block_h(h), num_warps=_num_warps(h),
        )  # fmt: skip
    return out.view(*x.shape[:-1], h), rstd


def backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *, want_weight: bool,
    programs: int | None = None, offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The gradients of ``x`` (its dtype) and, if wanted, of ``weight`` (its dtype) from ``forward``'s ``rstd``
    (``offset``: as given to ``forward``).

    ``programs``: how many programs share the rows (default ``PROGRAMS_PER_SM`` per multiprocessor); each writes
    one fp32 partial row of the weight's gradient.
    """
    h = x.shape[-1]
    rows, dy = _rows(x), _rows(grad)
    n = rows.shape[0]
    dx = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if programs is None:
        programs = PROGRAMS_PER_SM * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda
                                      else 1)  # fmt: skip
    programs = max(1, min(programs, n))
    per_program = triton.cdiv(n, programs) if n else 1
    programs = triton.cdiv(n, per_program) if n else 1
    partial = torch.empty((programs, h) if want_weight else (1,), dtype=torch.float32, device=x.device)
    if n:
        _backward_kernel[(programs,)](
            dy, rows, weight.contiguous(), rstd, dx, partial, n, per_program, h, dy.stride(0), rows.stride(0),
            dx.stride(0), WANT_DW=want_weight, OFFSET=offset, BLOCK_H=_block_h(h), num_warps=_num_warps(h),
        )  # fmt: skip
    grad_weight = None
    if want_weight:
        grad_weight = (partial.sum(0) if n else torch.zeros(h, device=x.device)).to(weight.dtype)
    return dx.view(x.shape), grad_weight
