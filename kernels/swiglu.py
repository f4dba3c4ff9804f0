"""Gated products ``act(gate) * up`` and their gradients, element-wise in one pass: the lean MLP's kernels on a GPU.

``fastdpo.model.lean``'s gated MLP (``down_proj(act(gate) * up)``) works on blocks of tokens. Between the block's
products, torch runs the activation, a multiply, and in the backward four more element-wise passes and a copy,
each reading and writing whole ``[block, I]`` tensors. Here, for the activations ``ACTIVATIONS`` names (torch's
``silu``, ``gelu(approximate="tanh")`` — Gemma's ``gelu_pytorch_tanh`` — and ``gelu``):

- ``product``: ``act(gate)`` rounded to the input dtype (as torch's activation returns it), times ``up``, rounded
  to the output dtype: one read of gate and up, one write.
- ``gradients``: from gate, up and the product's gradient ``dp``: ``d_up = act(gate) · dp`` and
  ``d_gate = act'(gate) · (dp · up)``, each factor rounded where torch's ops round it (``act(gate)``,
  ``dp · up``), written where the caller says: over gate and up themselves when it owns them (each element is read
  before it is written, by the same program).

Inputs are contiguous and of one dtype (fp32, fp16 or bf16), the arithmetic is fp32. SiLU's results equal torch's
up to the last bit of the fp32 ``exp`` inside the sigmoid. The tanh GELU is written as ``x · σ(2z)`` with
``z = √(2/π)(x + 0.044715 x³)`` (``1 + tanh z = 2σ(2z)``, ``1 - tanh² z = 4σ(2z)σ(-2z)``), both sigmoids from one
``exp(-2|z|)``: the same function as torch's ``0.5x(1 + tanh z)`` without its cancellation where ``tanh z`` nears
-1: in fp32, element by element no further from the exact value than torch's, or within a few ulps
(``tests/test_layer_kernels.py`` measures both against fp64). GELU is torch's ``0.5x(1 + erf(x/√2))``. In fp16,
on 20,000 gates ``3·randn`` under the Triton interpreter (numpy's exp and erf) against torch's CPU ops, results
differ only for negative gates (where torch's ops cancel), by up to 3 ulps: on 829 (tanh) and 629 (erf) of them,
the kernels' result the closer to the exact value on 828 and 531 of those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import INTERPRETED

BLOCK = 64 if INTERPRETED else 2048
NUM_WARPS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
"""The activations the kernels compute, by the name ``fastdpo.model.lean`` gives them, and their kernel codes."""

# constants the kernels read (compiled code reads module globals only as constexpr)
_BETA = tl.constexpr(0.7978845608028654)  # √(2/π)
_KAPPA = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/√2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """``act(g)`` and ``act'(g)`` of fp32 values (``ACTIVATIONS``' codes)."""
    if ACT == 0:  # silu: g / (1 + exp(-g)), as torch divides
        denominator = 1.0 + tl.exp(-g)
        sig = 1.0 / denominator
        value = g / denominator
        slope = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:  # gelu, tanh approximation: g·σ(2z)
        z = _BETA * (g + _KAPPA * g * g * g)
        small = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: no overflow either way
        near = 1.0 / (1.0 + small)  # σ(2|z|)
        far = small * near  # σ(-2|z|)
        sig = tl.where(z >= 0, near, far)
        rest = tl.where(z >= 0, far, near)  # 1 - sig, without the subtraction
        value = g * sig
        slope = sig + 2.0 * g * sig * rest * _BETA * (1.0 + 3.0 * _KAPPA * g * g)
    else:  # gelu: g·Φ(g)
        cdf = 0.5 * (1.0 + tl.erf(g * _SQRT_HALF))
        value = g * cdf
        slope = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return value, slope


@triton.jit
def _product_kernel(g_ptr, u_ptr, p_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACT)
    act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(p_ptr + offs, (act * u).to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gradients_kernel(
    g_ptr, u_ptr, dp_ptr, dg_ptr, du_ptr, n, WANT_GATE: tl.constexpr, WANT_UP: tl.constexpr, ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act, slope = _activation(g, ACT)
    if WANT_UP:
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + offs, (act * dp).to(du_ptr.dtype.element_ty), mask=ok)
    if WANT_GATE:
        d_act = (dp * u).to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dg_ptr + offs, (d_act * slope).to(dg_ptr.dtype.element_ty), mask=ok)


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether these kernels take gate and up: one dtype the kernels handle, the same shape."""
    return gate.dtype == up.dtype and gate.dtype in DTYPES and gate.shape == up.shape


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"no gated-product kernel for {activation!r}; these exist: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def product(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype | None = None, *,
            activation: str = "silu") -> torch.Tensor:  # fmt: skip
    """``act(gate) * up`` as torch computes it in gate's dtype, written in ``dtype`` (default: gate's)."""
    code = _code(activation)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=dtype or gate.dtype, device=gate.device)
    if gate.numel():
        _product_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), ACT=code, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def gradients(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, grad_gate: torch.Tensor | None,
    grad_up: torch.Tensor | None, *, activation: str = "silu",
) -> None:  # fmt: skip
    """Write the gradients of gate and up of ``act(gate) * up`` given the product's gradient ``grad`` into
    ``grad_gate`` and ``grad_up`` (None: not wanted); these may be gate and up themselves. All contiguous."""
    code = _code(activation)
    tensors = [t for t in (gate, up, grad, grad_gate, grad_up) if t is not None]
    if not all(t.is_contiguous() and t.shape == gate.shape for t in tensors):
        raise ValueError("swiglu.gradients takes contiguous tensors of one shape")
    if gate.numel() and (grad_gate is not None or grad_up is not None):
        _gradients_kernel[_grid(gate.numel())](
            gate, up, grad, gate if grad_gate is None else grad_gate, up if grad_up is None else grad_up,
            gate.numel(), WANT_GATE=grad_gate is not None, WANT_UP=grad_up is not None, ACT=code, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
