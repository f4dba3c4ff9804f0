"""Mixture-of-experts families beyond Mixtral: the load-balancing loss where the family has no function of its own,
one that fastdpo cannot call, and TRL's label-smoothed SFT loss (which leaves the aux loss out)."""

from __future__ import annotations

import pytest
import torch
from test_train_sft import prompt_completion_rows, train
from tiny_models import save_tiny_mixtral
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.train import SFTConfig, SFTTrainer

trl = pytest.importorskip("trl")
dropin = pytest.importorskip("fastdpo.trl")


def save_family(tokenizer, path, model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **extra)  # fmt: skip
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(path)
    return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_a_family_without_its_own_aux_loss_takes_mixtrals_as_trl(tmp_path):
    # GLM-4.5's module has no load_balancing_loss_func: TRL's fused forward takes Mixtral's for every family, and
    # fastdpo refused the model at the first step ("its module has no load_balancing_loss_func")
    tokenizer = build_tiny_tokenizer()
    # (num_experts as well: TRL reads that name, which GLM-4.5's config lacks; fastdpo takes n_routed_experts too)
    load = save_family(tokenizer, tmp_path / "glm", "glm4_moe", n_routed_experts=4, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0, n_group=1,
                       topk_group=1, n_shared_experts=1)  # fmt: skip
    options = {"packing": False, "router_aux_loss_coef": 0.05}
    logs = {name: train(cls, config, load, prompt_completion_rows(16), tokenizer, tmp_path, name, **options)[1]
            for name, cls, config in (("ours", SFTTrainer, SFTConfig), ("dropin", dropin.SFTTrainer, trl.SFTConfig),
                                      ("trl", trl.SFTTrainer, trl.SFTConfig))}  # fmt: skip
    for name in ("ours", "dropin"):
        for step in (0, 1):
            assert logs[name][step]["aux_loss"] > 0
            for key in ("loss", "aux_loss", "grad_norm"):  # fp32 sums in another order
                assert logs[name][step][key] == pytest.approx(logs["trl"][step][key], rel=1e-4), (name, step, key)


def test_a_family_whose_aux_loss_takes_other_arguments_is_refused_when_built(tmp_path):
    # Doge's function takes num_keys too: called as Mixtral's it failed deep inside (TRL's too: an IndexError)
    tokenizer = build_tiny_tokenizer()
    load = save_family(tokenizer, tmp_path / "doge", "doge")
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ConfigError, match=r"option 'router_aux_loss_coef': DogeForCausalLM's load_balancing_loss_func"):
        SFTTrainer(model=load(), args=args, train_dataset=prompt_completion_rows(4), processing_class=tokenizer)
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1, router_aux_loss_coef=0)
    SFTTrainer(model=load(), args=args, train_dataset=prompt_completion_rows(4), processing_class=tokenizer)


def test_label_smoothing_leaves_the_aux_loss_out_in_the_dropin_as_trl(tmp_path):
    # TRL's label-smoothed loss is its smoother's over the logits: the aux loss is logged, not trained. The drop-in
    # added it (loss 6.4063 where TRL's 6.4043, a coef x aux_loss apart); the native trainer trains it (README)
    tokenizer = build_tiny_tokenizer()
    load = save_tiny_mixtral(tokenizer, tmp_path / "moe")
    options = {"label_smoothing_factor": 0.2}
    _, ours = train(dropin.SFTTrainer, trl.SFTConfig, load, prompt_completion_rows(16), tokenizer, tmp_path, "dropin",
                    **options)  # fmt: skip
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, prompt_completion_rows(16), tokenizer, tmp_path, "trl",
                      **options)  # fmt: skip
    _, native = train(SFTTrainer, SFTConfig, load, prompt_completion_rows(16), tokenizer, tmp_path, "ours", **options)
    for step in (0, 1):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4), (step, key)
    # the native loss: TRL's plus coef x aux_loss (the tiny Mixtral's coefficient 0.5)
    assert native[0]["loss"] == pytest.approx(theirs[0]["loss"] + 0.5 * theirs[0]["aux_loss"], rel=1e-4)
