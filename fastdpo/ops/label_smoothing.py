"""Label smoothing without the logits: each token's ``z_y − mean_v z_v`` from the head's rows.

With ``ε`` the smoothing factor, ``z = s·(hidden @ weight.T + bias)`` the logits (``s`` the head's
``logit_scale``) and ``V`` the vocabulary, transformers' ``LabelSmoother`` computes per target token

    (1 − ε)·(lse − z_y) + ε·(lse − mean_v z_v)  =  −log p_y + ε·(z_y − mean_v z_v)

and ``z_y − mean_v z_v = s·(hidden · (weight[y] − mean_v weight[v]) + bias[y] − mean_v bias[v])`` is linear in
``hidden``, ``weight`` and ``bias``: one row per token and the mean row, no ``[tokens, vocab]`` product. ``−log p_y``
comes from the fused head (``linear_logprobs``) as without smoothing. Its gradient with respect to the logits,
``p − (1 − ε)·onehot(y) − ε/V``, is the label-smoothed cross-entropy's. A tanh soft-cap makes the mean of the
logits non-linear: not supported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdpo.ops.head_checks import check_targets, refuse_second_derivative

TOKENS_PER_CHUNK = 4096
"""Tokens whose gathered ``weight`` rows exist at once (in the forward and again in the backward)."""


def target_logit_gap(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                     logit_scale: float = 1.0, ignore_index: int = -100) -> Tensor:  # fmt: skip
    """``z_y − mean_v z_v`` per token (fp32, or fp64 for fp64 inputs; shaped like ``targets``; 0 where
    ``targets == ignore_index``), with gradients for ``hidden``, ``weight`` and ``bias``.

    Nothing of size ``[tokens, H]`` beyond ``hidden`` is kept for the backward: ``weight[y]`` is gathered
    ``TOKENS_PER_CHUNK`` tokens at a time in both passes. The gradient of ``weight`` is a full ``[V, H]`` tensor
    in ``weight``'s dtype (the mean row touches every row), summed in fp32 in a ``[distinct targets, H]`` buffer.
    """
    lead_shape = targets.shape
    gap = _TargetLogitGap.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                float(logit_scale), ignore_index)  # fmt: skip
    return gap.view(lead_shape)


class _TargetLogitGap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, ignore_index):
        compute = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        valid = targets != ignore_index
        check_targets(targets, valid, weight.shape[0])  # (a negative id read a row from the end)
        safe = torch.where(valid, targets, 0)
        mean_row = _mean_row(weight, compute)
        gap = torch.empty(hidden.shape[0], dtype=compute, device=hidden.device)
        for part in _chunks(hidden.shape[0]):
            gap[part] = (hidden[part].to(compute) * (weight[safe[part]].to(compute) - mean_row)).sum(-1)
        if bias is not None:
            gap += bias.to(compute)[safe] - bias.to(compute).mean()
        ctx.save_for_backward(hidden, weight, safe, valid, mean_row)  # [H]: not a second pass over the weight
        ctx.scale, ctx.bias_dtype, ctx.compute = scale, None if bias is None else bias.dtype, compute
        return torch.where(valid, gap * scale, 0.0)

    @staticmethod
    def backward(ctx, grad):
        refuse_second_derivative("target_logit_gap")
        hidden, weight, safe, valid, mean_row = ctx.saved_tensors
        compute, vocab = ctx.compute, weight.shape[0]
        g = torch.where(valid, grad.to(compute) * ctx.scale, 0.0)  # d gap / d (hidden · row) per token
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            for part in _chunks(hidden.shape[0]):
                grad_hidden[part] = g[part, None] * (weight[safe[part]].to(compute) - mean_row)
        if ctx.needs_input_grad[1]:
            # row v: Σ_{t: y_t = v} g_t·hidden_t − (Σ_t g_t·hidden_t) / V, summed over the distinct targets only
            # (in fp32), every other row holding the second term alone
            rows, slot = torch.unique(safe, return_inverse=True)
            sums = torch.zeros(len(rows), hidden.shape[1], dtype=compute, device=hidden.device)
            for part in _chunks(hidden.shape[0]):
                sums.index_add_(0, slot[part], g[part, None] * hidden[part].to(compute))
            shared = sums.sum(0) / vocab
            grad_weight = (-shared).to(weight.dtype).expand(weight.shape).clone()
            grad_weight[rows] = (sums - shared).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(vocab, dtype=compute, device=g.device).index_add_(0, safe, g)
            grad_bias = (grad_bias - g.sum() / vocab).to(ctx.bias_dtype)  # (its own dtype: an fp32 bias by fp16 rows)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunks(tokens: int):
    return (slice(start, start + TOKENS_PER_CHUNK) for start in range(0, tokens, TOKENS_PER_CHUNK))


def _mean_row(weight: Tensor, compute: torch.dtype) -> Tensor:
    """``weight.mean(0)`` in ``compute``, a block of rows at a time (``mean(0, dtype=)`` casts the whole weight)."""
    total = torch.zeros(weight.shape[1], dtype=compute, device=weight.device)
    for part in _chunks(weight.shape[0]):
        total += weight[part].to(compute).sum(0)
    return total / weight.shape[0]
