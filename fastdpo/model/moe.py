"""The load-balancing auxiliary loss of mixture-of-experts models, on a packed batch.

Transformers computes it inside ``*ForCausalLM.forward`` from the router logits of the body and the attention mask
(padding excluded). fastdpo never calls that forward (it would compute the logits), so the body is asked for its
router logits (``packed_body(..., output_router_logits=True)``) and the model family's own
``load_balancing_loss_func`` (Mixtral's where the family has none, as TRL's fused forward takes Mixtral's for every
family: GLM-4.5, DeepSeek-V2/V3, Hunyuan, dots1, ...) is applied here with a mask of the real tokens: the same
tokens TRL's padded batch counts, so the same value. Enabled as TRL 1.16 enables it: for a model whose config has
``output_router_logits``, weighted by ``router_aux_loss_coef`` (the option, else the config's own coefficient; 0
turns it off). A family whose function takes other arguments (Doge's) is refused when the trainer is built.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn

from fastdpo.data.packing import PackedBatch
from fastdpo.errors import ConfigError
from fastdpo.ops.segments import segment_ids


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def router_aux_loss_coef(model: nn.Module, option: float | None) -> float:
    """The weight of the aux loss for ``model`` (0.0: no aux loss), as TRL resolves ``router_aux_loss_coef``."""
    config = _text_config(model)
    is_moe = hasattr(config, "output_router_logits")
    if option and not is_moe:
        raise ConfigError(
            f"is {option} but {type(model).__name__} is not a mixture-of-experts model that returns router logits",
            column="router_aux_loss_coef",
            fix="leave it unset (None) for dense models",
        )
    if not is_moe:
        return 0.0
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) if option is None else option)
    if coef:
        _loss_func(model)  # (a family whose function fastdpo cannot call: refused now, not at the first step)
    return coef


_MIXTRAL_ARGUMENTS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT


def _loss_func(model: nn.Module):
    """The family's ``load_balancing_loss_func``, else Mixtral's (TRL's for every family); a ``ConfigError`` for one
    that takes other arguments than Mixtral's (Doge's takes ``num_keys``)."""
    inner = _unwrapped(model)
    loss_func = getattr(sys.modules[type(inner).__module__], "load_balancing_loss_func", None)
    if loss_func is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_func
    if list(inspect.signature(loss_func).parameters) != _MIXTRAL_ARGUMENTS:
        raise ConfigError(
            f"{type(inner).__name__}'s load_balancing_loss_func takes {list(inspect.signature(loss_func).parameters)},"
            f" not Mixtral's {_MIXTRAL_ARGUMENTS}: fastdpo does not compute its aux loss",
            column="router_aux_loss_coef",
            fix="set router_aux_loss_coef=0 to train without the aux loss",
        )
    return loss_func


def moe_aux_loss(model: nn.Module, router_logits: tuple[Tensor, ...], batch: PackedBatch) -> Tensor:
    """The model family's load-balancing loss over the real (non-padding) tokens of ``batch``."""
    inner = _unwrapped(model)
    loss_func = _loss_func(inner)
    config = _text_config(inner)
    # (TRL reads num_experts; GLM-4.5's and DeepSeek's configs name them n_routed_experts, Mixtral's num_local_experts)
    num_experts = getattr(inner, "num_experts", None) or next(
        getattr(config, name) for name in ("num_experts", "n_routed_experts", "num_local_experts")
        if getattr(config, name, None)
    )  # fmt: skip
    top_k = getattr(inner, "num_experts_per_tok", None) or config.num_experts_per_tok
    cu_seqlens = batch.cu_seqlens.to(batch.input_ids.device)
    real = batch.seq_pair.to(cu_seqlens.device)[segment_ids(cu_seqlens, batch.input_ids.numel())] >= 0
    mask = real.reshape(batch.input_ids.shape).to(torch.long)
    return loss_func(tuple(router_logits), num_experts, top_k, mask)
