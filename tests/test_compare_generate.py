"""``fastdpo compare``'s generation with the model's KV cache: the same answers as running the whole sequence at
every step (the way it generated before), greedy and sampled, and for a model that returns no cache."""

from __future__ import annotations

import torch
from test_model_packed import make_model

from fastdpo.compare import _generate


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
