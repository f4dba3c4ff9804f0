"""The preference quality report: every dirty row found once with its reason, filters, where, JSON and markdown."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.quality import REASONS, QualityReport, check_preferences
from fastdpo.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_REASONS = {"prompt_fills_max_length", "will_be_truncated", "chat_template_error"}
datasets.disable_progress_bars()


def load_rows(name: str) -> list[dict]:
    with open(FIXTURES / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reasons_by_row(report: QualityReport) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {i: set() for i in range(report.num_rows)}
    for reason, rows in report.rows.items():
        for row in rows:
            found[row].add(reason)
    return found


def expected(rows: list[dict], *, with_tokenizer: bool = True) -> dict[int, set[str]]:
    out = {}
    for i, row in enumerate(rows):
        reason = row["expect"]
        skip = reason == "clean" or (reason in TOKENIZER_REASONS and not with_tokenizer)
        out[i] = set() if skip else {reason}
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def standard_rows():
    return load_rows("dirty_preferences.jsonl")


@pytest.fixture(scope="module")
def conversation_rows():
    return load_rows("dirty_conversations.jsonl")


def check_standard(rows, tokenizer=None):
    # Clean rows reach at most 37 tokens with the tiny tokenizer; the long prompt has 89, the long pair 61
    return check_preferences(rows, tokenizer, max_length=48 if tokenizer else None, min_score_margin=1.0)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair(prompt="Name a color.", chosen="Blue is a color.", rejected="Green is one.", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


# --------------------------------------------------------------------------------------------- the dirty fixtures


def test_fixture_holds_lone_surrogates_and_nan(standard_rows):
    # JSON escapes load as lone surrogates in Python, and json accepts NaN: the fixture really is that dirty
    assert any("\ud800" in str(row.get("rejected")) for row in standard_rows)
    assert any(isinstance(row.get("rejected"), float) and math.isnan(row["rejected"]) for row in standard_rows)


def test_every_standard_problem_found_exactly_once(standard_rows, tokenizer):
    report = check_standard(standard_rows, tokenizer)
    assert reasons_by_row(report) == expected(standard_rows)
    for row, notes in report.details.items():
        assert len(notes) == 1, (row, notes)  # one problem per row in this fixture, reported once
    assert report.format == "standard"
    assert report.dataset_warnings == []
    expected_reasons = {row["expect"] for row in standard_rows} - {"clean"}
    assert set(report.counts) == expected_reasons
    assert report.details[4] == ["column 'chosen': missing_field (None)"]
    assert report.details[5] == ["column 'prompt': missing_field (absent)"]
    assert report.details[15] == ["duplicate (of row 0)"]


def test_every_conversation_problem_found_exactly_once(conversation_rows, tokenizer):
    report = check_preferences(conversation_rows, tokenizer, max_length=512)
    assert reasons_by_row(report) == expected(conversation_rows)
    assert all(len(notes) == 1 for notes in report.details.values())
    assert report.format == "conversational"
    assert report.dataset_warnings == []


def test_without_tokenizer_the_token_reasons_are_absent(standard_rows, conversation_rows):
    assert reasons_by_row(check_standard(standard_rows)) == expected(standard_rows, with_tokenizer=False)
    report = check_preferences(conversation_rows)
    assert reasons_by_row(report) == expected(conversation_rows, with_tokenizer=False)
    assert "tokens" not in report.length_stats


@pytest.mark.parametrize("name", ["dirty_preferences.jsonl", "dirty_conversations.jsonl"])
def test_filter_keeps_clean_and_warn_only_rows(name, tokenizer):
    rows = load_rows(name)
    report = check_standard(rows, tokenizer) if name == "dirty_preferences.jsonl" else check_preferences(rows)
    kept, dropped = report.filter(rows)
    if name == "dirty_preferences.jsonl":
        keep = [r for r in rows if r["expect"] == "clean" or REASONS[r["expect"]][0] == "warn"]
    else:
        keep = [r for r in rows if r["expect"] in ("clean", "chat_template_error")]  # no tokenizer: no template
    assert [r["expect"] for r in kept] == [r["expect"] for r in keep]
    assert kept == keep
    assert sum(dropped.values()) == len(rows) - len(kept)
    assert dropped == dict(Counter(r["expect"] for r in rows if r not in keep))


def test_filter_by_warn_reasons_and_drop_rows(standard_rows):
    report = check_standard(standard_rows)
    ties = [i for i, r in enumerate(standard_rows) if r["expect"] == "tie"]
    assert report.drop_rows("tie") == ties
    kept, dropped = report.filter(standard_rows, reasons=["tie", "duplicate"])
    assert dropped == {"duplicate": 1, "tie": 2}
    assert len(kept) == len(standard_rows) - 3
    assert report.drop_rows() == sorted(
        i for i, r in enumerate(standard_rows) if r["expect"] != "clean" and REASONS[r["expect"]][0] == "drop"
        and r["expect"] not in TOKENIZER_REASONS
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- precedence


def test_one_row_with_several_problems_gets_each_once():
    rows = [pair(prompt=None, chosen="", rejected=None), pair(prompt=[user("hi")], chosen=5, rejected=b"bytes")]
    report = check_preferences(rows)
    assert report.details[0] == [
        "column 'prompt': missing_field (None)",
        "column 'chosen': empty",
        "column 'rejected': missing_field (None)",
    ]
    assert report.counts == {"missing_field": 1, "not_text": 1, "empty": 1}
    assert report.details[1] == ["column 'chosen': not_text (int)", "column 'rejected': not_text (bytes)"]


def test_invalid_rows_get_no_pair_or_length_findings():
    rows = [
        pair(chosen=None, rejected="x" * 100, status="tie"),  # no identical/length_ratio, but the status is a tie
        pair(),
        pair(),  # a later copy: duplicate only, not contradictory, not tie
        pair(chosen="Green is one.", rejected="Blue is a color."),
        pair(chosen="Red.", rejected="Red."),  # identical, not length_ratio
    ]
    rows[2]["status"] = "tie"
    report = check_preferences(rows)
    assert reasons_by_row(report) == {
        0: {"missing_field", "tie"},
        1: {"contradictory"},
        2: {"duplicate"},
        3: {"contradictory"},
        4: {"identical"},
    }


def test_tie_wins_over_small_margin_and_unreadable_scores_are_counted():
    rows = [
        pair(chosen_score=5, rejected_score=4.5, status="TIE "),
        pair(chosen="A", rejected="B", chosen_score=5, rejected_score=5),
        pair(chosen="C", rejected="D", chosen_score=3, rejected_score=4),
        pair(chosen="E", rejected="F", chosen_score=float("nan"), rejected_score=4),
        pair(chosen="G", rejected="H", chosen_score=True, rejected_score=True),
        pair(chosen="I", rejected="J", chosen_score=float("inf"), rejected_score=2),  # (it passed as a score)
    ]
    report = check_preferences(rows, min_score_margin=0.5)
    # NaN, infinities and booleans are no scores: counted (a warning), and neither a tie nor a margin
    assert report.rows == {"tie": [0, 1], "small_score_margin": [2], "bad_score": [3, 4, 5]}
    assert report.details[2] == ["small_score_margin (3 - 4 < 0.5)"]
    assert report.details[4] == ["column 'chosen_score': bad_score (True)", "column 'rejected_score': bad_score (True)"]
    assert check_preferences(rows).rows == {"tie": [0, 1], "bad_score": [3, 4, 5]}


def test_control_characters_and_whitespace():
    rows = [
        pair(chosen="tab\tnew\nline\r ok"),
        pair(chosen="bell\x07"),
        pair(chosen="c1\x85"),
        pair(chosen="\u200b zero width space is printable text"),
        pair(chosen="\x0b"),
    ]
    report = check_preferences(rows)
    assert report.rows == {"empty": [4], "invalid_text": [1, 2]}


def test_message_shapes():
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    question, answers = [user("Q")], {"chosen": [assistant("A")], "rejected": [assistant("B")]}
    rows = [
        pair(prompt=[user("Q"), call, {"role": "tool", "content": "42"}], **answers),  # a tool call has no content
        pair(prompt=question, chosen=[assistant("A")], rejected=[assistant("B"), {"role": "user"}]),
        pair(prompt=[{"role": "system", "content": "S"}], **answers),
        pair(prompt=[user(" ")], **answers),
        pair(prompt=question, chosen=[assistant("A"), "text"], rejected=[assistant("B")]),
        pair(prompt=question, chosen=[assistant("A")], rejected=[{"role": "assistant", "content": [{"text": "B"}]}]),
        # text parts (as multimodal formats write text) and the roles templates render (developer, ipython): fine
        pair(prompt=[{"role": "developer", "content": "Be brief."}, user([{"type": "text", "text": "Q"}])],
             chosen=[assistant([{"type": "text", "text": "A"}])], rejected=[assistant("B")]),
        pair(prompt=[user("Q"), {"role": "ipython", "content": "42"}], **answers),
        pair(prompt=question, chosen=[assistant([{"type": "image", "url": "x.png"}])], rejected=[assistant("B")]),
        pair(prompt=question, chosen=[assistant([{"type": "text", "text": " "}])], rejected=[assistant("B")]),
    ]  # fmt: skip
    report = check_preferences(rows)
    assert reasons_by_row(report) == {
        0: set(),
        1: {"bad_message"},
        2: {"roles_out_of_order"},
        3: {"empty"},
        4: {"not_text"},
        5: {"bad_message"},
        6: set(),
        7: set(),
        8: {"bad_message"},
        9: {"empty"},
    }
    assert report.details[1] == ["column 'rejected': bad_message (message 1: no content)"]
    assert report.details[5] == [
        "column 'rejected': bad_message (message 0: content is a list with a part of no 'type')"
    ]
    assert report.details[8] == [
        "column 'chosen': bad_message (message 0: content is a list with a 'image' part (text parts only))"
    ]


def test_majority_format_decides_mixed_rows():
    conversation = pair(prompt=[user("Q")], chosen=[assistant("A")], rejected=[assistant("B")])
    rows = [pair(chosen="one", rejected="two"), conversation, conversation | {"chosen": [assistant("C")]}]
    report = check_preferences(rows)
    assert report.format == "conversational"
    assert report.rows == {"mixed_format": [0]}
    tied = check_preferences(rows[:2])  # one each: the first row's format wins, as prepare_preferences detects
    assert tied.format == "standard"
    assert tied.rows == {"mixed_format": [1]}


def test_no_prompt_column_checks_the_completions_alone():
    rows = [
        {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]},
        {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("A")]},
    ]
    report = check_preferences(rows)
    assert report.rows == {"identical": [1]}
    assert [w.split(":")[0] for w in report.dataset_warnings] == ["no_prompt_column"]
    assert "prompt" not in report.length_stats["chars"]


def test_pairs_that_differ_in_whitespace_only_are_identical():
    rows = [{"prompt": "p", "chosen": "Hello!\n", "rejected": "Hello!"}, {"prompt": "p", "chosen": "a\r\nb",
             "rejected": "a\nb"}, {"prompt": "p", "chosen": "a b", "rejected": "ab"},  # (not whitespace only)
            {"prompt": "p", "chosen": "Bye.  ", "rejected": "Bye."}]  # fmt: skip
    report = check_preferences(rows)
    assert report.rows == {"identical": [0, 1, 3]}
    assert report.to_dict()["details"]["0"] == ["identical (they differ in whitespace only)"]
    chats = [{"prompt": [user("Q")], "chosen": [assistant("A. ")], "rejected": [assistant("A.")]}]
    assert check_preferences(chats).rows == {"identical": [0]}
    # whitespace that means something: indentation, a newline against a space, a blank line
    meaningful = [("def f():\n    return 1", "def f():\nreturn 1"), ("- apple\n- pear", "- apple - pear"),
                  ("a\n\nb", "a\nb"), ("x  \ny", "x\n  y")]  # fmt: skip
    assert check_preferences([{"prompt": "p", "chosen": a, "rejected": b} for a, b in meaningful]).rows == {}


# --------------------------------------------------------------------------------------------- lengths and tokens


def test_length_bias_and_length_stats():
    rows = [pair(prompt=f"Question {i}?", chosen="a long answer " * (1 + i % 2), rejected="short") for i in range(10)]
    report = check_preferences(rows, length_ratio_warn=None)
    assert report.counts == {}
    assert report.length_bias["chosen_longer_fraction"] == 1.0
    assert report.length_bias["mean_rejected_chars"] == 5.0
    assert [w.split(":")[0] for w in report.dataset_warnings] == ["length_bias"]
    chosen = report.length_stats["chars"]["chosen"]
    assert (chosen["min"], chosen["max"], chosen["mean"], chosen["median"]) == (14, 28, 21.0, 21.0)
    assert sum(chosen["histogram"]["counts"]) == 10
    assert len(chosen["histogram"]["bin_edges"]) == len(chosen["histogram"]["counts"]) + 1
    balanced = rows + [pair(prompt=f"Other {i}?", chosen="short", rejected="a long answer") for i in range(10)]
    assert check_preferences(balanced, length_ratio_warn=None).dataset_warnings == []
    # a bias fair coins would give often is no finding: one pair (0% of 1 was warned of), 7 of 7; 8 of 8 is
    for count, warned in ((1, False), (7, False), (8, True)):
        report = check_preferences(rows[:count], length_ratio_warn=None)
        assert bool(report.dataset_warnings) == warned, count
        assert report.length_bias["chosen_longer_fraction"] == 1.0  # (still measured)


def test_token_counts_follow_the_documented_formula(standard_rows, conversation_rows, tokenizer):
    report = check_standard(standard_rows, tokenizer)
    valid = [
        r for r in standard_rows
        if r["expect"] in ("clean", "prompt_fills_max_length") or REASONS[r["expect"]][0] == "warn"
    ]  # fmt: skip
    prompts = [len(tokenizer(r["prompt"]).input_ids) for r in valid]
    chosen = [len(tokenizer(r["chosen"], add_special_tokens=False).input_ids) + 1 for r in valid]  # + EOS
    stats = report.length_stats["tokens"]
    assert (stats["prompt"]["min"], stats["prompt"]["max"]) == (min(prompts), max(prompts))
    assert (stats["chosen"]["min"], stats["chosen"]["max"]) == (min(chosen), max(chosen))

    report = check_preferences(conversation_rows, tokenizer)
    clean = [r for r in conversation_rows if r["expect"] == "clean"]
    prompts = [
        len(
            tokenizer.apply_chat_template(
                r["prompt"], tools=json.loads(r.get("tools") or "null"), tokenize=True, return_dict=True,
                add_generation_prompt=True,
            )["input_ids"]
        )
        for r in clean
    ]  # fmt: skip
    stats = report.length_stats["tokens"]["prompt"]
    assert (stats["min"], stats["max"]) == (min(prompts), max(prompts))
    assert report.length_stats["pairs"] == 3  # the two clean rows and the one whose tools do not parse


def test_prompt_token_counts_render_tool_calls_without_arrows_null_arguments(tmp_path):
    import pyarrow
    import pyarrow.parquet
    from test_data_formats import TOOL_TEMPLATE

    from fastdpo.data.formats import prepare_preferences

    def turns(question, name, arguments):  # a prompt that already holds a tool call and its result
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        return [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "done"}, {"role": "user", "content": "So?"}]  # fmt: skip

    prompts = [turns("Weather?", "weather", {"city": "Paris"}), turns("Cats?", "search", {"query": "cats", "n": 3})]
    pairs = [{"prompt": p, "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No."}]} for p in prompts]  # fmt: skip
    path = tmp_path / "calls.parquet"  # (Arrow gives both calls city, query and n, None-filled)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(pairs), path)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    expected = [len(tokenizer.apply_chat_template(p, tokenize=True, return_dict=True, add_generation_prompt=True)
                    ["input_ids"]) for p in prompts]  # fmt: skip
    assert expected[0] != expected[1]
    stats = check_preferences(prepare_preferences(path), tokenizer).length_stats["tokens"]["prompt"]
    assert (stats["min"], stats["max"]) == (min(expected), max(expected))  # with "query": null they were longer


def test_chat_template_errors_are_rows_not_exceptions(tokenizer):
    rows = [
        pair(prompt=[user("Q")], chosen=[assistant("A")], rejected=[assistant("B")], tools="not json"),
        pair(prompt=[user("Q2")], chosen=[assistant("A")], rejected=[assistant("B")], chat_template_kwargs=[1]),
    ]
    report = check_preferences(rows, tokenizer, max_length=4)
    assert report.rows == {"chat_template_error": [0, 1]}
    assert report.details == {  # each names the column that failed
        0: ["column 'tools': chat_template_error (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"],
        1: ["column 'chat_template_kwargs': chat_template_error (TypeError: 'list' object is not a mapping)"],
    }
    assert report.length_stats["tokens"] == {}  # no row could be rendered


def test_max_length_boundaries(tokenizer):
    row = pair(prompt="What color is the sky?", chosen="The sky is blue.", rejected="Green.")
    prompt = len(tokenizer(row["prompt"]).input_ids)
    longest = (
        prompt + 1 + max(len(tokenizer(row[c], add_special_tokens=False).input_ids) for c in ("chosen", "rejected"))
    )
    assert check_preferences([row], tokenizer, max_length=prompt).rows == {"prompt_fills_max_length": [0]}
    assert check_preferences([row], tokenizer, max_length=prompt + 1).rows == {"will_be_truncated": [0]}
    assert check_preferences([row], tokenizer, max_length=longest - 1).rows == {"will_be_truncated": [0]}
    assert check_preferences([row], tokenizer, max_length=longest).rows == {}
    assert check_preferences([row], tokenizer).rows == {}  # no max_length: token statistics only


# --------------------------------------------------------------------------------------------- input kinds


def arrow_rows() -> list[dict]:
    return [
        pair(chosen_score=9.0, rejected_score=2.0, status="ok"),
        pair(prompt="Q2", chosen=None, chosen_score=8.0, rejected_score=8.0, status=None),
        pair(prompt="Q3", chosen="  ", chosen_score=None, rejected_score=1.0, status="tie"),
        pair(chosen_score=9.0, rejected_score=2.0, status="ok"),
        pair(chosen="Green is one.", rejected="Blue is a color.", chosen_score=3.0, rejected_score=2.5, status="ok"),
        pair(prompt="Q6", chosen="Red\x00", chosen_score=7.0, rejected_score=1.0, status="ok"),
        pair(prompt="Q7", chosen="Same", rejected="Same", chosen_score=6.0, rejected_score=1.0, status="ok"),
        pair(prompt="Q8", chosen="A very very long answer indeed", rejected="No", chosen_score=8.0, rejected_score=1.0),
    ]


def test_dataset_and_list_give_the_same_report():
    rows = arrow_rows()
    from_list = check_preferences(rows, min_score_margin=1.0)
    dataset = datasets.Dataset.from_list(rows)
    assert check_preferences(dataset, min_score_margin=1.0) == from_list
    assert from_list.rows == {
        "missing_field": [1],
        "empty": [2],
        "invalid_text": [5],
        "identical": [6],
        "duplicate": [3],
        "contradictory": [0, 4],
        "tie": [1, 2],
        "small_score_margin": [4],
        "length_ratio": [7],
    }
    # a selected (index-mapped) Dataset reads the selected rows
    unused = pair(prompt="unused", chosen_score=None, rejected_score=None, status=None)
    selected = datasets.Dataset.from_list([unused, *rows, unused]).select(range(1, len(rows) + 1))
    assert check_preferences(selected, min_score_margin=1.0) == from_list


def test_conversations_read_the_same_from_arrow(conversation_rows, tokenizer):
    # Arrow gives every message every key (tool_calls: None, ...): duplicates and tool calls must still be seen
    rows = [conversation_rows[i] for i in (1, 0, 13, 12, 9)]  # the row with tools first: from_list takes its keys
    dataset = datasets.Dataset.from_list(rows)
    assert dataset[1]["prompt"][0]["tool_calls"] is None
    report = check_preferences(rows, tokenizer, max_length=512)
    assert check_preferences(dataset, tokenizer, max_length=512) == report
    assert report.rows == {"roles_out_of_order": [4], "identical": [3], "duplicate": [2]}


def test_filter_on_a_dataset_returns_a_dataset():
    dataset = datasets.Dataset.from_list(arrow_rows())
    report = check_preferences(dataset)
    kept, dropped = report.filter(dataset)
    assert isinstance(kept, datasets.Dataset)
    assert kept["prompt"] == ["Name a color.", "Name a color.", "Q8"]
    assert dropped == {"missing_field": 1, "empty": 1, "invalid_text": 1, "identical": 1, "duplicate": 1}
    kept, dropped = report.filter(dataset, where="chosen_score >= 8.5")
    assert kept["chosen_score"] == [9.0]
    assert dropped["where"] == 2
    kept, dropped = report.filter(dataset, where=lambda row: row["prompt"] == "Q8")
    assert kept["prompt"] == ["Q8"]
    assert dropped["where"] == 2


def test_where_strings_and_callables():
    rows = [
        pair(chosen_score=9, status="ok"),
        pair(prompt="Q2", chosen_score=7.5, status="tie"),
        pair(prompt="Q3", chosen_score=None, status=None),
        pair(prompt="Q4", chosen_score="8", status="ok"),
        pair(prompt="Q5", chosen_score="high", status="ok"),
    ]
    report = check_preferences(rows)

    def prompts(where):
        kept, dropped = report.filter(rows, reasons=[], where=where)
        assert dropped == {"where": len(rows) - len(kept)}
        return [r["prompt"] for r in kept]

    assert prompts("chosen_score >= 8") == ["Name a color.", "Q4"]
    assert prompts("chosen_score<8") == ["Q2"]
    # None (and a value no number compares with) fails every predicate but !=: it is not the value, so README's
    # where="status != tie" keeps a row without a status (it dropped every such row)
    assert prompts("status != tie") == ["Name a color.", "Q3", "Q4", "Q5"]
    assert prompts("chosen_score != 8") == ["Name a color.", "Q2", "Q3", "Q5"]
    assert prompts("status == 'tie'") == ["Q2"]
    assert prompts('prompt == "Q3"') == ["Q3"]
    # an unquoted None/null is the missing value (it compared the text 'None' and matched no row); quoted, the text
    assert prompts("status == null") == ["Q3"]
    assert prompts("chosen_score == None") == ["Q3"]
    assert prompts("status != NULL") == ["Name a color.", "Q2", "Q4", "Q5"]
    assert prompts("status == 'None'") == []
    assert prompts(lambda row: row["prompt"].startswith("Q")) == ["Q2", "Q3", "Q4", "Q5"]
    # a boolean column against JSON's and YAML's true/false (KTO's label == true matched no row: 'True' != 'true')
    flagged = [{**row, "flag": flag} for row, flag in zip(rows, [True, False, None, True, "true"], strict=True)]
    assert [r["prompt"] for r in report.filter(flagged, reasons=[], where="flag == true")[0]] == [
        "Name a color.",
        "Q4",
        "Q5",
    ]
    assert [r["prompt"] for r in report.filter(flagged, reasons=[], where="flag == FALSE")[0]] == ["Q2"]
    with pytest.raises(DataError, match=r"column 'chosen_scor': unknown column in where — did you mean 'chosen_score'"):
        report.filter(rows, where="chosen_scor >= 8")
    with pytest.raises(DataError, match=r"cannot read where='chosen_score 8'"):
        report.filter(rows, where="chosen_score 8")
    # an ordering needs a number: '8,5' compared as text kept 9 and dropped 10 and 12; a doubled operator read as '>'
    with pytest.raises(DataError, match=r"'8,5' is not a number, and >= compares numbers — write a number \(8.5"):
        report.filter(rows, where="chosen_score >= 8,5")
    with pytest.raises(DataError, match=r"'>>=' is not an operator"):
        report.filter(rows, where="chosen_score >>= 8")


def test_bad_check_options_are_config_errors(standard_rows):
    with pytest.raises(ConfigError, match="option 'max_length': must be a number ≥ 1 or None, got 0"):
        check_preferences(standard_rows, max_length=0)
    with pytest.raises(ConfigError, match="option 'min_score_margin': must be a number or None, got '1'"):
        check_preferences(standard_rows, min_score_margin="1")


def test_unknown_reason_names_the_close_match(standard_rows):
    report = check_standard(standard_rows)
    with pytest.raises(DataError, match=r"unknown reason 'duplicat' — did you mean 'duplicate'\?"):
        report.filter(standard_rows, reasons=["duplicat"])
    with pytest.raises(DataError, match=r"unknown reason 'dup'"):
        report.drop_rows(["dup"])
    with pytest.raises(DataError, match=r"'length_bias' is about the whole dataset"):
        report.drop_rows("length_bias")
    with pytest.raises(DataError, match=r"the report is for 26 rows, this dataset has 3"):
        report.filter(standard_rows[:3])


def test_missing_column_is_an_error_with_the_close_match():
    with pytest.raises(DataError, match=r"column 'chosen': column not found — did you mean 'choosen'\?"):
        check_preferences([{"prompt": "Q", "choosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"column 'rejected': column not found"):
        check_preferences(datasets.Dataset.from_list([{"prompt": "Q", "chosen": "A"}]))
    with pytest.raises(DataError, match=r"cannot check a str"):
        check_preferences("data.jsonl")


@pytest.mark.parametrize("empty", [[], datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})])
def test_empty_dataset_is_a_report(empty):
    report = check_preferences(empty, build_tiny_tokenizer(), max_length=8)
    assert (report.num_rows, report.counts, report.details) == (0, {}, {})
    assert [w.split(":")[0] for w in report.dataset_warnings] == ["empty_dataset"]
    assert report.length_bias is None
    kept, dropped = report.filter(empty)
    assert (len(kept), dropped) == (0, {})
    assert "empty_dataset" in report.to_markdown()


# --------------------------------------------------------------------------------------------- output


def test_to_json_round_trips(standard_rows, tokenizer):
    report = check_standard(standard_rows, tokenizer)
    loaded = json.loads(report.to_json())
    assert loaded["num_rows"] == 26
    assert loaded["counts"] == report.counts
    assert loaded["rows"] == report.rows
    assert loaded["severity"] == report.severity
    assert {int(k): v for k, v in loaded["details"].items()} == report.details
    assert loaded["length_stats"] == report.length_stats
    assert loaded["length_bias"] == report.length_bias
    report.to_json().encode("utf-8")  # row 13's lone surrogate is only named in its note: the JSON stays UTF-8


def test_to_markdown_lists_every_reason(standard_rows, conversation_rows, tokenizer):
    for report in (check_standard(standard_rows, tokenizer), check_preferences(conversation_rows, tokenizer)):
        text = report.to_markdown()
        assert text.startswith("# Preference data quality")
        for reason, count in report.counts.items():
            assert f"| {reason} | {report.severity[reason]} | {count} |" in text
        assert "| chosen | tokens |" in text
        assert "## Dataset warnings" in text
    assert "No row has a problem." in check_preferences([pair()]).to_markdown()


def test_a_run_drops_the_rows_preparation_refuses_as_its_data_filter_drops_the_others(tmp_path, caplog):
    # an empty or whitespace answer is a drop reason of the report, but preparation refused the row first: under
    # data_filter: drop (the default) `fastdpo dpo` stopped at it, where README says such rows are dropped and counted
    import logging

    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits as _loaded_splits

    rows = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(8)]
    rows[2]["chosen"], rows[5]["rejected"], rows[6]["rejected"] = "", "   ", rows[6]["chosen"]  # (6: identical)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        train, _, files = _loaded_splits("dpo", RunArguments(dataset_name=str(path)), 0)
    assert train["prompt"] == [rows[i]["prompt"] for i in (0, 1, 3, 4, 7)]
    assert json.loads(files["data_quality.json"])["removed"] == {"empty": 2, "identical": 1}
    assert any("train split: dropped 2 rows the preparation refuses: {'empty': 2} (rows 2, 5)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    with pytest.raises(DataError, match="row 2, column 'chosen': is empty"):  # data_filter: none keeps every row
        _loaded_splits("dpo", RunArguments(dataset_name=str(path), data_filter="none"), 0)
    (tmp_path / "empty.jsonl").write_text(json.dumps({**rows[0], "chosen": ""}) + "\n")
    with pytest.raises(DataError, match=r"every row is refused for a reason the quality check drops \({'empty': 1}\)"):
        _loaded_splits("dpo", RunArguments(dataset_name=str(tmp_path / "empty.jsonl")), 0)
    rows[3]["system"] = 7  # refused for a reason the report does not drop: the run stops at it, by its file row
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match="row 3, column 'system'"):
        _loaded_splits("dpo", RunArguments(dataset_name=str(path)), 0)


def test_answers_that_differ_in_non_ascii_whitespace_only_are_identical():
    # a no-break or ideographic space at the end: squeezed alike, but the quick count left them out, so the pair
    # passed as two answers (build_pairs already called them repeated)
    rows = [{"prompt": "Capital?", "chosen": "Paris." + space, "rejected": "Paris."} for space in ("\u00a0", "\u3000")]
    assert check_preferences(rows).rows == {"identical": [0, 1]}
