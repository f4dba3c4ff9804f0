"""SFT rows: ``input_ids`` and ``labels`` equal TRL 1.16's ``SFTTrainer._prepare_dataset`` (no packing), row for row.

TRL's own code is the reference: ``_prepare_dataset`` is called unbound on a stub holding the three attributes it
reads (``_tokenizer``, ``completion_only_loss`` resolved as TRL's ``__init__`` does, and ``chat_template``).
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import datasets
import pytest
from tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

from fastdpo.data.sft import prepare_sft, sft_layout, tokenize_sft
from fastdpo.errors import ConfigError, DataError

trl = pytest.importorskip("trl")

FIXTURES = Path(__file__).parent / "fixtures"
datasets.disable_progress_bars()

# CHAT_TEMPLATE with {% generation %} around assistant turns (end-of-turn token included), and a template
# argument (``greeting``) that rows can set through ``chat_template_kwargs``
MARKER_TEMPLATE = (
    "{% if greeting is defined and greeting %}<|im_start|>system\n{{ greeting }}<|im_end|>\n{% endif %}"
    "{% if tools %}<|im_start|>tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers():
    plain = build_tiny_tokenizer()
    marked = copy.deepcopy(plain)
    marked.chat_template = MARKER_TEMPLATE
    return {"plain": plain, "marked": marked}


def trl_prepared(
    dataset,
    tokenizer,
    tmp_path,
    *,
    max_length,
    truncation_mode,
    completion_only_loss=None,
    assistant_only_loss=False,
    chat_template=None,
) -> datasets.Dataset:
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        truncation_mode=truncation_mode,
        bf16=False,
        report_to=[],
        assistant_only_loss=assistant_only_loss,
        completion_only_loss=completion_only_loss,
    )
    first = dataset[0]
    resolved = "prompt" in first and "completion" in first if completion_only_loss is None else completion_only_loss
    stub = types.SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=resolved, chat_template=chat_template)
    return trl.SFTTrainer._prepare_dataset(
        stub, dataset, tokenizer, args, packing=False, formatting_func=None, dataset_name="train"
    )


# name → (fixture, prompt/completion?, conversational?)
CASES = {
    "text": ("sft_text.jsonl", False, False),
    "messages": ("sft_messages.jsonl", False, True),
    "sharegpt": ("sft_sharegpt.jsonl", False, True),
    "prompt_completion": ("sft_prompt_completion.jsonl", True, False),
    "prompt_completion_conversational": ("sft_prompt_completion_conversational.jsonl", True, True),
    "tools": ("sft_tools.jsonl", False, True),
}


def _options():
    for case, (_, is_pc, conversational) in CASES.items():
        for completion_only_loss in (None, False, True) if is_pc else (None, False):
            # ShareGPT roles stay 'human'/'gpt' (as in TRL), so it has no assistant turns to mask
            for assistant_only_loss in (False, True) if conversational and case != "sharegpt" else (False,):
                name = f"{case}-completion_only={completion_only_loss}-assistant_only={assistant_only_loss}"
                yield pytest.param(case, completion_only_loss, assistant_only_loss, id=name)


def _first_label(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def _assert_equal_trl(ours, raw, tokenizer, tmp_path, **options):
    """Tokenize with both, compare row for row, and return ours."""
    options = {"max_length": None, **options}
    reference = trl_prepared(raw, tokenizer, tmp_path, **{"truncation_mode": "keep_start", **options})
    tokenized = tokenize_sft(ours, tokenizer, **options)
    assert tokenized.dataset["input_ids"] == reference["input_ids"]
    assert tokenized.dataset["labels"] == reference["labels"]
    assert sum(tokenized.dropped.values()) == len(raw) - len(reference)
    return tokenized


@pytest.mark.filterwarnings("ignore:The `'keep_end'` truncation mode is deprecated:FutureWarning")
@pytest.mark.parametrize(("case", "completion_only_loss", "assistant_only_loss"), list(_options()))
def test_input_ids_and_labels_equal_trl(case, completion_only_loss, assistant_only_loss, tokenizers, tmp_path):
    name, is_pc, conversational = CASES[case]
    tokenizer = tokenizers["marked" if conversational and (assistant_only_loss or case == "tools") else "plain"]
    raw = datasets.load_dataset("json", data_files=str(FIXTURES / name), split="train")
    ours = prepare_sft(FIXTURES / name)
    losses = {"completion_only_loss": completion_only_loss, "assistant_only_loss": assistant_only_loss}

    whole = _assert_equal_trl(ours, raw, tokenizer, tmp_path, **losses)
    assert not whole.dropped_rows and len(whole.dataset) == len(raw)
    labels = whole.dataset["labels"]
    masked = any(label == -100 for row in labels for label in row)
    assert masked == ((is_pc and completion_only_loss is not False) or assistant_only_loss)
    # a limit inside the masked start of half the rows (keep_start drops those), else half the median length
    starts = sorted(_first_label(row) for row in labels)
    lengths = sorted(len(row) for row in labels)
    max_length = starts[len(starts) // 2] + 1 if masked else lengths[len(lengths) // 2] // 2
    for truncation_mode in ("keep_start", "keep_end"):
        cut = _assert_equal_trl(
            ours, raw, tokenizer, tmp_path, max_length=max_length, truncation_mode=truncation_mode, **losses
        )
        assert max(len(ids) for ids in cut.dataset["input_ids"]) == max_length
        if masked and truncation_mode == "keep_start":
            gone = cut.dropped_rows["no_labels_after_truncation"]
            assert gone and gone == [i for i, row in enumerate(labels) if _first_label(row) >= max_length]


def test_explicit_chat_template_is_used_like_trls_training_template(tokenizers, tmp_path):
    # TRL's trainer passes its training template (one with generation markers) as `chat_template`
    raw = datasets.load_dataset("json", data_files=str(FIXTURES / "sft_messages.jsonl"), split="train")
    tokenized = _assert_equal_trl(
        prepare_sft(raw), raw, tokenizers["plain"], tmp_path, assistant_only_loss=True, chat_template=MARKER_TEMPLATE
    )
    assert any(label == -100 for row in tokenized.dataset["labels"] for label in row)


def test_prompt_rendered_differently_alone_splits_where_trl_does(tokenizers, tmp_path):
    # a generation prompt the whole conversation does not contain (like Gemma's empty thought block): the completion
    # starts where the prompt's ids and the prompt+completion ids stop agreeing, not after the prompt's ids
    template = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nthink\n{% endif %}")
    name = "sft_prompt_completion_conversational.jsonl"
    raw = datasets.load_dataset("json", data_files=str(FIXTURES / name), split="train")
    tokenized = _assert_equal_trl(prepare_sft(raw), raw, tokenizers["plain"], tmp_path, chat_template=template)
    tokenizer = tokenizers["plain"]
    rendered = [
        tokenizer.apply_chat_template(p, chat_template=template, add_generation_prompt=True) for p in raw["prompt"]
    ]
    prompt_lengths = [len(encoding["input_ids"]) for encoding in rendered]
    assert all(_first_label(row) < n for row, n in zip(tokenized.dataset["labels"], prompt_lengths, strict=True))


def test_chat_template_kwargs_and_tools_reach_the_template(tokenizers):
    tokenized = tokenize_sft(prepare_sft(FIXTURES / "sft_tools.jsonl"), tokenizers["marked"], max_length=None)
    texts = [tokenizers["marked"].decode(ids) for ids in tokenized.dataset["input_ids"]]
    assert "Tools may help." in texts[0] and '"name": "search"' in texts[0]
    assert "<|im_start|>system" not in texts[1] and "tools" not in texts[1]  # empty greeting, empty tool list
    assert "Be kind." in texts[2]


def test_prepare_keeps_other_columns_and_converts_sharegpt():
    dataset = prepare_sft(FIXTURES / "sft_sharegpt.jsonl")
    assert sorted(dataset.column_names) == ["id", "messages"]
    answer = "Mix flour, water, yeast and salt, knead, rest, then bake."
    assert dataset[0]["messages"][1] == {"role": "gpt", "content": answer}
    text = prepare_sft(FIXTURES / "sft_text.jsonl")
    assert text.column_names == ["text", "source"]
    assert sft_layout(text.column_names) == "text"


def test_conversations_with_role_content_are_renamed_to_messages():
    rows = [{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    dataset = prepare_sft(datasets.Dataset.from_list(rows))
    assert dataset.column_names == ["messages"]


def test_column_map_and_text_field():
    data = datasets.Dataset.from_list([{"body": "Hello there.", "text": "ignored? no: clashes"}])
    with pytest.raises(DataError, match="column 'text': the dataset already has a column 'text'"):
        prepare_sft(data, columns={"text": "body"})
    data = datasets.Dataset.from_list([{"body": "Hello there."}, {"body": "Bye."}])
    assert prepare_sft(data, text_field="body")["text"] == ["Hello there.", "Bye."]
    assert prepare_sft(data, columns={"text": "body"})["text"] == ["Hello there.", "Bye."]
    with pytest.raises(ConfigError, match="option 'text_field'"):
        prepare_sft(data, columns={"text": "body"}, text_field="other")
    # TRL reads prompt/completion, then messages, before dataset_text_field: rows of those are read from them, the
    # field not needed (it was refused, 'column not found')
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    mapped = [{"question": "Hi?", "completion": " Yo.", "body": "not read"}]
    plain = [{"prompt": "Hi?", "completion": " Yo."}]
    for rows, columns in (([{"messages": messages}], None), ([{"conversations": messages}], None), (plain, None),
                          (mapped, {"prompt": "question"})):  # fmt: skip
        prepared = prepare_sft(datasets.Dataset.from_list(rows), columns=columns, text_field="body")
        assert "text" not in prepared.column_names and sft_layout(prepared.column_names) != "text", rows
    with pytest.raises(ConfigError, match=r"option 'columns': unknown value 'txt' — did you mean 'text'\?"):
        prepare_sft(data, columns={"txt": "body"})
    with pytest.raises(ConfigError, match="option 'columns': must map fastdpo's names to the data's columns, got list"):
        prepare_sft(data, columns=["body"])


# ------------------------------------------------------------------------------------------------------- errors


def _rows(*rows):
    return datasets.Dataset.from_list(list(rows))


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
CHAT = {"messages": [USER, ASSISTANT]}

# id → (rows, prepare_sft options, the message it must match)
PREPARE_ERRORS = {
    "mapped column missing": (
        [{"body": "x"}],
        {"columns": {"text": "bdy"}},
        r"column 'bdy': column not found — did you mean 'body'\?",
    ),
    "text_field missing": ([{"text": "x"}], {"text_field": "body"}, r"column 'body': column not found"),
    "no sft columns": ([{"body": "x"}], {}, r"no SFT columns: expected 'text'.*columns present: body"),
    "completion missing": (
        [{"prompt": "x", "complet": "y"}],
        {},
        r"column 'completion': column not found — did you mean 'complet'",
    ),
    "text None": ([{"text": "a"}, {"text": None}], {}, r"row 1, column 'text': expected a string .*got nothing"),
    "text not a string": ([{"text": 5}], {}, r"row 0, column 'text': expected a string like the first row, got int"),
    "text blank": ([{"text": "a"}, {"text": " \n"}], {}, r"row 1, column 'text': is empty — drop the row"),
    "completion empty": (
        [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}],
        {},
        r"row 1, column 'completion': is empty",
    ),
    "string prompt, conversational completion": (
        [{"prompt": "p", "completion": [ASSISTANT]}],
        {},
        r"row 0, column 'prompt': expected a list of .*got a string",
    ),
    "conversational prompt, string completion": (
        [{"prompt": [USER], "completion": "c"}],
        {},
        r"row 0, column 'prompt': expected a string .*got a list of messages",
    ),
    "prompt/completion beside text": (
        [{"prompt": "p", "completion": "c", "text": "t"}],
        {},
        r"column 'text': the dataset has 'prompt'/'completion'",
    ),
    "messages empty": ([CHAT, {"messages": []}], {}, r"row 1, column 'messages': expected a list .*got an empty list"),
    "messages as JSON": (
        [{"messages": '[{"role": "user"}]'}],
        {},
        r"row 0, column 'messages': expected a list .*got a string — parse it",
    ),
    "message without role": (
        [CHAT, {"messages": [{"content": "Hi"}, ASSISTANT]}],
        {},
        r"row 1, column 'messages': message 0 has no 'role'",
    ),
    "message without content": (
        [CHAT, {"messages": [USER, {"role": "assistant"}]}],
        {},
        r"row 1, column 'messages': message 1 \(assistant\) has no",
    ),
    "tools not JSON": ([{**CHAT, "tools": "[{oops"}], {}, r"row 0, column 'tools': is not valid JSON"),
    "chat_template_kwargs not a dict": (
        [{**CHAT, "chat_template_kwargs": "x"}],
        {},
        r"row 0, column 'chat_template_kwargs': expected a dict",
    ),
}


@pytest.mark.parametrize("case", PREPARE_ERRORS)
def test_prepare_errors(case):
    rows, options, pattern = PREPARE_ERRORS[case]
    with pytest.raises(DataError, match=pattern):
        prepare_sft(_rows(*rows), **options)


def test_assistant_tool_call_without_content_is_accepted():
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    assert len(prepare_sft(_rows({"messages": [USER, call]}))) == 1


# id → (rows, tokenize_sft options, error type, the message it must match)
TOKENIZE_ERRORS = {
    "truncation_mode": (
        [{"text": "x"}], {"truncation_mode": "keep_middle"}, ConfigError,
        r"option 'truncation_mode': unknown value 'keep_middle' — did you mean 'keep_",
    ),
    "max_length": ([{"text": "x"}], {"max_length": 0}, ConfigError, r"option 'max_length': must be a positive integer"),
    "completion_only_loss on text": (
        [{"text": "x"}], {"completion_only_loss": True}, ConfigError, r"option 'completion_only_loss': needs prompt/"
    ),
    "completion_only_loss on messages": (
        [CHAT], {"completion_only_loss": True}, ConfigError, r"option 'completion_only_loss': needs prompt/"
    ),
    "assistant_only_loss on strings": (
        [{"prompt": "p", "completion": "c"}], {"assistant_only_loss": True}, ConfigError,
        r"option 'assistant_only_loss': needs conversational rows",
    ),
    "already tokenized": (
        [{"text": "x", "input_ids": [1]}], {}, DataError, r"column 'input_ids': the dataset already has this column"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", TOKENIZE_ERRORS)
def test_tokenize_option_errors(case, tokenizers):
    rows, options, error, pattern = TOKENIZE_ERRORS[case]
    with pytest.raises(error, match=pattern):
        tokenize_sft(_rows(*rows), tokenizers["plain"], **options)


def test_conversations_need_a_chat_template(tokenizers):
    tokenizer = copy.deepcopy(tokenizers["plain"])
    tokenizer.chat_template = None
    pattern = r"column 'messages': the dataset is conversational but the tokenizer has no chat template — .*chat_templ"
    with pytest.raises(DataError, match=pattern):
        tokenize_sft(_rows(CHAT), tokenizer)
    assert tokenize_sft(_rows(CHAT), tokenizer, chat_template=CHAT_TEMPLATE).dataset["input_ids"]


def test_strings_need_an_eos_token(tokenizers):
    tokenizer = copy.deepcopy(tokenizers["plain"])
    tokenizer.eos_token = None
    with pytest.raises(DataError, match=r"column 'completion': the tokenizer has no EOS token.* — set tokenizer.eos"):
        tokenize_sft(_rows({"prompt": "p", "completion": "c"}), tokenizer)


def test_assistant_only_loss_without_generation_markers_names_the_row(tokenizers):
    with pytest.raises(DataError, match=r"row 0, column 'messages': has no assistant tokens .*\{% generation %\}"):
        tokenize_sft(_rows(CHAT), tokenizers["plain"], assistant_only_loss=True)


def test_assistant_only_loss_row_without_assistant_turn(tokenizers):
    rows = _rows(CHAT, CHAT, {"messages": [USER]})
    with pytest.raises(DataError, match=r"row 2, column 'messages': has no assistant message .*\(roles: user\)"):
        tokenize_sft(rows, tokenizers["marked"], assistant_only_loss=True)


def test_chat_template_failure_names_the_row(tokenizers):
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    rows = _rows(CHAT, {"messages": [{"role": "bad", "content": "x"}, ASSISTANT]})
    with pytest.raises(DataError, match=r"row 1, column 'messages': the chat template failed: no bad roles"):
        tokenize_sft(rows, tokenizers["plain"], chat_template=template)


def test_a_cli_runs_data_filter_drops_the_sft_rows_preparation_refuses(tmp_path, caplog):
    # data_filter applied to DPO runs only: one empty completion stopped an SFT run under the default `drop`
    import json
    import logging

    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits
    from fastdpo.errors import DataError

    rows = [{"prompt": f"Q{i}?", "completion": "" if i == 2 else f" A{i}."} for i in range(5)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        train, _, _ = loaded_splits("sft", RunArguments(dataset_name=str(tmp_path / "sft.jsonl")), 0)
    assert train["prompt"] == ["Q0?", "Q1?", "Q3?", "Q4?"]
    assert "dropped 1 rows the preparation refuses: {'completion': 1} (rows 2)" in caplog.text
    with pytest.raises(DataError, match="^row 2, column 'completion': is empty"):
        loaded_splits("sft", RunArguments(dataset_name=str(tmp_path / "sft.jsonl"), data_filter="none"), 0)
    # a conversational row 0 without a completion: the others judged by the first row with one (not all refused)
    from fastdpo.data.refused import prepare_sft_dropping

    answers = [None] + [[{"role": "assistant", "content": f"A{i}."}] for i in range(1, 4)]
    talks = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "completion": answers[i]} for i in range(4)]
    for first in (None, []):  # (an empty list as None: the first row with a format decides)
        talks[0]["completion"] = first
        (tmp_path / "talks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in talks))
        prepared, dropped, rows = prepare_sft_dropping(str(tmp_path / "talks.jsonl"))
        assert (len(prepared), dropped, rows) == (3, {"completion": 1}, [0])
    # ShareGPT conversations were told apart by row 0 alone: none converted, every row refused
    turns = [[{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}] for i in range(4)]
    for first in (None, []):
        (tmp_path / "share.jsonl").write_text("".join(json.dumps({"conversations": talk}) + "\n"
                                                      for talk in [first, *turns[1:]]))  # fmt: skip
        prepared, dropped, rows = prepare_sft_dropping(str(tmp_path / "share.jsonl"))
        assert (len(prepared), dropped, rows) == (3, {"messages": 1}, [0])
        assert prepared[0]["messages"][0] == {"role": "human", "content": "Q1?"}  # (keys converted, as TRL)


def test_message_lists_written_as_text_in_sft_rows_are_warned_about(caplog):
    # an SFT set saved to CSV (or with json.dumps) holds its conversations as strings: prompt/completion and text
    # rows read them as text, and were trained on as that text without a word (preference rows warn of it)
    import json

    turn = [{"role": "user", "content": "2+2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    pairs = [{"prompt": json.dumps(turn), "completion": str(answer)}, {"prompt": "2+2?", "completion": "4"}]
    with caplog.at_level("WARNING"):
        prepared = prepare_sft(pairs)
    assert "1 of 2 rows hold message lists written as text in prompt (1), completion (1) (rows [0])" in caplog.text
    assert prepared[0]["prompt"] == json.dumps(turn)  # (kept as given: a warning, not a change)
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_sft([{"text": "plain"}, {"text": str(turn + answer)}, {"text": "[{ a bracket"}])
    assert "1 of 3 rows hold message lists written as text in text (1) (rows [1])" in caplog.text
    caplog.clear()
    large = datasets.Dataset.from_list([{"text": str(turn + answer)}])  # (Polars writes Parquet's large strings)
    with caplog.at_level("WARNING"):
        prepare_sft(large.cast(datasets.Features({"text": datasets.Value("large_string")})))
    assert "1 of 1 rows hold message lists written as text in text (1)" in caplog.text
    from fastdpo.data.stream import prepare_sft_stream  # a stream: counted as it is read

    stream = prepare_sft_stream(datasets.Dataset.from_list(pairs).to_iterable_dataset(), build_tiny_tokenizer())
    assert len(list(stream.dataset)) == 2 and stream.flagged_rows == {"messages_written_as_text": [0]}
    caplog.clear()
    with caplog.at_level("WARNING"):  # lists are lists: nothing to say
        prepare_sft([{"prompt": turn, "completion": answer}])
        prepare_sft([{"messages": turn + answer, "text": json.dumps(turn)}])  # (text beside messages: not read)
    assert "written as text" not in caplog.text
