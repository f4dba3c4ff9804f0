"""Evaluation through the native trainers' ``evaluate``: a set given to it is the set scored."""

from __future__ import annotations

import pytest
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

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
