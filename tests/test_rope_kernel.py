"""The RoPE kernel of ``lean_activations`` on a GPU (``fastdpo.kernels.rope``, ``fastdpo.ops.rope``), under
TRITON_INTERPRET=1 on CPU tensors.

It rounds where torch's ops round, so the comparison with transformers' own ``apply_rotary_pos_emb`` is exact: results
and gradients bit for bit, in fp32, fp16, and fp16 heads with fp32 cos/sin (autocast's case, where the result is
fp32 and each gradient contribution is cast to fp16 before the sum). Head dims whose half is not a power of two,
head counts that take several tiles (the interpreter's tile is 64 elements), q and k as the transposed views of
the projections that Llama's attention hands over, a cos/sin batch of one broadcast over the heads' batch. Then a
whole model with lean layers and the kernel forced on: the same loss and gradients, bit for bit, as without it.
``tests/test_kernels_gpu.py`` runs it in bf16 at real sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import MARKS

pytestmark = MARKS


def rope_kernels():
    from fastdpo.kernels import rope

    assert rope.INTERPRETED, "fastdpo.kernels was imported before TRITON_INTERPRET=1 was set"
    return rope


def heads(batch: int, count: int, length: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, count, length, dim]`` as Llama's attention makes it: the projection's output, viewed and transposed."""
    projected = torch.randn(batch, length, count * dim, dtype=torch.float64).to(dtype)
    return projected.view(batch, length, count, dim).transpose(1, 2)


def tables(batch: int, length: int, dim: int, dtype: torch.dtype, *, free: bool = False):
    """cos and sin ``[batch, length, dim]`` as a rotary embedding makes them (both halves equal), at odd positions;
    ``free``: any values (halves differ: a kernel mixing up c1 and c2, or s1 and s2, is caught)."""
    if free:
        return tuple(torch.randn(batch, length, dim, dtype=torch.float64).to(dtype) for _ in range(2))
    positions = torch.randint(0, 4000, (batch, length, 1), dtype=torch.float64)
    freqs = positions * 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def run(fn, q, k, cos, sin, grads):
    q, k = (t.detach().requires_grad_() for t in (q, k))
    q_out, k_out = fn(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [g.to(q_out.dtype) for g in grads])
    return q_out.detach(), k_out.detach(), q.grad, k.grad


CASES = [  # (batch, q heads, k heads, length, dim, cos batch), dtype of q/k, dtype of cos/sin, free tables
    ((2, 3, 1, 5, 10, 2), torch.float32, torch.float32, False),
    ((1, 20, 4, 3, 6, 1), torch.float16, torch.float16, False),
    ((3, 4, 2, 7, 16, 1), torch.float16, torch.float32, False),
    ((2, 2, 2, 4, 2, 2), torch.float32, torch.float32, False),
    ((2, 5, 3, 3, 12, 2), torch.float16, torch.float16, True),
    ((1, 3, 1, 6, 14, 1), torch.float16, torch.float32, True),
]


@pytest.mark.parametrize(("shape", "dtype", "table_dtype", "free"), CASES)
def test_rope_equals_transformers_bit_for_bit(shape, dtype, table_dtype, free):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastdpo.ops.rope import apply_rope

    rope_kernels()
    batch, q_heads, k_heads, length, dim, table_batch = shape
    torch.manual_seed(sum(shape))
    q, k = heads(batch, q_heads, length, dim, dtype), heads(batch, k_heads, length, dim, dtype)
    cos, sin = tables(table_batch, length, dim, table_dtype, free=free)
    grads = [torch.randn(t.shape, dtype=torch.float64) for t in (q, k)]
    own = run(apply_rotary_pos_emb, q, k, cos, sin, grads)
    got = run(apply_rope, q, k, cos, sin, grads)
    for name, mine, theirs in zip(("q_embed", "k_embed", "q grad", "k grad"), got, own, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        assert torch.equal(mine, theirs), f"{name}: {(mine.double() - theirs.double()).abs().max().item()}"
    # results and gradients in the heads' layout (the projection's [B, L, H·D] underneath): views, no copies
    assert got[0].stride() == q.stride() and got[2].stride() == q.stride()
    with torch.no_grad():  # no graph: the same results
        plain = apply_rope(q, k, cos, sin)
    assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


def test_a_gradient_for_one_of_q_and_k_only_and_no_tokens():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastdpo.ops.rope import apply_rope

    rope_kernels()
    torch.manual_seed(0)
    q, k = heads(1, 2, 3, 8, torch.float32), heads(1, 1, 3, 8, torch.float32)
    cos, sin = tables(1, 3, 8, torch.float32)
    leaf = q.detach().requires_grad_()
    grads = []
    for fn in (apply_rotary_pos_emb, apply_rope):
        q_out, k_out = fn(leaf, k, cos, sin)
        assert not k_out.requires_grad
        grads += torch.autograd.grad(q_out.sum(), leaf)
    assert torch.equal(grads[1], grads[0])
    empty = heads(2, 2, 0, 8, torch.float32)
    cos, sin = tables(2, 0, 8, torch.float32)
    q_out, k_out = apply_rope(empty, empty, cos, sin)
    assert q_out.shape == (2, 2, 0, 8) and k_out.shape == (2, 2, 0, 8)


def test_a_model_with_lean_layers_runs_the_kernel_and_trains_the_same_bit_for_bit(monkeypatch):
    # only RoPE forced onto the kernel (the norms and MLPs keep their CPU paths), fp32, checkpointing on: the loss
    # and every gradient equal those of the same lean layers with transformers' own RoPE
    from test_model_packed import make_batch, make_examples, make_model

    from fastdpo.model import lean, packed_logps
    from fastdpo.ops import rope

    rope_kernels()
    calls = []
    real = rope.apply_rope

    def counted(*args):
        calls.append(1)
        return real(*args)

    model = make_model("llama")
    model.train()
    model.gradient_checkpointing_enable()
    batch = make_batch(make_examples())
    results = []
    for force in (False, True):
        if force:
            monkeypatch.setattr(lean, "fused_rope_applies", lambda q, k, cos, sin, unsqueeze_dim: True)
            monkeypatch.setattr(lean, "apply_rope", counted)
        model.zero_grad(set_to_none=True)
        with lean.use_lean_layers([model]):
            out = packed_logps(model, batch, impl="torch")
            out.seq_logps.sum().backward()
        results.append((out.seq_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2 * model.config.num_hidden_layers  # forward and checkpoint recomputation
    (value, grads), (fused_value, fused_grads) = results
    assert torch.equal(fused_value, value)
    for name, grad in grads.items():
        assert torch.equal(fused_grads[name], grad), name
