"""fused_pair_loss (3 GEMMs, gradients formed in the forward) equals the plain path for every type it takes."""

from __future__ import annotations

import pytest
import torch

from fastdpo.ops import LossConfig, PairLogps, linear_logprobs, preference_loss, segment_sum
from fastdpo.ops.fused_pair_loss import FUSED_LOSS_TYPES, fused_pair_loss, supports_fused


def packed_case(seed=0, dtype=torch.float64, num_pairs=5, hidden=24, vocab=97):
    """Segments of random lengths: pairs (chosen, rejected) in shuffled order, padding segments in between."""
    gen = torch.Generator().manual_seed(seed)
    segs = [(p, c) for p in range(num_pairs) for c in (True, False)]
    order = torch.randperm(len(segs), generator=gen).tolist()
    lengths, seq_pair, seq_is_chosen, targets = [], [], [], []
    for k in order:
        pair, chosen = segs[k]
        n = int(torch.randint(3, 12, (1,), generator=gen))
        prompt = int(torch.randint(1, n - 1, (1,), generator=gen))
        t = torch.randint(0, vocab, (n,), generator=gen)
        t[:prompt] = -100
        t[-1] = -100
        lengths.append(n), seq_pair.append(pair), seq_is_chosen.append(chosen), targets.append(t)
        if k % 3 == 0:  # a padding segment
            lengths.append(2), seq_pair.append(-1), seq_is_chosen.append(False), targets.append(torch.full((2,), -100))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    n_tokens = int(cu[-1])
    h = (torch.randn(n_tokens, hidden, generator=gen, dtype=dtype)).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) / hidden**0.5).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_()
    ref = torch.randn(num_pairs, 2, generator=gen, dtype=dtype) * 3 - 20
    return h, w, b, torch.cat(targets), cu, torch.tensor(seq_pair), torch.tensor(seq_is_chosen), ref


def plain(h, w, b, targets, cu, seq_pair, seq_is_chosen, ref, config, **kw):
    logp = linear_logprobs(h, w, targets, bias=b, impl="torch", **kw).logp
    sums = segment_sum(logp, cu.long())
    counts = segment_sum((targets != -100).to(logp.dtype), cu.long())
    real = seq_pair >= 0
    order = torch.argsort(seq_pair[real] * 2 + (~seq_is_chosen[real]).long())
    s, c = sums[real][order].view(-1, 2), counts[real][order].view(-1, 2)
    return preference_loss(PairLogps(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], c[:, 0], c[:, 1]), config)


CONFIGS = [LossConfig(loss_type=t, label_smoothing=0.1 if t in ("exo_pair", "cdpo", "robust", "simpo", "cpo") else 0)
           for t in sorted(FUSED_LOSS_TYPES)]  # fmt: skip
CONFIGS += [LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]),
            LossConfig(loss_type="sigmoid", f_divergence_type="js_divergence", beta=0.3)]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "+".join(c.loss_types) + f"-{c.f_divergence_type}")
def test_loss_metrics_and_gradients_equal_the_plain_path(config):
    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case()
    kw = {"softcap": 5.0, "temperature": 0.8, "logit_scale": 1.3}
    expected = plain(h, w, b, targets, cu, seq_pair, seq_is_chosen, ref, config, **kw)
    grads_expected = torch.autograd.grad(expected.loss, (h, w, b))
    # chunks of about two pairs: several chunks, each a different subset of the pairs
    got = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, config, ref_chosen=ref[:, 0],
                          ref_rejected=ref[:, 1], bias=b, chunk_bytes=4 * 97 * 20, **kw)  # fmt: skip
    grads_got = torch.autograd.grad(got.loss * 2.5, (h, w, b))  # an upstream scale the backward must apply
    # fp64 throughout: the two paths differ by summation order only
    torch.testing.assert_close(got.loss, expected.loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.per_pair, expected.per_pair.detach(), rtol=1e-10, atol=1e-12)
    for name, value in expected.metrics.items():
        torch.testing.assert_close(got.metrics[name], value.detach(), rtol=1e-10, atol=1e-12, msg=name)
    for g, e in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(g, 2.5 * e, rtol=1e-9, atol=1e-12)


def test_refuses_types_that_are_not_separable():
    h, w, _b, targets, cu, seq_pair, seq_is_chosen, _ref = packed_case()
    for loss_type in ("aot", "aot_unpaired", "orpo"):
        config = LossConfig(loss_type=loss_type)
        assert not supports_fused(config)
        with pytest.raises(ValueError, match=f"does not take \\['{loss_type}'\\]"):
            fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, config)


def test_a_pair_without_its_rejected_segment_is_an_error():
    h, w, _b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case()
    broken = seq_pair.clone()
    broken[(seq_pair == 2) & ~seq_is_chosen] = -1
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        fused_pair_loss(h, w, targets, cu, broken, seq_is_chosen, LossConfig(), ref_chosen=ref[:, 0],
                        ref_rejected=ref[:, 1])  # fmt: skip

    for bad in (97, -5):  # a target outside [0, V) that is not ignore_index: torch's gather error (CPU), or the
        wrong = targets.clone()  # GPU's half-precision kernels reading past the row, silently
        wrong[(targets >= 0).nonzero()[0]] = bad
        with pytest.raises(ValueError, match=f"^targets: token id {bad} is outside the vocabulary \\[0, 97\\)"):
            fused_pair_loss(h, w, wrong, cu, seq_pair, seq_is_chosen, LossConfig(), ref_chosen=ref[:, 0],
                            ref_rejected=ref[:, 1])  # fmt: skip


def test_token_metrics_equal_their_definitions():
    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case(seed=3)
    kw = {"softcap": 5.0, "temperature": 0.8, "logit_scale": 1.3}
    refs = {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}
    got = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig(), **refs, bias=b,
                          chunk_bytes=4 * 97 * 20, token_metrics=True, **kw)  # fmt: skip
    with torch.no_grad():  # by definition, from the full fp64 logits
        z = (h @ w.T + b) * kw["logit_scale"]
        z = kw["softcap"] * torch.tanh(z / kw["softcap"]) / kw["temperature"]
        p = z.softmax(-1)
        entropy = -(p * p.log()).sum(-1)
        seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
        done = targets != -100
        chosen = done & seq_is_chosen[seg] & (seq_pair[seg] >= 0)
        rejected = done & ~seq_is_chosen[seg] & (seq_pair[seg] >= 0)
        top1 = z.argmax(-1) == targets
    expected = {
        "entropy": entropy[done].mean(),
        "logits/chosen": z.mean(-1)[chosen].mean(),
        "logits/rejected": z.mean(-1)[rejected].mean(),
        "mean_token_accuracy": top1[chosen].double().mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(got.metrics[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_under_no_grad_no_gradient_is_formed(monkeypatch):
    # an evaluation step (no_grad, the head still a parameter) formed the full fp32 [V, H] weight gradient and its
    # products: needs_input_grad ignores the grad mode
    from fastdpo.ops.linear_logprobs import _HeadGemms

    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case(seed=2)
    refs = {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1], "bias": b, "chunk_bytes": 4 * 97 * 20}
    calls = []
    for name in ("grad_hidden", "add_grad_weight"):
        original = getattr(_HeadGemms, name)
        monkeypatch.setattr(_HeadGemms, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    with torch.no_grad():
        quiet = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig(), token_metrics=True, **refs)
    assert calls == [] and not quiet.loss.requires_grad
    trained = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig(), token_metrics=True, **refs)
    assert "add_grad_weight" in calls and trained.loss.requires_grad
    # the same numbers either way (the same products, in the same order)
    torch.testing.assert_close(quiet.loss, trained.loss.detach(), rtol=0, atol=0)
    for name, value in trained.metrics.items():
        torch.testing.assert_close(quiet.metrics[name], value, rtol=0, atol=0, msg=name)


def test_bad_arguments_name_the_argument_as_linear_logprobs_does():
    # temperature 0 and softcap 0 raised ZeroDivisionError, a negative one trained as its absolute value, a NaN scale
    # gave a NaN loss; a bias, weight or reference of the wrong size failed deep in torch; a [B, T, H] batch was
    # blamed on cu_seqlens
    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case()
    args = (h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig())
    refs = {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}
    cases = [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
             ({"softcap": -2.0}, "softcap"), ({"softcap": 0.0}, "softcap"),
             ({"logit_scale": float("nan")}, "logit_scale"), ({"bias": b[:-1]}, "bias"),
             ({"chunk_bytes": 1e4}, "chunk_bytes"), ({"ref_chosen": ref[:-1, 0]}, "ref_chosen"),
             ({"ref_rejected": 3.0}, "ref_rejected")]  # fmt: skip
    for kwargs, argument in cases:
        with pytest.raises(ValueError, match=rf"^{argument}:"):
            fused_pair_loss(*args, **{**refs, **kwargs})
    with pytest.raises(ValueError, match=r"^weight: has H=25"):
        fused_pair_loss(h, torch.cat([w, w[:, :1]], 1), *args[2:], **refs)
    with pytest.raises(ValueError, match=r"^hidden: expected \[N, H\], the packed rows flattened, got \(1, "):
        fused_pair_loss(h[None], w, targets[None], *args[3:], **refs)


def test_a_second_derivative_is_refused_not_wrong():
    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case()
    loss = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig(), ref_chosen=ref[:, 0],
                           ref_rejected=ref[:, 1], bias=b).loss  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^fused_pair_loss: a second derivative \(create_graph=True\)"):
        torch.autograd.grad(loss, h, create_graph=True)  # (the stored gradients have no graph of their own)
