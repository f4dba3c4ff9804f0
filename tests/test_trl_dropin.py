"""``fastdpo.trl.DPOTrainer``: a TRL 1.16 script with only the import changed takes TRL's steps.

Every run is the same script (``run`` of test_train_dpo: trl.DPOConfig, a model and a reference loaded from the
same folder, the same data and tokenizer, ``bf16=False``) with ``trl.DPOTrainer`` or ``fastdpo.trl.DPOTrainer``.
"""

from __future__ import annotations

import pytest
import torch
from test_train_dpo import TRL_CASES, assert_first_steps_match, common_args, data, run, tiny_model  # noqa: F401
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig, DPOTrainer

trl = pytest.importorskip("trl")
dropin = pytest.importorskip("fastdpo.trl")


# TRL options beyond the loss family, each through both trainers with the same script
OPTION_CASES = {
    "keep_end_truncation": {"truncation_mode": "keep_end", "max_length": 24},
    "keep_start_truncation": {"max_length": 40},  # completions cut, none cut away (a zero gradient is noise)
    "pad_to_multiple_of": {"pad_to_multiple_of": 8},
    "gradient_accumulation": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1},
    # 5 pairs: step 1 is micro-batches of 3 and 2 pairs; TRL weighs each micro-batch alike (fastdpo's trainer each pair)
    "unequal_accumulation": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 3},
    "precompute": {"precompute_ref_log_probs": True},
    "precompute_batch_size": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3},
    "precompute_ld_alpha": {"precompute_ref_log_probs": True, "ld_alpha": 0.5},  # TRL's cache weighs its sums
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "dropout_kept": {"disable_dropout": False},
}


@pytest.mark.parametrize("case", [*TRL_CASES, *OPTION_CASES])
def test_changing_the_import_keeps_trl_steps(case, data, tmp_path):  # noqa: F811
    # every loss-type case of the parity suite, and TRL options beyond the loss family
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {**TRL_CASES, **OPTION_CASES}[case]
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs)
    assert set(theirs[1]) <= set(ours[1])  # every metric TRL logs, under its name


def test_five_steps_and_the_saved_model(data, tmp_path):  # noqa: F811
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {"max_steps": 5, "per_device_train_batch_size": 1, "save_strategy": "steps", "save_steps": 5}
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert len(ours) == len(theirs) == 5
    for step, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        assert got["num_tokens"] == want["num_tokens"]
        # the same optimizer steps at lr 1e-2: fp32 rounding differences grow with each step, so the bound widens
        # from TRL parity's 1e-4 at step 1 to 1e-3 by step 5
        for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert got[name] == pytest.approx(want[name], rel=1e-4 * (1 + 2 * step)), (step, name)
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "dropin" / "checkpoint-5")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "trl" / "checkpoint-5")
    for (name, got), want in zip(saved.state_dict().items(), reference.state_dict().values(), strict=True):
        # five AdamW steps at lr 1e-2: a weight moves by about lr x sign(gradient) per step
        torch.testing.assert_close(got, want, rtol=0, atol=5e-3, msg=name)
    # TRL's model card, written with the checkpoint, with the drop-in's tag added
    from huggingface_hub import ModelCard

    tags = {name: set(ModelCard.load(tmp_path / name / "README.md").data.tags) for name in ("dropin", "trl")}
    assert tags["dropin"] - tags["trl"] == {"fastdpo"} and {"trl", "dpo"} <= tags["trl"]


def test_lora_with_the_adapter_reference(data, tmp_path):  # noqa: F811
    from peft import LoraConfig

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    logs = {}
    for name, cls in (("dropin", dropin.DPOTrainer), ("trl", trl.DPOTrainer)):
        args = trl.DPOConfig(**common_args(tmp_path, name))
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
        assert trainer.ref_model is None  # the base with adapters off is the reference
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert_first_steps_match(logs["dropin"], logs["trl"])


def test_out_of_range_options_and_what_it_does_not_implement_are_refused(data, tmp_path):  # noqa: F811
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    # out of range, and weighting pairs that aot sorts (TRL raises NotImplementedError there)
    for option, column in (({"ld_alpha": 1.5}, "ld_alpha"), ({"use_weighting": True, "loss_type": ["aot"]},
                                                             "use_weighting")):  # fmt: skip
        args = trl.DPOConfig(**common_args(tmp_path, "x"), **option)
        with pytest.raises(ConfigError, match=column):
            dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    # fastdpo's own loss types, which TRL 1.16's DPOTrainer fails on at its first step ("Unknown loss type"): the
    # drop-in trained them (a script that fails under TRL's import), the reference-free ones beside a reference TRL
    # built and never read
    for name, fix in (("cdpo", "fastdpo.DPOTrainer"), ("simpo", "import CPOTrainer"), ("cpo", "import CPOTrainer"),
                      ("orpo", "import ORPOTrainer")):  # fmt: skip
        args = trl.DPOConfig(**common_args(tmp_path, "x"), loss_type=["sigmoid", name])
        with pytest.raises(ConfigError, match=f"^option 'loss_type': '{name}' is fastdpo's, not .* — .*{fix}"):
            dropin.DPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer)
    args = trl.DPOConfig(**common_args(tmp_path, "y"))
    with pytest.raises(ConfigError, match="compute_metrics"):
        dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer,
                          compute_metrics=lambda prediction: {})  # fmt: skip
    trainer = dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ConfigError, match="option 'return_outputs'"):  # (a subclass's call: it named compute_metrics)
        trainer.compute_loss(trainer.model, {}, return_outputs=True)


def test_a_set_trls_max_length_drop_empties_is_named_and_a_part_dropped_said(data, tmp_path):  # noqa: F811
    # TRL drops the pairs whose prompt fills max_length (keep_start): a train set it emptied failed in torch's
    # sampler (num_samples=0), an eval set under precompute in TRL's torch.cat, and without it gave no eval metrics
    from fastdpo.errors import DataError

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in data["prompt"]]
    held_out = data.map(lambda row: {"prompt": row["prompt"] + " and more" * 40})
    for options, column, sets in (({}, "train_dataset", held_out),
                                  ({"precompute_ref_log_probs": True}, "eval_dataset", held_out),  # (no eval_strategy)
                                  ({"eval_strategy": "steps"}, "eval_dataset", held_out),
                                  ({"eval_strategy": "steps"}, "eval_train_dataset", {"train": held_out})):  # fmt: skip
        short = min(lengths) if column == "train_dataset" else max(lengths) + 1  # (the eval set's are longer)
        args = trl.DPOConfig(**{**common_args(tmp_path, "x"), "max_length": short}, **options)
        with pytest.raises(DataError, match=f"^option '{column}': no pair of the .* data is left"):
            dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, eval_dataset=sets,
                              processing_class=tokenizer)  # fmt: skip
    # an eval set nothing evaluates (eval_strategy "no"): trained on, as TRL trains, the drop said
    args = trl.DPOConfig(**{**common_args(tmp_path, "z"), "max_length": max(lengths) + 1})
    with pytest.warns(UserWarning, match=f"eval data: {len(held_out)} of {len(held_out)} pairs dropped"):
        dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, eval_dataset=held_out,
                          processing_class=tokenizer).train()  # fmt: skip
    short = sorted(lengths)[2]  # (the two shortest prompts stay)
    args = trl.DPOConfig(**{**common_args(tmp_path, "y"), "max_length": short})
    dropped = sum(n >= short for n in lengths)
    with pytest.warns(UserWarning, match=f"train data: {dropped} of {len(data)} pairs dropped"):
        dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)


def test_trl_version_outside_the_range_is_refused():
    with pytest.raises(ImportError, match="TRL 1.16"):
        dropin._check_version("1.17.0")
    with pytest.raises(ImportError, match="TRL 1.16"):
        dropin._check_version("0.19.1")
    dropin._check_version("1.16.3")


def test_the_dropin_runs_the_packed_fused_step(data, tmp_path, monkeypatch):  # noqa: F811
    from fastdpo.train.dpo import PairPacker

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    calls = []
    real = dropin.preference_step

    def spy(model, batch, *args, **kwargs):
        calls.append(batch.num_padding)
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(dropin, "preference_step", spy)
    args = trl.DPOConfig(**common_args(tmp_path, "spy"))
    trainer = dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    assert isinstance(trainer.data_collator, PairPacker)
    trainer.train()
    assert len(calls) == 2  # one packed step per optimizer step (batch 2, no accumulation)
    assert isinstance(trainer, trl.DPOTrainer)  # TRL's class, so callbacks and isinstance checks keep working


def test_without_trl_one_clear_error():
    import subprocess
    import sys

    code = "import sys; sys.modules['trl'] = None; import fastdpo.trl"  # as if TRL were not installed
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "pip install 'fastdpo[trl]'" in done.stderr.splitlines()[-1]  # the last line says what to install


def test_sft_options_that_need_logits_are_refused(tmp_path):
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = trl.SFTConfig(**sft_args(tmp_path, "sft"))
    for name in ("compute_metrics", "compute_loss_func", "preprocess_logits_for_metrics"):
        with pytest.raises(ConfigError, match=name):
            dropin.SFTTrainer(load(), args=args, train_dataset=prompt_completion_rows(4), processing_class=tokenizer,
                              **{name: lambda *a: None})  # fmt: skip


def test_predict_gives_the_loss_and_a_padded_collator_is_refused(data, tmp_path):  # noqa: F811
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    losses = {}
    for name, cls in (("dropin", dropin.DPOTrainer), ("trl", trl.DPOTrainer), ("native", DPOTrainer)):
        config = DPOConfig if name == "native" else trl.DPOConfig
        trainer = cls(model=load(), ref_model=load(), args=config(**common_args(tmp_path, f"predict_{name}")),
                      train_dataset=data, processing_class=tokenizer)  # fmt: skip
        held_out = trainer.train_dataset.select(range(5))  # tokenized (predict, unlike evaluate, takes it so)
        if name == "trl":  # TRL returns its full logits (its deprecated path); the fused head has none
            out = trainer.predict(held_out)
        else:  # predict() asked TRL's step for logits: a ConfigError blaming compute_metrics, which nobody passed
            with pytest.warns(UserWarning, match="predictions are None: fastdpo's fused head builds no logits"):
                out = trainer.predict(held_out)
            assert out.predictions is None and out.label_ids is None
        losses[name] = out.metrics["test_loss"]
    assert losses["dropin"] == pytest.approx(losses["trl"], rel=1e-5) == losses["native"]
    with pytest.warns(UserWarning, match="predictions are None"):  # SFT returned None without a word
        sft = dropin.SFTTrainer(load(), args=trl.SFTConfig(**sft_args(tmp_path, "sft_predict")),
                                train_dataset=prompt_completion_rows(4), processing_class=tokenizer)  # fmt: skip
        assert sft.predict(sft.train_dataset.select(range(2))).predictions is None
    assert "eval_padding_fraction" not in sft.evaluate(prompt_completion_rows(4))  # the drop-in logs TRL's only
    # a padded collator: a bare KeyError ('pair_ids') at the first step
    padded = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    message = "option 'data_collator': a DataCollatorForPreference makes padded batches"
    for cls, config in ((dropin.DPOTrainer, trl.DPOConfig), (DPOTrainer, DPOConfig)):
        with pytest.raises(ConfigError, match=message):
            cls(model=load(), ref_model=load(), args=config(**common_args(tmp_path, "collate")), train_dataset=data,
                processing_class=tokenizer, data_collator=padded)  # fmt: skip
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    for cls, config in ((dropin.SFTTrainer, trl.SFTConfig), (SFTTrainer, SFTConfig)):
        with pytest.raises(ConfigError, match="a DataCollatorForLanguageModeling makes padded batches"):
            cls(load(), args=config(**sft_args(tmp_path, "collate_sft")), train_dataset=prompt_completion_rows(4),
                processing_class=tokenizer, data_collator=padded)  # fmt: skip


def test_sync_ref_model_through_the_dropin(data, tmp_path):  # noqa: F811
    # TR-DPO: TRL's own callback moves the reference the drop-in reads; step 3 sees a moved reference
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {"sync_ref_model": True, "ref_model_sync_steps": 1, "max_steps": 3, "per_device_train_batch_size": 1}
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    for step in (1, 2):
        for name in ("loss", "grad_norm", "rewards/margins"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4, abs=1e-6), (step, name)


def test_moe_aux_loss_through_the_dropin(data, tmp_path):  # noqa: F811
    from tiny_models import save_tiny_mixtral

    tokenizer = build_tiny_tokenizer()
    load = save_tiny_mixtral(tokenizer, tmp_path / "moe")
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin")
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl")
    for step in (0, 1):
        assert ours[step]["aux_loss"] > 0
        for name in ("aux_loss", "loss", "grad_norm", "logps/chosen"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)


UNPACKED_BODIES = {  # bodies that build their masks without position_ids: (model class, config), tiny
    "opt": ("OPT", {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 256, "dropout": 0.0,
                    "attention_dropout": 0.0}),
    "bloom": ("Bloom", {"hidden_dropout": 0.0, "attention_dropout": 0.0}),
    "gpt_oss": ("GptOss", {"intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4,
                           "num_experts_per_tok": 2, "sliding_window": 128}),  # (router_aux_loss_coef: its default)
}  # fmt: skip


@pytest.mark.parametrize("family", list(UNPACKED_BODIES))
def test_a_body_whose_masks_ignore_position_ids_takes_trls_steps(family, data, tmp_path):  # noqa: F811
    # these bodies build their causal masks without position_ids: packed sequences attended to each other (log-probs
    # and gradients off from the first step); their segments now run unpacked, router logits (GPT-OSS) too
    import transformers

    name, settings = UNPACKED_BODIES[family]
    tokenizer = build_tiny_tokenizer()
    config = getattr(transformers, f"{name}Config")(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, pad_token_id=tokenizer.pad_token_id,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, **settings)  # fmt: skip
    model_class = getattr(transformers, f"{name}ForCausalLM")
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path / family)
    load = lambda: model_class.from_pretrained(tmp_path / family, dtype=torch.float32)  # noqa: E731
    options = {"per_device_train_batch_size": 4}
    args = trl.DPOConfig(**{**common_args(tmp_path, "dropin"), **options})
    trainer = dropin.DPOTrainer(
        model=load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert bool((batch["position_ids"][:, 1:] == 0).any())  # a row holds two sequences: the case that leaked
    with pytest.warns(UserWarning, match="builds its attention mask without position_ids"):
        trainer.train()
    ours = [log for log in trainer.state.log_history if "loss" in log]
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs)
    if family == "gpt_oss":  # the router loss over the packed tokens, as TRL's over its padded batch's
        assert ours[0]["aux_loss"] == pytest.approx(theirs[0]["aux_loss"], rel=1e-4)


def test_stale_reference_columns_and_evaluate_on_a_new_set_under_precompute(data, tmp_path):  # noqa: F811
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    # a set saved by an earlier precompute run, now trained with a reference model: TRL runs the model (the columns
    # made the drop-in's step-1 loss 0.04, rewards 3.35, where the policy still equals its reference)
    stale = data.add_column("ref_chosen_logps", [-50.0] * len(data)).add_column("ref_rejected_logps",
                                                                                [-60.0] * len(data))  # fmt: skip
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, stale, tokenizer, tmp_path, "dropin")
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, stale, tokenizer, tmp_path, "trl")
    assert_first_steps_match(ours, theirs)
    assert ours[0]["rewards/margins"] == 0.0
    native = DPOTrainer(load(), ref_model=load(), args=DPOConfig(**common_args(tmp_path, "native")),
                        train_dataset=stale, processing_class=tokenizer)  # fmt: skip
    native.train()
    assert native.state.log_history[0]["rewards/margins"] == 0.0
    # a set given to evaluate() under precompute: TRL's precompute of it (a KeyError before)
    metrics = {}
    for name, cls in (("dropin", dropin.DPOTrainer), ("trl", trl.DPOTrainer)):
        args = trl.DPOConfig(**common_args(tmp_path, f"eval_{name}"), precompute_ref_log_probs=True)
        trainer = cls(model=load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
        # before training the policy equals its reference: the drop-in's margins are exactly 0, no pair "won" (its
        # reference came from TRL's padded forward, its policy from the packed step: ±5e-7, accuracies of 0.3-0.5);
        # TRL's own two forwards differ a little too
        before = trainer.evaluate(eval_dataset=data)
        assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        if name == "dropin":
            assert before["eval_rewards/margins"] == 0.0 and before["eval_rewards/accuracies"] == 0.0, before
        trainer.train()
        metrics[name] = trainer.evaluate(eval_dataset=data.select(range(5)))
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert metrics["dropin"][key] == pytest.approx(metrics["trl"][key], rel=1e-4, abs=1e-6), key


def test_model_as_a_path_with_its_reference_loaded_by_trl(data, tmp_path):  # noqa: F811
    # no ref_model: TRL loads a second copy from the policy's path, as it does for its own trainer
    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, tmp_path / "model")
    logs = {}
    for name, cls in (("dropin", dropin.DPOTrainer), ("trl", trl.DPOTrainer)):
        args = trl.DPOConfig(**common_args(tmp_path, name), model_init_kwargs={"dtype": "float32"})
        trainer = cls(str(tmp_path / "model"), args=args, train_dataset=data, processing_class=tokenizer)
        assert trainer.ref_model is not None
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert_first_steps_match(logs["dropin"], logs["trl"])


def test_the_dropin_watches_likelihood_displacement(data, tmp_path):  # noqa: F811
    from fastdpo.train.displacement import LikelihoodDisplacementWarning

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    trainer = dropin.DPOTrainer(load(), ref_model=load(), args=trl.DPOConfig(**common_args(tmp_path, "watch")),
                                train_dataset=data, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[0]["logps/chosen_change"] == 0.0
    assert logs[1]["logps/chosen_change"] == pytest.approx(logs[1]["logps/chosen"] - logs[0]["logps/chosen"])
    # a later log whose chosen log-prob fell 100 nats while accuracy rose: warned, through TRL's own averaging
    trainer.model.train()
    trainer._metrics["train"]["logps/chosen"] = [logs[0]["logps/chosen"] - 50.0, logs[0]["logps/chosen"] - 150.0]
    trainer._metrics["train"]["rewards/accuracies"] = [1.0, 1.0]
    with pytest.warns(LikelihoodDisplacementWarning, match="fell from"):
        trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["logps/chosen_change"] == pytest.approx(-100.0)


def test_fastdpo_options_through_the_dropin_config(data, tmp_path, monkeypatch):  # noqa: F811
    # fastdpo.trl.DPOConfig: TRL's config plus packed_attention and lean_activations. The drop-in runs its steps on
    # fastdpo_varlen attention and lean layers (both counted, held through the backward under checkpointing) and
    # takes TRL's steps as it does with trl.DPOConfig
    from transformers import AttentionInterface

    from fastdpo.model import VARLEN, lean, varlen_attention

    attention_calls, lean_calls, real_mlp = [], [], lean._lean_mlp

    def counted_attention(*args, **kwargs):
        attention_calls.append(torch.is_grad_enabled())
        return varlen_attention(*args, **kwargs)

    def counted_mlp(module, x):
        lean_calls.append(torch.is_grad_enabled())
        return real_mlp(module, x)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, counted_attention)
    monkeypatch.setattr(lean, "_lean_mlp", counted_mlp)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {**common_args(tmp_path, "options"), "gradient_checkpointing": True}
    args = dropin.DPOConfig(**options, packed_attention="varlen", lean_activations=True)
    assert isinstance(args, trl.DPOConfig)
    trainer = dropin.DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.packed_attention_impl == VARLEN and trainer.data_collator.one_row  # one row: nothing to pad
    trainer.train()
    ours = [log for log in trainer.state.log_history if "loss" in log]
    # 2 steps × 2 layers × (the reference's forward, the policy's forward, its recomputation in the backward)
    assert len(attention_calls) == len(lean_calls) == 12 and sum(lean_calls) == sum(attention_calls) == 8
    assert trainer.model.config._attn_implementation == "sdpa"  # switched back after the steps
    # the lean forwards put back (the models themselves carry a wrapped forward of accelerate's: not ours)
    assert not [name for model in (trainer.model, trainer.ref_model) for name, m in model.named_modules()
                if name and "forward" in vars(m)]  # fmt: skip
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", gradient_checkpointing=True)
    assert_first_steps_match(ours, theirs)
    with pytest.raises(ConfigError, match="packed_attention"):
        dropin.DPOTrainer(load(), ref_model=load(), args=dropin.DPOConfig(**common_args(tmp_path, "bad"),
                          packed_attention="flash"), train_dataset=data, processing_class=tokenizer)  # fmt: skip


def test_sft_options_through_the_dropin_config(tmp_path, monkeypatch):
    # fastdpo.trl.SFTConfig: lean_activations reaches the SFT drop-in's steps (counted), with TRL's steps
    from test_train_sft import prompt_completion_rows, tiny_llama_config, train
    from transformers import LlamaForCausalLM

    from fastdpo.model import lean

    calls, real_mlp = [], lean._lean_mlp

    def counted_mlp(module, x):
        calls.append(torch.is_grad_enabled())
        return real_mlp(module, x)

    monkeypatch.setattr(lean, "_lean_mlp", counted_mlp)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(tmp_path / "model")

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)

    rows = prompt_completion_rows(16, seed=3)
    options = {"packing": False, "gradient_checkpointing": True}
    trainer, ours = train(dropin.SFTTrainer, dropin.SFTConfig, load, rows, tokenizer, tmp_path, "lean",
                          lean_activations=True, **options)  # fmt: skip
    assert isinstance(trainer.args, trl.SFTConfig) and trainer.args.lean_activations
    assert len(calls) == 8 and all(calls)  # 2 steps × 2 layers × (forward, recomputation in the backward)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, rows, tokenizer, tmp_path, "trl", **options)
    for step in (0, 1):  # fp32: TRL's loss from full logits against the fused head's (~1e-6 relative)
        for name in ("loss", "grad_norm"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)


def test_non_padding_input_tokens_are_counted_as_trl_counts_them(data, tmp_path):  # noqa: F811
    # the Trainer counts tokens that are not the pad token where a batch has no attention mask (packed batches): with
    # the pad token the EOS (TRL sets it so for most chat tokenizers), every completion's EOS was counted as padding
    # (133 tokens where TRL's attention mask counts 141)
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    load = tiny_model(tokenizer, tmp_path / "model")
    seen = {}
    dpo_trainers = (("trl", trl.DPOTrainer, trl.DPOConfig), ("dropin", dropin.DPOTrainer, trl.DPOConfig),
                    ("ours", DPOTrainer, DPOConfig))  # fmt: skip
    for name, trainer_cls, config_cls in dpo_trainers:
        logs = run(trainer_cls, config_cls, load, data, tokenizer, tmp_path, name,
                   include_num_input_tokens_seen="non_padding")  # fmt: skip
        seen[name] = [log["num_input_tokens_seen"] for log in logs]
    assert seen["dropin"] == seen["ours"] == seen["trl"]
    sft_data = prompt_completion_rows(8)
    sft_trainers = (("sft_trl", trl.SFTTrainer, trl.SFTConfig), ("sft_dropin", dropin.SFTTrainer, trl.SFTConfig),
                    ("sft", SFTTrainer, SFTConfig))  # fmt: skip
    for name, trainer_cls, config_cls in sft_trainers:
        args = config_cls(**sft_args(tmp_path, name, packing=False, include_num_input_tokens_seen="non_padding"))
        trainer = trainer_cls(model=load(), args=args, train_dataset=sft_data, processing_class=tokenizer)
        trainer.train()
        seen[name] = trainer.state.num_input_tokens_seen
    assert seen["sft_dropin"] == seen["sft"] == seen["sft_trl"] > 0
    assert seen["trl"][-1] > 0


def test_neftune_noise_is_drawn_at_trls_scale_on_every_packing(data, tmp_path, monkeypatch):  # noqa: F811
    # transformers' hook scales the noise by the row length: TRL's padded DPO rows are as long as the batch's longest
    # sequence; fastdpo's one row of the whole batch (varlen attention) got √(rows' tokens / longest) times less
    from test_train_sft import neftune_draws

    drawn = neftune_draws(monkeypatch)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    varlen = {"packed_attention": "varlen"}
    trainers = (("trl", trl.DPOTrainer, trl.DPOConfig, {}), ("dropin", dropin.DPOTrainer, dropin.DPOConfig, varlen),
                ("ours", DPOTrainer, DPOConfig, {}), ("varlen", DPOTrainer, DPOConfig, varlen))  # fmt: skip
    for padded in ({}, {"pad_to_multiple_of": 8}):  # (TRL's rows padded up to a multiple: a smaller scale)
        scales = {}
        for name, trainer_cls, config_cls, extra in trainers:
            drawn.clear()
            run(trainer_cls, config_cls, load, data, tokenizer, tmp_path, name, neftune_noise_alpha=5.0,
                per_device_train_batch_size=4, **extra, **padded)  # fmt: skip
            scales[name] = list(drawn)
        assert len(scales["trl"]) == 2
        for name in ("dropin", "ours", "varlen"):
            assert scales[name] == pytest.approx(scales["trl"], rel=1e-6), (name, padded)


@pytest.mark.parametrize("precompute", [False, True])
def test_bf16_reference_runs_under_autocast_as_trl(precompute, data, tmp_path):  # noqa: F811
    # bf16=True on fp32 weights: TRL's reference runs under accelerate's autocast (the prepared model's forward, its
    # precompute's accelerator.autocast()), as its policy does, so at step 1 (the policy is the reference) every
    # reward is 0. The drop-in's reference ran in fp32 against a bf16 policy: rewards/accuracies 0.625 where 0.
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {"bf16": True, "use_cpu": True, "max_steps": 1, "precompute_ref_log_probs": precompute}
    ours = run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    # the same bf16 forwards on both sides give TRL's rewards to the last bit here (0; -7.6e-7 with the precompute);
    # the reference in fp32 was 1.4e-5 (chosen) and 3.7e-5 (rejected) off: 1e-6 tells them apart
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[0][name] == pytest.approx(theirs[0][name], abs=1e-6), name


def test_loss_attributes_set_on_the_trainer_are_read_at_each_step_as_trl(data, tmp_path):  # noqa: F811
    # TRL's loss reads trainer.beta, .loss_types, .loss_weights, .ld_alpha ... at every step: a subclass or a callback
    # (a β schedule, a weight set to 0 in place) may change them. The drop-in kept the config's: β 0.1 where the
    # schedule set 0.5 at step 2; so did fastdpo.DPOTrainer, silently (its loss types are its config's: set there)
    from transformers import TrainerCallback

    class Schedule(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer.beta = 0.1 * (1 + 4 * state.global_step)  # 0.1, then 0.5
            if state.global_step == 1:
                trainer.loss_weights[1] = 0.25  # in place, as TRL reads its list

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    logs = {}
    for name, cls in (("dropin", dropin.DPOTrainer), ("native", DPOTrainer), ("trl", trl.DPOTrainer)):
        args = DPOConfig(**common_args(tmp_path, name), loss_type=["sigmoid", "ipo"]) if name == "native" else (
            trl.DPOConfig(**common_args(tmp_path, name)))  # fmt: skip
        trainer = cls(model=load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[Schedule()])  # fmt: skip
        if name != "native":
            trainer.loss_types = ["sigmoid", "ipo"]
        trainer.loss_weights, trainer.ld_alpha = [1.0, 0.5], 0.5
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert_first_steps_match(logs["dropin"], logs["trl"])
    assert_first_steps_match(logs["native"], logs["trl"])
    assert trainer.args.beta == 0.1  # TRL's config keeps the value given
    native = DPOTrainer(model=load(), ref_model=load(), args=DPOConfig(**common_args(tmp_path, "checked")),
                        train_dataset=data, processing_class=tokenizer)  # fmt: skip
    assert native.loss_weights == [1.0] and native.loss_types == ["sigmoid"]  # (TRL's defaults)
    native.beta = 0.25
    assert native.loss_config.beta == 0.25 and native._displacement.beta == 0.25  # (its ratio: rewards / β now)
    for name, value in (("beta", 0.0), ("loss_weights", [1.0, 2.0])):  # checked as the config checks them, when read
        setattr(native, name, value)
        with pytest.raises(ConfigError, match=name):
            _ = native.loss_config
        setattr(native, name, 0.25 if name == "beta" else [1.0])
    with pytest.raises(ConfigError, match="loss_types"):  # its reference was chosen for its loss types
        native.loss_types = ["simpo"]
    cached = DPOTrainer(model=load(), args=DPOConfig(**common_args(tmp_path, "cached"), precompute_ref_log_probs=True,
                                                     ref_cache_dir=str(tmp_path / "cache")),
                        train_dataset=data, processing_class=tokenizer)  # fmt: skip
    cached.ld_alpha = 0.5  # (its reference values were computed without it: another weighting's)
    with pytest.raises(ConfigError, match="'ld_alpha': changed from None to 0.5, and the cached reference"):
        cached.train()
