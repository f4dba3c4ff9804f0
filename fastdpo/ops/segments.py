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


def pair_segments(cu_seqlens: Tensor, seq_pair: Tensor, seq_is_chosen: Tensor) -> Tensor:
    """``[P, 2]`` segment index of each pair's (chosen, rejected)."""
    real = seq_pair >= 0
    num_pairs = int(seq_pair.max()) + 1 if bool(real.any()) else 0
    index = torch.full((num_pairs, 2), -1, dtype=torch.long, device=seq_pair.device)
    segments = torch.nonzero(real).squeeze(-1)
    column = (~seq_is_chosen[segments]).long()
    index[seq_pair[segments], column] = segments
    if (num_pairs and bool((index < 0).any())) or segments.numel() != 2 * num_pairs:
        raise ValueError("seq_pair/seq_is_chosen: every pair needs exactly one chosen and one rejected segment")
    return index


def ld_token_weights(targets: Tensor, cu_seqlens: Tensor, pairs: Tensor, ld_alpha: float,
                     dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """``[T]`` LD-DPO token weights (TRL's ``ld_alpha``): in each sequence of a pair, 1 on its first
    ``min(chosen, rejected)`` completion tokens (targets that are not -100; the length both sides share) and
    ``ld_alpha`` on its completion tokens after them; 1 everywhere else (prompts, padding segments). ``dtype``: that
    of the log-probs they weigh (``ld_alpha`` rounded to fp32 would bias fp64 sums). ``pairs``: the ``[P, 2]``
    segment index of each pair's (chosen, rejected), ``pair_segments``."""
    completion = targets != -100
    bounds = cu_seqlens.long()
    running = torch.nn.functional.pad(completion.long().cumsum(0), (1, 0))  # completion tokens before each position
    segment = segment_ids(cu_seqlens, completion.numel())
    position = running[1:] - running[bounds[:-1]][segment]  # 1-based, at the completion tokens
    shared = running[bounds[1:]] - running[bounds[:-1]]  # a segment's own count: no tail
    if len(pairs):
        pair_shared = torch.minimum(shared[pairs[:, 0]], shared[pairs[:, 1]])
        shared = shared.index_put((pairs.reshape(-1),), pair_shared.repeat_interleave(2))
    tail = completion & (position > shared[segment])
    return torch.where(tail, torch.tensor(float(ld_alpha), dtype=dtype, device=tail.device),
                       torch.tensor(1.0, dtype=dtype, device=tail.device))  # fmt: skip


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
