"""SFT trainers on inputs beyond the plain ones: a model whose loss transformers does not map to its causal loss
(the drop-in divides as TRL), datasets with a format or a transform, and compute_loss asked for the outputs."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from test_train_sft import (  # noqa: F401  (fixtures)
    assert_first_steps_match,
    common_args,
    load,
    prompt_completion_rows,
    sentence,
    tokenizer,
    train,
)

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer


def test_dropin_on_a_model_transformers_does_not_count_as_causal_divides_as_trl(tokenizer, tmp_path):  # noqa: F811
    # GPT2LMHeadModel has no loss_type transformers maps to its causal loss (_loss_shifts_labels is False): TRL's
    # padded batches count every label, each row's first too, which no position predicts; the drop-in divided by
    # the targets (loss 6.376 where TRL's 5.705). fastdpo's own trainer keeps the mean over the targets.
    trl = pytest.importorskip("trl")
    dropin = pytest.importorskip("fastdpo.trl")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        pad_token_id=tokenizer.pad_token_id, **dropout)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")

    def gpt2():
        return GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)

    rng = random.Random(3)
    data = datasets.Dataset.from_dict({"text": [sentence(rng, 3, 12) for _ in range(8)]})
    options = {"packing": False, "gradient_accumulation_steps": 2}
    _, ours = train(dropin.SFTTrainer, trl.SFTConfig, gpt2, data, tokenizer, tmp_path, "dropin", **options)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, gpt2, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs, eval_data=False)
    _, native = train(SFTTrainer, SFTConfig, gpt2, data, tokenizer, tmp_path, "native", **options)
    assert native[0]["loss"] > theirs[0]["loss"] * 1.02  # (the mean over targets: fewer items than TRL counts)


def test_compute_loss_asked_for_outputs_says_there_are_no_logits(load, tokenizer, tmp_path):  # noqa: F811
    # TRL returns (loss, the model's outputs) to a subclass's compute_loss(..., return_outputs=True); fastdpo's
    # native trainers and drop-in SFT gave (loss, {}), whose outputs["logits"] failed later with a bare KeyError
    import trl

    import fastdpo.trl as dropin

    data = prompt_completion_rows(4)
    pairs = datasets.Dataset.from_list([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}])
    options = {"processing_class": tokenizer}
    trainers = [
        SFTTrainer(load(), args=SFTConfig(**common_args(tmp_path, "a")), train_dataset=data, **options),
        dropin.SFTTrainer(load(), args=trl.SFTConfig(**common_args(tmp_path, "b")), train_dataset=data, **options),
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "c")), train_dataset=pairs, **options),
    ]
    for trainer in trainers:
        batch = next(iter(trainer.get_train_dataloader()))
        with pytest.raises(ConfigError, match="option 'return_outputs': .*full logits the fused head never builds"):
            trainer.compute_loss(trainer.model, batch, return_outputs=True)
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch))  # (without: the loss, as before)


def test_a_dataset_with_a_format_trains_and_one_with_a_transform_is_refused(load, tokenizer, tmp_path):  # noqa: F811
    # set_format("torch") / numpy: the preparation's maps read tensors ("Boolean value of Tensor ... is ambiguous"
    # inside the packer) where TRL's train; with_transform: TRL refuses it, ours failed with KeyError '_prompt_cut'
    data = prompt_completion_rows(8)
    losses = []
    for rows in (data, data.with_format("torch"), data.with_format("numpy")):
        args = SFTConfig(**common_args(tmp_path, "f", packing=True, max_steps=1, report_to="none"))
        trainer = SFTTrainer(load(), args=args, train_dataset=rows, eval_dataset=rows.select(range(2)),
                             processing_class=tokenizer)  # fmt: skip
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[1] == losses[2] == losses[0]  # (the same rows: the same step)
    shouting = data.with_transform(lambda batch: {**batch, "prompt": [p.upper() for p in batch["prompt"]]})
    with pytest.raises(ConfigError, match="option 'train_dataset': the train dataset has a transform"):
        SFTTrainer(load(), args=SFTConfig(**common_args(tmp_path, "t")), train_dataset=shouting,
                   processing_class=tokenizer)  # fmt: skip
