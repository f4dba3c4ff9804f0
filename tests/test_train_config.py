"""DPOConfig: TRL 1.16's DPO fields with TRL's names and defaults; our own; unsupported options refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from fastdpo.errors import ConfigError
from fastdpo.train.config import DPOConfig

trl = pytest.importorskip("trl")


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_trl_dpo_option_exists_with_the_same_default():
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours, theirs = defaults(DPOConfig), defaults(trl.DPOConfig)
    dpo_fields = [name for name in theirs if name not in base]
    assert len(dpo_fields) >= 20  # the test reads TRL's own list, not ours
    for name in dpo_fields:
        assert name in ours, name
        assert ours[name] == theirs[name], name
    # the TrainingArguments defaults TRL changes; bf16 is resolved in __post_init__ (see the next test)
    for name in ("learning_rate", "logging_steps", "gradient_checkpointing", "bf16"):
        assert ours[name] == theirs[name], name


def test_checkpointing_is_on_by_default_without_a_deprecation_warning(tmp_path):
    # TRL's gradient_checkpointing=True made transformers 5 warn "`gradient_checkpointing` is deprecated" at every
    # config, the user having written neither name; TRL's name and its flags (--gradient_checkpointing alone,
    # --no_gradient_checkpointing) are kept
    import warnings

    from fastdpo.train import SFTConfig

    common = {"output_dir": str(tmp_path), "report_to": []}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for cls in (DPOConfig, SFTConfig):
            args = cls(**common)
            assert args.gradient_checkpointing is args.activation_checkpointing is True
            for name in ("gradient_checkpointing", "activation_checkpointing"):
                off = cls(**common, **{name: False})
                assert off.gradient_checkpointing is off.activation_checkpointing is False, name
            parser = transformers.HfArgumentParser(cls)
            for flags, expected in ((["--no_gradient_checkpointing"], False), (["--gradient_checkpointing"], True)):
                (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *flags])
                assert parsed.activation_checkpointing is expected, flags


def test_bf16_unset_means_fp32_on_a_cpu(tmp_path):
    config = DPOConfig(output_dir=str(tmp_path), report_to=[])
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert config.loss_config().loss_types == ("sigmoid",) and config.loss_config().beta == 0.1


@pytest.mark.parametrize(
    ("options", "column"),
    [({"ld_alpha": 1.5}, "ld_alpha"), ({"ld_alpha": -0.1}, "ld_alpha"),
     ({"use_weighting": True, "loss_type": "aot"}, "use_weighting"),
     ({"ld_alpha": 0.5, "loss_type": "simpo"}, "ld_alpha"),
     ({"use_weighting": True, "loss_type": "orpo"}, "use_weighting"),
     ({"sync_ref_model": True, "reference": "cached"}, "sync_ref_model"),
     ({"ref_offload": True, "reference": "cached"}, "ref_offload"), ({"beta": 0.0}, "beta"),
     ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy"),
     ({"loss_type": "sigmod"}, "loss_type"), ({"truncation_mode": "keep_middle"}, "truncation_mode"),
     ({"reference": "cahced"}, "reference"), ({"head_impl": "fast"}, "head_impl"),
     ({"pack_length": 1000}, "pack_length"), ({"label_smoothing": 0.6, "loss_type": "robust"}, "label_smoothing")],
)  # fmt: skip
def test_bad_or_unsupported_options_name_the_option(options, column, tmp_path):
    with pytest.raises(ConfigError, match=rf"option '{column}'"):
        DPOConfig(output_dir=str(tmp_path), report_to=[], **options)


@pytest.mark.parametrize("report_to", ["wandbb", ["tensorboard", "tensorbord"]])
def test_an_unknown_report_to_is_named_with_a_guess(report_to, tmp_path):
    from fastdpo.train import SFTConfig

    # transformers' own ValueError comes later, from inside the Trainer's constructor
    for config_cls in (DPOConfig, SFTConfig):
        with pytest.raises(ConfigError, match=r"option 'report_to': unknown value 'tensorbord|wandbb' — did you mean"):
            config_cls(output_dir=str(tmp_path), report_to=report_to)
    assert DPOConfig(output_dir=str(tmp_path), report_to="none").report_to == []


def test_padding_free_warns_and_a_string_loss_type_is_a_list(tmp_path):
    with pytest.warns(UserWarning, match="always packs"):
        config = DPOConfig(output_dir=str(tmp_path), report_to=[], padding_free=True, loss_type="ipo")
    assert config.loss_type == ["ipo"]
    assert DPOConfig(output_dir=str(tmp_path), report_to=[], pack_length=2048).pack_length == 2048


def test_torch_compile_is_said_and_turned_off_by_every_trainer(tmp_path):
    # the packed step runs the layers itself and never calls the compiled module's forward: torch_compile=True
    # compiled nothing (0 frames traced, TRL's DPO 19), looking applied (an OptimizedModule), unsaid
    from test_train_dpo import common_args, tiny_model
    from test_train_peft import data as dpo_data
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows
    from tiny_tokenizer import build_tiny_tokenizer

    import fastdpo.trl as dropin
    from fastdpo.train import DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    pairs, rows = dpo_data.__wrapped__(), prompt_completion_rows(4)
    compiled = {"torch_compile": True, "torch_compile_backend": "eager"}
    for trainer_cls, config_cls, args, data in (
        (DPOTrainer, DPOConfig, common_args(tmp_path, "dpo"), pairs),
        (dropin.DPOTrainer, trl.DPOConfig, common_args(tmp_path, "trl_dpo"), pairs),
        (SFTTrainer, SFTConfig, sft_args(tmp_path, "sft"), rows),
        (dropin.SFTTrainer, trl.SFTConfig, sft_args(tmp_path, "trl_sft"), rows),
    ):
        with pytest.warns(UserWarning, match=r"torch_compile=True is not applied and is set to False"):
            trainer = trainer_cls(model=load(), args=config_cls(**args, **compiled), train_dataset=data,
                                  processing_class=tokenizer)  # fmt: skip
        assert not trainer.args.torch_compile and trainer.args.torch_compile_backend is None
        assert trainer.accelerator.state.dynamo_plugin.backend.value == "NO", trainer_cls


def test_a_triton_head_off_cuda_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    # it was refused at the first step, from inside the head op (after the data's preparation and the model's load)
    import datasets
    from test_train_dpo import common_args, tiny_model
    from test_train_sft import common_args as sft_args
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.train import DPOTrainer, SFTConfig, SFTTrainer

    if torch.cuda.is_available():
        pytest.skip("the trainer's device is CUDA here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    pairs = datasets.Dataset.from_dict({"prompt": ["Q?"], "chosen": [" A."], "rejected": [" B."]})
    texts = datasets.Dataset.from_dict({"prompt": ["Q?"], "completion": [" A."]})
    cases = ((DPOTrainer, DPOConfig(**common_args(tmp_path, "d"), head_impl="triton"), pairs),
             (SFTTrainer, SFTConfig(**sft_args(tmp_path, "s"), head_impl="triton"), texts))  # fmt: skip
    for trainer_cls, args, data in cases:
        with pytest.raises(ConfigError, match="option 'head_impl': 'triton' runs on CUDA tensors"):
            trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer)


def test_without_a_config_the_output_folder_is_trls(tmp_path, monkeypatch):
    # TRL names it after the model, f"{name_or_path.split('/')[-1]}-DPO" ("-SFT"; its trainers' args=None branch:
    # they cannot be built so on a CPU, their default bf16 refused); fastdpo wrote to transformers' "trainer_output"
    import datasets
    from test_train_dpo import tiny_model
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo import DPOTrainer, SFTTrainer

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "org" / "tiny")
    tokenizer.save_pretrained(tmp_path / "org" / "tiny")
    pairs = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": " Yes.", "rejected": " No."}] * 2)
    texts = datasets.Dataset.from_list([{"prompt": "Q?", "completion": " Yes."}] * 2)
    for trainer, data, expected in ((DPOTrainer, pairs, "tiny-DPO"), (SFTTrainer, texts, "tiny-SFT")):
        assert trainer(model=load(), train_dataset=data, processing_class=tokenizer).args.output_dir == expected
        assert trainer(model=str(tmp_path / "org" / "tiny"), train_dataset=data).args.output_dir == expected


def test_the_trainers_take_trls_arguments_in_trls_order_and_refuse_compute_metrics(tmp_path):
    # fastdpo's DPOTrainer put train_dataset fourth (TRL: data_collator): DPOTrainer(model, None, args, None, pairs)
    # gave the pairs to eval_dataset and refused "the train dataset is a NoneType"; compute_metrics was accepted and
    # never called (its evaluation builds no logits), where README said it was refused
    import inspect

    import datasets
    from test_train_dpo import common_args, tiny_model
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.train import DPOTrainer, SFTTrainer

    for ours, theirs in ((DPOTrainer, trl.DPOTrainer), (SFTTrainer, trl.SFTTrainer)):
        names = list(inspect.signature(theirs.__init__).parameters)
        assert list(inspect.signature(ours.__init__).parameters)[: len(names)] == names, ours
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, tmp_path / "model")()
    pairs = datasets.Dataset.from_dict({"prompt": ["Q?"] * 2, "chosen": [" A."] * 2, "rejected": [" B."] * 2})
    args = DPOConfig(**common_args(tmp_path, "d"))
    trainer = DPOTrainer(model, None, args, None, pairs, None, tokenizer)  # (TRL's positional order)
    assert len(trainer.train_dataset) == 2 and trainer.eval_dataset is None
    with pytest.raises(ConfigError, match="option 'compute_metrics': is not supported: fastdpo never builds"):
        DPOTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer, compute_metrics=len)


def test_liger_kernels_on_a_cpu_refused_before_the_first_step(tmp_path):
    # use_liger_kernel on a CPU ended at the first step in Triton's "0 active drivers ([]). There should only be one."
    # (TRL's too); native configs refuse it as they are made, the drop-ins as they are built
    import datasets
    from test_train_dpo import common_args, tiny_model
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.train.sft_config import SFTConfig
    from fastdpo.trl import DPOTrainer, SFTTrainer

    said = "option 'use_liger_kernel': patches the model with Liger's Triton kernels, which run on a GPU only; this "
    for config in (DPOConfig, SFTConfig):
        with pytest.raises(ConfigError, match=said) as error:
            config(output_dir=str(tmp_path / "n"), use_liger_kernel=True, use_cpu=True)
        assert str(error.value).endswith("remove use_liger_kernel: fastdpo's fused head needs no Liger to compute the "
                                         "loss without logits"), error.value  # fmt: skip
    if torch.cuda.is_available():  # (this test's configs are CPU runs; without use_cpu a GPU would take them)
        return
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, tmp_path / "model")()
    pairs = datasets.Dataset.from_dict({"prompt": ["Q?"] * 2, "chosen": [" A."] * 2, "rejected": [" B."] * 2})
    with pytest.raises(ConfigError, match=said):
        DPOTrainer(model, args=trl.DPOConfig(**common_args(tmp_path, "d"), use_liger_kernel=True),
                   train_dataset=pairs, processing_class=tokenizer)  # fmt: skip
    text = datasets.Dataset.from_dict({"text": ["Q? A."] * 2})
    with pytest.raises(ConfigError, match=said):
        SFTTrainer(model, args=trl.SFTConfig(output_dir=str(tmp_path / "s"), use_liger_kernel=True, bf16=False),
                   train_dataset=text, processing_class=tokenizer)  # fmt: skip


def test_liger_is_checked_after_accelerates_state_is_set_up(tmp_path):
    # DPOConfig read self.device (for use_liger_kernel) before TrainingArguments' __post_init__ had read
    # accelerator_config: use_configured_state was ignored and the user's PartialState reset. A non-CPU device
    # (accelerate's meta stand-in) so that the option is taken, with its warning; in a process of its own
    import subprocess
    import sys

    script = f"""
import os, warnings
os.environ["ACCELERATE_TORCH_DEVICE"] = "meta"
from accelerate import PartialState
from fastdpo.train import DPOConfig, SFTConfig
for config in (DPOConfig, SFTConfig):
    PartialState._reset_state()
    mine = PartialState(cpu=True)
    mine.marker = "the user's"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        args = config(output_dir={str(tmp_path)!r}, use_liger_kernel=True, report_to=[], bf16=False,
                      accelerator_config={{"use_configured_state": True}})
    assert any("fused head already computes the loss" in str(w.message) for w in said), config
    assert PartialState().__dict__.get("marker") == "the user's", config
    assert args.distributed_state.__dict__.get("marker") == "the user's", config
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
