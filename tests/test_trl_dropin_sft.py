"""The drop-ins (``fastdpo.trl``) given what a user of both packages writes: fastdpo's own configs, sets that TRL's
preparation drops rows from."""

from __future__ import annotations

import pytest
from test_train_dpo import tiny_model
from test_train_sft import common_args as sft_args
from test_train_sft import prompt_completion_rows
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig, SFTConfig

trl = pytest.importorskip("trl")
dropin = pytest.importorskip("fastdpo.trl")


def test_fastdpo_configs_given_to_the_dropins(tmp_path):
    # fastdpo.SFTConfig given to fastdpo.trl.SFTTrainer failed inside TRL (its rebuild of a config it does not know:
    # "SFTConfig.__init__() got an unexpected keyword argument 'pack_length'"); fastdpo.DPOConfig's own fields, given
    # to fastdpo.trl.DPOTrainer, were ignored silently
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = prompt_completion_rows(6)
    losses = {}
    for name, config in (("native_config", SFTConfig), ("dropin_config", dropin.SFTConfig)):
        trainer = dropin.SFTTrainer(load(), args=config(**sft_args(tmp_path, name)), train_dataset=rows,
                                    processing_class=tokenizer)  # fmt: skip
        assert type(trainer.args) is dropin.SFTConfig
        trainer.train()
        losses[name] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses["native_config"] == losses["dropin_config"]  # the same config, the same steps
    with pytest.raises(ConfigError, match="pack_length: options of fastdpo's own trainer") as error:
        dropin.SFTTrainer(load(), args=SFTConfig(**sft_args(tmp_path, "own"), pack_length=64), train_dataset=rows,
                          processing_class=tokenizer)  # fmt: skip
    assert "fastdpo.SFTTrainer" in error.value.fix
    with pytest.raises(ConfigError, match="reference, ref_offload: options of fastdpo's own trainer"):
        dropin.DPOTrainer(load(), args=DPOConfig(output_dir=str(tmp_path / "dpo"), reference="separate",
                                                 ref_offload=True))  # fmt: skip
