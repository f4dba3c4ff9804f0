"""Triton kernels of the fused log-prob op, and their launchers (no autograd here).

What they compute, in torch, for the kept rows ``rows`` (the positions whose target is not ignored)::

    z = transform(hidden[rows] @ weight.T + bias)      # [n, V] fp32, never stored
    lse = z.logsumexp(-1); logp = z.gather(-1, y) - lse
    entropy = lse - (z.softmax(-1) * z).sum(-1); mean_logit = z.mean(-1)
    is_top1 = z.argmax(-1) == y; log_sum_sq_probs = (2 * (z - lse)).logsumexp(-1)
    # backward, given g = dL/dlogp [n]
    dz = g[:, None] * (onehot(y) - z.softmax(-1)) * dtransform
    d_hidden[rows] = dz @ weight; d_weight = dz.T @ hidden[rows]; d_bias = dz.sum(0)

``transform`` is ``z * logit_scale``, then ``softcap * tanh(z / softcap)`` when set, then ``z / temperature``.

Forward: a program owns ``BLOCK_N`` rows and one of ``n_splits`` contiguous ranges of the vocabulary; it walks its
range in ``BLOCK_V`` tiles (``tl.dot`` over H in ``BLOCK_K`` steps, fp32 accumulation) keeping an online max and
sum, and writes partial statistics; a second small kernel folds the splits of each row. Splitting V lets a few
hundred tokens still fill a GPU, and the grouped program order keeps ``GROUP_N`` row tiles and the vocabulary
tiles they share hot in L2.

Backward: each program recomputes one ``BLOCK_N × BLOCK_V`` logit tile from the saved lse and adds its share of
``dz @ W`` and ``dz.T @ h`` into fp32 buffers with atomic adds. Atomics cost one recompute (8·n·H·V FLOPs in
all, with the forward) and give every (row tile, vocab tile) pair its own program, so even small n fills the
device; a split buffer for dW would need V·H·4 bytes per split. The price is run-to-run rounding noise in the
sums, so ``deterministic=True`` runs two passes instead, each program owning its outputs outright (rows of dh in
the first, rows of dW and db in the second): bitwise reproducible, one extra recompute (10·n·H·V FLOPs).
Gradient filtering (``filter_eps``) skips the dh/dW work of a tile whose probabilities are all below the
threshold and that holds no target; the skipped terms are each ``g·p·t'`` with ``p < filter_eps`` and ``t'`` the
transform's derivative (``logit_scale / temperature`` without a softcap).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .configs import TileConfig, forward_splits, pick_config, tune_once

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton reads TRITON_INTERPRET when it decorates the kernels below, i.e. when this module is imported."""

_STATS = 7  # partial statistics per (split, row): max, sum, Σe·z, Σe², Σz, best logit, its index
FORWARD_OUTPUTS = ("lse", "logp", "entropy", "mean_logit", "is_top1", "log_sum_sq_probs")


class Transform(NamedTuple):
    """``logit_scale``, ``softcap`` (None for none) and ``temperature``, applied in that order."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def kernel_args(self) -> tuple[float, float, float]:
        scale, cap, temperature = self
        cap = 1.0 if cap is None else cap
        return scale / temperature, scale / cap, cap / temperature


IDENTITY = Transform()


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    # From exp so that the same code runs on every Triton version and in the interpreter; exact at ±inf.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, col_ok, stride_h, stride_w, H,
    scale_over_t, scale_over_cap, cap_over_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Transformed logits of one tile, fp32 ``[BLOCK_N, BLOCK_V]``, and ``d z / d raw`` (same shape)."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + offs_v[:, None] * stride_w + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + offs_k) < H
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        tanh = _tanh(acc * scale_over_cap)
        z = tanh * cap_over_t
        dz_draw = scale_over_t * (1.0 - tanh * tanh)
    else:
        z = acc * scale_over_t
        dz_draw = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32) + scale_over_t
    return z, dz_draw


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(row tile, column) of a program: GROUP_N consecutive row tiles run across all columns before the next
    group starts, so that the rows and the columns' head tiles in flight stay in L2 together."""
    per_group = GROUP_N * n_cols
    first_tile = (pid // per_group) * GROUP_N
    group_size = tl.minimum(tl.cdiv(n_rows, BLOCK_N) - first_tile, GROUP_N)
    return first_tile + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _row_block(rows_ptr, tgt_ptr, lse_ptr, grad_ptr, offs_n, n_rows, WITH_GRAD: tl.constexpr):
    """Per-row inputs of a block of kept rows: validity, index into hidden, target (and lse and dL/dlogp)."""
    row_ok = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.zeros(offs_n.shape, tl.float32)
    grad = tl.zeros(offs_n.shape, tl.float32)
    if WITH_GRAD:
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
        grad = tl.load(grad_ptr + offs_n, mask=row_ok, other=0.0)
    return row_ok, rows, tgt, lse, grad


@triton.jit
def _fold_tile(
    z, z_or_inf, col_ok, v0, run_max, run_sum, run_ez, run_sq, run_z, best, best_idx,
    WANT_ENTROPY: tl.constexpr, WANT_SQ: tl.constexpr, WANT_MEAN: tl.constexpr, WANT_TOP1: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_N, BLOCK_V]`` tile of transformed logits ``z`` (``z_or_inf``: -inf on padded columns) folded into
    the running statistics of its rows: online max and Σe^(z-max), and optionally Σe·z, Σe², Σz and the first
    argmax. Returns them in the order taken."""
    tile_max = tl.max(z_or_inf, axis=1)
    new_max = tl.maximum(run_max, tile_max)
    # while every logit so far is -inf (a bias of -inf over whole tiles), shift by 0: exp(-inf - -inf) was NaN
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp(run_max - shift)
    e = tl.where(col_ok[None, :], tl.exp(z - shift[:, None]), 0.0)
    run_sum = run_sum * alpha + tl.sum(e, axis=1)
    if WANT_ENTROPY:
        run_ez = run_ez * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), axis=1)  # (a -inf logit: 0, not 0 * -inf)
    if WANT_SQ:
        run_sq = run_sq * alpha * alpha + tl.sum(e * e, axis=1)
    if WANT_MEAN:
        run_z += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    if WANT_TOP1:
        # argmax keeps the first maximum in a tile; the strict > keeps the earliest tile (as torch.argmax)
        tile_idx = tl.argmax(z_or_inf, axis=1) + v0
        better = tile_max > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_max, best)
    return new_max, run_sum, run_ez, run_sq, run_z, best, best_idx


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, part_ptr, tgt_logit_ptr,
    n_rows, H, V, stride_h, stride_w, tiles_per_split, n_splits,
    scale_over_t, scale_over_cap, cap_over_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr, WANT_SQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    row_tile, split = _grouped_tile(tl.program_id(0), n_rows, n_splits, BLOCK_N, GROUP_N)
    offs_n = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, rows, tgt, _no_lse, _no_grad = _row_block(rows_ptr, tgt_ptr, rows_ptr, rows_ptr, offs_n, n_rows, False)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_ez = tl.zeros((BLOCK_N,), tl.float32)
    run_sq = tl.zeros((BLOCK_N,), tl.float32)
    run_z = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    run_target = tl.zeros((BLOCK_N,), tl.float32)

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z, _ = _logit_tile(
            h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v.to(tl.int64), col_ok, stride_h, stride_w, H,
            scale_over_t, scale_over_cap, cap_over_t, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
        )  # fmt: skip
        # z is finite on padded columns (zero weights); they are masked out of every statistic.
        z_or_inf = tl.where(col_ok[None, :], z, float("-inf"))
        # The target logit, picked in-tile; only one split holds it, and it stores it after the loop.
        run_target += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        run_max, run_sum, run_ez, run_sq, run_z, best, best_idx = _fold_tile(
            z, z_or_inf, col_ok, v0, run_max, run_sum, run_ez, run_sq, run_z, best, best_idx,
            WANT_ENTROPY, WANT_SQ, WANT_MEAN, WANT_TOP1,
        )  # fmt: skip

    tl.store(tgt_logit_ptr + offs_n, run_target, mask=row_ok & (tgt >= v_begin) & (tgt < v_end))
    out = part_ptr + split * n_rows + offs_n
    plane = n_splits * n_rows
    tl.store(out, run_max, mask=row_ok)
    tl.store(out + plane, run_sum, mask=row_ok)
    tl.store(out + 2 * plane, run_ez, mask=row_ok)
    tl.store(out + 3 * plane, run_sq, mask=row_ok)
    tl.store(out + 4 * plane, run_z, mask=row_ok)
    tl.store(out + 5 * plane, best, mask=row_ok)
    tl.store(out + 6 * plane, best_idx.to(tl.float32), mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, tgt_logit_ptr, tgt_ptr, out_ptr, n_rows, n_splits, V, BLOCK: tl.constexpr):
    """Fold the splits of each row: lse, logp and the optional statistics, one row per lane."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_rows
    plane = n_splits * n_rows
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    total_ez = tl.zeros((BLOCK,), tl.float32)
    total_sq = tl.zeros((BLOCK,), tl.float32)
    total_z = tl.zeros((BLOCK,), tl.float32)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.float32)
    for split in range(0, n_splits):
        part = part_ptr + split * n_rows + offs
        m = tl.load(part, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, m)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # (a split all -inf so far: as _fold_tile)
        alpha = tl.exp(run_max - shift)
        w = tl.exp(m - shift)
        # padded lanes read sums of 1, so that they stay finite (they are never stored)
        total = total * alpha + w * tl.load(part + plane, mask=ok, other=1.0)
        total_ez = total_ez * alpha + w * tl.load(part + 2 * plane, mask=ok, other=0.0)
        total_sq = total_sq * alpha * alpha + w * w * tl.load(part + 3 * plane, mask=ok, other=1.0)
        total_z += tl.load(part + 4 * plane, mask=ok, other=0.0)
        value = tl.load(part + 5 * plane, mask=ok, other=0.0)
        better = value > best  # splits are in vocabulary order: strict > keeps the first maximum
        best_idx = tl.where(better, tl.load(part + 6 * plane, mask=ok, other=0.0), best_idx)
        best = tl.where(better, value, best)
        run_max = new_max
    log_total = tl.log(total)
    lse = run_max + log_total
    tgt = tl.load(tgt_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, lse, mask=ok)
    tl.store(out_ptr + n_rows + offs, tl.load(tgt_logit_ptr + offs, mask=ok, other=0.0) - lse, mask=ok)
    # Σ p z = Σ e^(z-M) z / Σ e^(z-M);  log Σ p² = log Σ e^(2(z-M)) - 2 log Σ e^(z-M)
    tl.store(out_ptr + 2 * n_rows + offs, lse - total_ez / total, mask=ok)
    tl.store(out_ptr + 3 * n_rows + offs, total_z / V, mask=ok)
    tl.store(out_ptr + 4 * n_rows + offs, (best_idx == tgt.to(tl.float32)).to(tl.float32), mask=ok)
    tl.store(out_ptr + 5 * n_rows + offs, tl.log(total_sq) - 2.0 * log_total, mask=ok)


@triton.jit
def _grad_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, lse, grad, offs_v, col_ok, stride_h, stride_w, H,
    scale_over_t, scale_over_cap, cap_over_t, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``dz = g (onehot(y) - p) dtransform`` for one tile (fp32, 0 outside), and whether the tile may be skipped."""
    z, dz_draw = _logit_tile(
        h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, col_ok, stride_h, stride_w, H,
        scale_over_t, scale_over_cap, cap_over_t, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    inside = row_ok[:, None] & col_ok[None, :]
    probs = tl.where(inside, tl.exp(z - lse[:, None]), 0.0)
    hit = (offs_v[None, :] == tgt[:, None]) & inside
    dz = grad[:, None] * (hit.to(tl.float32) - probs) * dz_draw
    skip = False
    if FILTER:
        skip = (tl.max(tl.max(probs, 1), 0) < filter_eps) & (tl.max(tl.max(hit.to(tl.int32), 1), 0) == 0)
    return dz, skip


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr, db_ptr,
    n_rows, H, V, stride_h, stride_w, scale_over_t, scale_over_cap, cap_over_t, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (row tile, vocab tile) per program; dh, dW, db accumulated with fp32 atomic adds."""
    row_tile, v_tile = _grouped_tile(tl.program_id(0), n_rows, tl.cdiv(V, BLOCK_V), BLOCK_N, GROUP_N)
    offs_n = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, rows, tgt, lse, grad = _row_block(rows_ptr, tgt_ptr, lse_ptr, grad_ptr, offs_n, n_rows, True)
    offs_v = (v_tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = offs_v < V
    dz, skip = _grad_tile(
        h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, lse, grad, offs_v, col_ok, stride_h, stride_w, H,
        scale_over_t, scale_over_cap, cap_over_t, filter_eps,
        HAS_BIAS, SOFTCAP, FILTER, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    if not skip:
        # The products run in the input dtype (tensor cores), as torch's own bf16/fp16 backward does.
        dz_in = dz.to(h_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + offs_k) < H
            if NEED_DH:
                w = tl.load(w_ptr + offs_v[:, None] * stride_w + (k0 + offs_k)[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                dh_part = tl.dot(dz_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + offs_n[:, None].to(tl.int64) * H + (k0 + offs_k)[None, :], dh_part,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")  # fmt: skip
            if NEED_DW:
                h = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + offs_k)[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                dw_part = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + offs_v[:, None] * H + (k0 + offs_k)[None, :], dw_part,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")  # fmt: skip
        if NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _backward_rows_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, grad_ptr, dh_ptr,
    n_rows, H, V, stride_h, stride_w, scale_over_t, scale_over_cap, cap_over_t, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Deterministic pass 1: a program owns BLOCK_N rows of dh and walks the whole vocabulary in order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, rows, tgt, lse, grad = _row_block(rows_ptr, tgt_ptr, lse_ptr, grad_ptr, offs_n, n_rows, True)
    offs_k = tl.arange(0, BLOCK_K)
    for v0 in range(0, V, BLOCK_V):
        # the last step's dh stores, by other threads than the loads below read them (two layouts): made visible
        # here, where it held only by the barriers the compiler puts around the shared memory of the products
        tl.debug_barrier()
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = offs_v < V
        dz, skip = _grad_tile(
            h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, lse, grad, offs_v, col_ok, stride_h, stride_w, H,
            scale_over_t, scale_over_cap, cap_over_t, filter_eps,
            HAS_BIAS, SOFTCAP, FILTER, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
        )  # fmt: skip
        if not skip:
            dz_in = dz.to(h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                k_ok = (k0 + offs_k) < H
                mask = row_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptr + offs_v[:, None] * stride_w + (k0 + offs_k)[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                out = dh_ptr + offs_n[:, None].to(tl.int64) * H + (k0 + offs_k)[None, :]
                acc = tl.load(out, mask=mask, other=0.0)
                tl.store(out, tl.dot(dz_in, w, acc, input_precision=DOT_PRECISION), mask=mask)


@triton.jit
def _backward_vocab_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, grad_ptr, dw_ptr, db_ptr,
    n_rows, H, V, stride_h, stride_w, scale_over_t, scale_over_cap, cap_over_t, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Deterministic pass 2: a program owns BLOCK_V rows of dW (and db) and walks the tokens in order."""
    offs_v = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = offs_v < V
    offs_k = tl.arange(0, BLOCK_K)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        tl.debug_barrier()  # (the last step's dW stores visible to this step's loads: as in _backward_rows_kernel)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok, rows, tgt, lse, grad = _row_block(rows_ptr, tgt_ptr, lse_ptr, grad_ptr, offs_n, n_rows, True)
        dz, skip = _grad_tile(
            h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, lse, grad, offs_v, col_ok, stride_h, stride_w, H,
            scale_over_t, scale_over_cap, cap_over_t, filter_eps,
            HAS_BIAS, SOFTCAP, FILTER, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION,
        )  # fmt: skip
        if not skip:
            if NEED_DB:
                db += tl.sum(dz, axis=0)
            if NEED_DW:
                dz_in = dz.to(h_ptr.dtype.element_ty)
                for k0 in range(0, H, BLOCK_K):
                    k_ok = (k0 + offs_k) < H
                    h = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + offs_k)[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                    out = dw_ptr + offs_v[:, None] * H + (k0 + offs_k)[None, :]
                    mask = col_ok[:, None] & k_ok[None, :]
                    acc = tl.load(out, mask=mask, other=0.0)
                    tl.store(out, tl.dot(tl.trans(dz_in), h, acc, input_precision=DOT_PRECISION), mask=mask)
    if NEED_DB:
        tl.store(db_ptr + offs_v, db, mask=col_ok)


# -------------------------------------------------------------------------------------------------- launchers


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"fastdpo.kernels: hidden and weight must share one of fp16, bf16, fp32; got {hidden.dtype} "
            f"and {weight.dtype}"
        )
    if INTERPRETED and hidden.dtype == torch.bfloat16:
        raise ValueError(
            "fastdpo.kernels: bf16 under TRITON_INTERPRET=1 is refused: the interpreter's bf16 tl.dot returns "
            "wrong values silently; use fp16 or fp32 inputs to test on CPU"
        )
    want_cuda = not INTERPRETED
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.is_cuda != want_cuda:
            where = "CUDA tensors" if want_cuda else "CPU tensors (TRITON_INTERPRET=1 is set)"
            raise ValueError(f"fastdpo.kernels: {name} is on {t.device}; the Triton kernels here need {where}")
    if weight.shape[0] >= 2**24:
        raise ValueError(f"fastdpo.kernels: a vocabulary of {weight.shape[0]} exceeds the 2**24 the kernels index")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own switch for fp32 matmuls: TF32 only where the user allowed it.
    if dtype == torch.float32 and not INTERPRETED and tf32_allowed():
        return "tf32"
    return "ieee"


def tf32_allowed() -> bool:
    """Whether torch's fp32 matmuls may use TF32: the newer ``fp32_precision`` setting where it was set (torch >=
    2.9; ``TrainingArguments(tf32=True)`` sets it there, and reading ``allow_tf32`` after that raises a
    RuntimeError), else ``allow_tf32`` (``torch.set_float32_matmul_precision`` sets both)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":  # (it follows torch.backends.fp32_precision where only that was set)
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # (the two settings mixed: the newer one, unset, leaves TF32 off)
        return False


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    transform: Transform = IDENTITY,
    wanted: tuple[bool, bool, bool, bool] = (False, False, False, False),
    config: TileConfig | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """The fused forward over the kept rows.

    Args:
        hidden: ``[N, H]`` (any row stride), weight ``[V, H]``, bias ``[V]`` or None: one dtype.
        rows: ``[n]`` int, indices into ``hidden`` of the rows to compute (all others cost nothing).
        targets: ``[n]`` int, the target of each kept row, in ``[0, V)``.
        wanted: whether to compute entropy, mean logit, top-1 hit, log Σp² (the cost of each is a few
            vector ops per tile).
        config, n_splits: override the tile table and the vocabulary split (tests, the tuner).

    Returns:
        ``[6, n]`` fp32: lse, logp, entropy, mean_logit, is_top1, log_sum_sq_probs (rows of unwanted ones hold
        unspecified values).
    """
    _check_inputs(hidden, weight, bias)
    hidden, weight = _last_dim_contiguous(hidden), _last_dim_contiguous(weight)
    bias = None if bias is None else bias.contiguous()  # (read as contiguous: a strided one was read wrong)
    n, (vocab, size) = rows.numel(), weight.shape
    out = torch.empty(len(FORWARD_OUTPUTS), n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    if config is None and os.environ.get("FASTDPO_TUNE") == "1" and not INTERPRETED:
        tune_once(hidden, weight, rows, targets)
    cfg = config or pick_config(hidden.dtype, size, interpreted=INTERPRETED)
    vtiles = triton.cdiv(vocab, cfg.block_v)
    row_tiles = triton.cdiv(n, cfg.block_n)
    splits = n_splits or forward_splits(row_tiles, vtiles, hidden.device, interpreted=INTERPRETED)
    tiles_per_split = triton.cdiv(vtiles, max(1, min(splits, vtiles)))
    splits = triton.cdiv(vtiles, tiles_per_split)  # no empty split
    partials = torch.empty(_STATS, splits, n, dtype=torch.float32, device=hidden.device)
    target_logit = torch.full((n,), float("nan"), device=hidden.device)  # a target outside [0, V) stays NaN
    rows, targets = rows.contiguous(), targets.contiguous()
    want_entropy, want_mean, want_top1, want_sq = wanted
    _forward_kernel[(row_tiles * splits,)](
        hidden, weight, bias if bias is not None else weight, rows, targets, partials, target_logit,
        n, size, vocab, hidden.stride(0), weight.stride(0), tiles_per_split, splits, *transform.kernel_args(),
        HAS_BIAS=bias is not None, SOFTCAP=transform.softcap is not None, WANT_ENTROPY=want_entropy,
        WANT_MEAN=want_mean, WANT_TOP1=want_top1, WANT_SQ=want_sq,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
        DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    block = 128 if not INTERPRETED else 32
    _combine_kernel[(triton.cdiv(n, block),)](partials, target_logit, targets, out, n, splits, vocab, BLOCK=block)
    return out


class Gradients(NamedTuple):
    """fp32 gradients: ``hidden`` for the kept rows ``[n, H]`` (in ``rows`` order), ``weight`` ``[V, H]``, ``bias``."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    transform: Transform = IDENTITY,
    need: tuple[bool, bool, bool] = (True, True, False),
    deterministic: bool = False,
    filter_eps: float | None = None,
    config: TileConfig | None = None,
) -> Gradients:
    """Gradients of ``Σ grad · logp`` with respect to the kept hidden rows, the weight and the bias.

    ``lse`` is the forward's; ``grad`` ``[n]`` is dL/dlogp per kept row. ``need`` says which of
    (hidden, weight, bias) to compute. ``filter_eps`` (None: exact) skips tiles whose probabilities are all
    below it and that hold no target. ``deterministic`` runs the two-pass kernels (bitwise reproducible).
    """
    _check_inputs(hidden, weight, bias)
    hidden, weight = _last_dim_contiguous(hidden), _last_dim_contiguous(weight)
    bias = None if bias is None else bias.contiguous()  # (read as contiguous: a strided one was read wrong)
    n, (vocab, size) = rows.numel(), weight.shape
    need_dh, need_dw, need_db = need[0], need[1], need[2] and bias is not None
    device = hidden.device
    dh = torch.zeros(n, size, dtype=torch.float32, device=device) if need_dh else None
    dw = torch.zeros(vocab, size, dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if need_db else None
    if n == 0 or not (need_dh or need_dw or need_db):
        return Gradients(dh, dw, db)
    if filter_eps is not None and not 0.0 <= filter_eps < 1.0:
        raise ValueError(f"filter_eps: must be in [0, 1) or None, got {filter_eps}")
    cfg = config or pick_config(hidden.dtype, size, interpreted=INTERPRETED, backward=True)
    rows, targets = rows.contiguous(), targets.contiguous()
    lse, grad = lse.float().contiguous(), grad.float().contiguous()
    dummy = lse  # a valid pointer for outputs that are not computed
    common = (
        hidden, weight, bias if bias is not None else weight, rows, targets, lse, grad,
    )  # fmt: skip
    scalars = (n, size, vocab, hidden.stride(0), weight.stride(0), *transform.kernel_args(), filter_eps or 0.0)
    meta = dict(
        HAS_BIAS=bias is not None, SOFTCAP=transform.softcap is not None, FILTER=filter_eps is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, DOT_PRECISION=_dot_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    row_tiles, vtiles = triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v)
    if not deterministic:
        _backward_kernel[(row_tiles * vtiles,)](
            *common, dh if need_dh else dummy, dw if need_dw else dummy, db if need_db else dummy, *scalars,
            NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, GROUP_N=cfg.group_n, **meta,
        )  # fmt: skip
        return Gradients(dh, dw, db)
    if need_dh:
        _backward_rows_kernel[(row_tiles,)](*common, dh, *scalars, **meta)
    if need_dw or need_db:
        _backward_vocab_kernel[(vtiles,)](
            *common, dw if need_dw else dummy, db if need_db else dummy, *scalars,
            NEED_DW=need_dw, NEED_DB=need_db, **meta,
        )  # fmt: skip
    return Gradients(dh, dw, db)
