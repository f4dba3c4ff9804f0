"""Run a Hugging Face causal LM on a ``PackedBatch``: the body's hidden states, then the fused head's log-probs.

What it does, in plain transformers + torch (eager/sdpa/flex; flash flattens the rows, see below)::

    hidden = model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 use_cache=False).last_hidden_state.flatten(0, 1)     # [R·L, H]
    z = hidden @ lm_head.weight.T (+ bias); z = z * logit_scale; z = softcap * tanh(z / softcap)
    logp = z.log_softmax(-1).gather(-1, targets)                                      # [R·L], 0 where -100
    seq_logps = segment_sum(logp, batch.cu_seqlens)                                   # [S]

Why no attention mask and no cache: transformers (``masking_utils._preprocess_mask_arguments``) derives the
block-diagonal mask of packed sequences from ``position_ids`` only when ``attention_mask is None`` and
``cache is None``. An all-ones mask, or ``use_cache`` left at the config's default (a ``DynamicCache`` is made),
turns that detection off and every sequence silently attends to the ones before it in its row. The flash-attention
path never builds a mask: it isolates sequences only through ``cu_seq_lens_q/k`` (or position ids at batch size 1),
so for flash the rows are flattened into one row of ``R·L`` tokens and the batch's ``cu_seqlens`` are passed.
Bodies whose masks never see ``position_ids`` (OPT, Bloom, GPT-OSS, ...; found in their first forward, see
``_masked_body``) run each segment alone in a padded row instead (``_unpacked_body``). What this assumes of a
model (its logits are the head's on the body's states; padding after a sequence changes nothing before it) is
checked once per model on a probe (``fastdpo.model.probe``).
fastdpo's own ``fastdpo_varlen`` (``fastdpo.model.attention``: causal attention per sequence, flash's varlen kernel
inside torch on a GPU) runs the same way.

The LM head's own forward is never run: ``run_head`` runs fastdpo's head function in its place (so wrappers'
hooks on the head module still fire), and ``head_spec`` reads its weight and the transformations the model family
applies to the logits (Gemma-2/3 final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``) and
``fastdpo.ops.linear_logprobs`` computes the log-probs without the ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdpo.data.packing import IGNORE_INDEX, PackedBatch
from fastdpo.errors import ConfigError
from fastdpo.model.attention import (
    VARLEN,
    attends_per_sequence,
    carries_state,
    per_sequence_step,
    register_varlen_attention,
    switched_attention,
)
from fastdpo.model.hooks import forward_as
from fastdpo.model.offload import offload_activations as _offload
from fastdpo.model.probe import PAD_ID, check_head, check_padding
from fastdpo.ops import LinearLogprobs, linear_logprobs, segment_sum
from fastdpo.ops.segments import ld_token_weights

# Attention implementations for which transformers builds the packed (block-diagonal) mask from position_ids.
MASK_BACKENDS = ("eager", "sdpa", "flex_attention")

register_varlen_attention()  # a name in transformers' registry; nothing runs until a model is switched to it


# ---------------------------------------------------------------------------------------------------------------------
# The LM head
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """What a causal LM's head computes from the last hidden state, as ``linear_logprobs`` takes it.

    In plain torch (``logits``)::

        z = hidden @ weight.T + bias
        z = z * logit_scale
        z = softcap * tanh(z / softcap)     # when softcap is set
    """

    weight: Tensor
    """[V, H] the output embedding (the input embedding's weight when they are tied)."""
    bias: Tensor | None = None
    """[V] or None."""
    logit_scale: float = 1.0
    """Multiplies the logits: Cohere's ``logit_scale``; ``1 / logits_scaling`` for Granite (which divides)."""
    softcap: float | None = None
    """Gemma-2/3 ``final_logit_softcapping``; None for none."""

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., V]`` logits of ``hidden [..., H]``, materialized (a reference for tests and debugging)."""
        z = nn.functional.linear(hidden, self.weight, self.bias) * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


@dataclass(frozen=True)
class _HeadRule:
    scale: str | None = None  # config attribute that multiplies the logits
    divide: str | None = None  # config attribute that divides them
    softcap: str | None = None  # config attribute of the tanh soft-cap


_COHERE = _HeadRule(scale="logit_scale")
_GRANITE = _HeadRule(divide="logits_scaling")
_GEMMA = _HeadRule(softcap="final_logit_softcapping")

# How each family's ForCausalLM.forward transforms `lm_head(hidden)`, read from transformers' modeling code. The same
# config attribute means different things in different families (HyperCLOVA X multiplies by `logits_scaling`, Granite
# divides; Gemma3ForConditionalGeneration ignores `final_logit_softcapping`, Gemma3ForCausalLM applies it), so only
# the class decides. Classes not listed have a plain linear head, which is checked: see _HEAD_ATTRIBUTES.
_HEAD_RULES: dict[str, _HeadRule] = {
    "CohereForCausalLM": _COHERE,
    "Cohere2ForCausalLM": _COHERE,
    "Cohere2MoeForCausalLM": _COHERE,
    "GraniteForCausalLM": _GRANITE,
    "GraniteMoeForCausalLM": _GRANITE,
    "GraniteMoeSharedForCausalLM": _GRANITE,
    "GraniteMoeHybridForCausalLM": _GRANITE,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "Gemma4ForCausalLM": _GEMMA,
    "BeamForCausalLM": _GEMMA,
    "VaultGemmaForCausalLM": _GEMMA,
    "NanoChatForCausalLM": _GEMMA,
    "GraniteSWAForCausalLM": _GRANITE,
    "GraniteMoeSWAForCausalLM": _GRANITE,
    "HyperCLOVAXForCausalLM": _HeadRule(scale="logits_scaling"),
    "MiniCPM3ForCausalLM": _HeadRule(divide="logits_scaling"),  # (the hidden states, before a head without bias)
    "FalconH1ForCausalLM": _HeadRule(scale="lm_head_multiplier"),
}

# Config attributes with which some transformers family changes its logits after the LM head, and the values that
# leave them unchanged. A class not in _HEAD_RULES whose config sets one of these to anything else is refused.
_HEAD_ATTRIBUTES: dict[str, tuple] = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "logits_mup_width_multiplier": (None, 1, 1.0),
    "output_logit_soft_cap": (None,),
    "logits_soft_cap": (None,),
    "mup_enabled": (None, False),
}


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT wrappers forward attributes to the transformers model; the class that decides the head is the inner one
    # (torch.compile's wrapper first: its class has no forward of its own, its name no head rule)
    model = getattr(model, "_orig_mod", model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _ds_numel(weight: Tensor) -> int:
    """A DeepSpeed ZeRO-3 parameter's full size (its ``numel()`` is 0 while it is partitioned)."""
    return int(getattr(weight, "ds_numel", weight.numel()))


def full_shape(weight: Tensor) -> tuple[int, ...]:
    """A parameter's shape, whole where DeepSpeed ZeRO-3 partitioned it (its ``ds_shape``: the tensor is empty)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


class _Rest:
    """What ``run_head``'s function returns beside its differentiable tensor, opaque to wrappers' output hooks."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head module the model's forward runs now: for a head in PEFT's ``modules_to_save`` (TRL's SFT adds it
    there when a chat template adds tokens), the active adapter's trained copy, or the original with adapters off."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head).__name__ != "ModulesToSaveWrapper":
        return head
    active = list(head.active_adapters)
    if head.disable_adapters or not active or active[0] not in head.modules_to_save:  # (as its forward decides)
        return head.original_module
    return head.modules_to_save[active[0]]


def run_head(model: nn.Module, fn: Callable, hidden: Tensor):
    """``fn(hidden, head_spec(model))`` run as the LM head module's forward; ``fn`` returns ``(tensor, rest)``.

    Returns ``(tensor, rest)``, where ``tensor`` is the head module's output: use it (not the one ``fn`` made) for
    the loss. Calling the module, not reading its weight from outside, is what lets a wrapper that materializes
    parameters around a module's forward and backward do so for the head: DeepSpeed ZeRO-3 gathers the weight in
    its pre-forward hook and again before the head's backward (a hook on that output tensor), and FSDP2 does the
    same when the head is sharded on its own. Without a wrapper it is a plain call.
    """
    head = output_head(model)
    if head is None:  # head_spec says what is wrong
        head_spec(model)

    def forward(states: Tensor):
        tensor, rest = fn(states, head_spec(model))
        return tensor, _Rest(rest)

    with forward_as(head, forward):
        tensor, rest = head(hidden)
    return tensor, rest.value


def _config_value(config, name: str) -> float | None:
    value = getattr(config, name, None)
    return None if value is None else float(value)


def head_softcap(model: nn.Module) -> float | None:
    """The tanh soft-cap of the model's logits (``HeadSpec.softcap``), from its class and config alone: nothing of
    the head is read (under ZeRO-3 its weight is partitioned outside its forward)."""
    inner = _unwrap(model)
    rule = _HEAD_RULES.get(type(inner).__name__)
    if rule is None or rule.softcap is None:
        return None
    return _config_value(inner.config.get_text_config(), rule.softcap)


def _owns(model: nn.Module, head: nn.Module | None) -> bool:
    """Whether ``head`` is ``model``'s own child, or one of a transformers model it holds (a multimodal model's
    language model): not a layer inside a head block of its own (BERT's ``cls.predictions.decoder``)."""
    from transformers import PreTrainedModel

    return any(child is head or (isinstance(child, PreTrainedModel) and _owns(child, head))
               for child in model.children())  # fmt: skip


# packages whose layers replace a plain linear one: adapters and quantization (transformers' own quantized layers
# live in transformers.integrations; a model's own head class in transformers.models)
_WRAPPERS = ("peft", "bitsandbytes", "torchao", "optimum", "awq", "hqq", "gptqmodel", "auto_gptq",
             "compressed_tensors", "quanto", "fbgemm_gpu")  # fmt: skip


def head_spec(model: nn.Module) -> HeadSpec:
    """The ``HeadSpec`` of a transformers ``*ForCausalLM`` model (or a PEFT wrapper of one).

    Raises ConfigError when the model has no linear LM head (none, LoRA on the head, packed quantized weights) or when
    its config sets a logit transformation fastdpo does not know for that class.
    """
    inner = _unwrap(model)
    name = type(inner).__name__
    head = output_head(model)
    if head is None:
        raise ConfigError(
            f"{name} has no LM head (get_output_embeddings() is None)",
            column="model",
            fix="pass the *ForCausalLM model, not its base model",
        )
    if not _owns(inner, inner.get_output_embeddings()):  # (BERT-style: dense, activation and norm first; RoBERTa's
        raise ConfigError(  # positions from padding_idx + 1 besides: log-probs 0.8 nats off, silently)
            f"{name}'s LM head sits inside a block of its own, whose forward fastdpo does not run (BERT's transforms "
            "the hidden states before its last layer): fastdpo scores the body's states with that layer alone",
            column="model",
            fix="use a decoder-only *ForCausalLM (Llama, Qwen, Gemma, Mistral, ...)",
        )
    # PEFT's trainable_token_indices on a model whose embedding is tied to its head wraps the head too: its weight
    # reads as the linear's with the trained rows in (the linear's own with adapters off), its forward is that
    linear = head.original_module if type(head).__name__ == "TrainableTokensWrapper" else head
    weight = getattr(linear, "weight", None)  # (the wrapper's, with its rows in, once the linear's is checked)
    # subclasses that only add hooks (FSDP2 wraps the class) are fine; ones with their own forward (quantized
    # layers, custom heads) compute something else; LoRA's wrapper is no nn.Linear at all
    plain = isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward
    if not plain or not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else None  # (torch.ao's quantized: a method)
        module = type(head).__module__
        wrapped = module.split(".")[0] in _WRAPPERS or module.startswith(("transformers.integrations", "torch.ao"))
        raise ConfigError(
            f"{name}'s LM head is a {type(head).__name__} with weight {shape}, not a plain nn.Linear [V, H]",
            column="model",
            fix="merge adapters on the LM head and do not quantize it (e.g. bitsandbytes' llm_int8_skip_modules)"
            if wrapped
            else "a head of the model's own kind: train this model with TRL's own trainer",
        )
    if type(weight).__name__ == "DTensor" or (hasattr(weight, "ds_id") and weight.numel() != _ds_numel(weight)):
        raise ConfigError(
            f"{name}'s LM head weight is sharded (FSDP2 DTensor or DeepSpeed ZeRO-3 parameter) outside its forward",
            column="model",
            fix="compute log-probs through fastdpo.model (run_head calls the head module, so the wrapper gathers it)"
            + ("; a head holding trainable_token_indices' rows is not gathered so: train it unsharded, or untie it"
               if linear is not head else ""),
        )  # fmt: skip
    weight = head.weight if linear is not head else weight
    config = inner.config.get_text_config()
    rows, kept = full_shape(weight)[0], getattr(config, "unpadded_vocab_size", None)
    if kept is not None and kept != rows:  # (the model cuts its logits to the first ones: a softmax over fewer)
        raise ConfigError(
            f"{name} keeps the first {kept} of its head's {rows} logits (unpadded_vocab_size), which fastdpo's head "
            "does not",
            column="model",
            fix="use a model whose head rows are its vocabulary",
        )
    rule = _HEAD_RULES.get(name)
    if rule is None:
        for attribute, neutral in _HEAD_ATTRIBUTES.items():
            value = getattr(config, attribute, None)
            if value not in neutral:
                raise ConfigError(
                    f"{name} sets {attribute}={value!r} in its config, and fastdpo does not know how this class "
                    f"applies it to the logits (it knows {', '.join(sorted(_HEAD_RULES))})",
                    column="model",
                    fix="add the class to fastdpo.model.packed._HEAD_RULES after checking its forward, or use a "
                    "supported family",
                )
        return HeadSpec(weight=weight, bias=linear.bias)
    logit_scale = 1.0
    if rule.scale and (scale := _config_value(config, rule.scale)) is not None:
        logit_scale *= scale
    if rule.divide and (divisor := _config_value(config, rule.divide)) is not None:
        logit_scale /= divisor
    return HeadSpec(weight=weight, bias=linear.bias, logit_scale=logit_scale, softcap=head_softcap(inner))


# ---------------------------------------------------------------------------------------------------------------------
# The body on a packed batch
# ---------------------------------------------------------------------------------------------------------------------


def not_a_body(model: nn.Module, inner: nn.Module, body: nn.Module) -> str | None:
    """What ``model.get_decoder()`` (``body``) gives where it is no body to run without the head (Llama4: the whole
    model, ModernBERT-decoder: its LM head); None where it is one."""
    if body is inner.get_output_embeddings():
        return "its LM head"
    return "the whole model" if body is inner or body is model else None


def _recomputes(model: nn.Module) -> bool:
    """Whether a forward now will be recomputed in the backward (gradient checkpointing with gradients on)."""
    inner = _unwrap(model)
    # transformers 5 renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing
    new = hasattr(type(inner), "is_activation_checkpointing")
    name = "is_activation_checkpointing" if new else "is_gradient_checkpointing"
    return torch.is_grad_enabled() and bool(getattr(inner, name, False))


def _check_batch(batch: PackedBatch) -> None:
    if batch.input_ids.dim() != 2 or batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError(
            f"batch: input_ids {tuple(batch.input_ids.shape)} and position_ids {tuple(batch.position_ids.shape)} "
            "must both be [R, L]"
        )
    if batch.cu_seqlens.device.type == "cpu" and int(batch.cu_seqlens[-1]) != batch.input_ids.numel():
        raise ValueError(
            f"batch: cu_seqlens ends at {int(batch.cu_seqlens[-1])}, not at the {batch.input_ids.numel()} tokens "
            "of input_ids (it must cover every row, row-end padding included)"
        )


class BodyOutput(NamedTuple):
    """What ``packed_body`` returns."""

    hidden: Tensor
    """[R·L, H] last hidden states."""
    router_logits: tuple[Tensor, ...] | None
    """Mixture-of-experts models asked for them: one [R·L, experts] tensor per MoE layer; else None."""


def packed_hidden_states(
    model: nn.Module, batch: PackedBatch, *, attn_implementation: str | None = None
) -> torch.Tensor:
    """``[R·L, H]`` last hidden states of the model's body (no LM head, no logits) on a packed batch.

    Args:
        model: a transformers ``*ForCausalLM`` (or a PEFT wrapper of one); its body is ``model.get_decoder()``.
        batch: the packed batch; moved to the model's device when it is elsewhere.
        attn_implementation: run with this attention implementation (switched with transformers'
            ``set_attn_implementation`` for the call and switched back); None keeps the model's own. ``eager``,
            ``sdpa`` and ``flex_attention`` get the packed mask from ``position_ids``; ``*flash*`` implementations get
            ``cu_seq_lens_q/k`` over the rows flattened into one, and so does ``fastdpo_varlen``. Anything else is
            refused: transformers builds no mask for it, so packed sequences would attend to each other. The switch
            lasts for this call only, so it is refused where the backward would recompute the body (gradient
            checkpointing with gradients on): hold ``fastdpo.model.use_attention`` across forward and backward.

    Sequences never see each other: ``use_cache=False`` and no attention mask are both required for that (see the
    module docstring), so neither can be passed.
    """
    return packed_body(model, batch, attn_implementation=attn_implementation).hidden


def packed_body(
    model: nn.Module,
    batch: PackedBatch,
    *,
    attn_implementation: str | None = None,
    output_router_logits: bool = False,
    offload_activations: bool = False,
) -> BodyOutput:
    """``packed_hidden_states``, and a mixture-of-experts body's router logits when asked (for the aux loss).

    ``offload_activations``: what autograd saves in the body waits in host memory until the backward
    (``fastdpo.model.offload``; nothing moves on a CPU).
    """
    _check_batch(batch)
    device = model.get_input_embeddings().weight.device
    if batch.input_ids.device != device:
        batch = batch.to(device)
    body = model.get_decoder()
    inner = _unwrap(model)
    what = not_a_body(model, inner, body)
    if what is not None:
        raise ConfigError(f"{type(inner).__name__}.get_decoder() gives {what}, not a body to run without the head",
                          column="model", fix="train this model with TRL's own trainer")  # fmt: skip
    extra = {"output_router_logits": True} if output_router_logits else {}
    offload = _offload(model) if offload_activations else nullcontext()
    if attn_implementation not in (None, _unwrap(model).config._attn_implementation) and _recomputes(model):
        raise ConfigError(
            f"switching attention to {attn_implementation!r} for one forward: gradient "
            "checkpointing would recompute the layers in the backward with the model's own implementation",
            column="attn_implementation",
            fix="wrap forward and backward in fastdpo.model.use_attention([model], ...) instead",
        )
    with switched_attention(model, attn_implementation) as implementation, offload:
        check_head(model, implementation)  # (once per model: its logits are those of fastdpo's head)
        if attends_per_sequence(implementation) and implementation != VARLEN and carries_state(inner.config):
            output = _unpacked_body(body, batch, extra, model)  # (its own flash: each sequence alone, padded)
        elif attends_per_sequence(implementation):
            # transformers' flash path isolates sequences only at batch size 1 (varlen kernels over one token axis)
            with per_sequence_step(inner, implementation):
                output = body(
                    input_ids=batch.input_ids.reshape(1, -1),
                    position_ids=batch.position_ids.reshape(1, -1),
                    use_cache=False,
                    **batch.flash_attn_kwargs(),
                    **extra,
                )
        elif implementation in MASK_BACKENDS:
            output = _masked_body(body, batch, extra, model)
        else:
            raise ConfigError(
                f"attention implementation {implementation!r} gets no packed-sequence mask from transformers, so "
                "packed sequences would attend to each other",
                column="attn_implementation",
                fix=f"use one of {', '.join(MASK_BACKENDS)} or a flash-attention implementation",
            )
    hidden = output.last_hidden_state
    router_logits = getattr(output, "router_logits", None) if output_router_logits else None
    return BodyOutput(hidden.reshape(-1, hidden.shape[-1]), router_logits)


def _masked_body(body: nn.Module, batch: PackedBatch, extra: dict, model: nn.Module | None = None):
    """The body on the packed rows, where transformers builds the per-sequence mask from ``position_ids``. Some
    bodies leave ``position_ids`` out of their masks (OPT, Bloom, GPT-OSS, MPT, BioGPT) or build masks of their own
    (remote code): packed sequences would attend to each other. The body's first forward watches transformers' mask
    preparation to find out, and the verdict is kept on the body; such a body then runs each segment alone in a
    padded row (``_unpacked_body``), that first forward included. The watch does not depend on the batch, so every
    process of a sharded run (FSDP, ZeRO-3) runs the body as often as the others."""
    verdict = getattr(body, "_fastdpo_isolates_packed", None)
    if verdict is None and carries_state(body.config):
        body._fastdpo_isolates_packed = verdict = False
        warnings.warn(f"{type(body).__name__} has recurrent or convolution layers, whose state runs along a row, so "
                      "packed sequences would read the ones before them: each runs alone in a padded row instead "
                      "(slower, and more memory where lengths differ a lot)", stacklevel=2)  # fmt: skip
    if verdict is False:
        return _unpacked_body(body, batch, extra, model)
    if verdict is True:
        return body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra)
    from transformers import masking_utils

    prepare = masking_utils._preprocess_mask_arguments
    calls = []

    def watched(config, inputs_embeds, attention_mask, cache, position_ids, *args, **kwargs):
        calls.append(attention_mask is None and position_ids is not None)
        return prepare(config, inputs_embeds, attention_mask, cache, position_ids, *args, **kwargs)

    masking_utils._preprocess_mask_arguments = watched
    try:
        output = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra)
    finally:
        masking_utils._preprocess_mask_arguments = prepare
    body._fastdpo_isolates_packed = bool(calls) and all(calls)
    if body._fastdpo_isolates_packed:
        return output
    how = "without position_ids" if calls else "by its own code"
    warnings.warn(f"{type(body).__name__} builds its attention mask {how}, so packed sequences would attend to each "
                  "other: each runs alone in a padded row instead (slower, and more memory where lengths differ a lot);"
                  " packed_attention='varlen' packs it where its attention allows", stacklevel=2)  # fmt: skip
    del output
    return _unpacked_body(body, batch, extra, model)


def _unpacked_body(body: nn.Module, batch: PackedBatch, extra: dict, model: nn.Module | None = None):
    """The body's output on ``batch`` with every segment (sequences and row-end padding) alone in a row, padded at
    its end (causal attention never looks there); ``last_hidden_state`` as ``[1, R·L, H]`` in the packed order."""
    check_padding(body, batch.input_ids.device, model)  # (once per body: padding at a row's end changes nothing)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    steps = torch.arange(int(lengths.max()), device=lengths.device)
    index = batch.cu_seqlens[:-1].long()[:, None] + steps[None, :]  # [S, longest]
    real = steps[None, :] < lengths[:, None]
    flat = batch.input_ids.reshape(-1)
    input_ids = torch.where(real, flat[index.clamp(max=flat.numel() - 1)], PAD_ID)
    position_ids = steps.expand_as(index)
    output = body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    output.last_hidden_state = output.last_hidden_state[real].unsqueeze(0)  # segments tile the rows in order
    if getattr(output, "router_logits", None) is not None:  # [S·longest, E] per layer → the packed tokens' [R·L, E]
        output.router_logits = tuple(logits.reshape(*real.shape, -1)[real] for logits in output.router_logits)
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs on a packed batch
# ---------------------------------------------------------------------------------------------------------------------


def ld_weights(batch: PackedBatch, pairs: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's ``token_weights`` for ``packed_logps`` (``fastdpo.ops.segments.ld_token_weights``), in fp64: the
    log-probs' dtype is not known before the pass, and ``segment_sum`` casts the weights to it."""
    return ld_token_weights(batch.targets.reshape(-1), batch.cu_seqlens, pairs, ld_alpha, dtype=torch.float64)


class PackedLogps(NamedTuple):
    """Log-probs of one packed batch (``S`` segments, row-end padding segments included, where all are 0)."""

    logp: Tensor
    """[R·L] fp32 per-token log p(target); 0 where the target is -100 (prompt, padding, last token)."""
    seq_logps: Tensor
    """[S] fp32 sums of ``logp`` per segment of ``cu_seqlens``."""
    seq_num_tokens: Tensor
    """[S] int64 completion tokens (targets that are not -100) per segment."""
    per_token: LinearLogprobs
    """All per-token outputs asked for (``outputs=``), each [R·L]; ``per_token.logp is logp``."""


def packed_logps(
    model: nn.Module,
    batch: PackedBatch,
    *,
    impl: str = "auto",
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("logp",),
    attn_implementation: str | None = None,
    token_weights: Tensor | None = None,
) -> PackedLogps:
    """Per-token and per-sequence log-probs of ``batch.targets`` under ``model``, without materializing logits.

    Args:
        model: a transformers ``*ForCausalLM`` (or a PEFT wrapper of one).
        batch: a ``PackedBatch`` (``fastdpo.data.packing.pack_pairs``).
        impl: ``linear_logprobs`` implementation (``auto``, ``torch``, ``naive``, ``triton``).
        temperature: divides the logits after the model's own head transformations.
        outputs: per-token outputs of ``linear_logprobs`` (``logp`` always; ``entropy``, ``mean_logit``, ...).
        attn_implementation: see ``packed_hidden_states``.
        token_weights: ``[R·L]`` weights of the tokens in ``seq_logps``' sums (LD-DPO's,
            ``fastdpo.ops.segments.ld_token_weights``); None: plain sums.

    Gradients flow to the model's parameters unless called under ``torch.no_grad()`` (the reference pass).
    """
    hidden = packed_hidden_states(model, batch, attn_implementation=attn_implementation)
    targets = batch.targets.reshape(-1).to(hidden.device)

    def head(states: Tensor, spec: HeadSpec):
        out = linear_logprobs(states, spec.weight, targets, bias=spec.bias, logit_scale=spec.logit_scale,
                              softcap=spec.softcap, temperature=temperature, impl=impl, outputs=outputs)  # fmt: skip
        return out.logp, out

    logp, per_token = run_head(model, head, hidden)
    per_token = per_token._replace(logp=logp)
    cu_seqlens = batch.cu_seqlens.to(hidden.device)
    weights = None if token_weights is None else token_weights.to(hidden.device)
    seq_logps = segment_sum(per_token.logp, cu_seqlens, weights)
    # exact integer counts: differences of the running count of completion tokens at the segment boundaries
    running = nn.functional.pad((targets != IGNORE_INDEX).long().cumsum(0), (1, 0))
    boundaries = cu_seqlens.long()
    seq_num_tokens = running[boundaries[1:]] - running[boundaries[:-1]]
    return PackedLogps(logp=per_token.logp, seq_logps=seq_logps, seq_num_tokens=seq_num_tokens, per_token=per_token)
