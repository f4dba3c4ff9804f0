"""Two checks of what fastdpo assumes about a model, each run once per model on a probe of a few tokens, before
its first packed forward (``packed_body``); the model's own forward is the reference:

- ``check_head``: the model's logits are ``head_spec``'s on its body's last hidden states. fastdpo never runs the
  LM head's forward, so a model whose forward transforms the states first (ELECTRA's generator predictions: a dense
  layer, GELU and a norm before its head) or its logits after, in a way ``head_spec`` does not know, was trained on
  other log-probs than its own without a word (9 nats apart on a tiny ELECTRA).
- ``check_padding``: the body's states of a sequence do not change when padding follows it in its row, as
  ``_unpacked_body`` pads each segment at its end. Bidirectional attention (XLNet's default ``attn_type="bi"``) and
  masks that assume padding on the left (CPM-Ant) read it: their log-probs were 0.2 to 2 nats off, silently.

Both run in eval mode (no dropout; bitsandbytes' layers as training runs them) without gradients, setting the
modules' training flags alone and putting them back. They are skipped for sharded models (FSDP, DeepSpeed ZeRO-3),
whose forward outside the engine would not gather the weights, or would not run in step with the other processes.
They are a net, not a proof: a model that departs from what fastdpo assumes only for other inputs than the probe's
passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from fastdpo.errors import ConfigError
from fastdpo.model.attention import attends_per_sequence, per_sequence_step

PROBE_TOKENS = 3  # real tokens of the probe
PROBE_PADDING = 13  # padding after them in the padding check: most of the row, so that attention to it shows
PAD_ID = 0  # what _unpacked_body pads a row's segments with


def check_head(model: nn.Module, implementation: str | None = None) -> None:
    """A ConfigError where the model's own logits on a probe are not ``head_spec``'s logits of its body's states
    (``model``: a transformers causal LM or its PEFT wrapper; ``implementation``: its attention's now, the model's
    own where None). Once per model (kept on the transformers model); the trainers run it when they are built (a
    model on the training device), ``packed_body`` before its first forward. The class's forward is run: the
    trainers set the instance's to their step."""
    from fastdpo.model.packed import _unwrap, head_spec, not_a_body

    inner, body = _unwrap(model), model.get_decoder()
    if getattr(inner, "_fastdpo_head_checked", False) or _sharded(inner):
        return
    if not_a_body(model, inner, body) is not None:
        return  # (no body to run without the head: packed_body refuses the model)
    implementation = implementation or getattr(inner.config, "_attn_implementation", None)
    name = type(inner).__name__
    head = head_spec(model)
    ids = _probe_ids(model)
    per_sequence = bool(implementation) and attends_per_sequence(implementation)
    # (attention per sequence takes the sequence's bounds, and fastdpo_varlen runs only inside a packed step)
    bounds = torch.tensor([0, ids.shape[1]], dtype=torch.int32, device=ids.device)
    kwargs = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": ids.shape[1],
              "max_length_k": ids.shape[1], "position_ids": _positions(ids)} if per_sequence else {}  # fmt: skip
    step = per_sequence_step(inner, implementation) if per_sequence else nullcontext()
    seen: list = []  # (the body's states as the model's own forward computes them: one forward, not two)

    def keep(module, args, output) -> None:
        seen.append(getattr(output, "last_hidden_state", None))

    hook = body.register_forward_hook(keep)
    try:
        with _evaluating(inner), torch.no_grad(), step:
            own = type(inner).forward(inner, input_ids=ids, use_cache=False, **kwargs).logits
            if len(seen) != 1 or seen[0] is None:  # (a forward that ran its body otherwise: run as packed_body runs it)
                seen = [body(input_ids=ids, use_cache=False, **kwargs).last_hidden_state]
    finally:
        hook.remove()
    with torch.no_grad():
        states = seen[-1]
        if states.shape[-1] != head.weight.shape[-1]:
            raise ConfigError(
                f"{name}'s body gives hidden states of {states.shape[-1]} features and its LM head takes "
                f"{head.weight.shape[-1]}: its forward transforms the states before the head, which fastdpo does not",
                column="model",
                fix="train this model with TRL's own trainer, or use a decoder-only *ForCausalLM (Llama, Qwen, "
                "Gemma, Mistral, ...)",
            )
        ours = head.logits(states.to(head.weight.dtype))
    apart = _apart(own, ours)
    if apart > _tolerance(own, ours):
        raise ConfigError(
            f"{name}'s own log-probs differ from those of its LM head on its body's hidden states ({apart:.3g} "
            "apart on a probe of a few tokens): its forward transforms the states before the head, or the logits "
            "after it, in a way fastdpo does not know",
            column="model",
            fix="train this model with TRL's own trainer, or use a decoder-only *ForCausalLM (Llama, Qwen, Gemma, "
            "Mistral, ...)",
        )
    inner._fastdpo_head_checked = True


def check_padding(body: nn.Module, device: torch.device, model: nn.Module | None = None) -> None:
    """A ConfigError where ``body``'s states of a probe change when padding follows it in its row (``_unpacked_body``
    pads so), or, with ``model`` (whose body it is), the log-probs its head gives them. Once per body (kept on it)."""
    from fastdpo.model.packed import head_spec

    if getattr(body, "_fastdpo_padding_checked", False) or _sharded(body):
        return
    vocab = body.get_input_embeddings().weight.shape[0]
    ids = _ids(vocab, device)
    padded = torch.cat([ids, torch.full((1, PROBE_PADDING), PAD_ID, dtype=ids.dtype, device=device)], dim=1)
    with _evaluating(body), torch.no_grad():
        alone = body(input_ids=ids, position_ids=_positions(ids), use_cache=False).last_hidden_state
        read = body(input_ids=padded, position_ids=_positions(padded), use_cache=False).last_hidden_state
    change = _relative_change(alone, read[:, : ids.shape[1]])
    if model is not None and change <= _PADDING_CHANGE:  # (what matters: a change the head reads; a state the head
        head = head_spec(model)  # does not read, as large as all others together, hid one in the states alone)
        with torch.no_grad():
            logits = [head.logits(states.to(head.weight.dtype)) for states in (alone, read[:, : ids.shape[1]])]
        scale = max(logits[0].float().abs().max().item(), 1.0)
        change = max(change, _apart(*logits) / scale)
    if not change <= _PADDING_CHANGE:  # (NaN: refused too)
        raise ConfigError(
            f"{type(body).__name__}'s hidden states of a sequence change when padding follows it (by {change:.3g} "
            "of their size, or of the largest logit in the log-probs its head reads from them): it attends to "
            "later positions or masks padding its own way, so its sequences can be run neither packed nor padded "
            "at their end",
            column="model",
            fix="train this model with TRL's own trainer, or use a decoder-only *ForCausalLM (Llama, Qwen, Gemma, "
            "Mistral, ...)",
        )
    body._fastdpo_padding_checked = True


# a sequence's states alone and before padding, in half precision: products of 3 against 16 rows may sum in
# another order (measured in bf16 on 32-layer bodies of 5 unpacked families: up to 0.018 of the states' size, and
# head log-probs up to 0.015 of the largest logit); attention to 13 padding tokens of 16 moves both by 1.3-1.5
_PADDING_CHANGE = 0.1


def _relative_change(alone: Tensor, read: Tensor) -> float:
    """The largest change of a token's states, relative to their size (L2 over the features): not to the largest
    state, which one very large feature (as trained models have) would make vacuous."""
    alone, read = alone.float(), read.float()
    return ((read - alone).norm(dim=-1) / alone.norm(dim=-1).clamp_min(1e-6)).max().item()


def _apart(own: Tensor, ours: Tensor) -> float:
    """The largest difference of the two logits' log-probs (fp32)."""
    return (own.float().log_softmax(-1) - ours.float().log_softmax(-1)).abs().max().item()


def _tolerance(own: Tensor, ours: Tensor) -> float:
    """Rounding of the logits: the model's in its dtype (its head's output, a transform after it in that dtype)
    against fastdpo's, 4 units of the last place of the largest logit; 1e-4 of it in fp32. Measured on tiny models
    of 20 families in bf16 and fp16 (max|z| up to 95, under autocast too): 0 apart but MiniCPM3, which divides the
    states before its head where fastdpo divides the logits, at up to 1.04 units; 8 units let a shift of 1.9 nats
    after the head through in bf16 (4: 0.9 at a largest logit of 30)."""
    dtype = own.dtype if own.dtype.itemsize < ours.dtype.itemsize else ours.dtype
    unit = 4 * torch.finfo(dtype).eps if dtype.itemsize < 4 else 1e-4
    return 1e-4 + unit * max(own.float().abs().max().item(), ours.float().abs().max().item())


def _probe_ids(model: nn.Module) -> Tensor:
    weight = model.get_input_embeddings().weight
    return _ids(weight.shape[0], weight.device)


def _ids(vocab: int, device: torch.device) -> Tensor:
    """``PROBE_TOKENS`` ordinary ids (not 0, the padding; spread over the vocabulary), ``[1, PROBE_TOKENS]``."""
    picks = [(vocab * (k + 1)) // (PROBE_TOKENS + 2) for k in range(PROBE_TOKENS)]
    return torch.tensor([[max(1, min(vocab - 1, p)) for p in picks]], device=device)


def _positions(ids: Tensor) -> Tensor:
    return torch.arange(ids.shape[1], device=ids.device)[None]


_QUANTIZED = ("Params4bit", "Int8Params")  # bitsandbytes' weights


def _sharded(module: nn.Module) -> bool:
    """Whether any weight is a shard (FSDP2's DTensor, FSDP's flat parameter, a DeepSpeed ZeRO-3 parameter)."""
    return any(hasattr(p, "ds_id") or type(p).__name__ in ("DTensor", "FlatParameter") for p in module.parameters())


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) within, but its quantized linear layers, in training mode: bitsandbytes
    runs other kernels in eval mode than training does (its CPU inference kernel failed on a tiny model's rows that
    training ran; a model is in eval mode when it is loaded)."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:  # (the flags alone: a model's own train()/eval() may do more, e.g. swap use_kernels' kernels)
        m.training = type(getattr(m, "weight", None)).__name__ in _QUANTIZED
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
