"""Checks and settings of the policy and its reference that the trainers make when they are built: the reference
(not the policy, the policy's vocabulary and tokenizer; TR-DPO's parameter-by-parameter match and its callback; a
ZeRO-3 engine), the best-model metric under several eval sets, and batch-dependent rotary frequencies (dropout:
``fastdpo.train.dropout``)."""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

from fastdpo.errors import ConfigError
from fastdpo.model.packed import full_shape


class SyncReference(TrainerCallback):
    """TR-DPO: every ``ref_model_sync_steps`` optimizer steps the reference moves toward the policy,
    ``ref ← α·policy + (1 − α)·ref`` with ``α = ref_model_mixup_alpha`` (TRL's ``sync_ref_model``)."""

    def __init__(self, reference: nn.Module, accelerator) -> None:
        self.reference, self.accelerator = reference, accelerator

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.ref_model_sync_steps:
            return
        policy = self.accelerator.unwrap_model(model)
        alpha = args.ref_model_mixup_alpha
        with torch.no_grad():
            for target, source in zip(self.reference.parameters(), policy.parameters(), strict=True):
                target.mul_(1.0 - alpha).add_(source.to(target.device, target.dtype), alpha=alpha)


def warn_batch_dependent_rope(model: nn.Module, max_length: int | None) -> None:
    """A warning where the model's rotary frequencies follow the batch's largest position (``dynamic`` NTK past
    ``max_position_embeddings``, ``longrope`` past its original context): a sequence's log-probs then depend on the
    sequences batched with it (in TRL too), so packed rows, ``pad_to_multiple_of`` and a cached reference computed in
    other batches score it otherwise (step-1 log-probs -60.90 where TRL's -61.03)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if config is not None else None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    layered = bool(rope) and all(isinstance(value, dict) for value in rope.values())  # (per layer type: Gemma 3)
    for parameters in rope.values() if layered else [rope]:
        kind = parameters.get("rope_type", parameters.get("type"))
        if kind not in ("dynamic", "longrope"):
            continue
        limit = (parameters.get("original_max_position_embeddings") if kind == "longrope" else None) or getattr(
            config, "max_position_embeddings", None)  # fmt: skip
        if limit is not None and (max_length is None or max_length > limit):
            warnings.warn(f"rope_type {kind!r}: past {limit} positions the rotary frequencies follow the batch's "
                          "largest position, so a sequence's log-probs depend on the sequences batched with it (in "
                          "TRL too; fastdpo's packed batches, pad_to_multiple_of and a cached reference batch them "
                          f"otherwise). max_length {max_length} lets sequences past it in", stacklevel=3)  # fmt: skip
            return


def check_checkpointing(model: nn.Module, args) -> None:
    """A ConfigError where gradient checkpointing is on (the configs' default, as TRL's) for a model class that has
    none (CTRL, OpenAI GPT, JetMoe, ...): transformers' ValueError named no option to change."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if args.gradient_checkpointing and not getattr(inner, "supports_gradient_checkpointing", True):
        raise ConfigError(f"is on (it is by default, as in TRL), and {type(inner).__name__} does not support it",
                          column="gradient_checkpointing", fix="set gradient_checkpointing=False "
                          "(--no_gradient_checkpointing): the activations are kept, more memory")  # fmt: skip


def check_sync_reference(policy: nn.Module, reference: nn.Module) -> None:
    """ConfigError where TR-DPO cannot mix ``policy`` into ``reference`` parameter by parameter (another depth or
    width: transformers' broadcast error at the first sync, ``ref_model_sync_steps`` steps in, 512 by default)."""
    ours = [(name, full_shape(p)) for name, p in policy.named_parameters()]
    theirs = [(name, full_shape(p)) for name, p in reference.named_parameters()]
    if ours == theirs:
        return
    first = next(((a, b) for a, b in zip(ours, theirs, strict=False) if a != b), None)
    what = (f"the policy's {first[0][0]} {list(first[0][1])} is the reference's {first[1][0]} {list(first[1][1])}"
            if first else f"the policy has {len(ours)} parameters and the reference {len(theirs)}")  # fmt: skip
    raise ConfigError(f"sync_ref_model mixes the policy into the reference parameter by parameter, and they "
                      f"differ: {what}", column="ref_model",
                      fix="give a reference of the policy's architecture and size, or none (a copy)")  # fmt: skip


def deepspeed_zero3_reference(model: nn.Module, accelerator):
    """A frozen reference under DeepSpeed ZeRO-3: its own engine (no optimizer), whose hooks gather each module's
    parameters around its forward, as TRL prepares one. None when ZeRO-3 is not in use (the reference is then a
    plain replica on the device)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config["zero_optimization"]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None:  # the sizes the Trainer sets from the model for its own engine, where left to "auto"
        sizes = {"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)}  # fmt: skip
        zero.update({key: value for key, value in sizes.items() if zero.get(key, "auto") == "auto"})
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def check_best_metric(args, eval_dataset) -> None:
    """ConfigError for ``load_best_model_at_end`` or ``save_strategy="best"`` with a dict of eval sets whose
    ``metric_for_best_model`` names no set's metric: each set's are logged as ``eval_<name>_<metric>``, and
    transformers' KeyError came at the first evaluation, before any checkpoint was saved."""
    strategy = getattr(args, "save_strategy", None)
    best = getattr(args, "load_best_model_at_end", False) or str(getattr(strategy, "value", strategy)) == "best"
    if not (best and isinstance(eval_dataset, dict) and eval_dataset):
        return
    metric = args.metric_for_best_model or "loss"
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    if any(key.startswith(f"eval_{name}_") for name in eval_dataset):
        return
    example = f"eval_{next(iter(eval_dataset))}_{key.removeprefix('eval_')}"
    raise ConfigError(f"{metric!r} is no eval set's metric: with a dict of eval sets each set's metrics are logged "
                      f"as eval_<name>_<metric> (sets: {', '.join(map(str, eval_dataset))})",
                      column="metric_for_best_model", fix=f"name one set's metric, e.g. {example!r}")  # fmt: skip


def check_reference(model: nn.Module, reference: nn.Module, tokenizer) -> None:
    """ConfigError when ``reference`` cannot score the policy's token ids: another vocabulary size, or (when it was
    saved with a tokenizer in a local folder) another tokenizer; or when it is the policy itself (or shares its
    weights): frozen as the reference, the policy then had nothing to train."""
    shared = {id(p) for p in model.parameters()} & {id(p) for p in reference.parameters()}
    if shared:
        what = "the policy itself" if reference is model else "shares weights with the policy"
        raise ConfigError(f"ref_model is {what}: the reference is frozen, and so would be what trains",
                          column="ref_model", fix="pass a separate copy (e.g. loaded again), or ref_model=None for a "
                          "copy of the policy (a PEFT policy's reference: its adapter off)")  # fmt: skip
    sizes = [_vocab_size(m) for m in (model, reference)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ConfigError(
            f"the reference's vocabulary has {sizes[1]} entries and the policy's {sizes[0]}: the same token id "
            "would mean different tokens",
            column="ref_model",
            fix="use a reference that shares the policy's tokenizer (e.g. the model SFT started from), with its "
            "embeddings resized as the policy's were",
        )
    folder = getattr(getattr(reference, "config", None), "_name_or_path", "")
    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return  # no tokenizer saved with it (or a hub name: nothing is downloaded to compare)
    from transformers import AutoTokenizer

    ours = getattr(tokenizer, "tokenizer", tokenizer).get_vocab()
    theirs = AutoTokenizer.from_pretrained(folder).get_vocab()
    if ours != theirs:
        token = next((t for t in sorted(ours.keys() | theirs.keys()) if ours.get(t) != theirs.get(t)), None)
        raise ConfigError(
            f"the tokenizer saved with the reference ({folder}) differs from the policy's: token {token!r} has id "
            f"{theirs.get(token)} there and {ours.get(token)} here",
            column="ref_model",
            fix="use a reference trained with the policy's tokenizer, or pass the matching processing_class",
        )


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return full_shape(head.weight)[0]
