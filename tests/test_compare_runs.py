"""``fastdpo compare`` reads what the policy's run recorded: the held-out split of a data folder, its data_filter,
a Trainer checkpoint's run settings; a prompts file's system and input fields join its prompts as the trainers join
them; compare.json records the settings its numbers were computed with."""

from __future__ import annotations

import json
import shutil

import pytest
from test_compare_inputs import QUICK, refused, save
from test_compare_pairs import STANDARD
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.cli import main as cli


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_data_folder_a_checkpoint_and_the_runs_data_filter(tmp_path, capsys, monkeypatch):
    # --pairs FOLDER scored its train split as "held-out pairs"; RUN/checkpoint-N read no config.yaml (β 0.1, no cut);
    # a data_filter: none run's pairs were dropped as data_filter: drop drops them
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("run", tokenizer)
    save("reference", tokenizer, seed=1)
    train, test = [STANDARD[0], STANDARD[4]], [STANDARD[0], STANDARD[4], {**STANDARD[0], "rejected": " Blue."}]
    test.append(dict(test[0]))  # a duplicate: data_filter none keeps it, as the run's trainer did
    _write(tmp_path / "data" / "train.jsonl", train)
    _write(tmp_path / "data" / "test.jsonl", test)
    (tmp_path / "run" / "config.yaml").write_text("beta: 0.3\ndata_filter: none\ndataset_test_split: test\n"
                                                  "displacement_margin: null\n")  # fmt: skip
    common = ["--reference", "reference", "--limit", "1", *QUICK]
    assert cli(["compare", "--policy", "run", *common, "--pairs", "data", "--out", "a"]) == 0
    assert "--pairs: the split 'test' of data (run/config.yaml's dataset_test_split)" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert report["pairs"]["pairs"] == 4 and report["pairs"]["dropped_pairs"] == 0  # every pair, as the run kept them
    settings = report["settings"]
    assert settings["beta"] == 0.3 and settings["data_filter"] == "none" and settings["pairs_split"] == "test"
    assert settings["samples"] == 0 and settings["seed"] == 0 and settings["displacement_margin"] is None
    assert settings["quantization"] is None and settings["pairs_columns"] is None
    # a checkpoint of the run: the run's settings, from the folder above
    checkpoint = tmp_path / "run" / "checkpoint-5"
    checkpoint.mkdir()
    for file in (tmp_path / "run").iterdir():
        if file.is_file() and file.name != "config.yaml":
            shutil.copy(file, checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert cli(["compare", "--policy", str(checkpoint), *common, "--pairs", "data", "--out", "b"]) == 0
    out = capsys.readouterr().out
    assert f"{checkpoint} is a checkpoint of the run in {checkpoint.parent}" in out and "beta 0.3:" in out
    assert json.loads((tmp_path / "b" / "compare.json").read_text())["pairs"]["pairs"] == 4
    # a run that recorded no held-out split: the folder's split is asked for, then taken as given
    (tmp_path / "run" / "config.yaml").write_text("beta: 0.3\n")
    line = refused(["--policy", "run", *common, "--pairs", "data", "--out", "c"], capsys)
    assert "option '--pairs-split': data holds several splits" in line and "(its splits: " in line
    assert "train" in line and "test" in line
    assert cli(["compare", "--policy", "run", *common, "--pairs", "data", "--pairs-split", "train", "--out", "d"]) == 0
    assert json.loads((tmp_path / "d" / "compare.json").read_text())["pairs"]["pairs"] == 2
    line = refused(["--policy", "run", *common, "--pairs", "data/test.jsonl", "--pairs-split", "x", "--out", "e"],
                   capsys)  # fmt: skip
    assert "option '--pairs-split': data/test.jsonl is one file, one split" in line
    # one split however given (a saved Dataset, a folder of one file) is read as it is; a missing file is named so
    import datasets

    datasets.Dataset.from_list(test).save_to_disk(tmp_path / "saved")
    _write(tmp_path / "one" / "held_out.jsonl", test)
    for name, folder in (("f", "saved"), ("g", "one")):
        assert cli(["compare", "--policy", "run", *common, "--pairs", folder, "--out", name]) == 0, folder
        assert json.loads((tmp_path / name / "compare.json").read_text())["pairs"]["pairs"] == 3  # (drop: 1 duplicate)
    assert "missing.jsonl: no such file" in refused(["--policy", "run", *common, "--pairs", "missing.jsonl"], capsys)


def test_a_prompts_files_system_and_input_fields_join_its_prompts(tmp_path):
    # {"system": ..., "prompt": ...} generated from the prompt alone, where the trainers (and --pairs) put the system
    # first; a JSON Lines file of plain prompts was refused ("line 1 has no 'prompt' field")
    from fastdpo.compare_io import read_prompts
    from fastdpo.errors import DataError

    messages = [{"role": "user", "content": "Hi"}]
    rows = [{"system": "You are a pirate.", "prompt": "What color is the sky?"},
            {"prompt": "Translate:", "input": "bonjour"},
            {"system": "Be brief.", "prompt": messages},
            "a plain prompt", messages]  # fmt: skip
    path = tmp_path / "p.jsonl"
    _write(path, rows)
    assert [prompt for _, prompt in read_prompts(path)] == [
        "You are a pirate.\n\nWhat color is the sky?", "Translate:\n\nbonjour",
        [{"role": "system", "content": "Be brief."}, *messages], "a plain prompt", messages,
    ]  # fmt: skip
    _write(path, [{"prompt": [5, 6, 7], "system": "Be brief."}])
    with pytest.raises(DataError, match="line 1's system is str beside a tokenized prompt"):
        read_prompts(path)
    for value, said in (
        (3, "line 1's input is int"),
        (0, "line 1's input is int"),
        ([], "line 1's input is list"),
        ("be \ud83d", "line 1's input: "),
    ):  # (falsy ones passed; a lone surrogate failed later)
        _write(path, [{"prompt": "x", "input": value}])
        with pytest.raises(DataError, match=said):
            read_prompts(path)
    _write(path, [{"prompt": "x", "input": "", "system": None}])  # (empty ones change nothing, as in the trainers)
    assert read_prompts(path) == [("line 1", "x")]


def test_hub_pairs_read_with_their_configuration(tmp_path, capsys, monkeypatch):
    # `compare --pairs` of a hub dataset that needs a configuration name could not read it: nothing took one
    from test_cli_inputs import recording_hub

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("run", tokenizer)
    save("reference", tokenizer, seed=1)
    asked = recording_hub(monkeypatch, [STANDARD[0], STANDARD[4]])
    (tmp_path / "run" / "config.yaml").write_text("dataset_name: org/pairs\ndataset_config: en\n"
                                                  "dataset_test_split: test\n")  # fmt: skip
    common = ["--policy", "run", "--reference", "reference", "--limit", "1", *QUICK]
    assert cli(["compare", *common, "--pairs", "org/pairs", "--out", "a"]) == 0  # the run's own dataset: its config
    assert "--pairs: the configuration 'en' of org/pairs (run/config.yaml's dataset_config)" in capsys.readouterr().out
    assert cli(["compare", *common, "--pairs", "org/other", "--pairs-config", "de", "--out", "b"]) == 0
    assert cli(["compare", *common, "--pairs", "org/other", "--out", "c"]) == 0  # another dataset: its default
    assert asked == [("org/pairs", {"split": "test", "name": "en"}), ("org/other", {"split": "test", "name": "de"}),
                     ("org/other", {"split": "test"})]  # fmt: skip
    settings = json.loads((tmp_path / "b" / "compare.json").read_text())["settings"]
    assert settings["pairs_config"] == "de" and settings["pairs_split"] == "test"
    line = refused([*common, "--pairs-config", "de", "--out", "d"], capsys)
    assert line.endswith("option '--pairs-config': names a hub configuration of --pairs, which is not given — add "
                         "--pairs"), line  # fmt: skip
    # a run that recorded no held-out split: a hub dataset's splits are asked of the hub (in the configuration);
    # one is read, several are named (it said only "holds several splits")
    import datasets

    splits = {"org/one": ["test"], "org/two": ["train", "validation"]}
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, config_name: splits[path])
    (tmp_path / "run" / "config.yaml").write_text("beta: 0.3\n")
    assert cli(["compare", *common, "--pairs", "org/one", "--out", "f"]) == 0
    assert asked[-1] == ("org/one", {"split": "test"})
    line = refused([*common, "--pairs", "org/two", "--out", "g"], capsys)
    assert "option '--pairs-split': org/two holds several splits" in line and "(its splits: train, validation)" in line
    _write(tmp_path / "held_out.jsonl", [STANDARD[0]])
    line = refused([*common, "--pairs", "held_out.jsonl", "--pairs-config", "de", "--out", "e"], capsys)
    assert "option '--pairs-config': 'de' names a hub dataset's configuration; held_out.jsonl is a local" in line


def test_pairs_of_the_runs_own_data_are_the_rows_it_held_out(tmp_path, capsys, monkeypatch):
    # --pairs naming the file a run held eval_fraction out of scored every row, the trained ones too, as "held-out":
    # now the rows the run held out, drawn as it drew them, scoring as the run's own evaluation scored them
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("sft", tokenizer)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "sea", "sky", "rain", "snow"]
    rows = [{"prompt": f"Say {word}.", "chosen": f" {word}.", "rejected": f" {words[(i + 3) % 12]}."}
            for i, word in enumerate(words)]  # fmt: skip
    _write(tmp_path / "data" / "train.jsonl", rows)
    (tmp_path / "run.yaml").write_text(
        "model_name_or_path: sft\ndataset_name: data/train.jsonl\neval_fraction: 0.3\nseed: 3\nmax_steps: 2\n"
        "eval_strategy: steps\neval_steps: 2\noutput_dir: run\nreport_to: []\nper_device_train_batch_size: 2\n"
        "per_device_eval_batch_size: 4\nbf16: false\nuse_cpu: true\nlearning_rate: 0.01\nbeta: 0.3\n"
    )
    assert cli(["dpo", "--config", "run.yaml"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(row for row in logged if "eval_rewards/margins" in row)
    capsys.readouterr()
    assert cli(["compare", "--policy", "run", "--reference", "sft", "--pairs", "data/train.jsonl", "--limit", "1",
                *QUICK, "--out", "a"]) == 0  # fmt: skip
    assert "--pairs: the pairs the policy's run held out of data/train.jsonl (run/config.yaml's eval_fraction 0.3, " \
        "drawn with its seed 3)" in capsys.readouterr().out  # fmt: skip
    report = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert report["settings"]["pairs_held_out"] == {"eval_fraction": 0.3, "seed": 3}
    pairs = report["pairs"]
    assert pairs["pairs"] == 4 and pairs["reward_accuracy"] == evaluation["eval_rewards/accuracies"]  # (of 12 rows)
    # fp32: the run's packed evaluation and compare's batched scoring agree to ~1e-6 relative
    assert pairs["reward_margin"] == pytest.approx(evaluation["eval_rewards/margins"], rel=1e-4)
    assert pairs["logps_chosen_policy"] == pytest.approx(evaluation["eval_logps/chosen"], rel=1e-4)
    # the rows fastdpo data split holds out with the run's fraction and seed: the same numbers
    assert cli(["data", "split", "data/train.jsonl", "t.jsonl", "e.jsonl", "--test-size", "0.3", "--seed", "3"]) == 0
    assert cli(["compare", "--policy", "run", "--reference", "sft", "--pairs", "e.jsonl", "--limit", "1", *QUICK,
                "--out", "b"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "b" / "compare.json").read_text())["pairs"] == pairs
    # the run's data reached by another relative path is the run's (its recorded contents); another file under the
    # run's relative name, from another folder, is not (it was cut to "the run's held-out tenth" by the name alone)
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    _write(tmp_path / "elsewhere" / "data" / "train.jsonl", rows[:6])
    shutil.copy(tmp_path / "data" / "train.jsonl", tmp_path / "elsewhere" / "copy.jsonl")  # (its contents: the run's)
    cases = (("../data/train.jsonl", True), ("data/train.jsonl", False), ("copy.jsonl", True))
    for case, (pairs_file, held) in enumerate(cases):
        assert cli(["compare", "--policy", "../run", "--reference", "../sft", "--pairs", pairs_file, "--limit", "1",
                    *QUICK, "--out", f"c{case}"]) == 0  # fmt: skip
        said = capsys.readouterr().out
        assert ("the pairs the policy's run held out" in said) is held, pairs_file
        report = json.loads((tmp_path / "elsewhere" / f"c{case}" / "compare.json").read_text())
        assert report["pairs"]["pairs"] == (4 if held else 6), pairs_file
    # a run of a folder of splits, its train split's file given alone: the run's (it was "held-out", every row)
    shutil.copytree(tmp_path / "run", tmp_path / "folder")
    printed = json.loads((tmp_path / "run" / "data_fingerprint.json").read_text())
    folder_print = {"train": printed["train.jsonl"], "test": printed["train.jsonl"]}
    (tmp_path / "folder" / "data_fingerprint.json").write_text(json.dumps(folder_print))
    (tmp_path / "folder" / "config.yaml").write_text((tmp_path / "folder" / "config.yaml").read_text().replace(
        "dataset_name: data/train.jsonl", "dataset_name: data"))  # fmt: skip
    assert cli(["compare", "--policy", "../folder", "--reference", "../sft", "--pairs", "../data/train.jsonl",
                "--limit", "1", *QUICK, "--out", "f"]) == 0  # fmt: skip
    assert "the pairs the policy's run held out" in capsys.readouterr().out
    assert json.loads((tmp_path / "elsewhere" / "f" / "compare.json").read_text())["pairs"]["pairs"] == 4
    # a mixture's run: its dataset_name (recorded, never read) is not the data it held rows out of
    shutil.copytree(tmp_path / "run", tmp_path / "mix")
    recorded = (tmp_path / "mix" / "config.yaml").read_text()
    (tmp_path / "mix" / "config.yaml").write_text(recorded.replace("datasets: null", "datasets: [{path: x.jsonl}]"))
    assert cli(["compare", "--policy", "../mix", "--reference", "../sft", "--pairs", "../data/train.jsonl", "--limit",
                "1", *QUICK, "--out", "d"]) == 0  # fmt: skip
    assert "held out" not in capsys.readouterr().out
    assert json.loads((tmp_path / "elsewhere" / "d" / "compare.json").read_text())["pairs"]["pairs"] == 12


def test_a_reference_free_run_a_bad_pairs_split_and_files_named_before_the_models_load(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # (no hub here: at once)
    tokenizer = build_tiny_tokenizer()
    save("run", tokenizer)
    save("reference", tokenizer, seed=1)
    _write(tmp_path / "data" / "train.jsonl", [STANDARD[0]])
    _write(tmp_path / "data" / "test.jsonl", [STANDARD[4]])
    common = ["--policy", "run", "--reference", "reference", "--limit", "1", *QUICK]
    # a SimPO run's β (2.0) scales its length-normalized reward: compare's β·(log π − log π_ref) took it, unsaid
    (tmp_path / "run" / "config.yaml").write_text("beta: 2.0\nloss_type: [simpo]\ndataset_test_split: test\n")
    assert cli(["compare", *common, "--pairs", "data", "--out", "a"]) == 0
    out = capsys.readouterr().out
    assert "the policy's run trained without a reference (run/config.yaml: loss_type simpo): its rewards are not " \
        "these" in out and "beta 0.1: the default (the run's beta 2.0 scaled another reward)" in out  # fmt: skip
    assert json.loads((tmp_path / "a" / "compare.json").read_text())["settings"]["beta"] == 0.1
    # a split the folder has not: said as --pairs-split's (it said "option 'split'")
    line = refused([*common, "--pairs", "data", "--pairs-split", "nope", "--out", "b"], capsys)
    assert "option '--pairs-split': data has no file for split 'nope'" in line
    # a mistyped folder name, read as a hub name: named at once (it asked for --pairs-split first)
    (tmp_path / "run" / "config.yaml").write_text("beta: 0.3\n")
    line = refused([*common, "--pairs", "dta", "--out", "c"], capsys)
    assert "dta: no file or folder of that name" in line and "did you mean data?" in line
    # the files are read before the models load: a missing reference folder is not what is said first
    line = refused([*common[:2], "--reference", "gone", "--prompts", "missing.txt", "--out", "d"], capsys)
    assert "option '--prompts': missing.txt is neither 'builtin', 'quickstart' nor a file" in line
    line = refused([*common[:2], "--reference", "gone", "--pairs", "missing.jsonl", "--out", "e"], capsys)
    assert "missing.jsonl: no such file" in line


def test_held_out_csv_rows_of_mapped_columns_are_read_as_the_run_read_them(tmp_path, capsys, monkeypatch):
    # a CSV's mapped text columns were read as pandas reads other columns ("N/A" missing, its row refused): the rows
    # drawn as held out were others than the run's
    import csv

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    save("run", tokenizer)
    save("reference", tokenizer, seed=1)
    prompts = ["N/A", "None", "null", "NA", *(f"q{i}" for i in range(8))]
    with open("pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["question", "good", "bad"])
        writer.writerows([prompt, f" yes {i}.", f" no {i}."] for i, prompt in enumerate(prompts))
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    (tmp_path / "run" / "config.yaml").write_text(f"dataset_name: pairs.csv\ndataset_columns: {json.dumps(columns)}\n"
                                                  "eval_fraction: 0.5\nseed: 42\n")  # fmt: skip
    assert cli(["compare", "--policy", "run", "--reference", "reference", "--pairs", "pairs.csv", "--limit", "1",
                *QUICK, "--out", "a"]) == 0  # fmt: skip
    assert "the pairs the policy's run held out of pairs.csv" in capsys.readouterr().out
    assert cli(["data", "split", "pairs.csv", "t.csv", "e.csv", "--columns", json.dumps(columns), "--test-size",
                "0.5"]) == 0  # fmt: skip
    with open("e.csv", newline="") as file:
        held_out = list(csv.DictReader(file))
    assert any(row["prompt"] in ("N/A", "None", "null", "NA") for row in held_out)  # (written under our names)
    report = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert report["pairs"]["pairs"] == len(held_out) == 6
    assert report["settings"]["pairs_columns"] == columns  # the run's, read with (it recorded null)
