"""build_pairs: rated completions → preference pairs (split_by_prompt: tests/test_data_split.py)."""

from __future__ import annotations

import datasets
import pytest

from fastdpo.data.pairs import build_pairs
from fastdpo.errors import ConfigError, DataError

NAN = float("nan")
# (prompt, completions, scores); the comment says what best_vs_worst must make of the row
ROWS = [
    ("p0", ["a", "b", "c"], [3, 1, 2]),  # a > b
    ("p1", ["d", "e", "f", "g"], [5, 5, 2, 2]),  # d > f: the first of the tied best and of the tied worst
    ("p2", ["h", "i"], [4, 4]),  # ties
    ("p3", ["j"], [1]),  # too_few_completions
    ("p4", ["k", "l"], [1, None]),  # bad_scores: None
    ("p5", ["m", "n"], [1]),  # bad_scores: one score for two completions
    ("p6", ["o", "p", "q"], [1.0, 2.5, NAN]),  # bad_scores: NaN
    ("p7", ["r", "s", "t"], [2, 9, 7]),  # s > r
    ("p8", ["u", "v"], [1.0, 2.0]),  # v > u, a difference of 1 only
]
NO_DROPS = {"bad_prompt": [], "too_few_completions": [], "bad_scores": [], "bad_completions": [], "ties": [],
            "below_margin": []}  # fmt: skip


def rated_rows() -> list[dict]:
    return [
        {"prompt": p, "completions": c, "scores": s, "source": f"src{i}", "lang": "en"}
        for i, (p, c, s) in enumerate(ROWS)
    ]


def pairs_of(dataset) -> list[tuple]:
    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else dataset
    return [(r["source_row"], r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows]


def test_best_vs_worst_pairs_and_counted_drops():
    result = build_pairs(rated_rows())
    assert pairs_of(result.dataset) == [
        (0, "a", "b", 3.0, 1.0),
        (1, "d", "f", 5.0, 2.0),
        (7, "s", "r", 9.0, 2.0),
        (8, "v", "u", 2.0, 1.0),
    ]
    assert result.dropped_rows == {**NO_DROPS, "too_few_completions": [3], "bad_scores": [4, 5, 6], "ties": [2]}
    assert result.dropped == {"bad_prompt": 0, "too_few_completions": 1, "bad_scores": 3, "bad_completions": 0,
                              "ties": 1, "below_margin": 0}  # fmt: skip
    assert result.summary() == (
        "best_vs_worst: 4 pairs from 9 rows; dropped 5 rows (too_few_completions 1, bad_scores 3, ties 1)"
    )


def test_best_vs_worst_applies_the_margin():
    result = build_pairs(rated_rows(), margin=1.5)
    assert [p[0] for p in pairs_of(result.dataset)] == [0, 1, 7]
    assert result.dropped_rows["below_margin"] == [8]
    # a difference equal to the margin is not enough: "> margin"
    assert build_pairs(rated_rows(), margin=1.0).dropped_rows["below_margin"] == [8]
    # ... nor one equal to it but for float rounding (8.3 - 8.0 = 0.3000000000000007 made a pair, 7.5 - 7.2 none),
    # and the quality check's min_score_margin agrees (it warned of 7.5 / 7.2 only)
    from fastdpo.data import check_preferences

    gaps = [(8.0, 8.3), (0.1, 0.4), (7.2, 7.5)]
    rows = [{"prompt": f"q{i}", "completions": ["a", "b"], "scores": list(gap)} for i, gap in enumerate(gaps)]
    assert build_pairs(rows, margin=0.3).dropped_rows["below_margin"] == [0, 1, 2]
    checked = [{"prompt": f"q{i}", "chosen": "b", "rejected": "a", "chosen_score": high, "rejected_score": low}
               for i, (low, high) in enumerate(gaps)]  # fmt: skip
    assert "small_score_margin" not in check_preferences(checked, min_score_margin=0.3).rows
    assert check_preferences(checked, min_score_margin=0.31).rows["small_score_margin"] == [0, 1, 2]


def test_scores_written_as_text_are_numbers_whatever_the_other_rows():
    # a file of text scores dropped every row (bad_scores); beside numeric rows, the loader made them numbers
    rows = [{"prompt": "q", "completions": ["a", "b"], "scores": ["8", " 2.5 "]}]
    assert [p[0] for p in pairs_of(build_pairs(rows).dataset)] == [0]
    mixed = build_pairs([*rows, {"prompt": "r", "completions": ["c", "d"], "scores": [1, 2]}])
    assert len(mixed.dataset) == 2 and not any(mixed.dropped.values())
    assert build_pairs([{"prompt": "q", "completions": ["a", "b"], "scores": ["high", "2"]}]).dropped["bad_scores"] == 1


def test_all_above_margin_makes_every_ordered_pair():
    result = build_pairs(rated_rows(), strategy="all_above_margin")
    assert pairs_of(result.dataset) == [
        (0, "a", "b", 3.0, 1.0), (0, "a", "c", 3.0, 2.0), (0, "c", "b", 2.0, 1.0),
        (1, "d", "f", 5.0, 2.0), (1, "d", "g", 5.0, 2.0), (1, "e", "f", 5.0, 2.0), (1, "e", "g", 5.0, 2.0),
        (7, "s", "r", 9.0, 2.0), (7, "s", "t", 9.0, 7.0), (7, "t", "r", 7.0, 2.0),
        (8, "v", "u", 2.0, 1.0),
    ]  # fmt: skip
    assert result.dropped_rows["ties"] == [2]

    strict = build_pairs(rated_rows(), strategy="all_above_margin", margin=1.5)
    assert pairs_of(strict.dataset) == [
        (0, "a", "b", 3.0, 1.0),
        (1, "d", "f", 5.0, 2.0), (1, "d", "g", 5.0, 2.0), (1, "e", "f", 5.0, 2.0), (1, "e", "g", 5.0, 2.0),
        (7, "s", "r", 9.0, 2.0), (7, "s", "t", 9.0, 7.0), (7, "t", "r", 7.0, 2.0),
    ]  # fmt: skip
    assert strict.dropped_rows == {**NO_DROPS, "too_few_completions": [3], "bad_scores": [4, 5, 6], "ties": [2],
                                   "below_margin": [8]}  # fmt: skip


def test_best_vs_random_lower_draws_among_the_lower_ones():
    allowed = {0: {"b", "c"}, 1: {"f", "g"}, 7: {"r", "t"}, 8: {"u"}}
    seen: dict[int, set[str]] = {row: set() for row in allowed}
    for seed in range(40):
        result = build_pairs(rated_rows(), strategy="best_vs_random_lower", seed=seed)
        pairs = pairs_of(result.dataset)
        assert [(row, chosen) for row, chosen, *_ in pairs] == [(0, "a"), (1, "d"), (7, "s"), (8, "v")]
        for row, _, rejected, _, _ in pairs:
            assert rejected in allowed[row]
            seen[row].add(rejected)
        assert result.dropped_rows["ties"] == [2]
    assert seen == allowed  # every lower completion gets drawn for some seed

    # with margin 1.5 only b is far enough below a (3 - 2 = 1), and row 8 has no candidate at all
    strict = build_pairs(rated_rows(), strategy="best_vs_random_lower", margin=1.5, seed=3)
    assert pairs_of(strict.dataset)[0] == (0, "a", "b", 3.0, 1.0)
    assert strict.dropped_rows["below_margin"] == [8]


def test_best_vs_random_lower_is_seeded_per_row():
    rows = [{"prompt": f"q{i}", "completions": list("abcdef"), "scores": [6, 5, 4, 3, 2, 1]} for i in range(30)]

    def draw(data, seed):
        return [r["rejected"] for r in build_pairs(data, strategy="best_vs_random_lower", seed=seed).dataset]

    first = draw(rows, 7)
    assert draw(rows, 7) == first
    assert draw(rows, 8) != first
    assert draw(datasets.Dataset.from_list(rows), 7) == first
    # a row's draw depends on (seed, row index) only, not on the other rows
    assert draw(rows[:10], 7) == first[:10]


def test_other_columns_are_carried_and_dataset_matches_list():
    rows = rated_rows()
    from_list = build_pairs(rows, strategy="all_above_margin").dataset
    from_dataset = build_pairs(datasets.Dataset.from_list(rows), strategy="all_above_margin").dataset
    assert isinstance(from_dataset, datasets.Dataset) and isinstance(from_list, list)
    assert from_dataset.column_names == [
        "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "source_row", "source", "lang",
    ]  # fmt: skip
    assert from_dataset.to_list() == from_list
    assert [(r["prompt"], r["source"]) for r in from_list[:4]] == [("p0", "src0")] * 3 + [("p1", "src1")]
    assert all(r["lang"] == "en" for r in from_list)


def test_renamed_prompt_column_becomes_prompt():
    rows = [{"instruction": "q", "outputs": ["x", "y"], "ratings": [1, 2]}]
    result = build_pairs(rows, prompt="instruction", completions="outputs", scores="ratings")
    assert result.dataset == [
        {"prompt": "q", "chosen": "y", "rejected": "x", "chosen_score": 2.0, "rejected_score": 1.0, "source_row": 0}
    ]


def test_message_list_completions():
    user = [{"role": "user", "content": "hi"}]
    good, bad = [{"role": "assistant", "content": "hello!"}], [{"role": "assistant", "content": "go away"}]
    rows = [{"prompt": user, "completions": [bad, good], "scores": [1.5, 4.0]}]
    result = build_pairs(datasets.Dataset.from_list(rows))
    assert result.dataset.to_list() == [
        {"prompt": user, "chosen": good, "rejected": bad, "chosen_score": 4.0, "rejected_score": 1.5, "source_row": 0}
    ]
    assert result.dataset.features["chosen"] == datasets.Dataset.from_list(rows).features["completions"].feature


def test_dict_completions_with_response_and_score_keys():
    rows = [
        {"instruction": "q0", "completions": [
            {"model": "m1", "response": "ok", "overall_score": 6.5},
            {"model": "m2", "response": "great", "overall_score": 9.0},
            {"model": "m3", "response": "bad", "overall_score": 2.0},
        ]},
        {"instruction": "q1", "completions": [
            {"model": "m1", "response": "x", "overall_score": None},
            {"model": "m2", "response": "y", "overall_score": 3.0},
        ]},
    ]  # fmt: skip
    for data in (rows, datasets.Dataset.from_list(rows)):
        result = build_pairs(data, prompt="instruction", response_key="response", score_key="overall_score")
        got = result.dataset.to_list() if isinstance(data, datasets.Dataset) else result.dataset
        assert got == [{"prompt": "q0", "chosen": "great", "rejected": "bad", "chosen_score": 9.0,
                        "rejected_score": 2.0, "source_row": 0}]  # fmt: skip
        assert result.dropped_rows["bad_scores"] == [1]
    # a None in place of a dict completion is a bad completion, as a None string one is (it was counted bad_scores)
    none = [{"prompt": "q", "completions": [None, {"response": "y", "overall_score": 3.0}]}]
    assert build_pairs(none, response_key="response", score_key="overall_score").dropped_rows["bad_completions"] == [0]

    with pytest.raises(DataError, match="did you mean score_key='overall_score'"):
        build_pairs(rows, prompt="instruction", response_key="response", score_key="overal_score")
    dicts = [{"prompt": "q", "completions": [{"response": "x"}, {"response": "y"}], "scores": [1, 2]}]
    with pytest.raises(DataError, match="pass response_key=") as err:
        build_pairs(dicts)
    assert err.value.row == 0 and err.value.column == "completions"


def test_bad_completions_are_counted():
    rows = [
        {"prompt": "q", "completions": ["x", None], "scores": [1, 2]},
        {"prompt": "q", "completions": ["x", 7], "scores": [1, 2]},
        {"prompt": "q", "completions": None, "scores": None},
    ]
    result = build_pairs(rows)
    assert result.dataset == []
    assert result.dropped_rows == {**NO_DROPS, "bad_completions": [0, 1], "too_few_completions": [2]}


def test_blank_and_repeated_completions_are_no_candidates_and_bad_prompts_drop_the_row():
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [
        {"prompt": "q0", "completions": ["good", " ", "bad"], "scores": [5, 0, 1]},  # blank worst: good > bad
        {"prompt": "q1", "completions": ["same", "other", "same"], "scores": [9, 5, 1]},  # repeat keeps 9: same > other
        {"prompt": "q2", "completions": ["x", "x"], "scores": [2, 1]},  # one candidate left
        {"prompt": None, "completions": ["a", "b"], "scores": [2, 1]},
        {"prompt": "  ", "completions": ["a", "b"], "scores": [2, 1]},
        {"prompt": "q5", "completions": ["a", said("b")], "scores": [2, 1]},  # mixed formats
        {"prompt": user("q6"), "completions": ["a", "b"], "scores": [2, 1]},  # strings under a prompt of messages
        {"prompt": user("q7"), "completions": [said("a"), said(""), said("b")], "scores": [2, 3, 1]},
    ]
    result = build_pairs(rows)
    assert [(r["source_row"], r["chosen"], r["rejected"]) for r in result.dataset] == [
        (0, "good", "bad"), (1, "same", "other"), (7, said("a"), said("b"))]  # fmt: skip
    assert result.dropped_rows == {**NO_DROPS, "too_few_completions": [2], "bad_prompt": [3, 4],
                                   "bad_completions": [5, 6]}  # fmt: skip
    assert result.excluded == {"blank": 2, "repeated": 2} and result.excluded_rows == {"blank": [0, 7],
                                                                                       "repeated": [1, 2]}  # fmt: skip
    assert result.summary().endswith("; not candidates: 4 completions (blank 2, repeated 2)")
    # the pairs pass the quality check: none is empty or identical (it would be dropped there, uncounted here); the
    # conversational one is checked apart, as rows of another format than the first are flagged ("mixed_format")
    from fastdpo.data import check_preferences

    assert check_preferences(result.dataset[:2]).drop_rows() == check_preferences(result.dataset[2:]).drop_rows() == []


def test_ranks_whitespace_repeats_and_a_string_prompt_over_messages():
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    # Nectar's ranks: 1 is the best; read as scores, the worst answer was chosen, with nothing said
    ranked = [{"prompt": "q", "answers": [{"answer": "Green.", "rank": 3}, {"answer": "Blue.", "rank": 1},
                                           {"answer": "Teal.", "rank": 2}]}]  # fmt: skip
    with pytest.warns(UserWarning, match="scores from 'rank': the highest is chosen; if 1 is the best rank"):
        assert pairs_of(build_pairs(ranked, completions="answers", response_key="answer", score_key="rank").dataset) \
            == [(0, "Green.", "Blue.", 3.0, 1.0)]  # fmt: skip
    best = build_pairs(ranked, completions="answers", response_key="answer", score_key="rank", lower_is_better=True)
    assert pairs_of(best.dataset) == [(0, "Blue.", "Green.", 1.0, 3.0)]  # the scores as given
    rows = [
        # whitespace only; but indentation is meaning: "a\nb" is no repeat of "a\n  b"
        {"prompt": "q0", "completions": ["Hello!", "Hello! ", "Bye.\n", "a\n  b", "a\nb"], "scores": [3, 2, 1, 0.5, 0]},
        {"prompt": "q1", "completions": [said("a"), said("b")], "scores": [2, 1]},
    ]  # the prompt: the user's turn
    result = build_pairs(rows)
    assert pairs_of(result.dataset) == [(0, "Hello!", "a\nb", 3.0, 0.0), (1, said("a"), said("b"), 2.0, 1.0)]
    assert result.excluded == {"blank": 0, "repeated": 1}
    # a completion that only calls a tool is no blank one (the quality check's 'empty' rule, which it now shares)
    call = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
        }
    ]
    tools = build_pairs([{"prompt": "q", "completions": [call, said("text")], "scores": [2, 1]}])
    assert pairs_of(tools.dataset) == [(0, call, said("text"), 2.0, 1.0)] and tools.excluded["blank"] == 0
    # the string prompt over messages comes out as the user's turn, so the pairs check clean (not mixed_format)
    from fastdpo.data import check_preferences

    for source in (rows[1:], datasets.Dataset.from_list(rows[1:])):
        pairs = build_pairs(source).dataset
        assert pairs[0]["prompt"] == [{"role": "user", "content": "q1"}]
        assert check_preferences(pairs).drop_rows() == []


def test_empty_result_keeps_the_column_types():
    rows = [{"prompt": "q", "completions": ["x", "y"], "scores": [1.0, 1.0], "id": 4}]
    result = build_pairs(datasets.Dataset.from_list(rows))
    assert len(result.dataset) == 0
    assert result.dataset.features["chosen"] == datasets.Value("string")
    assert result.dataset.features["id"] == datasets.Value("int64")
    assert result.summary() == "best_vs_worst: 0 pairs from 1 row; dropped 1 row (ties 1)"


def test_pair_errors_name_the_fix():
    rows = [{"prompt": "q", "completion": ["x", "y"], "scores": [1, 2]}]
    with pytest.raises(DataError, match="did you mean 'completion'\\? pass completions='completion'") as err:
        build_pairs(rows)
    assert err.value.column == "completions"
    with pytest.raises(ConfigError, match="did you mean 'best_vs_worst'") as cfg:
        build_pairs(rated_rows(), strategy="best_vs_worse")
    assert cfg.value.column == "strategy"
    for margin in (-0.5, NAN, float("inf")):
        with pytest.raises(ConfigError, match="margin"):
            build_pairs(rated_rows(), margin=margin)
    with pytest.raises(DataError, match="already has this output column"):
        build_pairs([{**row, "chosen": "z"} for row in rated_rows()])
    with pytest.raises(DataError, match="no rows"):
        build_pairs(datasets.Dataset.from_dict({"prompt": [], "completions": [], "scores": []}))
    with pytest.raises(DataError, match="expected a list of completions"):
        build_pairs([{"prompt": "q", "completions": "x y", "scores": [1, 2]}])


def test_completions_are_guessed_among_list_columns_and_one_response_rows_are_explained():
    # HelpSteer2's layout (a response and its ratings per row): "did you mean 'complexity'?" (an integer rating) for
    # the completions, then "expected a list" with no word of grouping rows by prompt
    rows = datasets.Dataset.from_list([{"prompt": "q", "response": "a", "complexity": 1, "helpfulness": 3}] * 2)
    with pytest.raises(DataError, match=r"column 'completions': column not found — pass completions='<your column>'"):
        build_pairs(rows)
    with pytest.raises(DataError, match=r"row 0, column 'response': expected a list of completions, got str — .*rows "
                                        r"of one response each.* with group_by_prompt=True"):  # fmt: skip
        build_pairs(rows, completions="response", scores="helpfulness")
    listed = rows.add_column("completes", [["a", "b"]] * 2)  # (a list column of a near name is still guessed)
    with pytest.raises(DataError, match=r"did you mean 'completes'\?"):
        build_pairs(listed)
