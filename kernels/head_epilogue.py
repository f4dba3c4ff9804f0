"""Row kernels over a chunk of raw logits that cuBLAS already wrote: the chunked head's epilogue on a GPU.

``impl="torch"`` and ``fused_pair_loss`` on half-precision CUDA inputs multiply each chunk of tokens on the tensor
cores into fp32 logits ``z = h @ W.T`` (``fastdpo.ops.linear_logprobs._HeadGemms``). What follows the product was a
dozen torch element-wise passes over those ``[n, V]`` fp32 values (bias, transform, max, subtract, exp, sum, then
in the backward the softmax, the one-hot, the scale and two casts to the input dtype), each reading and writing the
whole chunk. These two kernels do that work in one read of the chunk each:

- ``row_stats``: per row, one pass with an online max and sum: ``lse``, ``logp`` and the optional statistics
  (entropy, mean logit, first-argmax hit, ``log Σ p²``), as ``fastdpo.kernels.linear_logprobs`` computes them from
  its own tiles;
- ``logits_grad``: ``dz = g·(onehot(y) − softmax(transform(z + b)))·transform'`` written straight in the dtype the
  backward products take (bf16/fp16: the rounding torch's own half-precision backward applies too).

One program owns ``BLOCK_N`` rows and walks the vocabulary in ``BLOCK_V`` tiles; rows are many (a chunk holds up
to a GiB of logits), so no split of the vocabulary is needed to fill the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import INTERPRETED, Transform, _fold_tile, _tanh

BLOCK_N = 1
BLOCK_V = 32 if INTERPRETED else 2048
NUM_WARPS = 8


@triton.jit
def _tile(
    z_ptr, b_ptr, rows, row_ok, offs_v, col_ok, stride_z, scale_over_t, scale_over_cap, cap_over_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Transformed logits of one ``[BLOCK_N, BLOCK_V]`` tile of the chunk, fp32, and the transform's derivative."""
    ok = row_ok[:, None] & col_ok[None, :]
    raw = tl.load(z_ptr + rows[:, None] * stride_z + offs_v[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return _transform(raw, scale_over_t, scale_over_cap, cap_over_t, SOFTCAP)


@triton.jit
def _transform(raw, scale_over_t, scale_over_cap, cap_over_t, SOFTCAP: tl.constexpr):
    """``transform(raw)`` and its derivative, element-wise."""
    if SOFTCAP:
        tanh = _tanh(raw * scale_over_cap)
        return tanh * cap_over_t, scale_over_t * (1.0 - tanh * tanh)
    return raw * scale_over_t, tl.zeros(raw.shape, tl.float32) + scale_over_t


@triton.jit
def _row_stats_kernel(
    z_ptr, b_ptr, tgt_ptr, out_ptr, n_rows, V, stride_z, scale_over_t, scale_over_cap, cap_over_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr, WANT_SQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_ez = tl.zeros((BLOCK_N,), tl.float32)
    run_sq = tl.zeros((BLOCK_N,), tl.float32)
    run_z = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z, _ = _tile(
            z_ptr, b_ptr, rows, row_ok, offs_v, col_ok, stride_z, scale_over_t, scale_over_cap, cap_over_t,
            HAS_BIAS, SOFTCAP,
        )  # fmt: skip
        z_or_inf = tl.where(col_ok[None, :], z, float("-inf"))
        run_max, run_sum, run_ez, run_sq, run_z, best, best_idx = _fold_tile(
            z, z_or_inf, col_ok, v0, run_max, run_sum, run_ez, run_sq, run_z, best, best_idx,
            WANT_ENTROPY, WANT_SQ, WANT_MEAN, WANT_TOP1,
        )  # fmt: skip
    # the target's logit: one more load per row, transformed like the rest
    tgt_raw = tl.load(z_ptr + rows * stride_z + tgt, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        tgt_raw += tl.load(b_ptr + tgt, mask=row_ok, other=0.0).to(tl.float32)
    tgt_z, _ = _transform(tgt_raw, scale_over_t, scale_over_cap, cap_over_t, SOFTCAP)
    log_sum = tl.log(run_sum)
    lse = run_max + log_sum
    tl.store(out_ptr + rows, lse, mask=row_ok)
    tl.store(out_ptr + n_rows + rows, tgt_z - lse, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(out_ptr + 2 * n_rows + rows, lse - run_ez / run_sum, mask=row_ok)
    if WANT_MEAN:
        tl.store(out_ptr + 3 * n_rows + rows, run_z / V, mask=row_ok)
    if WANT_TOP1:
        tl.store(out_ptr + 4 * n_rows + rows, (best_idx == tgt).to(tl.float32), mask=row_ok)
    if WANT_SQ:
        tl.store(out_ptr + 5 * n_rows + rows, tl.log(run_sq) - 2.0 * log_sum, mask=row_ok)


@triton.jit
def _grad_kernel(
    z_ptr, b_ptr, tgt_ptr, lse_ptr, grad_ptr, dz_ptr, n_rows, V, stride_z, stride_dz,
    scale_over_t, scale_over_cap, cap_over_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z, dz_draw = _tile(
            z_ptr, b_ptr, rows, row_ok, offs_v, col_ok, stride_z, scale_over_t, scale_over_cap, cap_over_t,
            HAS_BIAS, SOFTCAP,
        )  # fmt: skip
        p = tl.exp(z - lse[:, None])
        hit = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
        dz = grad[:, None] * (hit - p) * dz_draw
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(dz_ptr + rows[:, None] * stride_dz + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------- launchers


def _checked(z: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """``bias`` and ``targets`` contiguous (the kernels read them so: a strided bias was read wrong, 0.37 off), once
    their shapes are checked against ``z``'s."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"z: expected a [n, V] tensor with contiguous rows, got shape {tuple(z.shape)}")
    if bias is not None and tuple(bias.shape) != (z.shape[1],):
        raise ValueError(f"bias: expected shape ({z.shape[1]},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != (z.shape[0],):
        raise ValueError(f"targets: expected shape ({z.shape[0]},), got {tuple(targets.shape)}")
    return None if bias is None else bias.contiguous(), targets.contiguous()


def row_stats(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: Transform,
    wanted: tuple[bool, bool, bool, bool],
) -> list[torch.Tensor | None]:
    """``[lse, logp, entropy, mean_logit, is_top1, log_sum_sq_probs]`` per row of ``transform(z + bias)``, fp32.

    ``z`` is ``[n, V]`` raw logits (any float dtype, rows contiguous), ``targets`` ``[n]`` in ``[0, V)``;
    ``wanted`` says which of the last four to compute (the others are None).
    """
    bias, targets = _checked(z, bias, targets)
    n, vocab = z.shape
    out = torch.empty(6, n, dtype=torch.float32, device=z.device)
    if n:
        _row_stats_kernel[(triton.cdiv(n, BLOCK_N),)](
            z, z if bias is None else bias, targets, out, n, vocab, z.stride(0), *transform.kernel_args(),
            HAS_BIAS=bias is not None, SOFTCAP=transform.softcap is not None, WANT_ENTROPY=wanted[0],
            WANT_MEAN=wanted[1], WANT_TOP1=wanted[2], WANT_SQ=wanted[3], BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return [out[0], out[1]] + [out[2 + i] if want else None for i, want in enumerate(wanted)]


def logits_grad(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    transform: Transform,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``grad·(onehot(targets) − softmax(transform(z + bias)))·transform'`` as a new ``[n, V]`` tensor of ``dtype``.

    ``lse`` is what ``row_stats`` returned for the same rows; ``grad`` ``[n]`` is dL/dlogp per row (fp32). With
    ``dtype == z.dtype`` the result overwrites ``z`` (each tile is read before it is written) and is ``z``.
    """
    bias, targets = _checked(z, bias, targets)
    n, vocab = z.shape
    dz = z if dtype == z.dtype else torch.empty(n, vocab, dtype=dtype, device=z.device)
    if n:
        _grad_kernel[(triton.cdiv(n, BLOCK_N),)](
            z, z if bias is None else bias, targets, lse.float().contiguous(), grad.float().contiguous(), dz, n,
            vocab, z.stride(0), dz.stride(0), *transform.kernel_args(), HAS_BIAS=bias is not None,
            SOFTCAP=transform.softcap is not None, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dz
