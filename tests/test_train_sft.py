"""SFTTrainer end to end on a tiny Llama: parity with TRL 1.16's SFTTrainer, a naive loss check, SFT → DPO."""

from __future__ import annotations

import dataclasses
import math
import random
import re

import datasets
import pytest
import torch
import transformers
from tiny_models import save_tiny_mixtral
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.data.packing import pack_sft
from fastdpo.data.tiny_tokenizer import CORPUS
from fastdpo.errors import ConfigError, DataError
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, sft_step
from fastdpo.train.sft import SequencePacker

datasets.disable_progress_bars()
WORDS = sorted(set(re.findall(r"[a-z]+", " ".join(CORPUS[:6]).lower())))  # words the tokenizer was trained on


def sentence(rng: random.Random, low: int, high: int) -> str:
    # words often repeat: the tiny model (tied embeddings) then gets some tokens right, so accuracy is not all 0
    words = [rng.choice(WORDS)]
    for _ in range(rng.randint(low, high) - 1):
        words.append(words[-1] if rng.random() < 0.4 else rng.choice(WORDS))
    return " ".join(words)


def prompt_completion_rows(count: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = [{"prompt": sentence(rng, 1, 12), "completion": " " + sentence(rng, 1, 10)} for _ in range(count)]
    rows[3]["prompt"] = sentence(rng, 40, 40)  # longer than max_length: cut (packing) or dropped (not packing)
    return datasets.Dataset.from_list(rows)


def tokenized_rows(tokenizer, count: int, seed: int = 3) -> datasets.Dataset:
    """Already tokenized rows with a completion mask, some longer than max_length (32)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = tokenizer(sentence(rng, 2, 20))["input_ids"]
        completion = tokenizer(" " + sentence(rng, 2, 16), add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return datasets.Dataset.from_list(rows)


def message_rows(count: int, seed: int = 1) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        turns = [
            {"role": "user", "content": sentence(rng, 1, 8)},
            {"role": "assistant", "content": sentence(rng, 1, 8)},
        ]
        if i % 3 == 0:
            turns = [{"role": "system", "content": sentence(rng, 2, 6)}, *turns]
        rows.append({"messages": turns})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def tiny_llama_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       attn_implementation="sdpa", tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(path)
    return lambda: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def common_args(tmp_path, name: str, **extra) -> dict:
    args = {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "max_steps": 2,
            "learning_rate": 1e-2, "logging_steps": 1, "report_to": [], "bf16": False, "seed": 0,
            "gradient_checkpointing": False, "save_strategy": "no", "max_length": 32,
            "dataloader_pin_memory": False}  # fmt: skip
    return {**args, **extra}


def train(trainer_cls, config_cls, load, data, tokenizer, tmp_path, name, eval_data=None, **extra):
    args = config_cls(**common_args(tmp_path, name, **extra))
    trainer = trainer_cls(model=load(), args=args, train_dataset=data, processing_class=tokenizer,
                          eval_dataset=eval_data)  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return trainer, logs + ([trainer.evaluate()] if eval_data is not None else [])


# --------------------------------------------------------------------------------------------------- parity with TRL

CASES = {
    "packed_prompt_completion": (prompt_completion_rows(24), {"packing": True}),
    "messages_with_eval": (message_rows(8), {"packing": False, "eval_data": message_rows(5, seed=7)}),
    "grad_accumulation": (prompt_completion_rows(16, seed=2), {"packing": False, "gradient_accumulation_steps": 2}),
    "tokenized_split_shuffled": (None, {"packing": True, "packing_strategy": "bfd_split", "shuffle_dataset": True,
                                        "completion_only_loss": True}),
    # TRL: transformers' LabelSmoother on a second forward with the full logits; fastdpo: from the head's rows
    "label_smoothing": (prompt_completion_rows(16, seed=5), {"packing": False, "gradient_accumulation_steps": 2,
                        "label_smoothing_factor": 0.2, "eval_data": prompt_completion_rows(6, seed=8)}),
}  # fmt: skip
EVAL_METRICS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")


@pytest.mark.parametrize("case", list(CASES))
def test_first_steps_match_trl(case, load, tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    data, options = CASES[case]
    data = tokenized_rows(tokenizer, 12) if data is None else data
    trainer, ours = train(SFTTrainer, SFTConfig, load, data, tokenizer, tmp_path, "ours", **options)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs, eval_data="eval_data" in options)
    assert 0 <= ours[0]["padding_fraction"] < 1
    if case == "packed_prompt_completion":  # TRL keeps the overlong row in packing (cut to max_length)
        assert trainer.dropped_rows == {}
    elif case == "grad_accumulation":  # and drops it when not packing: both drop the same row
        assert trainer.dropped_rows == {"train": {"no_labels_after_truncation": [3]}}


@pytest.mark.parametrize("case", list(CASES))
def test_trl_script_with_the_import_changed(case, load, tokenizer, tmp_path):
    # fastdpo.trl.SFTTrainer: TRL prepares the data, fastdpo packs and computes the loss
    trl = pytest.importorskip("trl")
    dropin = pytest.importorskip("fastdpo.trl")
    data, options = CASES[case]
    data = tokenized_rows(tokenizer, 12) if data is None else data
    trainer, ours = train(dropin.SFTTrainer, trl.SFTConfig, load, data, tokenizer, tmp_path, "dropin", **options)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert isinstance(trainer.data_collator, SequencePacker) and isinstance(trainer, trl.SFTTrainer)
    assert_first_steps_match(ours, theirs, eval_data="eval_data" in options)


def test_dataset_text_field_is_read_where_trl_reads_it(load, tokenizer, tmp_path):
    # TRL reads prompt/completion first, then messages, then dataset_text_field: a field the rows lack, or a 'text'
    # column beside the field, failed here and trains there
    trl = pytest.importorskip("trl")
    rows = prompt_completion_rows(12, seed=5)
    texts = rows.map(lambda r: {"formatted": r["prompt"] + r["completion"], "text": "ignored"})
    cases = [(message_rows(8), "content"), (rows, "content"), (texts.remove_columns(["prompt", "completion"]),
             "formatted")]  # fmt: skip
    for index, (data, field) in enumerate(cases):
        options = {"packing": False, "dataset_text_field": field}
        _, ours = train(SFTTrainer, SFTConfig, load, data, tokenizer, tmp_path, f"ours{index}", **options)
        _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data, tokenizer, tmp_path, f"trl{index}", **options)
        assert_first_steps_match(ours, theirs, eval_data=False)
    # a formatting function whose text TRL would not read (the rows have prompt/completion): said, not ignored
    args = SFTConfig(**common_args(tmp_path, "formatted", completion_only_loss=False))
    with pytest.raises(ConfigError, match=r"option 'formatting_func': its text would not be read: the rows have "
                                          r"\['completion', 'prompt'\].*remove formatting_func"):  # fmt: skip
        SFTTrainer(load(), args=args, train_dataset=rows, processing_class=tokenizer,
                   formatting_func=lambda r: r["prompt"] + r["completion"])  # fmt: skip


def test_dropin_on_a_model_without_loss_kwargs_divides_by_accumulation_once(load, tokenizer, tmp_path):
    # accepts_loss_kwargs = False (Qwen2.5-VL, PaliGemma): transformers counts no items, each micro-batch's mean is
    # divided by GA; the drop-in counted them and was divided by GA on top (loss 1.57 for TRL's 6.30 at GA 4)
    trl = pytest.importorskip("trl")
    dropin = pytest.importorskip("fastdpo.trl")

    class NoLossKwargs(LlamaForCausalLM):
        accepts_loss_kwargs = False

    def load_without():
        model = load()
        model.__class__ = NoLossKwargs
        return model

    data, options = prompt_completion_rows(16, seed=2), {"packing": False, "gradient_accumulation_steps": 4}
    _, ours = train(dropin.SFTTrainer, trl.SFTConfig, load_without, data, tokenizer, tmp_path, "dropin", **options)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load_without, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs, eval_data=False)


def assert_first_steps_match(ours: list[dict], theirs: list[dict], *, eval_data: bool) -> None:
    if eval_data:
        ours_eval, theirs_eval = ours.pop(), theirs.pop()
        for name in EVAL_METRICS:
            assert ours_eval[name] == pytest.approx(theirs_eval[name], rel=1e-4), name
        assert ours_eval["eval_num_tokens"] == theirs_eval["eval_num_tokens"]
    assert len(ours) == len(theirs) == 2
    # step 1: the same tokens through the same weights; step 2: after one identical optimizer update (lr 1e-2)
    for step in (0, 1):
        for name in ("loss", "grad_norm", "mean_token_accuracy", "entropy"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)
        assert ours[step]["num_tokens"] == theirs[step]["num_tokens"], step
    assert ours[1]["loss"] != pytest.approx(ours[0]["loss"], rel=1e-3)  # the update moved the model
    assert max(ours[0]["mean_token_accuracy"], ours[1]["mean_token_accuracy"]) > 0  # a comparison that can fail


def test_moe_aux_loss_matches_trl(tokenizer, tmp_path):
    # a tiny Mixtral: TRL adds router_aux_loss_coef times the load-balancing loss, over the accumulation steps
    trl = pytest.importorskip("trl")
    load = save_tiny_mixtral(tokenizer, tmp_path / "moe")

    data, options = prompt_completion_rows(16, seed=2), {"gradient_accumulation_steps": 2}
    _, ours = train(SFTTrainer, SFTConfig, load, data, tokenizer, tmp_path, "ours", **options)
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data, tokenizer, tmp_path, "trl", **options)
    for step in (0, 1):
        assert ours[step]["aux_loss"] > 0
        for name in ("aux_loss", "loss", "grad_norm", "entropy"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)


# --------------------------------------------------------------------------------------- the loss against a naive one


def padded(examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) of examples padded at the right (labels -100 there)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return ids, labels, mask


def naive_loss(model, examples, loss_type):
    """Token mean of -log p over labels != -100 after the causal shift, padded batch, full logits."""
    ids, labels, mask = padded(examples)
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    valid = target != -100
    token_logp = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * valid
    weight = token_logp.detach().exp() if loss_type == "dft" else 1.0
    return -(token_logp * weight).sum() / valid.sum()


def random_examples(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(2, 14, (1,), generator=gen))
        ids = torch.randint(3, 101, (n,), generator=gen)
        labels = torch.where(torch.rand(n, generator=gen) < 0.3, -100, ids)
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_loss_and_gradients_equal_a_naive_padded_step(loss_type):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).double()
    examples = random_examples(6, seed=0)
    expected = naive_loss(model, examples, loss_type)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))

    batch = pack_sft(examples, pack_length=16, backend="python")
    assert batch.input_ids.shape[0] >= 2 and batch.num_padding > 0  # several rows, with row-end padding
    out = sft_step(model, batch, loss_type=loss_type, head_impl="torch")
    got_grads = torch.autograd.grad(out.loss, list(model.parameters()))
    # fp64 both ways: packed-vs-padded attention and chunked-vs-full head differ by rounding only
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    for (name, _), g, e in zip(model.named_parameters(), got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10, msg=name)
    # a divisor for the whole step scales the loss; packed rows (seq_lengths) give the same loss as single sequences
    assert float(sft_step(model, batch, num_items=1000).loss.detach()) == pytest.approx(
        float(naive_loss(model, examples, "nll").detach()) * int(out.num_targets) / 1000, rel=1e-9
    )
    rows = [{"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
             "seq_lengths": [len(a["input_ids"]), len(b["input_ids"])]}
            for a, b in zip(examples[::2], examples[1::2], strict=True)]  # fmt: skip
    packed_rows = sft_step(model, pack_sft(rows), loss_type=loss_type)
    torch.testing.assert_close(packed_rows.loss, out.loss, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ SFT then DPO


def test_saved_sft_model_trains_with_dpo(load, tokenizer, tmp_path):
    trainer, logs = train(SFTTrainer, SFTConfig, load, prompt_completion_rows(8), tokenizer, tmp_path, "sft")
    assert len(logs) == 2
    trainer.save_model(str(tmp_path / "sft_out"))
    policy = LlamaForCausalLM.from_pretrained(tmp_path / "sft_out", dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "sft_out", dtype=torch.float32)
    for (name, saved), trained in zip(policy.named_parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(saved, trained.detach(), rtol=0, atol=0, msg=name)
    pairs = datasets.Dataset.from_list(
        [
            {"prompt": "what color is the sky", "chosen": " blue", "rejected": " dog"},
            {"prompt": "mix flour and", "chosen": " water", "rejected": " the fox"},
        ]
    )
    args = DPOConfig(**{**common_args(tmp_path, "dpo"), "max_steps": 1, "max_length": 32})
    dpo = DPOTrainer(policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
    dpo.train()
    first = next(log for log in dpo.state.log_history if "loss" in log)
    # policy == reference at the first step: every log-ratio is 0, so the loss is log 2
    assert first["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------ config


def test_every_trl_sft_option_exists_with_the_same_default(tmp_path):
    trl = pytest.importorskip("trl")

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours, theirs = defaults(SFTConfig), defaults(trl.SFTConfig)
    sft_fields = [name for name in theirs if name not in base]
    assert len(sft_fields) >= 20  # the test reads TRL's own list, not ours
    for name in [*sft_fields, "learning_rate", "logging_steps", "gradient_checkpointing", "bf16"]:
        assert name in ours, name
        assert ours[name] == theirs[name], name
    config = SFTConfig(output_dir=str(tmp_path), report_to=[])
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # never an error on a CPU
    assert config.pad_to_multiple_of is None and config.packing is False


def test_trls_config_keeps_its_token_settings_in_fastdpos_trainer_and_in_config_yaml(load, tokenizer, tmp_path):
    # TrainingArguments.to_dict hides every field whose name ends in _token: eos_token became '<EOS_TOKEN>'
    trl = pytest.importorskip("trl")
    from fastdpo.cli import RunArguments, _resolved_config

    options = common_args(tmp_path, "trl_config", eos_token="<|pad|>", hub_token="secret")
    trainer = SFTTrainer(load(), args=trl.SFTConfig(**options), train_dataset=prompt_completion_rows(4),
                         processing_class=tokenizer)  # fmt: skip
    assert (trainer.args.eos_token, trainer.args.hub_token) == ("<|pad|>", "secret")
    assert trainer.processing_class.eos_token == "<|pad|>"
    recorded = _resolved_config(RunArguments(), SFTConfig(**options))
    assert recorded["eos_token"] == "<|pad|>" and recorded["pad_token"] is None
    # a secret stays out of config.yaml (it was recorded as '<HUB_TOKEN>', which a rerun of the file took as the token)
    assert "hub_token" not in recorded and "secret" not in str(recorded)


@pytest.mark.parametrize(
    ("options", "column"),
    [({"label_smoothing_factor": 1.5}, "label_smoothing_factor"),
     ({"label_smoothing_factor": 0.1, "loss_type": "dft"}, "label_smoothing_factor"),
     ({"loss_type": "nlll"}, "loss_type"), ({"packing_strategy": "bdf"},
      "packing_strategy"), ({"truncation_mode": "keep_middle"}, "truncation_mode"), ({"head_impl": "fast"},
      "head_impl"), ({"max_length": None, "packing": True}, "max_length"), ({"pack_length": 0}, "pack_length"),
     ({"dataset_kwargs": {"skip_prepare": True}}, "dataset_kwargs"), ({"chat_template_path": "org/model"},
      "chat_template_path"), ({"pad_to_multiple_of": "eight"}, "pad_to_multiple_of")],
)  # fmt: skip
def test_bad_or_unsupported_options_name_the_option(options, column, tmp_path):
    with pytest.raises(ConfigError, match=rf"option '{column}'"):
        SFTConfig(output_dir=str(tmp_path), report_to=[], **options)


def test_aliases_and_no_op_options_warn(tmp_path):
    with pytest.warns(FutureWarning, match="chunked_nll"):
        assert SFTConfig(output_dir=str(tmp_path), report_to=[], loss_type="chunked_nll").loss_type == "nll"
    with pytest.warns(UserWarning, match="never pads"):
        SFTConfig(output_dir=str(tmp_path), report_to=[], padding_free=True)
    assert SFTConfig(output_dir=str(tmp_path), report_to=[], pad_to_multiple_of="64").pad_to_multiple_of == 64


def test_unsupported_trainer_arguments_are_refused(load, tokenizer, tmp_path):
    args = SFTConfig(**common_args(tmp_path, "x"))
    data = prompt_completion_rows(4)
    cases = [({"peft_config": {"r": 8}}, "peft_config"), ({"compute_metrics": len}, "compute_metrics"),
             ({"compute_loss_func": len}, "compute_loss_func"), ({"train_dataset": None}, "train_dataset"),
             ({"processing_class": None}, "processing_class"), ({"model": str(tmp_path / "no-such-model")}, "model"),
             ({"train_dataset": data.to_list()}, "train_dataset")]  # fmt: skip
    for change, column in cases:
        kwargs = {"model": load(), "args": args, "train_dataset": data, "processing_class": tokenizer, **change}
        with pytest.raises(ConfigError, match=rf"option '{column}'"):
            SFTTrainer(**kwargs)
    bad = SFTConfig(**common_args(tmp_path, "y", eos_token="<|nope|>"))
    with pytest.raises(ConfigError, match="option 'eos_token'"):
        SFTTrainer(load(), args=bad, train_dataset=data, processing_class=tokenizer)


def test_packing_that_cuts_every_completion_away_is_refused_and_a_partial_loss_is_counted(load, tokenizer, tmp_path,
                                                                                          caplog):  # fmt: skip
    # packing cuts each sequence to max_length (as TRL): a prompt longer than that leaves no completion token
    long = [{"prompt": "word " * 40, "completion": " end"}] * 4
    args = SFTConfig(**common_args(tmp_path, "cut", packing=True, max_length=8))
    with pytest.raises(DataError, match="option 'max_length': no completion token is left in the packed train rows"):
        SFTTrainer(load(), args=args, train_dataset=datasets.Dataset.from_list(long), processing_class=tokenizer)
    short = [{"prompt": "a", "completion": " b"}] * 2
    with caplog.at_level("WARNING", logger="fastdpo"):
        trainer = SFTTrainer(load(), args=args, train_dataset=datasets.Dataset.from_list(long[:2] + short),
                             processing_class=tokenizer)  # fmt: skip
    empty = sum(set(labels) == {-100} for labels in trainer.train_dataset["labels"])
    assert empty == 2 and f"2 of {len(trainer.train_dataset)} packed train rows hold no completion token" in caplog.text


def test_dataset_preparation_options(load, tokenizer, tmp_path):
    args = SFTConfig(**common_args(tmp_path, "x", dataset_kwargs={"skip_prepare_dataset": True}))
    rows = datasets.Dataset.from_list([{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}])
    trainer = SFTTrainer(load(), args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.train_dataset.to_list() == rows.to_list()  # as given: no truncation, no packing
    with pytest.raises(DataError, match="column 'labels'"):
        SFTTrainer(load(), args=args, train_dataset=rows.remove_columns("labels").add_column("completion_mask",
                   [[0, 0, 1, 1]]), processing_class=tokenizer)  # fmt: skip
    # formatting_func makes the text; eval datasets pack with eval_packing and stay packed when evaluated again
    with pytest.warns(UserWarning, match="eval_packing=True with packing=False: fastdpo scores each sequence"):
        args = SFTConfig(**common_args(tmp_path, "y", eval_packing=True))  # (TRL collates such rows padded)
    trl, dropin = pytest.importorskip("trl"), pytest.importorskip("fastdpo.trl")
    with pytest.warns(UserWarning, match="eval_packing=True with packing=False"):  # TRL's config too (silent before)
        dropin.SFTTrainer(load(), args=trl.SFTConfig(**common_args(tmp_path, "z", eval_packing=True)),
                          train_dataset=prompt_completion_rows(4), processing_class=tokenizer)  # fmt: skip
    data = prompt_completion_rows(6)
    with pytest.raises(ConfigError, match="option 'formatting_func'"):  # TRL refuses it with completion_only_loss
        SFTTrainer(load(), args=args, train_dataset=data, processing_class=tokenizer, formatting_func=str)
    data = data.rename_columns({"prompt": "question", "completion": "answer"})
    trainer = SFTTrainer(load(), args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer,
                         formatting_func=lambda row: row["question"] + row["answer"])  # fmt: skip
    first = trainer.train_dataset[0]["input_ids"]
    assert first == tokenizer(data[0]["question"] + data[0]["answer"] + tokenizer.eos_token)["input_ids"]
    assert set(trainer.train_dataset[0]["labels"]) != {-100} and "seq_lengths" in trainer.eval_dataset.column_names
    again = trainer.evaluate(trainer.eval_dataset)
    assert again["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)


def test_model_given_as_a_path_and_a_non_finite_step_skipped(tokenizer, tmp_path):
    path = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = SFTConfig(**common_args(tmp_path, "path", max_steps=3))
    trainer = SFTTrainer(str(path), args=args, train_dataset=prompt_completion_rows(8))
    assert trainer.model.dtype == torch.float32 and trainer.processing_class.eos_token == tokenizer.eos_token

    def poison(module, inputs, output):  # the 2nd forward (step 2) returns NaN hidden states
        poison.calls += 1
        return output * float("nan") if poison.calls == 2 else output

    poison.calls = 0
    trainer.model.model.norm.register_forward_hook(poison)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log.get("nonfinite_steps", 0) for log in logs] == [0, 1, 1]
    assert all(log["tokens_per_second"] > 0 for log in logs)
    # the skipped step logs its loss as NaN (transformers' filter: 0.0) and none of its NaN metrics
    assert math.isnan(logs[1]["loss"]) and "entropy" not in logs[1] and math.isfinite(logs[2]["entropy"])
    assert not torch.equal(before, trainer.model.lm_head.weight)  # steps 1 and 3 trained
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_bf16_mixed_precision_trains(load, tokenizer, tmp_path):
    # accelerate's autocast forward wrapper is set aside for the packed step, which runs under accelerator.autocast()
    _, logs = train(SFTTrainer, SFTConfig, load, prompt_completion_rows(8), tokenizer, tmp_path, "bf16", bf16=True,
                    use_cpu=True)  # fmt: skip
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)


def test_tokenizer_is_a_deprecated_alias_of_processing_class(load, tokenizer, tmp_path):
    args = SFTConfig(**common_args(tmp_path, "alias"))
    with pytest.warns(FutureWarning, match="processing_class"):
        trainer = SFTTrainer(load(), args=args, train_dataset=prompt_completion_rows(4), tokenizer=tokenizer)
    assert trainer.processing_class is tokenizer


def test_varlen_and_the_models_attention_train_alike_under_gradient_checkpointing(load, tokenizer, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    # packed_attention="varlen" (fastdpo_varlen) against the model's own sdpa over packed rows: the same steps, and
    # the switch holds through the backward, where checkpointing recomputes every layer
    from transformers import AttentionInterface

    from fastdpo.model import VARLEN, varlen_attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return varlen_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, counted)
    data = prompt_completion_rows(16, seed=3)
    runs = {}
    for attention, expected in (("varlen", VARLEN), ("model", None)):
        trainer, logs = train(SFTTrainer, SFTConfig, load, data, tokenizer, tmp_path, attention, packing=False,
                              gradient_checkpointing=True, packed_attention=attention)  # fmt: skip
        assert trainer.packed_attention_impl == expected
        assert trainer.model.config._attn_implementation == "sdpa"  # switched back after the steps
        runs[attention] = logs
    # 2 steps × 2 layers × (forward, recomputation in the backward); none from the sdpa run
    assert len(calls) == 8 and calls.count(False) == 0
    for step in (0, 1):  # fp32: the two attentions sum in different orders (~1e-6 relative)
        for name in ("loss", "grad_norm", "entropy", "num_tokens"):
            assert runs["varlen"][step][name] == pytest.approx(runs["model"][step][name], rel=1e-4), (step, name)


def test_rows_are_as_long_as_the_longest_example_on_sdpa_and_one_row_on_varlen(load, tokenizer, tmp_path):
    # sdpa attends over whole rows (work ∝ row length²): a step's examples go into rows as long as its longest one,
    # several to a row; per-sequence attention (varlen) takes the step as one row
    data = prompt_completion_rows(16, seed=3)
    for attention in ("model", "varlen"):
        args = SFTConfig(**common_args(tmp_path, attention, packing=False, packed_attention=attention))
        trainer = SFTTrainer(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
        examples = [trainer.train_dataset[i] for i in range(8)]
        lengths = [len(example["input_ids"]) for example in examples]
        batch = trainer.data_collator(examples)
        rows, width = batch["input_ids"].shape
        if attention == "model":
            assert trainer.data_collator.pack_length is None
            assert width == max(lengths) and rows < len(examples), (lengths, rows, width)
        else:
            assert rows == 1 and width == sum(lengths)


def test_lean_activations_train_as_the_models_own_forwards(load, tokenizer, tmp_path, monkeypatch):
    from fastdpo.model import lean as lean_module

    calls, real = [], lean_module._lean_mlp

    def counted(module, x):
        calls.append(torch.is_grad_enabled())
        return real(module, x)

    monkeypatch.setattr(lean_module, "_lean_mlp", counted)
    data = prompt_completion_rows(16, seed=3)
    runs = {}
    for lean in (True, False):
        trainer, logs = train(SFTTrainer, SFTConfig, load, data, tokenizer, tmp_path, f"lean{lean}", packing=False,
                              gradient_checkpointing=True, lean_activations=lean)  # fmt: skip
        assert all("forward" not in vars(m) for m in trainer.model.modules())
        # 2 steps × 2 layers × (forward, recomputation in the backward), and none when off
        assert len(calls) == 8 and all(calls), (lean, calls)
        runs[lean] = logs
    for step in (0, 1):  # fp32: the first norm's gradient summed in another order (~1e-7 relative)
        for name in ("loss", "grad_norm", "entropy"):
            assert runs[True][step][name] == pytest.approx(runs[False][step][name], rel=1e-5), (step, name)


def neftune_draws(monkeypatch) -> list[float]:
    """Filled with the scale (α/√(L·d)) of each NEFTune draw in training mode, as transformers' hook draws it."""
    import transformers.integrations.neftune as neftune

    drawn, hook = [], neftune.neftune_post_forward_hook

    def spy(module, inputs, output):
        if module.training:
            drawn.append(module.neftune_noise_alpha / (output.shape[1] * output.shape[2]) ** 0.5)
        return hook(module, inputs, output)

    monkeypatch.setattr(neftune, "neftune_post_forward_hook", spy)
    return drawn


def test_neftune_noise_on_packed_rows_is_drawn_at_trls_scale(load, tokenizer, tmp_path, monkeypatch):
    # transformers' hook draws the noise in ±α/√(L·d), L the row length: TRL's padding-free batch is one row of the
    # batch's tokens, fastdpo's packed rows are shorter, so the noise was √(rows) times TRL's (1.41x at 2 rows)
    trl = pytest.importorskip("trl")
    dropin = pytest.importorskip("fastdpo.trl")
    drawn = neftune_draws(monkeypatch)
    trainers = (("trl", trl.SFTTrainer, trl.SFTConfig), ("dropin", dropin.SFTTrainer, trl.SFTConfig),
                ("ours", SFTTrainer, SFTConfig))  # fmt: skip
    # and TRL's rows padded to pad_to_multiple_of (TRL's scale is then smaller: +8% and +13% before)
    for extra in ({"packing": True}, {"packing": True, "pad_to_multiple_of": 8},
                  {"packing": False, "pad_to_multiple_of": 8}):  # fmt: skip
        scales = {}
        for name, trainer_cls, config_cls in trainers:
            drawn.clear()
            train(trainer_cls, config_cls, load, prompt_completion_rows(24), tokenizer, tmp_path, name,
                  neftune_noise_alpha=5.0, **extra)  # fmt: skip
            scales[name] = list(drawn)
        assert len(scales["trl"]) == 2
        assert scales["ours"] == pytest.approx(scales["trl"], rel=1e-6), extra
        assert scales["dropin"] == pytest.approx(scales["trl"], rel=1e-6), extra


def test_a_text_column_beside_prompt_completion_is_said_to_take_trls_eos(load, tokenizer, tmp_path, caplog):
    # TRL 1.16 appends the EOS to the text column (dataset_text_field) where it lacks one, which it does not train on,
    # and then none to the completion; fastdpo ends each completion with it, and says where it differs
    import logging

    rows = datasets.Dataset.from_list([{**row, "text": row["prompt"] + row["completion"]}
                                       for row in prompt_completion_rows(4)])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        trainer = SFTTrainer(load(), args=SFTConfig(**common_args(tmp_path, "eos", packing=False)), train_dataset=rows,
                             processing_class=tokenizer)  # fmt: skip
    assert all(row["input_ids"][-1] == tokenizer.eos_token_id for row in trainer.train_dataset)
    with caplog.at_level(logging.WARNING, logger="fastdpo"):  # a stream says it too (it was silent)
        SFTTrainer(load(), args=SFTConfig(**common_args(tmp_path, "eos_stream", packing=False)),
                   train_dataset=rows.to_iterable_dataset(), processing_class=tokenizer)  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "prompt/completion and a 'text' column" in r.getMessage()]
    assert len(said) == 2 and "appends it to 'text' instead where that text lacks one" in said[0]
