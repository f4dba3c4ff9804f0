"""``fastdpo.trl.ORPOTrainer`` / ``CPOTrainer``: TRL 1.16's experimental ORPO and CPO scripts with only the import
changed take TRL's steps.

Every run is the same script (``run``: TRL's config, the model loaded from one folder, the same data and tokenizer,
``bf16=False``) with TRL's trainer or the drop-in; TRL's loss code runs in both, on TRL's padded forward or on
fastdpo's packed one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_train_dpo import common_args, data, tiny_model  # noqa: F401
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError, DataError

trl = pytest.importorskip("trl")
dropin = pytest.importorskip("fastdpo.trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

TRAINERS = {"orpo": (ORPOTrainer, ORPOConfig, "ORPOTrainer"), "cpo": (CPOTrainer, CPOConfig, "CPOTrainer")}
CASES = {  # (trainer, options): ORPO; each CPO loss type, SimPO and CPO-SimPO, AlphaPO, label smoothing
    "orpo": ("orpo", {}),
    "orpo_accumulation": ("orpo", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 3}),
    "orpo_checkpointing": ("orpo", {"gradient_checkpointing": True}),  # (TRL's default)
    **{f"cpo_{kind}": ("cpo", {"loss_type": kind}) for kind in ("sigmoid", "hinge", "ipo")},
    "simpo": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
    "cpo_simpo": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.5}),
    "alphapo": ("cpo", {"loss_type": "alphapo", "alpha": 0.25}),
    "cpo_smoothed": ("cpo", {"loss_type": "sigmoid", "label_smoothing": 0.1}),
}
# the values TRL computes from the log-probs (logits/* are means over other positions: see the module's docstring)
COMPARED = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "nll_loss", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "log_odds_ratio", "log_odds_chosen")  # fmt: skip


def run(kind: str, ours: bool, load, data, tokenizer, tmp_path, name: str, **extra):  # noqa: F811
    trl_cls, config_cls, dropin_name = TRAINERS[kind]
    cls = getattr(dropin, dropin_name) if ours else trl_cls
    args = config_cls(**{**common_args(tmp_path, name), **extra})
    trainer = cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


def assert_steps_match(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) == 2
    for step, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        assert set(got) == set(want)  # TRL's metrics, under TRL's names, and no others
        for name in COMPARED:
            if name in want:
                # the same pairs through the same weights (step 2: after one identical update): fp32 sums of the
                # fused head against TRL's log_softmax differ in the last bits; margins are differences of such
                # values (|logps| ≈ 6–70 here, times β 0.1), so an absolute bound of a few of their ulps joins
                # the relative one
                ulp = torch.finfo(torch.float32).eps * max(abs(want["logps/chosen"]), abs(want["logps/rejected"]))
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=8 * ulp), (step, name)
        assert got["rewards/accuracies"] == want["rewards/accuracies"]


@pytest.mark.parametrize("case", CASES)
def test_changing_the_import_keeps_trl_steps(case, data, tmp_path):  # noqa: F811
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    kind, options = CASES[case]
    trainer, ours = run(kind, True, load, data, tokenizer, tmp_path, "dropin", **options)
    _, theirs = run(kind, False, load, data, tokenizer, tmp_path, "trl", **options)
    assert_steps_match(ours, theirs)
    assert isinstance(trainer, TRAINERS[kind][0])  # TRL's class, so callbacks and isinstance checks keep working


def test_the_packed_forward_replaces_trls_and_evaluate_matches(data, tmp_path, monkeypatch):  # noqa: F811
    from fastdpo import trl_experimental
    from fastdpo.train.dpo import PairPacker

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    paddings = []
    real = trl_experimental.pair_pass

    def spy(model, batch, **kwargs):
        paddings.append(batch.num_padding)
        return real(model, batch, **kwargs)

    monkeypatch.setattr(trl_experimental, "pair_pass", spy)
    results = {}
    for name, cls in (("dropin", dropin.ORPOTrainer), ("trl", ORPOTrainer)):
        args = ORPOConfig(**common_args(tmp_path, name), per_device_eval_batch_size=3)
        trainer = cls(model=load(), args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
        assert isinstance(trainer.data_collator, PairPacker) == (name == "dropin")
        results[name] = trainer.evaluate()
    assert len(paddings) == 2  # the drop-in's evaluate(): 5 pairs in batches of 3 and 2, packed
    assert set(results["dropin"]) == set(results["trl"])
    for name in ("eval_loss", "eval_logps/chosen", "eval_nll_loss", "eval_rewards/margins", "eval_log_odds_ratio"):
        # (fp32 sums in another order, as in the training steps)
        assert results["dropin"][name] == pytest.approx(results["trl"][name], rel=1e-4, abs=1e-6), name


def test_lora_and_the_saved_model(data, tmp_path):  # noqa: F811
    from huggingface_hub import ModelCard
    from peft import LoraConfig

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    logs = {}
    for name, cls in (("dropin", dropin.ORPOTrainer), ("trl", ORPOTrainer)):
        args = ORPOConfig(**{**common_args(tmp_path, name), "save_strategy": "steps", "save_steps": 2})
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    assert_steps_match(logs["dropin"], logs["trl"])
    tags = {name: set(ModelCard.load(tmp_path / name / "README.md").data.tags) for name in ("dropin", "trl")}
    assert tags["dropin"] - tags["trl"] == {"fastdpo"} and {"trl", "orpo"} <= tags["trl"]


def test_moe_router_loss_through_the_dropin(data, tmp_path):  # noqa: F811
    from tiny_models import save_tiny_mixtral

    tokenizer = build_tiny_tokenizer()
    saved = save_tiny_mixtral(tokenizer, tmp_path / "moe")

    def load():
        model = saved()
        model.config.output_router_logits = True  # (what turns TRL's aux loss on in these trainers)
        return model

    ours = run("orpo", True, load, data, tokenizer, tmp_path, "dropin")[1]
    theirs = run("orpo", False, load, data, tokenizer, tmp_path, "trl")[1]
    no_aux = run("orpo", True, saved, data, tokenizer, tmp_path, "plain")[1]
    assert_steps_match(ours, theirs)
    assert ours[0]["loss"] != pytest.approx(no_aux[0]["loss"], rel=1e-3)  # (the router loss is in it: 0.5 × ~2)


def test_what_needs_logits_or_padded_batches_is_refused(data, tmp_path):  # noqa: F811
    from transformers import default_data_collator

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = ORPOConfig(**common_args(tmp_path, "x"))
    for option, value in (("compute_metrics", lambda prediction: {}),
                          ("preprocess_logits_for_metrics", lambda logits, labels: logits),
                          ("data_collator", default_data_collator)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"option '{option}'"):
            dropin.ORPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer, **{option: value})
    args = CPOConfig(**common_args(tmp_path, "y"), generate_during_eval=True)
    with pytest.raises(ConfigError, match="option 'generate_during_eval'"):
        dropin.CPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer)


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_said(data, tmp_path):  # noqa: F811
    # TRL's truncation keeps the prompt and cuts the answer: a prompt of max_length leaves no completion token,
    # and TRL's ORPO trained on such a pair with a mean log-prob of no token (NaN)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    long = data.map(lambda row, i: {"prompt": row["prompt"] + " and more" * 40 * (i == 0)}, with_indices=True)
    args = ORPOConfig(**common_args(tmp_path, "x"))
    with pytest.warns(UserWarning, match=r"train data: 1 of 5 pairs dropped: their prompt fills max_length \(64"):
        trainer = dropin.ORPOTrainer(load(), args=args, train_dataset=long, processing_class=tokenizer)
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    every = data.map(lambda row: {"prompt": row["prompt"] + " and more" * 40})
    with pytest.raises(DataError, match="no pair of the train data is left to train on: all 5 were dropped") as error:
        dropin.ORPOTrainer(load(), args=args, train_dataset=every, processing_class=tokenizer)
    assert error.value.column == "train_dataset" and "max_length" in error.value.fix


def test_constructor_arguments_are_trls_in_trls_order():
    import inspect

    for kind, (trl_cls, _, name) in TRAINERS.items():
        ours = list(inspect.signature(getattr(dropin, name).__init__).parameters)
        assert ours == list(inspect.signature(trl_cls.__init__).parameters), kind


def test_a_token_the_model_has_no_embedding_for_is_named(data, tmp_path):  # noqa: F811
    # a model smaller than its tokenizer's vocabulary: TRL's ORPO ended in an IndexError from inside the embedding
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    args = ORPOConfig(**common_args(tmp_path, "x"))
    with pytest.raises(DataError, match="the model's input embedding has 40 rows") as error:
        dropin.ORPOTrainer(LlamaForCausalLM(config), args=args, train_dataset=data, processing_class=tokenizer)
    assert error.value.column == "chosen_input_ids" and error.value.row is not None


def test_neftune_noise_is_drawn_at_trls_scale_on_one_row(data, tmp_path, monkeypatch):  # noqa: F811
    # attention that works per sequence (fastdpo_varlen, flash) packs the batch into one row, and transformers' hook
    # scales the noise by the row length: TRL's padded rows are as long as the longest sequence (2.2x less noise
    # per token in a review's check, before)
    from test_train_sft import neftune_draws  # (fastdpo.trl imported fastdpo.model: fastdpo_varlen is registered)

    drawn = neftune_draws(monkeypatch)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")

    def varlen():
        model = load()
        model.set_attn_implementation("fastdpo_varlen")
        return model

    scales = {}
    for name, ours, loader in (("trl", False, load), ("dropin", True, varlen)):
        drawn.clear()
        run("orpo", ours, loader, data, tokenizer, tmp_path, name, neftune_noise_alpha=5.0,
            per_device_train_batch_size=4)  # fmt: skip
        scales[name] = list(drawn)
    assert len(scales["trl"]) == 2 and scales["dropin"] == pytest.approx(scales["trl"], rel=1e-6)


def test_a_prompt_learning_adapter_is_refused(data, tmp_path):  # noqa: F811
    # its virtual tokens are added by PeftModel.forward, which the packed forward does not run: train() failed in
    # autograd, evaluate() scored the bare base model
    from peft import PromptTuningConfig

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = ORPOConfig(**common_args(tmp_path, "x"))
    with pytest.raises(ConfigError, match="peft_config"):
        dropin.ORPOTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer,
                           peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))  # fmt: skip


def test_evaluate_drops_a_given_sets_emptied_pairs_as_the_constructor(data, tmp_path):  # noqa: F811
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    trainer = dropin.ORPOTrainer(load(), args=ORPOConfig(**common_args(tmp_path, "x")), train_dataset=data,
                                 processing_class=tokenizer)  # fmt: skip
    tokenized = trainer.train_dataset
    emptied = tokenized.map(lambda row, i: {"chosen_labels": [-100] * len(row["chosen_labels"]) if i == 0 else
                                            row["chosen_labels"]}, with_indices=True)  # fmt: skip
    with pytest.warns(UserWarning, match="eval data: 1 of 5 pairs dropped"):
        metrics = trainer.evaluate(emptied)
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate(tokenized.select(range(1, 5)))["eval_loss"])


def test_an_adapter_on_the_lm_head_is_refused_when_built(data, tmp_path):  # noqa: F811
    # fastdpo's head reads lm_head.weight and never trains its adapter: refused at the first step before, once the
    # constructor had loaded and prepared everything (TRL's DPO and SFT trainers refuse it themselves)
    from peft import LoraConfig

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    for cls, config in ((dropin.ORPOTrainer, ORPOConfig), (dropin.CPOTrainer, CPOConfig)):
        args = config(**common_args(tmp_path, "x"))
        with pytest.raises(ConfigError, match="option 'peft_config': an adapter on the LM head would never be trained"):
            cls(load(), args=args, train_dataset=data, processing_class=tokenizer,
                peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))  # fmt: skip
