"""The native trainers' model card (``fastdpo.train.model_card``): README.md in output_dir, read back with
huggingface_hub's own card parser; a README.md the user wrote is kept byte for byte; ``--overwrite`` removes only a
card fastdpo wrote. (The TRL drop-ins' tag on TRL's card: tests/test_trl_dropin.py.)"""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import ModelCard
from test_train_resume import args, load, pairs, prompt_completions, tokenizer  # noqa: F401

from fastdpo.cli_resume import stale_outputs
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from fastdpo.train.model_card import MARK, hub_name


def card(trainer) -> ModelCard:
    return ModelCard.load(f"{trainer.args.output_dir}/README.md")


def test_dpo_card_after_training(load, tokenizer, tmp_path):  # noqa: F811
    with pytest.warns(UserWarning, match="label_smoothing=0.2 is not used by loss_type"):
        config = args(tmp_path, "dpo", DPOConfig, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                      loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.25,
                      label_smoothing=0.2)  # fmt: skip
    trainer = DPOTrainer(load(), args=config, train_dataset=pairs(16), eval_dataset=pairs(6, seed=1),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model()
    written = card(trainer)
    assert MARK in written.text
    assert written.data.library_name == "transformers" and written.data.tags == ["fastdpo", "dpo", "sigmoid", "sft"]
    assert trainer.model.model_tags == written.data.tags  # (the model's own push_to_hub: as TRL's trainers tag it)
    assert written.data.base_model is None and written.data.datasets is None  # (a local model and local rows)
    text = written.text
    assert "| loss | sigmoid, sft (weights 1, 0.5), beta 0.25 |" in text
    assert "label smoothing" not in text  # (neither type reads it: the card said "label smoothing 0.2")
    assert "| trained | 4 of 4 steps," in text and "= 4 pairs per step |" in text
    assert "rafailov2023direct" in text and f'Model.from_pretrained("{tmp_path / "dpo"}")' in text
    # the last logged train and eval values, as the trainer logged them
    history = trainer.state.log_history
    train = [log for log in history if "loss" in log][-1]
    evaluated = [log for log in history if "eval_loss" in log][-1]
    assert f"| metric | train (step {train['step']}) | eval (step {evaluated['step']}) |" in text
    row = f"| rewards/margins | {train['rewards/margins']:.4g} | {evaluated['eval_rewards/margins']:.4g} |"
    assert row in text


def test_card_on_checkpoint_and_hub_arguments(load, tokenizer, tmp_path):  # noqa: F811
    config = args(tmp_path, "sft", SFTConfig, max_steps=2, save_steps=1, packing=True, hub_model_id="me/tiny-sft")
    model = load()
    model.config._name_or_path = "org/base-model"  # (as from_pretrained of a hub name sets it)
    trainer = SFTTrainer(model, args=config, train_dataset=prompt_completions(12), processing_class=tokenizer)
    trainer.train()  # (no save_model: the checkpoints write it, as TRL's do)
    written = card(trainer)
    assert written.data.base_model == "org/base-model" and written.data.tags == ["fastdpo", "sft"]
    assert trainer.model.model_tags == ["fastdpo", "sft"]
    assert "# tiny-sft" in written.text and 'Model.from_pretrained("me/tiny-sft")' in written.text
    assert "| loss | completion tokens |" in written.text and "| trained | 2 of 2 steps," in written.text
    assert "Citation" not in written.text
    # push_to_hub's arguments (transformers passes them to create_model_card)
    trainer.create_model_card(language="en", license="apache-2.0", tags=["mine"], dataset=["org/data"])
    written = card(trainer)
    assert written.data.tags == ["fastdpo", "sft", "mine"] and written.data.datasets == ["org/data"]
    assert written.data.language == "en" and written.data.license == "apache-2.0"
    assert "[org/data](https://huggingface.co/datasets/org/data)" in written.text


def test_user_readme_kept(load, tokenizer, tmp_path, caplog):  # noqa: F811
    mine = "# my notes\n\nnot a model card\n"
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "README.md").write_text(mine)
    trainer = DPOTrainer(load(), args=args(tmp_path, "dpo", DPOConfig, max_steps=2, save_steps=1),
                         train_dataset=pairs(8), processing_class=tokenizer)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        trainer.train()
        trainer.save_model()
    assert (tmp_path / "dpo" / "README.md").read_text() == mine
    said = [record.message for record in caplog.records if "not written by fastdpo" in record.message]
    assert len(said) == 1  # (once, not at each of the three saves)


def test_overwrite_removes_our_card_only(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, text in ((ours, f"---\ntags:\n- fastdpo\n---\n{MARK}\n# run\n"), (theirs, "# my run\n")):
        folder.mkdir()
        (folder / "README.md").write_text(text)
        (folder / "config.json").write_text("{}")
        (folder / "metrics.jsonl").write_text("")  # (a fastdpo run was there)
    assert sorted(p.name for p in stale_outputs(ours, overwrite=True, keep=())) == ["README.md", "config.json"]
    assert [p.name for p in stale_outputs(theirs, overwrite=True, keep=())] == ["config.json"]


def test_hub_names(tmp_path):
    (tmp_path / "data.jsonl").write_text("")
    assert hub_name("org/name") == "org/name" and hub_name("gpt2") == "gpt2"
    for local in (str(tmp_path / "data.jsonl"), "./model", "/abs/model", "~/model", "a/b/c", "", None):
        assert hub_name(local) is None
    # the name datasets records: a builder's ("json") or a hub dataset's without its owner links no page
    import datasets

    from fastdpo.train.model_card import _dataset_name

    rows = datasets.Dataset.from_list([{"prompt": "a"}])
    for recorded, named in (("json", None), ("ultrafeedback_binarized", None), ("org/prefs", "org/prefs")):
        rows.info.dataset_name = recorded
        assert _dataset_name(rows) == named


def test_lora_card_replaces_peft_template(load, tokenizer, tmp_path):  # noqa: F811
    # PEFT's save_pretrained writes its own template card into the folder it saves to; a run that saved no checkpoint
    # (so no card of fastdpo's yet) kept PEFT's template and warned that the user had written it
    from peft import LoraConfig

    trainer = DPOTrainer(load(), args=args(tmp_path, "lora", DPOConfig, max_steps=2, save_strategy="no"),
                         train_dataset=pairs(8), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))  # fmt: skip
    trainer.train()
    trainer.save_model()
    written = card(trainer)
    assert MARK in written.text and written.data.library_name == "peft"
    assert "| adapter | LORA r=4, alpha 8 |" in written.text and "| reference | the model with its adapter off |" in (
        written.text
    )
    assert "from peft import AutoPeftModelForCausalLM as Model" in written.text
    assert trainer.model.get_base_model().model_tags == ["fastdpo", "dpo", "sigmoid"]


def test_a_card_that_fails_does_not_stop_training(load, tokenizer, tmp_path, monkeypatch, caplog):  # noqa: F811
    from fastdpo.train import model_card

    def broken(trainer, **fields):
        raise KeyError("reference_mode")

    monkeypatch.setattr(model_card, "card_text", broken)
    trainer = DPOTrainer(load(), args=args(tmp_path, "dpo", DPOConfig, max_steps=2, save_steps=1),
                         train_dataset=pairs(8), processing_class=tokenizer)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        trainer.train()
    assert (tmp_path / "dpo" / "checkpoint-2").is_dir() and not (tmp_path / "dpo" / "README.md").exists()
    said = [record.message for record in caplog.records if "the model card was not written" in record.message]
    assert said and "KeyError" in said[0]
