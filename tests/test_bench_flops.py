"""bench.flops: the useful-FLOP count of a DPO step, by hand and against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from bench.flops import ModelShape, StepFlops, dpo_step_flops, gemm_shapes

TINY = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=12, vocab=10)


def test_counts_by_hand() -> None:
    # per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate/up/down 3·8·12 = 64 + 32 + 32 + 64 + 288 = 480; 2 layers
    assert TINY.body_params == 960
    assert TINY.head_params == 80
    # sequences of 3 and 5 real tokens: 8 tokens; causal (query, key) pairs 1+2+3 + 1+2+3+4+5 = 6 + 15 = 21;
    # attention forward = 2 (QK and PV) · 2 (FLOPs per multiply-add) · 2 layers · (2 heads · 4) · 21 = 1344
    flops = dpo_step_flops(TINY, [3, 5], head_tokens=4)
    assert flops == StepFlops(
        policy_body=6 * 960 * 8,  # 46080
        policy_head=6 * 80 * 4,  # 1920: the head on the 4 scored positions only
        policy_attention=3 * 1344,  # 4032
        reference_body=2 * 960 * 8,  # 15360
        reference_head=2 * 80 * 4,  # 640
        reference_attention=1344,
    )
    assert flops.total == 46080 + 1920 + 4032 + 15360 + 640 + 1344
    # head_tokens=None: the head on every real token (the usual 6·N per token)
    assert dpo_step_flops(TINY, [3, 5]).policy_head == 6 * 80 * 8
    # padding adds nothing and the step is additive over sequences
    assert dpo_step_flops(TINY, [3, 5, 0]) == dpo_step_flops(TINY, [3]) + dpo_step_flops(TINY, [5])


def test_gemm_shapes_cover_each_weight_forward_and_backward() -> None:
    shapes = gemm_shapes(TINY, 16)
    # output widths 4 (k, v), 8 (q, o), 12 (mlp), 10 (vocab); each as X@W, dY@W.T and X.T@dY, where for width 8
    # (= hidden) X@W and dY@W.T are both [16, 8] x [8, 8]: 4·3 - 1 distinct shapes
    assert len(shapes) == 11 and len(set(shapes)) == 11
    assert (16, 8, 10) in shapes and (16, 10, 8) in shapes and (8, 16, 10) in shapes


@pytest.mark.parametrize("length", [1, 7])
def test_against_flop_counter_mode(length: int) -> None:
    """Linear layers: exact (integer counts, both 2·m·k·n per GEMM, backward = dX + dW = 2x forward).

    Attention: transformers' eager attention multiplies the full [n, n] score matrix (FlopCounterMode counts
    4·A·n² per layer forward), of which the causal pairs we count are n(n+1)/2 of n²; exact after that factor.
    """
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (1, length))
    flops = dpo_step_flops(ModelShape.from_config(config), [length])
    with FlopCounterMode(display=False) as forward:
        logits = model(input_ids=ids, use_cache=False).logits
    with FlopCounterMode(display=False) as backward:
        logits.sum().backward()

    def count(counter: FlopCounterMode, op) -> int:
        return counter.get_flop_counts()["Global"].get(op, 0)

    linear_fwd = flops.reference_body + flops.reference_head
    assert count(forward, torch.ops.aten.mm) == linear_fwd
    assert count(forward, torch.ops.aten.mm) + count(backward, torch.ops.aten.mm) == (
        flops.policy_body + flops.policy_head
    )
    full_fwd = count(forward, torch.ops.aten.bmm)  # only the attention's two matmuls per layer are bmm here
    assert full_fwd * (length + 1) == flops.reference_attention * 2 * length
    assert count(backward, torch.ops.aten.bmm) == 2 * full_fwd
