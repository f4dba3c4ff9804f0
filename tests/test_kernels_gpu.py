"""The Triton kernels on a CUDA GPU at real shapes, bf16 and fp16, against an fp32 reference.

Skipped without CUDA (and under TRITON_INTERPRET=1). Run on a GPU machine with ``python -m pytest -m gpu``
(``bench/gpu.sh`` does). The reference is impl="torch" on fp32 copies of the same (already rounded) inputs with
TF32 off; the tolerance is derived from the error the plain full-logits path (impl="naive") makes in the same
dtype on the same inputs: ‖triton − ref‖/‖ref‖ ≤ 2 × ‖naive − ref‖/‖ref‖ + 1e-4 (fp32 rounding over long sums).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdpo.ops import OUTPUT_NAMES, linear_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="real kernels, not the interpreter"),
]

SHAPES = [(32768, 4096, 32000), (8191, 2048, 128256), (4097, 4096, 152064), (300, 2048, 50257)]
NAIVE_ROWS = 4096  # the same-dtype error is measured on the first rows: full logits of every row would not fit


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make(n, h, v, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(v, h, generator=gen, device="cuda") * (4.0 / h**0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device="cuda")
    targets[torch.rand(n, generator=gen, device="cuda") < 0.2] = -100
    upstream = torch.randn(n, generator=gen, device="cuda")
    return hidden, weight, targets, upstream


def fwd_bwd(hidden, weight, targets, upstream, **kw):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    out = linear_logprobs(h, w, targets, outputs=OUTPUT_NAMES, **kw)
    (out.logp * upstream).sum().backward()
    return out, h.grad, w.grad


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "h", "v"), SHAPES)
def test_triton_matches_fp32_within_the_same_dtype_error(n, h, v, dtype):
    hidden, weight, targets, upstream = make(n, h, v, dtype, seed=n + v)
    ref, ref_dh, ref_dw = fwd_bwd(hidden.float(), weight.float(), targets, upstream, impl="torch")
    got, dh, dw = fwd_bwd(hidden, weight, targets, upstream, impl="triton")
    assert dh.dtype == dtype and dw.dtype == dtype

    k = min(n, NAIVE_ROWS)
    naive, naive_dh, naive_dw = fwd_bwd(hidden[:k], weight, targets[:k], upstream[:k], impl="naive")
    part_ref, part_dh, part_dw = fwd_bwd(hidden[:k].float(), weight.float(), targets[:k], upstream[:k], impl="torch")
    for name in ("logp", "entropy", "mean_logit", "log_sum_sq_probs"):
        tol = 2 * rel_err(getattr(naive, name), getattr(part_ref, name)) + 1e-4
        assert rel_err(getattr(got, name), getattr(ref, name)) <= tol, name
    assert rel_err(dh, ref_dh) <= 2 * rel_err(naive_dh, part_dh) + 1e-4
    assert rel_err(dw, ref_dw) <= 2 * rel_err(naive_dw, part_dw) + 1e-4
    # top-1 agreement: fp32 sums in another order can flip true near-ties only
    valid = targets != -100
    assert (got.is_top1[valid] == ref.is_top1[valid]).float().mean().item() >= 0.999


def test_no_logits_are_materialized():
    n, h, v = 16384, 4096, 128256
    hidden, weight, targets, upstream = make(n, h, v, torch.bfloat16, seed=1)
    h_in, w_in = hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (linear_logprobs(h_in, w_in, targets, impl="triton").logp * upstream).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # what the op must hold: bf16 grads, their fp32 accumulators (dW V·H·4, dh n·H·4), small per-row vectors
    bound = (v * h + n * h) * (2 + 4) + 64 * 2**20
    logits = n * v * 2
    assert extra <= bound < logits, (extra, bound, logits)


def test_deterministic_mode_is_bitwise_reproducible():
    hidden, weight, targets, upstream = make(4099, 2048, 32000, torch.bfloat16, seed=2)
    first = fwd_bwd(hidden, weight, targets, upstream, impl="triton", deterministic=True)
    second = fwd_bwd(hidden, weight, targets, upstream, impl="triton", deterministic=True)
    atomic = fwd_bwd(hidden, weight, targets, upstream, impl="triton")
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert rel_err(first[1], atomic[1]) < 1e-2 and rel_err(first[2], atomic[2]) < 1e-2  # bf16 rounding of the sums


def test_auto_picks_triton_on_cuda():
    from fastdpo.ops.linear_logprobs import _resolve_impl

    hidden, weight, _, _ = make(8, 64, 100, torch.bfloat16, seed=3)
    assert _resolve_impl("auto", hidden, weight) == "triton"
