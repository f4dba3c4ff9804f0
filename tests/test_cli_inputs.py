"""The command line given what users write by hand: YAML configs with a tab, an unclosed bracket or another
encoding, column maps that are not names, outputs in the way; each one error naming where, what and the fix."""

from __future__ import annotations

import json
import warnings

import pytest
from test_bad_inputs import command_error, jsonl, model_dir, tokenizer, workdir  # noqa: F401

from fastdpo import cli


def test_yaml_errors_say_where_and_what(workdir, capsys):  # noqa: F811
    # where and what (PyYAML's first line alone said "while scanning for the next token"); a file not in UTF-8 was a
    # UnicodeDecodeError naming no file
    cases = {"beta: [0.1\nx: 1\n": "is not valid YAML: line 2, column 2: expected ',' or ']'",
             "beta 0.1\nx: 1\n": "line 2, column 2: mapping values are not allowed here"}  # fmt: skip
    for text, said in cases.items():
        (workdir / "broken.yaml").write_text(text)
        assert said in command_error(capsys, "dpo", "--config", "broken.yaml")
    (workdir / "tab.yaml").write_text("beta: 0.1\n\tx: 1\n")
    said = command_error(capsys, "dpo", "--config", "tab.yaml")
    assert "line 2, column 1: found character '\\t'" in said and "indent with spaces: YAML takes no tabs" in said
    # a control character (PyYAML's reader said an offset into the text, no line)
    (workdir / "bell.yaml").write_text("beta: 0.1\nrun_name: a\x07b\n")
    said = command_error(capsys, "dpo", "--config", "bell.yaml")
    assert "line 2, column 12: character '\\x07' (special characters are not allowed)" in said, said
    (workdir / "bom.yaml").write_text("\ufeffrun_name: a\x07b\n")  # (the BOM is no column: PyYAML's scanner agrees)
    assert "line 1, column 12: character '\\x07'" in command_error(capsys, "dpo", "--config", "bom.yaml")
    (workdir / "latin.yaml").write_bytes("beta: 0.1\n# café\n".encode("latin-1"))
    assert "latin.yaml: line 2 is not UTF-8 (byte 0xe9)" in command_error(capsys, "dpo", "--config", "latin.yaml")


def test_a_column_map_to_something_other_than_a_name(workdir, capsys):  # noqa: F811
    # a TypeError from inside the close-match search ("'int' object is not iterable")
    said = command_error(capsys, "data", "check", "pairs.jsonl", "--columns", '{"prompt": 5}')
    assert "option 'columns': maps 'prompt' to 5: both are column names" in said
    (workdir / "null.yaml").write_text((workdir / "run.yaml").read_text() + "dataset_columns: {prompt: null}\n")
    assert "maps 'prompt' to None: both are column names" in command_error(capsys, "dpo", "--config", "null.yaml")
    (workdir / "key.yaml").write_text((workdir / "run.yaml").read_text() + "dataset_columns: {1: question}\n")
    assert "maps 1 to 'question': both are column names" in command_error(capsys, "dpo", "--config", "key.yaml")


def test_data_split_maps_columns_as_the_trainers_do(workdir, capsys):  # noqa: F811
    # `data split --columns` had a map of its own: a typo of fastdpo's name ("promt") was taken as a name, the split
    # then failed naming fastdpo's row-number column; a typo of the data's had no close match
    rows = [{"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(4)]
    (workdir / "named.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    split = ("data", "split", "named.jsonl", "tr.jsonl", "ev.jsonl", "--test-size", "1", "--columns")
    said = command_error(capsys, *split, '{"promt": "q", "chosen": "good", "rejected": "bad"}')
    assert "option 'columns': unknown value 'promt' — did you mean 'prompt'?" in said
    said = command_error(capsys, *split, '{"prompt": "q", "chosen": "god", "rejected": "bad"}')
    assert "column 'god': column not found — did you mean 'good'?" in said
    (workdir / "bare.jsonl").write_text('{"chosen": "a b", "rejected": "c d"}\n{"chosen": "e f", "rejected": "g h"}\n')
    said = command_error(capsys, "data", "split", "bare.jsonl", "tr.jsonl", "ev.jsonl", "--test-size", "1")
    assert "(columns present: chosen, rejected)" in said and "__fastdpo" not in said
    assert not any((workdir / name).exists() for name in ("tr.jsonl", "ev.jsonl"))


def test_overwrite_keeps_the_config_a_user_wrote_in_the_run_directory(workdir, capsys):  # noqa: F811
    # `--config run/config.yaml --overwrite`: the run replaced the user's file (comments, layout) with its resolved
    # settings; a config.yaml as a run writes it (re-runnable with --config, README) is still taken
    import yaml

    (workdir / "run").mkdir()
    mine = "# beta tuned on the pilot\n" + (workdir / "run.yaml").read_text() + "beta: 0.3  # tuned\n"
    (workdir / "run" / "config.yaml").write_text(mine)
    said = command_error(capsys, "dpo", "--config", "run/config.yaml", "--overwrite")
    assert "--config is run/config.yaml, which the run replaces with its resolved settings" in said
    assert (workdir / "run" / "config.yaml").read_text() == mine  # untouched
    canonical = yaml.safe_dump(yaml.safe_load(mine), sort_keys=True)
    (workdir / "run" / "config.yaml").write_text(canonical)
    assert cli.main(["dpo", "--config", "run/config.yaml", "--overwrite"]) == 0
    assert yaml.safe_load((workdir / "run" / "config.yaml").read_text())["beta"] == 0.3


def test_an_output_that_is_a_folder(workdir, capsys):  # noqa: F811
    # --overwrite onto a folder failed with the OS's "[Errno 21] Is a directory" and left a partial file behind
    (workdir / "train.jsonl").mkdir()
    said = command_error(capsys, "data", "split", "pairs.jsonl", "train.jsonl", "eval.jsonl", "--overwrite")
    assert "train.jsonl is a folder" in said
    assert sorted(path.name for path in workdir.iterdir() if "train" in path.name) == ["train.jsonl"]  # nothing left


def test_files_of_no_rows(workdir, capsys):  # noqa: F811
    # `data filter` wrote a file of no rows (exit 0), which fastdpo then called "not Parquet datasets can read"; a
    # header-only CSV read as "Instruction 'train' corresponds to no data!" (after a blank line too)
    import pyarrow as pa
    import pyarrow.parquet as pq

    said = command_error(capsys, "data", "filter", "pairs.jsonl", "kept.parquet", "--where", "prompt == nothing")
    assert "none of the 4 rows is kept (dropped: {'duplicate': 3, 'where': 1}): nothing was written" in said
    assert not (workdir / "kept.parquet").exists()
    (workdir / "header.csv").write_text("prompt,chosen,rejected\n")
    pq.write_table(pa.table({name: pa.array([], pa.string()) for name in ("prompt", "chosen", "rejected")}),
                   workdir / "empty.parquet")  # fmt: skip
    (workdir / "late.csv").write_text("\n\nprompt,chosen,rejected\n\n")  # (pandas skips blank lines)
    for name in ("header.csv", "empty.parquet", "late.csv"):
        assert f"{name}: the file has columns but no rows" in command_error(capsys, "data", "check", name)
    (workdir / "blank.csv").write_text("\n  \n")  # (pandas: "No columns to parse from file")
    assert "blank.csv: the file has only blank lines" in command_error(capsys, "data", "check", "blank.csv")
    (workdir / "bom.csv").write_text("\ufeff\n\n")  # (a BOM alone is no header)
    assert "bom.csv: the file has only blank lines" in command_error(capsys, "data", "check", "bom.csv")


def test_a_key_written_twice_in_a_json_document_or_a_csv_header(workdir, capsys):  # noqa: F811
    # JSON Lines refused it; a .json document kept the last value silently, and a CSV header's second "chosen" was
    # read as "chosen.1" (the first trained on, silently)
    first = '{"prompt": "a", "chosen": " b", "rejected": " c"}'
    second = '{"prompt": "d", "chosen": " e", "rejected": " f", "rejected": " z"}'
    (workdir / "doc.json").write_text(f"[{first},\n {second}]")
    said = command_error(capsys, "data", "check", "doc.json")
    assert "doc.json: row 1: the key 'rejected' is written twice in one object" in said
    (workdir / "nested.json").write_text('[{"prompt": [{"role": "user", "content": "a", "content": "b"}], '
                                         '"chosen": " b", "rejected": " c"}]')  # fmt: skip
    assert "inside the column 'prompt'" in command_error(capsys, "data", "check", "nested.json")
    (workdir / "twice.csv").write_text("prompt,chosen,chosen,rejected\na,b,c,d\n")
    for limit in ((), ("--limit", "5")):  # (a stream's too)
        said = command_error(capsys, "data", "check", "twice.csv", *limit)
        assert "twice.csv: the header names 'chosen' twice" in said
    from fastdpo.data import load_data

    (workdir / "blank.csv").write_text("prompt,chosen,rejected,,\na, b, c,,\n")  # (a spreadsheet's empty columns)
    assert load_data(str(workdir / "blank.csv"))[0]["chosen"] == " b"


def test_blank_lines_in_json_lines_whose_column_holds_mixed_kinds(workdir):  # noqa: F811
    # a message's content a string in one row and text parts in another reads (README); a blank line too (a
    # trailing one is common) failed: "datasets cannot read it (ValueError: Expected object or value)", no line named

    from fastdpo.data import load_data

    def row(content):
        return json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                           "chosen": [{"role": "assistant", "content": content}],
                           "rejected": [{"role": "assistant", "content": "no"}]})  # fmt: skip

    lines = [row("a"), row([{"type": "text", "text": "b"}]), row("c")]
    (workdir / "plain.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "blank.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n\n")
    plain, blank = load_data(str(workdir / "plain.jsonl")), load_data(str(workdir / "blank.jsonl"))
    assert blank.to_list() == plain.to_list() and len(blank) == 3


def test_data_actions_read_the_split_asked_for_and_say_which(workdir, capsys):  # noqa: F811
    # `data check FOLDER` read the train split alone, unsaid ("No row has a problem" where test.jsonl holds a
    # duplicate and an empty answer), and no flag picked another

    folder = workdir / "splits"
    folder.mkdir()
    good = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(4)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in good))
    bad = [*good[:2], good[1], {"prompt": "q9", "chosen": "", "rejected": " no"}]
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bad))
    capsys.readouterr()
    assert cli.main(["data", "check", "splits"]) == 0
    out, err = capsys.readouterr()
    assert "No row has a problem" in out and "read split 'train' of splits (also: test; --split picks one)" in err
    assert cli.main(["data", "check", "splits", "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"]["duplicate"] == [2] and report["rows"]["empty"] == [3]


def test_test_size_as_a_run_reads_eval_fraction(workdir, capsys):  # noqa: F811
    # "--test-size abc" said "invalid _fraction_or_count value"; "--test-size 2.0" was refused where a run's
    # eval_fraction 2.0 holds out 2 rows

    with pytest.raises(SystemExit):  # (argparse's own exit, status 2)
        cli.main(["data", "split", "pairs.jsonl", "t.jsonl", "e.jsonl", "--test-size", "abc"])
    assert "'abc' is neither a fraction (0.1) nor a number of rows (500)" in capsys.readouterr().err
    rows = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(6)]
    (workdir / "six.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["data", "split", "six.jsonl", "t.jsonl", "e.jsonl", "--test-size", "2.0"]) == 0
    assert len((workdir / "e.jsonl").read_text().splitlines()) == 2


def test_a_column_map_for_a_column_the_data_has_under_our_name(workdir, capsys):  # noqa: F811
    # after `data split --columns '{"prompt": "question"}'` (written under fastdpo's names), the same map on the
    # split's files said to map the column, which the user had done
    said = command_error(capsys, "data", "check", "pairs.jsonl", "--columns", '{"prompt": "question"}')
    assert "column 'question': column not found (the column map names it for 'prompt')" in said
    assert "the data has 'prompt' already: drop 'prompt' from the column map" in said
    said = command_error(capsys, "data", "check", "pairs.jsonl", "--columns", '{"prompt": "chosn"}')
    assert "did you mean 'chosen'?" in said  # (a close match is the likelier fix)


def test_an_output_in_a_file_as_if_a_folder(workdir, capsys):  # noqa: F811
    # `data split pairs.jsonl t.jsonl notes.txt/e.jsonl`: "[Errno 17] File exists", t.jsonl written already
    (workdir / "notes.txt").write_text("mine\n")
    said = command_error(capsys, "data", "split", "pairs.jsonl", "t.jsonl", "notes.txt/e.jsonl")
    assert "notes.txt is a file, not a folder" in said and not (workdir / "t.jsonl").exists()


def test_a_preparation_error_names_the_column_as_the_data_does(workdir, capsys):  # noqa: F811
    # under dataset_columns {chosen: good}, an empty answer was named "column 'chosen'", a column the file lacks

    rows = [{"prompt": "a", "good": "", "rejected": " c"}, {"prompt": "b", "good": " x", "rejected": " y"}]
    (workdir / "good.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    extra = "dataset_name: good.jsonl\ndataset_columns: {chosen: good}\ndata_filter: none\n"
    (workdir / "good.yaml").write_text((workdir / "run.yaml").read_text().replace("dataset_name: pairs.jsonl\n", extra))
    said = command_error(capsys, "dpo", "--config", "good.yaml")
    assert "row 0, column 'good': is empty (the column map's 'chosen')" in said


def test_version(tmp_path):
    # `fastdpo --version` printed the whole help with exit status 2
    import subprocess
    import sys

    import fastdpo as package

    done = subprocess.run([sys.executable, "-m", "fastdpo.cli", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"fastdpo {package.__version__}"


def test_data_check_of_rows_all_dropped_fails_after_its_report(workdir, capsys):  # noqa: F811
    # every row would be dropped (chosen == rejected; the later two duplicates too): the report, then exit 2
    # (it passed, status 0, under an empty length table, and `fastdpo dpo` then had no data)
    jsonl(workdir / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3)
    said = command_error(capsys, "data", "check", "same.jsonl")
    assert said.startswith("fastdpo: error: every one of the 3 rows would be dropped (above, by reason)"), said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["data", "stats", "same.jsonl"]) == 0  # (statistics, no verdict)
    assert "No valid pair to measure." in capsys.readouterr().out
    assert cli.main(["data", "check", "pairs.jsonl"]) == 0  # (three of four dropped: one kept)


def test_a_tokenizer_that_is_not_there(workdir, model_dir, capsys):  # noqa: F811
    # a missing folder read as a malformed hub id ("Repo id must use alphanumeric chars"), an empty one as
    # "Couldn't instantiate the backend tokenizer": both before the data is read, naming the folder
    said = command_error(capsys, "data", "check", "pairs.jsonl", "--tokenizer", "./nosuch", "--max-length", "9")
    assert said.startswith(f"fastdpo: error: option '--tokenizer': there is no folder {workdir / 'nosuch'}"), said
    (workdir / "weights").mkdir()
    (workdir / "weights" / "config.json").write_text("{}")
    said = command_error(capsys, "data", "stats", "pairs.jsonl", "--tokenizer", "weights")
    assert "the folder weights holds no tokenizer (its files: config.json)" in said, said
    assert cli.main(["data", "stats", "pairs.jsonl", "--tokenizer", str(model_dir)]) == 0
    assert "| chosen | tokens |" in capsys.readouterr().out


def test_hints_speak_the_command_line(workdir, capsys):  # noqa: F811
    # data pairs said "pass completions='completion'; fastdpo data: --completions <your column>"; a missing
    # `rejected` suggested the rating column `rejected_score` as the answers; `data split` of one prompt advised
    # "split by row without grouping", which no option does
    jsonl(workdir / "rated.jsonl", [{"prompt": f"q{i}", "completion": ["a", "b"], "scores": [1, 2]} for i in range(3)])
    said = command_error(capsys, "data", "pairs", "rated.jsonl", "out.jsonl")
    assert said.endswith("did you mean 'completion'? pass --completions completion (columns present: prompt, "
                         "completion, scores)"), said  # fmt: skip
    dicts = [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 2}]  # ("pass response_key=")
    jsonl(workdir / "rated.jsonl", [{"prompt": f"q{i}", "completions": dicts, "scores": [1, 2]} for i in range(3)])
    said = command_error(capsys, "data", "pairs", "rated.jsonl", "out.jsonl")
    assert said.endswith("— pass --response-key (and --score-key) naming the fields; keys present: response, "
                         "overall_score"), said  # fmt: skip
    said = command_error(capsys, "data", "pairs", "rated.jsonl", "out.jsonl", "--response-key", "respons")
    assert said.endswith("did you mean --response-key response? keys present: response, overall_score"), said
    jsonl(workdir / "rated.jsonl", [{"prompt": "q", "chosen": "a", "rejected_score": 1, "chosen_score": 2}])
    said = command_error(capsys, "data", "check", "rated.jsonl")
    assert said.endswith("""— map your column with --columns '{"rejected": "<your column>"}' (columns present: """
                         "prompt, chosen, rejected_score, chosen_score)"), said  # fmt: skip
    jsonl(workdir / "one.jsonl", [{"prompt": "q", "chosen": "a", "rejected": f"b{i}"} for i in range(4)])
    said = command_error(capsys, "data", "split", "one.jsonl", "t.jsonl", "e.jsonl")
    assert said.endswith("found 1 — add rows with other prompts (no prompt is in both parts of the split)"), said


def test_a_run_whose_every_row_is_dropped(workdir, capsys):  # noqa: F811
    # DPO: every row dropped by data_filter went on to "the dataset has no rows — check the file or the split you
    # loaded"; SFT: every row refused gave the first row's error alone, "drop the row"
    jsonl(workdir / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 2)
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--dataset_name", "same.jsonl")
    assert said == ("fastdpo: error: option 'data_filter': every one of the 2 training rows is dropped ({'identical': "
                    "2}) — check the data (fastdpo data check FILE) and the column map (dataset_columns), or "
                    "data_filter: none to stop at the first such row")  # fmt: skip
    jsonl(workdir / "sft.jsonl", [{"prompt": f"q{i}", "completion": ""} for i in range(3)])
    said = command_error(capsys, "sft", "--config", "run.yaml", "--dataset_name", "sft.jsonl")
    assert said == (
        "fastdpo: error: row 0, column 'completion': is empty, and no row is left: all 3 are refused "
        "({'completion': 3}) — check the data and its column map (the first row's fix: drop the row)"
    )
    assert not (workdir / "run").exists()


def test_notices_of_other_packages_are_not_printed(caplog):
    # bitsandbytes at its import on a CPU with AVX512-BF16 (any command that loads a model): HF's `kernels` package
    # is missing, it falls back to its own kernel; DeepSpeed, where installed, at every run on a CPU: "Setting
    # accelerator to CPU" (on stdout, with its file and line). Noise beside the command's output
    import logging

    cli.main(["env"])
    for name, notice in [("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-"
                          "community: no kernels. Please ..."), ("DeepSpeed", "Setting accelerator to CPU. If you "
                          "have GPU or other accelerator, we were unable to detect it.")]:  # fmt: skip
        said = logging.getLogger(name)
        with caplog.at_level(logging.WARNING):
            said.warning(notice)
            said.warning("another warning")
        assert [record.getMessage() for record in caplog.records] == ["another warning"], name
        caplog.clear()


def test_fastdpo_warnings_are_one_line_without_the_python_file(workdir, capsys):  # noqa: F811
    # "/.../fastdpo/cli.py:560: UserWarning: ref_model is not used: ...", then the source line that warned
    import subprocess
    import sys

    script = ("import warnings, yaml, fastdpo.cli as c\n"
              "c.main(['dpo', '--config', 'run.yaml', '--loss_type', 'simpo', '--ref_model_name_or_path', "
              "yaml.safe_load(open('run.yaml'))['model_name_or_path']])\n"
              "warnings.warn_explicit('theirs', UserWarning, '/elsewhere/pkg.py', 7)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=600)
    lines = done.stderr.splitlines()
    assert "fastdpo: warning: ref_model is not used: loss_type ['simpo'] is reference-free" in lines, done.stderr
    assert not [line for line in lines if "UserWarning: ref_model" in line or "ref_model=reference" in line]
    assert "/elsewhere/pkg.py:7: UserWarning: theirs" in lines  # (after main: Python's format again)


def test_a_negative_number_of_steps(workdir, capsys):  # noqa: F811
    # transformers trains num_train_epochs for any max_steps <= 0: --max_steps -5 trained 3 epochs; -1 is its default
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--max_steps", "-5", "--num_train_epochs", "2")
    assert said == ("fastdpo: error: option 'max_steps': -5 is no number of steps (transformers would train "
                    "num_train_epochs, 2, for it) — give a positive number of optimizer steps, or -1 (the default) "
                    "for num_train_epochs")  # fmt: skip
    assert not (workdir / "run").exists()


def test_trl_configs_as_trl_users_write_them(workdir, capsys):  # noqa: F811
    # from running TRL recipes' keys through both commands: TRL keys at TRL's defaults were refused; `trl`'s
    # accelerate options, test_split_size, warmup_ratio got misleading close matches; a bad dtype was said as
    # model_init_kwargs'; a second --config replaced the first, unsaid
    defaults = ["--lora_task_type", "CAUSAL_LM", "--ignore_bias_buffers=false", "--dataset_config", "null",
                "--streaming", "false", "--test_split_size", "null"]  # (mixture keys at defaults)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["dpo", "--config", "run.yaml", *defaults]) == 0
    capsys.readouterr()
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--overwrite", "--lora_task_type", "SEQ_CLS")
    assert "unknown flags ['--lora_task_type', 'SEQ_CLS'] — remove it: fastdpo's adapters are CAUSAL_LM" in said
    expected = {"--num_processes": "an `accelerate launch` option, which `trl` passes on: launch fastdpo with it, "
                "`accelerate launch --config_file fastdpo/configs/accelerate/ddp.yaml --num_processes N -m fastdpo.cli",
                "--warmup_ratio": "warmup_steps, which takes a fraction of the steps below 1",
                "--test_split_size": "applies to a dataset mixture (datasets), and the config has none — use "
                "eval_fraction for dataset_name"}  # fmt: skip
    for flag, hint in expected.items():
        assert hint in command_error(capsys, "dpo", "--config", "run.yaml", flag, "0.1"), flag
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--overwrite", "--dtype", "fp16")
    assert said == ("fastdpo: error: option 'dtype': 'fp16' is no dtype — use one of 'bfloat16', 'float16', "
                    "'float32', 'auto'")  # fmt: skip
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--output_dir", "fresh", "--resume_from_checkpoint",
                         "true")  # (TRL's key: the fix named --resume, which the user had not written)  # fmt: skip
    assert said.endswith("— run without resume_from_checkpoint: true in the config to start the run (--overwrite to "
                         "start it over)"), said  # fmt: skip
    with pytest.raises(SystemExit) as stop:  # (argparse's usage error, status 2)
        cli.main(["dpo", "--config", "run.yaml", "--config", "other.yaml"])
    assert stop.value.code == 2 and "--config given twice (run.yaml, other.yaml): give one" in capsys.readouterr().err


def test_a_test_split_is_not_read_where_nothing_evaluates(workdir, capsys):  # noqa: F811
    # TRL's scripts pass no eval split under eval_strategy 'no'; a folder without test.jsonl failed the run
    (workdir / "splits").mkdir()
    (workdir / "splits" / "train.jsonl").write_text((workdir / "pairs.jsonl").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            cli.main(["dpo", "--config", "run.yaml", "--dataset_name", "splits", "--dataset_test_split", "test"]) == 0
        )
    err = capsys.readouterr().err  # (the fastdpo logger's warnings: one line each, as its warnings)
    assert "fastdpo: warning: dataset_test_split 'test' is not read: eval_strategy 'no' evaluates nothing" in err
    assert "fastdpo: warning: dropped 3 training rows: {'duplicate': 3} (data_quality.md)" in err.splitlines()


def test_sft_rows_are_read_as_trls_trainer_reads_them(workdir, capsys):  # noqa: F811
    # prompt/completion beside a text column: the command refused them ("unclear which to train on", a Python fix)
    # where TRL and fastdpo's SFTTrainer train on prompt/completion; dataset_text_field naming the prompt: its EOS
    # warning did not show (the command prepared the rows first)
    rows = [{"prompt": f"the cat {i}", "completion": " sat.", "text": "whole"} for i in range(4)]
    jsonl(workdir / "sft.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["sft", "--config", "run.yaml", "--dataset_name", "sft.jsonl"]) == 0
        warned = "fastdpo: warning: the rows have prompt/completion and a {!r} column: fastdpo ends each completion"
        assert warned.format("text") in capsys.readouterr().err
        jsonl(workdir / "sft.jsonl", [{key: row[key] for key in ("prompt", "completion")} for row in rows])
        assert cli.main(["sft", "--config", "run.yaml", "--dataset_name", "sft.jsonl", "--overwrite",
                         "--dataset_text_field", "prompt"]) == 0  # fmt: skip
        assert warned.format("prompt") in capsys.readouterr().err


def test_an_unreachable_hub_at_push_to_hub_says_so(capsys, monkeypatch):
    # push_to_hub offline: "fastdpo: error: ConnectError: [Errno -2] Name or service not known (--debug shows the
    # traceback)", exit 1, naming neither push_to_hub nor what to do (httpx's error is no OSError)
    class ConnectError(Exception):
        pass

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli._failed(ConnectError("[Errno -2] Name or service not known"), "dpo", debug=False) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("fastdpo: error: ConnectError: [Errno -2] Name or service not known — the hub could not be "
                           "reached (push_to_hub, a hub name): check the connection, or set push_to_hub: false, or, "
                           "without network, set HF_HUB_OFFLINE=1"), said  # fmt: skip
    assert cli._failed(ConnectError("something else"), "dpo", debug=False) == 1  # (no word of the network: as before)


def test_a_hub_datasets_configuration(workdir, capsys, monkeypatch):  # noqa: F811
    # TRL's dataset_config (load_dataset's name) was refused: a hub dataset that needs one could not be trained on.
    asked = recording_hub(monkeypatch, [{"prompt": f"q{i}", "chosen": " a.", "rejected": " b."} for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["dpo", "--config", "run.yaml", "--dataset_name", "org/pairs", "--dataset_config", "en"]) == 0
    assert asked == [("org/pairs", {"split": "train", "name": "en"})]
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--overwrite", "--dataset_config", "en")
    assert said.endswith("option 'dataset_config': 'en' names a hub dataset's configuration; pairs.jsonl is a local "
                         "file or folder, which has none — remove dataset_config"), said  # fmt: skip
    # 'default' (datasets' name for a folder's one configuration: a hub config kept beside a local copy) is taken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["dpo", "--config", "run.yaml", "--overwrite", "--dataset_config", "default"]) == 0


def recording_hub(monkeypatch, rows: list[dict]) -> list:
    """``datasets.load_dataset`` replaced by one that records what it was asked and returns ``rows`` (the hub is not
    reachable here); the record."""
    import datasets

    asked = []

    def load_dataset(path, **options):
        asked.append((path, options))
        loaded = datasets.Dataset.from_list(rows)
        return loaded.to_iterable_dataset() if options.get("streaming") else loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_the_data_commands_take_a_hub_datasets_configuration(workdir, capsys, monkeypatch):  # noqa: F811
    # `fastdpo data` of a hub dataset that needs a configuration name could not read it: no option took one
    rows = [{"prompt": f"q{i}?", "chosen": " Yes.", "rejected": " No."} for i in range(4)]
    asked = recording_hub(monkeypatch, rows)
    assert cli.main(["data", "check", "org/pairs", "--dataset-config", "en"]) == 0
    assert cli.main(["data", "stats", "org/pairs", "--dataset-config", "en", "--limit", "2", "--split", "test"]) == 0
    assert cli.main(["data", "split", "org/pairs", "a.jsonl", "b.jsonl", "--dataset-config", "en"]) == 0
    assert asked == [("org/pairs", {"split": "train", "name": "en"}),
                     ("org/pairs", {"split": "test", "streaming": True, "name": "en"}),
                     ("org/pairs", {"split": "train", "name": "en"})]  # fmt: skip
    assert cli.main(["data", "check", "org/pairs"]) == 0 and asked[-1] == ("org/pairs", {"split": "train"})
    said = command_error(capsys, "data", "check", "pairs.jsonl", "--dataset-config", "en")
    assert said.endswith("option '--dataset-config': 'en' names a hub dataset's configuration; pairs.jsonl is a local "
                         "file or folder, which has none — remove --dataset-config"), said  # fmt: skip


def test_ignore_bias_buffers_leaves_the_models_bool_buffers_out_of_ddp(workdir, capsys, monkeypatch):  # noqa: F811
    # TRL's scripts' option (their model's _ddp_params_and_buffers_to_ignore) was refused ("not supported")
    import torch

    built = []
    build = cli._build_trainer

    def with_mask(*args, **kwargs):  # (a GPT-2-style causal mask kept as a bool buffer, as older models hold one)
        from transformers import PreTrainedModel

        load = PreTrainedModel.from_pretrained.__func__

        def loaded(klass, *a, **k):
            model = load(klass, *a, **k)
            model.model.layers[0].register_buffer("bias", torch.ones(2, 2, dtype=torch.bool), persistent=False)
            return model

        monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loaded))
        result = build(*args, **kwargs)
        built.append(result[0])
        return result

    monkeypatch.setattr(cli, "_build_trainer", with_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = cli.main(["dpo", "--config", "run.yaml", "--ignore_bias_buffers", "true", "--max_steps", "1",
                         "--output_dir", "bias_run"])  # fmt: skip
    assert done == 0, capsys.readouterr().err[-2000:]
    assert built[0].model._ddp_params_and_buffers_to_ignore == ["model.layers.0.bias"]


def test_a_hub_dataset_without_the_split_test_an_evaluating_run_assumed(workdir, capsys, monkeypatch):  # noqa: F811
    # TRL's default evaluation split, assumed where no held-out setting is given: a hub dataset without one ended the
    # run after its train split was read, in datasets' words ("Unknown split"), naming no setting
    import datasets

    rows = [{"prompt": f"q{i}?", "chosen": " Yes.", "rejected": " No."} for i in range(4)]
    asked = []

    def load_dataset(path, **options):
        asked.append(options["split"])
        if options["split"] != "train":
            raise ValueError(f"Unknown split \"{options['split']}\". Should be one of ['train'].")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    said = command_error(capsys, "dpo", "--config", "run.yaml", "--dataset_name", "org/pairs", "--eval_strategy",
                         "steps", "--eval_steps", "1")  # fmt: skip
    assert asked == ["train", "test"]
    assert said.startswith(
        "fastdpo: error: option 'dataset_test_split': eval_strategy evaluates the split 'test' "
        "(TRL's scripts' default dataset_test_split), and org/pairs has none (Unknown split"
    ), said
    assert said.endswith("— set dataset_test_split to one of its splits, or eval_fraction to hold rows out of train, "
                         "or eval_strategy: no")  # fmt: skip


def test_eval_fraction_out_of_range_is_named_as_the_runs_key(tmp_path):
    # it was refused as option 'test_size', a name the config does not have, after the data had loaded
    from fastdpo.cli import RunArguments
    from fastdpo.cli_checks import check_evaluation
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=1, report_to=[])
    for bad in (1.5, 0, -0.1):
        with pytest.raises(ConfigError, match=rf"option 'eval_fraction': must be a fraction .* got {bad!r}"):
            check_evaluation(RunArguments(eval_fraction=bad), args, evaluated_after=False)
    for good in (0.25, 3):
        check_evaluation(RunArguments(eval_fraction=good), args, evaluated_after=False)
