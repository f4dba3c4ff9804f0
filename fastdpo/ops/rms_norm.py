"""``rms_norm``: transformers' Llama-form RMSNorm as one autograd op on the kernels of ``fastdpo.kernels.rms_norm``.

    y = weight * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype)

It keeps its input and one fp32 value per row (the rsqrt) for the backward, where the module's own forward keeps an
fp32 copy of the input, the rsqrt and the normalized rows, and its forward and backward are two kernels that read
each row once instead of about twenty element-wise passes. The results equal the module's up to the order of the
row's sum of squares (fp32) and, in the weight's gradient, the rounding of each product before the sum (autograd
rounds them, the kernel sums in fp32). ``offset=True``: the Gemma-form RMSNorm (Gemma 1–3, Qwen3.5, Qwen3-Next, ...)
``(x.float() * rsqrt(mean(x.float()², -1) + eps) * (1 + weight.float())).to(x.dtype)``, all in fp32 as the module
computes it (see ``fastdpo.kernels.rms_norm``). Triton only: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
(tests); ``fused_norm_applies`` says where ``fastdpo.model.lean`` uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdpo.kernels import triton_available


def _kernels():
    from fastdpo.kernels import rms_norm  # imports triton: only where the kernels run

    return rms_norm


def fused_norm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``rms_norm`` runs on these tensors here: CUDA, Triton installed, dtypes and width the kernels take."""
    if not (x.is_cuda and weight.is_cuda and triton_available()):
        return False
    return _kernels().supports(x, weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, offset: bool = False) -> Tensor:
    """The Llama-form RMSNorm of ``x`` ``[..., H]`` with ``weight`` ``[H]`` (output dtype: the wider of the two), or
    with ``offset`` the Gemma form (output dtype: x's)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _kernels().forward(x, weight, eps, offset=offset)[0]
    return _RMSNorm.apply(x, weight, eps, offset)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        out, rstd = _kernels().forward(x, weight, eps, offset=offset)
        ctx.offset = offset
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _kernels().backward(grad, x, weight, rstd, want_weight=ctx.needs_input_grad[1],
                                                  offset=ctx.offset)  # fmt: skip
        return grad_x if ctx.needs_input_grad[0] else None, grad_weight, None, None
