"""The ``fastdpo`` command across runs (a LoRA SFT run continued by DPO, a run directory replaced, resumed, locked)
and its error lines."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from test_cli import fastdpo, workdir  # noqa: F401

pytestmark = pytest.mark.slow
LORA = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]


def train_logs(out) -> list[dict]:
    return [log for log in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in log]


def test_a_lora_sft_run_continues_into_dpo_with_its_adapter(workdir):  # noqa: F811
    # transformers loaded the run's folder with its adapter attached frozen to a plain model: DPO trained nothing
    # (grad_norm 0 every step, then a traceback saving it); with --use_peft the SFT adapter was replaced by a new one
    import shutil

    shutil.copytree(workdir / "model", workdir / "models" / "base")  # (a hub id's shape: it was kept relative)
    done = fastdpo("sft", "--config", "sft.yaml", *LORA, "--output_dir", "lora_sft", "--learning_rate", "0.1",
                   "--model_name_or_path", "models/base", cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "lora_sft" / "adapter_config.json").is_file()
    base = json.loads((workdir / "lora_sft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == os.path.abspath(workdir / "models" / "base")  # absolute: the folder loads from anywhere
    done = fastdpo("dpo", "--config", "dpo.yaml", "--model_name_or_path", "lora_sft", "--output_dir", "lora_dpo",
                   "--max_steps", "2", "--eval_strategy", "no", "--eval_fraction", "null", cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = train_logs(workdir / "lora_dpo")
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the reference: the SFT adapter's frozen copy
    assert all(log["grad_norm"] > 0 for log in logs)  # the adapter trains
    from peft import AutoPeftModelForCausalLM

    sft = AutoPeftModelForCausalLM.from_pretrained(workdir / "lora_sft")
    dpo = AutoPeftModelForCausalLM.from_pretrained(workdir / "lora_dpo")
    changed = [name for name, p in dpo.named_parameters() if "lora_" in name
               and not p.equal(sft.get_parameter(name))]  # fmt: skip
    assert changed  # DPO moved the SFT adapter on


def test_overwrite_removes_the_replaced_runs_model_files(workdir):  # noqa: F811
    # a full run, then a LoRA run with --overwrite: from_pretrained read the new adapter onto the old run's weights
    args = ["--config", "sft.yaml", "--output_dir", "replaced", "--max_steps", "1"]
    assert fastdpo("sft", *args, cwd=workdir).returncode == 0
    assert (workdir / "replaced" / "model.safetensors").is_file()
    done = fastdpo("sft", *args, *LORA, "--overwrite", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed the replaced run's config.json, generation_config.json, model.safetensors" in done.stderr
    names = {path.name for path in (workdir / "replaced").iterdir()}
    assert "adapter_config.json" in names and "model.safetensors" not in names


def test_overwrite_into_a_folder_no_run_wrote_keeps_its_files(workdir):  # noqa: F811
    # --overwrite into a folder of the user's own removed the files named as a run's outputs there (a plots/ folder
    # whole, an adapter_config.json), though no run had written them
    mine = workdir / "mine"
    (mine / "plots").mkdir(parents=True)
    files = {"plots/figure.png": "png", "adapter_config.json": "{}", "notes.txt": "mine", "data_quality.md": "mine"}
    for name, text in files.items():
        (mine / name).write_text(text)
    args = ["--config", "dpo.yaml", "--output_dir", "mine", "--max_steps", "1", "--eval_strategy", "no",
            "--eval_fraction", "null", "--overwrite"]  # fmt: skip
    done = fastdpo("dpo", *args, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed the replaced run's" not in done.stderr
    for name, text in files.items():
        if name != "data_quality.md":  # (the run writes its own report: that one is replaced, as --overwrite says)
            assert (mine / name).read_text() == text, name
    assert (mine / "model.safetensors").is_file() and (mine / "plots" / "loss.png").is_file()


def test_training_in_place_says_it_replaces_the_model(workdir):  # noqa: F811
    # output_dir = model_name_or_path: refused as any non-empty run directory, with --overwrite as the fix, and with
    # it the model's weights were replaced without a word
    import shutil

    shutil.copytree(workdir / "model", workdir / "inplace")
    args = ["--config", "dpo.yaml", "--model_name_or_path", "inplace", "--output_dir", "inplace", "--max_steps", "1",
            "--eval_strategy", "no", "--eval_fraction", "null"]  # fmt: skip
    refused = fastdpo("dpo", *args, cwd=workdir)
    assert refused.returncode == 2 and "the trained model would replace the weights it starts from" in refused.stderr
    assert "set another output_dir" in refused.stderr
    done = fastdpo("dpo", *args, "--overwrite", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training in place: the trained model replaces the weights in inplace" in done.stderr


def test_overwrite_keeps_the_new_runs_quality_report_and_drops_the_old_tokenizer_files(workdir):  # noqa: F811
    # --overwrite over a DPO run: the replaced run's data_quality.* were listed for removal, the new run wrote its own
    # and then lost them when training began; a tokenizer file the new run's tokenizer does not write (a chat template
    # where it has none, a slow tokenizer's vocab.json) stayed, and from_pretrained(run) read it with the new one
    args = ["--config", "dpo.yaml", "--output_dir", "dpo_replaced", "--max_steps", "1", "--eval_strategy", "no",
            "--eval_fraction", "null"]  # fmt: skip
    assert fastdpo("dpo", *args, cwd=workdir).returncode == 0
    (workdir / "dpo_replaced" / "vocab.json").write_text("{}")  # (as the replaced run's tokenizer wrote it)
    done = fastdpo("dpo", *args, "--overwrite", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {path.name for path in (workdir / "dpo_replaced").iterdir()}
    assert {"data_quality.md", "data_quality.json", "tokenizer.json"} <= names
    assert "vocab.json" not in names
    # resumed from another run's checkpoint into a LoRA run's directory (--overwrite): the adapter stayed beside the
    # new full model, and from_pretrained(run) put it on the new weights
    save = ["--save_strategy", "steps", "--save_steps", "1"]
    assert fastdpo("dpo", *args, *save, "--output_dir", "dpo_source", cwd=workdir).returncode == 0
    assert fastdpo("dpo", *args, *LORA, "--overwrite", cwd=workdir).returncode == 0
    done = fastdpo("dpo", *args, *save, "--max_steps", "2", "--resume", "dpo_source/checkpoint-1", "--overwrite",
                   cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = {path.name for path in (workdir / "dpo_replaced").iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names


def test_data_filter_drop_filters_the_evaluation_rows_too(workdir):  # noqa: F811
    # README: the rows of a drop reason go "in the train and eval splits"; the eval split kept them (identical pairs
    # always counted as misses: eval_rewards/accuracies 0.417 where the kept rows give 0.625)
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import loaded_splits as _loaded_splits

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    for row in rows[::3]:
        row["rejected"] = row["chosen"]
    (workdir / "identical.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_args = RunArguments(dataset_name=str(workdir / "identical.jsonl"), dataset_columns={"prompt": "question"},
                            eval_fraction=0.5)  # fmt: skip
    train, evaluation, files = _loaded_splits("dpo", run_args, seed=0)
    for split in (train, evaluation):
        assert all(row["chosen"] != row["rejected"] for row in split)
    quality = json.loads(files["data_quality.json"])
    identical = sum(row["chosen"] == row["rejected"] for row in rows)  # (and the file's own row 5)
    assert quality["removed"]["identical"] + quality["removed_eval"]["identical"] == identical
    assert quality["removed_eval"]["identical"] > 0 and "Evaluation rows removed" in files["data_quality.md"]
    run_args.data_filter = "none"
    held_out = _loaded_splits("dpo", run_args, seed=0)[1]
    assert len(held_out) == len(evaluation) + quality["removed_eval"]["identical"]
    # the report's row ids are the file's, as `fastdpo data check` numbers them (they were the train part's)
    trained = [i for i, row in enumerate(rows) if row["chosen"] == row["rejected"] and row["question"] not in
               set(held_out["prompt"])]  # fmt: skip
    assert quality["rows"]["identical"] == trained and trained != list(range(len(trained)))


def test_an_unexpected_error_or_ctrl_c_is_one_line(workdir, monkeypatch, capsys):  # noqa: F811
    # a list for --columns, a Latin-1 YAML file, seed -5, Ctrl-C in a data command: tracebacks before
    from test_cli import in_process

    import fastdpo.cli as cli

    done = in_process("data", "check", "pairs.jsonl", "--columns", '["question"]', cwd=workdir,
                      monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 2 and "argument --columns: '[\"question\"]' is not a JSON object" in done.stderr
    (workdir / "latin1.yaml").write_bytes("model_name_or_path: modèle\n".encode("latin-1"))  # (its own error now)
    done = in_process("dpo", "--config", "latin1.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "latin1.yaml: line 1 is not UTF-8 (byte 0xe8)" in done.stderr
    assert "Traceback" not in done.stderr
    cases = ((KeyboardInterrupt(), 130, "fastdpo: interrupted"),
             (RuntimeError("boom\nmore"), 1, "fastdpo: error: RuntimeError: boom (--debug"))  # fmt: skip
    for raised, status, said in cases:

        def fail(known, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "run_data", fail)
        done = in_process("data", "check", "pairs.jsonl", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
        assert done.returncode == status and done.stderr.startswith(said), done.stderr
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the traceback
        in_process("data", "check", "pairs.jsonl", "--debug", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)


def test_resume_refuses_a_model_whose_files_changed(workdir):  # noqa: F811
    # the model at model_name_or_path retrained or replaced between the stop and --resume: the reference became the
    # new model while the policy went on from the checkpoint, silently (rewards/chosen 0.305 where 0.438)
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(workdir / "model", workdir / "model_copy")
    args = ["--config", "dpo.yaml", "--model_name_or_path", "model_copy", "--output_dir", "resumed", "--save_strategy",
            "steps", "--save_steps", "1", "--eval_strategy", "no", "--eval_fraction", "null"]  # fmt: skip
    done = fastdpo("dpo", *args, "--max_steps", "2", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "resumed" / "model_fingerprint.json").read_text())["model"]
    model = AutoModelForCausalLM.from_pretrained(workdir / "model_copy")
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(workdir / "model_copy")
    done = fastdpo("dpo", *args, "--max_steps", "3", "--resume", cwd=workdir)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "option 'resume': the model files differ from those the run trained on" in done.stderr
    assert "add --overwrite to go on with these" in done.stderr


def test_one_run_at_a_time_in_a_run_directory(workdir, tmp_path, monkeypatch, capsys):  # noqa: F811
    # two runs started into one output_dir both succeeded: metrics.jsonl interleaved their steps, the model was
    # whichever saved last
    import os

    from test_cli import in_process

    from fastdpo.atomic import run_lock
    from fastdpo.errors import ConfigError

    out, lock = tmp_path / "run", tmp_path / ".run.fastdpo-lock"
    said = rf"option 'output_dir': another run is using {re.escape(str(out))} \(process {os.getpid()} on "
    with run_lock(out):
        with pytest.raises(ConfigError, match=said), run_lock(out):
            pass
        monkeypatch.chdir(tmp_path / "..")  # the same directory by another path: the same lock
        with pytest.raises(ConfigError, match="another run is using"), run_lock(Path(tmp_path.name) / "run"):
            pass
    assert not lock.exists()
    lock.write_text("12345 on elsewhere")  # a file left by a run that was killed: no flock on it, taken
    with run_lock(out):
        pass
    for name in ("RANK", "PMI_RANK"):  # a distributed run's other processes take none
        monkeypatch.setenv(name, "1")
        with run_lock(out), run_lock(out):
            pass
        monkeypatch.delenv(name)
    nested = tmp_path / "new" / "runs" / "a"  # a parent that is not there yet: made, and locked in (it took none)
    with run_lock(nested), pytest.raises(ConfigError, match="another run is using"), run_lock(nested):
        pass
    assert nested.parent.is_dir() and not nested.exists()
    # and the command takes it: a second run into the run directory meanwhile is refused before anything loads
    with run_lock(workdir / "locked"):
        done = in_process("dpo", "--config", "dpo.yaml", "--output_dir", "locked", cwd=workdir,
                          monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 2 and "another run is using" in done.stderr and not (workdir / "locked").exists()


def test_evaluation_without_a_held_out_setting_reads_the_split_test_as_trls_scripts(workdir, monkeypatch, capsys,  # noqa: F811
                                                                                      caplog):  # fmt: skip
    # TRL's scripts evaluate on the split 'test' (ScriptArguments.dataset_test_split's default): an unchanged TRL
    # config with eval_strategy: steps was refused ("the config holds none out")
    from test_cli import in_process

    from fastdpo.cli import RunArguments
    from fastdpo.cli_checks import check_evaluation
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    rows = (workdir / "pairs.jsonl").read_text().splitlines(keepends=True)
    (workdir / "splits").mkdir(exist_ok=True)
    (workdir / "splits" / "train.jsonl").write_text("".join(rows[:18]))
    (workdir / "splits" / "test.jsonl").write_text("".join(rows[18:]))
    done = in_process("dpo", "--config", "dpo.yaml", "--dataset_name", "splits", "--eval_fraction", "null",
                      "--max_steps", "1", "--eval_steps", "1", "--output_dir", "tested", cwd=workdir,
                      monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads(line) for line in (workdir / "tested" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in log for log in logs)
    recorded = yaml.safe_load((workdir / "tested" / "config.yaml").read_text())
    assert recorded["dataset_test_split"] == "test"  # (compare --pairs splits reads the run's held-out split there)
    args = DPOConfig(output_dir=str(workdir / "x"), eval_strategy="steps", eval_steps=1, report_to=[])
    with caplog.at_level("WARNING", logger="fastdpo"):  # a hub name: its splits are known when it is read
        read = check_evaluation(RunArguments(dataset_name="org/pairs"), args, evaluated_after=False)
    assert read.dataset_test_split == "test" and "evaluates the split 'test' of org/pairs" in caplog.text
    with pytest.raises(ConfigError, match="option 'eval_strategy': .* holds none out"):  # one file: no test split
        check_evaluation(RunArguments(dataset_name=str(workdir / "pairs.jsonl")), args, evaluated_after=False)


def test_a_fix_naming_the_python_check_names_the_command_in_the_cli():
    # the rows preparation refuses (data_filter: none, or the data commands) named fastdpo.data.check_preferences
    from fastdpo.cli_errors import in_cli_terms
    from fastdpo.errors import DataError

    error = DataError(
        "is empty", row=2, column="chosen", fix="drop the row (fastdpo.data.check_preferences lists them all)"
    )
    said = in_cli_terms(error, trains=True)
    assert str(said) == "row 2, column 'chosen': is empty — drop the row (fastdpo data check FILE lists them all)"
    # its .filter(dataset) as the filter command (it read "fastdpo data check FILE(dataset).filter(dataset)")
    commands = {"(dataset)": "fastdpo data filter FILE OUT",
                "(dataset, tokenizer)": "fastdpo data filter FILE OUT --tokenizer TOKENIZER"}  # fmt: skip
    for python, command in commands.items():
        fix = f"fix the row, or drop such rows with fastdpo.data.check_preferences{python}.filter(dataset) (empty)"
        said = in_cli_terms(DataError("is empty", row=2, column="chosen", fix=fix), trains=True)
        assert said.fix == f"fix the row, or drop such rows with {command} (empty)"
    # a stream's refusals named streaming=True and reference=; a row of the other format, format= (Python's)
    from types import SimpleNamespace

    from fastdpo.errors import ConfigError
    from fastdpo.train.common import check_stream_args

    args = SimpleNamespace(max_steps=2, max_tokens_per_batch=None, balance_ranks=False, world_size=1)
    with pytest.raises(ConfigError) as caught:
        check_stream_args(args, "train", cached_reference=True)
    said = in_cli_terms(caught.value, trains=True).fix
    assert said == "set dataset_streaming: false, or set precompute_ref_log_probs: false", said
    fix = "fix or drop the row (fastdpo.data.check_preferences lists every such row), or pass format="
    said = in_cli_terms(DataError("expected a string as the data's answers are, got None", fix=fix), trains=True)
    assert said.fix == "fix or drop the row (fastdpo data check FILE lists every such row)"


def test_a_missing_model_or_a_lora_folder_with_use_peft_is_named_before_the_data(workdir, monkeypatch, capsys):  # noqa: F811
    # transformers read ./typo as a malformed hub id ("Repo id must use alphanumeric chars..."), after the data
    from test_cli import in_process

    import fastdpo.cli as cli

    monkeypatch.setattr(cli, "loaded_splits", lambda *args: pytest.fail("the data was read first"))
    for flag, name in (("--model_name_or_path", "./typo"), ("--ref_model_name_or_path", "../runs/typo")):
        done = in_process("dpo", "--config", "dpo.yaml", flag, name, "--output_dir", "typo_run", cwd=workdir,
                          monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
        column = flag.removeprefix("--")
        said = f"option '{column}': there is no folder {os.path.abspath(workdir / name)} — check the path"
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert not (workdir / "typo_run").exists()
    # a LoRA run's folder with --use_peft: the trainer's error named peft_config, merge_and_unload, peft_config=None
    (workdir / "lora_run").mkdir()
    (workdir / "lora_run" / "adapter_config.json").write_text("{}")
    done = in_process("dpo", "--config", "dpo.yaml", "--model_name_or_path", "lora_run", *LORA, "--output_dir",
                      "typo_run", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    said = "option 'use_peft': lora_run holds a LoRA adapter, which the run trains on; use_peft would add a new one"
    assert done.returncode == 2 and said in done.stderr and "drop --use_peft" in done.stderr, done.stderr


def test_a_lora_folders_model_fingerprint_covers_its_base(tmp_path):
    # --resume of a DPO run on a LoRA run's folder took another base model under it unnoticed (the folder's own files,
    # the adapter's, were all the fingerprint held)
    from fastdpo.cli_resume import model_fingerprint

    base, lora = tmp_path / "base", tmp_path / "lora"
    for folder in (base, lora):
        folder.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(bytes(range(256)))
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (lora / "adapter_model.safetensors").write_bytes(bytes(64))
    before = model_fingerprint(str(lora))
    assert before["base_model"] == model_fingerprint(str(base)) and "adapter_model.safetensors" in before
    (base / "model.safetensors").write_bytes(bytes(reversed(range(256))))
    assert model_fingerprint(str(lora)) != before
    # a run directory of an earlier fastdpo recorded the folder's own files only: resumed as the same model
    from fastdpo.cli_resume import same_models

    older = {"model": {name: value for name, value in model_fingerprint(str(lora)).items() if name != "base_model"}}
    assert same_models(older, {"model": model_fingerprint(str(lora))})
    assert not same_models({"model": before}, {"model": model_fingerprint(str(lora))})
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(lora)}))  # (no recursion)
    assert "base_model" not in model_fingerprint(str(lora))


def test_a_best_model_metric_may_be_set_on_resume_where_the_run_had_none(tmp_path):
    # load_best_model_at_end added on --resume (README: it may change): transformers fills in metric_for_best_model
    # and greater_is_better, and the resume was refused for them; a metric changed from another is refused still
    import yaml

    from fastdpo.cli_resume import refuse_changed_config
    from fastdpo.errors import ConfigError

    recorded = tmp_path / "config.yaml"
    recorded.write_text(yaml.safe_dump({"load_best_model_at_end": False, "metric_for_best_model": None,
                                        "greater_is_better": None, "beta": 0.1}))  # fmt: skip
    now = {"load_best_model_at_end": True, "metric_for_best_model": "loss", "greater_is_better": False, "beta": 0.1}
    refuse_changed_config(recorded, now, overwrite=False)
    recorded.write_text(yaml.safe_dump({**now, "metric_for_best_model": "eval_rewards/margins"}))
    with pytest.raises(ConfigError, match="metric_for_best_model: 'eval_rewards/margins' -> 'loss'"):
        refuse_changed_config(recorded, now, overwrite=False)


def test_only_the_main_process_writes_the_run_files(workdir, monkeypatch, capsys):  # noqa: F811
    # a process of rank > 0 takes no run_lock: that of a second run refused by the lock rewrote the running run's
    # data_quality.json before it failed (accelerate launch, 2 processes)
    from test_cli import in_process
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    done = in_process("sft", "--config", "sft.yaml", "--output_dir", "rank1_run", "--max_steps", "1", cwd=workdir,
                      monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    written = {path.name for path in (workdir / "rank1_run").iterdir()} if (workdir / "rank1_run").exists() else set()
    assert not written & {"data_quality.json", "data_quality.md", "dropped_rows.json"}, written


def test_data_pairs_that_makes_no_pair_says_why(workdir, monkeypatch, capsys):  # noqa: F811
    # every row dropped: an empty pairs file was written, exit 0
    from test_cli import in_process

    (workdir / "all_ties.jsonl").write_text(json.dumps({"prompt": "q", "completions": ["a", "b"], "scores": [1, 1]}))
    done = in_process("data", "pairs", "all_ties.jsonl", "no_pairs.jsonl", cwd=workdir, monkeypatch=monkeypatch,
                      capsys=capsys)  # fmt: skip
    said = "column 'scores': no pair: best_vs_worst: 0 pairs from 1 row; dropped 1 row (ties 1)"
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not (workdir / "no_pairs.jsonl").exists()


def test_data_check_with_a_limit_reports_text_scores_as_the_whole_file_check_does(workdir, monkeypatch, capsys):  # noqa: F811
    # a score "high" beside 9: the first rows did not form one Arrow column, and --limit refused the file
    from test_cli import in_process

    rows = [{"prompt": "p0", "chosen": "a", "rejected": "b", "chosen_score": 9, "rejected_score": 1},
            {"prompt": "p1", "chosen": "c", "rejected": "d", "chosen_score": "high", "rejected_score": 2}]  # fmt: skip
    (workdir / "mixed_scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reports = []
    for limit in ([], ["--limit", "10"]):
        done = in_process("data", "check", "mixed_scores.jsonl", "--json", *limit, cwd=workdir, monkeypatch=monkeypatch,
                          capsys=capsys)  # fmt: skip
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(done.stdout)["rows"])
    assert reports[0] == reports[1] and reports[0]["bad_score"] == [1]
    # tools a list in one row and its JSON text in another (as TRL takes both): "row 1, column 'tools': is a string
    # where row 0 has a list" with --limit alone
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "tools": tools} for tools in ([tool], json.dumps([tool]))]
    (workdir / "mixed_tools.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for limit in ([], ["--limit", "10"]):
        done = in_process("data", "check", "mixed_tools.jsonl", *limit, cwd=workdir, monkeypatch=monkeypatch,
                          capsys=capsys)  # fmt: skip
        assert done.returncode == 0, (limit, done.stderr)


def test_a_run_without_matplotlib_saves_its_model_and_skips_the_plots(workdir, monkeypatch, capsys, caplog):  # noqa: F811
    # matplotlib is in the dev extra only: a run trained every step, then failed without saving the model
    # (ModuleNotFoundError at the first evaluation, or at the end)
    import sys

    from test_cli import in_process

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as where it is not installed
    done = in_process("dpo", "--config", "dpo.yaml", "--output_dir", "no_plots", "--max_steps", "2", cwd=workdir,
                      monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workdir / "no_plots" / "model.safetensors").is_file()
    assert not list((workdir / "no_plots").glob("plots/*.png"))
    said = [r.getMessage() for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(said) == 1, said  # one warning, however many evaluations


def test_one_string_for_a_list_field_in_the_yaml_is_that_one_item():
    # lora_modules_to_save: norm reached PEFT as the string 'norm', which it walked letter by letter: every module whose
    # name ends in n, o, r or m trained in full (self_attn, act_fn), silently; the flag made it ['norm']
    from fastdpo.cli import _resolve
    from fastdpo.cli_model import peft_and_quantization
    from fastdpo.train import DPOConfig

    values = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o", "use_peft": True,
              "lora_modules_to_save": "norm", "lora_target_modules": r".*\.(q|v)_proj", "loss_type": "ipo",
              "debug": "underflow_overflow"}  # fmt: skip
    run_args, args = _resolve(DPOConfig, values, [])
    flags = _resolve(DPOConfig, {**values, "lora_modules_to_save": None}, ["--lora_modules_to_save", "norm"])[0]
    assert run_args.lora_modules_to_save == flags.lora_modules_to_save == ["norm"]
    assert list(args.loss_type) == ["ipo"]
    # not where a string means something of its own: PEFT's regular expression (as TRL passes it), debug's options
    lora = peft_and_quantization(run_args, None)[0]
    assert lora.modules_to_save == ["norm"] and lora.target_modules == r".*\.(q|v)_proj"
    assert [option.value for option in args.debug] == ["underflow_overflow"]
    # one number too: loss_weights: 1.0 failed as "option 'config': 'float' object is not iterable"
    assert _resolve(DPOConfig, {**values, "loss_weights": 1.0}, [])[1].loss_weights == [1.0]


def test_yaml_scalars_read_as_yaml_1_2(tmp_path):
    # PyYAML's YAML 1.1: save_strategy: no was the boolean False ("False is not a valid IntervalStrategy"), 1e-3 in a
    # mapping the string '1e-3' (lr_scheduler_kwargs failed inside the scheduler), 0755 the octal 493; a key that is no
    # name (1: 2) crashed difflib; debug: true failed inside train() after the run's files were written
    import yaml

    from fastdpo.cli import _resolve, _unique_keys_loader
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    text = ("model_name_or_path: m\ndataset_name: d\noutput_dir: o\nsave_strategy: no\neval_strategy: no\n"
            "lr_scheduler_kwargs: {min_lr: 1e-3}\nseed: 0755\nbf16: false\n")  # fmt: skip
    values = yaml.load(text, Loader=_unique_keys_loader(tmp_path / "run.yaml"))
    assert values["lr_scheduler_kwargs"] == {"min_lr": 0.001} and values["seed"] == 755 and values["bf16"] is False
    _, args = _resolve(DPOConfig, values, [])
    assert (str(args.save_strategy.value), str(args.eval_strategy.value), args.seed) == ("no", "no", 755)
    debug = "option 'debug': expected TrainingArguments' debug options, got True"
    for bad, said in (({1: 2}, "option 'config': 1 (int) is no field name"), ({"debug": True}, debug)):
        with pytest.raises(ConfigError, match=re.escape(said)):
            _resolve(DPOConfig, {**values, **bad}, [])


def test_the_deprecated_checkpointing_name_as_a_flag_wins_over_the_saved_config(tmp_path):
    # a run's config.yaml records activation_checkpointing and its deprecated name gradient_checkpointing; rerun with
    # --gradient_checkpointing false, transformers kept the new name's true (silently), and so for an edit of the old
    from fastdpo.cli import _resolve
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    saved = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o", "gradient_checkpointing": True,
             "activation_checkpointing": True}  # fmt: skip
    assert _resolve(DPOConfig, saved, [])[1].activation_checkpointing is True
    args = _resolve(DPOConfig, saved, ["--gradient_checkpointing", "false"])[1]
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="option 'gradient_checkpointing': sets gradient_checkpointing False and "):
        _resolve(DPOConfig, {**saved, "gradient_checkpointing": False}, [])


def test_a_qlora_runs_adapter_goes_on_quantized_as_it_trained(tmp_path, caplog):
    # a QLoRA SFT run's folder into DPO: --load_in_4bit alone was refused ("trains through adapters only"), with
    # --use_peft too ("holds a LoRA adapter"), and without either the adapter trained on the full-precision base,
    # silently (its log-probs 0.3 apart from the SFT model's as trained)
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import peft_and_quantization

    folder = tmp_path / "qlora_sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "peft_type": "LORA"}))
    (folder / "config.yaml").write_text("use_peft: true\nload_in_4bit: true\n")
    peft_config, quantization = peft_and_quantization(RunArguments(model_name_or_path=str(folder), load_in_4bit=True),
                                                      None)  # fmt: skip
    assert peft_config is None and quantization.load_in_4bit  # the folder's adapter trains on, on a 4-bit base
    with caplog.at_level("WARNING"):
        assert peft_and_quantization(RunArguments(model_name_or_path=str(folder)), None) == (None, None)
    # the DPO run that went on so records use_peft false and load_in_4bit: its folder read again (a third run,
    # compare) was refused as "a quantized model trains through adapters only"
    from fastdpo.cli_model import run_quantization

    keys = {"use_peft": False, "load_in_4bit": True}
    assert run_quantization(keys, folder / "config.yaml")[0].load_in_4bit
    assert "trained its adapter on its base loaded with load_in_4bit" in caplog.text
    assert "add --load_in_4bit to go on as it trained" in caplog.text


def test_unknown_keys_get_the_hint_that_applies():
    # rpo_alpha pointed to cpo_alpha (loss_type cpo only), a DPO key in an SFT run to a near name, --lora_rank to
    # --local_rank, and --torch_dtype=bfloat16 lost its hint
    from fastdpo.cli import _resolve
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig, SFTConfig

    base = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o"}
    cases = ((DPOConfig, {"rpo_alpha": 1.0}, [], "loss_type: [sigmoid, sft] with loss_weights: [1.0, ALPHA]"),
             (SFTConfig, {"beta": 0.1}, [], "a field of fastdpo dpo, not of fastdpo sft"),
             (DPOConfig, {"dataset_text_field": "t"}, [], "a field of fastdpo sft, not of fastdpo dpo"),
             (DPOConfig, {}, ["--torch_dtype=bfloat16"], "dtype (its new name)"),
             (DPOConfig, {}, ["--lora_rank", "4"], "lora_r (TRL's name for the rank)"),
             # keys TRL removed before 1.16: "did you mean --sync_ref_model?" (TR-DPO), "--dataset_name?"
             (DPOConfig, {}, ["--force_use_ref_model", "true"], "not a TRL 1.16 field: a ref_model_name_or_path"),
             (DPOConfig, {"ref_adapter_name": "ref"}, [], "a PEFT policy's reference is its base"))  # fmt: skip
    for config_cls, values, flags, said in cases:
        with pytest.raises(ConfigError, match=re.escape(said)):
            _resolve(config_cls, {**base, **values}, flags)
    # ~ in a model or data path, as transformers takes it in output_dir (it read "no folder CWD/~/m")
    run_args = _resolve(DPOConfig, {**base, "model_name_or_path": "~/m", "dataset_name": "~/d.jsonl"}, [])[0]
    assert (run_args.model_name_or_path, run_args.dataset_name) == (os.path.expanduser("~/m"),
                                                                    os.path.expanduser("~/d.jsonl"))  # fmt: skip


def test_a_resumed_run_may_turn_evaluation_on_and_change_its_evaluation_file(tmp_path):
    # do_eval follows eval_strategy (transformers sets it): evaluating the resumed part was refused as a change of
    # settings; and the fingerprint of every split's file refused a corrected test.jsonl, which is evaluation data
    import yaml

    from fastdpo.cli_resume import data_fingerprint, refuse_changed_config, refuse_changed_data
    from fastdpo.errors import ConfigError

    settings = {"learning_rate": 0.1, "eval_strategy": "no", "do_eval": False, "dataset_test_split": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    evaluating = {**settings, "eval_strategy": "steps", "do_eval": True, "dataset_test_split": "test"}
    refuse_changed_config(tmp_path / "config.yaml", evaluating, overwrite=False)
    with pytest.raises(ConfigError, match="learning_rate: 0.1 -> 0.2"):
        refuse_changed_config(tmp_path / "config.yaml", {**evaluating, "learning_rate": 0.2}, overwrite=False)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps({"prompt": split, "chosen": "a", "rejected": "b"}) + "\n")
    (tmp_path / "data_fingerprint.json").write_text(json.dumps(data_fingerprint(str(data))))
    (data / "test.jsonl").write_text(json.dumps({"prompt": "test", "chosen": "fixed", "rejected": "b"}) + "\n")
    refuse_changed_data(tmp_path / "data_fingerprint.json", data_fingerprint(str(data)), overwrite=False,
                        split="train")  # fmt: skip
    (data / "train.jsonl").write_text(json.dumps({"prompt": "train", "chosen": "other", "rejected": "b"}) + "\n")
    with pytest.raises(ConfigError, match="the data files differ from those the run trained on"):
        refuse_changed_data(tmp_path / "data_fingerprint.json", data_fingerprint(str(data)), overwrite=False,
                            split="train")  # fmt: skip


def test_resuming_from_an_earlier_step_than_the_run_reached_is_said(tmp_path, caplog):
    # save_total_limit: 1 with load_best_model_at_end keeps the best checkpoint alone: --resume went on from step 4
    # of a run that had reached step 6, training 5 and 6 again, silently
    import logging
    from types import SimpleNamespace

    from fastdpo.run_files import RunFiles

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in
                                                    range(1, 7)))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        RunFiles(tmp_path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert "resuming from the checkpoint of step 4, where the run had reached step 6" in caplog.text
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo"):  # (from the last step: nothing to say)
        RunFiles(tmp_path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert "resuming" not in caplog.text
