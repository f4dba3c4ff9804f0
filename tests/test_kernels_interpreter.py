"""The Triton kernels (impl="triton") on CPU under TRITON_INTERPRET=1, against the fp64 reference.

Triton reads TRITON_INTERPRET when it decorates the kernels, so these tests run in their own pytest process:
``TRITON_INTERPRET=1 python -m pytest -m interpreter`` (``make test`` does). The interpreter runs one program at a
time in numpy and has no bf16, so the cases are few, small and fp32/fp16, chosen to hit every edge: N, H, V not
multiples of the 16×32×16 interpreter tiles, V smaller than one tile, V = 1, one token, every ignored, bias,
softcap, every optional output, several vocabulary splits, both backward modes, gradient filtering on and off.
The full shape and option matrix runs on impl="torch" in test_linear_logprobs.py.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import MARKS
from logprob_reference import IGNORE, make, max_err, reference

from fastdpo.ops import OUTPUT_NAMES, linear_logprobs

pytestmark = MARKS


def kernels():
    from fastdpo.kernels import linear_logprobs as module

    assert module.INTERPRETED, "fastdpo.kernels.linear_logprobs was imported before TRITON_INTERPRET=1 was set"
    return module


def run(impl, hidden, weight, bias, targets, **kw):
    return linear_logprobs(hidden, weight, targets, bias=bias, impl=impl, outputs=OUTPUT_NAMES, **kw)


def grads(out, inputs, upstream):
    return torch.autograd.grad((out.logp * upstream).sum(), inputs)


SOFTCAP_ALL = {"softcap": 4.0, "temperature": 1.3, "logit_scale": 0.9}
# (n, h, v, dtype, transform, bias, ignore): interpreter tiles are BLOCK_N=16, BLOCK_V=32, BLOCK_K=16
CASES = {
    "ragged": (37, 40, 203, torch.float32, {}, False, "some"),
    "fp16_bias": (29, 48, 150, torch.float16, {}, True, "some"),
    "v_below_one_tile": (5, 20, 7, torch.float32, {"temperature": 0.7}, False, "none"),
    "v_is_1": (3, 16, 1, torch.float32, {}, True, "none"),
    "one_token_fp16": (1, 24, 45, torch.float16, {"softcap": 3.0}, False, "none"),
    "softcap_scale_temperature_bias": (40, 33, 130, torch.float32, SOFTCAP_ALL, True, "some"),
    "fp16_temperature": (17, 72, 97, torch.float16, {"temperature": 0.7}, False, "some"),
    "exact_multiples_3d": (64, 16, 64, torch.float32, {"logit_scale": 1.7}, False, "some"),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_grads_match_fp64(case):
    # Same rule as the torch impl: at most 4x the error of the plain full-logits path (naive) in the same dtype,
    # plus a floor of a few fp32 ulps of the value's scale (naive can be exact by luck).
    n, h, v, dtype, kw, has_bias, ignore = CASES[case]
    lead = (4, 16) if case == "exact_multiples_3d" else None
    hidden, weight, bias, targets = make(n, h, v, dtype, ignore=ignore, bias=has_bias, seed=n + h + v, lead=lead)
    ref = reference(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets, **kw)
    naive = run("naive", hidden, weight, bias, targets, **kw)
    fused = run("triton", hidden, weight, bias, targets, **kw)
    for name in ("logp", "entropy", "mean_logit", "log_sum_sq_probs"):
        scale = ref[name].abs().max().item() + 1.0
        tol = 4 * max_err(getattr(naive, name), ref[name]) + 8 * torch.finfo(torch.float32).eps * scale
        assert getattr(fused, name).dtype == torch.float32 and getattr(fused, name).shape == targets.shape
        assert max_err(getattr(fused, name), ref[name]) <= tol, name
    assert torch.equal(fused.is_top1, ref["is_top1"].float())  # random logits: no near-ties

    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_logp = reference(*ref_inputs[:2], ref_inputs[2] if bias is not None else None, targets, **kw)["logp"]
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum(), ref_inputs)
    for name, ref_g, naive_g, fused_g in zip(
        ("hidden", "weight", "bias"), ref_grads, grads(naive, inputs, upstream), grads(fused, inputs, upstream),
        strict=False,
    ):  # fmt: skip
        assert fused_g.dtype == dtype and fused_g.shape == ref_g.shape
        scale = ref_g.abs().max().item() + 1e-3
        floor = 8 * max(torch.finfo(torch.float32).eps, torch.finfo(dtype).eps / 2) * scale
        assert max_err(fused_g, ref_g) <= 4 * max_err(naive_g, ref_g) + floor, name


def test_all_targets_ignored_gives_zeros_and_zero_grads():
    hidden, weight, bias, targets = make(9, 16, 40, torch.float32, ignore="all", bias=True)
    out = run("triton", hidden, weight, bias, targets)
    assert all(torch.equal(getattr(out, n), torch.zeros(9)) for n in OUTPUT_NAMES)
    for g in torch.autograd.grad(out.logp.sum(), (hidden, weight, bias)):
        assert torch.equal(g, torch.zeros_like(g))


def test_ignored_rows_are_never_read():
    # NaN hidden states at ignored (prompt/padding) positions: the kernels skip those rows entirely.
    hidden, weight, _, targets = make(23, 24, 70, torch.float32)
    ignored = targets == IGNORE
    assert 0 < int(ignored.sum()) < 23
    poisoned = hidden.detach().clone()
    poisoned[ignored] = float("nan")
    poisoned.requires_grad_()
    out = run("triton", poisoned, weight, None, targets)
    clean = run("torch", hidden, weight, None, targets)
    assert torch.isfinite(out.logp).all() and max_err(out.logp, clean.logp) < 1e-5
    dh, dw = torch.autograd.grad(out.logp.sum(), (poisoned, weight))
    assert torch.isfinite(dw).all() and torch.equal(dh[ignored], torch.zeros_like(dh[ignored]))


def test_non_contiguous_hidden():
    hidden, weight, _, targets = make(19, 40, 77, torch.float32, ignore="none")
    wide = torch.randn(19, 80)
    wide[:, ::2] = hidden.detach()
    strided = wide[:, ::2]  # stride 2 in the hidden dimension
    assert not strided.is_contiguous()
    out = linear_logprobs(strided, weight.detach(), targets, impl="triton")
    assert max_err(out.logp, reference(hidden.detach(), weight.detach(), None, targets)["logp"]) < 1e-5


def test_first_argmax_wins_ties_across_tiles_and_splits():
    # Duplicate head rows make exact ties: 5 and 70 sit in different vocabulary splits (3 splits of 32-wide
    # tiles over V=100), 40 and 41 in one tile. torch.argmax (and TRL) count only the first as a top-1 hit.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(100, 16, generator=gen) * 0.1
    hidden = torch.randn(4, 16, generator=gen)
    weight[70] = weight[5] = hidden[0] * 3
    weight[1] = weight[2] = hidden[1] * 3  # a decoy pair that is not the max for rows 2-3
    weight[41] = weight[40] = hidden[2] * 3
    hidden[3] = hidden[2]
    targets = torch.tensor([70, 5, 41, 40])
    hidden[1] = hidden[0]
    out = linear_logprobs(hidden, weight, targets, impl="triton", outputs=("is_top1",))
    expected = (hidden.double() @ weight.double().T).argmax(-1) == targets
    assert expected.tolist() == [False, True, False, True]
    assert out.is_top1.tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_vocabulary_splits_agree(splits):
    # The forward's split reduction: one split (no folding), two, and more splits than make sense (clamped).
    k = kernels()
    hidden, weight, bias, targets = make(21, 24, 150, torch.float32, ignore="none", bias=True)
    rows = torch.arange(21)
    args = (hidden.detach(), weight.detach(), bias.detach(), rows, targets)
    wanted = (True, True, True, True)
    base = k.forward(*args, wanted=wanted, n_splits=3)
    out = k.forward(*args, wanted=wanted, n_splits=splits)
    assert (out - base).abs().max().item() < 1e-5


def test_deterministic_mode_is_reproducible_and_matches_atomics():
    hidden, weight, bias, targets = make(45, 40, 130, torch.float32, bias=True)
    upstream = torch.randn(45, generator=torch.Generator().manual_seed(2))
    inputs = (hidden, weight, bias)
    runs = [grads(run("triton", *inputs, targets, deterministic=True), inputs, upstream) for _ in range(2)]
    atomic = grads(run("triton", *inputs, targets), inputs, upstream)
    exact = grads(run("naive", *inputs, targets), inputs, upstream)
    for first, second, fast, ref in zip(*runs, atomic, exact, strict=True):
        assert torch.equal(first, second)
        # both are fp32 sums of the same terms in different orders: a few ulps of the largest gradient apart
        assert max_err(first, fast) <= 16 * torch.finfo(torch.float32).eps * (ref.abs().max().item() + 1e-3)


def _peaked(n=32, h=16, v=160, seed=5):
    """Probability mass in the first vocabulary tile (larger head rows), so later tiles can be skipped."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=gen)
    weight[:32] *= 3.0
    hidden = torch.randn(n, h, generator=gen) * 1.5
    targets = torch.randint(0, 32, (n,), generator=gen)
    targets[::4] = torch.randint(96, 128, (n // 4,), generator=gen)  # unlikely targets: their tiles must stay
    return hidden.requires_grad_(), weight.requires_grad_(), targets


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradient_filtering_is_exact_off_and_bounded_on(deterministic):
    hidden, weight, targets = _peaked()
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(4))
    kw = {"deterministic": deterministic}
    exact = grads(run("triton", hidden, weight, None, targets, **kw), (hidden, weight), upstream)
    # eps = 0 skips nothing (no probability is below 0): the same sums in the same order, bit for bit
    zero = grads(run("triton", hidden, weight, None, targets, grad_filter_eps=0.0, **kw), (hidden, weight), upstream)
    assert all(torch.equal(a, b) for a, b in zip(exact, zero, strict=True))

    eps = 1e-3
    out = run("triton", hidden, weight, None, targets, grad_filter_eps=eps, **kw)
    filtered = grads(out, (hidden, weight), upstream)
    # Bound: a skipped tile drops dz = -g·p·(its transform factor, 1 here) only where p < eps, so
    # |Δdh[n]| <= |g_n| Σ_{v: p<eps} p_nv |W_v| and |ΔdW[v]| <= Σ_{n: p<eps} |g_n| p_nv |h_n| (elementwise).
    with torch.no_grad():
        probs = torch.softmax(hidden.double() @ weight.double().T, dim=-1)
        small = torch.where(probs < eps, probs, torch.zeros_like(probs)) * upstream.double().abs()[:, None]
        bound_dh = small @ weight.double().abs()
        bound_dw = small.T @ hidden.double().abs()
    slack = 1e-6  # fp32 rounding of the kept terms, which may be summed in a different grouping
    for got, full, bound in zip(filtered, exact, (bound_dh, bound_dw), strict=True):
        diff = (got.double() - full.double()).abs()
        assert (diff <= bound + slack).all()
        assert diff.max() > 10 * slack, "nothing was skipped: the case does not exercise filtering"


def test_bf16_is_refused_under_the_interpreter():
    hidden, weight, _, targets = make(4, 16, 33, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 under TRITON_INTERPRET=1"):
        linear_logprobs(hidden, weight, targets, impl="triton")


def test_auto_stays_on_torch_for_cpu_tensors():
    # auto picks triton only for CUDA tensors; the interpreter is reached by asking for impl="triton".
    from fastdpo.ops.linear_logprobs import _resolve_impl

    hidden, weight, _, _ = make(4, 16, 33, torch.float32)
    assert _resolve_impl("auto", hidden, weight) == "torch"


def test_opt_in_tuner_picks_a_candidate_and_the_result_is_unchanged():
    from fastdpo.kernels import configs

    hidden, weight, _, targets = make(20, 32, 70, torch.float32, ignore="none")
    candidates = [configs.TileConfig(16, 32, 16, 1, 1, 1), configs.TileConfig(32, 16, 32, 2, 1, 1)]
    best_fwd, best_bwd = configs.tune(hidden.detach(), weight.detach(), targets, configs=candidates)
    assert best_fwd in candidates and best_bwd in candidates
    key = configs._key(torch.float32, 32, backward=False)
    assert configs._TUNED[key] == best_fwd
    k = kernels()
    rows = torch.arange(20)
    results = [k.forward(hidden.detach(), weight.detach(), None, rows, targets, config=c) for c in candidates]
    assert (results[0][:2] - results[1][:2]).abs().max().item() < 1e-5
    configs._TUNED.clear()


@pytest.mark.parametrize("masked", [(0, 40), (60, 100), (50, 60)])  # a first tile, the last split, within tiles
def test_minus_inf_logits_over_whole_tiles_and_a_strided_bias(masked):
    # a bias of -inf over part of the vocabulary (tokens never to be predicted): a whole tile or split of -inf made
    # the online softmax exp(-inf - -inf) = NaN in every row, logp and gradients; and a strided bias was read as
    # if contiguous (2.2 off); the entropy stayed NaN. Both kernels and the GPU's epilogue kernels (which share the
    # tile fold).
    from fastdpo.kernels import head_epilogue

    hidden, weight, _, _ = make(9, 16, 100, torch.float32, ignore="none", seed=11)
    hidden, weight = hidden.detach(), weight.detach()
    full = torch.randn(200, generator=torch.Generator().manual_seed(2)) * 0.3
    full[2 * masked[0] : 2 * masked[1]] = float("-inf")
    bias = full[::2]  # stride 2
    allowed = [v for v in range(100) if not masked[0] <= v < masked[1]]
    targets = torch.tensor(allowed)[torch.randint(0, len(allowed), (9,), generator=torch.Generator().manual_seed(3))]
    want = reference(hidden, weight, bias.contiguous(), targets)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = linear_logprobs(*leaves, targets, bias=bias, impl="triton", outputs=("logp", "is_top1", "entropy",
                                                                               "log_sum_sq_probs"))  # fmt: skip
    for name in ("logp", "entropy", "log_sum_sq_probs"):  # (the entropy was NaN: p log p = 0 * -inf)
        assert max_err(getattr(out, name), want[name]) < 1e-5, name  # (fp32 ulps of logits of a few units)
    expected = torch.autograd.grad(linear_logprobs(*leaves, targets, bias=bias.contiguous(), impl="naive").logp.sum(),
                                   leaves)  # fmt: skip
    for got, exact in zip(torch.autograd.grad(out.logp.sum(), leaves), expected, strict=True):
        assert torch.isfinite(got).all() and max_err(got, exact) < 1e-5
    z = hidden @ weight.T
    stats = head_epilogue.row_stats(z, bias, targets, head_epilogue.Transform(), (True, False, False, False))
    assert max_err(stats[1], want["logp"]) < 1e-5 and max_err(stats[2], want["entropy"]) < 1e-5


def test_a_second_derivative_is_refused():
    # a gradient penalty (create_graph=True) came back without its second-order terms and without a word: the
    # kernels' backward is computed, not differentiable
    hidden, weight, _, targets = make(9, 16, 33, torch.float32)
    logp = run("triton", hidden, weight, None, targets).logp
    with pytest.raises(RuntimeError, match=r"^linear_logprobs: a second derivative \(create_graph=True\)"):
        torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    (grad,) = torch.autograd.grad(run("triton", hidden, weight, None, targets).logp.sum(), hidden)  # (plain: as ever)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
