"""preference_step against a naive padded, full-logits DPO step written out here (tiny Llama, fp64).

The reference step is the textbook one: pad the 2B sequences, run the whole model with an attention mask, take
log_softmax of the full logits, sum the completion log-probs, and apply the loss formula directly. fastdpo's packed
step (no padding, fused head, and for separable losses the 3-GEMM fused loss) must give the same loss and the
same gradients for every parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.data.packing import pack_pairs
from fastdpo.ops import LossConfig
from fastdpo.train import preference_step

BETA = 0.1


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).double()


def make_pairs(seed: int = 0, count: int = 5) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 101, (n,), generator=gen).tolist()

    return [{"prompt_ids": ids(int(torch.randint(2, 9, (1,), generator=gen))),
             "chosen_ids": ids(int(torch.randint(1, 8, (1,), generator=gen))),
             "rejected_ids": ids(int(torch.randint(1, 8, (1,), generator=gen)))} for _ in range(count)]  # fmt: skip


def naive_sums(model, pairs, with_prompt=False, ld_alpha=None):
    """[B, 2] completion log-prob sums (and ORPO's prompt+chosen token mean NLL), padded batch, full logits;
    ``ld_alpha``: LD-DPO's, the completion tokens past the shorter side's length weighted by it."""
    seqs = [p["prompt_ids"] + p[k] for p in pairs for k in ("chosen_ids", "rejected_ids")]
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[:, :-1]
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    sums, counts = [], []
    for i, s in enumerate(seqs):
        start = len(pairs[i // 2]["prompt_ids"]) - 1  # position t predicts token t + 1
        completion = token_logp[i, start : len(s) - 1]
        if ld_alpha is not None:
            shared = min(len(pairs[i // 2]["chosen_ids"]), len(pairs[i // 2]["rejected_ids"]))
            completion = torch.cat([completion[:shared], ld_alpha * completion[shared:]])
        sums.append(completion.sum())
        counts.append(len(s) - 1 - start)
    sums = torch.stack(sums).view(-1, 2)
    counts = torch.tensor(counts, dtype=torch.float64).view(-1, 2)
    chosen_nll = None
    if with_prompt:  # every next token of the chosen sequences, prompt included
        total = sum(token_logp[2 * b, : len(seqs[2 * b]) - 1].sum() for b in range(len(pairs)))
        chosen_nll = -total / sum(len(seqs[2 * b]) - 1 for b in range(len(pairs)))
    return sums, counts, chosen_nll


def naive_loss(loss_type, policy, reference, pairs):
    pi, counts, nll = naive_sums(policy, pairs, with_prompt=loss_type == "orpo")
    if loss_type == "sigmoid":
        with torch.no_grad():
            ref, _, _ = naive_sums(reference, pairs)
        delta = BETA * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))
        return -F.logsigmoid(delta).mean()
    if loss_type == "ipo":  # on length-averaged log-ratios
        with torch.no_grad():
            ref, _, _ = naive_sums(reference, pairs)
        ratio = (pi[:, 0] - ref[:, 0]) / counts[:, 0] - (pi[:, 1] - ref[:, 1]) / counts[:, 1]
        return ((ratio - 1 / (2 * BETA)) ** 2).mean()
    mean_c, mean_r = pi[:, 0] / counts[:, 0], pi[:, 1] / counts[:, 1]
    if loss_type == "simpo":  # γ = 0.5, no smoothing
        return -F.logsigmoid(BETA * (mean_c - mean_r) - 0.5).mean()
    # orpo: NLL − β·log σ(log odds(π̄_c) − log odds(π̄_r)), log odds(p) = p − log(1 − e^p)
    log_odds = (mean_c - torch.log1p(-torch.exp(mean_c))) - (mean_r - torch.log1p(-torch.exp(mean_r)))
    return nll - (BETA * F.logsigmoid(log_odds)).mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("fused", [True, False])
def test_loss_and_gradients_equal_the_naive_padded_step(loss_type, fused):
    policy, reference = tiny_llama(0), tiny_llama(1)
    pairs = make_pairs()
    expected = naive_loss(loss_type, policy, reference, pairs)
    expected_grads = torch.autograd.grad(expected, list(policy.parameters()))

    batch = pack_pairs(pairs, pack_length=32, backend="python")
    assert batch.input_ids.shape[0] >= 2  # several rows, with row-end padding
    config = LossConfig(loss_type=loss_type, beta=BETA, simpo_gamma=0.5)
    ref = None if config.reference_free else reference
    got = preference_step(policy, batch, config, ref_model=ref, fused=fused, head_impl="torch")
    got_grads = torch.autograd.grad(got.loss, list(policy.parameters()))
    # fp64 both ways: packed-vs-padded attention and chunked-vs-full head differ by rounding only
    torch.testing.assert_close(got.loss, expected, rtol=1e-9, atol=1e-12)
    for (name, _), g, e in zip(policy.named_parameters(), got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10, msg=name)


def naive_wpo_weights(model, pairs):
    """[B] WPO pair weights (TRL 1.16's eq. 2): per sequence exp(mean over completion tokens of log p(y_t) −
    log Σ_v p_v²), chosen × rejected; each sequence alone through the model, full logits, no gradient."""
    means = []
    with torch.no_grad():
        for pair in pairs:
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([pair["prompt_ids"] + pair[key]])
                logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
                start = len(pair["prompt_ids"]) - 1
                token = logp.gather(-1, ids[0, 1:, None])[:, 0]
                aligned = token - torch.logsumexp(2 * logp, -1)
                means.append(aligned[start:].mean())
    weights = torch.exp(torch.stack(means)).view(-1, 2)
    return weights[:, 0] * weights[:, 1]


@pytest.mark.parametrize(("ld_alpha", "use_weighting"), [(0.3, False), (None, True), (0.0, True), (1.0, False)])
def test_ld_alpha_and_wpo_equal_the_naive_padded_step(ld_alpha, use_weighting):
    policy, reference = tiny_llama(0), tiny_llama(1)
    pairs = make_pairs(seed=3, count=6)
    pi, _, _ = naive_sums(policy, pairs, ld_alpha=ld_alpha)
    with torch.no_grad():
        ref, _, _ = naive_sums(reference, pairs, ld_alpha=ld_alpha)
    losses = -F.logsigmoid(BETA * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])))
    weights = naive_wpo_weights(policy, pairs) if use_weighting else torch.ones(len(pairs), dtype=torch.float64)
    assert use_weighting is bool((weights < 0.999).any())  # the weights are not all 1
    expected = (losses * weights).mean()
    expected_grads = torch.autograd.grad(expected, list(policy.parameters()))

    batch = pack_pairs(pairs, pack_length=32, backend="python")
    config = LossConfig(loss_type="sigmoid", beta=BETA)
    got = preference_step(policy, batch, config, ref_model=reference, head_impl="torch", ld_alpha=ld_alpha,
                          use_weighting=use_weighting)  # fmt: skip
    got_grads = torch.autograd.grad(got.loss, list(policy.parameters()))
    if ld_alpha == 1.0:  # every weight 1: the plain step, fused path included, bit for bit
        plain = preference_step(policy, batch, config, ref_model=reference, head_impl="torch")
        assert torch.equal(got.loss, plain.loss)
    # fp64 both ways, as above; the weights carry no gradient in either
    torch.testing.assert_close(got.loss, expected, rtol=1e-9, atol=1e-12)
    for (name, _), g, e in zip(policy.named_parameters(), got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10, msg=name)


def test_reference_free_needs_nothing_and_dpo_needs_a_reference():
    policy = tiny_llama(0)
    batch = pack_pairs(make_pairs(), pack_length=32, backend="python")
    with pytest.raises(ValueError, match="needs ref_model or ref_logps"):
        preference_step(policy, batch, LossConfig(loss_type="sigmoid"))
    reference = copy.deepcopy(policy)
    out = preference_step(policy, batch, LossConfig(loss_type="sigmoid"), ref_model=reference)
    # policy == reference: every log-ratio is 0, so the loss is log 2 and every reward is 0
    torch.testing.assert_close(out.loss, torch.tensor(0.6931471805599453, dtype=out.loss.dtype), rtol=1e-12, atol=0)
    assert float(out.metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-12)


def test_token_metrics_agree_between_the_fused_and_plain_paths():
    policy, reference = tiny_llama(0), tiny_llama(1)
    batch = pack_pairs(make_pairs(seed=4), pack_length=32, backend="python")
    config = LossConfig(loss_type="sigmoid", beta=BETA)
    fused = preference_step(policy, batch, config, ref_model=reference, token_metrics=True, head_impl="torch")
    plain = preference_step(policy, batch, config, ref_model=reference, token_metrics=True, fused=False,
                            head_impl="torch")  # fmt: skip
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        torch.testing.assert_close(fused.metrics[name], plain.metrics[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("split_pairs", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_packed_and_unpacked_steps_give_the_same_gradients(loss_type, split_pairs):
    # the same 6 pairs, once packed several to a row, once one batch per pair (nothing shared): per-pair losses are
    # separable, so the packed batch mean must equal the mean of the single-pair losses, gradients included
    policy, reference = tiny_llama(2), tiny_llama(3)
    pairs = make_pairs(seed=7, count=6)
    config = LossConfig(loss_type=loss_type, beta=BETA)
    ref = None if config.reference_free else reference
    packed = pack_pairs(pairs, pack_length=None if split_pairs else 64, backend="python", split_pairs=split_pairs)
    assert packed.input_ids.shape[0] < 2 * len(pairs)  # some row holds more than one sequence
    loss = preference_step(policy, packed, config, ref_model=ref, head_impl="torch").loss
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    alone = sum(preference_step(policy, pack_pairs([p], pack_length=64), config, ref_model=ref, head_impl="torch").loss
                for p in pairs) / len(pairs)  # fmt: skip
    alone_grads = torch.autograd.grad(alone, list(policy.parameters()))
    torch.testing.assert_close(loss, alone, rtol=1e-12, atol=0)  # fp64: rounding only
    for (name, _), g, e in zip(policy.named_parameters(), grads, alone_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_five_step_trace_follows_the_naive_padded_step(loss_type):
    # golden trace from the naive step: 5 steps on new pairs each time, each engine updating its own copy of the
    # policy from its own gradients (normalized steps of length 0.5, so that IPO's large gradients do not blow the
    # trace up and SimPO's small ones still move it); loss and gradients must agree at every step
    naive_policy, reference = tiny_llama(4), tiny_llama(5)
    policy = copy.deepcopy(naive_policy)
    config = LossConfig(loss_type=loss_type, beta=BETA, simpo_gamma=0.5)
    ref = None if config.reference_free else reference
    moved = None
    for step in range(5):
        pairs = make_pairs(seed=100 + step, count=4)
        expected = naive_loss(loss_type, naive_policy, reference, pairs)
        expected_grads = torch.autograd.grad(expected, list(naive_policy.parameters()))
        got = preference_step(policy, pack_pairs(pairs, pack_length=40), config, ref_model=ref, head_impl="torch")
        got_grads = torch.autograd.grad(got.loss, list(policy.parameters()))
        # fp64 both ways: measured agreement ~1e-16 relative (loss) and ~1e-15 of the gradient norm
        torch.testing.assert_close(got.loss, expected, rtol=1e-12, atol=1e-14, msg=f"step {step}")
        norm = torch.cat([e.flatten() for e in expected_grads]).norm()
        got_norm = torch.cat([g.flatten() for g in got_grads]).norm()
        error = torch.cat([(g - e).flatten() for g, e in zip(got_grads, expected_grads, strict=True)]).norm()
        assert float(error) <= 1e-12 * float(norm), f"step {step}"
        updates = zip(policy.parameters(), naive_policy.parameters(), got_grads, expected_grads, strict=True)
        with torch.no_grad():
            for p, q, g, e in updates:
                p -= 0.5 * g / got_norm
                q -= 0.5 * e / norm
        if step == 0:  # the trace covers real updates: the first step changed the loss of its pairs by > 1%
            moved = abs(float(naive_loss(loss_type, naive_policy, reference, pairs)) / float(expected) - 1)
    assert moved > 0.01


@pytest.mark.parametrize("fused", [True, False])
def test_trainable_tokens_on_a_tied_head_equal_the_naive_padded_step(fused):
    # PEFT's trainable_token_indices on a model whose embedding is tied to its LM head wraps the head as well (a
    # TrainableTokensWrapper): it was refused at the first step ("not a plain nn.Linear"; TRL 1.16 fails there too,
    # AttributeError 'bias'). The policy scores with the trained rows, the reference (adapters off) with the original
    peft = pytest.importorskip("peft")
    from fastdpo.model.adapters import adapter_reference
    from fastdpo.train.step import reference_logps

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                         tie_word_embeddings=True)  # fmt: skip
    pairs = make_pairs()
    tokens = sorted({pair[column][0] for pair in pairs for column in ("prompt_ids", "chosen_ids", "rejected_ids")})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=tokens)
    policy = peft.get_peft_model(LlamaForCausalLM(config).double(), lora)
    assert type(policy.get_output_embeddings()).__name__ == "TrainableTokensWrapper"  # (the case under test)
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    with torch.no_grad():  # trained rows that differ from the original (they start equal), and a LoRA B that is not 0
        for _, parameter in trainable:
            parameter.add_(0.3 * torch.randn_like(parameter))
    pi, _, _ = naive_sums(policy, pairs)
    with torch.no_grad(), policy.disable_adapter():
        ref, _, _ = naive_sums(policy, pairs)
    assert not torch.allclose(pi, ref)  # the policy's rows are its own
    expected = -F.logsigmoid(BETA * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))).mean()
    expected_grads = torch.autograd.grad(expected, [p for _, p in trainable])

    batch = pack_pairs(pairs, pack_length=32, backend="python")
    with torch.no_grad(), adapter_reference(policy):
        ref_logps = reference_logps(policy, batch, impl="torch")
    got = preference_step(policy, batch, LossConfig(loss_type="sigmoid", beta=BETA), ref_logps=ref_logps, fused=fused,
                          head_impl="torch")  # fmt: skip
    got_grads = torch.autograd.grad(got.loss, [p for _, p in trainable])
    # fp64 both ways: packed-vs-padded attention and chunked-vs-full head differ by rounding only
    torch.testing.assert_close(got.loss, expected, rtol=1e-9, atol=1e-12)
    for (name, _), g, e in zip(trainable, got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10, msg=name)
