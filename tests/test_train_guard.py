"""The numerics guard of fastdpo's DPO trainer: a step with a non-finite loss or gradient skipped (nothing moves), its
metrics and loss logged as such, and too many in a row stopping training with a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.train import DPOConfig
from fastdpo.train.dpo import DPOTrainer


def test_a_non_finite_step_is_skipped_and_too_many_stop_training(tmp_path):
    from fastdpo.train.common import NumericsError

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    poisoned_calls = {2}  # the policy body's 2nd forward (step 2; the reference is a separate model)
    snapshots = []

    def poison(module, inputs, output):
        poison.calls += 1
        return output * float("nan") if poison.calls in poisoned_calls else output

    poison.calls = 0
    policy = load()
    args = DPOConfig(**{**common_args(tmp_path, "guard"), "max_steps": 3})
    trainer = DPOTrainer(policy, ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    policy.model.norm.register_forward_hook(poison)  # (after the trainer's once-per-model probe: the steps' forwards)

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(policy.lm_head.weight.detach().clone())

    trainer.add_callback(Snapshot())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert torch.equal(snapshots[0], snapshots[1])  # step 2 moved nothing
    assert not torch.equal(snapshots[1], snapshots[2])  # step 3 trained again
    assert [log.get("nonfinite_steps", 0) for log in logs] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    # the skipped step's log: its loss NaN (transformers' filter logged 0.0), its NaN metrics left out (a window
    # holding it was NaN whole); a window of steps 1-3 averages steps 1 and 3
    assert math.isnan(logs[1]["loss"]) and "rewards/margins" not in logs[1] and logs[1]["grad_norm"] != 0
    poison.calls = 0
    args = DPOConfig(**{**common_args(tmp_path, "window"), "max_steps": 3, "logging_steps": 3})
    trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.model.norm.register_forward_hook(poison)
    trainer.train()
    (window,) = [log for log in trainer.state.log_history if "loss" in log]
    assert window["nonfinite_steps"] == 1 and math.isfinite(window["loss"]) and math.isfinite(window["rewards/margins"])

    poisoned_calls.update(range(1, 100))  # every step from now on: 2 in a row stop with a checkpoint
    poison.calls = 0
    args = DPOConfig(**{**common_args(tmp_path, "stop"), "max_steps": 5, "max_nonfinite_steps": 2})
    trainer = DPOTrainer(policy, ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(NumericsError, match="2 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert (tmp_path / "stop" / "checkpoint-2" / "model.safetensors").exists()
