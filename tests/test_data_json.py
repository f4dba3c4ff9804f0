"""JSON and JSON Lines files as users write them: broken lines named, layouts that are not rows named, strings that
``datasets`` would read back changed named, and streams of them read as Python's ``json`` reads them."""

from __future__ import annotations

import json

import pytest
from test_data_formats import assistant, user
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.formats import prepare_preferences
from fastdpo.data.load import load_data
from fastdpo.errors import DataError


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a", "rejected": \n{"chosen": "c"}\n')
    with pytest.raises(DataError, match=r"data.jsonl: line 3: invalid JSON .* fix or remove that line"):
        load_data(path)


def test_jsonl_check_holds_one_line_at_a_time(tmp_path):
    import tracemalloc

    from fastdpo.data.load import _check_json

    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "word " * 200, "chosen": "yes " * 300, "rejected": "no " * 300}
    path.write_text((json.dumps(row) + "\n") * 5000)  # ~13 MB
    tracemalloc.start()
    _check_json(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < path.stat().st_size / 20, peak  # was ~3x the file: its bytes, its text and its lines at once


def test_jsonl_string_with_a_raw_line_separator_loads(tmp_path):
    # U+2028 and U+0085 are valid inside JSON strings; str.splitlines would end a line there
    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "a\u2028b", "chosen": "c\x85d", "rejected": "e"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert prepare_preferences(path)[0]["prompt"] == "a\u2028b"


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json"])
def test_a_byte_order_mark_first_loads_as_datasets_reads_it(name, tmp_path):
    # some editors (Notepad) write one; the line check refused the file at line 1 where datasets reads it
    rows = [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}, {"prompt": "Yo", "chosen": "Hey", "rejected": "No"}]
    text = "\r\n".join(map(json.dumps, rows)) + "\r\n" if name.endswith("l") else json.dumps(rows)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert prepare_preferences(tmp_path / name).to_list() == rows


@pytest.mark.parametrize("name", ["mixed.jsonl", "mixed.json"])
def test_a_json_text_column_of_mixed_kinds_names_the_odd_value_instead_of_changing_the_others(name, tmp_path):
    # datasets reads such a column as Json, which gives back the valid strings "42" and "4" as numbers: every row
    # would then be refused (or dropped as not_text) for one unquoted number
    messages = [{"role": "assistant", "content": "Hi."}]
    rows = [{"prompt": "Hi?", "chosen": messages, "rejected": messages, "meta": 0},  # (a list first: still found)
            {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green.", "meta": "x"},
            {"prompt": "6 * 7?", "chosen": "42", "rejected": "48", "meta": 1},
            {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "meta": None},
            {"prompt": "12 + 7?", "chosen": 19, "rejected": "21", "meta": [1]}]  # fmt: skip
    path = tmp_path / name
    path.write_text("\n".join(map(json.dumps, rows)) if name.endswith("l") else json.dumps(rows))
    where = "line 5: is a number where line 2" if name.endswith("l") else "row 4: is a number where row 1"
    with pytest.raises(DataError, match=rf"column 'chosen': .*{name}: {where} has a string .*quote a number"):
        load_data(path)
    path.write_text("\n".join(json.dumps({**r, "chosen": str(r["chosen"])}) for r in rows[1:]))
    assert load_data(path)["chosen"] == ["Blue.", "42", "4", "19"]  # a column of other kinds (meta) is not ours


@pytest.mark.parametrize("name", ["parts.jsonl", "parts.json"])
def test_a_string_that_datasets_would_read_back_changed_is_named_and_a_stream_keeps_it(name, tmp_path):
    # datasets holds a field whose kinds differ between rows (a message's content a string here, a list of parts
    # there) as JSON text, and reads a string there that is itself JSON back as that value: "4" as 4, '"five"' as
    # five, silently (both before this check: the row trained on the changed text)
    from fastdpo.data.load import load_stream

    parts = [{"type": "text", "text": "Hello."}]
    pairs = [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant('"five"')]},
             {"prompt": [user("Hi?")], "chosen": [assistant(parts)], "rejected": [assistant(parts)]}]  # fmt: skip
    path = tmp_path / name
    path.write_text("\n".join(map(json.dumps, pairs)) if name.endswith("l") else json.dumps(pairs))
    where = "line 1" if name.endswith("l") else "row 0"
    with pytest.raises(
        DataError,
        match=rf"column 'chosen': .*{name}: {where}: the string '4' in chosen\[\]\.content "
        r"would be read back as 4: .*give chosen\[\]\.content one kind of value",
    ):
        load_data(path)
    assert list(load_stream(path)) == pairs  # a stream of the file reads each value as Python's json does
    # ... under another name that a column map gives our conversation column too (the check looked for 'messages')
    from fastdpo.data import prepare_sft

    renamed = tmp_path / f"dialog.{name.split('.')[1]}"
    dialogs = [{"dialog": [user("2+2?"), *pair["chosen"]]} for pair in pairs]
    renamed.write_text("\n".join(map(json.dumps, dialogs)) if name.endswith("l") else json.dumps(dialogs))
    with pytest.raises(DataError, match=rf"{where}: the string '4' in dialog\[\]\.content would be read back as 4"):
        prepare_sft(renamed, columns={"messages": "dialog"})
    # strings that are not JSON come back from such a field as written: the file loads
    pairs[0].update(chosen=[assistant("Four.")], rejected=[assistant("Five.")])
    path.write_text("\n".join(map(json.dumps, pairs)) if name.endswith("l") else json.dumps(pairs))
    assert load_data(path).to_list() == pairs


def test_a_stream_of_a_json_file_keeps_its_strings_and_its_columns_or_names_the_line(tmp_path, monkeypatch):
    from fastdpo.data import load
    from fastdpo.data.stream import prepare_stream

    # a number among strings: datasets' stream read that block's column as JSON, "4" and '"Hi"' changed in the rows
    # trained before the number's own row stopped the run
    rows = [{"prompt": '"Hi"', "chosen": "4", "rejected": "null"}] * 3 + [{"prompt": "p", "chosen": 5, "rejected": "r"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert list(load.load_stream(path)) == rows
    with pytest.raises(DataError, match="row 3, column 'chosen': expected a string as the data's answers are, got int"):
        list(prepare_stream(load.load_stream(path), build_tiny_tokenizer()).dataset)
    # the columns are those of the rows in the first bytes (datasets' first block: 10 MiB; a missing value None, as
    # Arrow fills it); a later new one is named
    sparse = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f",
              "system": "Be brief."}, {"prompt": "g", "chosen": "h", "rejected": "i", "score": 1}]  # fmt: skip
    lines = [json.dumps(row) + "\n\n" for row in sparse]
    size = len(lines[0]) + len(lines[1]) - 1  # (within the second row's line: its keys count)
    monkeypatch.setattr(load, "STREAM_COLUMNS_FROM", size)
    path.write_text("".join(lines))
    said = rf"column 'score': .*mixed.jsonl: line 5: a column that none of the rows in the file's first {size} bytes"
    with pytest.raises(DataError, match=said + " has .*give the first row 'score' too"):
        list(load.load_stream(path))
    path.write_text("".join(lines[:2]))
    assert [row["system"] for row in load.load_stream(path)] == [None, "Be brief."]
    path.write_text(json.dumps(sparse[0]) + "\n" + json.dumps({**sparse[0], "prompt": "a\ud800"}) + "\n")
    with pytest.raises(DataError, match=r"column 'prompt': .*line 2: a lone surrogate '\\ud800' at character 1"):
        list(load.load_stream(path))


PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, "no such file"),
        ("data.txt", "x", "unknown file type '.txt'"),
        ("e.jsonl", "", "empty"),
        (
            "list.jsonl",
            '{"chosen": "a", "rejected": "b"}\n[1, 2]\n',
            "line 2: expected a JSON object per line, got list",
        ),
        (
            "doc.json",
            '[\n {"chosen": "a", "rejected": "b"},\n {"chosen": "a" "rejected": "b"}\n]\n',
            r"doc.json: line 3, column 17: invalid JSON",
        ),
        (
            "latin1.jsonl",
            b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff", "rejected": "b"}\n',
            "line 2: not valid UTF-8",
        ),
        # a raw U+2028 (valid in a JSON string) before a lone surrogate: the line counted as datasets counts it
        (
            "u2028.jsonl",
            '{"chosen": "a\u2028b", "rejected": "c"}\n{"chosen": "\\ud800", "rejected": "c"}\n',
            r"column 'chosen': .*u2028.jsonl: line 2: a lone surrogate",
        ),
        # one JSON object over several lines, valid JSON (it was "line 1: invalid JSON"): its layout is named
        (
            "columns.json",
            json.dumps({k: [v, v] for k, v in PAIR.items()}, indent=1),
            r"one JSON object of columns \(each key a list of values\).*orient='records', lines=True",
        ),
        (
            "under.json",
            json.dumps({"version": 1, "data": [PAIR]}, indent=1),
            r"one JSON object whose 'data' holds the rows.*field='data'",
        ),
        ("pretty.jsonl", json.dumps(PAIR, indent=1), "one JSON object over several lines.*one object on one line"),
        # ... and on one line, as json.dumps writes it (it loaded as one row: "column not found", "got list")
        ("columns_line.json", json.dumps({k: [v, v] for k, v in PAIR.items()}), r"one JSON object of columns"),
        ("under_line.jsonl", json.dumps({"version": 1, "data": [PAIR, PAIR]}), r"one JSON object whose 'data' holds"),
    ],
)
def test_bad_files(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        load_data(path)
    if content:  # a stream says the same
        from fastdpo.data.load import load_stream

        with pytest.raises(DataError, match=match):
            list(load_stream(path))


def test_a_tools_column_of_lists_and_json_strings_loads(tmp_path):
    # datasets reads such a column as Json (a JSON string comes back as its list), which the trainers read as JSON
    # anyway: nothing changes, nothing to refuse
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    rows = [{"messages": [{"role": "user", "content": "Hi"}], "tools": [tool]},
            {"messages": [{"role": "user", "content": "Hi"}], "tools": json.dumps([tool])}]  # fmt: skip
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_data(path)["tools"] == [[tool], [tool]]


def test_a_one_line_file_that_is_a_row_loads(tmp_path):
    # (the layouts above are refused on one line too; these are rows: a tools list beside the answers, messages)
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    rows = [{**PAIR, "tools": [tool]}, {"messages": [{"role": "user", "content": "Hi"}]},
            {"chosen": [assistant("A")], "rejected": [assistant("B")]},
            {"input_ids": [1, 5, 6], "labels": [1, 5, 6]}]  # fmt: skip
    for number, row in enumerate(rows):
        path = tmp_path / f"row{number}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert load_data(path).to_list() == [row]


def test_kinds_that_mix_only_past_datasets_first_block_are_named_not_quoted(tmp_path):
    # datasets reads JSON Lines in 10 MiB blocks and casts each to the first block's columns: a later block whose
    # column mixed kinds came back as JSON text, its strings quoted ("fine" read '"fine"'), silently
    filler = "x" * 1000
    head = "".join(
        json.dumps({"prompt": f"p{i} {filler}", "chosen": "yes", "rejected": "no", "meta": "a"}) + "\n"
        for i in range(11_000)
    )  # fmt: skip (over 10 MiB)
    odd = {
        "chosen": (42, "number where line 1 has a string"),  # a text column: one kind in every row
        "meta": (5, "number where the rows before it have strings"),
        "rejected": ([{"role": "assistant", "content": "No."}], "list where the rows before it have strings"),
    }
    for column, (value, said) in odd.items():
        path = tmp_path / f"{column}.jsonl"
        tail = [
            {"prompt": "q", "chosen": "ok", "rejected": "no", "meta": "b", column: value},
            {"prompt": "q2", "chosen": "fine", "rejected": "no", "meta": "c"},
        ]
        path.write_text(head + "".join(json.dumps(row) + "\n" for row in tail))
        with pytest.raises(DataError, match=rf"column '{column}': .*: line 11001: is a {said}"):
            load_data(path)
    path.write_text(head + json.dumps({"prompt": "q", "chosen": "ok", "rejected": "no", "system": "Be brief."}) + "\n")
    late = r"column 'system': .*: line 11001: a column that none of the rows in the file's first 10 MiB has"
    with pytest.raises(DataError, match=late):  # (datasets' CastError: "column names don't match", no line)
        load_data(path)
    tail[0][column] = "no"  # one kind again: every string as written
    path.write_text(head + "".join(json.dumps(row) + "\n" for row in tail))
    assert load_data(path)[-2:] == {"prompt": ["q", "q2"], "chosen": ["ok", "fine"], "rejected": ["no", "no"],
                                    "meta": ["b", "c"]}  # fmt: skip


@pytest.mark.parametrize("name", ["dates.jsonl", "dates.json"])
def test_strings_that_read_as_dates_load_as_written(name, tmp_path):
    # Arrow's JSON reader read a column holding only ISO dates as timestamps: a prompt "2024-01-01" came back as
    # datetime(2024, 1, 1), and metadata "2024-02-02T01:02:03+02:00" as datetime(2024, 2, 1, 23, 2, 3), its zone lost
    rows = [{"prompt": f"2024-01-0{i + 1}", "chosen": "2024-01-01T10:00:00Z", "rejected": "No.",
             "created_at": "2024-02-02T01:02:03+02:00", "day": None if i else "2024-02-02"}
            for i in range(3)]  # fmt: skip
    path = tmp_path / name
    path.write_text("\n".join(map(json.dumps, rows)) if name.endswith("l") else json.dumps(rows))
    loaded = load_data(path)
    assert loaded.to_list() == rows and list(loaded.features) == list(rows[0])


def test_dates_in_messages_load_as_written(tmp_path):
    # an answer's content "2024-01-01" in every row came back as datetime(2024, 1, 1) and was trained on as the
    # chat template's "2024-01-01 00:00:00"; a field beside it (a tool call's arguments, a number) keeps its kind
    rows = [{"prompt": [user("What day was it?")],
             "chosen": [{"role": "assistant", "content": f"2024-01-0{i + 1}", "weight": i}],
             "rejected": [{"role": "assistant", "content": "2023-12-31T23:59:59+01:00", "weight": None}]}
            for i in range(3)]  # fmt: skip
    path = tmp_path / "dates.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_data(path).to_list() == rows
    prepared = prepare_preferences(str(path))
    assert prepared[0]["chosen"][0]["content"] == "2024-01-01"


def test_later_blocks_whose_kinds_datasets_cast_or_cannot_cast_are_named_by_line(tmp_path):
    # datasets casts each 10 MiB block of a JSON Lines file to the first block's kinds: a message's content that is
    # a list of parts there came back as its JSON text (and a plain one quoted: '"plain"'), a "0042" in a column of
    # integers as 42, silently; where the cast fails (a string after only nulls, a fraction after integers, text
    # after dates) its error named neither line nor column
    filler = "x" * 1000
    first = {"prompt": [user(filler)], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")],
             "score": 1, "system": None, "day": "2024-01-01"}  # fmt: skip
    head = (json.dumps(first) + "\n") * 11_000  # (over 10 MiB)
    odd = {
        "prompt": (
            [user([{"type": "text", "text": "parts"}])],
            "prompt\\[\\]\\.content is a list where the rows before it have strings: datasets cast",
        ),
        "score": ("0042", 'is a string where the rows before it have numbers: .*"0042" came back as 42'),
        "system": ("Be brief.", "is a string where the rows in the file's first 10 MiB have only nulls"),
        "day": ("today", "is a string where the rows in the file's first 10 MiB have date strings"),
    }
    for column, (value, said) in odd.items():
        path = tmp_path / f"{column}.jsonl"
        path.write_text(head + json.dumps({**first, column: value}) + "\n")
        with pytest.raises(DataError, match=rf"column '{column}': .*: line 11001: {said}"):
            load_data(path)
    path.write_text(head + json.dumps({**first, "score": 1.5}) + "\n")
    fix = "move a row with a decimal number there to the top of the file"
    with pytest.raises(DataError, match=rf"line 11001: is a decimal number where .* have integers .*{fix}"):
        load_data(path)
    path.write_text(json.dumps({**first, "score": 1.5}) + "\n" + head)  # the fix said: it loads
    assert load_data(path)["score"][:2] == [1.5, 1.0]


def test_a_key_written_twice_is_named_by_line(tmp_path):
    # datasets refuses it with Arrow's "Column(/prompt) was specified twice in row 0" (row 0 of its block, not the
    # file's); a stream read it as Python's json does, the last value kept, silently
    from fastdpo.data.load import load_stream

    path = tmp_path / "twice.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR)[:-1] + ', "prompt": "again"}\n')
    said = r"column 'prompt': .*twice.jsonl: line 2: the key 'prompt' is written twice"
    for read in (load_data, lambda source: list(load_stream(source))):
        with pytest.raises(DataError, match=said):
            read(path)
    # inside a message: the column holding it named (it named the message's key as the column)
    row = {"prompt": [user("Hi?")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]}
    twice = json.dumps(row).replace('"content": "Hello."', '"content": "Hello.", "content": "Hi."')
    path.write_text(json.dumps(row) + "\n" + twice + "\n")
    said = r"column 'chosen': .*line 2: the key 'content' is written twice in one object inside the column 'chosen'"
    for read in (load_data, lambda source: list(load_stream(source))):
        with pytest.raises(DataError, match=said):
            read(path)


def test_a_later_block_of_dates_in_a_column_of_strings_loads_as_written(tmp_path):
    # past datasets' first 10 MiB block, a block whose column held only dates was cast to the first block's strings
    # as the timestamp's text: "2024-01-01T10:00:00Z" came back as "2024-01-01 10:00:00", silently
    filler = "x" * 1000
    rows = [{"prompt": f"p{i} {filler}", "meta": "a" if i < 11_000 else "2024-01-01T10:00:00Z"} for i in range(33_000)]
    path = tmp_path / "later.jsonl"
    path.write_text("".join(json.dumps({**row, "chosen": "Yes.", "rejected": "No."}) + "\n" for row in rows))
    assert load_data(path)["meta"] == [row["meta"] for row in rows]
