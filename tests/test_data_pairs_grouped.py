"""build_pairs(group_by_prompt=True): rows of one response each (HelpSteer2's layout) grouped by prompt into pairs,
through the API and ``fastdpo data pairs --group-by-prompt``."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest

from fastdpo import cli
from fastdpo.data.pairs import build_pairs
from fastdpo.errors import ConfigError, DataError

# HelpSteer2-like rows: a prompt, one response and its ratings per row; `source` is the same within a prompt
ROWS = [
    {"prompt": "q1", "response": "a", "helpfulness": 3, "correctness": 2, "source": "s1"},
    {"prompt": "q2", "response": "b", "helpfulness": 2, "correctness": 2, "source": "s2"},  # q2's only row
    {"prompt": "q1", "response": "c", "helpfulness": 1, "correctness": 4, "source": "s1"},
    {"prompt": "q3", "response": "d", "helpfulness": 2, "correctness": 2, "source": "s3"},
    {"prompt": "q3", "response": "e", "helpfulness": 2, "correctness": 1, "source": "s3"},  # q3: a tie
    {"prompt": "q1", "response": "f", "helpfulness": 0, "correctness": 1, "source": "s1"},  # q1's worst, 2 rows on
    {"prompt": "q4", "response": "g", "helpfulness": 4, "correctness": 3, "source": "s4"},
    {"prompt": "q4", "response": " g ", "helpfulness": 1, "correctness": 0, "source": "s4"},  # repeats g: excluded
    {"prompt": "q5", "response": "h", "helpfulness": 4, "correctness": 3, "source": "s5"},
    {"prompt": "q5", "response": "i", "helpfulness": 1, "correctness": 0, "source": "s5"},
]
GROUPED = {"completions": "response", "scores": "helpfulness", "group_by_prompt": True}


def test_rows_of_one_prompt_make_its_pairs_and_name_their_rows():
    result = build_pairs(ROWS, **GROUPED)
    assert result.dataset == [
        {"prompt": "q1", "chosen": "a", "rejected": "f", "chosen_score": 3.0, "rejected_score": 0.0, "chosen_row": 0,
         "rejected_row": 5, "chosen_correctness": 2, "rejected_correctness": 1, "source": "s1"},
        {"prompt": "q5", "chosen": "h", "rejected": "i", "chosen_score": 4.0, "rejected_score": 1.0, "chosen_row": 8,
         "rejected_row": 9, "chosen_correctness": 3, "rejected_correctness": 0, "source": "s5"},
    ]  # fmt: skip
    # a group's drop counts each of its rows; q4 keeps one candidate after its repeat is excluded
    assert {reason: rows for reason, rows in result.dropped_rows.items() if rows} == {
        "too_few_completions": [1, 6, 7], "ties": [3, 4]}  # fmt: skip
    assert result.excluded_rows == {"blank": [], "repeated": [7]}
    assert result.summary() == ("best_vs_worst: 2 pairs from 10 rows; dropped 5 rows (too_few_completions 3, ties 2); "
                                "not candidates: 1 completion (repeated 1)")  # fmt: skip
    every = build_pairs(ROWS, strategy="all_above_margin", **GROUPED)
    assert [(r["chosen_row"], r["rejected_row"]) for r in every.dataset] == [(0, 2), (0, 5), (2, 5), (8, 9)]
    # a Dataset gives the same rows, typed as its columns (an empty result too)
    table = build_pairs(datasets.Dataset.from_list(ROWS), **GROUPED).dataset
    assert table.to_list() == result.dataset
    assert table.features["chosen_correctness"] == datasets.Value("int64")
    assert table.features["chosen_row"] == datasets.Value("int64")
    none = build_pairs(datasets.Dataset.from_list(ROWS[3:5]), **GROUPED).dataset
    assert len(none) == 0 and none.features["chosen"] == datasets.Value("string")


def test_message_prompts_group_by_their_messages_and_ranks_read_lowest_first():
    turn = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": turn, "answer": [{"role": "assistant", "content": "a"}], "rank": 2},
        {"prompt": [{"role": "user", "content": "hi "}], "answer": [{"role": "assistant", "content": "x"}], "rank": 1},
        {"prompt": turn, "answer": [{"role": "assistant", "content": "b"}], "rank": 1},  # best of "hi"
        {"prompt": "hi", "answer": "c", "rank": 1},  # text, not the messages above: its own group
    ]
    result = build_pairs(rows, completions="answer", scores="rank", lower_is_better=True, group_by_prompt=True)
    assert [(r["chosen_row"], r["rejected_row"], r["chosen"][0]["content"]) for r in result.dataset] == [(2, 0, "b")]
    assert result.dropped_rows["too_few_completions"] == [1, 3]


def test_grouping_refuses_what_it_cannot_read():
    with pytest.raises(DataError, match=r"row 1, column 'completions': grouped by prompt \(group_by_prompt=True\), a "
                                        r"row holds one response; this one holds a list of 2"):  # fmt: skip
        build_pairs([{"prompt": "q", "completions": "a", "scores": 1},
                     {"prompt": "q", "completions": ["a", "b"], "scores": 2}], group_by_prompt=True)  # fmt: skip
    with pytest.raises(DataError, match=r"row 0, column 'response': .*got a dict \(keys: text\)"):
        build_pairs([{"prompt": "q", "response": {"text": "a"}, "s": 1}], completions="response", scores="s",
                    group_by_prompt=True)  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"option 'response_key': grouped by prompt \(group_by_prompt=True\), each row"
    ):
        build_pairs(ROWS, response_key="text", **GROUPED)
    clash = [{**row, "chosen_correctness": 0} for row in ROWS]  # (correctness differs within a prompt)
    with pytest.raises(DataError, match=r"column 'chosen_correctness': the column 'correctness' differs between rows "
                                        r"of one prompt, so it is carried as chosen_correctness"):  # fmt: skip
        build_pairs(clash, **GROUPED)
    with pytest.raises(DataError, match="already has this output column"):
        build_pairs([{**row, "chosen_row": 1} for row in ROWS], **GROUPED)
    # without the option, a column of strings is said to be groupable
    with pytest.raises(DataError, match=r"expected a list of completions, got str — .* grouped by prompt with "
                                        r"group_by_prompt=True"):  # fmt: skip
        build_pairs(ROWS, completions="response", scores="helpfulness")


def test_the_command_groups_and_speaks_its_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rated.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    argv = ["data", "pairs", "rated.jsonl", "out.jsonl", "--completions", "response", "--scores", "helpfulness"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 2
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert said.endswith("grouped by prompt with --group-by-prompt; an oasst message tree's with --tree)"), said
        assert cli.main([*argv, "--group-by-prompt"]) == 0
    assert capsys.readouterr().out.startswith("best_vs_worst: 2 pairs from 10 rows; dropped 5 rows")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == build_pairs(ROWS, **GROUPED).dataset
    dropped = json.loads((tmp_path / ".out.jsonl.dropped.json").read_text())
    assert dropped["dropped_rows"]["ties"] == [3, 4] and dropped["excluded_rows"]["repeated"] == [7]


def test_a_bad_row_is_dropped_alone_and_nan_columns_are_carried_whole():
    # one row's bad score or response dropped its prompt's other rows with it, all under its reason (the good rows
    # listed as bad_completions); a column NaN in every row of a prompt was carried per side (NaN != NaN)
    nan = float("nan")
    rows = [{"prompt": "q1", "response": "a", "s": 2, "n": nan}, {"prompt": "q1", "response": "b", "s": None, "n": nan},
            {"prompt": "q1", "response": "c", "s": 0, "n": nan}, {"prompt": "q2", "response": [], "s": 1, "n": 1.0},
            {"prompt": "q2", "response": "d", "s": 3, "n": 1.0},
            {"prompt": "q2", "response": "e", "s": 1, "n": 1.0}]  # fmt: skip
    result = build_pairs(rows, completions="response", scores="s", group_by_prompt=True)
    assert [(r["chosen_row"], r["rejected_row"]) for r in result.dataset] == [(0, 2), (4, 5)]
    assert {reason: rows for reason, rows in result.dropped_rows.items() if rows} == {
        "bad_scores": [1],
        "bad_completions": [3],
    }
    assert "chosen_n" not in result.dataset[0] and result.dataset[1]["n"] == 1.0


def test_the_commands_flags_stand_for_every_keyword_and_only_in_pairs_errors(tmp_path, monkeypatch, capsys):
    # the ConfigError of --response-key with --group-by-prompt kept Python's words; the rewrite of build_pairs'
    # keywords ran over every command's errors: a folder named completions=4 came out as --completions4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rated.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (tmp_path / "completions=4").mkdir()
    (tmp_path / "completions=4" / "rows.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flags = ["--completions", "response", "--scores", "helpfulness", "--group-by-prompt", "--response-key", "x"]
        assert cli.main(["data", "pairs", "rated.jsonl", "out.jsonl", *flags]) == 2
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert said == ("fastdpo: error: option '--response-key': grouped by prompt (--group-by-prompt), each row "
                        "gives one response and one score, from columns — leave --response-key and --score-key out; "
                        "name the columns with --completions and --scores"), said  # fmt: skip
        assert cli.main(["data", "check", "completions=4/rows.jsonl", "--split", "test"]) == 2
        assert "completions=4/rows.jsonl is one file" in capsys.readouterr().err


def test_a_group_key_names_a_column_of_the_data_and_one_prompt_a_group():
    # a misspelt key grouped every row into one (a list's missing column reads None), or failed in datasets' words;
    # rows of one key under two prompts paired a response under the other's prompt
    rows = [{"prompt": "p1", "response": " a", "score": 1, "g": 1}, {"prompt": "p1", "response": " b", "score": 2,
            "g": 1}, {"prompt": "p2", "response": " c", "score": 3, "g": 2}]  # fmt: skip
    grouped = {"completions": "response", "scores": "score", "group_by_prompt": True}
    for data in (rows, datasets.Dataset.from_list(rows)):
        with pytest.raises(DataError, match="column 'gg': column not found"):
            build_pairs(data, **grouped, group_key="gg")
    with pytest.raises(ConfigError, match="option 'group_key': groups rows of one response each"):
        build_pairs(rows, completions="response", scores="score", group_key="g")
    mixed = [*rows, {"prompt": "p3", "response": " d", "score": 0, "g": 2}]
    with pytest.raises(DataError, match="row 3, column 'prompt': its prompt is not that of row 2, of the same 'g'"):
        build_pairs(mixed, **grouped, group_key="g")
    assert [(pair["chosen_row"], pair["rejected_row"]) for pair in build_pairs(rows, **grouped, group_key="g").dataset
            ] == [(1, 0)]  # fmt: skip
