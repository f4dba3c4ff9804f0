"""The Triton kernels on a CUDA GPU at real shapes, bf16 and fp16, against an fp32 reference.

Skipped without CUDA (and under TRITON_INTERPRET=1). Run on a GPU machine with ``python -m pytest -m gpu``
(``bench/gpu.sh`` does). The reference is impl="torch" on fp32 copies of the same (already rounded) inputs with
TF32 off. Forward outputs: both accumulate exact products in fp32, so they may differ by summation order only
(an absolute bound, see the test). Gradients: the kernels round dz to the input dtype as torch's own backward
does, so the tolerance is derived from the error the plain full-logits path (impl="naive") makes in the same
dtype on the same inputs: ‖triton − ref‖/‖ref‖ ≤ 2 × ‖naive − ref‖/‖ref‖ + 1e-4.
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


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "h", "v"), SHAPES)
def test_triton_matches_fp32_within_the_same_dtype_error(n, h, v, dtype, impl):
    # impl="torch" on half inputs on a GPU multiplies on the tensor cores with fp32 results (_HeadGemms): the same
    # arithmetic as the kernels, so the same bounds hold
    hidden, weight, targets, upstream = make(n, h, v, dtype, seed=n + v)
    ref, ref_dh, ref_dw = fwd_bwd(hidden.float(), weight.float(), targets, upstream, impl="torch")
    got, dh, dw = fwd_bwd(hidden, weight, targets, upstream, impl=impl)
    assert dh.dtype == dtype and dw.dtype == dtype

    k = min(n, NAIVE_ROWS)
    # the gradients' tolerance: the plain same-dtype path's error, measured on the first rows (memory)
    _, naive_dh, naive_dw = fwd_bwd(hidden[:k], weight, targets[:k], upstream[:k], impl="naive")
    _, part_dh, part_dw = fwd_bwd(hidden[:k].float(), weight.float(), targets[:k], upstream[:k], impl="torch")
    for name in ("logp", "entropy", "mean_logit", "log_sum_sq_probs"):
        # Triton and the reference start from the same rounded inputs (bf16/fp16 products are exact in fp32) and
        # both accumulate in fp32, so they differ by summation order only: ~1e-6 of values of size ~10. A vocabulary
        # tile left out of the lse moves logp by ~(128 / V) ≈ 1e-3: the bound must stay well under that.
        err = (getattr(got, name).double() - getattr(ref, name).double()).abs().max().item()
        assert err <= 1e-4 * (1 + getattr(ref, name).abs().max().item()), (name, err)
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


def test_deterministic_mode_is_bitwise_reproducible_and_as_accurate():
    hidden, weight, targets, upstream = make(4099, 2048, 32000, torch.bfloat16, seed=2)
    first = fwd_bwd(hidden, weight, targets, upstream, impl="triton", deterministic=True)
    second = fwd_bwd(hidden, weight, targets, upstream, impl="triton", deterministic=True)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    _, ref_dh, ref_dw = fwd_bwd(hidden.float(), weight.float(), targets, upstream, impl="torch")
    _, naive_dh, naive_dw = fwd_bwd(hidden, weight, targets, upstream, impl="naive")
    # the same rule as the atomic path: within 2x the plain bf16 path's error of the fp32 reference
    assert rel_err(first[1], ref_dh) <= 2 * rel_err(naive_dh, ref_dh) + 1e-4
    assert rel_err(first[2], ref_dw) <= 2 * rel_err(naive_dw, ref_dw) + 1e-4


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradient_filtering_stays_within_its_bound(deterministic):
    # Peaked logits (logit std 12) so that many tiles hold only tiny probabilities and are skipped. Each skipped
    # term is g·p with p < eps (no transform here), so |Δdh[n]| <= |g_n| Σ_{v: p<eps} p_nv |W_v| and
    # |ΔdW[v]| <= Σ_{n: p<eps} |g_n| p_nv |h_n|, elementwise. Rounding on top: the unfiltered path rounds each
    # skipped dz term to bf16 before its product (up to 2^-8 of the bound), and each output is rounded to bf16 once
    # (2^-8 of |filtered| and of |full|). Seen on an H200: one dW entry of 32.8M, where the full value cancels to
    # ~1e-6, went 0.8% over the bound without those terms.
    n, h, v, eps = 2048, 1024, 32000, 2.0**-12
    hidden, weight, targets, upstream = make(n, h, v, torch.bfloat16, seed=5)
    weight = weight * 3
    kw = {"impl": "triton", "deterministic": deterministic}
    _, dh, dw = fwd_bwd(hidden, weight, targets, upstream, **kw)
    _, fdh, fdw = fwd_bwd(hidden, weight, targets, upstream, grad_filter_eps=eps, **kw)
    with torch.no_grad():
        probs = torch.softmax(hidden.float() @ weight.float().T, dim=-1)
        valid = (targets != -100).float()[:, None]
        small = torch.where(probs < eps, probs, 0.0) * (upstream.abs()[:, None] * valid)
        bound_dh = small @ weight.float().abs()
        bound_dw = small.T @ hidden.float().abs()
    for name, got, full, bound in (("dh", fdh, dh, bound_dh), ("dw", fdw, dw, bound_dw)):
        slack = 2.0**-8 * (bound + got.float().abs() + full.float().abs())
        excess = (got.float() - full.float()).abs() - (bound + slack + 1e-6)
        worst = divmod(int(excess.argmax()), excess.shape[1])
        detail = (f"{name}: {int((excess > 0).sum())} of {excess.numel()} over the bound; worst at {worst}: "
                  f"filtered {got[worst].item():.4e}, full {full[worst].item():.4e}, bound {bound[worst].item():.4e}, "
                  f"slack {slack[worst].item():.4e}; largest p in its {'row' if name == 'dh' else 'column'}: "
                  f"{(probs[worst[0]] if name == 'dh' else probs[:, worst[0]]).max().item():.4e}, "
                  f"eps {eps:.4e}")  # fmt: skip
        assert (excess <= 0).all(), detail
    assert not torch.equal(fdw, dw), "nothing was skipped: the case does not exercise filtering"


def test_auto_picks_the_cublas_path_with_epilogue_kernels_for_half_inputs_on_cuda():
    from fastdpo.ops.linear_logprobs import _HeadGemms, _resolve_impl

    hidden, weight, _, _ = make(8, 64, 100, torch.bfloat16, seed=3)
    assert _resolve_impl("auto", hidden, weight) == "torch"
    gemms = _HeadGemms(hidden, weight, None, torch.float32)
    assert gemms.half and gemms.epilogue is not None  # the fast branch, not fp32 products
    assert _resolve_impl("auto", hidden.float(), weight.float()) == "triton"  # fp32: the fused kernels (tf32)
    assert _resolve_impl("auto", hidden, weight.float()) == "triton"  # mixed (autocast with fp32 weights)


def test_fused_pair_loss_in_bf16_matches_fp32_within_the_same_dtype_error():
    # the default DPO head on a GPU: half inputs multiply on the tensor cores (_HeadGemms). Yardstick: the plain
    # bf16 path (full bf16 logits, as a bf16 nn.Linear head computes them) against the same fp32 reference
    from fastdpo.ops import LossConfig
    from fastdpo.ops.fused_pair_loss import fused_pair_loss

    n, h, v, seq = 8192, 2048, 128256, 256
    hidden, weight, targets, _ = make(n, h, v, torch.bfloat16, seed=7)
    rows = n // seq  # [chosen rows; rejected rows]
    cu_seqlens = torch.arange(0, n + 1, seq, dtype=torch.int32, device="cuda")
    seq_pair = torch.arange(rows, device="cuda") % (rows // 2)
    seq_is_chosen = torch.arange(rows, device="cuda") < rows // 2
    ref = torch.randn(rows // 2, 2, device="cuda") * 10 - 1500
    config = LossConfig(loss_type="sigmoid", beta=0.1)

    def run(hid, w, plain=False):
        hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
        if plain:
            logp = linear_logprobs(hid, w, targets, impl="naive").logp
            sums = torch.zeros(rows, device="cuda").index_add_(0, torch.arange(n, device="cuda") // seq, logp)
            margin = (sums[: rows // 2] - ref[:, 0]) - (sums[rows // 2 :] - ref[:, 1])
            loss = -torch.nn.functional.logsigmoid(config.beta * margin).mean()
        else:
            loss = fused_pair_loss(hid, w, targets, cu_seqlens, seq_pair, seq_is_chosen, config,
                                   ref_chosen=ref[:, 0], ref_rejected=ref[:, 1]).loss  # fmt: skip
        loss.backward()
        return loss.detach(), hid.grad, w.grad

    loss32, dh32, dw32 = run(hidden.float(), weight.float())
    loss16, dh16, dw16 = run(hidden, weight)
    plain, plain_dh, plain_dw = run(hidden, weight, plain=True)
    assert dh16.dtype == torch.bfloat16 and dw16.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) <= 2 * abs(plain.item() - loss32.item()) + 1e-5
    assert rel_err(dh16, dh32) <= 2 * rel_err(plain_dh, dh32) + 1e-4
    assert rel_err(dw16, dw32) <= 2 * rel_err(plain_dw, dw32) + 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_fp32_inputs_on_the_half_branch(dtype):
    # bf16=True on a model loaded in fp32: the head's inputs are fp32 under autocast. They must multiply in the
    # autocast dtype (the cuBLAS half branch, as an autocast nn.Linear would), giving bit for bit what inputs rounded
    # to that dtype give without autocast, gradients in fp32. Before autocast_head_inputs, two of the fused head's
    # three products ran in fp32 there.
    from fastdpo.ops import LossConfig
    from fastdpo.ops.fused_pair_loss import fused_pair_loss
    from fastdpo.ops.linear_logprobs import _resolve_impl, autocast_head_inputs

    n, h, v, seq = 4096, 2048, 128256, 256
    hidden, weight, targets, upstream = make(n, h, v, dtype, seed=9)
    rows = n // seq
    cu_seqlens = torch.arange(0, n + 1, seq, dtype=torch.int32, device="cuda")
    seq_pair, seq_is_chosen = torch.arange(rows, device="cuda") % (rows // 2), torch.arange(rows, device="cuda") < 8
    ref = torch.randn(rows // 2, 2, device="cuda") * 10 - 1500
    config = LossConfig(loss_type="sigmoid", beta=0.1)

    def run(op, hid, w):
        hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
        if op == "fused":
            loss = fused_pair_loss(hid, w, targets, cu_seqlens, seq_pair, seq_is_chosen, config,
                                   ref_chosen=ref[:, 0], ref_rejected=ref[:, 1]).loss  # fmt: skip
        else:
            loss = (linear_logprobs(hid, w, targets).logp * upstream).sum()
        return loss, hid, w

    for op in ("fused", "linear_logprobs"):
        with torch.autocast("cuda", dtype=dtype):
            assert _resolve_impl("auto", *autocast_head_inputs(hidden.float(), weight.float(), None)[:2]) == "torch"
            loss, h32, w32 = run(op, hidden.float(), weight.float())
        loss.backward()
        expected, h16, w16 = run(op, hidden, weight)
        expected.backward()
        assert h32.grad.dtype == w32.grad.dtype == torch.float32
        assert torch.equal(loss, expected), op
        assert torch.equal(h32.grad, h16.grad.float()) and torch.equal(w32.grad, w16.grad.float()), op


@pytest.mark.parametrize(("rows", "width"), [(59392, 2048), (16385, 4096), (4097 * 32, 128)])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_rms_norm_kernels_match_transformers_in_bf16(rows, width, weight_dtype, form):
    # the lean norms' kernels at Llama-3.2-1B's and Llama-3-8B's widths and on Qwen3's per-head q/k norms (128),
    # bf16 rows with bf16 weights and with fp32 weights (autocast's case), Llama's form and Gemma's (1 + w, all fp32):
    # against the function in fp64 (the modules compute in fp32 whatever their dtype), their error may be twice the
    # module's own (the row sums and the weight gradient's ~60k-term fp32 sum run in another order) plus two
    # roundings of the result at the largest entry's scale; a wrong term would be O(1)
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fastdpo.ops.rms_norm import fused_norm_applies, rms_norm

    gemma = form == "gemma"
    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = (Gemma3RMSNorm(width, eps=1e-6) if gemma else LlamaRMSNorm(width, eps=1e-5)).to("cuda")
    with torch.no_grad():
        norm.weight.copy_((0 if gemma else 1) + 0.3 * torch.randn(width, generator=gen, device="cuda"))
    norm = norm.to(weight_dtype)
    eps = norm.eps if gemma else norm.variance_epsilon
    weight64 = norm.weight.detach().double().requires_grad_()

    def exact(t):
        return (1 + weight64 if gemma else weight64) * (t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps))

    x = (2 * torch.randn(rows, width, generator=gen, device="cuda")).bfloat16()
    grad = torch.randn(rows, width, generator=gen, device="cuda")
    assert fused_norm_applies(x, norm.weight)

    def run(fn, weight, inputs):
        weight.grad = None
        leaf = inputs.detach().clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad.to(out.dtype))
        return [out.detach(), leaf.grad, weight.grad]

    own = run(norm, norm.weight, x)
    got = run(lambda t: rms_norm(t, norm.weight, eps, offset=gemma), norm.weight, x)
    ref = run(exact, weight64, x.double())
    for name, g, o, e in zip(("out", "grad x", "grad weight"), got, own, ref, strict=True):
        assert g.dtype == o.dtype, name
        scale = e.abs().max().item()
        ulp = 2.0**-8 if g.dtype == torch.bfloat16 else 2.0**-23
        error, own_error = (g.double() - e).abs().max().item(), (o.double() - e).abs().max().item()
        assert error <= 2 * own_error + 2 * ulp * scale, (name, error, own_error, scale)


@pytest.mark.parametrize(
    ("tokens", "q_heads", "k_heads", "dim", "table_dtype"),
    [(59392, 32, 8, 64, torch.bfloat16), (16385, 28, 4, 128, torch.bfloat16), (4097, 32, 8, 64, torch.float32)],
)
def test_rope_kernel_equals_transformers_bit_for_bit_in_bf16(tokens, q_heads, k_heads, dim, table_dtype):
    # Llama-3.2-1B's heads at batch 64's tokens, Qwen2.5-7B's (28/4 heads of 128), and autocast's case (fp32 tables,
    # fp32 results): the kernel rounds where torch's ops round, so results and gradients are bit for bit equal
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastdpo.ops.rope import apply_rope, fused_rope_applies

    gen = torch.Generator(device="cuda").manual_seed(0)

    def projected(heads):  # [1, heads, tokens, dim] as Llama's attention hands it over: a transposed view
        flat = torch.randn(1, tokens, heads * dim, generator=gen, device="cuda").bfloat16()
        return flat.view(1, tokens, heads, dim).transpose(1, 2)

    q, k = projected(q_heads), projected(k_heads)
    positions = torch.randint(0, 1024, (1, tokens, 1), generator=gen, device="cuda").float()
    freqs = positions * 500000.0 ** (-torch.arange(0, dim, 2, device="cuda").float() / dim)
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
    assert fused_rope_applies(q, k, cos, sin, 1)
    assert not fused_rope_applies(q, k, cos, sin, 2)  # heads on dim 2: the original
    assert not fused_rope_applies(q[..., : dim - 2], k[..., : dim - 2], cos, sin, 1)  # a partial rotary head
    assert not fused_rope_applies(q, k, cos.clone().requires_grad_(), sin, 1)
    grads = [torch.randn(t.shape, generator=gen, device="cuda") for t in (q, k)]

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k)]
        outs = fn(*leaves, cos, sin)
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs, strict=True)])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    for name, got, own in zip(("q", "k", "grad q", "grad k"), run(apply_rope), run(apply_rotary_pos_emb), strict=True):
        assert got.dtype == own.dtype and torch.equal(got, own), (name, (got.double() - own.double()).abs().max())
