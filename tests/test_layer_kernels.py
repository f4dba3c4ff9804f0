"""The decoder-layer kernels of ``lean_activations`` on a GPU, under TRITON_INTERPRET=1 on CPU tensors.

- RMSNorm (``fastdpo.kernels.rms_norm``, ``fastdpo.ops.rms_norm``): against transformers' own ``LlamaRMSNorm`` in
  the same dtype and in fp64 (fp32 and fp16; the interpreter has no bf16): the kernels' error against fp64 may
  exceed the module's own by two roundings of the result at the largest entry's scale (the row's sum of squares is
  summed in another order, the weight's gradient sums unrounded products), never more. Widths that are not powers
  of two, one row, no rows, rows split unevenly over the backward's programs, 3-d and strided inputs, fp32 weights
  on fp16 rows (autocast's case), a frozen weight.
- SiLU-gated product (``fastdpo.kernels.swiglu``): against the torch ops the lean MLP runs otherwise, element for
  element, on sizes that are not multiples of the interpreter's 64-element blocks, in place and not, every subset
  of wanted gradients.
- Both inside a whole model's lean layers, forced on as on a GPU: the model's own loss and gradients.
``tests/test_kernels_gpu.py`` and ``tests/test_lean.py`` run them at real widths in bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import MARKS

pytestmark = MARKS

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10}


def kernels():
    from fastdpo.kernels import rms_norm

    assert rms_norm.INTERPRETED, "fastdpo.kernels was imported before TRITON_INTERPRET=1 was set"
    return rms_norm


def swiglu():
    from fastdpo.kernels import swiglu

    assert swiglu.INTERPRETED, "fastdpo.kernels was imported before TRITON_INTERPRET=1 was set"
    return swiglu


def llama_norm(width: int, dtype: torch.dtype, eps: float = 1e-5):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width))
    return norm.to(dtype)


def gemma_norm(width: int, dtype: torch.dtype, eps: float = 1e-6):
    """transformers' Gemma-form RMSNorm (``x·r·(1 + w)`` in fp32, rounded once), its weight around 0."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(width, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(width))
    return norm.to(dtype)


NORMS = {"llama": (llama_norm, "variance_epsilon"), "gemma": (gemma_norm, "eps")}


def run(fn, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, weight.grad


def check(got, own, exact, dtype, what, roundings: float = 2):
    scale = exact.abs().max().item()
    error = (got.double() - exact).abs().max().item()
    own_error = (own.double() - exact).abs().max().item()
    # ``roundings`` of the result in its dtype at the largest entry's scale beyond the module's own error
    assert error <= own_error + roundings * ULP[dtype] * scale + 1e-12, (what, error, own_error, scale)


@pytest.mark.parametrize("form", list(NORMS))
@pytest.mark.parametrize(
    ("shape", "dtype", "weight_dtype", "programs"),
    [
        ((37, 40), torch.float32, torch.float32, 3),
        ((5, 7, 33), torch.float16, torch.float16, 4),
        ((1, 64), torch.float16, torch.float32, 2),
        ((11, 24), torch.float32, torch.float32, 11),
        ((9, 17), torch.float16, torch.float16, 1),
    ],
)
def test_forward_and_backward_match_transformers(shape, dtype, weight_dtype, programs, form, monkeypatch):
    # Llama's form (results: the wider dtype) and Gemma's (1 + w in fp32, results in the input's dtype)
    from fastdpo.ops.rms_norm import rms_norm

    torch.manual_seed(0)
    k = kernels()
    monkeypatch.setattr(k, "PROGRAMS_PER_SM", programs)  # on a CPU: PROGRAMS_PER_SM programs in all
    width = shape[-1]
    make, eps = NORMS[form]
    norm = make(width, weight_dtype)
    # the function in fp64 (the modules themselves compute in fp32 whatever their dtype)
    weight64 = norm.weight.detach().double().requires_grad_()
    scale = weight64 if form == "llama" else 1 + weight64

    def exact_norm(t):
        return scale * (t * torch.rsqrt(t.square().mean(-1, keepdim=True) + getattr(norm, eps)))

    x = (2 * torch.randn(shape)).to(dtype)
    grad = torch.randn(shape)
    own = run(norm, x, norm.weight, grad)
    norm.weight.grad = None
    got = run(lambda t: rms_norm(t, norm.weight, getattr(norm, eps), offset=form == "gemma"), x, norm.weight, grad)
    exact = run(exact_norm, x.double(), weight64, grad.double())
    out_dtype = dtype if form == "gemma" else torch.promote_types(dtype, weight_dtype)
    assert got[0].dtype == own[0].dtype == out_dtype
    assert got[1].dtype == dtype and got[2].dtype == weight_dtype
    for name, g, o, e in zip(("out", "grad x", "grad weight"), got, own, exact, strict=True):
        # Llama's form rounds the normalized rows and dn = dy·w to the input dtype (two roundings, each of which
        # the kernels may place on the other side); Gemma's rounds only the result, as the module does
        check(g, o, e, dtype if name == "grad x" else o.dtype, name, roundings=2 if form == "llama" else 0.5)


def test_a_frozen_weight_gets_no_gradient_and_no_rows_are_nothing():
    from fastdpo.ops.rms_norm import rms_norm

    torch.manual_seed(1)
    norm = llama_norm(20, torch.float32).requires_grad_(False)
    x = torch.randn(6, 20, requires_grad=True)
    out = rms_norm(x, norm.weight, norm.variance_epsilon)
    out.sum().backward()
    assert norm.weight.grad is None and x.grad is not None
    torch.testing.assert_close(out, norm(x), rtol=4 * ULP[torch.float32], atol=1e-6)
    empty = torch.zeros(0, 20, requires_grad=True)
    norm.requires_grad_(True)
    out = rms_norm(empty, norm.weight, norm.variance_epsilon)
    out.sum().backward()
    assert out.shape == (0, 20) and empty.grad.shape == (0, 20)
    assert torch.equal(norm.weight.grad, torch.zeros(20))


def test_strided_rows_are_read_where_they_are():
    from fastdpo.ops.rms_norm import rms_norm

    torch.manual_seed(2)
    norm = llama_norm(24, torch.float32)
    wide = torch.randn(10, 48)
    x = wide[:, ::2]  # every other column: the kernels take a contiguous copy
    rows = wide[:, :24]  # rows with a stride of 48: read in place
    for t in (x, rows):
        torch.testing.assert_close(rms_norm(t, norm.weight, 1e-5), norm(t), rtol=4 * ULP[torch.float32], atol=1e-6)
    # and the backward through a strided view: the input's gradient lands in the view's places only
    grad = torch.randn(10, 24)
    results = []
    for fn in (lambda t: rms_norm(t, norm.weight, 1e-5), norm):
        leaf = wide.clone().requires_grad_()
        fn(leaf[:, :24]).backward(grad)
        results.append(leaf.grad)
    torch.testing.assert_close(results[0], results[1], rtol=4 * ULP[torch.float32], atol=1e-6)
    assert torch.equal(results[0][:, 24:], torch.zeros(10, 24))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_lean_layers_run_the_kernels_where_they_apply(monkeypatch, family):
    # a whole packed model with lean_activations, its Llama-form norms and its MLPs (on blocks of 5 tokens) on the
    # kernels (as on a GPU; here forced on CPU tensors under the interpreter): the same loss and gradients as its
    # own forwards, in fp32. Gemma 3: its tanh-GELU MLPs and its Gemma-form norms (x·r·(1 + w)) on the kernels
    from test_model_packed import SHAPES, make_batch, make_examples, make_model

    from fastdpo.model import lean, packed_logps
    from fastdpo.ops import rms_norm as ops

    calls = []
    real = ops.rms_norm

    def counted(*args, **kwargs):
        calls.append(kwargs["offset"])
        return real(*args, **kwargs)

    products = []
    real_product = swiglu().product

    def counted_product(*args, **kwargs):
        products.append(kwargs["activation"])
        return real_product(*args, **kwargs)

    monkeypatch.setattr(lean, "fused_norm_applies", lambda x, weight: True)
    monkeypatch.setattr(lean, "rms_norm", counted)
    monkeypatch.setattr(lean, "_fused_swiglu", lambda gate, up: True)
    monkeypatch.setattr(swiglu(), "product", counted_product)
    model = make_model(family)
    rows = 5 if family == "llama" else 64  # Gemma 3 on one block
    monkeypatch.setattr(lean, "MLP_CHUNK_ELEMENTS", rows * model.config.intermediate_size)
    model.train()
    model.gradient_checkpointing_enable()
    batch = make_batch(make_examples(SHAPES if family == "llama" else SHAPES[:3]))  # Gemma: interpreter time
    results = []
    for use in (False, True):
        model.zero_grad(set_to_none=True)
        with lean.use_lean_layers([model] if use else []):
            out = packed_logps(model, batch, impl="torch")
            out.seq_logps.sum().backward()
        results.append((out.seq_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    layers = model.config.num_hidden_layers
    # every RMSNorm of the layers (Gemma 3: four, and q/k norms) in the forward and the recomputation, the final once
    in_layers = sum(type(m).__name__.endswith("RMSNorm") for m in model.model.layers.modules())
    assert in_layers == (2 if family == "llama" else 6) * layers
    assert len(calls) == 2 * in_layers + 1, len(calls)
    assert set(calls) == {family == "gemma3"}  # Gemma's 1 + w form
    blocks = -(-batch.input_ids.numel() // rows)
    assert len(products) == 3 * layers * blocks, len(products)  # forward, recomputation, backward: every block
    assert set(products) == {"silu" if family == "llama" else "gelu_tanh"}
    (value, grads), (lean_value, lean_grads) = results
    torch.testing.assert_close(lean_value, value, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def torch_activation(name: str):
    """The torch ops the lean MLP runs without the kernels: ``act`` and ``act_backward(grad, gate)``."""
    import functools

    aten, gelu = torch.ops.aten, torch.nn.functional.gelu
    return {
        "silu": (torch.nn.functional.silu, aten.silu_backward),
        "gelu_tanh": (functools.partial(gelu, approximate="tanh"),
                      functools.partial(aten.gelu_backward, approximate="tanh")),
        "gelu": (gelu, aten.gelu_backward),
    }[name]  # fmt: skip


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize(
    ("shape", "dtype"), [((7, 19), torch.float32), ((3, 5, 29), torch.float16), ((1, 1), torch.float32)]
)
def test_gated_kernels_equal_the_torch_ops(shape, dtype, activation):
    # act(gate) * up; act(gate) * dp; act_backward(dp * up, gate): the ops the lean MLP runs otherwise
    import itertools

    k = swiglu()
    forward, backward = torch_activation(activation)
    torch.manual_seed(3)
    gate, up, dp = ((3 * torch.randn(shape)).to(dtype) for _ in range(3))
    act = forward(gate)
    # two roundings of the result: the activation's fp32 transcendental (exp, erf) and how the tanh GELU is written
    # (see fastdpo.kernels.swiglu) differ from torch's by an ulp or two of fp32, which can move a rounded result one
    # step; on the product's scale for entries near zero
    close = {"rtol": 2 * ULP[dtype], "atol": 2 * ULP[dtype] * (act * up).abs().max().item()}
    torch.testing.assert_close(k.product(gate, up, activation=activation), act * up, **close)
    assert k.product(gate, up, torch.float32, activation=activation).dtype == torch.float32
    want_up = act * dp
    want_gate = backward(dp * up, gate)
    for need_gate, need_up, in_place in itertools.product((False, True), repeat=3):
        g, u = gate.clone(), up.clone()
        into_gate = (g if in_place else torch.full_like(g, float("nan"))) if need_gate else None
        into_up = (u if in_place else torch.full_like(u, float("nan"))) if need_up else None
        k.gradients(g, u, dp, into_gate, into_up, activation=activation)
        if need_gate:
            torch.testing.assert_close(into_gate, want_gate, **close)
        if need_up:
            torch.testing.assert_close(into_up, want_up, **close)
        if not in_place:
            assert torch.equal(g, gate) and torch.equal(u, up)  # read only
    with pytest.raises(ValueError, match="relu"):
        k.product(gate, up, activation="relu")
    strided = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    if not strided.is_contiguous():  # (a single element is contiguous whatever its strides)
        with pytest.raises(ValueError, match="contiguous"):
            k.gradients(strided, up, dp, None, up.clone())


def exact_tanh_gelu(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tanh GELU, its derivative, and the derivative's scale (the sum of its two terms' sizes: it crosses zero
    near -0.75, where a relative error means nothing), in fp64, written without cancellation: torch's own fp64
    ``0.5x(1 + tanh z)`` is 0 once ``tanh z`` rounds to -1 (x below about -7), where the function is not."""
    x = gate.double()
    beta, kappa = (2 / torch.pi) ** 0.5, 0.044715
    z = beta * (x + kappa * x**3)
    sig, rest = torch.sigmoid(2 * z), torch.sigmoid(-2 * z)  # (1 + tanh z) / 2 and (1 - tanh z) / 2
    second = 2 * x * sig * rest * beta * (1 + 3 * kappa * x**2)
    return x * sig, sig + second, sig + second.abs()


def test_tanh_gelu_kernels_are_as_close_to_fp64_as_torch():
    # fp32, gates from -12 to 9: the kernels' act(gate) and act'(gate), each against the function in fp64, element
    # by element no further from it than torch's own fp32 ops, or within a few ulps
    k = swiglu()
    forward, backward = torch_activation("gelu_tanh")
    gate = torch.linspace(-12, 9, 1001)
    ones = torch.ones_like(gate)
    exact_act, exact_slope, slope_scale = exact_tanh_gelu(gate)
    assert torch.allclose(exact_act, forward(gate.double()), rtol=1e-12, atol=1e-15)  # the same function
    slope = torch.full_like(gate, float("nan"))
    k.gradients(gate, ones, ones, slope, None, activation="gelu_tanh")
    act = k.product(gate, ones, activation="gelu_tanh")
    tiny = torch.finfo(torch.float32).tiny  # below it fp32 has no relative precision to speak of
    ulps = torch.tensor(8 * ULP[torch.float32], dtype=torch.float64)  # a rounding of the result, fp32 exp's error
    checks = [(act, forward(gate), exact_act, exact_act.abs()), (slope, backward(ones, gate), exact_slope, slope_scale)]
    for got, own, exact, scale in checks:
        error = (got.double() - exact).abs() / scale.clamp_min(tiny)
        own_error = (own.double() - exact).abs() / scale.clamp_min(tiny)
        worse = error > torch.maximum(own_error, ulps)
        assert not worse.any(), (gate[worse][:5], error[worse][:5], own_error[worse][:5])
    # where tanh z nears -1 torch's fp32 0.5x(1 + tanh z) cancels; the kernel keeps the relative precision that
    # exp(2z) of an fp32 z has (its condition number 2|z|: a few ulps of z become 2|z| times as many of the result)
    far = (gate < -4) & (exact_act.abs() > tiny)
    z = (2 / torch.pi) ** 0.5 * (gate.double() + 0.044715 * gate.double() ** 3)
    bound = (8 + 4 * z.abs()) * ULP[torch.float32]
    assert (((act.double() - exact_act).abs() / exact_act.abs()) < bound)[far].all()
    assert ((forward(gate).double() - exact_act).abs() / exact_act.abs())[far].max() > 1e-3  # torch's does not
