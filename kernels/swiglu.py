"""SiLU-gated products and their gradients, element-wise in one pass: the lean MLP's kernels on a GPU.

``fastdpo.model.lean``'s gated MLP (``down_proj(silu(gate) * up)``) works on blocks of tokens. Between the block's
products, torch runs ``silu``, a multiply, and in the backward four more element-wise passes and a copy, each reading
and writing whole ``[block, I]`` tensors. Here:

- ``product``: ``silu(gate)`` rounded to the input dtype (as torch's ``silu`` returns it), times ``up``, rounded
  to the output dtype: one read of gate and up, one write.
- ``gradients``: from gate, up and the product's gradient ``dp``: ``d_up = silu(gate) · dp`` and
  ``d_gate = silu'(gate) · (dp · up)``, each factor rounded where torch's ops round it (``silu(gate)``,
  ``dp · up``), written where the caller says: over gate and up themselves when it owns them (each element is read
  before it is written, by the same program).

Inputs are contiguous and of one dtype (fp32, fp16 or bf16); results equal torch's up to the last bit of the fp32
``exp`` inside the sigmoid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import INTERPRETED

BLOCK = 64 if INTERPRETED else 2048
NUM_WARPS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _silu(g):
    """``silu(g)`` and ``sigmoid(g)`` of fp32 values."""
    denominator = 1.0 + tl.exp(-g)
    return g / denominator, 1.0 / denominator


@triton.jit
def _product_kernel(g_ptr, u_ptr, p_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act, _ = _silu(g)
    act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(p_ptr + offs, (act * u).to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gradients_kernel(
    g_ptr, u_ptr, dp_ptr, dg_ptr, du_ptr, n, WANT_GATE: tl.constexpr, WANT_UP: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act, sig = _silu(g)
    if WANT_UP:
        act = act.to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + offs, (act * dp).to(du_ptr.dtype.element_ty), mask=ok)
    if WANT_GATE:
        d_act = (dp * u).to(g_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dg_ptr + offs, (d_act * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether these kernels take gate and up: one dtype the kernels handle, the same shape."""
    return gate.dtype == up.dtype and gate.dtype in DTYPES and gate.shape == up.shape


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def product(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``silu(gate) * up`` as torch computes it in gate's dtype, written in ``dtype`` (default: gate's)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=dtype or gate.dtype, device=gate.device)
    if gate.numel():
        _product_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def gradients(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, grad_gate: torch.Tensor | None,
    grad_up: torch.Tensor | None,
) -> None:  # fmt: skip
    """Write the gradients of gate and up of ``silu(gate) * up`` given the product's gradient ``grad`` into
    ``grad_gate`` and ``grad_up`` (None: not wanted); these may be gate and up themselves. All contiguous."""
    tensors = [t for t in (gate, up, grad, grad_gate, grad_up) if t is not None]
    if not all(t.is_contiguous() and t.shape == gate.shape for t in tensors):
        raise ValueError("swiglu.gradients takes contiguous tensors of one shape")
    if gate.numel() and (grad_gate is not None or grad_up is not None):
        _gradients_kernel[_grid(gate.numel())](
            gate, up, grad, gate if grad_gate is None else grad_gate, up if grad_up is None else grad_up,
            gate.numel(), WANT_GATE=grad_gate is not None, WANT_UP=grad_up is not None, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
