"""The load-balancing auxiliary loss of mixture-of-experts models, on a packed batch.

Transformers computes it inside ``*ForCausalLM.forward`` from the router logits of the body and the attention mask
(padding excluded). fastdpo never calls that forward (it would compute the logits), so the body is asked for its
router logits (``packed_body(..., output_router_logits=True)``) and the model family's own
``load_balancing_loss_func`` is applied here with a mask of the real tokens: the same tokens TRL's padded batch
counts, so the same value. Enabled as TRL 1.16 enables it: for a model whose config has ``output_router_logits``,
weighted by ``router_aux_loss_coef`` (the option, else the config's own coefficient; 0 turns it off).
"""

from __future__ import annotations

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
    return float(getattr(config, "router_aux_loss_coef", 0.0) if option is None else option)


def moe_aux_loss(model: nn.Module, router_logits: tuple[Tensor, ...], batch: PackedBatch) -> Tensor:
    """The model family's load-balancing loss over the real (non-padding) tokens of ``batch``."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    loss_func = getattr(sys.modules[type(inner).__module__], "load_balancing_loss_func", None)
    if loss_func is None:
        raise ConfigError(
            f"{type(inner).__name__} returns router logits but its module has no load_balancing_loss_func",
            column="router_aux_loss_coef",
            fix="set router_aux_loss_coef=0 to train without the aux loss",
        )
    config = _text_config(inner)
    num_experts = getattr(inner, "num_experts", None) or config.num_experts
    top_k = getattr(inner, "num_experts_per_tok", None) or config.num_experts_per_tok
    cu_seqlens = batch.cu_seqlens.to(batch.input_ids.device)
    real = batch.seq_pair.to(cu_seqlens.device)[segment_ids(cu_seqlens, batch.input_ids.numel())] >= 0
    mask = real.reshape(batch.input_ids.shape).to(torch.long)
    return loss_func(tuple(router_logits), num_experts, top_k, mask)
