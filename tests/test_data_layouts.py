"""Preference data in layouts the trainers do not read as given: a first row without an answer, KTO's unpaired
rows, SFT rows; each said as what it is."""

from __future__ import annotations

import json
import warnings

import pytest

from fastdpo.data import prepare_preferences
from fastdpo.errors import DataError


def test_a_first_row_without_an_answer_is_that_rows_problem():
    # the format was read from row 0 alone: its null chosen stopped the whole file ("fix the value"), where the same
    # problem in any other row is that row's, dropped and counted by the CLI's data_filter
    from fastdpo.data.refused import prepare_dropping

    rows = [{"prompt": "a", "chosen": None, "rejected": "x"}, {"prompt": "b", "chosen": "y", "rejected": "z"}]
    with pytest.raises(DataError, match=r"row 0, column 'chosen': expected a string as the data's answers are, got "
                                        r"None"):  # fmt: skip
        prepare_preferences(rows)
    prepared, dropped, _ = prepare_dropping(rows)
    assert dropped == {"missing_field": 1} and prepared["prompt"] == ["b"]
    with pytest.raises(DataError, match=r"row 0, column 'chosen': expected a string or a list of"):  # (no row has one)
        prepare_preferences([{"prompt": "a", "chosen": None, "rejected": None}])


def test_unpaired_and_sft_rows_are_said_to_be_so():
    # KTO's unpaired rows and SFT rows got "map your column with columns={'chosen': ...}", which only moved the error
    # to 'rejected'
    kto = [{"prompt": "a", "completion": " x", "label": True}, {"prompt": "a", "completion": " y", "label": False}]
    with pytest.raises(DataError, match=r"column 'chosen': column not found: the data holds one completion per row "
                                        r"with a label .*KTO's unpaired layout.* — pair a desirable"):  # fmt: skip
        prepare_preferences(kto)
    with pytest.raises(DataError, match=r"the data holds SFT rows \(text\), .* — train on them with fastdpo sft"):
        prepare_preferences([{"text": "a b"}])
    with pytest.raises(DataError, match=r"column 'rejected': column not found — did you mean"):  # (pairs misnamed)
        prepare_preferences([{"prompt": "a", "chosen": " x", "rejectd": " y"}])
    for pair in ({"completion": " c", "Chosen": " x", "Rejected": " y"}, {"text": "t", "response_a": " x"}):
        with pytest.raises(DataError, match=r"column 'chosen': column not found — "):  # (pairs under other names)
            prepare_preferences([{"prompt": "a", **pair}])


def test_a_blank_prompt_beside_a_system_is_warned_of(caplog):
    # Orca's rows with question "" and a system: the prompt is the system text alone, kept (a system-only prompt may
    # be meant: conversational rows of one trained so), and it went unsaid
    import logging

    rows = [{"system": "Be brief.", "prompt": prompt, "chosen": " x.", "rejected": " y."} for prompt in (" ", "Q?")]
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepared = prepare_preferences(rows)
    assert prepared["prompt"] == ["Be brief.\n\n ", "Be brief.\n\nQ?"]
    assert "1 of 2 rows have a blank prompt beside a system text, which alone is their prompt (rows [0])" in caplog.text


def test_a_labels_column_beside_mapped_answers_is_warned_of(caplog):
    # Stanford SHP mapped as a user writes it (chosen: human_ref_A, rejected: human_ref_B) trained the rows whose
    # labels say B won reversed, without a word
    import logging

    rows = [{"history": f"q{i}?", "human_ref_A": f" a{i}.", "human_ref_B": f" b{i}.", "labels": int(i % 3 == 0)}
            for i in range(6)]  # fmt: skip
    columns = {"prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B"}
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepare_preferences(rows, columns=columns)
    assert "the column 'labels' (0 or 1: 2 rows of 6 are 1) sits beside chosen 'human_ref_A' and rejected " \
        "'human_ref_B'" in caplog.text and "train their pair reversed" in caplog.text  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo"):  # (one value: it says nothing of a side)
        prepare_preferences([{**row, "labels": 1} for row in rows], columns=columns)
    assert "sits beside" not in caplog.text
    topics = [{**row, "labels": ["math", "easy"]} for row in rows]  # (a column of lists: no side said; it raised)
    assert len(prepare_preferences(topics, columns=columns)) == 6


def test_image_rows_are_refused_as_vision_data_before_the_quality_check(tmp_path, monkeypatch, capsys):
    # TRL's vision layout (an images column, image parts in the prompt): every row a bad_message, and the run said
    # "every one of the 12 training rows is dropped" (the vision refusal came with data_filter: none only)
    import json

    from fastdpo.cli import main as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()  # (the data is read first: no model is loaded)
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    row = {"images": ["red.png"], "prompt": image, "chosen": [{"role": "assistant", "content": "Red"}],
           "rejected": [{"role": "assistant", "content": "Blue"}]}  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert cli(["dpo", "--model_name_or_path", "model", "--dataset_name", "pairs.jsonl", "--output_dir", "out",
                "--report_to", "none"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fastdpo: error: option 'dataset_name': vision datasets are not supported yet — use TRL's trainers for "
        "vision-language models")  # fmt: skip
    # fastdpo data check listed every row as a bad_message, the image column unnamed (every row dropped: exit 2)
    assert cli(["data", "check", "pairs.jsonl", "--json"]) == 2
    warnings = json.loads(capsys.readouterr().out)["dataset_warnings"]
    assert any(warning.startswith("vision_data: the column 'images' holds images") for warning in warnings), warnings


def test_an_answer_of_tool_calls_has_their_length():
    # a turn of tool calls alone counted 0 characters: every pair flagged length_ratio, and the length bias said
    # backwards (chosen shorter) on tool-calling data
    from fastdpo.data import check_preferences

    arguments = {"city": "Paris", "unit": "celsius"}
    call = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]  # fmt: skip
    text = [{"role": "assistant", "content": "It is sunny in Paris today, about 20 degrees."}]
    rows = [{"prompt": [{"role": "user", "content": f"Weather {i}?"}], "chosen": call, "rejected": text}
            for i in range(3)]  # fmt: skip
    report = check_preferences(rows)
    expected = len("get_weather") + len('{"city": "Paris", "unit": "celsius"}')  # (the arguments as JSON)
    assert report.length_stats["chars"]["chosen"]["min"] == expected == 47
    assert "length_ratio" not in report.rows  # (47 against 45 characters; it was 0 against 45)
    # from a file: Arrow gives each call every key any row's call has, None-filled (not rendered: not counted)
    import datasets

    search = {"name": "search", "arguments": {"query": "x" * 40, "limit": 3}}
    other = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": search}]}]
    table = datasets.Dataset.from_list([*rows, {**rows[0], "chosen": other}])
    assert table[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"]["query"] is None
    assert check_preferences(table).length_stats["chars"]["chosen"]["min"] == 47


def test_the_labels_warning_is_given_by_a_run_that_holds_rows_out(tmp_path, caplog):
    # with eval_fraction the rows are mapped before the split and the parts prepared without the map: never said
    import json
    import logging

    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits

    rows = [{"history": f"q{i}?", "human_ref_A": f" a{i}.", "human_ref_B": f" b{i}.", "labels": i % 2}
            for i in range(10)]  # fmt: skip
    (tmp_path / "shp.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    columns = {"prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B"}
    run = RunArguments(dataset_name=str(tmp_path / "shp.jsonl"), dataset_columns=columns, eval_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        loaded_splits("dpo", run, 0)
    assert caplog.text.count("the column 'labels' (0 or 1: 5 rows of 10 are 1) sits beside") == 1


KTO = [{"prompt": "q1", "completion": " a", "label": True}, {"prompt": "q1", "completion": " b", "label": False},
       {"prompt": "q1", "completion": " c", "label": False}, {"prompt": "q2", "completion": " d", "label": True},
       {"prompt": "q3", "completion": " e", "label": False}]  # fmt: skip


def test_kto_rows_given_to_sft_are_warned_of_and_can_be_kept_or_paired(tmp_path, monkeypatch, capsys, caplog):
    # SFT trained KTO's undesirable completions as targets without a word (as TRL does); `data filter` refused the
    # rows as not pairs, and `--where 'label == true'` matched none; `data pairs` took no boolean score
    from fastdpo import cli
    from fastdpo.data import build_pairs, prepare_sft

    with caplog.at_level("WARNING", logger="fastdpo"):
        assert len(prepare_sft(KTO)) == 5  # (kept: a warning, not a drop)
    assert "3 of 5 rows are labelled false (KTO's undesirable completions; rows [1, 2, 4]): SFT trains" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdpo"):  # (a row not trained is not counted: row 4, refused)
        assert len(prepare_sft([*KTO[:4], {**KTO[4], "completion": ""}], refused=(refused := {}))) == 4
    assert (
        sorted(refused) == [4]
        and "2 of 4 rows are labelled false (KTO's undesirable completions; rows [1, 2])" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdpo"):
        prepare_sft([{**row, "label": int(row["label"])} for row in KTO])  # (0/1 ints: not said to be KTO's)
        prepare_sft([row for row in KTO if row["label"]])
    assert "labelled false" not in caplog.text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(row) + "\n" for row in KTO))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["data", "filter", "kto.jsonl", "good.jsonl", "--where", "label == true"]) == 0
        assert capsys.readouterr().out.startswith("kept 2 of 5 SFT rows; dropped {'where': 3}")
        assert [json.loads(line) for line in (tmp_path / "good.jsonl").read_text().splitlines()] == [KTO[0], KTO[3]]
        assert json.loads((tmp_path / ".good.jsonl.dropped.json").read_text())["dropped_rows"] == {"where": [1, 2, 4]}
        for extra, flag in ((["--drop", "identical"], "--drop"), ([], "--where")):  # (quality reasons are pairs')
            where = [] if flag == "--where" else ["--where", "label == true"]
            assert cli.main(["data", "filter", "kto.jsonl", "x.jsonl", *where, *extra]) == 2
            assert f"option '{flag}': " in capsys.readouterr().err
        assert not (tmp_path / "x.jsonl").exists()
        assert cli.main(["data", "filter", "kto.jsonl", "x.jsonl", "--where", "label == 7"]) == 2  # (no row holds it)
        said = capsys.readouterr().err
        assert "fastdpo: error: option '--where': none of the 5 rows holds where 'label == 7'" in said, said
        assert not (tmp_path / "x.jsonl").exists()
    pairs = build_pairs(KTO, completions="completion", scores="label", group_by_prompt=True,
                        strategy="all_above_margin")  # fmt: skip
    assert [(p["chosen"], p["rejected"], p["chosen_row"], p["rejected_row"]) for p in pairs.dataset] == [
        (" a", " b", 0, 1), (" a", " c", 0, 2)]  # fmt: skip
    assert pairs.dropped_rows["too_few_completions"] == [3, 4]


def test_a_refused_answer_is_judged_alone_beside_the_rows_prepared_prompt():
    # an UltraFeedback row (whole conversations beside a prompt) with `chosen: []` is refused by preparation and was
    # checked as written: its rejected conversation, the user's turn still in it, also counted roles_out_of_order
    import datasets

    from fastdpo.data import check_preferences
    from fastdpo.data.refused import prepared_rows

    def talk(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": f"q{i}", "chosen": talk(f"q{i}", f"a{i}"), "rejected": talk(f"q{i}", f"b{i}"), "system": "s"}
            for i in range(4)]  # fmt: skip
    rows[1]["chosen"], rows[3]["rejected"] = [], talk("q3", " ")  # (3: prepared, and empty: the same one reason)
    checked, refused = prepared_rows(datasets.Dataset.from_list(rows), None)
    assert sorted(refused) == [1]
    assert check_preferences(checked).rows == {"empty": [1, 3]}
    assert checked[1]["chosen"] == [] and checked[1]["rejected"] == [{"role": "assistant", "content": "b1"}]
    assert checked[1]["prompt"] == [*checked[0]["prompt"][:1], {"role": "user", "content": "q1"}]  # (system joined)
