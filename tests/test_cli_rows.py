"""The ``fastdpo`` command names a row the trainer drops or refuses by its row in the data file: it hands the trainer
what is left once it dropped rows itself (refused by preparation, the quality filter's, the held-out ones), and the
trainer's own warnings, errors and ``dropped_rows.json`` numbered the rows among those it was given."""

from __future__ import annotations

import json
import random

import pytest
from test_cli import in_process

pytestmark = pytest.mark.slow
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "big", "red", "tree"]
LONG = [6, 11, 17]  # rows whose prompt fills max_length (24 tokens): tokenization drops them, as TRL does


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory):
    import torch
    from tiny_tokenizer import build_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli_rows")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            **ids,
        )
    ).save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=24,
                               **ids)).save_pretrained(root / "gpt2")  # fmt: skip
    for name in ("llama", "gpt2"):
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    pairs = [{"prompt": _text(rng, 2, 5) + "?", "chosen": " " + _text(rng, 1, 4) + ".",
              "rejected": " " + _text(rng, 1, 4) + "."} for _ in range(24)]  # fmt: skip
    pairs[1]["chosen"] = ""  # refused by preparation: data_filter drops it
    pairs[3]["chosen"] = pairs[3]["rejected"]  # the quality filter drops it ("identical")
    for row in LONG:
        pairs[row]["prompt"] = _text(rng, 40, 40)
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    sft = [{"prompt": pair["prompt"], "completion": pair["chosen"] or " yes."} for pair in pairs]
    sft[2]["completion"] = ""  # refused by preparation: dropped
    (root / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sft))
    return root


def _run(rows_dir, monkeypatch, capsys, command: str, *flags: str):
    common = ["--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size",
              "4", "--overwrite"]  # fmt: skip
    return in_process(command, *common, *flags, cwd=rows_dir, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.parametrize("held_out", [[], ["--eval_fraction", "6", "--eval_strategy", "steps", "--eval_steps", "1"]])
@pytest.mark.parametrize(
    ("command", "data", "reason"),
    [("dpo", "pairs.jsonl", "prompt_fills_max_length"), ("sft", "sft.jsonl", "no_labels_after_truncation")],
)
def test_a_runs_tokenization_drops_name_the_files_rows(rows_dir, monkeypatch, capsys, caplog, held_out, command, data,
                                                       reason):  # fmt: skip
    # DPO: rows 1 and 3 removed before the trainer, which named the long rows 6, 11, 17 as 4, 9, 15 (its own places);
    # SFT: keep_start cuts the long rows' completions away (no label left), named among the rows given (row 2 out)
    done = _run(rows_dir, monkeypatch, capsys, command, "--model_name_or_path", "llama", "--dataset_name", data,
                "--max_length", "24", "--output_dir", command, *held_out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    dropped = json.loads((rows_dir / command / "dropped_rows.json").read_text())
    named = [row for split in dropped.values() for row in split.get(reason, [])]
    assert sorted(named) == LONG, dropped  # each long row once, by its row in the file, wherever it went
    for split, reasons in dropped.items():
        rows = reasons.get(reason, [])
        assert (f"{split} data: {len(rows)} of" in caplog.text and f"(rows {', '.join(map(str, rows))})" in caplog.text
                if rows else True), caplog.text  # the warning too  # fmt: skip
    if command == "dpo":
        assert set(dropped) == ({"train", "eval"} if held_out else {"train"})
        quality = json.loads((rows_dir / "dpo" / "data_quality.json").read_text())
        assert quality["rows"]["identical"] == [3]  # (the report named the file's rows before: unchanged)


def test_a_row_the_model_cannot_hold_is_named_as_the_file_numbers_it(rows_dir, monkeypatch, capsys):
    # GPT-2's 24 positions: the first long row (file row 6) is refused before training, named row 4 before
    done = _run(rows_dir, monkeypatch, capsys, "dpo", "--model_name_or_path", "gpt2", "--dataset_name", "pairs.jsonl",
                "--max_length", "1000", "--output_dir", "gpt2_dpo")  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "fastdpo: error: row 6, column 'prompt_ids': a sequence of" in done.stderr, done.stderr[-2000:]


def test_rows_are_named_as_their_source_numbers_them_within_numbered_as_only():
    from fastdpo.data.source_rows import numbered_as, rows_of, source_dropped, source_rows
    from fastdpo.errors import DataError

    with numbered_as({"train": [0, 2, 5, 9], "eval": None}):
        assert source_rows("train", [1, 3]) == [2, 9]
        assert source_rows("eval", [1, 3]) == [1, 3]  # (no entry: its own numbering)
        assert source_dropped({"train": {"too_long": [3]}, "eval": {"too_long": [3]}}) == {
            "train": {"too_long": [9]}, "eval": {"too_long": [3]}}  # fmt: skip
        with pytest.raises(DataError, match="^row 5, column 'prompt': bad") as caught, rows_of("train"):
            raise DataError("bad", row=2, column="prompt", fix="fix it")
        assert caught.value.fix == "fix it"
        with pytest.raises(DataError, match="^row 2, column 'prompt'"), rows_of("eval"):
            raise DataError("bad", row=2, column="prompt")
    assert source_rows("train", [1, 3]) == [1, 3]  # (outside: the rows given)


@pytest.mark.parametrize("command", ["dpo", "sft"])
def test_each_rows_file_row_through_refusal_split_and_filter(tmp_path, command):
    # Dataset.select of consecutive rows keeps no indices: numbering read from them failed where the held-out rows,
    # or the rows the filter kept, were consecutive (eval_fraction 1: TypeError; row 0 filtered alone: rows off by 1)
    import itertools
    import re

    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits
    from fastdpo.errors import DataError

    def ident(row) -> int:  # (each row's prompt names its file row)
        return int(re.search(r"q(\d+)", json.dumps(row)).group(1))

    rng, checked = random.Random(0), 0
    for fraction, (identical, refused) in itertools.product((None, 1.0, 3.0, 0.3), (((), ()), ((0,), ()),
                                                            ((0, 1), (11,)), ((5,), (2,)))):  # fmt: skip
        pairs = [{"prompt": f"q{i} {_text(rng, 2, 5)}?", "chosen": f" {_text(rng, 1, 4)}.",
                  "rejected": f" x {_text(rng, 1, 4)}."} for i in range(12)]  # fmt: skip
        for row in identical if command == "dpo" else ():
            pairs[row]["chosen"] = pairs[row]["rejected"]
        for row in refused:
            pairs[row]["chosen"] = ""
        rows = pairs if command == "dpo" else [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
        rows = [{**row, "__fastdpo_file_row__": "a file's own"} for row in rows]  # (the name the numbering takes)
        path = tmp_path / f"{command}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        numbering, case = {}, (fraction, identical, refused)
        try:
            train, evaluation, _ = loaded_splits(command, RunArguments(dataset_name=str(path), eval_fraction=fraction),
                                                 0, numbering=numbering)  # fmt: skip
        except DataError as error:  # a held-out part of refused or filtered rows alone: nothing to evaluate on
            assert fraction in (1.0, 3.0) and "every" in str(error), case
            continue
        checked += 1
        assert numbering["train"] == [ident(row) for row in train], case
        assert "__fastdpo_file_row__" not in train.column_names  # (the trainer gets the rows as given)
        if fraction is None:
            assert evaluation is None and numbering["eval"] is None, case
        else:
            assert numbering["eval"] == [ident(row) for row in evaluation], case
        gone = set(refused) | (set(identical) if command == "dpo" else set())
        assert not gone & set(numbering["train"] + (numbering["eval"] or [])), case
    assert checked >= 12  # (of 16 cases)


def test_a_runs_held_out_rows_are_data_splits_where_rows_have_no_prompt_column(tmp_path):
    # a row preparation refuses is a group of its own, keyed on the row as given: the numbering column in that key
    # moved every group's seeded place, and the run held out other rows than `fastdpo data split` on the same file
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits
    from fastdpo.data import load_data
    from fastdpo.data.split import split_pairs

    rng, words = random.Random(1), WORDS  # (the draws of a case that moved)
    rows = []
    for i in range(40):
        asked = f"Human: q{i} " + " ".join(rng.choice(words) for _ in range(4)) + "\n\nAssistant:"
        rows.append({"chosen": f"{asked} yes {rng.choice(words)}", "rejected": f"{asked} no {rng.choice(words)}"})
    for row in (3, 11, 12, 25, 31):
        rows[row]["chosen"] = ""  # refused (empty): dropped by the run, kept as its own group by the split
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    numbering = {}
    loaded_splits("dpo", RunArguments(dataset_name=str(path), eval_fraction=0.25), 0, numbering=numbering)
    _, held_out = split_pairs(load_data(str(path)), test_size=0.25, seed=0)
    expected = sorted(rows.index(row) for row in held_out.to_list() if row["chosen"])
    assert numbering["eval"] == expected


def test_data_split_and_a_runs_eval_fraction_hold_out_the_same_rows_by_default(tmp_path, monkeypatch):
    # README: eval_fraction holds rows out as `data split` does; with their defaults they did not (the split's seed
    # was 0, a run's is TrainingArguments' 42): other eval rows, other eval losses
    from fastdpo.cli import RunArguments, main
    from fastdpo.cli_model import loaded_splits
    from fastdpo.train import DPOConfig

    rows = [{"prompt": f"q{i} {WORDS[i % len(WORDS)]}", "chosen": " yes", "rejected": " no"} for i in range(24)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "split", "pairs.jsonl", "train.jsonl", "eval.jsonl", "--test-size", "0.25"]) == 0
    split_eval = [json.loads(line)["prompt"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    seed = DPOConfig(output_dir=str(tmp_path / "run")).seed  # a run's default seed
    _, held_out, _ = loaded_splits("dpo", RunArguments(dataset_name=str(path), eval_fraction=0.25), seed)
    assert sorted(held_out["prompt"]) == sorted(split_eval) and len(split_eval) == 6


def test_sft_data_split_and_a_runs_eval_fraction_hold_out_the_same_rows(tmp_path, monkeypatch):
    # `data split` refused SFT rows ("column 'chosen': column not found"), and `fastdpo sft`'s eval_fraction split
    # the rows left after preparation: a refused row moved the draw, other rows were held out. Now both split the
    # rows as given (a refused row its own group), in each SFT layout, under a column map too
    from fastdpo.cli import RunArguments, main
    from fastdpo.cli_model import loaded_splits

    monkeypatch.chdir(tmp_path)
    talk = [{"messages": [{"role": "user", "content": f"q{i} {WORDS[i % len(WORDS)]}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(30)]  # fmt: skip
    talk[9]["messages"][1]["content"] = None  # refused (no content), dropped by the run, held out by the split
    talk[17]["messages"] = [talk[16]["messages"][0], {"role": "assistant", "content": "other"}]  # (a group of 2)
    pairs = [{"question": f"q{i} {WORDS[i % len(WORDS)]}", "completion": f" a{i}"} for i in range(30)]
    pairs[7]["completion"], pairs[20]["completion"] = "", None
    texts = [{"body": f"q{i} {WORDS[i % len(WORDS)]}"} for i in range(30)]
    texts[19]["body"] = ""
    cases = {"talk": (talk, {}), "pairs": (pairs, {"prompt": "question"}), "texts": (texts, {"text": "body"})}
    for name, (rows, columns) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        flags = ["--columns", json.dumps(columns)] if columns else []
        assert main(["data", "split", f"{name}.jsonl", f"{name}_t.jsonl", f"{name}_e.jsonl", "--test-size", "0.25",
                     *flags]) == 0, name  # fmt: skip
        renamed = [{ours: row[theirs] for ours, theirs in columns.items()} | {k: v for k, v in row.items() if k not in
                   columns.values()} for row in rows]  # fmt: skip
        written = (tmp_path / f"{name}_e.jsonl").read_text().splitlines()
        split_eval = [renamed.index(json.loads(line)) for line in written]
        numbering = {}
        loaded_splits("sft", RunArguments(dataset_name=f"{name}.jsonl", eval_fraction=0.25, dataset_columns=columns or
                      None), 42, numbering=numbering)  # fmt: skip
        refused = {9} if name == "talk" else {7, 20} if name == "pairs" else {19}
        assert numbering["eval"] == [row for row in split_eval if row not in refused], name
        assert len(split_eval) in (7, 8) and (name != "talk" or (16 in split_eval) == (17 in split_eval)), name


def test_refused_rows_never_make_a_held_out_part_and_sharegpt_questions_stay_on_one_side(tmp_path, monkeypatch):
    # a refused row's group of its own could be the whole held-out part, which preparation then emptied: the run
    # failed ("row 4, column 'text': is empty" with data_filter drop); ShareGPT's answers are "gpt" turns, so a whole
    # conversation was its question's key and a question went to both sides; a map to SFT's names on a file with
    # preference columns was refused ("unknown value 'completion'")
    from fastdpo.cli import RunArguments, main
    from fastdpo.cli_model import loaded_splits

    monkeypatch.chdir(tmp_path)
    texts = [{"text": f"text number {i}"} for i in range(10)]
    texts[4]["text"] = ""
    pairs = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(9)]
    pairs[4]["chosen"] = None
    for command, rows in (("sft", texts), ("dpo", pairs)):
        (tmp_path / f"{command}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        for seed in range(12):  # (seed 0 held out the refused SFT row alone, seed 6 the DPO one)
            numbering = {}
            loaded_splits(command, RunArguments(dataset_name=f"{command}.jsonl", eval_fraction=1), seed,
                          numbering=numbering)  # fmt: skip
            assert len(numbering["eval"]) == 1 and 4 not in numbering["eval"] + numbering["train"], (command, seed)
    talks = [{"conversations": [{"from": "human", "value": f"question {i % 4}"},
                                {"from": "gpt", "value": f"answer {i}"}]} for i in range(12)]  # fmt: skip
    (tmp_path / "talks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in talks))
    assert main(["data", "split", "talks.jsonl", "t_train.jsonl", "t_eval.jsonl", "--test-size", "0.25"]) == 0

    def asked(name):
        return {json.loads(line)["conversations"][0]["value"] for line in (tmp_path / name).read_text().splitlines()}

    assert asked("t_eval.jsonl") and not asked("t_train.jsonl") & asked("t_eval.jsonl")
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs if row["chosen"]))
    assert main(["data", "split", "prefs.jsonl", "p_train.jsonl", "p_eval.jsonl", "--test-size", "2", "--columns",
                 '{"completion": "chosen"}']) == 0  # fmt: skip
    assert "completion" in json.loads((tmp_path / "p_eval.jsonl").read_text().splitlines()[0])
    from fastdpo.errors import DataError

    (tmp_path / "body.jsonl").write_text("".join(json.dumps({"body": row["text"]}) + "\n" for row in texts))
    with pytest.raises(DataError) as error:  # (it named 'text', which the file has not)
        loaded_splits("sft", RunArguments(dataset_name="body.jsonl", data_filter="none"), 0, text_field="body")
    assert error.value.column == "body" and error.value.row == 4


def test_a_runs_quality_report_names_rows_as_data_check_does(tmp_path):
    # the run's data_quality.json named other rows by their place after the refused ones ("of row 4" for the file's
    # row 5), and the rows preparation refused (an empty answer) were counted, not listed
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits
    from fastdpo.data import check_preferences, load_data

    rows = [{"prompt": f"question {i}?", "chosen": f" yes {i}.", "rejected": f" no {i} at all."} for i in range(12)]
    rows[1]["chosen"] = ""  # refused by the preparation
    rows[4].update(prompt=None, chosen="")  # refused, for two reasons (data check lists both)
    rows[6] = dict(rows[5])  # a duplicate of row 5
    rows[9] = {"prompt": rows[8]["prompt"], "chosen": rows[8]["rejected"], "rejected": rows[8]["chosen"]}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = loaded_splits("dpo", RunArguments(dataset_name=str(path)), 42)[2]
    run = json.loads(files["data_quality.json"])
    check = check_preferences(load_data(str(path)))  # `fastdpo data check`'s: every row of the file, in place
    assert run["rows"] == check.rows
    assert check.rows == {"missing_field": [4], "empty": [1, 4], "duplicate": [6], "contradictory": [8, 9]}
    assert run["counts"] == check.counts and run["num_rows"] == check.num_rows == 12
    for row in (6, 8, 9):
        assert run["details"][str(row)] == check.details[row]  # "duplicate (of row 5)", "row 9 prefers ..."
    for row in (1, 4):  # (and said not to be trained on)
        assert run["details"][str(row)] == [*check.details[row], "refused by the preparation: not trained on"]


def test_a_runs_quality_report_counts_the_eval_rows_preparation_refused(tmp_path):
    # removed_eval held the quality filter's drops alone: an empty answer in the test split went uncounted
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits

    rows = [{"prompt": f"q{i}?", "chosen": f" yes {i}.", "rejected": f" no {i}."} for i in range(6)]
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    test = [rows[4], {**rows[5], "chosen": ""}]  # (refused by the preparation)
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in test))
    _, evaluation, files = loaded_splits("dpo", RunArguments(dataset_name=str(folder), dataset_test_split="test"), 42)
    assert len(evaluation) == 1 and json.loads(files["data_quality.json"])["removed_eval"] == {"empty": 1}
    assert "Evaluation rows removed: {'empty': 1}" in files["data_quality.md"]


@pytest.mark.parametrize("held_out", [[], ["--eval_fraction", "0.25", "--eval_strategy", "steps", "--eval_steps", "1"]])
@pytest.mark.parametrize("command", ["dpo", "sft"])
def test_a_runs_counted_row_warnings_are_given_once_by_the_files_rows(rows_dir, monkeypatch, capsys, held_out, command):
    # the split, each part's preparation, the quality report's and the trainer's each gave them again (three
    # times in a DPO run), the later ones by their parts' own row numbers
    written = json.dumps([{"role": "user", "content": "two and two?"}])
    rows = [{"prompt": written if i % 5 == 0 else f"the cat {i}?", "chosen": f" red {i}.", "rejected": f" big {i}."}
            for i in range(20)]  # fmt: skip
    rows[3]["chosen"], rows[3]["rejected"] = rows[3]["prompt"] + " red.", rows[3]["prompt"] + " big."
    rows[7]["chosen"] = ""  # (refused by preparation, dropped: the rows kept were prepared again, and numbered)
    if command == "sft":
        rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows]
    (rows_dir / f"written_{command}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = _run(rows_dir, monkeypatch, capsys, command, "--model_name_or_path", "llama", "--dataset_name",
                f"written_{command}.jsonl", "--output_dir", f"written_{command}", *held_out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stderr  # (the command's warnings: "fastdpo: warning: ...")
    assert said.count("rows hold message lists written as text") == 1, said
    assert "4 of 20 rows hold message lists written as text in prompt (4) (rows [0, 5, 10, 15])" in said
    if command == "dpo":
        assert said.count("both begin with their prompt") == 1
        assert "1 of 20 rows have a chosen and a rejected that both begin with their prompt (rows [3])" in said
        # without a prompt column, the text column left unread beside it: said once too
        implicit = [{"question": f"the cat {i}?", "chosen": f"Q {i // 3}: red {i}.", "rejected": f"Q {i // 3}: big."}
                    for i in range(20)]  # fmt: skip
        (rows_dir / "implicit.jsonl").write_text("".join(json.dumps(row) + "\n" for row in implicit))
        done = _run(rows_dir, monkeypatch, capsys, command, "--model_name_or_path", "llama", "--dataset_name",
                    "implicit.jsonl", "--output_dir", "implicit", *held_out)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("no prompt column: the prompt is taken from") == 1, done.stderr
