"""fastdpo_varlen attention (fastdpo.model.attention): packed == one by one, gradients, where it is refused.

The reference is the one of test_model_packed: each sequence alone through the full model on eager attention. The
gradient reference is the same packed batch on sdpa (a dense block mask) in fp64; not eager, whose softmax runs in
fp32 whatever the dtype.
"""

from __future__ import annotations

import pytest
import torch
from test_model_packed import FAMILIES, make_batch, make_examples, make_model, reference_case

from fastdpo.errors import ConfigError
from fastdpo.model import VARLEN, attention, packed_attention, packed_logps, use_attention, varlen_attention

PLAIN = [family for family in FAMILIES if family not in ("mistral", "gemma2", "gemma3")]


@pytest.mark.parametrize("family", PLAIN)
def test_varlen_packed_equals_one_by_one(family):
    model, batch, _, expected = reference_case(family)
    with torch.no_grad():
        out = packed_logps(model, batch, impl="torch", attn_implementation=VARLEN)
    assert model.config._attn_implementation == "eager"  # switched back after the call
    # fp32 forward of tiny models: one-by-one eager and packed differ by ~1e-6; leaking context moves them by > 1e-2
    torch.testing.assert_close(out.seq_logps.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_and_softcap_families_are_refused(family):
    # Mistral's window of 6 and Gemma's soft-capped scores are attention varlen does not compute
    model, batch, _, _ = reference_case(family)
    with pytest.raises(ConfigError, match="packed_attention='model'"), torch.no_grad():
        packed_logps(model, batch, attn_implementation=VARLEN)
    assert model.config._attn_implementation == "eager"


def test_a_sliding_window_no_layer_uses_is_not_refused():
    # SmolLM3 sets use_sliding_window and a window, and every layer of its full attention: varlen refused it
    import transformers

    from fastdpo.model.attention import check_per_sequence

    sizes = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "sliding_window": 4}  # fmt: skip
    config = transformers.SmolLM3Config(**sizes, use_sliding_window=True)
    assert set(config.layer_types) == {"full_attention"}
    check_per_sequence(transformers.SmolLM3ForCausalLM(config), VARLEN)
    config = transformers.Qwen2Config(**sizes, use_sliding_window=True, max_window_layers=1)  # (layer 2 slides)
    with pytest.raises(ConfigError, match="sliding window of 4 tokens"):
        check_per_sequence(transformers.Qwen2ForCausalLM(config), VARLEN)


def test_gradients_match_sdpa_in_fp64_under_gradient_checkpointing():
    # the recomputation in the backward looks the attention up again: use_attention must hold across it
    grads = {}
    batch = make_batch(make_examples())
    for implementation in ("sdpa", VARLEN):
        model = make_model("qwen2").double().train()  # 4 query heads on 2 key-value heads: the grouped path
        model.gradient_checkpointing_enable()
        with use_attention([model], implementation):
            out = packed_logps(model, batch, impl="torch")
            (out.seq_logps * torch.linspace(-1, 1, len(out.seq_logps), dtype=torch.float64)).sum().backward()
        assert model.config._attn_implementation == "eager"
        grads[implementation] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads[VARLEN].keys() and len(grads["sdpa"]) > 10
    for name, grad in grads["sdpa"].items():
        # fp64: the two differ by summation order only (~1e-15 relative); a leak across sequences is O(1)
        torch.testing.assert_close(grads[VARLEN][name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_switch_for_one_forward_is_refused_under_gradient_checkpointing():
    model = make_model("llama").train()
    model.gradient_checkpointing_enable()
    batch = make_batch(make_examples())
    with pytest.raises(ConfigError, match="use_attention"):
        packed_logps(model, batch, attn_implementation=VARLEN)
    with torch.no_grad():  # no backward, nothing recomputed: allowed
        packed_logps(model, batch, attn_implementation=VARLEN)


def test_a_call_outside_a_packed_forward_is_refused():
    model = make_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with use_attention([model], VARLEN), pytest.raises(ConfigError, match="cu_seq_lens_q"):
        model(input_ids=ids)
    assert model.config._attn_implementation == "eager"  # restored after the error


def test_segment_loop_against_a_dense_block_mask():
    # segments of 1, 2 and 7 tokens and a 5-token one in rows of 5: odd lengths, a single token attending to itself
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = 6, 2, 8
    lengths = [1, 7, 2, 5]
    total = sum(lengths)
    query = torch.randn(3, heads, 5, dim, generator=gen, dtype=torch.float64)  # [B, H, L, D] with B·L = 15
    key = torch.randn(3, kv_heads, 5, dim, generator=gen, dtype=torch.float64)
    value = torch.randn(3, kv_heads, 5, dim, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 1, 8, 10, 15], dtype=torch.int32)
    assert total == 15
    out, weights = varlen_attention(torch.nn.Module(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu,
                                    cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)  # fmt: skip
    assert weights is None and out.shape == (3, 5, heads, dim)
    # reference: one row of 15 tokens with a causal block-diagonal mask, keys repeated to every query head
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    q = query.transpose(1, 2).reshape(total, heads, dim).transpose(0, 1)
    k = key.transpose(1, 2).reshape(total, kv_heads, dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = value.transpose(1, 2).reshape(total, kv_heads, dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = (q @ k.transpose(1, 2) * 0.3).masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(0, 1).reshape(3, 5, heads, dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)  # fp64, same arithmetic up to order


def test_offsets_that_miss_tokens_are_refused():
    query = torch.zeros(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)  # ends at 5 of 6 tokens
    with pytest.raises(ValueError, match="from 0 to the 6 tokens"):
        varlen_attention(torch.nn.Module(), query, query, query, None, cu_seq_lens_q=cu, max_length_q=3)


def test_packed_attention_choices():
    assert packed_attention("varlen") == VARLEN
    assert packed_attention("auto") is None  # the model's own until varlen is measured faster somewhere
    assert packed_attention("model") is None
    with pytest.raises(ConfigError, match="packed_attention"):
        packed_attention("flash")


def test_use_attention_restores_after_an_error():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="boom"), use_attention([model, None], VARLEN):
        assert model.config._attn_implementation == VARLEN
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"


# --- GPU: the flash kernel inside torch -----------------------------------------------------------------------------


def test_flash_branch_call_matches_the_ops_schema_on_meta_tensors(monkeypatch):
    # No GPU here: meta tensors run the op's shape functions, so the call (argument order, int32 offsets, scale) and
    # its autograd formula are checked without numbers: grouped k/v come back with their own head count
    monkeypatch.setattr(attention, "_flash_applies", lambda q: True)
    meta = dict(device="meta", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.empty(2, 8, 5, 16, **meta), torch.empty(2, 2, 5, 16, **meta), torch.empty(2, 2, 5, 16, **meta)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device="meta")
    out, _ = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                              max_length_q=7, max_length_k=7)  # fmt: skip
    assert out.shape == (2, 5, 8, 16) and out.dtype == torch.bfloat16
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_path_matches_the_segment_loop(dtype, monkeypatch):
    # odd segment lengths up to 700 tokens, 32 query heads on 8 key-value heads, head dim 64 (Llama-3.2-1B's)
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 700, 33, 255, 2, 511]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    shape = dict(device="cuda", dtype=torch.float32)
    q = torch.randn(1, 32, total, 64, generator=gen, **shape)
    k = torch.randn(1, 8, total, 64, generator=gen, **shape)
    v = torch.randn(1, 8, total, 64, generator=gen, **shape)
    upstream = torch.randn(1, total, 32, 64, generator=gen, **shape)
    kwargs = dict(scaling=0.125, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=700, max_length_k=700)
    results = {}
    assert attention._flash_applies(q.to(dtype).transpose(1, 2))

    def no_flash(_):
        return False

    for name, cast in (("fp32 loop", torch.float32), ("flash", dtype), ("loop", dtype)):
        monkeypatch.setattr(attention, "_flash_applies", attention._flash_applies if name == "flash" else no_flash)
        inputs = [t.to(cast).requires_grad_() for t in (q, k, v)]
        out, _ = varlen_attention(torch.nn.Module(), *inputs, None, **kwargs)
        out.backward(upstream.to(cast))
        results[name] = [out.float(), *(t.grad.float() for t in inputs)]
    # the flash kernel's error against fp32 is held to a small multiple of the same-dtype loop's (sdpa's own kernel)
    for got, loop, ref in zip(results["flash"], results["loop"], results["fp32 loop"], strict=True):
        error = (got - ref).norm() / ref.norm()
        loop_error = (loop - ref).norm() / ref.norm()
        assert error <= 2 * loop_error + 1e-3, (error.item(), loop_error.item())
