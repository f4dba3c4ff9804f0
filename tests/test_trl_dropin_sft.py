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


def test_rows_trls_sft_preparation_drops_are_counted_and_an_emptied_set_named(tmp_path):
    # TRL's SFT preparation (packing off) drops the rows whose prompt fills max_length: the drop-in said nothing
    # of a part dropped, failed in torch's sampler (num_samples=0) where the train set was emptied, and gave no
    # eval metrics at all for an emptied eval set (as fastdpo.trl.DPOTrainer and fastdpo.SFTTrainer do not)
    from fastdpo.errors import DataError

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")

    def long_prompts(rows, which):  # a prompt filling max_length (64 tokens) before its completion
        return rows.map(lambda row, i: {"prompt": "sky " * 80 if i in which else row["prompt"]}, with_indices=True)

    def build(name, train, eval_rows=None, **options):
        args = trl.SFTConfig(**sft_args(tmp_path, name, max_length=64), packing=False, **options)
        return dropin.SFTTrainer(load(), args=args, train_dataset=train, eval_dataset=eval_rows,
                                 processing_class=tokenizer)  # fmt: skip

    with pytest.warns(UserWarning, match=r"train data: 2 of 8 rows dropped: no token with a loss"):
        trainer = build("part", long_prompts(prompt_completion_rows(8), {0, 5}))
    assert len(trainer.train_dataset) == 6  # (TRL's drop itself, as TRL's)
    with pytest.raises(DataError, match="no row of the train data is left to train on: all 4 were dropped"):
        build("all", long_prompts(prompt_completion_rows(4), {0, 1, 2, 3}))
    emptied = long_prompts(prompt_completion_rows(4, seed=9), {0, 1, 2, 3})
    with pytest.raises(DataError, match="no row of the eval data is left to evaluate on"):
        build("eval", prompt_completion_rows(4), emptied, eval_strategy="steps", eval_steps=1)
    with pytest.warns(UserWarning, match="eval data: 4 of 4 rows dropped"):  # nothing evaluates it: TRL trains
        build("unused", prompt_completion_rows(4), emptied)
    trainer = build("later", prompt_completion_rows(4))
    with pytest.raises(DataError, match="no row of the eval data is left to evaluate on"):
        trainer.evaluate(emptied)


def test_the_dropins_predict_rows_as_given(tmp_path):
    # TRL's predict() of rows as given failed in transformers' column check ("No columns in the dataset match the
    # model's forward method signature"), where its evaluate() prepares them: the drop-ins prepare them as evaluate()
    # does, DPO's reference log-probs precomputed where TRL precomputes them
    import math

    from test_train_dpo import common_args, synthetic_pairs

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = {"dpo": synthetic_pairs(5, seed=3), "sft": prompt_completion_rows(5, seed=3)}

    def trainer(module, kind, name, **extra):
        if kind == "dpo":
            args = module.DPOConfig(**common_args(tmp_path, name), **extra)
            return module.DPOTrainer(load(), ref_model=None if extra else load(), args=args, train_dataset=rows["dpo"],
                                     processing_class=tokenizer)  # fmt: skip
        args = module.SFTConfig(**sft_args(tmp_path, name))
        return module.SFTTrainer(load(), args=args, train_dataset=rows["sft"], processing_class=tokenizer)

    for kind in ("dpo", "sft"):
        theirs = trainer(trl, kind, f"trl_{kind}").evaluate(eval_dataset=rows[kind])["eval_loss"]
        with pytest.raises(ValueError, match="No columns in the dataset match"):  # (TRL's predict, for the record)
            trainer(trl, kind, f"trl_{kind}").predict(rows[kind])
        with pytest.warns(UserWarning, match="predictions are None"):
            ours = trainer(dropin, kind, f"dropin_{kind}").predict(rows[kind])
        # the same rows, weights and batches (per_device_eval_batch_size): TRL's fp32 loss up to summation order
        assert ours.metrics["test_loss"] == pytest.approx(theirs, rel=1e-5), kind
    precomputed = trainer(dropin, "dpo", "precompute", precompute_ref_log_probs=True)
    with pytest.warns(UserWarning, match="predictions are None"):  # the policy is its reference: loss log 2
        assert precomputed.predict(rows["dpo"]).metrics["test_loss"] == pytest.approx(math.log(2), rel=1e-6)
    precomputed.train()
    with pytest.raises(ConfigError, match="the policy is no longer the reference"):
        precomputed.predict(rows["dpo"])


def test_the_dropins_predict_tokenized_rows_as_evaluate_does(tmp_path):
    # Tokenized rows went to TRL's predict() as they were: SFT's longer than max_length were scored uncut (6.3634
    # where evaluate() 6.3582), DPO's under precompute_ref_log_probs had no reference log-probs ("no reference: ...
    # pass precompute_ref_log_probs=True", which was set)
    import math

    import datasets
    from test_train_dpo import common_args, synthetic_pairs

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    sft = dropin.SFTTrainer(load(), args=dropin.SFTConfig(**sft_args(tmp_path, "sft"), packing=False),
                            train_dataset=prompt_completion_rows(6, seed=3), processing_class=tokenizer)  # fmt: skip
    assert sft.args.max_length < 60
    long = datasets.Dataset.from_dict({"input_ids": [[5 + (i * 7 + j) % 50 for j in range(60)] for i in range(4)]})
    with pytest.warns(UserWarning, match="predictions are None"):
        predicted = sft.predict(long).metrics["test_loss"]
    assert predicted == pytest.approx(sft.evaluate(long)["eval_loss"], rel=1e-6)  # the same batches: fp32 rounding
    # the trainer's own eval set, packed by TRL's preparation: packed again (its rows' sequences then attended to
    # each other's: 6.217257 where TRL's predict() and evaluate() gave 6.230246)
    rows = prompt_completion_rows(6, seed=4)
    packed = dropin.SFTTrainer(load(), args=dropin.SFTConfig(**sft_args(tmp_path, "packed"), packing=True),
                               train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)  # fmt: skip
    assert "seq_lengths" in packed.eval_dataset.column_names
    with pytest.warns(UserWarning, match="predictions are None"):
        predicted = packed.predict(packed.eval_dataset).metrics["test_loss"]
    assert predicted == pytest.approx(packed.evaluate()["eval_loss"], rel=1e-6)  # the same batches: fp32 rounding
    pairs = synthetic_pairs(5, seed=3)
    args = dropin.DPOConfig(**common_args(tmp_path, "dpo"), precompute_ref_log_probs=True)
    dpo = dropin.DPOTrainer(load(), args=args, train_dataset=pairs, processing_class=tokenizer)
    prepared = dpo._prepare_dataset(pairs, tokenizer, dpo.args, "x")  # text and token ids, as TRL leaves them
    only_ids = prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    for rows in (prepared, only_ids):
        with pytest.warns(UserWarning, match="predictions are None"):  # the policy is its reference: log 2
            assert dpo.predict(rows).metrics["test_loss"] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"packing": True, "pad_to_multiple_of": 8}, {"padding_free": True, "max_length": None, "pad_to_multiple_of": 7},
     {"packing": False, "pad_to_multiple_of": 8}],
    ids=["bfd", "padding_free", "padded"],
)  # fmt: skip
def test_num_tokens_as_trl_counts_them(options, tmp_path):
    # TRL counts a padding-free batch (bfd packing, padding_free) by its flattened row, padded to pad_to_multiple_of
    # (position_ids.size(1)), a padded one by its attention mask: the drop-in counted real tokens alone (36 where TRL
    # logged 40 under bfd and pad_to_multiple_of=8)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = prompt_completion_rows(8)
    counts = {}
    for name, trainer_cls in (("trl", trl.SFTTrainer), ("dropin", dropin.SFTTrainer)):
        args = trl.SFTConfig(**{**sft_args(tmp_path, name), **options})
        trainer = trainer_cls(load(), args=args, train_dataset=rows, processing_class=tokenizer)
        trainer.train()
        counts[name] = [log["num_tokens"] for log in trainer.state.log_history if "loss" in log]
    assert counts["dropin"] == counts["trl"] and len(counts["trl"]) >= 2
