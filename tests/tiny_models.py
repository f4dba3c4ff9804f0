"""Tiny random-init models the trainer tests share, saved so that two engines can load identical copies."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_mixtral(tokenizer, path: Path):
    """A 2-layer Mixtral (4 experts, top 2, router_aux_loss_coef 0.5) saved at ``path``; returns a loader (fp32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.5, pad_token_id=tokenizer.pad_token_id,
                           attn_implementation="sdpa")  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(path)
    return lambda: MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
