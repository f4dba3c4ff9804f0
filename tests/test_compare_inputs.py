"""What ``fastdpo compare`` reads and how it tells the user: a chat prompt tokenized as the trainers tokenize it,
a reference with another vocabulary or tokenizer refused, the quickstart's held-out problems of the run's own seed,
pairs files without a prompt column or with pairs the trainers drop, folders without a tokenizer, prompts that
are not text, a .json prompts file, and a markdown table that model output cannot break."""

from __future__ import annotations

import json

import pytest
import torch
from test_compare_pairs import CONTEXT, CONVERSATIONAL, STANDARD
from tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.cli import main as cli
from fastdpo.compare import Answer, Row, _prompt_ids, markdown, pair_metrics, summary
from fastdpo.compare_io import BUILTIN
from fastdpo.data import prepare_preferences, tokenize_preferences

QUICK = ["--samples", "0", "--max-new-tokens", "1"]


def save(folder, tokenizer, *, seed: int = 0, vocab: int | None = None, with_tokenizer: bool = True) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)


def refused(argv: list[str], capsys) -> str:
    """The one line ``fastdpo compare`` exits 2 with."""
    capsys.readouterr()
    assert cli(["compare", *argv]) == 2, argv
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error:"), line
    return line


def test_a_chat_prompt_gets_the_trainers_ids_under_a_template_that_writes_bos():
    # a template starting with {{ bos_token }} (Llama 3's, Gemma's): the trainers' prompt ids hold one BOS
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    conversation = dict(BUILTIN)["multi-turn conversation"]
    row = {"prompt": conversation, "chosen": [{"role": "assistant", "content": "43"}],
           "rejected": [{"role": "assistant", "content": "44"}]}  # fmt: skip
    want = tokenize_preferences(prepare_preferences([row]), tokenizer).dataset["prompt_ids"][0]
    ids, truncated = _prompt_ids(tokenizer, conversation, 1000)
    assert ids == want and not truncated
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_chat_prompt_without_a_template_gets_its_text_parts_text():
    # a content of text parts was written into the prompt as Python's print of the list ("user: [{'type': ...")
    from fastdpo.errors import DataError

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    parts = [{"role": "user", "content": [{"type": "text", "text": "next: 5"}]}]
    text = [{"role": "user", "content": "next: 5"}]
    assert _prompt_ids(tokenizer, parts, 1000) == _prompt_ids(tokenizer, text, 1000)
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]
    with pytest.raises(DataError, match="message 0's content is no text"):
        _prompt_ids(tokenizer, image, 1000)


def test_compare_refuses_what_the_command_refuses():
    # compare() took max_new_tokens=0 (a KL estimate of 0.0 from no token), an empty list (ZeroDivisionError in
    # the summary) and bare strings (a ValueError unpacking them, or a 2-character one split into name and prompt)
    from fastdpo.compare import compare
    from fastdpo.errors import ConfigError

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    for prompts, options, column in (([("p", "next: 5")], {"max_new_tokens": 0}, "max_new_tokens"),
                                     ([("p", "next: 5")], {"samples": -1}, "samples"), ([], {}, "prompts"),
                                     (["ab"], {}, "prompts")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"option '{column}'"):
            compare(model, model, tokenizer, prompts, **options)


def test_a_reference_with_another_vocabulary_or_tokenizer_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ours, other = build_tiny_tokenizer(), build_tiny_tokenizer(500)
    save("policy", ours)
    save("smaller", other, seed=1)  # 500 ids: an IndexError or a shape mismatch deep in the scoring before
    line = refused(["--policy", "policy", "--reference", "smaller", *QUICK, "--out", "a"], capsys)
    assert "option '--reference': the reference's vocabulary has 500 entries and the policy's 590" in line
    # the same size, another tokenizer saved with it: the same ids mean other tokens (meaningless numbers before)
    save("wide_policy", ours, vocab=640)
    save("wide_other", other, seed=1, vocab=640)
    line = refused(["--policy", "wide_policy", "--reference", "wide_other", *QUICK, "--out", "b"], capsys)
    assert "option '--reference': the tokenizer saved with the reference (wide_other) differs" in line
    # a path that is no folder said that folder "holds no model (no config.json, ...)"
    line = refused(["--policy", "polcy", "--reference", "smaller", *QUICK, "--out", "d"], capsys)
    assert line.startswith(f"fastdpo: error: option '--policy': there is no folder {tmp_path / 'polcy'} — "), line
    save("reference", ours, seed=1)  # the same tokenizer: fine
    assert cli(["compare", "--policy", "policy", "--reference", "reference", "--limit", "1", *QUICK, "--out", "c"]) == 0


def test_quickstart_prompts_are_the_held_out_problems_of_the_runs_seed(tmp_path, capsys, monkeypatch):
    from fastdpo.quickstart import make_data

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    for name in ("qs/dpo", "qs/sft"):
        save(name, tokenizer)
    # what `fastdpo quickstart --seed 1 --out qs` records beside its models
    (tmp_path / "qs" / "report.json").write_text(json.dumps({"settings": {"seed": 1, "sft_steps": 400}}))

    def prompts(out: str) -> list[str]:
        return [row["prompt"] for row in json.loads((tmp_path / out / "compare.json").read_text())["rows"]]

    common = ["compare", "--prompts", "quickstart", "--limit", "3", *QUICK]
    assert cli([*common, "--policy", "qs/dpo", "--reference", "qs/sft", "--out", "one"]) == 0
    assert "the held-out problems of seed 1, the seed qs/report.json recorded" in capsys.readouterr().out
    held_out = {seed: [p.prompt for p in make_data(seed)[3][:3]] for seed in (0, 1, 2)}
    assert prompts("one") == held_out[1] != held_out[0]  # seed 0's problems overlap seed 1's training data
    # no report beside the policy: --seed's problems, and the note says so
    (tmp_path / "qs" / "report.json").unlink()
    assert cli([*common, "--policy", "qs/dpo", "--reference", "qs/sft", "--seed", "2", "--out", "two"]) == 0
    assert (
        "no quickstart report.json beside qs/dpo: the held-out problems of seed 2 (--seed)" in capsys.readouterr().out
    )
    assert prompts("two") == held_out[2]


def test_pairs_without_a_prompt_column_or_with_pairs_the_trainers_drop(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("policy", tokenizer)
    save("reference", tokenizer, seed=1)
    common = ["--policy", "policy", "--reference", "reference", "--limit", "1", *QUICK]
    # the prompt under another name: every pair was scored without its prompt (reward accuracy 0.0%, no message)
    (tmp_path / "question.jsonl").write_text(json.dumps({"question": "next: 5 ", "chosen": "6", "rejected": "7"}))
    line = refused([*common, "--pairs", "question.jsonl", "--out", "a"], capsys)
    assert "option '--pairs': question.jsonl has no 'prompt' column" in line
    fix = """name your prompt column with --columns '{"prompt": "..."}' (columns: question, chosen, rejected)"""
    assert fix in line
    # with --columns, or the columns the policy's run recorded (dataset_columns in its config.yaml): its prompts
    for flags, note in ((["--columns", '{"prompt": "question"}'], None),
                        ([], "columns read as the policy's run read its data")):  # fmt: skip
        (tmp_path / "policy" / "config.yaml").write_text("dataset_columns: {prompt: question}\nbeta: 0.1\n")
        assert cli(["compare", *common, "--pairs", "question.jsonl", *flags, "--out", f"q{len(flags)}"]) == 0
        assert note is None or note in capsys.readouterr().out
        assert json.loads((tmp_path / f"q{len(flags)}" / "compare.json").read_text())["pairs"]["pairs"] == 1
        (tmp_path / "policy" / "config.yaml").unlink()
    # whole transcripts (HH-RLHF's): the shared start is the prompt, as the trainers read it, and the report says so
    transcripts = [{"chosen": "Human: What color is the sky? Assistant: Blue.", "rejected": "Human: What color "
                    "is the sky? Assistant: Green."}, {"chosen": "hello", "rejected": "bonjour"}]  # fmt: skip
    (tmp_path / "transcripts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in transcripts))
    assert cli(["compare", *common, "--pairs", "transcripts.jsonl", "--out", "b"]) == 0
    out = capsys.readouterr().out
    assert "transcripts.jsonl has no 'prompt' column: a pair's prompt is the text its chosen and rejected" in out
    assert "(1 of 2 pairs have none)" in out
    # an identical pair and a duplicate: dropped as the trainers drop them (data_filter: drop), counted by reason
    rows = [*CONVERSATIONAL, CONVERSATIONAL[0], {**CONVERSATIONAL[1], "rejected": CONVERSATIONAL[1]["chosen"]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli(["compare", *common, "--pairs", "pairs.jsonl", "--out", "c"]) == 0
    reported = json.loads((tmp_path / "c" / "compare.json").read_text())["pairs"]
    assert reported["pairs"] == 2 and reported["dropped"] == {"identical": 1, "duplicate": 1}
    assert reported["dropped_pairs"] == 2
    policy, reference = (LlamaForCausalLM.from_pretrained(name) for name in ("policy", "reference"))
    want = pair_metrics(policy, reference, tokenizer, CONVERSATIONAL)  # the two pairs kept, alone
    assert reported["reward_margin"] == pytest.approx(want["reward_margin"], rel=1e-5)
    report = (tmp_path / "c" / "compare.md").read_text()
    assert "- 2 more pairs dropped, as the trainers drop them: 1 identical (chosen == rejected" in report
    assert "1 duplicate (same prompt, chosen and rejected as an earlier row)" in report
    # with STANDARD's rows (an empty prompt, one filling the context): those two reasons
    assert pair_metrics(policy, reference, tokenizer, STANDARD)["dropped"] == {"empty": 1, "prompt_fills_max_length": 1}


def test_a_folder_without_a_tokenizer_uses_the_references_or_says_to_save_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("bare", tokenizer, with_tokenizer=False)  # a model saved without its tokenizer (or an adapter alone)
    save("reference", tokenizer, seed=1)
    capsys.readouterr()
    assert cli(["compare", "--policy", "bare", "--reference", "reference", "--limit", "1", *QUICK, "--out", "a"]) == 0
    assert "bare holds no tokenizer: using reference's" in capsys.readouterr().out
    save("bare_reference", tokenizer, seed=1, with_tokenizer=False)
    line = refused(["--policy", "bare", "--reference", "bare_reference", *QUICK, "--out", "b"], capsys)
    assert "option '--policy': bare holds no tokenizer" in line and "save the tokenizer with the model" in line


def test_a_run_that_trusted_its_models_own_code_is_compared_so(tmp_path, capsys, monkeypatch):
    # a tokenizer with its own code, from a run whose config.yaml says trust_remote_code: true (compare asked on
    # stdin, and failed)
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    for folder in ("policy", "reference"):
        save(folder, tokenizer)
    code = "from transformers import PreTrainedTokenizerFast\n\n\nclass Custom(PreTrainedTokenizerFast):\n    pass\n"
    (tmp_path / "policy" / "custom_tokenizer.py").write_text(code)
    config = json.loads((tmp_path / "policy" / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Custom", auto_map={"AutoTokenizer": [None, "custom_tokenizer.Custom"]})
    (tmp_path / "policy" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "policy" / "config.yaml").write_text("trust_remote_code: true\nbeta: 0.1\n")
    assert cli(["compare", "--policy", "policy", "--reference", "reference", "--limit", "1", *QUICK, "--out", "a"]) == 0


def test_prompt_files_json_lone_surrogates_and_a_capped_answer_length(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("model", tokenizer)
    common = ["--policy", "model", "--reference", "model", "--samples", "0"]
    # a lone surrogate (half an emoji): a traceback from the tokenizer before
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "a\\ud83db"}\n')
    line = refused([*common, "--prompts", "surrogate.jsonl", "--out", "a"], capsys)
    assert "row 1, column 'prompt': surrogate.jsonl: line 2's prompt: a lone surrogate '\\ud83d' at" in line
    # a .json file: an array of prompts or of {"prompt": ...} objects (read as lines of text before)
    prompts = [{"prompt": "next: 5 "}, "prev: 9 ", {"prompt": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert cli(["compare", *common, "--prompts", "prompts.json", "--max-new-tokens", "100", "--out", "b"]) == 0
    # the answer length is capped to a quarter of the context, and the output says so
    assert f"max_new_tokens 100 capped to {CONTEXT // 4}" in capsys.readouterr().out
    rows = json.loads((tmp_path / "b" / "compare.json").read_text())["rows"]
    assert [(row["name"], row["prompt"]) for row in rows] == [
        ("item 1", "next: 5 "), ("item 2", "prev: 9 "), ("item 3", json.dumps(prompts[2]["prompt"]))]  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(["fine", {"text": "no prompt field"}]))
    line = refused([*common, "--prompts", "bad.json", "--out", "c"], capsys)
    assert "row 1, column 'prompt': bad.json: item 2 has no 'prompt' field" in line


def test_model_output_cannot_break_the_markdown_table():
    text = "<script>alert(1)</script> a|b & c\r\nnext\rline\u2028sep\u2029par\x85nel"
    answer = Answer(text=text, tokens=3, reward=0.1)
    rows = [Row("html", "</td></tr></table>", 4, False, answer, answer)]
    table = markdown(rows, summary(rows), None, 0.1).split("|---|---|---|---|---|---|---|\n")[1]
    assert table.count("\n") == 1  # one line per row: no break of any kind left in it
    assert "<" not in table and ">" not in table and "&lt;script&gt;" in table and "&amp; c" in table
    assert table.count("|") - table.count("\\|") == 8  # the row's own 8 cell borders; the answers' pipes escaped


def test_prompt_files_read_as_json_lines_readers_read_them(tmp_path):
    # str.splitlines split at U+2028 (valid inside a JSON string) and other separators; a byte-order mark was
    # refused in JSON and kept in a prompt; an upper-case suffix read a JSON file as one text prompt per line
    from fastdpo.compare_io import read_prompts
    from fastdpo.errors import ConfigError, DataError

    lines = [json.dumps({"prompt": text}, ensure_ascii=False) for text in ("a\u2028b", "c\x0cd")]
    (tmp_path / "p.JSONL").write_text("\ufeff" + "\n".join(lines) + "\r\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.JSONL") == [("line 1", "a\u2028b"), ("line 2", "c\x0cd")]
    (tmp_path / "p.txt").write_text("\ufeffone\u2028still one\ntwo\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == [("line 1", "one\u2028still one"), ("line 2", "two")]
    (tmp_path / "p.md").write_text("one\n")
    with pytest.raises(ConfigError, match=r"unknown prompts file type '.md' — use .txt"):
        read_prompts(tmp_path / "p.md")
    # compressed, as the data files may be (it was 'unknown prompts file type .gz')
    import gzip

    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.JSONL").read_bytes()))
    assert read_prompts(tmp_path / "p.jsonl.gz") == [("line 1", "a\u2028b"), ("line 2", "c\x0cd")]
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"one\ntwo\n")[:-6])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: cannot decompress it as \.gz \(EOFError"):
        read_prompts(tmp_path / "cut.txt.gz")


def test_the_near_context_prompt_is_longer_than_the_context_in_tokens():
    # sized in characters it was 88% of a 512-token context under this tokenizer, never cut (README: "cut to fit")
    from fastdpo.compare_io import builtin_prompts

    tokenizer = build_tiny_tokenizer()
    for context in (64, 512, 2048):
        near = dict(builtin_prompts(context, tokenizer))["near the context length"]
        assert context < len(tokenizer(near)["input_ids"]) <= context + 32
    # capped: a 128k context's took 2 + samples full-context generations and scorings (hours on a CPU)
    near = dict(builtin_prompts(131072, tokenizer))["near the context length"]
    assert 4096 < len(tokenizer(near)["input_ids"]) <= 4096 + 32


def test_prompts_a_model_cannot_take_are_named_and_a_shorter_reference_context_is_kept():
    # an added token the models have no row for, a template that refuses a system message: an IndexError or a bare
    # TemplateError deep inside before; a reference of a shorter context took the policy's (an IndexError)
    from fastdpo.compare import compare
    from fastdpo.errors import DataError

    tokenizer = build_tiny_tokenizer()

    def model(context):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=context))  # fmt: skip

    policy, reference = model(64), model(32)
    rows = compare(policy, reference, tokenizer, [("long", "word " * 100)], samples=0, max_new_tokens=4)
    assert rows[0].truncated and rows[0].prompt_tokens <= 32 - 4 - 1  # the reference's context holds it all
    tokenizer.add_tokens(["<new_token>"])
    with pytest.raises(DataError, match=r"column 'prompt': added: token id 590 has no embedding in the models"):
        compare(policy, policy, tokenizer, [("added", "a <new_token> b")], samples=0, max_new_tokens=1)
    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "e", "chosen": "<new_token>", "rejected": "f"}]
    with pytest.raises(DataError, match=r"row 1, column 'chosen_ids': token id 590 in the pairs data"):
        pair_metrics(policy, policy, tokenizer, pairs)
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    said = r"column 'prompt': system only: the chat template refused it \(no system\)"
    with pytest.raises(DataError, match=said):
        compare(policy, policy, tokenizer, [("system only", [{"role": "system", "content": "x"}])], samples=0,
                max_new_tokens=1)  # fmt: skip
