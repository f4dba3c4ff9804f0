"""LoRA policies: the reference without a second copy of the weights, equal to TRL 1.16's."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil

import pytest
import torch
from test_train_dpo import common_args, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig, DPOTrainer

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def data():
    import datasets

    from fastdpo.data import prepare_preferences

    datasets.disable_progress_bars()
    rows = prepare_preferences("tests/fixtures/distilabel_orca.jsonl", columns={"prompt": "input"})
    return rows.select_columns(["prompt", "chosen", "rejected"])


def lora(**extra):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **extra)


def train(trainer_cls, config_cls, model, data, tokenizer, tmp_path, name, **extra):
    if "SFT" in config_cls.__name__:
        from test_train_sft import common_args as sft_args

        args = config_cls(**{**sft_args(tmp_path, name), "learning_rate": 5e-2})
    else:
        args = config_cls(**{**common_args(tmp_path, name), "learning_rate": 5e-2})
    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, **extra)
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


def assert_match(ours, theirs):
    assert len(ours) == len(theirs) == 2
    for step in (0, 1):
        for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)
    for name in ("rewards/chosen", "rewards/margins"):  # differences of fp32 sums: see test_train_dpo
        assert ours[1][name] == pytest.approx(theirs[1][name], rel=1e-3, abs=2e-6), name


def adapted(load):
    """A PeftModel whose adapter is already trained (as after LoRA SFT): B is not zero."""
    torch.manual_seed(1)
    model = peft.get_peft_model(load(), lora())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def test_new_adapter_reference_is_the_base_model_as_in_trl(data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    trainer, ours = train(DPOTrainer, DPOConfig, load(), data, tokenizer, tmp_path, "ours", peft_config=lora())
    _, theirs = train(trl.DPOTrainer, trl.DPOConfig, load(), data, tokenizer, tmp_path, "trl", peft_config=lora())
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None
    assert ours[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # LoRA starts at zero: policy == base
    assert_match(ours, theirs)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_trained_adapter_becomes_the_reference_as_in_trl(data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")

    trainer, ours = train(DPOTrainer, DPOConfig, adapted(load), data, tokenizer, tmp_path, "ours")
    _, theirs = train(trl.DPOTrainer, trl.DPOConfig, adapted(load), data, tokenizer, tmp_path, "trl")
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None
    assert ours[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the reference is the adapted model itself
    assert_match(ours, theirs)
    frozen = [p for n, p in trainer.model.named_parameters() if ".ref." in n]
    assert frozen and not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("tied", [True, False])
def test_a_trained_adapters_token_rows_are_in_its_reference_copy(data, tmp_path, tied):
    # trainable_token_indices: the "ref" copy of a trained adapter took its LoRA weights alone (as TRL 1.16's does),
    # so the reference scored with the original rows: step-0 loss 0.7000 on an untied model, 2.836 on a tied one
    # (whose head holds the rows too: that case was refused at the first step), not log 2
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=tied)  # fmt: skip
    rows = sorted({i for text in data["chosen"][:4] for i in tokenizer(text)["input_ids"]})
    model = peft.get_peft_model(LlamaForCausalLM(config), lora(trainable_token_indices=rows))
    with torch.no_grad():  # a trained adapter: its token rows and LoRA weights moved
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.5 * torch.randn_like(parameter))
    trainer, logs = train(DPOTrainer, DPOConfig, model, data, tokenizer, tmp_path, "tokens")
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the reference is the adapted model itself
    frozen = [name for name, p in trainer.model.named_parameters() if name.endswith(".ref") or ".ref." in name]
    assert any("trainable_tokens_delta" in name for name in frozen)
    assert not any(trainer.model.get_parameter(name).requires_grad for name in frozen)


def test_an_adapter_on_the_lm_head_is_refused(data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, tmp_path / "model")()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="lm_head"):
        DPOTrainer(model, args=DPOConfig(**common_args(tmp_path, "x")), train_dataset=data,
                   processing_class=tokenizer, peft_config=config)  # fmt: skip
    # what peft itself refuses: one line naming the setting (peft's tracebacks before)
    for bad, said in (({"r": 0}, "`r` should be a positive integer"), ({"lora_dropout": 2.0}, "dropout probability"),
                      ({"target_modules": ["nope"]}, "Target modules {'nope'} not found")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"option 'peft_config': peft refused it: {re.escape(said)}"):
            DPOTrainer(tiny_model(tokenizer, tmp_path / "model")(), args=DPOConfig(**common_args(tmp_path, "x")),
                       train_dataset=data, processing_class=tokenizer,
                       peft_config=peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **bad}))  # fmt: skip


def test_a_head_in_modules_to_save_trains_its_copy_as_in_trl(data, tmp_path):
    # LoRA with modules_to_save=["lm_head"] (TRL's SFT puts the head there when a chat template adds tokens): the
    # policy scores with the adapter's trained copy of the head, the reference (adapters off) with the original. It
    # was refused at the first step ("merge adapters on the LM head")
    from fastdpo.trl import DPOTrainer as DropIn

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    logs, heads = {}, {}
    for name, trainer_cls, config_cls in (("ours", DPOTrainer, DPOConfig), ("dropin", DropIn, trl.DPOConfig),
                                          ("trl", trl.DPOTrainer, trl.DPOConfig)):  # fmt: skip
        trainer, logs[name] = train(trainer_cls, config_cls, load(), data, tokenizer, tmp_path, name,
                                    peft_config=lora(modules_to_save=["lm_head"]))  # fmt: skip
        wrapper = trainer.model.get_output_embeddings()
        heads[name] = (wrapper.modules_to_save["default"].weight.detach(), wrapper.original_module.weight.detach())
    assert logs["ours"][0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the copy starts as the original
    assert_match(logs["ours"], logs["trl"])
    assert_match(logs["dropin"], logs["trl"])
    original = load().get_output_embeddings().weight
    for name, (copy, kept) in heads.items():
        assert torch.equal(kept, original), name  # the reference's head is not trained
        # two AdamW steps at lr 5e-2 move the copy by up to 0.075 here; Adam's first steps divide each gradient entry
        # by its own size, so an entry of a gradient near 0 turns fp32 summation-order noise (packed against padded
        # rows) into a visible step difference: 7.7e-5 observed (the native trainer), 1e-3 is still 75x below a move
        torch.testing.assert_close(copy, heads["trl"][0], rtol=0, atol=1e-3, msg=name)
        assert (copy - original).abs().max() > 1e-2, name


def test_prompt_learning_and_frozen_adapters_are_refused_by_every_trainer(data, tmp_path):
    # their virtual tokens are added by PeftModel.forward, which the packed forward does not run: training failed
    # deep in autograd, and evaluate() scored the bare base model (eval_loss log 2) where TRL scores the prompts
    from test_train_sft import common_args as sft_args

    import fastdpo.trl as dropin
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    prompts = lambda kind: kind(task_type="CAUSAL_LM", num_virtual_tokens=4)  # noqa: E731
    trainers = [(DPOTrainer, DPOConfig(**common_args(tmp_path, "dpo"))), (dropin.DPOTrainer, trl.DPOConfig(
                **common_args(tmp_path, "trl_dpo"))), (SFTTrainer, SFTConfig(**sft_args(tmp_path, "sft"))),
                (dropin.SFTTrainer, trl.SFTConfig(**sft_args(tmp_path, "trl_sft")))]  # fmt: skip
    said = r"option 'peft_config': prompt-learning adapters \({}\) are not supported.*e\.g\. LoraConfig"
    for trainer_cls, args in trainers:
        with pytest.raises(ConfigError, match=said.format("PROMPT_TUNING")):
            trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer,
                        peft_config=prompts(peft.PromptTuningConfig))  # fmt: skip
        with pytest.raises(ConfigError, match=said.format("PREFIX_TUNING")):  # a PeftModel given
            trainer_cls(model=peft.get_peft_model(load(), prompts(peft.PrefixTuningConfig)), args=args,
                        train_dataset=data, processing_class=tokenizer)  # fmt: skip
    # an adapter loaded for inference (PeftModel.from_pretrained's default): it failed deep in autograd, TRL's too
    peft.get_peft_model(load(), lora()).save_pretrained(tmp_path / "adapter")
    for trainer_cls, args in trainers:
        with pytest.raises(
            ConfigError, match=r"option 'model': the PeftModel has no trainable parameter.*is_trainable"
        ):
            trainer_cls(model=peft.PeftModel.from_pretrained(load(), tmp_path / "adapter"), args=args,
                        train_dataset=data, processing_class=tokenizer)  # fmt: skip


def test_lora_sft_matches_trl_and_its_adapter_is_the_dpo_reference(data, tmp_path):
    from test_train_sft import prompt_completion_rows

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = prompt_completion_rows(12)
    sft, ours = train(SFTTrainer, SFTConfig, load(), rows, tokenizer, tmp_path, "sft", peft_config=lora())
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load(), rows, tokenizer, tmp_path, "trl", peft_config=lora())
    for step in (0, 1):
        for name in ("loss", "grad_norm", "mean_token_accuracy"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4, abs=1e-7), (step, name)
    # LoRA SFT → DPO: the SFT adapter keeps training and its frozen copy is the reference
    dpo, logs = train(DPOTrainer, DPOConfig, sft.model, data, tokenizer, tmp_path, "dpo")
    assert dpo.reference_mode == "adapter" and "ref" in dpo.model.peft_config
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert logs[1]["loss"] != pytest.approx(math.log(2), rel=1e-4)


# QLoRA: bitsandbytes' 4- and 8-bit layers run on a CPU (dequantized to the compute dtype, fp32 here)
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")


def nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@needs_bnb
@pytest.mark.parametrize("kind", ["dpo", "dpo_dropin", "sft", "sft_dropin", "dpo_8bit"])
def test_qlora_from_a_path_takes_trls_steps(kind, data, tmp_path):
    # the model given by path with quantization_config, as TRL takes it: loaded in 4 (or 8) bits, adapters in bf16
    from test_train_sft import prompt_completion_rows

    import fastdpo.trl as dropin
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, tmp_path / "model")
    path = str(tmp_path / "model")
    ours_cls, config_cls, theirs_cls, rows = {
        "dpo": (DPOTrainer, DPOConfig, trl.DPOTrainer, data),
        "dpo_8bit": (DPOTrainer, DPOConfig, trl.DPOTrainer, data),
        "dpo_dropin": (dropin.DPOTrainer, trl.DPOConfig, trl.DPOTrainer, data),
        "sft": (SFTTrainer, SFTConfig, trl.SFTTrainer, prompt_completion_rows(12)),
        "sft_dropin": (dropin.SFTTrainer, trl.SFTConfig, trl.SFTTrainer, prompt_completion_rows(12)),
    }[kind]
    their_config = trl.SFTConfig if "sft" in kind else trl.DPOConfig
    if kind == "dpo_8bit":
        from transformers import BitsAndBytesConfig

        extra = {"peft_config": lora(), "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    else:
        extra = {"peft_config": lora(), "quantization_config": nf4()}
    trainer, ours = train(ours_cls, config_cls, path, rows, tokenizer, tmp_path, "ours", **extra)
    _, theirs = train(theirs_cls, their_config, path, rows, tokenizer, tmp_path, "trl", **extra)
    base = trainer.model.get_base_model()
    layer = "Linear8bitLt" if kind == "dpo_8bit" else "Linear4bit"
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    for step in (0, 1):
        for name in ("loss", "grad_norm"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4, abs=1e-7), (step, name)


@needs_bnb
def test_qlora_trains_the_same_after_an_evaluation(data, tmp_path):
    # on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for inference at its first forward in eval mode
    # without grad, and that layout has no backward: a QLoRA run that evaluated first then trained its adapters on
    # nothing, silently. The trainers keep that layout off (the model 64 wide: the least that repacking takes)
    import bitsandbytes
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    runs = {}
    for evaluated in (False, True):
        args = DPOConfig(**{**common_args(tmp_path, f"run{evaluated}"), "learning_rate": 5e-2})
        trainer = DPOTrainer(str(tmp_path / "model"), args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                             processing_class=tokenizer, peft_config=lora(), quantization_config=nf4())  # fmt: skip
        layers = [m for m in trainer.model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
        if evaluated:
            trainer.evaluate()
        trainer.train()
        runs[evaluated] = [log for log in trainer.state.log_history if "loss" in log]
    for step in (0, 1):
        assert runs[True][step]["grad_norm"] > 0  # (it was 0: no gradient reached the adapters)
        for name in ("loss", "grad_norm"):  # the same computation: bit-equal
            assert runs[True][step][name] == runs[False][step][name], (step, name)
    # a model run in eval mode before it is given (repacked already): unpacked, it trains. Not bit-equal: unpacking
    # quantizes the block scales again (measured: grad_norm 0.0986 vs 0.0996)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model", quantization_config=nf4())
    with torch.no_grad():
        model.eval()(torch.tensor([[1, 5, 9]]))
    args = DPOConfig(**{**common_args(tmp_path, "given"), "learning_rate": 5e-2})
    trainer = DPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora())
    trainer.train()
    given = [log for log in trainer.state.log_history if "loss" in log]
    for step in (0, 1):
        assert given[step]["grad_norm"] == pytest.approx(runs[False][step]["grad_norm"], rel=0.05), step


@needs_bnb
def test_quantization_config_needs_a_model_the_trainer_loads(data, tmp_path):
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (SFTTrainer, SFTConfig)):
        with pytest.raises(ConfigError, match="loaded already") as info:
            trainer_cls(load(), args=config_cls(output_dir=str(tmp_path / "x"), report_to=[]), train_dataset=data,
                        processing_class=tokenizer, quantization_config=nf4())  # fmt: skip
        assert info.value.column == "quantization_config"
    args = DPOConfig(output_dir=str(tmp_path / "y"), report_to=[], model_init_kwargs={"quantization_config": nf4()})
    with pytest.raises(ConfigError, match="both"):
        DPOTrainer(str(tmp_path / "model"), args=args, train_dataset=data, processing_class=tokenizer,
                   quantization_config=nf4())  # fmt: skip


def test_adapter_reference_runs_the_policy_as_its_reference(tmp_path):
    # fastdpo sweep's KL estimate of a LoRA run: the reference it trained against, with no second copy of the weights
    from fastdpo.compare import compare
    from fastdpo.model.adapters import AdapterReference, prepare_adapter_model

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    base = load()
    policy = peft.get_peft_model(load(), lora())
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ids = torch.tensor([[1, 57, 9, 140, 33]])
    reference = AdapterReference(policy)
    torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits)  # adapters off
    assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)  # and back on after
    trained = prepare_adapter_model(policy, gradient_checkpointing=False, new_adapter=False)  # a frozen "ref" copy
    copied = trained(input_ids=ids).logits
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.add_(1.0)  # the policy's adapter moves on; the reference's stays
    before = trained(input_ids=ids).logits
    torch.testing.assert_close(AdapterReference(trained)(input_ids=ids).logits, copied)  # the "ref" adapter
    assert not torch.allclose(before, copied)
    rows = compare(trained, AdapterReference(trained), tokenizer, [("p", "the cat")], samples=2, max_new_tokens=4)
    assert rows[0].kl_estimate == rows[0].kl_estimate and rows[0].policy.tokens >= 1  # generated, finite
    torch.testing.assert_close(trained(input_ids=ids).logits, before)  # the policy's adapter is active again


def test_a_ref_model_given_beside_an_adapter_is_the_reference_as_in_trl(data, tmp_path):
    # reference='auto' took the policy with its adapter off, the ref_model given unused and unsaid (margins 0 at
    # step 1 where TRL's were 0.015)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")

    def other():  # a reference that is not the policy's base
        torch.manual_seed(2)
        model = load()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return model

    for name, policy, extra in (("new", load, {"peft_config": lora()}), ("trained", lambda: adapted(load), {})):
        trainer, ours = train(DPOTrainer, DPOConfig, policy(), data, tokenizer, tmp_path, f"ours_{name}",
                              ref_model=other(), **extra)  # fmt: skip
        _, theirs = train(trl.DPOTrainer, trl.DPOConfig, policy(), data, tokenizer, tmp_path, f"trl_{name}",
                          ref_model=other(), **extra)  # fmt: skip
        assert trainer.reference_mode == "separate" and trainer.ref_model is not None
        assert "ref" not in trainer.model.peft_config  # (no frozen copy of the adapter: it is not the reference)
        assert ours[0]["loss"] != pytest.approx(math.log(2), rel=1e-3)
        assert_match(ours, theirs)
    with pytest.raises(ConfigError, match=r"option 'reference': 'adapter' takes the policy with its adapter off"):
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "x"), reference="adapter"), train_dataset=data,
                   processing_class=tokenizer, ref_model=other(), peft_config=lora())  # fmt: skip
    # TR-DPO beside it: a shape error at the first sync step, deep inside (TRL refuses it when built)
    with pytest.raises(ConfigError, match=r"option 'sync_ref_model': sync_ref_model mixes the policy's weights"):
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "x"), sync_ref_model=True), train_dataset=data,
                   processing_class=tokenizer, ref_model=other(), peft_config=lora())  # fmt: skip


def test_a_cached_reference_of_an_adapter_policy_is_its_base_model_as_in_trl(data, tmp_path):
    # the cache was computed by the policy with its adapter on: an adapter that does not start at zero (PiSSA, a
    # random B) gave rewards 0 at step 1 where TRL's precompute (adapter off) gave -0.0078
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = {**common_args(tmp_path, "cached"), "learning_rate": 5e-2, "precompute_ref_log_probs": True}
    trainer = DPOTrainer(load(), args=DPOConfig(**args, ref_cache_dir=str(tmp_path / "cache")), train_dataset=data,
                         processing_class=tokenizer, peft_config=lora(init_lora_weights=False))  # fmt: skip
    trainer.train()
    theirs = trl.DPOTrainer(load(), args=trl.DPOConfig(**{**args, "output_dir": str(tmp_path / "trl")}),
                            train_dataset=data, processing_class=tokenizer,
                            peft_config=lora(init_lora_weights=False))  # fmt: skip
    theirs.train()
    logs = [[log for log in t.state.log_history if "loss" in log] for t in (trainer, theirs)]
    assert trainer.reference_mode == "cached"
    assert logs[0][0]["loss"] != pytest.approx(math.log(2), rel=1e-3)  # the adapter moves the policy off its base
    assert_match(*logs)


def test_a_frozen_model_is_refused_when_training_starts_not_before(data, tmp_path):
    # (an adapter folder loaded by transformers: its adapter attached frozen) the native trainers failed deep in
    # autograd; TRL's drop-in builds and evaluates such a model, so the refusal waits for train()
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    import fastdpo.trl as dropin
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = prompt_completion_rows(4)
    cases = ((DPOTrainer, DPOConfig(**common_args(tmp_path, "dpo")), data),
             (dropin.DPOTrainer, trl.DPOConfig(**common_args(tmp_path, "trl_dpo")), data),
             (SFTTrainer, SFTConfig(**sft_args(tmp_path, "sft")), rows),
             (dropin.SFTTrainer, trl.SFTConfig(**sft_args(tmp_path, "trl_sft")), rows))  # fmt: skip
    for trainer_cls, args, dataset in cases:
        trainer = trainer_cls(model=load().requires_grad_(False), args=args, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
        with pytest.raises(ConfigError, match=r"option 'model': the model has no trainable parameter"):
            trainer.train()


@needs_bnb
def test_a_resumed_qlora_run_trains_its_adapters_in_bf16_as_the_straight_run(data, tmp_path):
    # transformers loads the checkpoint's adapter with peft's load_adapter, which upcasts it to fp32: the resumed run
    # trained in another precision (grad norm 0.135484 where 0.135742; TRL 1.16 does the same)
    from test_train_sft import prompt_completion_rows

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, tmp_path / "model")
    runs = {}
    for name, resume in (("straight", None), ("resumed", True)):
        options = {key: value for key, value in common_args(tmp_path, name).items() if key != "beta"}
        args = SFTConfig(**{**options, "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "max_length": 32})
        trainer = SFTTrainer(str(tmp_path / "model"), args=args, train_dataset=prompt_completion_rows(12),
                             processing_class=tokenizer, peft_config=lora(), quantization_config=nf4())  # fmt: skip
        if resume:
            shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / name / "checkpoint-2")
        trainer.train(resume_from_checkpoint=resume)
        runs[name] = trainer
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.bfloat16 for p in trainable), name
    logs = [[log for log in runs[name].state.log_history if "loss" in log] for name in runs]
    assert logs[1][-1]["grad_norm"] == logs[0][-1]["grad_norm"]  # (bf16 adapters: the same steps, exactly)
