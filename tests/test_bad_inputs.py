"""The catalog of bad inputs: each a distinct root cause a user can hit, and what fastdpo says about it.

Every case asserts one of two outcomes:

- an error of ours (``DataError`` for data, ``ConfigError`` for settings) whose ``row`` (where there is one) and
  ``column`` (the column, or the option) are the right ones, whose ``fix`` says what to do, and whose message is
  one line; raised from our code, not a traceback from inside ``datasets`` or ``transformers``;
- or, where fastdpo can safely go on, a warning or a report entry that counts the rows and names them.

A few go through the ``fastdpo`` command too, where the error must be one ``fastdpo: error:`` line and exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo import cli
from fastdpo.data import check_preferences, pack, pack_pairs, prepare_preferences, tokenize_preferences
from fastdpo.errors import ConfigError, DataError
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

datasets.disable_progress_bars()
GOOD = {"prompt": "the cat sat", "chosen": " on the mat.", "rejected": " on the dog."}
MESSAGES = {
    "prompt": [{"role": "user", "content": "the cat sat"}],
    "chosen": [{"role": "assistant", "content": "on the mat."}],
    "rejected": [{"role": "assistant", "content": "on the dog."}],
}


def expect(error_cls, call, *, column, fix, row=None, message=""):
    """``call()`` raises ``error_cls`` at ``row`` and ``column``, its fix contains ``fix``, its text ``message``."""
    with pytest.raises(error_cls) as info:
        call()
    error = info.value
    assert type(error) is error_cls
    assert (error.row, error.column) == (row, column), str(error)
    assert error.fix and fix in error.fix, str(error)
    assert message in str(error) and "\n" not in str(error), str(error)
    # raised by fastdpo (the frame that raised it is in the package), not passed up from a library
    raised_in = info.traceback[-1].path
    assert "site-packages" not in str(raised_in) and "fastdpo" in str(raised_in), raised_in
    return error


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def save_llama(folder: Path, tokenizer, *, vocab_size: int | None = None) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("policy"), tokenizer)


def model(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def config(tmp_path, **extra) -> DPOConfig:
    values = {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2, "max_steps": 1, "report_to": [],
              "bf16": False, "max_length": 64, "save_strategy": "no"}  # fmt: skip
    return DPOConfig(**{**values, **extra})


def trainer(model_dir, tokenizer, tmp_path, rows, *, eval_rows=None, ref_model=None, **extra):
    data = datasets.Dataset.from_list(rows)
    evaluation = None if eval_rows is None else datasets.Dataset.from_list(eval_rows)
    return DPOTrainer(model(model_dir), ref_model=ref_model, args=config(tmp_path, **extra), train_dataset=data,
                      eval_dataset=evaluation, processing_class=tokenizer)  # fmt: skip


# --------------------------------------------------------------------------------------------------- data files


def test_file_not_found(tmp_path):
    expect(DataError, lambda: prepare_preferences(tmp_path / "pairs.jsonl"), column=None, fix="check the path",
           message="no such file")  # fmt: skip


def test_unknown_file_type(tmp_path):
    (tmp_path / "pairs.txt").write_text("prompt chosen rejected\n")
    expect(DataError, lambda: prepare_preferences(tmp_path / "pairs.txt"), column=None, fix=".jsonl",
           message="unknown file type '.txt'")  # fmt: skip


def test_empty_file(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    expect(DataError, lambda: prepare_preferences(tmp_path / "pairs.jsonl"), column=None, fix="at least one row",
           message="the file is empty")  # fmt: skip


def test_file_of_blank_lines(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("\n  \n\n")
    expect(DataError, lambda: prepare_preferences(tmp_path / "pairs.jsonl"), column=None, fix="at least one row",
           message="only blank lines")  # fmt: skip


def test_json_file_with_an_empty_list(tmp_path):
    (tmp_path / "pairs.json").write_text("[]")
    expect(DataError, lambda: prepare_preferences(tmp_path / "pairs.json"), column=None, fix="at least one row",
           message="empty list")  # fmt: skip


def test_jsonl_broken_on_line_3(tmp_path):
    path = jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, '{"prompt": "a", "chosen": "b", "rejected": "c"', GOOD])
    expect(DataError, lambda: prepare_preferences(path), column=None, fix="fix or remove that line",
           message="line 3: invalid JSON")  # fmt: skip


def test_jsonl_not_utf8_on_line_2(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    expect(DataError, lambda: prepare_preferences(path), column=None, fix="UTF-8", message="line 2: not valid UTF-8")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = jsonl(tmp_path / "pairs.jsonl", [GOOD, ["the cat", " sat", " ran"]])
    expect(DataError, lambda: prepare_preferences(path), column=None, fix='{"prompt"',
           message="line 2: expected a JSON object")  # fmt: skip


def test_split_that_does_not_exist():
    data = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([GOOD])})
    expect(DataError, lambda: prepare_preferences(data, split="train"), column=None, fix="'train_prefs'",
           message="no split 'train'")  # fmt: skip


def test_empty_dataset():
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    expect(DataError, lambda: prepare_preferences(empty), column=None, fix="check the file or the split",
           message="no rows")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ columns


def test_missing_column():
    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b"}])
    expect(DataError, lambda: prepare_preferences(data), column="rejected", fix="columns={'rejected'",
           message="column not found")  # fmt: skip


def test_misspelled_column_suggests_the_close_match():
    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejeted": " c"}])
    expect(DataError, lambda: prepare_preferences(data), column="rejected", fix="did you mean 'rejeted'?")


def test_mapping_to_a_misspelled_column():
    data = datasets.Dataset.from_list([{"question": "a", "chosen": " b", "rejected": " c"}])
    expect(DataError, lambda: prepare_preferences(data, columns={"prompt": "questoin"}), column="questoin",
           fix="did you mean 'question'?")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("bad", "got"),
    [(None, "None"), (3, "int"), (2.5, "float"), (b"on the mat", "bytes"), ({"text": "a"}, "dict")],
    ids=["none", "int", "float", "bytes", "dict"],
)
def test_chosen_that_is_not_text(bad, got):
    rows = [GOOD, GOOD, {**GOOD, "chosen": bad}]
    # each its own column type as Arrow stores it: the bad value in a column of its own kind
    data = datasets.Dataset.from_list(rows) if bad is None else datasets.Dataset.from_dict(
        {"prompt": [r["prompt"] for r in rows], "chosen": [bad] * 3, "rejected": [r["rejected"] for r in rows]}
    )  # fmt: skip
    row = 2 if bad is None else 0
    expect(DataError, lambda: prepare_preferences(data), row=row, column="chosen", fix="fix", message=got)


def test_nan_from_a_dataframe():
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"prompt": ["a", "b"], "chosen": [" x", math.nan], "rejected": [" y", " z"]})
    data = datasets.Dataset.from_pandas(frame)  # pandas' missing value arrives as None
    expect(DataError, lambda: prepare_preferences(data), row=1, column="chosen", fix="drop the row", message="None")


@pytest.mark.parametrize("blank", ["", " \n\t "], ids=["empty", "whitespace"])
def test_empty_or_whitespace_completion(blank):
    data = datasets.Dataset.from_list([GOOD, GOOD, GOOD, {**GOOD, "rejected": blank}])
    expect(DataError, lambda: prepare_preferences(data), row=3, column="rejected", fix="drop the row",
           message="is empty")  # fmt: skip


def test_string_and_conversational_rows_mixed(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [GOOD, GOOD, MESSAGES])
    expect(DataError, lambda: prepare_preferences(path), row=2, column="chosen", fix="pass format=",
           message="got conversational")  # fmt: skip


@pytest.mark.parametrize(("message", "problem"), [({"content": "hi"}, "no role"), ({"role": "user"}, "no content")],
                         ids=["no_role", "no_content"])  # fmt: skip
def test_message_without_role_or_content(message, problem, model_dir, tokenizer, tmp_path):
    rows = [MESSAGES, {**MESSAGES, "prompt": [message]}]
    expect(DataError, lambda: trainer(model_dir, tokenizer, tmp_path, rows), row=1, column="prompt",
           fix="check_preferences", message=problem)  # fmt: skip


def test_roles_out_of_order_are_counted(model_dir, tokenizer, tmp_path, caplog):
    swapped = {**MESSAGES, "chosen": [{"role": "user", "content": "on the mat."}]}
    rows = [MESSAGES, swapped, MESSAGES, swapped]
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.tokenize"):
        trainer(model_dir, tokenizer, tmp_path, rows)
    assert "2 of 4 rows have their roles out of order" in caplog.text and "rows 1, 3" in caplog.text
    assert check_preferences(datasets.Dataset.from_list(rows)).rows["roles_out_of_order"] == [1, 3]


def test_control_characters_are_counted():
    data = datasets.Dataset.from_list([GOOD, {**GOOD, "chosen": " on the\x00 mat."}])
    report = check_preferences(data)
    assert report.rows == {"invalid_text": [1]} and report.severity["invalid_text"] == "drop"
    kept, dropped = report.filter(data)
    assert len(kept) == 1 and dropped == {"invalid_text": 1}


def test_identical_and_duplicate_pairs_are_counted():
    rows = [GOOD, {**GOOD, "rejected": GOOD["chosen"]}, GOOD]
    report = check_preferences(datasets.Dataset.from_list(rows))
    assert report.rows == {"identical": [1], "duplicate": [2]}


def test_score_that_is_not_a_number_is_counted(tmp_path):
    path = jsonl(tmp_path / "scored.jsonl", [{**GOOD, "score_chosen": 8.0, "score_rejected": 3.0},
                                             '{"prompt": "a", "chosen": " b", "rejected": " c", '
                                             '"score_chosen": NaN, "score_rejected": 2.0}'])  # fmt: skip
    report = check_preferences(prepare_preferences(path))
    assert report.rows == {"bad_score": [1]} and report.severity["bad_score"] == "warn"
    assert report.details[1] == ["column 'chosen_score': bad_score (nan)"]


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_conversations_with_a_tokenizer_without_chat_template():
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    data = prepare_preferences(datasets.Dataset.from_list([MESSAGES]))
    expect(DataError, lambda: tokenize_preferences(data, plain), column="chosen", fix="chat template")


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_chat_template_that_refuses_a_row():
    strict = build_tiny_tokenizer()
    strict.chat_template = STRICT_TEMPLATE  # as Mistral's and Llama-2's templates do
    twice = {**MESSAGES, "prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    data = prepare_preferences(datasets.Dataset.from_list([MESSAGES, MESSAGES, twice]))
    expect(DataError, lambda: tokenize_preferences(data, strict), row=2, column="prompt", fix="chat_template_error",
           message="the chat template failed on the prompt: Conversation roles must alternate")  # fmt: skip
    assert check_preferences(data, strict).rows["chat_template_error"] == [2]  # the filter drops it


def test_chat_template_kwargs_that_set_what_tokenization_sets():
    rows = [{**MESSAGES, "chat_template_kwargs": {"enable_thinking": False}},
            {**MESSAGES, "chat_template_kwargs": {"return_dict": False}}]  # fmt: skip
    expect(DataError, lambda: prepare_preferences(datasets.Dataset.from_list(rows)), row=1,
           column="chat_template_kwargs", fix="remove it", message="sets return_dict")  # fmt: skip


def test_tokenizer_without_pad_or_eos(model_dir, tmp_path):
    bare = build_tiny_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    expect(ConfigError, lambda: trainer(model_dir, bare, tmp_path, [GOOD]), column="processing_class",
           fix="tokenizer.pad_token")  # fmt: skip


def test_tokenizer_without_eos_for_string_data():
    no_eos = build_tiny_tokenizer()
    no_eos.eos_token = None
    data = prepare_preferences(datasets.Dataset.from_list([GOOD]))
    expect(DataError, lambda: tokenize_preferences(data, no_eos), column=None, fix="tokenizer.eos_token",
           message="no EOS token")  # fmt: skip


def test_prompt_that_fills_max_length_is_dropped_and_counted(model_dir, tokenizer, tmp_path, caplog):
    long = {**GOOD, "prompt": "the cat sat " * 40}
    with caplog.at_level(logging.WARNING, logger="fastdpo.train.common"):
        run = trainer(model_dir, tokenizer, tmp_path, [GOOD, long, GOOD], max_length=32)
    assert run.dropped_rows["train"] == {"prompt_fills_max_length": [1]}
    assert "train data: 1 of 3 rows dropped: 1 prompt_fills_max_length (rows 1)" in caplog.text


@pytest.mark.parametrize("split", ["train", "eval"])
def test_no_valid_row_left(split, model_dir, tokenizer, tmp_path):
    long = [{**GOOD, "prompt": "the cat sat " * 40}] * 2
    rows, eval_rows = (long, None) if split == "train" else ([GOOD, GOOD], long)
    expect(DataError, lambda: trainer(model_dir, tokenizer, tmp_path, rows, eval_rows=eval_rows, max_length=32),
           column=f"{split}_dataset", fix="raise max_length (now 32)", message="all 2 were dropped")  # fmt: skip


def test_sft_rows_with_nothing_left_to_learn(model_dir, tokenizer, tmp_path, caplog):
    from fastdpo.train import SFTConfig, SFTTrainer

    long = {"prompt": "the cat sat " * 40, "completion": " a"}  # keep_start cuts its completion away
    rows = [{"prompt": "the cat sat", "completion": " on the mat."}, long]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_length=32, packing=False, report_to=[], bf16=False)
    with caplog.at_level(logging.WARNING, logger="fastdpo.train.common"):
        run = SFTTrainer(model(model_dir), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)  # fmt: skip
    assert run.dropped_rows["train"] == {"no_labels_after_truncation": [1]}
    assert "train data: 1 of 2 rows dropped: 1 no_labels_after_truncation (rows 1)" in caplog.text
    build = lambda: SFTTrainer(model(model_dir), args=args, train_dataset=datasets.Dataset.from_list(rows[1:]),  # noqa: E731
                               processing_class=tokenizer)  # fmt: skip
    expect(DataError, build, column="train_dataset", fix="raise max_length (now 32)", message="all 1 were dropped")


# ------------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_not_positive(beta, tmp_path):
    expect(ConfigError, lambda: config(tmp_path, beta=beta), column="beta", fix="0.01 to 0.5")


def test_unknown_loss_type_suggests_the_close_match(tmp_path):
    expect(ConfigError, lambda: config(tmp_path, loss_type=["sigmod"]), column="loss_type", fix="'sigmoid'")


@pytest.mark.parametrize(("loss", "epsilon", "bound"), [("exo_pair", 1.5, "[0, 1)"), ("robust", 0.5, "[0, 0.5)")])
def test_epsilon_outside_its_range(loss, epsilon, bound, tmp_path):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, loss_type=[loss], label_smoothing=epsilon)
    assert info.value.column == "label_smoothing" and bound in str(info.value)


def test_loss_weights_that_do_not_match_the_loss_types(tmp_path):
    expect(ConfigError, lambda: config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
           column="loss_weights", fix="one weight per entry")  # fmt: skip


def test_unknown_truncation_mode(tmp_path):
    expect(ConfigError, lambda: config(tmp_path, truncation_mode="keep_middle"), column="truncation_mode",
           fix="did you mean 'keep_end'?")  # fmt: skip


def test_max_length_not_positive(tmp_path):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, max_length=0)
    assert info.value.column == "max_length"


def test_item_longer_than_a_packed_row(tmp_path):
    expect(ConfigError, lambda: config(tmp_path, pack_length=16, max_length=64), column="pack_length",
           fix="at least max_length = 64")  # fmt: skip
    with pytest.raises(DataError) as info:  # the packer itself, given a sequence longer than a row
        pack([4, 40, 3], 32)
    assert info.value.row == 1 and "40" in str(info.value)
    with pytest.raises(DataError) as info:
        pair = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7]}
        pack_pairs([pair, pair, {**pair, "prompt_ids": list(range(40))}], pack_length=32)
    # a pair is its two sequences, each the prompt (40) and a completion (2): 84 tokens
    assert info.value.row == 2 and "the pair (chosen + rejected) is 84 tokens but pack_length is 32" in str(info.value)


def test_reference_with_another_vocabulary(model_dir, tokenizer, tmp_path):
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 64, num_hidden_layers=1, **sizes))
    expect(ConfigError, lambda: trainer(model_dir, tokenizer, tmp_path, [GOOD], ref_model=other), column="ref_model",
           fix="shares the policy's tokenizer", message=f"{len(tokenizer) + 64} entries")  # fmt: skip


def test_reference_saved_with_another_tokenizer(model_dir, tokenizer, tmp_path):
    # the same vocabulary size, other tokens: only the saved tokenizers tell them apart
    other_tokenizer = build_tiny_tokenizer(vocab_size=len(tokenizer) - 20)
    folder = save_llama(tmp_path / "ref", other_tokenizer, vocab_size=len(tokenizer))
    expect(ConfigError, lambda: trainer(model_dir, tokenizer, tmp_path, [GOOD], ref_model=str(folder)),
           column="ref_model", fix="trained with the policy's tokenizer",
           message="differs from the policy's")  # fmt: skip


def test_reference_given_to_a_reference_free_loss(model_dir, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="ref_model is not used: loss_type \\['simpo'\\] is reference-free"):
        run = trainer(model_dir, tokenizer, tmp_path, [GOOD], ref_model=model(model_dir), loss_type=["simpo"])
    assert run.ref_model is None


def test_model_folder_that_does_not_exist(tokenizer, tmp_path):
    # (transformers' own error read it as a malformed hub id: "Repo id must be in the form 'repo_name' or ...")
    build = lambda: DPOTrainer(str(tmp_path / "no-model"), args=config(tmp_path), processing_class=tokenizer)  # noqa: E731
    expect(ConfigError, build, column="model", fix="check the path", message=f"no folder {tmp_path / 'no-model'}")


def test_model_that_needs_remote_code(tokenizer, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny_custom", "auto_map": auto_map}))
    (folder / "configuration_tiny.py").write_text("raise SystemExit('the custom code ran')\n")
    build = lambda: DPOTrainer(str(folder), args=config(tmp_path), processing_class=tokenizer)  # noqa: E731
    expect(ConfigError, build, column="model", fix="trust_remote_code=True", message="custom code")


def test_model_code_that_needs_a_missing_package(model_dir, tokenizer, tmp_path):
    folder = tmp_path / "needs_package"
    shutil.copytree(model_dir, folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "auto_map": {"AutoModelForCausalLM": "modeling_x.M"}}))
    (folder / "modeling_x.py").write_text("import nonexistent_pkg_xyz\n")
    args = config(tmp_path, trust_remote_code=True)
    build = lambda: DPOTrainer(str(folder), args=args, processing_class=tokenizer)  # noqa: E731
    # the model's own ImportError, blamed on the model (not on an attention setting it does not have)
    expect(ConfigError, build, column="model", fix="install it", message="nonexistent_pkg_xyz")


def test_attention_that_cannot_load_or_train_here(model_dir, tokenizer, tmp_path):
    def build(implementation):
        args = config(tmp_path, model_init_kwargs={"attn_implementation": implementation})
        return DPOTrainer(str(model_dir), args=args, train_dataset=datasets.Dataset.from_list([GOOD]),
                          processing_class=tokenizer)  # fmt: skip

    # a misspelling is the setting's fault, not the model folder's
    expect(ConfigError, lambda: build("eagr"), column="model_init_kwargs", message="eagr",
           fix="'sdpa' or 'eager' (or an attention kernel that is installed: flash_attention_2, flex_attention), or "
           "leave it out")  # fmt: skip
    if importlib.util.find_spec("flash_attn") is None:  # transformers' ImportError, from inside from_pretrained
        expect(ConfigError, lambda: build("flash_attention_2"), column="model_init_kwargs", fix="install it")
    if not torch.cuda.is_available():  # torch has no flex-attention backward on a CPU: it failed in the first step
        expect(ConfigError, lambda: build("flex_attention"), column="model_init_kwargs", fix="train on a GPU")
        flex = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="flex_attention")
        expect(ConfigError, lambda: SFTTrainer(flex, args=SFTConfig(output_dir=str(tmp_path / "s"), report_to=[]),
                                               train_dataset=datasets.Dataset.from_list([{"text": "a b"}]),
                                               processing_class=tokenizer),
               column="model_init_kwargs", fix="'sdpa' or 'eager'")  # fmt: skip


def test_torch_dtype_is_read_as_dtype(model_dir, tokenizer, tmp_path):
    def build(kwargs):
        return DPOTrainer(str(model_dir), args=config(tmp_path, model_init_kwargs=kwargs),
                          train_dataset=datasets.Dataset.from_list([GOOD]), processing_class=tokenizer)  # fmt: skip

    # transformers' deprecated name: under the float32 that TRL passes as dtype it was silently lost
    with pytest.warns(FutureWarning, match="torch_dtype is the deprecated name of dtype"):
        assert build({"torch_dtype": "bfloat16"}).model.dtype == torch.bfloat16
    expect(ConfigError, lambda: build({"torch_dtype": "float17"}), column="model_init_kwargs", fix="torch.dtype")
    expect(ConfigError, lambda: build({"torch_dtype": "float16", "dtype": "float32"}), column="model_init_kwargs",
           fix="keep dtype only")  # fmt: skip


def test_unknown_format_and_bad_template():
    data = datasets.Dataset.from_list([GOOD])
    expect(ConfigError, lambda: prepare_preferences(data, format="conversation"), column="format",
           fix="'conversational'")  # fmt: skip
    expect(ConfigError, lambda: prepare_preferences(data, system_template="{sys}: {prompt}"),
           column="system_template", fix="system, prompt")  # fmt: skip


# ----------------------------------------------------------------------------------------------- output folder


def test_output_dir_under_a_file(model_dir, tokenizer, tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    expect(ConfigError, lambda: trainer(model_dir, tokenizer, tmp_path, [GOOD], output_dir=str(tmp_path / "runs/a")),
           column="output_dir", fix="move the file", message="is a file")  # fmt: skip


def test_output_dir_that_cannot_be_written(model_dir, tokenizer, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: make the write fail as it does for a user without permission
        import tempfile

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    expect(ConfigError, lambda: trainer(model_dir, tokenizer, tmp_path, [GOOD], output_dir=str(locked / "run")),
           column="output_dir", fix="permissions", message="Permission denied")  # fmt: skip
    assert not (locked / "run").exists()


def test_output_dir_on_a_full_disk(model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(ConfigError) as info:
        trainer(model_dir, tokenizer, tmp_path, [GOOD], save_strategy="steps", save_steps=1)
    assert info.value.column == "output_dir" and "one checkpoint needs about" in str(info.value)
    trainer(model_dir, tokenizer, tmp_path, [GOOD])  # nothing saved during training: nothing to refuse


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture
def workdir(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "pairs.jsonl", [GOOD] * 4)
    run = {"model_name_or_path": str(model_dir), "dataset_name": "pairs.jsonl", "output_dir": "run", "max_steps": 1,
           "report_to": [], "save_strategy": "no", "per_device_train_batch_size": 2}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    return tmp_path


def command_error(capsys, *argv) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("fastdpo: error: "), lines
    return lines[-1]


def test_config_with_an_unknown_field(workdir, capsys):
    (workdir / "typo.yaml").write_text((workdir / "run.yaml").read_text() + "betta: 0.2\n")
    line = command_error(capsys, "dpo", "--config", "typo.yaml")
    assert line == "fastdpo: error: option 'betta': unknown field 'betta' in the config — did you mean 'beta'?"


def test_config_that_is_not_yaml(workdir, capsys):
    (workdir / "broken.yaml").write_text("beta: [0.1\n")
    assert "broken.yaml is not valid YAML" in command_error(capsys, "dpo", "--config", "broken.yaml")


def test_unknown_flag(workdir, capsys):
    assert "did you mean --beta?" in command_error(capsys, "dpo", "--config", "run.yaml", "--bta", "0.2")


def test_non_empty_run_directory(workdir, capsys):
    (workdir / "run").mkdir()
    (workdir / "run" / "notes.txt").write_text("mine")
    assert "--overwrite" in command_error(capsys, "dpo", "--config", "run.yaml")
    assert (workdir / "run" / "notes.txt").read_text() == "mine"  # left as it was


def test_command_reports_bad_data_in_one_line(workdir, capsys):
    jsonl(workdir / "pairs.jsonl", [GOOD, GOOD, '{"prompt": "a",'])
    line = command_error(capsys, "dpo", "--config", "run.yaml")
    assert "pairs.jsonl: line 3: invalid JSON" in line
    assert not (workdir / "run").exists()  # a run that fails on its data leaves no directory behind


# -------------------------------------------------------------------------------------------- files we read


def test_nothing_unpickles_what_the_user_did_not_create():
    """No ``pickle.load(s)`` and no ``torch.load`` without ``weights_only=True`` anywhere in the package: weights
    come from safetensors, caches from Arrow files, settings from YAML/JSON (transformers' own checkpoint loading
    passes ``weights_only=True``)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.glob("fastdpo/**/*.py"), *root.glob("kernels/**/*.py"), *root.glob("bench/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            name = f"{owner}.{node.func.attr}"
            safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
            unpickles = name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads")
            if unpickles or (name == "torch.load" and not safe):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    assert not found, found


def test_remote_code_is_off_unless_asked():
    from fastdpo.train import SFTConfig

    assert DPOConfig(output_dir="x").trust_remote_code is False
    assert SFTConfig(output_dir="x").trust_remote_code is False
