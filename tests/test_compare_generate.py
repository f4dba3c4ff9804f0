"""``fastdpo compare``'s generation with the model's KV cache: the same answers as running the whole sequence at
every step (the way it generated before), greedy and sampled, and for a model that returns no cache. Its KL
estimate: unbiased, checked against the exact KL of the answers it samples, enumerated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_model_packed import VOCAB, make_model

from fastdpo.compare import _generate, _logps, _scores, _vocabulary, compare


def uncached(model, ids, *, max_new_tokens, eos, sample, generator=None):
    # the reference: the whole sequence again at every step, no cache
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].float()
            draw = torch.multinomial(logits.softmax(-1), 1, generator=generator) if sample else logits.argmax()
            token = int(draw)
            out.append(token)
            if token == eos:
                break
    return out


def test_cached_generation_gives_the_answers_of_whole_sequence_steps(monkeypatch):
    # fp64: the cached and the whole-sequence logits agree to ~1e-15, far below any gap between the top two tokens
    # or any sampling boundary these draws meet
    model = make_model("llama").double()
    lengths = []
    forward = model.forward

    def counted(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    _generate(model, [5, 9, 14, 3], max_new_tokens=5, eos=-1, sample=False)
    assert lengths == [4, 1, 1, 1, 1]  # the prompt once, then one new token per step
    monkeypatch.undo()
    prompts = [[5, 9, 14, 3], [7], list(range(3, 40))]
    for prompt in prompts:
        greedy = _generate(model, prompt, max_new_tokens=12, eos=-1, sample=False)
        assert greedy == uncached(model, prompt, max_new_tokens=12, eos=-1, sample=False) and len(greedy) == 12
        draws = [_generate(model, prompt, max_new_tokens=12, eos=-1, sample=True,
                           generator=torch.Generator().manual_seed(seed)) for seed in range(3)]  # fmt: skip
        expected = [uncached(model, prompt, max_new_tokens=12, eos=-1, sample=True,
                             generator=torch.Generator().manual_seed(seed)) for seed in range(3)]  # fmt: skip
        assert draws == expected


def test_an_answer_stops_at_eos_and_a_model_without_a_cache_still_generates(monkeypatch):
    model = make_model("llama").double()
    first = _generate(model, [5, 9, 14], max_new_tokens=6, eos=-1, sample=False)
    stop = first[2]
    assert _generate(model, [5, 9, 14], max_new_tokens=6, eos=stop, sample=False) == first[: first.index(stop) + 1]
    calls = []
    forward = model.forward

    def no_cache(*args, **kwargs):  # a model that never returns a cache: every step runs the whole sequence
        calls.append(kwargs["input_ids"].shape[1])
        output = forward(*args, **kwargs)
        output.cache = None
        return output

    monkeypatch.setattr(model, "forward", no_cache)
    assert _generate(model, [5, 9, 14], max_new_tokens=6, eos=-1, sample=False) == first
    assert calls == [3, 4, 5, 6, 7, 8]


def peaked_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    # two fp64 models whose next-token distributions are peaked and differ (a random tiny model's are near uniform)
    policy, reference = make_model("llama").double(), make_model("llama").double()
    with torch.no_grad():
        policy.lm_head.weight.mul_(40)
        reference.lm_head.weight.mul_(40).add_(torch.randn_like(reference.lm_head.weight, dtype=torch.float64))
    return policy, reference


def next_token_log_probs(model, prefixes: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():  # one batch of equal-length prefixes, the last position's distribution
        return model(input_ids=torch.tensor(prefixes)).logits[:, -1].log_softmax(-1)


def test_the_kl_estimate_averages_to_the_exact_kl_of_the_answers_it_samples():
    # answers of up to 2 tokens, stopping at EOS: KL(π ‖ π_ref) over them, exactly, by enumerating the first token
    policy, reference = peaked_pair()
    prompt, eos = [5, 9, 14], 7
    p1, r1 = (next_token_log_probs(m, [prompt])[0] for m in (policy, reference))
    seconds = [[*prompt, t] for t in range(VOCAB)]
    p2, r2 = next_token_log_probs(policy, seconds), next_token_log_probs(reference, seconds)
    step2 = (p2.exp() * (p2 - r2)).sum(-1)  # the second token's KL after each first token
    step2[eos] = 0.0  # an answer ends at EOS
    exact = float((p1.exp() * (p1 - r1)).sum() + (p1.exp() * step2).sum())
    assert exact > 0.1  # 0.31 nats, far from zero: the check below could not pass by both being ~0
    # the estimate of one answer is Σ_t KL of its next-token distributions; its expectation over the answers the
    # policy samples (the first token weighted by π; the second token does not change it) is the exact KL
    answers = [[t] if t == eos else [t, 3] for t in range(VOCAB)]
    estimates = torch.tensor([_scores(policy, reference, prompt, answer)[1] for answer in answers], dtype=torch.float64)
    # fp64 sums over 160 tokens: agreement to ~1e-13; 1e-9 leaves room
    assert float((p1.exp() * estimates).sum()) == pytest.approx(exact, rel=1e-9)
    # and the log-ratio of an answer is its log π − log π_ref
    ratio, _ = _scores(policy, reference, prompt, [11, 3])
    assert ratio == pytest.approx(float(p1[11] - r1[11] + p2[11, 3] - r2[11, 3]), rel=1e-9)


def test_compare_reports_the_mean_of_its_samples_kl():
    # one-token answers: every sample's estimate is the exact KL of the first token's distribution, whatever it drew
    policy, reference = peaked_pair()
    tokenizer = SimpleNamespace(eos_token_id=7, bos_token_id=1, chat_template=None, decode=lambda ids: str(ids))
    prompts = [("a", [5, 9, 14]), ("b", [20, 21])]
    rows = compare(policy, reference, tokenizer, prompts, samples=3, max_new_tokens=1, beta=0.5)
    for (_, prompt), row in zip(prompts, rows, strict=True):
        p1, r1 = (next_token_log_probs(m, [prompt])[0] for m in (policy, reference))
        exact = float((p1.exp() * (p1 - r1)).sum())
        assert len(row.samples) == 3 and row.kl_estimate == pytest.approx(exact, rel=1e-9)
        assert all(answer.kl == pytest.approx(exact, rel=1e-9) for answer in row.samples)


def test_the_kl_of_two_near_equal_models_is_not_negative():
    # fp32, a policy a hair from its reference: each position's KL rounds to a few ulps either side of 0; the
    # estimate keeps KL's sign (the sweep of a 3-step run printed -0.000 before)
    policy, reference = make_model("llama"), make_model("llama")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(1e-6 * torch.randn_like(parameter))
    tokenizer = SimpleNamespace(eos_token_id=7, bos_token_id=1, chat_template=None, decode=lambda ids: str(ids))
    prompts = [(str(i), [5 + i, 9, 14]) for i in range(8)]
    rows = compare(policy, reference, tokenizer, prompts, samples=2, max_new_tokens=6)
    kls = [answer.kl for row in rows for answer in (row.policy, row.reference, *row.samples)]
    assert min(kls) >= 0 and max(kls) < 1e-4  # ~1e-6 measured: two models this close


def test_a_prompt_that_starts_with_its_name_is_not_labelled_twice():
    from fastdpo.compare import Answer, Row, html_page, markdown, summary

    answer = Answer(text="50", tokens=2, reward=0.1)
    rows = [Row("prev", "prev: 51 ", 4, False, answer, answer), Row("emoji", "🙂🚀", 3, False, answer, answer)]
    for page in (markdown(rows, summary(rows), None, 0.1), html_page(rows, summary(rows), None, 0.1)):
        assert "prev: 51" in page and "prev: prev:" not in page and "emoji: 🙂🚀" in page


def test_an_answer_stops_at_the_generation_configs_eos_ids_too():
    # ChatML's <|im_end|>, Llama 3's <|eot_id|>: the generation config's EOS (an int or a list), not the tokenizer's
    model = make_model("llama").double()
    prompt = [5, 9, 14]
    first = _generate(model, prompt, max_new_tokens=5, eos=-1, sample=False)
    tokenizer = SimpleNamespace(eos_token_id=None, bos_token_id=1, chat_template=None, decode=lambda ids: str(ids))
    for eos in ([first[0], 3], first[0]):
        model.generation_config.eos_token_id = eos
        (row,) = compare(model, model, tokenizer, [("a", prompt)], max_new_tokens=5)
        # it ended at its first token, which the text leaves out as it leaves out the tokenizer's EOS
        assert (row.policy.tokens, row.policy.text, row.reference.tokens) == (1, "[]", 1), eos
    model.generation_config.eos_token_id = -1
    assert compare(model, model, tokenizer, [("a", prompt)], max_new_tokens=5)[0].policy.tokens == 5


class NoLogitsToKeep(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep``: every position's logits, cut afterwards."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def full_log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():  # every position, the LM head on all of them
        return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_scores_run_the_lm_head_on_the_answer_positions_only_and_equal_full_logits_in_fp64():
    policy, reference = peaked_pair()
    prompt, answer = list(range(3, 40)), [11, 3, 7, 20]
    seen = []  # the positions the LM head computes, per call
    hook = policy.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    ratio, kl = _scores(policy, reference, prompt, answer)
    vocab = _vocabulary(policy, reference)
    (chosen,) = _logps(policy, [(prompt, answer)], vocab)
    _generate(policy, prompt, max_new_tokens=1, eos=-1, sample=False)
    hook.remove()
    # the answer's positions and the one before them (not the 37 of the prompt); the first token: the last position
    assert seen == [len(answer) + 1, len(answer) + 1, 1]
    ids = prompt + answer
    p, r = full_log_probs(policy, ids)[len(prompt) - 1 : -1], full_log_probs(reference, ids)[len(prompt) - 1 : -1]
    target = torch.tensor(answer)[:, None]
    want_ratio = float(p.gather(-1, target).sum() - r.gather(-1, target).sum())
    want_kl = float((p.exp() * (p - r)).sum())
    # fp64 both ways, the same sums over 4 positions: agreement to ~1e-14
    assert ratio == pytest.approx(want_ratio, rel=1e-9) and kl == pytest.approx(want_kl, rel=1e-9)
    assert chosen == pytest.approx(float(p.gather(-1, target).sum()), rel=1e-9)
    # a model without logits_to_keep: every position computed, then cut; the same numbers
    wrapped = NoLogitsToKeep(policy), NoLogitsToKeep(reference)
    assert _scores(*wrapped, prompt, answer) == pytest.approx((ratio, kl), rel=1e-12)
    assert _logps(wrapped[0], [(prompt, answer)], vocab) == pytest.approx([chosen], rel=1e-12)
