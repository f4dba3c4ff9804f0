"""TRL's dataset mixtures (``datasets:`` in a config, ``DatasetMixtureConfig``): the rows TRL's ``get_dataset`` gives,
each dataset's problems named by its place in the list, and the ``fastdpo`` command training on them (they were
refused: "dataset mixtures are not supported")."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from test_bad_inputs import command_error, jsonl, model_dir, tokenizer, workdir  # noqa: F401
from test_cli_inputs import recording_hub

from fastdpo import cli
from fastdpo.data.mixture import load_mixture, parts_of
from fastdpo.errors import ConfigError, DataError

trl = pytest.importorskip("trl")


def _pairs(tag: str, n: int, **extra) -> list[dict]:
    return [
        {"prompt": f"{tag} {i}?", "chosen": f" {tag} yes {i}.", "rejected": f" {tag} no.", **extra} for i in range(n)
    ]


def _mixture(value, **options):
    rows, sizes = load_mixture(parts_of(value), **options)
    return rows, sizes


def test_the_rows_are_trls(tmp_path, monkeypatch):
    # TRL's get_dataset on the same files and keys (its json builder; fastdpo reads the files as load_data does)
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "a.jsonl", _pairs("a", 7, score=2))
    jsonl(tmp_path / "b.jsonl", _pairs("b", 5, score=3, source="web"))
    jsonl(tmp_path / "c.jsonl", _pairs("c", 3, score=1))
    keep = ["prompt", "chosen", "rejected", "score"]
    cases = [
        [{"path": "json", "data_files": "a.jsonl"}, {"path": "json", "data_files": ["b.jsonl"], "columns": keep}],
        [{"path": "json", "data_files": "a.jsonl", "fraction": 0.5},  # (shares: 7 and 5 rows at 1:1 → 5 and 5)
         {"path": "json", "data_files": "b.jsonl", "columns": keep, "fraction": 0.5}],
        [{"path": "json", "data_files": {"train": ["a.jsonl", "c.jsonl"]}, "fraction": 3},
         {"path": "json", "data_files": {"train": "b.jsonl"}, "columns": keep, "fraction": 1}],
        # slices of a split, as datasets cuts them (the split was not read: every row of every file came back)
        [{"path": "json", "data_files": ["a.jsonl", "c.jsonl"], "split": "train[:50%]"},
         {"path": "json", "data_files": "b.jsonl", "split": "train[-2:]", "columns": keep}],
        [{"path": "json", "data_files": {"test": "a.jsonl"}, "split": "test[1:33%]"},
         {"path": "json", "data_files": "c.jsonl", "split": "train[0_1:]"}],
        [{"path": "json", "data_files": "a.jsonl", "split": "train[-35%:-15%]"}],
        # splits joined (it said "data_files has no split 'train+test'")
        [{"path": "json", "data_files": {"train": "a.jsonl", "test": "c.jsonl"}, "split": "train[:2]+test[-1:]"}],
    ]  # fmt: skip
    for value in cases:
        ours, _ = _mixture(value)
        theirs = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**part) for part in value]))["train"]
        assert ours.to_list() == theirs.to_list(), value
    # a plain path (a file, as dataset_name takes one) reads the same rows as TRL's json builder of it
    ours, sizes = _mixture([{"path": "a.jsonl", "columns": keep}, {"path": "c.jsonl", "split": "train[1:]"}])
    assert sizes == [7, 2] and ours.to_list() == [*_pairs("a", 7, score=2), *_pairs("c", 3, score=1)[1:]]
    # a file or list of files is the split train (TRL: 'Unknown split "test"'; it read every row as test)
    with pytest.raises(ConfigError, match=r"option 'datasets\[0\].split': datasets\[0\] \(json a.jsonl, split test\): "
                       "data_files as a file or a list is one split, train: 'test' names none of it"):  # fmt: skip
        _mixture([{"path": "json", "data_files": "a.jsonl", "split": "test"}])
    said = r"option 'datasets\[1\].split': 'train\[5:\]' holds no row of datasets\[1\] \(c.jsonl, split"
    with pytest.raises(ConfigError, match=said):  # (datasets: "corresponds to no data")
        _mixture([{"path": "a.jsonl"}, {"path": "c.jsonl", "split": "train[5:]"}])


def test_columns_of_one_type_where_they_can_be_and_named_where_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "whole.jsonl", _pairs("w", 2, score=2))
    jsonl(tmp_path / "decimal.jsonl", _pairs("d", 2, score=2.5))
    rows, _ = _mixture([{"path": "whole.jsonl"}, {"path": "decimal.jsonl"}])  # (TRL: "features can't be aligned")
    assert [row["score"] for row in rows] == [2.0, 2.0, 2.5, 2.5]
    (tmp_path / "more.csv").write_text("prompt,chosen,rejected,score\nc 0?, yes.,no.,3\n")  # (CSV's text: large)
    rows, _ = _mixture([{"path": "whole.jsonl"}, {"path": "more.csv"}])  # (it said 'text ..., of ... text')
    assert rows[2] == {"prompt": "c 0?", "chosen": " yes.", "rejected": "no.", "score": 3}
    turn = [{"role": "user", "content": "hi"}]
    jsonl(tmp_path / "chat.jsonl", [{"prompt": turn, "chosen": [{"role": "assistant", "content": "a"}],
                                     "rejected": [{"role": "assistant", "content": "b"}]}])  # fmt: skip
    named = [{**turn[0], "name": "bob"}]
    jsonl(tmp_path / "named.jsonl", [{"prompt": named, "chosen": [{"role": "assistant", "content": "c"}],
                                      "rejected": [{"role": "assistant", "content": "d"}]}])  # fmt: skip
    rows, _ = _mixture([{"path": "chat.jsonl"}, {"path": "named.jsonl"}])  # messages with another key in one
    assert rows[1]["prompt"] == named and rows[0]["prompt"] == [{**turn[0], "name": None}]
    with pytest.raises(ConfigError) as error:
        _mixture([{"path": "whole.jsonl", "columns": ["prompt", "chosen", "rejected"]}, {"path": "chat.jsonl"}])
    assert str(error.value) == (
        "option 'datasets[1]': column 'prompt' of datasets[1] (chat.jsonl) is a list or mapping (messages, or "
        "values), of datasets[0] (whole.jsonl) text — mix datasets of one format: all plain text, or all "
        "conversational messages")  # fmt: skip


def test_a_column_one_dataset_lacks_is_none_in_its_rows_as_trls(tmp_path, monkeypatch, caplog):
    # it was refused; TRL's get_dataset (datasets' concatenation) fills it with None
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "whole.jsonl", _pairs("w", 2, score=2))
    jsonl(tmp_path / "decimal.jsonl", _pairs("d", 2, score=2.5, source="web"))
    value = [{"path": "json", "data_files": "whole.jsonl", "columns": ["prompt", "chosen", "rejected"]},
             {"path": "json", "data_files": "decimal.jsonl"}]  # fmt: skip
    rows, _ = _mixture(value)
    theirs = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**part) for part in value]))["train"]
    assert rows.to_list() == theirs.to_list() and rows[0]["score"] is None and rows[3]["source"] == "web"
    assert "datasets[0] (json whole.jsonl) has no column 'score'; datasets[0] (json whole.jsonl) has no column " \
        "'source': their rows get None there, as TRL's get_dataset fills them" in caplog.text  # fmt: skip
    # a stream: its rows as the file holds them, one dataset after another, a column one lacks None there (it failed
    # with datasets' "features can't be aligned", or a KeyError for a missing column at the first batch; typed by
    # the first 5 rows, a later 0.25 was read as 0 and a message's name dropped)
    jsonl(tmp_path / "late.jsonl", [*_pairs("l", 5, score=1), {**_pairs("m", 1)[0], "score": 0.25, "name": "alice"}])
    stream, _ = _mixture([{"path": "late.jsonl"}, {"path": "decimal.jsonl", "columns": ["prompt", "score"]}],
                         streaming=True)  # fmt: skip
    rows = list(stream)
    assert [row["score"] for row in rows] == [1, 1, 1, 1, 1, 0.25, 2.5, 2.5] and rows[5]["name"] == "alice"
    assert rows[7]["chosen"] is None and rows[0]["name"] is None
    with pytest.raises(DataError, match=r"row 0, column 'datasets\[1\].columns': datasets\[1\] \(decimal.jsonl\) has "
                       "no column 'answer'"):  # fmt: skip
        _mixture([{"path": "whole.jsonl"}, {"path": "decimal.jsonl", "columns": ["answer"]}], streaming=True)


def test_each_datasets_problem_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "a.jsonl", _pairs("a", 2))
    cases = [
        ("a.jsonl", "option 'datasets': must be a list of datasets, got 'a.jsonl' — e.g. datasets: [{path: "),
        (["a.jsonl"], "option 'datasets[0]': is a str ('a.jsonl'), not a mapping of keys"),
        ([{"path": "a.jsonl", "splt": "x"}], "option 'datasets[0].splt': unknown key 'splt' of a mixture's dataset — "
         "did you mean 'split'?"),
        ([{"split": "train"}], "option 'datasets[0].path': must be a name, got None"),
        ([{"path": "a.jsonl", "split": None}], "option 'datasets[0].split': must be a name, got None"),
        ([{"path": "a.jsonl", "columns": [1]}], "option 'datasets[0].columns': must be a list of distinct column"),
        ([{"path": "json", "data_files": 3}], "option 'datasets[0].data_files': must be a file, a list of files"),
        ([{"path": "a.jsonl", "fraction": -1}], "option 'datasets[0].fraction': must be a number ≥ 0"),
        ([{"path": "a.jsonl", "fraction": 1}, {"path": "a.jsonl"}], "option 'datasets[1]': has no fraction where "
         "other datasets of the mixture have one"),
        ([{"path": "a.jsonl", "fraction": 0}], "option 'datasets': every dataset's fraction is 0"),
        ([{"path": "a.jsonl"}, {"path": "missing.jsonl"}], "datasets[1] (missing.jsonl): missing.jsonl: no such "
         "file"),
        ([{"path": "a.jsonl", "columns": ["prompt", "answer"]}], "option 'datasets[0].columns': datasets[0] "
         "(a.jsonl) has no column 'answer' (its columns: prompt, chosen, rejected)"),
        ([{"path": "a.jsonl", "name": "en"}], "option 'datasets[0].name': 'en' names a hub dataset's configuration; "
         "a.jsonl is a local file or folder, which has none — remove datasets[0].name"),
        ([{"path": "json", "data_files": {"test": "a.jsonl"}}], "option 'datasets[0].split': data_files has no split "
         "'train' (its splits: test)"),
        ([{"path": "json", "data_files": "*.parquet"}], "option 'datasets[0].data_files': *.parquet matches no file"),
    ]  # fmt: skip
    for value, said in cases:
        with pytest.raises((ConfigError, DataError)) as error:
            _mixture(value)
        assert said in str(error.value), (value, str(error.value))


def test_hub_datasets_with_their_configuration_and_files(monkeypatch):
    asked = recording_hub(monkeypatch, _pairs("h", 3))
    keep = ["prompt", "chosen", "rejected"]
    rows, sizes = _mixture([{"path": "org/a", "name": "en", "split": "train_prefs"},
                            {"path": "org/b", "data_dir": "v2", "columns": keep}])  # fmt: skip
    assert sizes == [3, 3] and len(rows) == 6
    assert asked == [("org/a", {"split": "train_prefs", "name": "en"}),
                     ("org/b", {"name": None, "data_dir": "v2", "data_files": None, "split": "train",
                                "streaming": False})]  # fmt: skip


def _run(*argv) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(list(argv))


def _config(folder, name: str, **changes) -> str:
    run = {**yaml.safe_load((folder / "run.yaml").read_text()), **changes}
    run = {key: value for key, value in run.items() if value is not None}
    (folder / name).write_text(yaml.safe_dump(run))
    return name


def test_a_run_trains_and_evaluates_on_a_mixture(workdir, capsys, caplog):  # noqa: F811
    jsonl(workdir / "a.jsonl", _pairs("a", 6, score=1))
    jsonl(workdir / "b.jsonl", _pairs("b", 4, score=1.5, source="web"))
    mixture = [{"path": "a.jsonl"}, {"path": "b.jsonl", "columns": ["prompt", "chosen", "rejected", "score"]}]
    config = _config(workdir, "mix.yaml", dataset_name=None, datasets=mixture, test_split_size=0.2,
                     eval_strategy="steps", eval_steps=1, max_steps=2)  # fmt: skip
    assert _run("dpo", "--config", config) == 0
    said = capsys.readouterr().err
    assert "fastdpo: a mixture of 2 datasets, rows 0–5: datasets[0] (a.jsonl); rows 6–9: datasets[1] (b.jsonl)" in said
    recorded = yaml.safe_load((workdir / "run" / "config.yaml").read_text())
    assert recorded["datasets"] == mixture and recorded["test_split_size"] == 0.2  # (as given: no eval_fraction)
    assert recorded["eval_fraction"] is None and recorded["dataset_streaming"] is False
    logs = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [log for log in logs if "eval_loss" in log]
    assert len(evaluated) == 2 and all(log["eval_num_tokens"] > 0 for log in evaluated)
    assert (
        "the data file's rows (from 0), as `fastdpo data check` numbers them (a mixture, its datasets' rows one "
        "after another: rows 0–5: datasets[0] (a.jsonl); rows 6–9" in (workdir / "run" / "data_quality.md").read_text()
    )
    # the run's config.yaml runs again as it ran (test_split_size and the eval_fraction it became agree)
    assert _run("dpo", "--config", "run/config.yaml", "--output_dir", "again") == 0
    # dataset_name beside it is not read, as in TRL's scripts: said
    assert _run("dpo", "--config", _config(workdir, "both.yaml", datasets=mixture, output_dir="both")) == 0
    assert "datasets (a mixture) is read; dataset_name 'pairs.jsonl' is not, as in TRL's scripts" in caplog.text
    # as a flag: JSON, one dataset a word
    assert _run("dpo", "--config", "run.yaml", "--output_dir", "flags", "--datasets", '{"path": "a.jsonl"}',
                '{"path": "a.jsonl"}') == 0  # fmt: skip
    assert "rows 0–5: datasets[0] (a.jsonl); rows 6–11: datasets[1] (a.jsonl)" in capsys.readouterr().err


def test_what_a_mixture_cannot_mean_is_refused(workdir, capsys):  # noqa: F811
    jsonl(workdir / "a.jsonl", _pairs("a", 6))
    mixture = [{"path": "a.jsonl"}]
    cases = {
        "option 'dataset_test_split': names a split ('test'), and a mixture has one — hold rows out with "
        "test_split_size (or eval_fraction)": {"datasets": mixture, "dataset_test_split": "test"},
        "option 'dataset_train_split': is 'train_prefs': a mixture is one split, train — name each dataset's own "
        "split with its split: key": {"datasets": mixture, "dataset_train_split": "train_prefs"},
        "option 'streaming': applies to a dataset mixture (datasets), and the config has none — use "
        "dataset_streaming for dataset_name": {"streaming": True},
        "option 'test_split_size': applies to a dataset mixture (datasets), and the config has none — use "
        "eval_fraction for dataset_name": {"test_split_size": 0.1},
        "option 'test_split_size': holds out 0.2 of the rows, which eval_strategy 'no' never evaluates": {
            "datasets": mixture, "test_split_size": 0.2},
        "option 'eval_strategy': eval_strategy 'epoch' evaluates held-out rows, and the config holds none out — set "
        "test_split_size (e.g. 0.1), or eval_strategy: no": {"datasets": mixture, "eval_strategy": "epoch"},
        "option 'test_split_size': and eval_fraction both hold rows out — keep one": {
            "datasets": mixture, "test_split_size": 0.2, "eval_fraction": 0.1, "eval_strategy": "epoch"},
        "option 'test_split_size': a stream cannot be split by prompt before it is read": {
            "datasets": mixture, "test_split_size": 0.2, "streaming": True, "eval_strategy": "epoch"},
        "option 'datasets[0].fraction': is a share of the mixture's rows, which a stream does not know": {
            "datasets": [{"path": "a.jsonl", "fraction": 1}], "streaming": True},
    }  # fmt: skip
    for said, changes in cases.items():
        line = command_error(capsys, "dpo", "--config", _config(workdir, "bad.yaml", **changes))
        assert said in line, (changes, line)


def test_a_streamed_mixture_and_an_sft_mixture(workdir, capsys):  # noqa: F811
    jsonl(workdir / "a.jsonl", _pairs("a", 6))
    jsonl(workdir / "b.jsonl", _pairs("b", 4))
    mixture = [{"path": "a.jsonl"}, {"path": "json", "data_files": ["b.jsonl"]}]
    config = _config(workdir, "stream.yaml", dataset_name=None, datasets=mixture, streaming=True, max_steps=2,
                     logging_steps=1, data_filter="none")  # fmt: skip
    assert _run("dpo", "--config", config) == 0
    assert (
        "fastdpo: a mixture of 2 datasets, datasets[0] (a.jsonl); datasets[1] (json [b.jsonl])"
        in capsys.readouterr().err
    )
    logs = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == [1, 2]
    jsonl(workdir / "sft_a.jsonl", [{"prompt": f"q{i}?", "completion": f" a{i}."} for i in range(4)])
    jsonl(workdir / "sft_b.jsonl", [{"prompt": f"r{i}?", "completion": f" b{i}.", "id": i} for i in range(3)])
    sft = [{"path": "sft_a.jsonl"}, {"path": "sft_b.jsonl", "columns": ["prompt", "completion"]}]
    config = _config(workdir, "sft.yaml", dataset_name=None, datasets=sft, output_dir="sft", test_split_size=2,
                     eval_strategy="epoch", per_device_eval_batch_size=2, logging_steps=1)  # fmt: skip
    assert _run("sft", "--config", config) == 0
    logs = [json.loads(line) for line in (workdir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in log for log in logs) and any("loss" in log for log in logs)


def test_a_resumed_run_sees_each_local_dataset_change(tmp_path, monkeypatch):
    # the run directory's data_fingerprint.json (what --resume compares) printed dataset_name alone: None here
    from types import SimpleNamespace

    from fastdpo.cli_mixture import data_prints

    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "a.jsonl", _pairs("a", 2))
    (tmp_path / "parts").mkdir()
    jsonl(tmp_path / "parts" / "b1.jsonl", _pairs("b", 2))
    jsonl(tmp_path / "parts" / "b2.jsonl", _pairs("c", 2))
    parts = [{"path": "a.jsonl"}, {"path": "org/hub"}, {"path": "json", "data_files": {"train": "parts/*.jsonl"}}]
    run = SimpleNamespace(dataset_name=None, datasets=parts)
    before = data_prints(run)
    assert sorted(before) == ["a.jsonl", "parts/b1.jsonl", "parts/b2.jsonl"]
    jsonl(tmp_path / "parts" / "b2.jsonl", _pairs("d", 2))
    after = data_prints(run)
    assert after["parts/b2.jsonl"] != before["parts/b2.jsonl"] and after["a.jsonl"] == before["a.jsonl"]
    # two datasets' files of one name are two files (they shared a key: a change to one went unseen)
    (tmp_path / "x").mkdir()
    jsonl(tmp_path / "x" / "b1.jsonl", _pairs("x", 2))
    run.datasets = [{"path": "json", "data_files": ["x/b1.jsonl", "parts/b1.jsonl"]}]
    before = data_prints(run)
    jsonl(tmp_path / "x" / "b1.jsonl", _pairs("y", 2))
    assert data_prints(run)["x/b1.jsonl"] != before["x/b1.jsonl"]


def test_the_config_keeps_what_was_written_and_the_run_keeps_its_files(workdir, capsys):  # noqa: F811
    # config.yaml recorded dataset_streaming: true for `streaming: true` (a rerun with --streaming false streamed);
    # a mixture's file inside a checkpoint the run leaves behind was deleted under --overwrite (dataset_name's is not)
    import argparse
    from pathlib import Path

    from fastdpo.cli import _resolved_config, load_config

    jsonl(workdir / "a.jsonl", _pairs("a", 6))
    config = _config(workdir, "s.yaml", dataset_name=None, datasets=[{"path": "a.jsonl"}], streaming=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(_resolved_config(*load_config(
        argparse.Namespace(command="dpo", config=Path(config)), []))))  # fmt: skip
    run_args, _ = load_config(argparse.Namespace(command="dpo", config=Path("config.yaml")), ["--streaming", "false"])
    assert run_args.dataset_streaming is False
    assert _run("dpo", "--config", "run.yaml", "--save_strategy", "steps", "--save_steps", "1") == 0
    kept = workdir / "run" / "checkpoint-1" / "mine.jsonl"
    jsonl(kept, _pairs("m", 4))
    config = _config(workdir, "in.yaml", dataset_name=None, datasets=[{"path": "run/checkpoint-1/mine.jsonl"}])
    said = command_error(capsys, "dpo", "--config", config, "--overwrite")
    assert "option 'output_dir': run/checkpoint-1 holds what this run reads" in said and kept.is_file()


def test_a_sweep_names_the_mixtures_keys(tmp_path, capsys):
    # it named eval_fraction for a streamed mixture (settled as dataset_streaming), and for one holding nothing out
    config = tmp_path / "run.yaml"
    for text, said in (("streaming: true\n", "option 'streaming': a sweep computes the reference's log-probs once"),
                       ("", "option 'test_split_size': a sweep compares the runs on held-out pairs, and the config "
                        "holds none out — set test_split_size (e.g. 0.1)")):  # fmt: skip
        config.write_text(f"model_name_or_path: some/model\ndatasets: [{{path: pairs.jsonl}}]\n{text}")
        assert cli.main(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "s")]) == 2
        assert said in capsys.readouterr().err


def test_nulls_numbers_and_slices_as_datasets_reads_them(tmp_path, monkeypatch):
    # a column of nulls (or of empty lists) in one dataset beside lists in another was refused (TRL reads it);
    # Parquet's uint8 beside JSON's int64 became uint8 (-1 failed in Arrow's words); a slice's rounding suffix and a
    # joined split with an empty part were refused, a slice past 100% taken
    import pandas as pd
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

    monkeypatch.chdir(tmp_path)
    turn = [{"role": "user", "content": "hi"}]
    jsonl(tmp_path / "listed.jsonl", [{"prompt": "p0", "tags": ["a"], "turns": turn, "n": -1}])
    jsonl(tmp_path / "empty.jsonl", [{"prompt": "p1", "tags": None, "turns": [], "n": 2}])
    pd.DataFrame({"prompt": ["p2"], "tags": [["b"]], "turns": [turn], "n": pd.Series([3], dtype="uint8")}).to_parquet(
        tmp_path / "small.parquet")  # fmt: skip
    value = [{"path": "json", "data_files": "listed.jsonl"}, {"path": "json", "data_files": "empty.jsonl"}]
    rows, _ = _mixture(value)
    theirs = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**part) for part in value]))["train"]
    assert rows.to_list() == theirs.to_list() and rows[1]["tags"] is None and rows[1]["turns"] == []
    rows, _ = _mixture([{"path": "listed.jsonl"}, {"path": "small.parquet"}])
    assert [row["n"] for row in rows] == [-1, 3]
    jsonl(tmp_path / "big.jsonl", [{"prompt": "q", "n": 2**60 + 1}])
    jsonl(tmp_path / "decimal.jsonl", [{"prompt": "r", "n": 0.5}])
    with pytest.raises(ConfigError, match=r"option 'datasets\[1\]': datasets\[1\] \(decimal.jsonl\) and the datasets "
                       "before it cannot be read as one set of rows"):  # fmt: skip
        _mixture([{"path": "big.jsonl"}, {"path": "decimal.jsonl"}])
    jsonl(tmp_path / "text.jsonl", [{"prompt": "s", "tags": "x", "turns": [], "n": 1}])
    with pytest.raises(ConfigError, match=r"column 'tags' of datasets\[2\] \(text.jsonl\) is text, of datasets\[1\] "
                       r"\(small.parquet\) a list"):  # (the list: datasets[1]'s; datasets[0]'s tags: null)  # fmt: skip
        _mixture([{"path": "empty.jsonl"}, {"path": "small.parquet"}, {"path": "text.jsonl"}])
    jsonl(tmp_path / "hundred.jsonl", _pairs("h", 150))
    jsonl(tmp_path / "test.jsonl", _pairs("t", 3))
    for split in ("train[:10%](closest)", "train[:10%](pct1_dropremainder)", "train[-1%:]"):
        value = [{"path": "json", "data_files": {"train": "hundred.jsonl", "test": "test.jsonl"}, "split": split}]
        theirs = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**part) for part in value]))["train"]
        assert _mixture(value)[0].to_list() == theirs.to_list(), split
    value = [
        {"path": "json", "data_files": {"train": "hundred.jsonl", "test": "test.jsonl"}, "split": "test+train[:0]"}
    ]
    theirs = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**part) for part in value]))["train"]
    assert _mixture(value)[0].to_list() == theirs.to_list() == _pairs("t", 3)
    with pytest.raises(ConfigError, match=r"'train\[:150%\]': a percentage is at most 100"):
        _mixture([{"path": "hundred.jsonl", "split": "train[:150%]"}])
