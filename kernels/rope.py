"""Rotary position embedding, forward and backward, one read and one write of each head row: the lean layers'
RoPE on a GPU (``fastdpo.ops.rope``).

transformers' Llama-form ``apply_rotary_pos_emb`` (119 model families of transformers 5.24) computes, for a head row
``x = [x1, x2]`` (two halves of ``D/2``) and the token's ``cos = [c1, c2]``, ``sin = [s1, s2]``::

    y = x * cos + rotate_half(x) * sin = [x1·c1 − x2·s1, x2·c2 + x1·s2]

as six element-wise passes over q and k (two products, a negation, a concatenation, a sum), each rounded to the
result's dtype, and its backward as as many again. Here one program per token rotates every head of it:

- forward: ``y1 = r(r(x1·c1) − r(x2·s1))``, ``y2 = r(r(x2·c2) + r(x1·s2))``, ``r`` rounding to the result's dtype
  (that of ``x * cos`` in torch: the wider of x's and cos's), where torch's ops round: bit for bit torch's result.
- backward: from the result's gradient ``g``, ``dx1 = q(q(g1·c1) + q(g2·s2))``, ``dx2 = q(q(g2·c2) − q(g1·s1))``,
  each product rounded to g's dtype and then to x's (``q``), as autograd casts each contribution to x's dtype before
  it sums them: bit for bit autograd's gradient.

Any strides (q and k are transposed views of the projections' outputs); ``cos`` and ``sin`` ``[B or 1, L, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import INTERPRETED

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 256
"""The widest head the kernel takes (as torch's flash attention)."""
TILE = 64 if INTERPRETED else 4096
"""Elements of one half-row tile (heads × D/2) a program holds at once; more heads loop."""
COMPILE_OPTIONS = {"enable_fp_fusion": False}
"""No fused multiply-adds: torch rounds each product before the sum (in fp32 too), so must the kernel."""


@triton.jit
def _rounded(v, ptr):
    """``v`` rounded to the element type of ``ptr``, back in fp32."""
    return v.to(ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, heads, length, sxb, sxh, sxl, sxd, scb, scl, scd, ssb, ssl, ssd, syb, syh, syl,
    syd, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    b, pos = token // length, token % length
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    c = cos_ptr + b * scb + pos * scl
    s = sin_ptr + b * ssb + pos * ssl
    c1 = tl.load(c + d * scd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c + (d + HALF) * scd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s + d * ssd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s + (d + HALF) * ssd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for first in range(0, heads, BLOCK_HEADS):
        h = (first + tl.arange(0, BLOCK_HEADS)).to(tl.int64)
        ok = (h < heads)[:, None] & d_ok[None, :]
        x = x_ptr + b * sxb + pos * sxl + h[:, None] * sxh + d[None, :] * sxd
        x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF * sxd, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:  # x is the result's gradient: each product in its dtype, then in the input's (y's)
            y1 = _rounded(_rounded(x1 * c1, x_ptr), y_ptr) + _rounded(_rounded(x2 * s2, x_ptr), y_ptr)
            y2 = _rounded(_rounded(x2 * c2, x_ptr), y_ptr) - _rounded(_rounded(x1 * s1, x_ptr), y_ptr)
        else:
            y1 = _rounded(x1 * c1, y_ptr) - _rounded(x2 * s1, y_ptr)
            y2 = _rounded(x2 * c2, y_ptr) + _rounded(x1 * s2, y_ptr)
        y = y_ptr + b * syb + pos * syl + h[:, None] * syh + d[None, :] * syd
        tl.store(y, y1.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(y + HALF * syd, y2.to(y_ptr.dtype.element_ty), mask=ok)


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel rotates ``x`` ``[B, H, L, D]`` by ``cos``/``sin`` ``[B or 1, L, D]`` (D even, ≤ ``MAX_D``)."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, length, dim = x.shape
    return (
        x.dtype in DTYPES and cos.dtype in DTYPES and sin.dtype == cos.dtype and dim % 2 == 0 and 0 < dim <= MAX_D
        and cos.shape[1:] == (length, dim) and cos.shape[0] in (1, batch)
    )  # fmt: skip


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, y: torch.Tensor, backward: bool) -> None:
    batch, heads, length, dim = x.shape
    if not x.numel():
        return
    cos, sin = (t.expand(batch, length, dim) for t in (cos, sin))  # a broadcast batch: stride 0
    _rope_kernel[(batch * length,)](
        x, cos, sin, y, heads, length, *x.stride(), *cos.stride(), *sin.stride(), *y.stride(), HALF=dim // 2,
        BLOCK_HEADS=block_heads(heads, dim), BLOCK_D=triton.next_power_of_2(dim // 2), BACKWARD=backward,
        num_warps=num_warps(heads, dim), **COMPILE_OPTIONS,
    )  # fmt: skip


def block_heads(heads: int, dim: int) -> int:
    """Heads one tile of a program holds (``TILE`` elements of half rows)."""
    return min(triton.next_power_of_2(heads), max(1, TILE // triton.next_power_of_2(dim // 2)))


def num_warps(heads: int, dim: int) -> int:
    """Warps per program: eight elements of a tile per thread (16-byte accesses in bf16), one to four warps."""
    elements = block_heads(heads, dim) * triton.next_power_of_2(dim // 2)
    return 1 if INTERPRETED else max(1, min(4, elements // (8 * 32)))


def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (cos and sin broadcast over the heads), in x's layout where x is dense."""
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    _launch(x, cos, sin, y, backward=False)
    return y


def backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """The gradient of ``forward``'s input from its result's ``grad``, written into ``into`` (the input's dtype and
    shape, any layout); returns ``into``."""
    _launch(grad, cos, sin, into, backward=True)
    return into
