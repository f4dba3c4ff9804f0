"""Per-sequence sums and means of per-token values over packed sequences.

A packed batch flattens S sequences into one token axis; ``cu_seqlens [S+1]`` holds the boundaries
(sequence ``s`` is ``values[cu_seqlens[s]:cu_seqlens[s+1]]``). In plain torch::

    segment_sum(values, cu_seqlens)[s] == values[cu_seqlens[s]:cu_seqlens[s + 1]].sum()
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """``[T]``: the sequence each token belongs to (checks that ``cu_seqlens`` covers exactly ``num_tokens``)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected a 1-D tensor [S+1] of sequence boundaries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected int32 or int64, got {cu_seqlens.dtype}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens: must start at 0, never decrease and end at the number of tokens ({num_tokens}); "
            f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}"
        )
    segments = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(segments, lengths.long(), output_size=num_tokens)


def segment_sum(values: Tensor, cu_seqlens: Tensor, weights: Tensor | None = None) -> Tensor:
    """``[S]`` sums of ``values * weights`` per sequence; empty sequences give 0.

    Args:
        values: ``[T]`` per-token values (fp32 or wider; summed in at least fp32).
        cu_seqlens: ``[S+1]`` int32/int64 boundaries, ``cu_seqlens[-1] == T``.
        weights: optional ``[T]`` per-token weights (e.g. a completion mask).

    Differentiable with respect to ``values`` and ``weights``.
    """
    if values.dim() != 1:
        raise ValueError(f"values: expected a 1-D tensor [T], got shape {tuple(values.shape)}")
    if weights is not None and weights.shape != values.shape:
        raise ValueError(f"weights: shape {tuple(weights.shape)} does not match values {tuple(values.shape)}")
    ids = segment_ids(cu_seqlens, values.numel())
    dtype = torch.promote_types(values.dtype, torch.float32)
    terms = values.to(dtype) if weights is None else values.to(dtype) * weights.to(dtype)
    out = torch.zeros(cu_seqlens.numel() - 1, dtype=dtype, device=values.device)
    return out.index_add(0, ids, terms)


def segment_mean(values: Tensor, cu_seqlens: Tensor, weights: Tensor | None = None) -> Tensor:
    """``[S]`` means of ``values`` per sequence, weighted by ``weights`` when given: ``Σ w·v / Σ w``.

    With a 0/1 mask as ``weights`` this is the mean over the masked-in tokens. Sequences with no tokens
    (or zero total weight) give 0.
    """
    totals = segment_sum(values, cu_seqlens, weights)
    if weights is None:
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(totals.dtype)
    else:
        counts = segment_sum(weights.to(totals.dtype), cu_seqlens)
    return torch.where(counts != 0, totals / torch.where(counts != 0, counts, 1), torch.zeros_like(totals))
