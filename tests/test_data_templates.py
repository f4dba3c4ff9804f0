"""Chat templates with real templates' quirks: the quality report counts the tokens tokenization builds, and a
template that fails names the row and the conversation it failed on (found by rendering real templates)."""

from __future__ import annotations

import logging

import pytest
from test_data_quality import assistant, pair, user
from tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

from fastdpo.data import check_preferences, tokenize_preferences
from fastdpo.data.sft import tokenize_sft
from fastdpo.errors import DataError

# like DeepSeek-R1's distills: the reasoning is cut from an assistant turn, and the generation prompt opens a
# think block that the rendered conversation does not have, so the prompt rendered alone is longer than the
# prompt tokenization keeps (the ids prompt + completion begin with)
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ c }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# like Gemma's: roles must alternate user/assistant
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# like Llama-3.1's: a date header from a kwarg, which Arrow gives as None in a row that lacked it
DATED = "{{ 'Today: ' + date_string + '\n' }}" + CHAT_TEMPLATE


def tokenizer_with(template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_token_checks_count_the_prompt_tokenization_keeps_not_the_prompt_rendered_alone():
    # the report counted the prompt rendered alone with the generation prompt (and tokenizer(prompt) for strings):
    # prompt_fills_max_length dropped rows that TRL and tokenize_preferences keep
    tokenizer = tokenizer_with(THINK_TEMPLATE)
    row = pair(prompt=[user("What color is the sky?")], chosen=[assistant("<think>It is day.</think>Blue.")],
               rejected=[assistant("<think>Hmm.</think>Green, I think.")])  # fmt: skip
    kept = tokenize_preferences([row], tokenizer, max_length=None).dataset[0]
    prompt = len(kept["prompt_ids"])
    alone = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
    assert len(alone["input_ids"]) > prompt  # (what the report counted)
    cut = {"prompt_not_prefix": [0]}  # (the prompt alone's end, which training leaves out: warned of)
    assert check_preferences([row], tokenizer, max_length=prompt + 1).rows == {**cut, "will_be_truncated": [0]}
    assert len(tokenize_preferences([row], tokenizer, max_length=prompt + 1).dataset) == 1
    assert check_preferences([row], tokenizer, max_length=prompt).rows == {**cut, "prompt_fills_max_length": [0]}
    assert len(tokenize_preferences([row], tokenizer, max_length=prompt).dataset) == 0
    # and the completions: exact too (they were the contents joined, without the template's markers)
    longest = prompt + max(len(kept["chosen_ids"]), len(kept["rejected_ids"]))
    assert check_preferences([row], tokenizer, max_length=longest).rows == cut
    assert check_preferences([row], tokenizer, max_length=longest - 1).rows == {**cut, "will_be_truncated": [0]}
    stats = check_preferences([row], tokenizer).length_stats["tokens"]
    assert [stats[c]["max"] for c in ("prompt", "chosen", "rejected")] == [
        prompt, len(kept["chosen_ids"]), len(kept["rejected_ids"])
    ]  # fmt: skip

    # a string prompt ending in a space, which the completion's first token takes
    tokenizer = build_tiny_tokenizer()
    row = pair(prompt="The sky is ", chosen="blue.", rejected="green.")
    kept = tokenize_preferences([row], tokenizer, max_length=None).dataset[0]
    prompt = len(kept["prompt_ids"])
    assert len(tokenizer(row["prompt"])["input_ids"]) > prompt
    assert check_preferences([row], tokenizer, max_length=prompt + 1).rows == {**cut, "will_be_truncated": [0]}


def test_chosen_and_rejected_the_template_renders_alike_are_named(caplog):
    tokenizer = tokenizer_with(THINK_TEMPLATE)
    rows = [
        pair(prompt=[user("2+2?")], chosen=[assistant("<think>2+2 is 4.</think>4.")],
             rejected=[assistant("<think>2+2 is 5.</think>4.")]),
        pair(prompt=[user("3+3?")], chosen=[assistant("6.")], rejected=[assistant("7.")]),
    ]  # fmt: skip
    report = check_preferences(rows, tokenizer)
    # (this template renders a prompt alone with a generation prompt it leaves out before an answer: prompt_not_prefix)
    assert report.rows == {"identical_tokens": [0], "prompt_not_prefix": [0, 1]}
    assert report.severity["identical_tokens"] == "drop"
    kept, dropped = report.filter(rows)
    assert (kept, dropped) == ([rows[1]], {"identical_tokens": 1})
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.tokenize"):
        tokenized = tokenize_preferences(rows, tokenizer)
    assert len(tokenized.dataset) == 2  # trained on as TRL does, but said
    assert tokenized.dataset.column_names == ["prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                                              "rejected_ids"]  # (the flag counted, then removed)  # fmt: skip
    assert "1 of 2 rows have chosen and rejected of the same tokens" in caplog.text
    assert "rows 0:" in caplog.text


def test_a_template_failing_on_a_completion_names_that_column_and_the_report_finds_it():
    # it said "column 'prompt'", and pointed to check_preferences(dataset), which rendered only the prompt: the
    # filter dropped nothing and the same error came back
    tokenizer = tokenizer_with(ALTERNATING)
    rows = [
        pair(prompt=[user("Hi?")], chosen=[assistant("Hello.")], rejected=[assistant("Hello."), assistant("Bye.")]),
        pair(prompt=[user("Yo?")], chosen=[assistant("Hey.")], rejected=[assistant("Go.")]),
    ]
    with pytest.raises(DataError) as raised:
        tokenize_preferences(rows, tokenizer)
    assert str(raised.value) == (
        "row 0, column 'rejected': the chat template failed on the prompt + rejected: Conversation roles must "
        "alternate user/assistant/user/assistant/... — fix the row's messages, or drop such rows with "
        "fastdpo.data.check_preferences(dataset, tokenizer).filter(dataset) (chat_template_error)"
    )
    report = check_preferences(rows, tokenizer)
    assert report.details == {0: ["column 'rejected': chat_template_error (Conversation roles must alternate "
                                  "user/assistant/user/assistant/...)"]}  # fmt: skip
    kept, dropped = report.filter(rows)
    assert dropped == {"chat_template_error": 1}
    assert len(tokenize_preferences(kept, tokenizer).dataset) == 1


def test_a_template_raising_a_python_error_is_a_data_error_on_the_row():
    # a TypeError from inside the template (a kwarg None in one row) escaped Dataset.map as a 17-frame traceback
    tokenizer = tokenizer_with(DATED)
    rows = [
        pair(prompt=[user("Hi?")], chosen=[assistant("A.")], rejected=[assistant("B.")],
             chat_template_kwargs={"date_string": "1 May"}),
        pair(prompt=[user("Yo?")], chosen=[assistant("C.")], rejected=[assistant("D.")],
             chat_template_kwargs={"date_string": None}),
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"^row 1, column 'prompt': the chat template failed on the prompt: TypeError"):
        tokenize_preferences(rows, tokenizer)
    assert check_preferences(rows, tokenizer).rows == {"chat_template_error": [1]}
    sft = [{"messages": [user("Hi?"), assistant("A.")], "chat_template_kwargs": {"date_string": None}}]
    with pytest.raises(DataError, match=r"^row 0, column 'messages': the chat template failed: TypeError"):
        tokenize_sft(sft, tokenizer)


# like Llama-3.2's: a content is a string or a list of text parts
PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_text_parts_and_the_roles_templates_render_are_tokenized_as_trl_does(tmp_path):
    # DPO refused them ("content is list: a chat template cannot render it", "role 'developer'"), SFT and TRL not
    import datasets
    from test_data_tokenize_trl import trl_prepared

    from fastdpo.data import prepare_preferences

    tokenizer = tokenizer_with(PARTS_TEMPLATE)
    text = lambda words: [{"type": "text", "text": words}]  # noqa: E731
    rows = [
        pair(prompt=[user(text("What color is the sky?"))], chosen=[assistant(text("Blue."))],
             rejected=[assistant("Green.")]),
        pair(prompt=[{"role": "developer", "content": "Be brief."}, user("2+2?")], chosen=[assistant("4.")],
             rejected=[assistant("5.")]),
        pair(prompt=[user("Weather?"), {"role": "ipython", "content": "sunny"}], chosen=[assistant("Sunny.")],
             rejected=[assistant("Rain.")]),
    ]  # fmt: skip
    rows[0]["rejected"] = [assistant(text("Green."))]  # (Arrow holds a column of strings or of lists, not both)
    for data in (datasets.Dataset.from_list(rows[:1]), datasets.Dataset.from_list(rows[1:])):
        ours = tokenize_preferences(prepare_preferences(data), tokenizer, max_length=None).dataset
        theirs = trl_prepared(data, tokenizer, tmp_path)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[column] == theirs[column], column
    assert check_preferences(rows, tokenizer).rows == {}
    # an input column joins a prompt of text parts as parts: the text the template renders is the string case's
    joined = prepare_preferences([{**rows[0], "input": "Today."}])[0]["prompt"][0]["content"]
    plain = prepare_preferences([{**rows[0], "prompt": [user("What color is the sky?")], "input": "Today."}])
    assert "".join(p["text"] for p in joined) == plain[0]["prompt"][0]["content"]


def test_assistant_only_loss_takes_trls_training_template_of_a_known_template(tmp_path):
    # Qwen2.5's template as its models ship it has no {% generation %} markers: TRL's SFTTrainer swaps in its training
    # version (get_training_chat_template) and trains; fastdpo's refused every row ("has no assistant tokens")
    import os

    import torch
    from test_train_sft import common_args, message_rows, tiny_llama_config
    from transformers import LlamaForCausalLM

    from fastdpo.train import SFTConfig, SFTTrainer

    trl = pytest.importorskip("trl")
    tokenizer = build_tiny_tokenizer()
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5.jinja")) as file:
        tokenizer.chat_template = file.read()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(tmp_path / "model")
    logs = {}
    for name, trainer_cls, config_cls in (("ours", SFTTrainer, SFTConfig), ("trl", trl.SFTTrainer, trl.SFTConfig)):
        args = config_cls(**common_args(tmp_path, name, assistant_only_loss=True, packing=False, max_length=64))
        model = LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
        trainer = trainer_cls(model=model, args=args, train_dataset=message_rows(12), processing_class=tokenizer)
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    for step in (0, 1):
        for key in ("loss", "grad_norm", "num_tokens"):  # fp32 sums in another order
            assert logs["ours"][step][key] == pytest.approx(logs["trl"][step][key], rel=1e-4), (step, key)


def test_a_template_that_never_trains_the_end_of_turn_is_warned_about(tmp_path):
    # assistant_only_loss with a {% generation %} span that ends before <|im_end|>: the model never learns to stop,
    # and the loss looks healthy. TRL 1.16 warns; fastdpo.SFTTrainer said nothing
    import warnings

    import torch
    from test_data_sft import MARKER_TEMPLATE
    from test_train_sft import common_args, message_rows, tiny_llama_config
    from transformers import LlamaForCausalLM

    from fastdpo.train import SFTConfig, SFTTrainer

    pytest.importorskip("trl")
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    outside = MARKER_TEMPLATE.replace("{{ message['content'] }}<|im_end|>{% endgeneration %}",
                                      "{{ message['content'] }}{% endgeneration %}<|im_end|>")  # fmt: skip
    assert outside != MARKER_TEMPLATE
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(tmp_path / "model")
    for name, template in (("inside", MARKER_TEMPLATE), ("outside", outside)):
        tokenizer.chat_template = template
        args = SFTConfig(**common_args(tmp_path, name, assistant_only_loss=True, packing=False, max_length=64))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=message_rows(4),
                       processing_class=tokenizer)  # fmt: skip
        said = [str(w.message) for w in caught if "never learns to stop" in str(w.message)]
        # TRL's own check of the same template as the reference
        assert bool(said) == (not is_chat_template_stop_token_trained(tokenizer)), (name, said)
        assert bool(said) == (name == "outside")


def test_context_parallelism_is_refused_by_the_sft_trainer(tmp_path, monkeypatch):
    # CP/SP shard each row over processes; the packed step's targets and sequence bounds would not follow (TRL refuses
    # them with packing): a ConfigError before anything is built
    from types import SimpleNamespace

    from test_train_sft import common_args, message_rows, tiny_llama_config
    from transformers import LlamaForCausalLM

    from fastdpo.errors import ConfigError
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    args = SFTConfig(**common_args(tmp_path, "cp"))
    args.parallelism_config = SimpleNamespace(cp_enabled=True, sp_enabled=False)  # (accelerate's, on 2 GPUs)
    with pytest.raises(ConfigError, match="parallelism_config.*context and sequence parallelism"):
        SFTTrainer(model=LlamaForCausalLM(tiny_llama_config(tokenizer)), args=args, train_dataset=message_rows(4),
                   processing_class=tokenizer)  # fmt: skip
    # accelerate's own (`accelerate launch --parallelism_config_cp_size 2`), where the args have none: TRL reads it
    from fastdpo.train.common import check_attention_device

    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    trainer = SFTTrainer(model=model, args=SFTConfig(**common_args(tmp_path, "a")), train_dataset=message_rows(4),
                         processing_class=tokenizer)  # fmt: skip
    split = SimpleNamespace(cp_enabled=False, sp_enabled=True)
    monkeypatch.setattr(type(trainer.accelerator), "parallelism_config", property(lambda self: split))
    with pytest.raises(ConfigError, match="context and sequence parallelism"):
        check_attention_device(trainer)  # (every trainer's constructor calls it once the accelerator is built)
