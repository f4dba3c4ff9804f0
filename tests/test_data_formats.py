"""Loading files and normalizing every preference format: column maps, implicit prompts, system and input columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.formats import extract_prompt, prepare_preferences
from fastdpo.data.load import load_data
from fastdpo.data.tokenize import tokenize_preferences
from fastdpo.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
datasets.disable_progress_bars()


def rows(*items: dict) -> datasets.Dataset:
    return datasets.Dataset.from_list(list(items))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------------- loading


def test_a_csv_reads_its_text_columns_as_text_and_its_numbers_as_numbers(tmp_path):
    # pandas alone reads an answer 4 as the number 4 (every row then refused), 007 as 7 and NA or None as missing
    path = tmp_path / "math.csv"
    path.write_text(
        "prompt,chosen,rejected,system,score_chosen,votes\n"
        "What is 2+2?,4,5,,8,3\n"
        "Bond?,007,NA,Be brief.,NA,\n"
        "Null?,None,4.50,,7.5,2\n"
    )
    rows = load_data(path).to_list()
    assert [(r["prompt"], r["chosen"], r["rejected"], r["system"]) for r in rows] == [
        ("What is 2+2?", "4", "5", None),
        ("Bond?", "007", "NA", "Be brief."),
        ("Null?", "None", "4.50", None),
    ]
    assert [r["score_chosen"] for r in rows] == [8.0, None, 7.5]  # the other columns as pandas reads them
    assert [r["votes"] for r in rows] == [3.0, None, 2.0]
    prepared = prepare_preferences(path)
    assert prepared["chosen"] == ["4", "007", "None"] and prepared["chosen_score"] == [8.0, None, 7.5]
    assert prepared["prompt"] == ["What is 2+2?", "Be brief.\n\nBond?", "Null?"]  # (an empty system is none)
    assert prepared["rejected"] == ["5", "NA", "4.50"]
    from fastdpo.data import load_stream

    assert list(load_stream(path)) == rows  # (a stream reads them alike)
    # a line with more fields than the header: pandas' ParserError named no file, raised where a stream read it
    path.write_text(path.read_text() + "Comma?,Yes, really,No,,1,1\n")
    said = r"math.csv: line 5: 7 fields where the header has 6 — quote a field that holds a comma"
    for read in (load_data, lambda source: list(load_stream(source))):
        with pytest.raises(DataError, match=said):
            read(path)
    # a Latin-1 file and a broken Parquet file: named, streamed too (pandas' and Arrow's errors named no file)
    path.write_bytes("prompt,chosen,rejected\nQ,A,B\nCaf\u00e9?,Oui,Non\n".encode("latin-1"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    for source, said in ((path, r"math.csv: line 3: not valid UTF-8 \(byte 0xe9\) — re-encode the file as UTF-8"),
                         (broken, r"broken.parquet: datasets cannot read it .* — write the file again")):  # fmt: skip
        for read in (load_data, lambda source: list(load_stream(source))):
            with pytest.raises(DataError, match=said):
                read(source)


def test_a_csv_reads_mapped_text_columns_as_text_in_every_loader(tmp_path):
    from fastdpo.data import load_stream, prepare_sft

    path = tmp_path / "mapped.csv"
    path.write_text("question,good,bad,answer\n12,4,5,10\n13,06,7,11\n")
    prepared = prepare_preferences(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert prepared.select_columns(["prompt", "chosen", "rejected"]).to_list() == [
        {"prompt": "12", "chosen": "4", "rejected": "5"},
        {"prompt": "13", "chosen": "06", "rejected": "7"},
    ]
    assert prepared["answer"] == [10, 11]  # unmapped: a number, as before
    sft = prepare_sft(path, columns={"prompt": "question", "completion": "answer"})
    assert sft.select_columns(["prompt", "completion"]).to_list() == [
        {"prompt": "12", "completion": "10"},
        {"prompt": "13", "completion": "11"},
    ]
    assert prepare_sft(path, text_field="good")["text"] == ["4", "06"]
    streamed = list(load_stream(path, text=("good",)))
    assert [(r["good"], r["bad"]) for r in streamed] == [("4", 5), ("06", 7)]  # only the columns asked for
    # a streamed CLI run reads SFT's dataset_text_field as text too; a blank line before the header changes nothing
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import streamed_splits

    path.write_text("\n  \n" + path.read_text())
    assert load_data(path, text=("good",))["good"] == ["4", "06"]
    train, _ = streamed_splits("sft", RunArguments(dataset_name=str(path), dataset_streaming=True), "answer")
    assert [row["answer"] for row in train] == ["10", "11"]
    # and a run that loads it first ('no SFT columns' before)
    from fastdpo.cli_model import loaded_splits as _loaded_splits

    assert _loaded_splits("sft", RunArguments(dataset_name=str(path)), 0, "answer")[0]["text"] == ["10", "11"]


def test_numbers_as_answers_outside_a_csv_are_refused_with_the_reason():
    with pytest.raises(DataError, match=r"got int — .*a CSV or spreadsheet reader may read answers like 4 as numbers"):
        prepare_preferences([{"prompt": "What is 2+2?", "chosen": 4, "rejected": 5}] * 2)


def test_parquet_csv_json_and_dataset_dict_load_the_same_rows(tmp_path):
    data = rows({"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"})
    data.to_parquet(tmp_path / "d.parquet")
    data.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(data.to_list()))
    for name in ("d.parquet", "d.csv", "d.json"):
        assert load_data(tmp_path / name).to_list() == data.to_list()
    both = datasets.DatasetDict({"train": data, "test": data.select([0])})
    assert len(load_data(both, split="test")) == 1
    with pytest.raises(DataError, match="has no split 'validation'.*'train', 'test'"):
        load_data(both, split="validation")


def test_a_folder_of_one_file_per_split_loads_as_load_dataset_finds_its_splits(tmp_path):
    # as TRL's scripts load a local folder (dataset_name: folder, dataset_test_split: test); refused before
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits as _loaded_splits
    from fastdpo.data.load import load_stream

    data = rows({"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"})
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    data.to_json(folder / "train.jsonl")
    data.select([1]).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    assert load_data(folder).to_list() == data.to_list() and load_data(folder, split="test").to_list() == [data[1]]
    assert set(load_data(folder, split=None)) == {"train", "test"}
    assert list(load_stream(folder, split="test")) == [data[1]]
    assert prepare_preferences(folder, split="test")["prompt"] == ["p2"]
    run = RunArguments(dataset_name=str(folder), dataset_test_split="test")
    train, held_out, _ = _loaded_splits("dpo", run, 0)
    assert (len(train), held_out["prompt"]) == (2, ["p2"])
    with pytest.raises(DataError, match=r"has no file for split 'validation' \(its splits: test, train\)"):
        load_data(folder, split="validation")
    data.to_json(folder / "train-2.jsonl")
    with pytest.raises(DataError, match="split 'train' has several files"):
        load_data(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no .jsonl"):
        load_data(tmp_path / "empty")
    # split names with '_' (ultrafeedback_binarized's layout), fastdpo's own summaries beside the files, a lone file
    # named after no split (train, as datasets reads it), and a folder save_to_disk wrote
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for name in ("train_prefs", "test_prefs", "train_sft"):
        data.to_parquet(hub / f"{name}-00000-of-00001.parquet")
    assert len(load_data(hub.parent, split="test_prefs")) == 2 and set(load_data(hub.parent, split=None)) == {
        "train_prefs", "test_prefs", "train_sft"}  # fmt: skip
    # a split in shards (ultrachat_200k's train_sft-0000k-of-00003.parquet): its shards in order, as datasets reads
    # them; refused as "several files" before
    (hub / "train_sft-00000-of-00001.parquet").unlink()
    many = rows(*({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)))
    for shard, picked in ((2, [4]), (0, [0, 1]), (1, [2, 3])):  # (the hub's names, a hash after the count)
        many.select(picked).to_parquet(hub / f"train_sft-{shard:05d}-of-00003-a3ecf9275699358{shard}.parquet")
    assert load_data(hub.parent, split="train_sft").to_list() == many.to_list()
    assert list(load_stream(hub.parent, split="train_sft")) == many.to_list()
    streamed = datasets.IterableDatasetDict({"train": many.to_iterable_dataset()})  # (it was "cannot stream" it)
    assert list(load_stream(streamed)) == many.to_list()
    with pytest.raises(DataError, match="the streamed dataset has no split 'test'"):
        load_stream(streamed, split="test")
    (hub / "train_sft-00001-of-00003-a3ecf92756993581.parquet").unlink()
    with pytest.raises(DataError, match=r"split 'train_sft' has 2 of its 3 shards \(shard 00001 is missing\)"):
        load_data(hub.parent, split="train_sft")
    # shards of JSON Lines: a score 8 in one and 7.5 in another read as datasets reads them (they were "not the same
    # columns"); a score 8 beside "high" named by column and shards; a shard both in the folder and in data/ named
    shards = tmp_path / "shards"
    (shards / "data").mkdir(parents=True)
    for shard, score in enumerate((8, 7.5)):
        pair = json.dumps({"prompt": f"p{shard}", "chosen": "Yes.", "rejected": "No.", "score": score})
        (shards / f"train-{shard:05d}-of-00002.jsonl").write_text(pair + "\n")
    for load in (load_data, load_stream):
        assert [row["score"] for row in load(shards)] == [8.0, 7.5]
    (shards / "train-00001-of-00002.jsonl").write_text(json.dumps({"prompt": "p1", "chosen": "Yes.", "rejected":
                                                                  "No.", "score": None}) + "\n")  # fmt: skip
    for load in (load_data, load_stream):  # (a column of nulls alone in one shard takes the other's kind)
        assert [row["score"] for row in load(shards)] == [8, None]
    (shards / "train-00001-of-00002.jsonl").write_text(json.dumps({"prompt": "p1", "chosen": "Yes.", "rejected":
                                                                  "No.", "score": "high"}) + "\n")  # fmt: skip
    said = "column 'score' holds int64 in the shard train-00000-of-00002.jsonl and string in train-00001-of-00002.jsonl"
    for load in (load_data, load_stream):
        with pytest.raises(DataError, match=said):
            load(shards)
    (shards / "train-00000-of-00002.jsonl").rename(shards / "data" / "train-00000-of-00002.jsonl")
    (shards / "train-00000-of-00002.jsonl").write_text((shards / "data" / "train-00000-of-00002.jsonl").read_text())
    twice = r"split 'train' has shard 00000 twice \(data/train-00000-of-00002.jsonl, train-00000-of-00002.jsonl\)"
    with pytest.raises(DataError, match=twice):  # ("has 3 of its 2 shards", before)
        load_data(shards)
    (tmp_path / "split_out").mkdir()
    for name in ("train", "test"):
        data.to_json(tmp_path / "split_out" / f"{name}.jsonl")
        (tmp_path / "split_out" / f"{name}.jsonl.dropped.json").write_text("{}")
    assert len(load_data(tmp_path / "split_out", split="test")) == 2
    (tmp_path / "one").mkdir()
    data.to_json(tmp_path / "one" / "prefs.jsonl")
    assert load_data(tmp_path / "one").to_list() == data.to_list()
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(tmp_path / "saved")
    assert len(load_data(tmp_path / "saved", split="test")) == 1 and len(list(load_stream(tmp_path / "saved"))) == 2
    # one saved Dataset (no splits) gave its rows for any split: a test split evaluated on the training rows
    data.save_to_disk(tmp_path / "saved_one")
    assert len(load_data(tmp_path / "saved_one")) == 2
    for load in (load_data, load_stream):
        with pytest.raises(DataError, match="saved_one is one saved Dataset, whose one split is 'train': there is no"):
            load(tmp_path / "saved_one", split="test")


def test_a_list_of_row_dicts_is_a_dataset_everywhere_and_bad_rows_are_named():
    from fastdpo.data import prepare_sft, tokenize_sft

    tokenizer = build_tiny_tokenizer()
    listed = [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]
    assert load_data(listed).to_list() == rows(*listed).to_list()
    assert prepare_preferences(listed).to_list() == prepare_preferences(rows(*listed)).to_list()
    # before: tokenize_preferences(list) failed with "'list' object has no attribute 'map'"
    tokenized = tokenize_preferences(listed, tokenizer).dataset
    assert tokenized.to_list() == tokenize_preferences(rows(*listed), tokenizer).dataset.to_list()
    sft = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    assert tokenize_sft(sft, tokenizer).dataset["input_ids"] == tokenize_sft(rows(*sft), tokenizer).dataset["input_ids"]
    assert prepare_sft(sft).to_list() == prepare_sft(rows(*sft)).to_list()
    # a key only later rows have is a column (None where a row lacks it), not dropped as from_list drops it
    scored = load_data([listed[0], {**listed[1], "score_chosen": 3.0}])
    assert scored["score_chosen"] == [None, 3.0]
    from fastdpo.data import pack_sft_dataset

    packed = pack_sft_dataset(tokenize_sft(sft, tokenizer).dataset.to_list(), 64)
    assert packed["input_ids"] == pack_sft_dataset(tokenize_sft(sft, tokenizer).dataset, 64)["input_ids"]
    with pytest.raises(DataError, match=r"row 1: is a str, not a dict of column values — pass one dict per row"):
        tokenize_preferences([listed[0], "p2 c2 r2"], tokenizer)
    # the row and column that break the table: a kind that differs from the column's first value
    mixed = [listed[0], {**listed[1], "prompt": None}, {"prompt": "p3", "chosen": [user("c3")], "rejected": "r3"}]
    with pytest.raises(DataError, match=r"row 2, column 'chosen': is a list where row 0 has a string — give each"):
        load_data(mixed)
    with pytest.raises(DataError, match=r"row 1, column 'text': is a number where row 0 has a string"):
        prepare_sft([{"text": "a"}, {"text": 5}, {"text": "c"}])
    import numpy

    # kinds Arrow joins (numpy's float among Python's, ints among floats) are not the clash
    scored = [{**row, "score": score} for row, score in zip(mixed, (1, numpy.float64(2.0), 3.5), strict=True)]
    with pytest.raises(DataError, match=r"row 2, column 'chosen': is a list where row 0 has a string"):
        load_data(scored)
    # ... or a structure deeper down (a message's content as a list of parts among strings), found by bisection
    chats = [{"prompt": [user(f"p{i}")], "chosen": [user("c")], "rejected": [user("r")]} for i in range(13)]
    chats[9]["prompt"] = [{"role": "user", "content": ["parts"]}]
    with pytest.raises(DataError, match=r"row 9, column 'prompt': its value's structure differs from the rows before"):
        load_data(chats)
    with pytest.raises(DataError, match="got tuple — load it first"):
        tokenize_preferences(tuple(listed), tokenizer)


# ---------------------------------------------------------------------------------------------- column mapping


def test_distilabel_orca_columns_system_and_metadata():
    data = prepare_preferences(FIXTURES / "distilabel_orca.jsonl", columns={"prompt": "input"})
    raw = [json.loads(line) for line in (FIXTURES / "distilabel_orca.jsonl").read_text().splitlines()]
    assert data[0]["prompt"] == f"{raw[0]['system']}\n\n{raw[0]['input']}"  # our system template
    assert data[1]["prompt"] == raw[1]["input"]  # empty system: unchanged
    assert data["status"] == [r["status"] for r in raw] and data["rating"] == [r["rating"] for r in raw]
    assert data["chosen_score"] == [r["chosen_score"] for r in raw]


def test_rating_column_aliases_become_scores():
    data = prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 8, "chosen-rating"
                                     : 7, "score_rejected": 2}))  # fmt: skip
    assert data[0]["chosen_score"] == 8 and data[0]["rejected_score"] == 2  # the first alias in our order wins
    assert data[0]["chosen-rating"] == 7  # the other one is kept as it was
    data = prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r", "chosen-rating": 7}))
    assert data[0]["chosen_score"] == 7


def test_missing_and_misspelled_columns_suggest_the_fix():
    with pytest.raises(DataError, match=r"column 'chosen': column not found — did you mean 'choosen'\?"):
        prepare_preferences(rows({"prompt": "p", "choosen": "c", "rejected": "r"}))
    with pytest.raises(DataError, match=r"column 'inptu': column not found — did you mean 'input'\?"):
        prepare_preferences(rows({"input": "p", "chosen": "c", "rejected": "r"}), columns={"prompt": "inptu"})
    with pytest.raises(ConfigError, match=r"option 'columns': unknown value 'promt' — did you mean 'prompt'\?"):
        prepare_preferences(rows({"input": "p", "chosen": "c", "rejected": "r"}), columns={"promt": "input"})
    with pytest.raises(DataError, match="already has a column 'prompt'"):
        prepare_preferences(
            rows({"input": "p", "prompt": "q", "chosen": "c", "rejected": "r"}), columns={"prompt": "input"}
        )


def test_empty_dataset_and_bad_format_option():
    with pytest.raises(DataError, match="no rows"):
        prepare_preferences(datasets.Dataset.from_dict({"chosen": [], "rejected": []}))
    with pytest.raises(ConfigError, match="did you mean 'standard'"):
        prepare_preferences(rows({"chosen": "c", "rejected": "r"}), format="standrd")


# -------------------------------------------------------------------------------------------- implicit prompts


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [("Q: sky? A: blue", "Q: sky? A: black"), ("same start then a", "same start then b"), ("ab", "abc"),
     ("xyz", "xyz"), ("Q: hi A: yes", "Q: hi A: no"), ("a", "b")],
)  # fmt: skip
def test_implicit_string_prompt_matches_trl(chosen, rejected):
    from trl.data_utils import extract_prompt as trl_extract

    expected = trl_extract({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_hh_rlhf_prompt_split_inside_a_word_is_flagged():
    data = prepare_preferences(FIXTURES / "hh_rlhf.jsonl")
    flags = data["prompt_split_mid_word"]
    # rows 0, 1: "blue" vs "black" share "bl"; row 3: "Hi!" vs "Hello" share "H"; row 4: "42" vs "48" share "4".
    # Row 2 differs at the first letter of a word, and TRL's space rule moves the space into the completions.
    assert data[1]["prompt"].endswith("The answer is bl") and data[1]["chosen"] == "ue."
    assert data[2]["prompt"].endswith("Assistant:") and data[2]["chosen"] == " Knead and bake."
    assert flags == [True, True, False, True, True]


def test_conversational_implicit_prompt_takes_whole_shared_turns():
    data = prepare_preferences(FIXTURES / "ultrafeedback_binarized.jsonl")
    multi = data[len(data) - 1]  # three shared turns, then the answers differ
    assert [m["content"] for m in multi["prompt"]] == ["Translate 'good morning' into French.", "Bonjour.",
                                                        "And in Spanish?"]  # fmt: skip
    assert multi["chosen"] == [assistant("Buenos dias.")] and multi["rejected"] == [assistant("Bonjour.")]
    assert data[0]["prompt"] == [user("What color is the sky on a clear day?")]


def test_string_prompt_with_assistant_completions_becomes_a_user_turn():
    data = prepare_preferences(rows({"prompt": "Hi?", "chosen": [assistant("Hello.")], "rejected": [assistant("No.")]}))
    assert data[0]["prompt"] == [user("Hi?")]


# ------------------------------------------------------------------------------------------ system and input


def test_system_column_for_conversations():
    data = prepare_preferences(
        rows(
            {"prompt": [user("Hi?")], "chosen": [assistant("Hello.")], "rejected": [assistant("No.")],
             "system": "Be kind."},
            {"prompt": [{"role": "system", "content": "Own."}, user("Hi?")], "chosen": [assistant("Hello.")],
             "rejected": [assistant("No.")], "system": "Be kind."},
        )
    )  # fmt: skip
    assert data[0]["prompt"] == [{"role": "system", "content": "Be kind."}, user("Hi?")]
    assert data[1]["prompt"][0]["content"] == "Own."  # the conversation's own system message wins
    assert "system" not in data.column_names


def test_input_column_joined_by_the_template():
    data = prepare_preferences(
        rows({"prompt": "Summarize.", "input": "A long text.", "chosen": "c", "rejected": "r"},
             {"prompt": "Summarize.", "input": "", "chosen": "c", "rejected": "r"}),
        input_template="{prompt}\nInput: {input}",
    )  # fmt: skip
    assert data["prompt"] == ["Summarize.\nInput: A long text.", "Summarize."]
    conv = prepare_preferences(
        rows(
            {
                "prompt": [user("Summarize.")],
                "context": "Text.",
                "chosen": [assistant("S.")],
                "rejected": [assistant("X")],
            }
        )
    )
    assert conv[0]["prompt"] == [user("Summarize.\n\nText.")]
    with pytest.raises(ConfigError, match="option 'input_template'"):
        prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r"}), input_template="{prompt} {text}")
    # a row with both: the context was dropped without a word
    both = prepare_preferences(
        rows({"prompt": "Q.", "input": "In.", "context": "Ctx.", "chosen": "c", "rejected": "r"})
    )
    assert both["prompt"] == ["Q.\n\nIn.\n\nCtx."]


TOOL_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] %}{{ m['content'] }}{% endif %}"
                 "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} "
                 "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip


@pytest.mark.parametrize("source", ["rows", "parquet"])
def test_tool_call_arguments_keep_their_own_keys(source, tmp_path):
    import pyarrow
    import pyarrow.parquet

    from fastdpo.data.sft import tokenize_sft

    def call(name, arguments):
        return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": arguments}}]}  # fmt: skip

    pairs = [{"prompt": [user("Weather?")], "chosen": [call("weather", {"city": "Paris"})],
              "rejected": [assistant("Sun.")]},
             {"prompt": [user("Cats?")], "chosen": [call("search", {"query": "cats", "limit": 3})],
              "rejected": [assistant("Nice.")]},
             {"prompt": [user("Map?")], "chosen": [call("map", {"options": {"zoom": 2}})],
              "rejected": [assistant("No.")]},
             {"prompt": [user("Map!")], "chosen": [call("map", {"options": {"style": "dark"}})],
              "rejected": [assistant("No!")]}]  # fmt: skip
    data = pairs
    if source == "parquet":  # pyarrow's structs: every call gets every key any row's call has, None-filled
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(pairs), tmp_path / "calls.parquet")
        data = str(tmp_path / "calls.parquet")
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenized = tokenize_preferences(prepare_preferences(data), tokenizer).dataset
    for row, pair in zip(tokenized, pairs, strict=True):  # rendered with "limit": null, "query": null before
        whole = tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=True, return_dict=True)
        assert row["prompt_ids"] + row["chosen_ids"] == whole["input_ids"]
    sft = tokenize_sft([{"messages": p["prompt"] + p["chosen"]} for p in pairs], tokenizer).dataset
    assert sft[0]["input_ids"] == tokenizer.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"],
                                                                return_dict=True)["input_ids"]  # fmt: skip


def test_whole_transcripts_next_to_their_prompt_are_warned_about_and_kept(caplog):
    prompt = "\n\nHuman: Sky?\n\nAssistant:"
    transcript = {"prompt": prompt, "chosen": prompt + " Blue.", "rejected": prompt + " Green."}
    plain = {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."}
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.formats"):
        data = prepare_preferences(rows(plain, transcript, transcript))
    assert "2 of 3 rows have a chosen and a rejected that both begin with their prompt (rows [1, 2])" in caplog.text
    assert data[1]["chosen"] == prompt + " Blue."  # kept: a completion may repeat its prompt on purpose
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.formats"):
        prepare_preferences(rows(plain))
    assert "begin with their prompt" not in caplog.text


def test_message_lists_written_as_text_are_warned_about(tmp_path, caplog):
    # a DataFrame of message lists saved to CSV: its cells are JSON (or Python's str of a list), read as strings,
    # checked as fine and trained on as that text, brackets and all, without a word
    import pandas

    said = [{"role": "user", "content": "2+2?"}]
    frame = pandas.DataFrame({"prompt": [json.dumps(said), str(said), "plain?"],
                              "chosen": [json.dumps([{"role": "assistant", "content": "4"}]), "4", "[{not json"],
                              "rejected": ["5", "5", "[1, 2]"]})  # fmt: skip
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.formats"):
        prepared = prepare_preferences(tmp_path / "pairs.csv")
    assert ("2 of 3 rows hold message lists written as text in prompt (2), chosen (1) (rows [0, 1]): they are "
            "trained on as that text") in caplog.text  # fmt: skip
    assert prepared[0]["prompt"] == json.dumps(said)  # (kept as given: a warning, not a change)
    # the other ways lists get written: pretty-printed JSON, a NumPy array's print (Dataset.to_pandas().to_csv()),
    # ShareGPT's keys; not a bracket that starts a text
    import numpy

    answers = [json.dumps([{"role": "assistant", "content": "4"}], indent=2),
               str(numpy.array([{"role": "assistant", "content": "4"}, {"role": "user", "content": "ok"}])),
               json.dumps([{"from": "gpt", "value": "4"}]), "[{ a bracket", "[{}]"]  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.formats"):
        prepare_preferences(rows(*({"prompt": "p", "chosen": answer, "rejected": "r"} for answer in answers)))
    assert "3 of 5 rows hold message lists written as text in chosen (3) (rows [0, 1, 2])" in caplog.text
    assert "json.loads, or ast.literal_eval" in caplog.text


def test_whole_conversations_next_to_a_prompt_of_their_first_turns():
    # the turns were kept in both: the model was trained on the user's question twice
    row = {"prompt": [user("Q?")], "chosen": [user("Q?"), assistant("A.")], "rejected": [user("Q?"), assistant("B.")]}
    data = prepare_preferences(rows(row, {"prompt": [user("R?")], "chosen": [assistant("C.")],
                                          "rejected": [assistant("D.")]}))  # fmt: skip
    assert data[0] == {**data[0], "prompt": [user("Q?")], "chosen": [assistant("A.")], "rejected": [assistant("B.")]}
    assert data[1]["chosen"] == [assistant("C.")]  # completions that do not repeat the prompt: as they are


# ------------------------------------------------------------------------------------------------- bad rows


def test_mixed_formats_name_the_first_bad_row():
    data = rows({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "r"},
                {"prompt": "p", "chosen": None, "rejected": "r"})  # fmt: skip
    with pytest.raises(DataError, match=r"row 2, column 'chosen': expected a string as the data's answers are, got N"):
        prepare_preferences(data)
    with pytest.raises(DataError, match=r"row 0, column 'chosen': expected a list of messages"):
        prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r"}), format="conversational")
    with pytest.raises(DataError, match=r"row 1, column 'rejected': is empty"):
        prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c",
                                                                                   "rejected": "  "}))  # fmt: skip


def test_a_list_that_is_no_message_list_is_said_why():
    # an empty list, a message without 'role' and ShareGPT's {"from", "value"} were all "got list" (or, where Arrow
    # filled the missing 'role' with None, refused at tokenization with no word of ShareGPT's keys)
    chats = [{"prompt": [user("q")], "chosen": [assistant("y")], "rejected": [assistant("x")]}]
    cases = (({"chosen": []}, "chosen", "got an empty list"),
             ({"prompt": [{"content": "q"}]}, "prompt", r"got a list whose first item has no 'role' \('content'\)"),
             ({"chosen": ["y"]}, "chosen", "got a list of str"))  # fmt: skip
    for change, column, said in cases:
        with pytest.raises(DataError, match=rf"row 0, column '{column}': expected .*{said}"):
            prepare_preferences(rows({**chats[0], **change}))
    with pytest.raises(DataError, match="row 1, column 'chosen': expected a list of messages as the data's answers "
                                        "are, got an empty list"):  # fmt: skip
        prepare_preferences(rows(chats[0], {**chats[0], "chosen": []}))
    sharegpt = {**chats[0], "chosen": [{"from": "gpt", "value": "y"}]}
    with pytest.raises(DataError, match=r"got a list of ShareGPT messages \('from', 'value': rename 'from' and "):
        prepare_preferences(rows(sharegpt))
    prepared = prepare_preferences(rows(chats[0], sharegpt))  # (Arrow gives the message every key: 'role' None)
    with pytest.raises(DataError, match=r"row 1, column 'chosen': message 0: no role \(ShareGPT's 'from' and 'value'"):
        tokenize_preferences(prepared, build_tiny_tokenizer())


def test_tokenizer_without_chat_template_or_eos():
    tok = build_tiny_tokenizer()
    conv = prepare_preferences(FIXTURES / "conversational_tools.jsonl")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_preferences(conv, tok)
    tok = build_tiny_tokenizer()
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        tokenize_preferences(prepare_preferences(rows({"prompt": "p", "chosen": "c", "rejected": "r"})), tok)
    with pytest.raises(ConfigError, match="did you mean 'keep_end'"):
        tokenize_preferences(conv, build_tiny_tokenizer(), truncation_mode="keep_ends")


def test_conversations_that_share_no_first_message_have_no_prompt_to_render():
    # the first user turn differs by a space: the prompt taken out is empty (a ValueError deep inside Dataset.map)
    from test_bad_inputs import STRICT_TEMPLATE

    from fastdpo.data.quality import check_preferences

    chat = build_tiny_tokenizer()
    chat.chat_template = STRICT_TEMPLATE

    def pair(asked: str, rejected_asked: str) -> dict:
        return {
            "chosen": [{"role": "user", "content": asked}, {"role": "assistant", "content": "yo"}],
            "rejected": [{"role": "user", "content": rejected_asked}, {"role": "assistant", "content": "no"}],
        }

    data = prepare_preferences(datasets.Dataset.from_list([pair("hi", "hi"), pair("hi", "hi ")]))
    with pytest.raises(DataError, match=r"row 1, column 'prompt': the prompt is an empty conversation.*\(empty\)"):
        tokenize_preferences(data, chat)
    assert 1 in check_preferences(data, chat).rows["empty"]  # the filter drops it


def test_a_text_column_left_unread_beside_an_implicit_prompt_is_said(caplog):
    # question/chosen/rejected without a column map: the prompt was what the answers share (mostly nothing) and
    # 'question' was never read, with no word of it (the CLI then dropped 18 of 24 pairs as empty)
    import logging

    rows = datasets.Dataset.from_list([{"question": "Sky?", "chosen": " Blue.", "rejected": " Red.", "id": "a"}])
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepare_preferences(rows)
    assert "no prompt column" in caplog.text and "the text column 'question' is not read" in caplog.text
    assert "columns={'prompt': 'question'}" in caplog.text
    caplog.clear()
    # distilabel's Orca pairs: the question in 'input', joined after the implicit prompt as context; the map
    # suggested was of a metadata column ('labelling_model')
    orca = load_data(FIXTURES / "distilabel_orca.jsonl")
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepare_preferences(orca)
    assert "'input' joined after it as context; if 'input' holds the prompt, map it: columns={'prompt': 'input'}" \
        in caplog.text  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepare_preferences(rows, columns={"prompt": "question"})
        prepare_preferences(rows.remove_columns("question"))  # (an id column is no prompt)
        # whole conversations (dpo-mix-7k's layout) carry their prompt: its dataset/*_model columns are no prompt
        turns = [{"role": "user", "content": "Sky?"}]
        prepare_preferences([{"chosen": [*turns, {"role": "assistant", "content": "Blue."}],
                              "rejected": [*turns, {"role": "assistant", "content": "Red."}],
                              "dataset": "mix", "chosen_model": "a"}])  # fmt: skip
    assert "no prompt column" not in caplog.text


def test_a_data_file_named_without_its_suffix_is_suggested(tmp_path, monkeypatch):
    # dataset_name: pairs beside pairs.jsonl went to the hub: "Couldn't reach 'pairs' on the Hub", nothing more
    from fastdpo.data.load import load_stream

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # (no hub here: at once)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "B."}) + "\n")
    for load in (load_data, load_stream):
        with pytest.raises(DataError, match="pairs: no file or folder of that name here, .* — give the file's whole "
                           "name: pairs.jsonl"):  # fmt: skip
            load("pairs")
