"""split_by_prompt and the data split of the command and a run's eval_fraction: held-out rows grouped by prompt."""

from __future__ import annotations

import json
import logging
import random

import datasets
import pytest

from fastdpo.data.split import split_by_prompt
from fastdpo.errors import ConfigError, DataError

NAN = float("nan")


def repeated_prompt_rows(n: int = 200, num_prompts: int = 37) -> list[dict]:
    """Rows whose prompts repeat with very uneven group sizes (1 to ~25 rows)."""
    rng = random.Random(1)
    weights = [1 + (k % 7) ** 2 for k in range(num_prompts)]
    prompts = rng.choices(range(num_prompts), weights=weights, k=n)
    return [{"prompt": f"prompt {k}", "chosen": f"c{i}", "rejected": f"r{i}", "id": i} for i, k in enumerate(prompts)]


def _prompts(rows) -> set[str]:
    return {json.dumps(r["prompt"], sort_keys=True) for r in rows}


@pytest.mark.parametrize("test_size", [0.1, 0.25, 0.5, 30])
def test_split_keeps_prompts_apart_and_hits_the_target(test_size):
    rows = repeated_prompt_rows()
    train, held_out = split_by_prompt(rows, test_size=test_size, seed=3)
    assert not _prompts(train) & _prompts(held_out)
    assert sorted(r["id"] for r in train + held_out) == list(range(200))
    assert [r["id"] for r in held_out] == sorted(r["id"] for r in held_out)  # input order kept
    largest = max(sum(r["prompt"] == p for r in rows) for p in {r["prompt"] for r in rows})
    target = test_size if isinstance(test_size, int) else test_size * len(rows)
    assert abs(len(held_out) - target) <= largest, (len(held_out), target, largest)
    assert 0 < len(held_out) < len(rows)


def test_split_is_seeded_and_independent_of_row_order():
    rows = repeated_prompt_rows()
    first = split_by_prompt(rows, seed=5)
    assert split_by_prompt(rows, seed=5) == first
    assert any(split_by_prompt(rows, seed=s)[1] != first[1] for s in range(6, 10))
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    _, held_out = split_by_prompt(shuffled, seed=5)
    assert _prompts(held_out) == _prompts(first[1])


def test_split_dataset_matches_list():
    rows = repeated_prompt_rows()
    train, held_out = split_by_prompt(datasets.Dataset.from_list(rows), test_size=0.2, seed=1)
    assert isinstance(train, datasets.Dataset) and isinstance(held_out, datasets.Dataset)
    list_train, list_held_out = split_by_prompt(rows, test_size=0.2, seed=1)
    assert train.to_list() == list_train and held_out.to_list() == list_held_out


def test_split_groups_conversational_prompts():
    def convo(k, flip=False):
        text = f"question {k % 4}"
        turn = {"content": text, "role": "user"} if flip else {"role": "user", "content": text}
        return [{"role": "system", "content": "be nice"}, turn]

    # the same conversation with its dict keys in another order is the same prompt
    rows = [{"prompt": convo(i, flip=(i // 4) % 2 == 1), "chosen": "c", "rejected": "r", "id": i} for i in range(40)]
    train, held_out = split_by_prompt(rows, test_size=0.3, seed=0)
    assert len(_prompts(train)) + len(_prompts(held_out)) == 4
    assert not _prompts(train) & _prompts(held_out)
    # target 12 rows: the first group (10) gets closer, a second (20) would be 8 over instead of 2 under
    assert len(held_out) == 10 and len(_prompts(held_out)) == 1
    _, from_dataset = split_by_prompt(datasets.Dataset.from_list(rows), test_size=0.3, seed=0)
    assert from_dataset["id"][:] == [r["id"] for r in held_out]


def test_sft_rows_split_by_what_they_ask(tmp_path):
    # fastdpo sft's eval_fraction on messages or text rows: refused before ("column 'prompt': column not found")
    from fastdpo.data import prepare_sft, split_sft_by_prompt

    def chat(k, answer):
        return [{"role": "user", "content": f"question {k % 5}"}, {"role": "assistant", "content": answer}]

    rows = [{"messages": chat(i, f"answer {i}")} for i in range(30)]  # 5 questions, each answered 6 ways
    train, held_out = split_sft_by_prompt(prepare_sft(datasets.Dataset.from_list(rows)), test_size=0.2, seed=0)
    asked = [{row["messages"][0]["content"] for row in part} for part in (train, held_out)]
    assert len(train) + len(held_out) == 30 and len(held_out) == 6 and not asked[0] & asked[1]
    from fastdpo.cli import RunArguments  # and as fastdpo sft splits a file
    from fastdpo.cli_model import loaded_splits as _loaded_splits

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, held_out, _ = _loaded_splits("sft", RunArguments(dataset_name=str(tmp_path / "chat.jsonl"),
                                                            eval_fraction=0.2), 0)  # fmt: skip
    assert len(held_out) == 6 and len(train) == 24
    texts = prepare_sft(datasets.Dataset.from_list([{"text": f"line {i % 7}"} for i in range(21)]))
    train, held_out = split_sft_by_prompt(texts, test_size=0.3, seed=1)
    assert not set(train["text"]) & set(held_out["text"]) and len(held_out) == 6
    pairs = prepare_sft(datasets.Dataset.from_list([{"prompt": f"p{i % 3}", "completion": " c"} for i in range(9)]))
    train, held_out = split_sft_by_prompt(pairs, test_size=3, seed=0)
    assert not set(train["prompt"]) & set(held_out["prompt"]) and len(held_out) == 3


def test_split_always_leaves_both_parts_non_empty():
    rows = [{"prompt": "a"}] * 3 + [{"prompt": "b"}] * 5
    for test_size in (0.01, 0.99, 1, 7):
        for seed in range(4):
            train, held_out = split_by_prompt(rows, test_size=test_size, seed=seed)
            assert train and held_out and not _prompts(train) & _prompts(held_out)
    # 0.01 of 8 rows: no group fits, so the smallest one (3 rows) is taken
    assert all(len(split_by_prompt(rows, test_size=0.01, seed=s)[1]) == 3 for s in range(4))


def test_split_errors():
    with pytest.raises(DataError, match="at least 2 distinct prompts, found 1"):
        split_by_prompt([{"prompt": "same", "chosen": str(i)} for i in range(10)])
    with pytest.raises(DataError, match="did you mean 'prompts'\\? pass prompt='prompts'"):
        split_by_prompt([{"prompts": "a"}, {"prompts": "b"}])
    rows = repeated_prompt_rows(20)
    for bad in (0, 0.0, 1.0, -0.1, 1.5, 20, 25, -3, True, "0.1", NAN):
        with pytest.raises(ConfigError, match="test_size"):
            split_by_prompt(rows, test_size=bad)


def test_a_prompt_written_two_ways_stays_on_one_side():
    # a trailing space, \r\n, decomposed accents, None-filled message keys (Dataset.to_list()'s): each was a group of
    # its own, and the same prompt went to train and eval (11 of 21 in the hunt's repro)
    import unicodedata

    rows = []
    for i in range(20):
        text = f"Quelle est la capitale {i} ?\nRéponds."
        for written in (text, text + " ", text.replace("\n", "\r\n"), unicodedata.normalize("NFD", text)):
            rows.append({"prompt": written, "chosen": f" yes {len(rows)}", "rejected": f" no {len(rows)}"})
        said = [{"role": "user", "content": text}]
        rows.append({"prompt": said, "chosen": [{"role": "assistant", "content": "y"}], "rejected": [
            {"role": "assistant", "content": "n"}]})  # fmt: skip
        rows.append({**rows[-1], "prompt": [{**said[0], "tool_calls": None, "name": None}]})
    chats = [row for row in rows if isinstance(row["prompt"], list)]
    texts = [row for row in rows if isinstance(row["prompt"], str)]
    for data in (texts, chats):
        train, held_out = split_by_prompt(data, test_size=0.25, seed=0)
        key = (lambda p: unicodedata.normalize("NFC", p.replace("\r\n", "\n").strip())) if data is texts else (
            lambda p: p[0]["content"])  # fmt: skip
        assert held_out and not {key(r["prompt"]) for r in train} & {key(r["prompt"]) for r in held_out}


def test_data_split_keeps_an_hh_dialogue_on_one_side(tmp_path, monkeypatch, capsys):
    # answers that begin alike ("Sure..."/"Sorry...") carry TRL's extracted prompt into them ("...Assistant: S"):
    # one dialogue had a key per pair, and 13 of 30 went to both sides while the command said "no prompt in both"
    from fastdpo.cli import main

    answers = [("Sure, here it is.", "Sorry, I can't."), ("Yes, gladly.", "No."), ("Sure thing!", "Stop asking.")]
    rows = [{"chosen": f"\n\nHuman: question {q}?\n\nAssistant: {good}", "rejected": f"\n\nHuman: question {q}?\n\n"
             f"Assistant: {bad}"} for q in range(30) for good, bad in answers]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "split", "hh.jsonl", "train.jsonl", "eval.jsonl", "--test-size", "0.3"]) == 0
    dialogues = [{json.loads(line)["chosen"].split("\n\nAssistant:")[0] for line in (tmp_path / name).open()}
                 for name in ("train.jsonl", "eval.jsonl")]  # fmt: skip
    assert dialogues[1] and not dialogues[0] & dialogues[1]


def _hh_rows(answers: list[tuple[str, str]], questions: int = 30) -> list[dict]:
    return [{"chosen": f"\n\nHuman: question {q}?\n\nAssistant:{good}", "rejected": f"\n\nHuman: question {q}?\n\n"
             f"Assistant:{bad}"} for q in range(questions) for good, bad in answers]  # fmt: skip


def _questions(rows) -> set[str]:
    return {(row.get("prompt") or row["chosen"]).split("\n\nAssistant:")[0] for row in rows}


def test_split_by_prompt_keeps_an_hh_question_together_after_preparation():
    # README's recipe (prepare, then split_by_prompt): the prepared prompts of one question's pairs were
    # "...Assistant:", "...Assistant: Sure" (answers that begin alike), and the question went to both sides (5 of 6
    # seeds in a review's repro); a prompt that begins with another whole prompt, then whitespace, joins its group
    from fastdpo.data import prepare_preferences

    answers = [(" Mix flour and water.", " Buy it."), (" Knead it.", " No."), (" Sure! Mix.", " Sure, no.")]
    prepared = prepare_preferences(_hh_rows(answers))
    assert len(set(prepared["prompt"])) == 60  # (two prompts per question: the split's keys differ)
    for seed in range(6):
        train, held_out = split_by_prompt(prepared, test_size=0.25, seed=seed)
        assert held_out and not _questions(train) & _questions(held_out), seed
    # (prepare_preferences marks prompts it took out of the pairs: prompt_split_mid_word; a prompt column has none)
    assert "prompt_split_mid_word" in prepared.column_names


def test_explicit_prompts_are_grouped_exactly_however_they_begin():
    # the implicit prompts' grouping (a prompt going on from another at a whitespace joins it) applied to every
    # prompt column in a review's check: one bare "Summarize the following text." (an empty input) took in all the
    # summaries, and eval held none for seeds 0-2; a set of summaries alone failed ("found 1 distinct prompts")
    task = "Summarize the following text."
    rows = [{"prompt": f"{task}\n\ntext {i} " + "word " * (i % 7), "chosen": " a", "rejected": " b"} for i in range(60)]
    rows.append({"prompt": task, "chosen": " a", "rejected": " b"})
    held_out = split_by_prompt(rows, test_size=0.25, seed=0)[1]
    assert len(held_out) == 15  # (every prompt a group of its own: eval on the target)
    held_out = split_by_prompt(datasets.Dataset.from_list(rows), test_size=0.25, seed=1)[1]
    assert len(held_out) == 15


def test_implicit_prompts_are_cut_at_their_last_line_break_not_before():
    # pairs that differ at the first character after a line break ("...\nBonne" / "...\nMauvaise"): their prompt is
    # cut back to the sentence's line, not the shared header ("Translate to French:" held every pair: none in eval)
    from fastdpo.data.split import split_pairs

    rows = [{"chosen": f"Translate to French:\nsentence {i}\nBonne {i}", "rejected": f"Translate to French:\nsentence "
             f"{i}\nMauvaise {i}"} for i in range(20)]  # fmt: skip
    held_out = split_pairs(datasets.Dataset.from_list(rows), test_size=0.25, seed=0)[1]
    assert len(held_out) == 5


def test_implicit_prompts_that_go_on_at_any_whitespace_stay_together():
    # a continuation at a no-break space (which sorts after the letters) was missed once a prompt that goes on at
    # another character ("Q:x ...") sorted between them, and landed on the other side in 8 of 20 seeds
    from fastdpo.data.split import _within_prompts, prompt_key

    texts = ["Q", "Q\xa0more", "Q:x other", "Q\u3000third", "R", "R more"]
    root = _within_prompts({prompt_key(text): text for text in texts})
    groups = {}
    for text in texts:
        groups.setdefault(root[prompt_key(text)], set()).add(text)
    assert sorted(map(sorted, groups.values())) == [["Q", "Q\xa0more", "Q\u3000third"], ["Q:x other"], ["R", "R more"]]


def test_data_split_keeps_an_hh_question_whose_answers_share_a_first_line_together(tmp_path, monkeypatch, capsys):
    # answers sharing a first line ("Sure.\n...") ended the key with it ("...Assistant: Sure."): cut back to the line
    # break before the key's last line, their pairs went to both sides (3 of 6 seeds) while the command said
    # "no prompt in both"
    from fastdpo.cli import main

    answers = [(" Sure.\nMix flour and water.", " Sure.\nBuy it."), (" Knead it.", " No."),
               (" Sure.\nKnead.", " Sure.\nNo.")]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _hh_rows(answers, 8)))
    for seed in range(6):
        command = ["data", "split", "hh.jsonl", "train.jsonl", "eval.jsonl", "--test-size", "0.25", "--seed", str(seed)]
        assert main([*command, "--overwrite"]) == 0
        parts = [[json.loads(line) for line in (tmp_path / name).open()] for name in ("train.jsonl", "eval.jsonl")]
        assert parts[1] and not _questions(parts[0]) & _questions(parts[1]), seed


def test_data_filter_and_split_write_a_csv_files_cells_as_they_were(tmp_path, monkeypatch, capsys):
    # pandas read the columns other than the text as numbers, booleans and missing values, and the rows kept were
    # written back changed: id "001" as 1, note "NA" as an empty cell, flag "false" as False
    import csv

    from fastdpo.cli import main

    header = ["question", "chosen", "rejected", "id", "note", "flag"]
    rows = [["Hi?", "Hello.", "Go.", "001", "NA", "false"], ["Sky?", "Blue.", "Green.", "002", "", "True"],
            ["2+2?", "4", "5", "1e3", "x", "TRUE"], ["Same?", "Yes.", "Yes.", "004", "nan", "0"]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "in.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    columns = ["--columns", '{"prompt": "question"}']
    assert main(["data", "filter", "in.csv", "kept.csv", *columns]) == 0  # (the last row: identical answers)
    assert main(["data", "split", "in.csv", "train.csv", "eval.csv", "--test-size", "1", *columns]) == 0

    def read(name):
        with open(tmp_path / name, newline="") as handle:
            return list(csv.reader(handle))

    assert read("kept.csv") == [["prompt", *header[1:]], *rows[:3]]  # (under fastdpo's column names, as before)
    assert sorted(read("train.csv")[1:] + read("eval.csv")[1:]) == sorted(rows)
    assert read("train.csv")[0] == read("eval.csv")[0] == ["prompt", *header[1:]]
    assert main(["data", "filter", "in.csv", "kept.jsonl", *columns]) == 0  # (JSON: the values as pandas reads them)
    assert [json.loads(line)["id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()] == [1, 2, 1000]
    # one side to CSV, the other to JSON Lines: each side written as its own kind would (the CSV's "001" was 1.0)
    assert main(["data", "split", "in.csv", "train2.csv", "eval2.jsonl", "--test-size", "2", *columns]) == 0
    held_out = [json.loads(line) for line in (tmp_path / "eval2.jsonl").read_text().splitlines()]
    trained = read("train2.csv")[1:]
    assert len(trained) == 2 and all(row in rows for row in trained)  # (the cells as written)
    assert sorted([row[0] for row in trained] + [pair["prompt"] for pair in held_out]) == sorted(r[0] for r in rows)


def test_a_runs_eval_fraction_holds_out_as_data_split_does(tmp_path, caplog):
    # eval_fraction split the prepared rows: an HH dialogue's implicit prompt carried the answers' shared start
    # ("...Assistant: S"), a key per pair (10 of 20 dialogues in both parts), and a system column joined into the
    # prompt made a question under 3 personas 3 keys (14 of 20 questions in both); `data split` kept them apart
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits
    from fastdpo.errors import ConfigError

    answers = [("Sure, here it is.", "Sorry, I can't."), ("Yes, gladly.", "No."), ("Sure thing!", "Stop asking.")]
    hh = [{"chosen": f"\n\nHuman: question {q}?\n\nAssistant: {good}", "rejected": f"\n\nHuman: question {q}?\n\n"
           f"Assistant: {bad}"} for q in range(20) for good, bad in answers]  # fmt: skip
    personas = [{"system": f"persona {k}", "prompt": f"question {q}?", "chosen": f" answer {k}.",
                 "rejected": f" wrong {k}."} for q in range(20) for k in range(3)]  # fmt: skip
    for name, rows, asked in (("hh", hh, lambda r: r["prompt"].split("\n\nAssistant:")[0]),
                              ("personas", personas, lambda r: r["prompt"].split("\n\n")[-1])):  # fmt: skip
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for fraction in (0.3, 18.0):  # (a whole number is a row count, 18.0 as the flag reads "18" too)
            train, held_out, _ = loaded_splits("dpo", RunArguments(dataset_name=str(path), eval_fraction=fraction), 0)
            assert len(train) + len(held_out) == 60 and len(held_out) in range(15, 22)
            assert not {asked(row) for row in train} & {asked(row) for row in held_out}, name
    with pytest.raises(ConfigError, match=r"option 'eval_fraction': 100 rows out of 60"):
        loaded_splits("dpo", RunArguments(dataset_name=str(path), eval_fraction=100.0), 0)
    # split as given: a CSV's text cells still read as text ("NA" stayed "NA"), an error names the file's row
    import csv

    from fastdpo.errors import DataError

    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["question", "good", "bad"]] + [[f"q{i}?", "NA" if i == 5 else f"y{i}",
                                      "" if i == 8 else f"n{i}"] for i in range(10)])  # fmt: skip
    mapped = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    run = RunArguments(dataset_name=str(tmp_path / "pairs.csv"), eval_fraction=0.2, dataset_columns=mapped,
                       data_filter="none")  # fmt: skip
    with pytest.raises(DataError, match=r"^row 8, column 'bad': .*the column map's 'rejected'"):  # (row 6 of its part)
        loaded_splits("dpo", run, 0)
    run.data_filter = "drop"  # (row 8 dropped, counted, and named as the file numbers it: "rows 6", before)
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        train, held_out, _ = loaded_splits("dpo", run, 0)
    assert "NA" in [*train["chosen"], *held_out["chosen"]]
    assert "dropped 1 rows the preparation refuses: {'missing_field': 1} (rows 8)" in caplog.text


def test_data_commands_never_write_over_a_file_of_an_input_folder(tmp_path, monkeypatch, capsys):
    # the output was compared with the input's path only: a folder's own train.jsonl was written over (24 → 23 rows)
    from fastdpo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(6)]
    written = "".join(json.dumps(pair) + "\n" for pair in pairs)
    (tmp_path / "folder" / "train.jsonl").write_text(written)
    for command in (["filter", "folder", "folder/train.jsonl"], ["split", "folder", "out.jsonl", "folder/train.jsonl"]):
        assert main(["data", *command, "--overwrite"]) == 2
        assert "folder/train.jsonl is a file of the input folder folder" in capsys.readouterr().err
    assert (tmp_path / "folder" / "train.jsonl").read_text() == written
    assert main(["data", "filter", "folder", "folder/kept.jsonl"]) == 0  # (a new file there: nothing lost)


def test_a_question_under_several_system_messages_is_held_out_on_one_side():
    # the system prompt as a column was left out of the key, as a message it was not: 4-5 of 8 questions asked
    # under 3 personas went to both sides (DPO prompts and SFT conversations alike)
    from fastdpo.data.split import split_pairs, split_sft_by_prompt

    def says(role: str, text: str) -> dict:
        return {"role": role, "content": text}

    asked = [[says("system", f"You are persona {p}."), says("user", f"Q{q}?")] for q in range(8) for p in range(3)]
    yes, no = [says("assistant", "Yes.")], [says("assistant", "No.")]
    pairs = datasets.Dataset.from_list([{"prompt": prompt, "chosen": yes, "rejected": no} for prompt in asked])
    talks = datasets.Dataset.from_list([{"messages": prompt + yes} for prompt in asked])
    splits = {"prompt": split_pairs(pairs, test_size=0.25), "messages": split_sft_by_prompt(talks, test_size=0.25)}
    for column, parts in splits.items():
        questions = [{messages[1]["content"] for messages in part[column]} for part in parts]
        assert len(parts[1]) == 6 and questions[1] and not questions[0] & questions[1]


def test_a_folder_of_the_splits_data_split_writes_loads_with_datasets(tmp_path, monkeypatch):
    # the summaries beside the splits (train.jsonl.dropped.json) were read as data by datasets.load_dataset(folder),
    # and so by `trl dpo --dataset_name folder`: DatasetGenerationError; hidden, datasets leaves them alone
    from fastdpo.cli import main
    from fastdpo.data.load import load_data

    monkeypatch.chdir(tmp_path)
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    assert main(["data", "split", "pairs.jsonl", "out/train.jsonl", "out/test.jsonl", "--test-size", "2"]) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        ".test.jsonl.dropped.json", ".train.jsonl.dropped.json", "test.jsonl", "train.jsonl"]  # fmt: skip
    theirs = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))  # (not the user's)
    assert (len(theirs["train"]), len(theirs["test"])) == (6, 2)
    assert len(load_data(tmp_path / "out", split="test")) == 2


def test_the_python_split_draws_by_default_as_the_command_and_a_run_do(tmp_path):
    # split_by_prompt's seed was 0 where `fastdpo data split` and a run's eval_fraction draw with 42: README's
    # "the same rows under the same seed" held only with seed=42 written
    from fastdpo.cli import main as cli
    from fastdpo.data.split import split_pairs

    rows = [{"prompt": f"q{i}?", "chosen": " yes.", "rejected": " no."} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli(["data", "split", str(tmp_path / "pairs.jsonl"), str(tmp_path / "t.jsonl"), str(tmp_path / "e.jsonl"),
                "--test-size", "0.25"]) == 0  # fmt: skip
    written = [json.loads(line)["prompt"] for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(written) == 10
    for split in (split_by_prompt, split_pairs):
        held_out = split(datasets.Dataset.from_list(rows), test_size=0.25)[1]
        assert held_out["prompt"] == written, split.__name__


def test_the_rows_a_split_counts_toward_no_size_are_those_preparation_refuses():
    # split_pairs prepared every row to find them (2.8 s of 50,000 rows), then the run prepared them again: the
    # same checks (check_row's) find them alone now
    import datasets

    from fastdpo.data.refused import prepared_rows, refused_rows

    standard = [{"prompt": f"q{i}?", "chosen": f" a{i}.", "rejected": f" b{i}.", "system": "be brief"}
                for i in range(8)]  # fmt: skip
    standard[1]["chosen"], standard[3]["rejected"], standard[6]["chosen"] = "", None, "   "
    chat = [{"prompt": [{"role": "user", "content": f"q{i}?"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": f"b{i}"}], "tools": None} for i in range(6)]  # fmt: skip
    chat[2]["chosen"], chat[4]["tools"] = [], "{not json"
    for rows, expected in ((standard, {1, 3, 6}), (chat, {2, 4})):
        dataset = datasets.Dataset.from_list(rows)
        assert refused_rows(dataset) == set(prepared_rows(dataset, None)[1]) == expected
    # the whole set's problems are preparation's DataErrors (a split of rows without rejected failed in a KeyError)
    from fastdpo.data.split import split_pairs
    from fastdpo.errors import DataError

    lacking = datasets.Dataset.from_list([{"prompt": f"q{i}?", "chosen": " a."} for i in range(10)])
    for dataset in (lacking, lacking.select([])):
        with pytest.raises(DataError):
            refused_rows(dataset)
    assert sum(map(len, split_pairs(lacking, test_size=0.2))) == 10  # (split as before: the trainers say the rest)
