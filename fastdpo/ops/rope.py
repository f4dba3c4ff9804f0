"""``apply_rope``: transformers' Llama-form ``apply_rotary_pos_emb`` as one autograd op on ``fastdpo.kernels.rope``.

    q_embed = q * cos + rotate_half(q) * sin;  k_embed likewise   (cos, sin broadcast over the heads)

Bit for bit torch's results and gradients (``fastdpo.kernels.rope``), in two kernels per call where torch runs a
dozen element-wise passes over q and k; it keeps cos and sin for the backward, as torch's ops do. Triton only:
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests); ``fused_rope_applies`` says where
``fastdpo.model.lean`` uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdpo.kernels import triton_available


def _kernels():
    from fastdpo.kernels import rope  # imports triton: only where the kernels run

    return rope


def fused_rope_applies(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether ``apply_rope`` computes ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` here: CUDA tensors,
    Triton installed, ``[B, H, L, D]`` heads with ``[B or 1, L, D]`` cos and sin broadcast over the heads
    (``unsqueeze_dim=1``), dtypes the kernel takes, and no gradient wanted for cos or sin."""
    if unsqueeze_dim != 1 or not all(isinstance(t, Tensor) and t.is_cuda for t in (q, k, cos, sin)):
        return False
    grad_for_tables = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if not triton_available() or q.dtype != k.dtype or grad_for_tables:
        return False
    kernels = _kernels()
    return kernels.supports(q, cos, sin) and kernels.supports(k, cos, sin)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q and k rotated by cos and sin (see the module docstring); q ``[B, Hq, L, D]``, k ``[B, Hk, L, D]``."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, k, cos, sin)
    kernels = _kernels()
    return kernels.forward(q, cos, sin), kernels.forward(k, cos, sin)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        kernels = _kernels()
        q_embed, k_embed = kernels.forward(q, cos, sin), kernels.forward(k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.mark_non_differentiable(*(out for t, out in ((q, q_embed), (k, k_embed)) if not t.requires_grad))
        ctx.layouts = [(t.shape, out.stride(), t.dtype) for t, out in ((q, q_embed), (k, k_embed))]
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        kernels = _kernels()
        cos, sin = ctx.saved_tensors
        grads = []
        wanted = zip((grad_q, grad_k), ctx.needs_input_grad[:2], ctx.layouts, strict=True)
        for grad, need, (shape, stride, dtype) in wanted:  # grads of unused results arrive as zeros
            if not need:
                grads.append(None)
                continue
            # in the layout the input had (the projection's output): its view's backward is then free
            into = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
            grads.append(kernels.backward(grad, cos, sin, into))
        return grads[0], grads[1], None, None
