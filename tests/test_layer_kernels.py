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


def run(fn, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, weight.grad


def check(got, own, exact, dtype, what):
    scale = exact.abs().max().item()
    error = (got.double() - exact).abs().max().item()
    own_error = (own.double() - exact).abs().max().item()
    # one rounding of the result in its dtype at the largest entry's scale beyond the module's own error
    assert error <= own_error + 2 * ULP[dtype] * scale + 1e-12, (what, error, own_error, scale)


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
def test_forward_and_backward_match_transformers(shape, dtype, weight_dtype, programs, monkeypatch):
    from fastdpo.ops.rms_norm import rms_norm

    torch.manual_seed(0)
    k = kernels()
    monkeypatch.setattr(k, "PROGRAMS_PER_SM", programs)  # on a CPU: PROGRAMS_PER_SM programs in all
    width = shape[-1]
    norm = llama_norm(width, weight_dtype)
    exact_norm = llama_norm(width, torch.float64)
    exact_norm.load_state_dict({name: t.double() for name, t in norm.state_dict().items()})
    x = (2 * torch.randn(shape)).to(dtype)
    grad = torch.randn(shape)
    own = run(norm, x, norm.weight, grad)
    norm.weight.grad = None
    got = run(lambda t: rms_norm(t, norm.weight, norm.variance_epsilon), x, norm.weight, grad)
    exact = run(exact_norm, x.double(), exact_norm.weight, grad.double())
    assert got[0].dtype == own[0].dtype == torch.promote_types(dtype, weight_dtype)
    assert got[1].dtype == dtype and got[2].dtype == weight_dtype
    for name, g, o, e in zip(("out", "grad x", "grad weight"), got, own, exact, strict=True):
        check(g, o, e, dtype if name == "grad x" else o.dtype, name)


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


def test_the_lean_layers_run_the_kernels_where_they_apply(monkeypatch):
    # a whole packed model with lean_activations, its Llama-form norms and its MLPs (on blocks of 5 tokens) on the
    # kernels (as on a GPU; here forced on CPU tensors under the interpreter): the same loss and gradients as its
    # own forwards, in fp32
    from test_model_packed import make_batch, make_examples, make_model

    from fastdpo.model import lean, packed_logps
    from fastdpo.ops import rms_norm as ops

    calls = []
    real = ops.rms_norm

    def counted(*args):
        calls.append(1)
        return real(*args)

    products = []
    real_product = swiglu().product

    def counted_product(*args):
        products.append(1)
        return real_product(*args)

    monkeypatch.setattr(lean, "fused_norm_applies", lambda x, weight: True)
    monkeypatch.setattr(lean, "rms_norm", counted)
    monkeypatch.setattr(lean, "_fused_swiglu", lambda gate, up: True)
    monkeypatch.setattr(swiglu(), "product", counted_product)
    model = make_model("llama")
    monkeypatch.setattr(lean, "MLP_CHUNK_ELEMENTS", 5 * model.config.intermediate_size)
    model.train()
    model.gradient_checkpointing_enable()
    batch = make_batch(make_examples())
    results = []
    for use in (False, True):
        model.zero_grad(set_to_none=True)
        with lean.use_lean_layers([model] if use else []):
            out = packed_logps(model, batch, impl="torch")
            out.seq_logps.sum().backward()
        results.append((out.seq_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * (2 * layers) + 1, len(calls)  # forward and checkpoint recomputation, final norm once
    blocks = -(-batch.input_ids.numel() // 5)
    assert len(products) == 3 * layers * blocks, len(products)  # forward, recomputation, backward: every block
    (value, grads), (lean_value, lean_grads) = results
    torch.testing.assert_close(lean_value, value, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize(
    ("shape", "dtype"), [((7, 19), torch.float32), ((3, 5, 29), torch.float16), ((1, 1), torch.float32)]
)
def test_swiglu_kernels_equal_the_torch_ops(shape, dtype):
    # the ops the lean MLP runs without the kernels: silu(gate) * up; silu(gate) * dp; silu_backward(dp * up, gate)
    import itertools

    k = swiglu()
    torch.manual_seed(3)
    gate, up, dp = ((3 * torch.randn(shape)).to(dtype) for _ in range(3))
    act = torch.nn.functional.silu(gate)
    close = {"rtol": 2 * ULP[dtype], "atol": 2 * ULP[dtype] * (act * up).abs().max().item()}
    torch.testing.assert_close(k.product(gate, up), act * up, **close)
    assert k.product(gate, up, torch.float32).dtype == torch.float32
    want_up = act * dp
    want_gate = torch.ops.aten.silu_backward(dp * up, gate)
    for need_gate, need_up, in_place in itertools.product((False, True), repeat=3):
        g, u = gate.clone(), up.clone()
        into_gate = (g if in_place else torch.full_like(g, float("nan"))) if need_gate else None
        into_up = (u if in_place else torch.full_like(u, float("nan"))) if need_up else None
        k.gradients(g, u, dp, into_gate, into_up)
        # the same roundings as the torch ops, up to the last bit of the fp32 exp inside the sigmoid
        if need_gate:
            torch.testing.assert_close(into_gate, want_gate, **close)
        if need_up:
            torch.testing.assert_close(into_up, want_up, **close)
        if not in_place:
            assert torch.equal(g, gate) and torch.equal(u, up)  # read only
    strided = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    if not strided.is_contiguous():  # (a single element is contiguous whatever its strides)
        with pytest.raises(ValueError, match="contiguous"):
            k.gradients(strided, up, dp, None, up.clone())
