"""DPOTrainer end to end on a tiny Llama, and parity with TRL 1.16's DPOTrainer on the first steps."""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.train import DPOConfig
from fastdpo.train.dpo import DPOTrainer

trl = pytest.importorskip("trl")
FIXTURE = "tests/fixtures/distilabel_orca.jsonl"


def tiny_model(tokenizer, path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return lambda: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def common_args(tmp_path, name):
    return {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "max_steps": 2,
            "learning_rate": 1e-2, "logging_steps": 1, "report_to": [], "bf16": False, "seed": 0,
            "gradient_checkpointing": False, "save_strategy": "no", "max_length": 64, "beta": 0.1}  # fmt: skip


@pytest.fixture(scope="module")
def data():
    import datasets

    from fastdpo.data import prepare_preferences

    datasets.disable_progress_bars()
    # normalized rows (prompt, chosen, rejected strings) so that both trainers read the same columns
    return prepare_preferences(FIXTURE, columns={"prompt": "input"}).select_columns(["prompt", "chosen", "rejected"])


def run(trainer_cls, config_cls, load, data, tokenizer, tmp_path, name, **extra):
    trainer = trainer_cls(model=load(), ref_model=load(), args=config_cls(**common_args(tmp_path, name), **extra),
                          train_dataset=data, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


def test_first_steps_match_trl(data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours")
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl")
    assert len(ours) == len(theirs) == 2
    # step 1: the same pairs through the same weights; step 2: after one identical optimizer step
    for name in ("logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens"):
        assert ours[0][name] == pytest.approx(theirs[0][name], rel=1e-4, abs=1e-7), name
    for name in ("logits/chosen", "logits/rejected"):  # means of ~0 over the vocabulary: an absolute bound
        assert ours[0][name] == pytest.approx(theirs[0][name], abs=1e-5), name
    assert ours[1]["num_tokens"] == theirs[1]["num_tokens"]
    for step in (0, 1):  # the gradient norms: the same gradients, before and after the first update
        assert ours[step]["grad_norm"] == pytest.approx(theirs[step]["grad_norm"], rel=1e-4)
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[1][name] == pytest.approx(theirs[1][name], rel=1e-4, abs=1e-6), name
    assert 0 < ours[0]["padding_fraction"] < 1


def test_unsupported_arguments_are_refused(tmp_path):
    from fastdpo.errors import ConfigError

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**common_args(tmp_path, "x"))
    with pytest.raises(ConfigError, match="peft_config"):
        DPOTrainer(load(), args=args, train_dataset=None, processing_class=tokenizer, peft_config={"r": 8})
    with pytest.raises(ConfigError, match="column 'model'"):
        DPOTrainer("some/model", args=args, processing_class=tokenizer)
