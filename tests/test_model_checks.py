"""What the trainers check of the policy, its head and its reference when they are built (fastdpo.model.packed's
head_spec, fastdpo.train.model_checks): families whose head transforms the logits, references that cannot be one,
dropout rates kept as numbers, the best-model metric under several eval sets, batch-dependent rotary frequencies,
and the drop-in's precomputed reference cache."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import transformers as T
from test_train_resume import args, load, pairs, tokenizer  # noqa: F401

from fastdpo.errors import ConfigError
from fastdpo.model import head_spec
from fastdpo.train import DPOConfig, DPOTrainer

BASE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
# families whose forward transforms lm_head's output (read off transformers' modeling code): fastdpo refused them
HEADS = {
    "vaultgemma": ("VaultGemma", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8,
                                  "final_logit_softcapping": 3.0, "attn_implementation": "eager"}),
    "nanochat": ("NanoChat", {"final_logit_softcapping": 3.0}),
    "gemma4": ("Gemma4", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "beam": ("Beam", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "granite_swa": ("GraniteSWA", {"logits_scaling": 4.0}),
    "granitemoe_swa": ("GraniteMoeSWA", {"logits_scaling": 4.0, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "hyperclovax": ("HyperCLOVAX", {"logits_scaling": 4.0}),
    "minicpm3": ("MiniCPM3", {"qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "kv_lora_rank": 16,
                              "q_lora_rank": 16, "head_dim": 4, "num_key_value_heads": 4, "dim_model_base": 8}),
    "falcon_h1": ("FalconH1", {"lm_head_multiplier": 0.5, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_expand": 2,
                               "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_d_ssm": 64}),
}  # fmt: skip


def _built(family: str, **settings):
    config_cls = getattr(T, f"{family}TextConfig", None) or getattr(T, f"{family}Config")  # (Gemma 4's text model)
    config = config_cls(**{**BASE, **settings})
    torch.manual_seed(0)
    model = getattr(T, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # (weights large enough that a head transform left out shows)
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", list(HEADS))
def test_head_transforms_of_more_families_reproduce_their_logits(name):
    family, settings = HEADS[name]
    model = _built(family, **settings)
    ids = torch.tensor([[5, 17, 42, 9, 33, 21, 8, 70]])
    with torch.no_grad():
        own = model(input_ids=ids).logits[0]
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        ours = head_spec(model).logits(hidden)
    assert (own - ours).abs().max() < 1e-5  # fp32, the same ops in the same order but for the scale's placement
    plain = torch.nn.functional.linear(hidden, model.lm_head.weight)
    assert (own - plain).abs().max() > 1e-2  # (the transform matters at these weights: the case has teeth)


@pytest.mark.parametrize("name", ["gemma4", "beam"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_newly_accepted_soft_capped_families_pack_as_they_run_alone(name, backend):
    # their heads were refused before, so their packed bodies were never run: each sequence of a packed batch
    # scores what the model gives it alone (fp32 tiny models: ~1e-6 apart; a leaking context moves them by > 1e-2)
    from test_model_packed import VOCAB, make_batch, make_examples, one_by_one_logps, segment_sequences

    from fastdpo.model import packed_logps

    family, settings = HEADS[name]
    model = _built(family, **settings, vocab_size=VOCAB)
    examples = make_examples()
    batch = make_batch(examples)
    sequences = segment_sequences(batch, examples)
    with torch.no_grad():
        out = packed_logps(model, batch, impl="torch", attn_implementation=backend)
    torch.testing.assert_close(out.seq_logps.double(), one_by_one_logps(model, sequences), rtol=0, atol=1e-4)


def test_a_head_inside_a_block_of_its_own_and_cut_logits_are_refused():
    # RobertaForCausalLM's decoder is the last layer of a head block (dense, GELU, LayerNorm) and its positions start
    # at padding_idx + 1: its packed log-probs were 0.77 nats off, accepted silently
    config = T.RobertaConfig(**{**BASE, "num_key_value_heads": None}, is_decoder=True)
    with pytest.raises(ConfigError, match="LM head sits inside a block of its own"):
        head_spec(T.RobertaForCausalLM(config))
    with pytest.raises(ConfigError, match="keeps the first 80 of its head's 96 logits"):
        config = T.AutoConfig.for_model("inkling_text", **BASE, head_dim=8, unpadded_vocab_size=80,
                                        logits_mup_width_multiplier=1.0, pad_token_id=0)  # fmt: skip
        head_spec(T.InklingForCausalLM(config))


def test_a_reference_that_is_the_policy_is_refused(tokenizer, load, tmp_path):  # noqa: F811
    # DPOTrainer(model, ref_model=model) froze the policy as the reference; train() then said the model "has no
    # trainable parameter" (TRL refuses it in its constructor)
    model = load()
    with pytest.raises(ConfigError, match="ref_model is the policy itself"):
        DPOTrainer(model, ref_model=model, args=args(tmp_path, "same", DPOConfig), train_dataset=pairs(4),
                   processing_class=tokenizer)  # fmt: skip
    assert all(parameter.requires_grad for parameter in model.parameters())  # (left as given)


def test_tr_dpo_with_a_reference_of_another_shape_is_refused_when_built(tokenizer, load, tmp_path):  # noqa: F811
    # a 1-layer reference trained until the first sync (ref_model_sync_steps: 512 by default), then a broadcast
    # error from inside the callback, in TRL too
    import trl

    import fastdpo.trl as dropin

    config = copy.deepcopy(load().config)
    config.num_hidden_layers = 1
    shallow = T.AutoModelForCausalLM.from_config(config)
    for module, config_cls in ((None, DPOConfig), (dropin, trl.DPOConfig)):
        trainer_cls = DPOTrainer if module is None else module.DPOTrainer
        with pytest.raises(ConfigError, match="sync_ref_model mixes the policy into the reference parameter by "):
            trainer_cls(load(), ref_model=shallow, args=args(tmp_path, "sync", config_cls, sync_ref_model=True),
                        train_dataset=pairs(4), processing_class=tokenizer)  # fmt: skip


def test_load_best_model_at_end_restores_the_best_steps_moving_reference(tokenizer, load, tmp_path):  # noqa: F811
    # TR-DPO: transformers restored the best checkpoint's policy alone; evaluate() after training scored it against
    # the last step's reference (eval loss 1.22 where the best checkpoint logged 0.52)
    import os

    from safetensors.torch import load_file

    config = args(tmp_path, "best", DPOConfig, eval_strategy="steps", eval_steps=2, save_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="eval_loss", per_device_eval_batch_size=8,
                  sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, beta=0.5)  # fmt: skip
    trainer = DPOTrainer(load(), ref_model=load(), args=config, train_dataset=pairs(12), eval_dataset=pairs(8, 5),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert not best.endswith(f"-{trainer.state.global_step}")  # (the case's teeth: the best is not the last step)
    saved = load_file(os.path.join(best, "ref_model.safetensors"))
    for name, parameter in trainer.ref_model.named_parameters():
        assert torch.equal(parameter, saved[name]), name
    logged = next(log["eval_loss"] for log in trainer.state.log_history
                  if "eval_loss" in log and log["step"] == int(best.rsplit("-", 1)[1]))  # fmt: skip
    assert trainer.evaluate()["eval_loss"] == pytest.approx(logged, rel=1e-5)  # (the same weights, batches, fp32)


def test_the_best_metric_names_a_set_of_a_dict_of_eval_sets(tokenizer, load, tmp_path):  # noqa: F811
    # transformers' KeyError came at the first evaluation, before any checkpoint was saved
    sets = {"a": pairs(4, 1), "b": pairs(4, 2)}
    for metric in ("eval_rewards/accuracies", "loss"):
        config = args(tmp_path, "dict", DPOConfig, eval_strategy="steps", eval_steps=3, save_steps=3,
                      load_best_model_at_end=True, metric_for_best_model=metric)  # fmt: skip
        with pytest.raises(ConfigError, match="is no eval set's metric") as error:
            DPOTrainer(load(), args=config, train_dataset=pairs(8), eval_dataset=sets, processing_class=tokenizer)
        assert "eval_a_" in error.value.fix
    config = args(tmp_path, "dict", DPOConfig, eval_strategy="steps", eval_steps=3, save_steps=3,
                  load_best_model_at_end=True, metric_for_best_model="eval_b_rewards/accuracies")  # fmt: skip
    DPOTrainer(load(), args=config, train_dataset=pairs(8), eval_dataset=sets, processing_class=tokenizer)
    import trl

    import fastdpo.trl as dropin

    # save_strategy="best" alone reads the metric too; the drop-ins check it as well (TRL: the same KeyError)
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (dropin.DPOTrainer, trl.DPOConfig)):
        config = args(tmp_path, "best", config_cls, eval_strategy="steps", eval_steps=3, save_strategy="best",
                      metric_for_best_model="loss")  # fmt: skip
        with pytest.raises(ConfigError, match="is no eval set's metric"):
            trainer_cls(load(), args=config, train_dataset=pairs(8), eval_dataset=sets, processing_class=tokenizer)


def test_disable_dropout_turns_off_the_rates_attention_modules_keep(tokenizer, tmp_path):  # noqa: F811
    # GPT-BigCode passes its attn_pdrop (0.1) to the attention call as a number: two training forwards differed
    # by 2.9 in the logits after TRL's disable_dropout (and fastdpo's, which only zeroed nn.Dropout)
    import trl

    import fastdpo.trl as dropin

    config = T.GPTBigCodeConfig(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.1,
                                resid_pdrop=0.1, embd_pdrop=0.1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    ids = torch.tensor([[5, 17, 42, 9, 33, 21, 8, 70]])
    for name, trainer_cls, config_cls in (("native", DPOTrainer, DPOConfig), ("dropin", dropin.DPOTrainer,
                                                                                 trl.DPOConfig)):  # fmt: skip
        torch.manual_seed(0)
        T.GPTBigCodeForCausalLM(config).save_pretrained(tmp_path / "bigcode")  # (TRL loads its reference from there)
        model = T.GPTBigCodeForCausalLM.from_pretrained(tmp_path / "bigcode")
        trainer_cls(model, args=args(tmp_path, name, config_cls), train_dataset=pairs(4), processing_class=tokenizer)
        model.train()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits), name


def test_batch_dependent_rotary_frequencies_are_warned_about(tokenizer, tmp_path):  # noqa: F811
    # dynamic NTK past max_position_embeddings: a sequence's log-probs follow the batch's longest position (step-1
    # logps/chosen -60.90 where TRL's -61.03 under pad_to_multiple_of), unsaid
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                           pad_token_id=tokenizer.pad_token_id,
                           rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})  # fmt: skip
    model = T.LlamaForCausalLM(config)
    for max_length, warned in ((64, True), (None, True), (24, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = args(tmp_path, "rope", DPOConfig, max_length=max_length, truncation_mode="keep_end")
            DPOTrainer(model, args=config, train_dataset=pairs(4), processing_class=tokenizer)
        said = [str(w.message) for w in caught if "rope_type 'dynamic'" in str(w.message)]
        assert bool(said) == warned, (max_length, said)


def test_the_dropins_precomputed_reference_cache_follows_max_length(tokenizer, load, tmp_path):  # noqa: F811
    # TRL names its cache file by the dataset's fingerprint and the model's hash: a run at another max_length under
    # keep_end read the first run's values (step-1 margins 11.1 where a policy equal to its reference has 0)
    import datasets
    import trl

    import fastdpo.trl as dropin

    path = tmp_path / "pairs.jsonl"
    pairs(8).to_json(path)

    def first_step(eps=None, config_cls=trl.DPOConfig, **settings):
        data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
        config = args(tmp_path, "pre", config_cls, max_steps=1, precompute_ref_log_probs=True,
                      truncation_mode="keep_end", beta=0.5, **settings)  # fmt: skip
        model = load()
        if eps is not None:  # (the same weights: TRL's hash of the model)
            model.config.rms_norm_eps = eps
        trainer = dropin.DPOTrainer(model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return next(log for log in trainer.state.log_history if "loss" in log)

    first_step(max_length=16)
    step = first_step(max_length=30)
    assert step["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # (fp32 packed rows' rounding: ~1e-6)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # nor by its config (a field changed at the same path read values 1.57 nats off), nor the attention of its pass
    # (a varlen run read the model's attention's file: its rounding, margins of ~1e-7)
    files = set((tmp_path / "cache").rglob("cache-*.arrow"))
    step = first_step(eps=1.0, max_length=30)
    assert step["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert len(set((tmp_path / "cache").rglob("cache-*.arrow")) - files) == 1  # (its own file)
    files = set((tmp_path / "cache").rglob("cache-*.arrow"))
    first_step(eps=1.0, max_length=30, config_cls=dropin.DPOConfig, packed_attention="varlen")
    assert len(set((tmp_path / "cache").rglob("cache-*.arrow")) - files) == 1


def test_sparse_attention_indexers_are_refused_under_varlen():
    # DeepSeek-V3.2's indexer reads the attention mask, None under fastdpo_varlen: a TypeError inside the model
    from fastdpo.model.attention import VARLEN, check_per_sequence

    config = T.DeepseekV32Config(**{**BASE, "num_key_value_heads": 4}, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                 v_head_dim=8, kv_lora_rank=16, q_lora_rank=16, head_dim=4, first_k_dense_replace=1,
                                 n_shared_experts=1, topk_group=1, n_group=1, n_routed_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, index_topk=4, index_n_heads=2, index_head_dim=8)  # fmt: skip
    with pytest.raises(ConfigError, match="sparse attention picks each query's top 4 keys"):
        check_per_sequence(T.DeepseekV32ForCausalLM(config), VARLEN)


def test_rates_a_model_reads_from_its_config_are_off_and_saved_as_given(tokenizer, tmp_path):  # noqa: F811
    # Falcon reads hidden_dropout and attention_dropout from its config at every call, GPT-Neo attention_dropout:
    # two training forwards differed by 0.22 in the logits after disable_dropout. Zeroed for training, saved as given
    from fastdpo.train.dropout import disable_dropout

    ids = torch.tensor([[5, 17, 42, 9, 33, 21, 8, 70]])
    for model in (T.FalconForCausalLM(T.FalconConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, hidden_dropout=0.3,
                                                     attention_dropout=0.3)),
                  T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2,
                                                     num_heads=4, attention_types=[[["global"], 2]],
                                                     attention_dropout=0.3))):  # fmt: skip
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, model(ids).logits)  # (on, as given)
            disable_dropout(model)
            assert torch.equal(model(ids).logits, model(ids).logits), type(model).__name__
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.2,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "given")
    given = T.LlamaForCausalLM.from_pretrained(tmp_path / "given")
    trainer = DPOTrainer(given, args=args(tmp_path, "saved", DPOConfig), train_dataset=pairs(4),
                         processing_class=tokenizer)  # fmt: skip
    assert trainer.model.config.attention_dropout == 0.0
    trainer.save_model(tmp_path / "out")
    assert T.AutoConfig.from_pretrained(tmp_path / "out").attention_dropout == 0.2  # the user's rate, not training's
    assert trainer.model.config.attention_dropout == 0.0  # (still off for the rest of training)


def test_the_dropins_precomputed_reference_is_scored_without_dropout(tokenizer, tmp_path):  # noqa: F811
    # TRL's constructor precomputes the reference before the drop-in turned dropout off: a model given in train mode
    # (as a fresh one is) had its reference scored with attention dropout on (step-1 margins -0.0018 where 0)
    import fastdpo.trl as dropin

    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
                           pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")  # fmt: skip
    precomputed = {}
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(config).train(mode == "train")
        config_args = args(tmp_path, mode, dropin.DPOConfig, precompute_ref_log_probs=True)
        trainer = dropin.DPOTrainer(model, args=config_args, train_dataset=pairs(4), processing_class=tokenizer)
        precomputed[mode] = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
    assert torch.equal(precomputed["train"], precomputed["eval"])  # (the same forward, dropout off in both)
