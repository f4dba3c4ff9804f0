"""linear_logprobs (naive and torch impls) against the independent fp64 reference in logprob_reference.py.

The Triton impl runs the same comparisons under the interpreter in test_kernels_interpreter.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch
from logprob_reference import IGNORE, make, max_err, reference

from fastdpo.ops import OUTPUT_NAMES, linear_logprobs

ALL_OUTPUTS = OUTPUT_NAMES


def run(impl, hidden, weight, bias, targets, **kw):
    return linear_logprobs(hidden, weight, targets, bias=bias, impl=impl, outputs=ALL_OUTPUTS, **kw)


# Shapes chosen not to be multiples of anything: one token, primes, V = 1.
SHAPES = list(itertools.product([1, 7, 130], [16, 40, 72], [1, 33, 1000, 5003]))
TRANSFORMS = [{}, {"temperature": 0.7}, {"logit_scale": 1.7}, {"softcap": 4.0, "temperature": 1.3, "logit_scale": 0.9}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "h", "v"), SHAPES)
def test_values_and_grads_match_fp64(n, h, v, dtype):
    # Tolerance: the fused impl may be off by at most 4x the error the plain full-logits path (naive) makes in
    # the same input dtype, plus a floor of a few fp32 ulps of the value's scale (naive can be exact by luck). The
    # entropy (lse - E_p[z]) and log Σp² (lse(2z) - 2 lse(z)) are differences of terms the size of the log-probs, so
    # their scale counts |logp| too (seen: entropy 4.0 off by 9.3e-6 where logp is -19.5, naive exact by luck).
    hidden, weight, bias, targets = make(n, h, v, dtype, bias=(v % 2 == 1), seed=n * h + v)
    kw = TRANSFORMS[(n + h + v) % len(TRANSFORMS)]
    ref = reference(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets, **kw)
    naive = run("naive", hidden, weight, bias, targets, **kw)
    # 48 tokens per chunk: N=130 spans three chunks with a ragged last one. (Chunks of a few rows turn the
    # backward GEMMs into GEMVs whose fp32 error grows with V; test_chunking_does_not_change_results covers them.)
    fused = run("torch", hidden, weight, bias, targets, chunk_bytes=4 * v * 48, **kw)
    for name in ("logp", "entropy", "mean_logit", "log_sum_sq_probs"):
        terms = ref["logp"] if name in ("entropy", "log_sum_sq_probs") else ref[name]
        scale = max(ref[name].abs().max().item(), terms.abs().max().item()) + 1.0
        tol = 4 * max_err(getattr(naive, name), ref[name]) + 8 * torch.finfo(torch.float32).eps * scale
        assert getattr(fused, name).dtype == torch.float32
        assert max_err(getattr(fused, name), ref[name]) <= tol, name

    # is_top1 is exact: both see the same (possibly fp16-rounded) inputs, and random logits have no near-ties
    assert torch.equal(fused.is_top1, ref["is_top1"].float())

    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_bias = ref_inputs[2] if bias is not None else None
    ref_logp = reference(ref_inputs[0], ref_inputs[1], ref_bias, targets, **kw)["logp"]
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum(), ref_inputs)
    naive_grads = torch.autograd.grad((naive.logp * upstream).sum(), inputs)
    fused_grads = torch.autograd.grad((fused.logp * upstream).sum(), inputs)
    for name, ref_g, naive_g, fused_g in zip(
        ("hidden", "weight", "bias"), ref_grads, naive_grads, fused_grads, strict=False
    ):
        assert fused_g.dtype == dtype and fused_g.shape == ref_g.shape
        scale = ref_g.abs().max().item() + 1e-3
        floor = 8 * max(torch.finfo(torch.float32).eps, torch.finfo(dtype).eps / 2) * scale
        assert max_err(fused_g, ref_g) <= 4 * max_err(naive_g, ref_g) + floor, name


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_all_targets_ignored_gives_zeros_and_zero_grads(impl):
    hidden, weight, bias, targets = make(9, 16, 33, torch.float32, ignore="all", bias=True)
    out = run(impl, hidden, weight, bias, targets)
    for name in ALL_OUTPUTS:
        assert torch.count_nonzero(getattr(out, name)) == 0
    out.logp.sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_prompt_positions_cost_nothing_and_get_no_gradient():
    hidden, weight, _, targets = make(40, 16, 50, torch.float32)
    out = linear_logprobs(hidden, weight, targets, impl="torch")
    out.logp.sum().backward()
    ignored = targets == IGNORE
    assert ignored.any() and torch.count_nonzero(hidden.grad[ignored]) == 0
    assert torch.count_nonzero(out.logp[ignored]) == 0 and (out.logp[~ignored] < 0).all()


def test_leading_dims_are_kept():
    hidden, weight, _, targets = make(12, 16, 33, torch.float32, lead=(3, 4))
    out = linear_logprobs(hidden, weight, targets, impl="torch", outputs=("logp", "entropy"))
    assert out.logp.shape == (3, 4) and out.entropy.shape == (3, 4) and out.is_top1 is None
    flat = linear_logprobs(hidden.reshape(12, 16), weight, targets.reshape(12), impl="naive")
    torch.testing.assert_close(out.logp.reshape(12), flat.logp, rtol=0, atol=1e-5)


def test_chunking_does_not_change_results():
    hidden, weight, bias, targets = make(130, 40, 1000, torch.float64, bias=True)
    kw = {"softcap": 3.0, "temperature": 0.8}
    one = run("torch", hidden, weight, bias, targets, chunk_bytes=2**40, **kw)
    many = run("torch", hidden, weight, bias, targets, chunk_bytes=4 * 1000 * 7, **kw)
    for name in ALL_OUTPUTS:
        torch.testing.assert_close(getattr(one, name), getattr(many, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", TRANSFORMS)
def test_gradcheck_fp64(kw):
    hidden, weight, bias, targets = make(7, 16, 33, torch.float64, bias=True, seed=3)
    targets[2] = IGNORE

    def fn(h, w, b):
        return linear_logprobs(h, w, targets, bias=b, impl="torch", chunk_bytes=4 * 33 * 2, **kw).logp

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_only_logp_has_gradients():
    hidden, weight, _, targets = make(7, 16, 33, torch.float32, ignore="none")
    out = run("torch", hidden, weight, None, targets)
    assert out.logp.requires_grad
    assert not any(getattr(out, n).requires_grad for n in ALL_OUTPUTS[1:])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"impl": "fast"}, "impl"),
        ({"impl": "triton"}, "impl"),
        ({"temperature": 0.0}, "temperature"),
        ({"softcap": -1.0}, "softcap"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"outputs": ("logp", "entropyy")}, "outputs"),
        ({"outputs": "entropy"}, "outputs"),
        ({"bias": torch.zeros(5)}, "bias"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"chunk_bytes": 40000.0}, "chunk_bytes"),  # (a float failed deep in torch.empty)
        ({"grad_filter_eps": 1.0}, "grad_filter_eps"),
        ({"grad_filter_eps": -0.1}, "grad_filter_eps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    hidden, weight, _, targets = make(4, 16, 33, torch.float32)
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        linear_logprobs(hidden, weight, targets, **kwargs)


def test_triton_on_cpu_or_fp64_says_what_to_use_instead():
    hidden, weight, _, targets = make(4, 16, 33, torch.float32)
    if importlib.util.find_spec("triton") is None:
        match = "needs the triton package"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter, impl='triton' runs on CPU tensors")
    else:
        match = "needs CUDA tensors, got cpu; use impl='torch'"
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, targets, impl="triton")
    with pytest.raises(ValueError, match="fp16, bf16 or fp32 inputs, got torch.float64"):
        linear_logprobs(hidden.double(), weight.double(), targets, impl="triton")


def test_bad_tensors_name_the_argument():
    hidden, weight, _, targets = make(4, 16, 33, torch.float32, ignore="none")
    with pytest.raises(
        ValueError,
        match=r"^outputs: a tuple of names, got the string 'entropy'; write "
        r"outputs=\('entropy',\)",
    ):  # fmt: skip  (its letters were named unknown)
        linear_logprobs(hidden, weight, targets, outputs="entropy")
    with pytest.raises(ValueError, match="^hidden: the hidden size is 0"):  # (a reshape's RuntimeError)
        linear_logprobs(hidden[:, :0], weight[:, :0], targets)
    with pytest.raises(ValueError, match="^weight:"):
        linear_logprobs(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="^targets:"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="^targets:"):
        linear_logprobs(hidden, weight, targets[:3])
    for impl in ("naive", "torch"):
        with pytest.raises(ValueError, match="^targets: token id 33 is outside"):
            linear_logprobs(hidden, weight, torch.tensor([0, 33, 1, IGNORE]), impl=impl)


@pytest.fixture
def emulated_gpu_gemms(monkeypatch):
    """The half-precision GPU branch of the chunked paths (``_HeadGemms``) on a CPU: ``torch.mm(..., out_dtype=)``
    exists for CUDA only, so it is emulated by an fp64 product rounded to the requested dtype (a GPU accumulates in
    fp32); the branch is switched on (``_half_branch``). What this checks is the branch's own logic: which operands stay
    in bf16, that dz is rounded before the backward products, that dW accumulates over chunks, the chunk sizes."""
    import sys

    module = sys.modules["fastdpo.ops.linear_logprobs"]
    real_mm, calls = torch.mm, []

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        assert a.dtype == b.dtype == torch.bfloat16, "the GPU branch multiplies bf16 operands"
        calls.append(out_dtype)
        return real_mm(a.double(), b.double()).to(out_dtype)

    monkeypatch.setattr(module.torch, "mm", mm)
    monkeypatch.setattr(module, "_half_branch", lambda device: True)
    return calls


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_pair_loss"])
def test_gpu_half_branch_emulated(emulated_gpu_gemms, op):
    from fastdpo.ops import LossConfig
    from fastdpo.ops.fused_pair_loss import fused_pair_loss

    gen = torch.Generator().manual_seed(3)
    n, h, v = 42, 24, 53  # 6 sequences of 7 tokens: 3 pairs
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = torch.randn(v, h, generator=gen).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    cu_seqlens = torch.arange(0, n + 1, 7, dtype=torch.int32)
    seq_pair, seq_is_chosen = torch.arange(6) % 3, torch.arange(6) < 3
    config = LossConfig(loss_type="sigmoid", beta=0.1)
    ref = torch.randn(3, 2, generator=gen, dtype=torch.float64) - 20

    def run_op(hid, w, **kw):
        hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
        if op == "linear_logprobs":
            out = linear_logprobs(hid, w, targets, impl="torch", outputs=("logp", "entropy"), **kw)
            value = out.logp
            (value * upstream.to(value.dtype)).sum().backward()
        else:
            out = fused_pair_loss(hid, w, targets, cu_seqlens, seq_pair, seq_is_chosen, config,
                                  ref_chosen=ref[:, 0].to(hid.dtype if hid.dtype == torch.float64 else torch.float32),
                                  ref_rejected=ref[:, 1].to(hid.dtype if hid.dtype == torch.float64 else torch.float32),
                                  **kw)  # fmt: skip
            value = out.loss
            value.backward()
        return value.detach().double(), hid.grad, w.grad

    expected, ref_dh, ref_dw = run_op(hidden.double(), weight.double())
    got, dh, dw = run_op(hidden, weight, chunk_bytes=4 * v * 14)  # several chunks
    assert emulated_gpu_gemms and set(emulated_gpu_gemms) == {torch.float32}  # the branch ran, fp32 results
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    # forward: exact bf16 products accumulated beyond fp32, kept in fp32: fp32 rounding of values ~10-100 only
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    # gradients: dz rounded to bf16 before the products (relative 2^-8) and the bf16 outputs (2^-8): a few 2^-8
    for grad, ref_grad in ((dh, ref_dh), (dw, ref_dw)):
        err = (grad.double() - ref_grad).norm() / ref_grad.norm()
        assert err < 4 * 2.0**-8, err


def _pair_inputs(n: int, h: int, v: int, seed: int):
    """fp32 hidden and weight, targets with ignored positions, and 3 pairs of 7-token sequences (n = 42)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE
    return hidden, weight, targets, torch.randn(3, 2, generator=gen) - 20


def _head_run(op: str, hidden, weight, targets, ref, **kw):
    """The op's value and the gradients of hidden and weight (leaves of the given dtypes)."""
    from fastdpo.ops import LossConfig
    from fastdpo.ops.fused_pair_loss import fused_pair_loss

    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    if op == "linear_logprobs":
        value = linear_logprobs(hidden, weight, targets, impl="torch", outputs=("logp", "entropy"), **kw).logp.sum()
    else:
        cu_seqlens, seq_pair = torch.arange(0, 43, 7, dtype=torch.int32), torch.arange(6) % 3
        value = fused_pair_loss(hidden, weight, targets, cu_seqlens, seq_pair, torch.arange(6) < 3,
                                LossConfig(loss_type="sigmoid", beta=0.1), ref_chosen=ref[:, 0],
                                ref_rejected=ref[:, 1], **kw).loss  # fmt: skip
    return value, hidden, weight


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_pair_loss"])
def test_autocast_multiplies_fp32_inputs_in_its_dtype_on_the_half_branch(emulated_gpu_gemms, op):
    # bf16=True on a model loaded in fp32: on a GPU the head must multiply in bf16 as an autocast nn.Linear would, not
    # in fp32 (autocast does not lower the chunked path's mm(out=) and addmm_; there that was ~10x slower). With the
    # GPU branch emulated (its fixture asserts every out_dtype product takes bf16 operands), fp32 inputs under
    # autocast must give what bf16-rounded inputs give without autocast, bit for bit: the same products on the same
    # bf16 operands, the gradients reaching the fp32 leaves in fp32
    hidden, weight, targets, ref = _pair_inputs(42, 24, 53, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, h32, w32 = _head_run(op, hidden, weight, targets, ref, chunk_bytes=4 * 53 * 14)
    value.backward()  # outside autocast, as a GPU backward runs
    expected, h16, w16 = _head_run(op, hidden.bfloat16(), weight.bfloat16(), targets, ref, chunk_bytes=4 * 53 * 14)
    expected.backward()
    assert emulated_gpu_gemms, "the half-precision branch ran"
    assert h32.grad.dtype == w32.grad.dtype == torch.float32
    assert value.dtype == expected.dtype == torch.float32
    assert torch.equal(value, expected)
    assert torch.equal(h32.grad, h16.grad.float()) and torch.equal(w32.grad, w16.grad.float())
    # and it is not what the fp32 inputs give without autocast (the inputs were rounded: bf16's 2^-8 shows)
    assert not torch.equal(value, _head_run(op, hidden, weight, targets, ref)[0])


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_pair_loss"])
def test_on_a_cpu_autocast_leaves_the_head_in_fp32(op):
    # a CPU has no half-precision branch: the head keeps multiplying fp32 inputs in fp32 under autocast, and no op
    # inside it is lowered (autocast_off), so it gives exactly what it gives without autocast
    hidden, weight, targets, ref = _pair_inputs(42, 24, 53, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, h, w = _head_run(op, hidden, weight, targets, ref, chunk_bytes=4 * 53 * 14)
    value.backward()
    expected, h_plain, w_plain = _head_run(op, hidden, weight, targets, ref, chunk_bytes=4 * 53 * 14)
    expected.backward()
    assert torch.equal(value, expected)
    assert torch.equal(h.grad, h_plain.grad) and torch.equal(w.grad, w_plain.grad)


def test_autocast_leaves_fp64_and_matching_inputs_alone(monkeypatch):
    import sys

    from fastdpo.ops.linear_logprobs import autocast_head_inputs

    monkeypatch.setattr(sys.modules["fastdpo.ops.linear_logprobs"], "_half_branch", lambda device: True)

    h64, w64 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    h16, w16 = torch.randn(3, 4).bfloat16(), torch.randn(5, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(a is b for a, b in zip(autocast_head_inputs(h64, w64, None), (h64, w64, None), strict=True))
        assert all(a is b for a, b in zip(autocast_head_inputs(h16, w16, None), (h16, w16, None), strict=True))
        lowered = autocast_head_inputs(h16.float(), w16.float(), torch.zeros(5))
        assert [t.dtype for t in lowered] == [torch.bfloat16] * 3
    assert autocast_head_inputs(h16.float(), w16, None)[0].dtype == torch.float32  # no autocast: unchanged


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_entropy_with_minus_inf_logits(impl):
    # a bias of -inf on tokens never to be predicted: p log p = 0 * -inf made the entropy NaN (SFT's `entropy` metric
    # NaN every step, TRL's too); log Σp² and the log-probs were finite. Chunks of 4 rows: one tile holds no -inf.
    hidden, weight, _, targets = make(11, 16, 37, torch.float32, ignore="some", seed=5)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(6)) * 0.5
    bias[[0, 1, 2, 20, 36]] = float("-inf")
    targets = torch.where((targets >= 0) & (bias[targets.clamp(min=0)] == float("-inf")), 5, targets)
    ref = reference(hidden.detach(), weight.detach(), bias, targets)
    out = linear_logprobs(hidden, weight, targets, bias=bias, impl=impl, outputs=ALL_OUTPUTS, chunk_bytes=4 * 37 * 4)
    for name in ("logp", "entropy", "log_sum_sq_probs"):
        assert torch.isfinite(getattr(out, name)).all(), name
        assert max_err(getattr(out, name), ref[name]) < 1e-5, name  # (fp32 ulps of values of a few units)


def test_a_nan_logit_stays_nan_in_the_entropy():
    # the -inf guard (p log p = 0 where a logit is -inf) turned a NaN logit's entropy into -0.0 in the naive impl,
    # the reference the others are held to, while its logp was NaN
    hidden, weight, _, targets = make(3, 8, 11, torch.float32, ignore="none", seed=1)
    bias = torch.zeros(11)
    bias[4] = float("nan")
    for impl in ("naive", "torch"):
        out = linear_logprobs(hidden, weight, targets, bias=bias, impl=impl, outputs=("logp", "entropy"))
        assert out.logp.isnan().all() and out.entropy.isnan().all(), impl


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_a_second_derivative_is_refused_not_wrong(impl):
    # the torch path failed inside its backward's out= products; the Triton path gave a wrong gradient without a
    # word (its backward is not differentiable: tests/test_kernels_interpreter.py checks it says so)
    hidden, weight, _, targets = make(5, 8, 11, torch.float64)
    logp = linear_logprobs(hidden, weight, targets, impl=impl).logp
    if impl == "naive":  # autograd's own ops: differentiable twice
        (grad_hidden,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
        grad_hidden.pow(2).sum().backward()
        return
    with pytest.raises(RuntimeError, match=r"^linear_logprobs: a second derivative \(create_graph=True\)"):
        torch.autograd.grad(logp.sum(), hidden, create_graph=True)


def test_the_kernels_read_tf32_from_the_setting_torch_was_given():
    # TrainingArguments(tf32=True) sets torch's newer fp32_precision (torch >= 2.9); reading allow_tf32 after that
    # raised a RuntimeError ("mix of the legacy and new APIs") in every fp32 Triton head call on a GPU. The settings
    # are process-wide: each case in a fresh process
    import subprocess
    import sys

    pytest.importorskip("triton")
    cases = {
        "": "ieee",  # nothing set: torch's default, no TF32
        "torch.backends.fp32_precision = 'tf32'": "tf32",  # transformers' enable_tf32(True)
        "torch.backends.fp32_precision = 'ieee'": "ieee",
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'": "tf32",
        "torch.backends.cuda.matmul.allow_tf32 = True": "tf32",  # the older setting
        "torch.set_float32_matmul_precision('high')": "tf32",
        "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cuda.matmul.fp32_precision = 'ieee'": "ieee",
    }
    for setting, expected in cases.items():
        code = (f"import torch; {setting}\nfrom fastdpo.kernels import linear_logprobs as k\n"
                "print(k._dot_precision(torch.float32), k._dot_precision(torch.float16))")  # fmt: skip
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, (setting, done.stderr[-2000:])
        assert done.stdout.split() == [expected, "ieee"], (setting, done.stdout)
