"""Evaluation through the native trainers' ``evaluate``: a set given to it is the set scored."""

from __future__ import annotations

import pytest
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig, DPOTrainer


def test_a_set_given_to_evaluate_is_scored_under_persistent_workers(tmp_path):
    # transformers caches the "eval" DataLoader under dataloader_persistent_workers and returned it for any set given
    # to evaluate(): B was scored as the trainer's own eval set A (eval_logps/chosen -126.042 where B's is -57.178)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    sets = {"a": synthetic_pairs(4, seed=1), "b": synthetic_pairs(6, seed=5)}
    options = {"dataloader_num_workers": 1, "dataloader_persistent_workers": True, "per_device_eval_batch_size": 8}
    trainer = DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "p"), **options), train_dataset=sets["a"],
                         eval_dataset=sets["a"], processing_class=tokenizer)  # fmt: skip
    first, given, again = trainer.evaluate(), trainer.evaluate(eval_dataset=sets["b"]), trainer.evaluate()
    alone = DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "q")), train_dataset=sets["a"],
                       eval_dataset=sets["b"], processing_class=tokenizer).evaluate()  # fmt: skip
    assert given["eval_logps/chosen"] == pytest.approx(alone["eval_logps/chosen"], rel=1e-6)
    assert again["eval_logps/chosen"] == pytest.approx(first["eval_logps/chosen"], rel=1e-6)  # (its own set again)
    assert given["eval_logps/chosen"] != pytest.approx(first["eval_logps/chosen"], rel=1e-3)


def test_eval_metrics_are_each_evaluations_own_under_its_prefix(tmp_path):
    # predict() never logs: its batches' metrics were averaged into the next evaluate()'s (accuracy 0.5 where the
    # set's is 0.75); evaluate(metric_key_prefix="test") and a dict's sets logged theirs as eval_* (one name: the
    # last set's values)
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    sets = {"x": synthetic_pairs(4, seed=1), "y": synthetic_pairs(6, seed=5)}
    cases = (("dpo", DPOTrainer, DPOConfig(**common_args(tmp_path, "d")), sets, "logps/chosen"),
             ("sft", SFTTrainer, SFTConfig(**sft_args(tmp_path, "s")), {"x": prompt_completion_rows(4, seed=1),
                                                                        "y": prompt_completion_rows(6, seed=5)},
              "entropy"))  # fmt: skip
    for name, trainer_cls, args, data, metric in cases:
        trainer = trainer_cls(load(), args=args, train_dataset=data["x"], eval_dataset=data["x"],
                              processing_class=tokenizer)  # fmt: skip
        alone = {key: trainer.evaluate(eval_dataset=part)[f"eval_{metric}"] for key, part in data.items()}
        assert alone["x"] != pytest.approx(alone["y"], rel=1e-6), name  # (sets that differ in it)

        def prepared(part, trainer=trainer, name=name, args=args):  # (predict() and the trainer's sets: prepared)
            return trainer._prepare(part, tokenizer, args, "eval") if name == "dpo" else trainer._prepare_eval(
                part, tokenizer, args)  # fmt: skip

        trainer.predict(prepared(data["y"]))
        # (the same set again: the same batches and fp32 sums; a mix of another set's batches moves it by ~5e-5)
        assert trainer.evaluate()[f"eval_{metric}"] == pytest.approx(alone["x"], rel=1e-7), name
        assert trainer.evaluate(metric_key_prefix="test")[f"test_{metric}"] == pytest.approx(alone["x"], rel=1e-7)
        logged = trainer.state.log_history[-1]
        assert f"test_{metric}" in logged and f"eval_{metric}" not in logged, (name, logged)
        trainer.eval_dataset = {key: prepared(part) for key, part in data.items()}  # each its own, under its name
        both = trainer.evaluate()
        for key in data:
            assert both[f"eval_{key}_{metric}"] == pytest.approx(alone[key], rel=1e-7), (name, key)


def test_predict_takes_raw_rows_as_evaluate_does(tmp_path):
    # predict() of raw rows failed in transformers' column check ("No columns in the dataset match the model's
    # forward method signature"), where evaluate() of the same rows prepared them
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    cases = (("dpo", DPOTrainer, DPOConfig(**common_args(tmp_path, "d")), synthetic_pairs(5, seed=3)),
             ("sft", SFTTrainer, SFTConfig(**sft_args(tmp_path, "s")), prompt_completion_rows(5, seed=3)))  # fmt: skip
    for name, trainer_cls, args, rows in cases:
        trainer = trainer_cls(load(), args=args, train_dataset=rows, processing_class=tokenizer)
        raw = trainer.predict(rows)
        assert raw.predictions is None and raw.label_ids is None  # (the fused head builds no logits)
        prepared = trainer.predict(trainer.train_dataset)  # the constructor's preparation of the same rows
        evaluated = trainer.evaluate(eval_dataset=rows)
        # the same rows, batches and weights: the same fp32 sums
        assert raw.metrics["test_loss"] == pytest.approx(prepared.metrics["test_loss"], rel=1e-7), name
        assert raw.metrics["test_loss"] == pytest.approx(evaluated["eval_loss"], rel=1e-7), name


def test_predict_under_a_cached_reference_takes_the_trainers_sets(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = synthetic_pairs(4, seed=2)
    args = DPOConfig(**common_args(tmp_path, "c"), precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(load(), args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
    # its eval set carries the reference's values: scored as evaluate() scores it (a policy equal to its reference)
    assert trainer.predict(trainer.eval_dataset).metrics["test_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])
    stale = trainer.eval_dataset.map(lambda row: {"ref_chosen_logps": row["ref_chosen_logps"] - 5.0})  # another
    for score in (trainer.predict, trainer.evaluate):  # raw rows: no reference to compute their values with; a set
        for given in (rows, stale):  # with another run's values: scored against that run's reference (loss 5.1 where
            with pytest.raises(ConfigError, match="cached reference"):  # the trainer's own is log 2), before
                score(given)
    sets = {"a": synthetic_pairs(4, seed=2), "b": synthetic_pairs(3, seed=4)}
    args = DPOConfig(**common_args(tmp_path, "d"), precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"))
    several = DPOTrainer(load(), args=args, train_dataset=rows, eval_dataset=sets, processing_class=tokenizer)
    given, own = several.evaluate(several.eval_dataset), several.evaluate()  # (a dict of its own sets: taken)
    for key in ("eval_a_loss", "eval_b_loss", "eval_a_rewards/margins", "eval_b_logps/chosen"):
        assert given[key] == pytest.approx(own[key], rel=1e-6), key
