"""The ``fastdpo`` command, run as a user runs it: in a subprocess, on a tiny local model and JSON Lines data."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "big", "red", "tree", "house", "and"]


def fastdpo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastdpo.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import torch
    from tiny_tokenizer import build_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)

    def text(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    pairs = [{"question": text(2, 8) + "?", "chosen": " " + text(1, 9) + ".", "rejected": " " + text(1, 9) + "."}
             for _ in range(24)]  # fmt: skip
    pairs[5]["chosen"] = pairs[5]["rejected"]  # a row the quality check drops ("identical")
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    sft = [{"prompt": text(2, 8) + "?", "completion": " " + text(1, 9) + "."} for _ in range(12)]
    (root / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sft))
    common = {"model_name_or_path": "model", "logging_steps": 1, "learning_rate": 0.01, "report_to": [],
              "save_strategy": "no", "per_device_train_batch_size": 4}  # fmt: skip
    dpo = {**common, "dataset_name": "pairs.jsonl", "dataset_columns": {"prompt": "question"}, "eval_fraction": 0.25,
           "output_dir": "dpo_run", "max_steps": 5, "eval_strategy": "steps", "eval_steps": 2, "beta": 0.2}  # fmt: skip
    (root / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    (root / "sft.yaml").write_text(yaml.safe_dump({**common, "dataset_name": "sft.jsonl", "output_dir": "sft_run",
                                                   "max_steps": 2}))  # fmt: skip
    return root


def test_dpo_run_writes_its_run_directory(workdir):
    done = fastdpo("dpo", "--config", "dpo.yaml", "--max_steps", "3", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "dpo_run"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 3  # the flag wins over the YAML's 5
    assert resolved["beta"] == 0.2 and resolved["dataset_columns"] == {"prompt": "question"}  # the YAML over defaults
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [log for log in logs if "loss" in log]
    assert [log["step"] for log in train] == [1, 2, 3]
    assert any("eval_loss" in log for log in logs) and all("rewards/margins" in log for log in train)
    quality = json.loads((out / "data_quality.json").read_text())
    assert quality["removed"] == {"identical": 1} and quality["rows"]["identical"] == [5]
    assert "Rows removed before training" in (out / "data_quality.md").read_text()
    assert isinstance(json.loads((out / "dropped_rows.json").read_text()), dict)
    card = (out / "README.md").read_text()  # the model card, with the final model
    assert "# dpo_run" in card and "| trained | 3 of 3 steps," in card and "beta 0.2 |" in card
    for name in ("loss", "rewards_margins", "rewards_accuracies"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2  # the final model reloads


def in_process(*args: str, cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``fastdpo ARGS`` through ``main()`` in this process (it prints and returns the status as the command does;
    argparse's own errors exit): for runs that stop before training, which a subprocess would spend ~10 s importing
    for. The runs that train use the command itself."""
    from fastdpo.cli import main

    monkeypatch.chdir(cwd)
    try:
        code = main(list(args))
    except SystemExit as stop:
        code = stop.code
    return subprocess.CompletedProcess(list(args), code, *capsys.readouterr())


def test_an_existing_run_directory_is_not_overwritten(workdir, monkeypatch, capsys):
    out = workdir / "kept_run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = hashlib.sha256((out / "notes.txt").read_bytes()).hexdigest()
    done = in_process("dpo", "--config", "dpo.yaml", "--output_dir", "kept_run", cwd=workdir, monkeypatch=monkeypatch,
                      capsys=capsys)  # fmt: skip
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastdpo: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr  # one line, no traceback
    assert errors[0].startswith("fastdpo: error: option 'output_dir'") and "--overwrite" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert hashlib.sha256((out / "notes.txt").read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [({"betta": 0.2}, [], "did you mean 'beta'?"),
     ({}, ["--bta", "0.3"], "did you mean --beta?"),
     ({}, ["--max_steps", "abc"], "invalid int value: 'abc' — fastdpo dpo --help lists the fields"),
     ({"dataset_test_split": "test", "eval_strategy": "steps"}, [], "whose one split is 'train': there is no split"),
     # values that failed inside torch, numpy or transformers, with a traceback
     ({"beta": [0.1, 0.2]}, [], "option 'beta': expected float, got list [0.1, 0.2]"),
     ({"beta": "abc"}, [], "option 'beta': invalid float value: 'abc' — fix its value in the YAML file"),
     ({"seed": 1.5}, [], "option 'seed': expected int, got float 1.5"),
     ({"eval_strategy": "stepz"}, [], "option 'config': stepz is not a valid IntervalStrategy"),
     ({"per_device_train_batch_size": 0}, [], "option 'per_device_train_batch_size': must be a whole number ≥ 1"),
     ({"gradient_accumulation_steps": 0}, [], "option 'gradient_accumulation_steps': must be a whole number ≥ 1"),
     ({"learning_rate": -1}, [], "option 'learning_rate': must be ≥ 0, got -1"),
     ({"data_filter": "some"}, [], "option 'data_filter'"),
     ({"loss_type": "sigmod"}, [], "option 'loss_type'"),
     ({}, ["--dataset_columns", "{prompt"], "is not JSON"),
     ({"load_in_4bit": True}, [], "option 'load_in_4bit': a quantized model trains through adapters only"),
     ({"use_peft": True}, ["--load_in_4bit", "--load_in_8bit"], "pick one"),
     ({"dataset_streaming": True, "eval_fraction": 0.25, "eval_strategy": "steps"}, [],
      "option 'eval_fraction': a stream cannot be split"),
     # held-out rows that no evaluation reads: a quarter of the data lost to training, silently (TRL's eval split
     # is a split of its own); an evaluation with no rows (transformers' traceback)
     ({"eval_fraction": 0.25}, [], "option 'eval_fraction': holds out 0.25 of the rows, which eval_strategy 'no'"),
     ({"eval_strategy": "steps"}, [], "option 'eval_strategy': eval_strategy 'steps' evaluates held-out rows"),
     ({"eval_strategy": "steps", "eval_fraction": 0.25}, ["--dataset_test_split", "test"], "keep one of them"),
     ({"save_strategy": "best", "eval_strategy": "steps", "eval_fraction": 0.25}, [],
      "option 'metric_for_best_model': save_strategy 'best' saves at the best evaluation by a metric"),
     # an integration whose package is missing (a RuntimeError traceback when the trainer was built)
     ({"report_to": "clearml"}, [], "option 'report_to': clearml: not installed here — install the package"),
     # a schedule the Trainer cannot build: it failed at the first step, the run directory written
     ({"lr_scheduler_type": "cosine_with_min_lr"}, [],
      "option 'lr_scheduler_kwargs': lr_scheduler_type 'cosine_with_min_lr': One of min_lr or min_lr_rate"),
     ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"lr_end": 0.02}, "learning_rate": 0.01}, [],
      "lr_end (0.02) must be smaller than initial lr (0.01)"),  # (against the run's own learning rate)
     ({"dataset_streaming": True}, [], "option 'max_steps': an iterable train dataset has no length"),
     # torch's ValueError at the first step, the run directory written; a model __init__'s TypeError, exit 1
     ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrnt": False}}, [],
      "option 'gradient_checkpointing_kwargs': torch's checkpoint takes no 'use_reentrnt' — use its keys:"),
     ({"model_init_kwargs": {"dtpye": "float32"}}, [], "model': LlamaForCausalLM.__init__() got an unexpected "
      "keyword argument 'dtpye' — fix or remove that key")],
)  # fmt: skip
def test_bad_configs_fail_with_one_clear_line(workdir, config, flags, expected, monkeypatch, capsys):
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "model", "dataset_name": "pairs.jsonl",
                                    "output_dir": "bad_run", **config}))  # fmt: skip
    done = in_process("dpo", "--config", "bad.yaml", *flags, cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error:") and expected in line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (workdir / "bad_run").exists()  # nothing written: the fixed config runs without --overwrite


def test_a_run_that_fails_on_its_data_writes_nothing(workdir, monkeypatch, capsys):
    (workdir / "broken.jsonl").write_text('{"question": "q?", "chosen": "a."}\n')  # no rejected column
    path = workdir / "broken.yaml"
    config = {"model_name_or_path": "model", "dataset_name": "broken.jsonl", "dataset_columns": {"prompt": "question"},
              "output_dir": "broken_run"}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    done = in_process("dpo", "--config", "broken.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "rejected" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not (workdir / "broken_run").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_dpo_run_from_trls_flags(workdir):
    # TRL's ModelConfig flags: the model loaded in 4 bits, LoRA on q/v; the saved model is the adapter
    flags = ["--use_peft", "--load_in_4bit", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    done = fastdpo("dpo", "--config", "dpo.yaml", "--output_dir", "qlora_run", "--max_steps", "2", *flags, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "qlora_run"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["use_peft"] and resolved["load_in_4bit"] and resolved["lora_target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [log["loss"] for log in train if "loss" in log]
    # LoRA starts at zero: the policy is its reference (the 4-bit base), so the first loss is log 2
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), rel=1e-6)


def test_sft_run(workdir):
    # sft.yaml's settings as flags alone, as trl sft takes them (--config was required)
    config = yaml.safe_load((workdir / "sft.yaml").read_text())
    flags = [word for key, value in config.items() for word in (f"--{key}", "none" if value == [] else str(value))]
    done = fastdpo("sft", *flags, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads(line) for line in (workdir / "sft_run" / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == [1, 2]
    assert (workdir / "sft_run" / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((workdir / "sft_run" / "dropped_rows.json").read_text()) == {}  # no row lost its labels


def test_streamed_runs(workdir, monkeypatch):
    # dataset_streaming (TRL's key): the file read as training goes, its columns renamed, a split to evaluate on
    config = yaml.safe_load((workdir / "dpo.yaml").read_text())
    del config["eval_fraction"]
    # a row preparation refuses (an empty answer) is dropped as it is read under data_filter: drop (the default), as
    # from a map-style dataset (it stopped the run mid-training), and counted by its row in the stream
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    rows[7]["chosen"] = " "
    (workdir / "pairs_stream.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config.update(dataset_streaming=True, dataset_test_split="train", output_dir="dpo_stream", max_steps=2,
                  dataset_name="pairs_stream.jsonl")  # fmt: skip
    (workdir / "dpo_stream.yaml").write_text(yaml.safe_dump(config))
    done = fastdpo("dpo", "--config", "dpo_stream.yaml", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the quality report and its filter (data_filter) need every row and are skipped" in done.stderr
    assert "train stream: row 7 dropped (empty: column 'chosen': is empty" in done.stderr
    logs = [json.loads(line) for line in (workdir / "dpo_stream" / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == [1, 2]
    assert any("eval_loss" in log for log in logs)
    dropped = json.loads((workdir / "dpo_stream" / "dropped_rows.json").read_text())
    assert dropped["train"] == {"empty": [7]} and set(dropped["eval"]["empty"]) == {7}, dropped  # (each pass counts)
    assert not (workdir / "dpo_stream" / "data_quality.json").exists()  # no report was made: none is written
    # config.yaml records the settings as given, not as the trainer adjusted them for a stream (dispatch_batches):
    # --resume compares them with the same config's and goes on (it was refused)
    from fastdpo.cli import _resolved_config, load_config
    from fastdpo.cli_resume import refuse_changed_config

    monkeypatch.chdir(workdir)
    run_args, args = load_config(argparse.Namespace(command="dpo", config=Path("dpo_stream.yaml")), [])
    refuse_changed_config(Path("dpo_stream/config.yaml"), _resolved_config(run_args, args), overwrite=False)
    assert args.stream_bad_rows == "drop"  # (data_filter's; the run's own setting wins, as does data_filter: none)
    for flags, expected in ((["--data_filter", "none"], "raise"), (["--stream_bad_rows", "raise"], "raise")):
        run_args, args = load_config(argparse.Namespace(command="dpo", config=Path("dpo_stream.yaml")), flags)
        assert args.stream_bad_rows == expected, flags
    # (SFT streams: the same streamed_splits, with SFT's column names; SFTTrainer's streams in test_train_stream.py)


def test_every_subcommand_has_help(capsys):
    from fastdpo.cli import main

    data = [["data", action] for action in ("check", "stats", "filter", "pairs", "split")]
    for args in ([], ["dpo"], ["sft"], ["env"], ["data"], *data):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and "usage: fastdpo" in out, args
        if args in (["dpo"], ["sft"]):  # the config's fields too, as `trl dpo --help` lists them
            assert "--max_steps MAX_STEPS" in out and "--model_name_or_path" in out and "--use_peft" in out, out
            assert ("--beta BETA" in out) == (args == ["dpo"])
            assert ("--completion_only_loss" in out) == (args == ["sft"])


def test_env_reports_versions_device_and_head(workdir):
    done = fastdpo("env", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["versions"]["torch"] and info["versions"]["fastdpo"]
    assert isinstance(info["cpp_packer"], bool)
    # the head ops' own choice, per input dtype: on a CPU the chunked torch path for both
    import torch

    if torch.cuda.is_available():
        assert set(info["head_impl_auto"].values()) <= {"torch", "triton"}
    else:
        assert info["head_impl_auto"] == {"bf16": "torch", "fp32": "torch"} and info["lean_kernels"] is False
    # the plain report, from a process that then says whether transformers' Trainer machinery was imported (it
    # brings peft and bitsandbytes: 12.8 s for `fastdpo env` when it was)
    script = ("import sys; from fastdpo.cli import main; main(['env']); "
              "print('trainer imported:', 'transformers.trainer_utils' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert "head impl auto bf16 → " in done.stdout and "lean layers" in done.stdout, done.stderr[-2000:]
    assert "trainer imported: False" in done.stdout


# --- fastdpo data (in this process: main() prints and returns the exit status as the command does)

MAPPED = ["--columns", '{"prompt": "question"}']


@pytest.fixture
def data_cli(workdir, monkeypatch, capsys):
    from fastdpo.cli import main

    monkeypatch.chdir(workdir)

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(["data", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_data_check_and_stats(workdir, data_cli):
    done = data_cli("check", "pairs.jsonl", *MAPPED, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["rows"]["identical"] == [5] and report["num_rows"] == 24
    markdown = data_cli("check", "pairs.jsonl", *MAPPED).stdout
    assert "| identical | drop | 1 | 5 |" in markdown
    stats = data_cli("stats", "pairs.jsonl", *MAPPED, "--tokenizer", "model", "--json")
    assert stats.returncode == 0, stats.stderr[-2000:]
    lengths = json.loads(stats.stdout)
    assert lengths["pairs"] == 23 and lengths["tokens"]["chosen"]["max"] >= lengths["tokens"]["chosen"]["min"] > 0
    # --limit: the first N rows, read as a stream: a broken line 26 MB on is never reached (datasets' JSON stream
    # reads 10 MiB blocks, here two; loading the file whole fails on it)
    lines = (workdir / "pairs.jsonl").read_text().splitlines(keepends=True)
    (workdir / "broken_tail.jsonl").write_text("".join(lines) * 10_000 + "{not json\n")  # 26 MB
    limited = data_cli("check", "broken_tail.jsonl", *MAPPED, "--json", "--limit", "10")
    assert limited.returncode == 0, limited.stderr[-2000:]
    assert "the first 10 rows of broken_tail.jsonl (--limit 10)" in limited.stderr
    report = json.loads(limited.stdout)
    assert report["num_rows"] == 10 and report["rows"]["identical"] == [5]
    assert json.loads(data_cli("stats", "pairs.jsonl", *MAPPED, "--json", "--limit", "100").stdout)["pairs"] == 23
    whole = data_cli("check", "broken_tail.jsonl", *MAPPED, "--json")
    assert whole.returncode != 0 and "broken_tail.jsonl" in whole.stderr, whole.stderr[-2000:]
    # a value Arrow cannot hold within the first rows: named by line, as loading names it (Arrow's traceback before)
    (workdir / "surrogate.jsonl").write_text(lines[0] + lines[1].replace('?"', '?\\ud800"', 1))
    refused = data_cli("check", "surrogate.jsonl", *MAPPED, "--limit", "5")
    assert refused.returncode == 2 and "surrogate.jsonl: line 2: a lone surrogate '\\ud800'" in refused.stderr
    refused = data_cli("check", "pairs.jsonl", "--limit", "0")
    assert refused.returncode == 2 and "option '--limit': must be at least 1" in refused.stderr
    refused = data_cli("check", "pairs.jsonl", "--max-length", "64")  # tokens: no tokenizer to count them with
    assert refused.returncode == 2 and "option '--max-length': counts tokens — pass --tokenizer" in refused.stderr


def test_data_filter_keeps_its_input_and_its_output_checks_clean(workdir, data_cli):
    source = workdir / "pairs.jsonl"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    done = data_cli("filter", "pairs.jsonl", "clean.jsonl", *MAPPED)
    assert done.returncode == 0, done.stderr[-2000:]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    summary = json.loads((workdir / ".clean.jsonl.dropped.json").read_text())
    assert summary["dropped"] == {"identical": 1} and summary["kept"] == 23
    assert summary["dropped_rows"] == {"identical": [5]}  # what was left out, by reason and row
    again = json.loads(data_cli("check", "clean.jsonl", "--json").stdout)
    assert not any(again["severity"][reason] == "drop" for reason in again["counts"])  # nothing left to drop
    assert again["num_rows"] == 23
    # with --tokenizer, the token checks' drop reasons too: a prompt that fills --max-length (it took no tokenizer)
    checked = data_cli("check", "pairs.jsonl", *MAPPED, "--tokenizer", "model", "--max-length", "12", "--json")
    fills = json.loads(checked.stdout)["rows"]["prompt_fills_max_length"]
    assert fills and 5 not in fills
    fits = data_cli("filter", "pairs.jsonl", "fits.jsonl", *MAPPED, "--tokenizer", "model", "--max-length", "12")
    assert fits.returncode == 0, fits.stderr[-2000:]
    fits_summary = json.loads((workdir / ".fits.jsonl.dropped.json").read_text())
    assert fits_summary["dropped_rows"] == {"identical": [5], "prompt_fills_max_length": fills}
    for args in (["pairs.jsonl", "pairs.jsonl"], ["pairs.jsonl", "clean.jsonl"]):  # its input; an existing file
        refused = data_cli("filter", *args, *MAPPED)
        assert refused.returncode == 2 and "fastdpo: error: option 'out'" in refused.stderr, args
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    where = data_cli("filter", "pairs.jsonl", "short.jsonl", *MAPPED, "--drop", "identical",
                    "--where", "chosen != x")  # fmt: skip
    assert where.returncode == 0, where.stderr[-2000:]
    where_summary = json.loads((workdir / ".short.jsonl.dropped.json").read_text())
    assert where_summary["dropped"] == {"identical": 1, "where": 0}
    assert where_summary["dropped_rows"] == {"identical": [5], "where": []}


def test_data_commands_judge_the_rows_as_the_trainers_read_them(workdir, data_cli):
    # UltraFeedback-binarized's shape: a prompt string, whole conversations (the user turn first) and score aliases.
    # Judged raw, every row was 'roles_out_of_order' (filter wrote an empty file) and score_chosen went unread
    def row(prompt, good, bad, scores):
        turn = {"role": "user", "content": prompt}
        return {"prompt": prompt, "chosen": [turn, {"role": "assistant", "content": good}],
                "rejected": [turn, {"role": "assistant", "content": bad}], "score_chosen": scores[0],
                "score_rejected": scores[1]}  # fmt: skip

    rows = [row("Sky?", "Blue.", "Green.", (8.5, 3.0)), row("Haiku?", "Leaves fall.", "Autumn.", (7.0, 7.0)),
            row("French?", "Bonjour.", "Hola.", (9.0, 2.5))]  # fmt: skip
    (workdir / "ufb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = data_cli("check", "ufb.jsonl", "--json")
    assert check.returncode == 0, check.stderr[-2000:]
    assert json.loads(check.stdout)["rows"] == {"tie": [1]}  # the equal scores, read through the alias
    kept = data_cli("filter", "ufb.jsonl", "ufb_kept.jsonl", "--where", "chosen_score >= 8")
    assert kept.returncode == 0, kept.stderr[-2000:]
    written = [json.loads(line) for line in (workdir / "ufb_kept.jsonl").read_text().splitlines()]
    assert written == [rows[0], rows[2]]  # the rows as they were, not normalized
    # the file's own names work in --where too
    own = data_cli("filter", "ufb.jsonl", "ufb_own.jsonl", "--where", "score_chosen >= 8")
    assert own.returncode == 0 and "kept 2 of 3 rows" in own.stdout, own.stderr[-2000:]
    # a row the trainers' preparation refuses is reported as it is; the others are still judged prepared (one bad
    # row made every row 'roles_out_of_order' again, and filter kept none)
    (workdir / "bad_row.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[1], "chosen": 5}]))
    bad = data_cli("check", "bad_row.jsonl", "--json")
    assert bad.returncode == 0 and "rows the trainers' preparation refuses, checked as they are: 1 of 4" in bad.stderr
    assert "(the first: row 3, column 'chosen': " in bad.stderr and "check_preferences" not in bad.stderr  # (Python's)
    found = json.loads(bad.stdout)["rows"]
    assert found["not_text"] == [3] and {row for rows in found.values() for row in rows} == {1, 3}  # (1: the tie)
    cleaned = data_cli("filter", "bad_row.jsonl", "bad_row_kept.jsonl")
    assert cleaned.returncode == 0 and "kept 3 of 4 rows" in cleaned.stdout, cleaned.stderr[-2000:]
    # with no prompt column the prompt is the shared text: said, as the raw check's no_prompt_column said it
    implicit = data_cli("check", str(Path(__file__).parent / "fixtures" / "hh_rlhf.jsonl"))
    assert implicit.returncode == 0 and "no prompt column: each pair's prompt is the text" in implicit.stderr


def test_data_pairs_and_split(workdir, data_cli):
    rows = [{"prompt": "q1?", "completions": ["a.", "b.", "c."], "scores": [3, 1, 2]},
            {"prompt": "q2?", "completions": ["x."], "scores": [1]},
            {"prompt": "q3?", "completions": ["y.", "z."], "scores": [2, 2]},
            {"prompt": "q4?", "completions": ["w.", "w.", ""], "scores": [2, 1, 0]}]  # fmt: skip
    (workdir / "rated.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = data_cli("pairs", "rated.jsonl", "rated_pairs.jsonl")
    assert done.returncode == 0, done.stderr[-2000:]
    pairs = [json.loads(line) for line in (workdir / "rated_pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a.", "b.")]  # best against worst
    summary = json.loads((workdir / ".rated_pairs.jsonl.dropped.json").read_text())
    assert summary["dropped_rows"]["too_few_completions"] == [1, 3] and summary["dropped_rows"]["ties"] == [2]
    assert summary["excluded"] == {"blank": 1, "repeated": 1} and summary["excluded_rows"]["repeated"] == [3]
    assert "; not candidates: 2 completions (blank 1, repeated 1)" in done.stdout
    split = data_cli("split", "pairs.jsonl", "train.jsonl", "eval.jsonl", *MAPPED, "--test-size", "0.25")  # fmt: skip
    unmapped = data_cli("split", "pairs.jsonl", "t0.jsonl", "e0.jsonl")  # its prompts are in "question"
    assert unmapped.returncode == 2 and """with --columns '{"prompt": "<your column>"}'""" in unmapped.stderr
    assert "prompt='" not in unmapped.stderr  # (no Python words: the fix began "pass prompt='<your column>'")
    # no prompt column: grouped by the prompt the trainers take out of chosen and rejected (refused before)
    hh = str(Path(__file__).parent / "fixtures" / "hh_rlhf.jsonl")
    implicit = data_cli("split", hh, "hh_train.jsonl", "hh_eval.jsonl", "--test-size", "0.3")
    assert implicit.returncode == 0, implicit.stderr[-2000:]
    from fastdpo.data import prepare_preferences

    prompts = [set(prepare_preferences(str(workdir / f"hh_{part}.jsonl"))["prompt"]) for part in ("train", "eval")]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]
    rows = (workdir / "hh_train.jsonl").read_text().splitlines()  # a row the preparation refuses: a KeyError before
    (workdir / "hh_refused.jsonl").write_text("\n".join([*rows, json.dumps({**json.loads(rows[0]), "chosen": None})]))
    refused_row = data_cli("split", "hh_refused.jsonl", "hr_train.jsonl", "hr_eval.jsonl", "--test-size", "0.3")
    assert refused_row.returncode == 0 and "rows the trainers' preparation refuses" in refused_row.stderr
    by_count = data_cli("split", "pairs.jsonl", "t6.jsonl", "e6.jsonl", *MAPPED, "--test-size", "6")  # a row count
    # one file for both: the eval rows were written over the train rows (with --overwrite, silently)
    for flags in ([], ["--overwrite"]):
        same = data_cli("split", "pairs.jsonl", "u.jsonl", "./u.jsonl", *MAPPED, *flags)
        assert same.returncode == 2 and "u.jsonl is given for both outputs" in same.stderr, same.stderr[-2000:]
        assert not (workdir / "u.jsonl").exists()
    assert by_count.returncode == 0 and "eval 6 rows" in by_count.stdout, by_count.stderr[-2000:]
    assert split.returncode == 0, split.stderr[-2000:]
    train = [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert len(train) + len(held_out) == 24 and held_out
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}
    # message lists in a CSV: pandas wrote their Python repr, which read back (and trained) as one string
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rejected = [messages[0], {"role": "assistant", "content": "No."}]
    (workdir / "chat.jsonl").write_text(json.dumps({"chosen": messages, "rejected": rejected}) + "\n")
    done = data_cli("filter", "chat.jsonl", "chat.csv")
    assert done.returncode == 2 and "'chosen', 'rejected' hold lists or records" in done.stderr, done.stderr
    assert not (workdir / "chat.csv").exists()
    (workdir / "chats.jsonl").write_text((workdir / "chat.jsonl").read_text().replace("Hi?", "Hey?") * 2 + (
        workdir / "chat.jsonl").read_text() * 2)  # fmt: skip
    done = data_cli("split", "chats.jsonl", "chat_train.jsonl", "chat_eval.csv", "--test-size", "0.5")
    assert done.returncode == 2 and not (workdir / "chat_train.jsonl").exists()  # refused before either was written
    assert data_cli("filter", "chat.jsonl", "chat_kept.jsonl").returncode == 0


def test_lora_and_quantization_keys_build_trls_configs(caplog):
    from fastdpo.cli import RunArguments
    from fastdpo.cli_model import peft_and_quantization
    from fastdpo.errors import ConfigError

    with caplog.at_level("WARNING", logger="fastdpo"):
        assert peft_and_quantization(RunArguments(lora_r=8), None) == (None, None)
    assert "['lora_r'] set but use_peft is false" in caplog.text  # counted, not silently dropped
    lora, quantization = peft_and_quantization(RunArguments(use_peft=True, lora_r=8, use_dora=True), None)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_dora, quantization) == (8, 32, 0.05, True, None)
    # --lora_target_modules all-linear (a list of one, from the flag): PEFT's keyword, as TRL's ModelConfig passes it
    lora, _ = peft_and_quantization(RunArguments(use_peft=True, lora_target_modules=["all-linear"]), None)
    assert lora.target_modules == "all-linear"
    if importlib.util.find_spec("bitsandbytes") is not None:
        import torch

        qlora = RunArguments(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True)
        _, quantization = peft_and_quantization(qlora, {"dtype": "bfloat16"})
        assert quantization.load_in_4bit and quantization.bnb_4bit_compute_dtype == torch.bfloat16
        assert quantization.bnb_4bit_quant_type == "fp4" and quantization.bnb_4bit_use_double_quant
        _, quantization = peft_and_quantization(qlora, {"torch_dtype": "float16"})  # the old name of dtype
        assert quantization.bnb_4bit_compute_dtype == torch.float16
    with pytest.raises(ConfigError, match="'nf4' or 'fp4'"):
        peft_and_quantization(RunArguments(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="int4"), None)


def test_a_flag_null_unsets_what_the_yaml_set():
    from fastdpo.cli import _resolve
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    values = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o", "eval_fraction": 0.1, "max_length": 9}
    run_args, args = _resolve(DPOConfig, values, ["--eval_fraction", "null", "--max_length", "None"])
    assert run_args.eval_fraction is None and args.max_length is None
    with pytest.raises(ConfigError, match="--beta: invalid float value: 'null'"):  # beta is a number, never None
        _resolve(DPOConfig, values, ["--beta", "null"])
    # bool | None fields too ("Truthy value expected" before); a plain bool stays a bool
    from fastdpo.train import SFTConfig

    sft = {**values, "completion_only_loss": False, "eval_packing": True}
    args = _resolve(SFTConfig, sft, ["--completion_only_loss", "null", "--eval_packing", "None"])[1]
    assert (args.completion_only_loss, args.eval_packing) == (None, None)
    assert _resolve(SFTConfig, sft, ["--completion_only_loss", "true"])[1].completion_only_loss is True
    with pytest.raises(ConfigError, match="--packing: Truthy value expected"):
        _resolve(SFTConfig, sft, ["--packing", "null"])
    # report_to's own 'none' (also its default) is no integration, not [None], which the Trainer refused
    cases = (({}, []), ({}, ["--report_to", "none"]), ({"report_to": None}, []), ({}, ["--report_to", "null"]))
    for extra, flags in cases:
        assert _resolve(DPOConfig, {**values, **extra}, flags)[1].report_to == [], (extra, flags)
    assert _resolve(DPOConfig, values, ["--report_to", "tensorboard"])[1].report_to == ["tensorboard"]
    # list and dict fields too (lists became [None]: a traceback; dicts were refused as not a JSON object)
    lists = {**values, "lora_target_modules": ["q_proj"], "loss_weights": [1.0], "model_init_kwargs": {"dtype": "auto"},
             "dataset_columns": {"prompt": "question"}}  # fmt: skip
    flags = ["--lora_target_modules", "null", "--loss_weights", "None", "--model_init_kwargs", "null",
             "--dataset_columns", "null"]  # fmt: skip
    run_args, args = _resolve(DPOConfig, lists, flags)
    assert (run_args.lora_target_modules, args.loss_weights, args.model_init_kwargs) == (None, None, None)
    assert run_args.dataset_columns is None
    with pytest.raises(ConfigError, match="null unsets the list: give it alone"):
        _resolve(DPOConfig, lists, ["--lora_target_modules", "q_proj", "null"])


def test_trls_model_config_keys_load_the_model_as_trls_scripts_do():
    # dtype, attn_implementation, model_revision (in most TRL recipes) were refused as unknown keys; the closest
    # field the error offered could mislead (model_revision -> hub_revision, the branch pushed to)
    from fastdpo.cli import _resolve, _resolved_config
    from fastdpo.cli_model import merge_model_keys
    from fastdpo.errors import ConfigError
    from fastdpo.train import DPOConfig

    def loaded(values, flags=()):
        run_args, args = _resolve(DPOConfig, values, list(flags))
        recorded = _resolved_config(run_args, args)  # config.yaml: the keys as given, not merged (a rerun's --dtype
        merge_model_keys(run_args, args)  # was lost under the merged model_init_kwargs)
        return args.model_init_kwargs, recorded["model_init_kwargs"]

    values = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o", "dtype": "bfloat16",
              "attn_implementation": "eager", "model_revision": "v2"}  # fmt: skip
    assert loaded(values) == ({"revision": "v2", "dtype": "bfloat16", "attn_implementation": "eager"}, None)
    mine = {**values, "model_init_kwargs": {"dtype": "float16"}}  # its own keys win, as in TRL's scripts
    assert loaded(mine, ["--model_revision", "main"]) == ({"dtype": "float16", "attn_implementation": "eager"},
                                                          {"dtype": "float16"})  # fmt: skip
    assert loaded({**values, "dtype": None, "attn_implementation": None})[0] == {"revision": "v2"}
    with pytest.raises(ConfigError, match="option 'torch_dtype': unknown field 'torch_dtype' in the config — dtype"):
        _resolve(DPOConfig, {**values, "torch_dtype": "bfloat16"}, [])
    with pytest.raises(ConfigError, match="unknown flags .*--torch_dtype.* — dtype"):  # (--torch_compile?, before)
        _resolve(DPOConfig, values, ["--torch_dtype", "bfloat16"])


def test_a_key_set_twice_in_the_yaml_is_refused_with_its_lines(workdir, monkeypatch, capsys):
    # PyYAML alone keeps the last value (0.5) silently
    (workdir / "twice.yaml").write_text("model_name_or_path: model\nbeta: 0.1\ndataset_columns:\n  prompt: question\n"
                                        "beta: 0.5\n")  # fmt: skip
    done = in_process("dpo", "--config", "twice.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "twice.yaml sets 'beta' twice (lines 2 and 5) — keep one" in done.stderr
    (workdir / "nested.yaml").write_text("dataset_columns:\n  prompt: question\n  prompt: q\n")
    done = in_process("dpo", "--config", "nested.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "sets 'prompt' twice (lines 2 and 3)" in done.stderr
    from fastdpo.cli import _unique_keys_loader

    (workdir / "listkey.yaml").write_text("? [a, b]\n: 1\n")  # a list as a key: a TypeError from the check before
    done = in_process("dpo", "--config", "listkey.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "listkey.yaml is not valid YAML: line 1, column 3: a list as a key" in done.stderr
    merged = "base: &b\n  beta: 0.1\n  max_length: 64\nrun:\n  <<: *b\n  beta: 0.2\n"  # overriding a merge is fine
    assert yaml.load(merged, Loader=_unique_keys_loader(Path("m.yaml"))) == yaml.safe_load(merged)


def test_a_missing_column_names_the_commands_option_for_the_map(workdir, monkeypatch, capsys):
    # the library's fix says columns={...} (a Python argument); each command names its own option, in its syntax
    done = in_process("dpo", "--config", "dpo.yaml", "--dataset_columns", '{"prompt": "query"}', "--output_dir",
                      "unmapped_run", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert done.returncode == 2 and "column 'query': column not found" in done.stderr, done.stderr[-2000:]
    assert 'map your column with dataset_columns: {"prompt": "<your column>"} in the YAML' in done.stderr
    (workdir / "no_chosen.jsonl").write_text(json.dumps({"prompt": "p", "good": "a", "rejected": "b"}) + "\n")
    done = in_process("data", "check", "no_chosen.jsonl", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "column 'chosen': column not found" in done.stderr
    assert """map your column with --columns '{"chosen": "<your column>"}' (columns present: prompt, good""" in (
        done.stderr
    )


def test_a_missing_config_and_an_output_dir_that_is_a_file_are_one_line(workdir, monkeypatch, capsys):
    done = in_process("dpo", "--config", "nosuch.yaml", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2 and "option '--config': nosuch.yaml: no such file" in done.stderr
    (workdir / "afile").write_text("mine\n")
    done = in_process("dpo", "--config", "dpo.yaml", "--output_dir", "afile", cwd=workdir, monkeypatch=monkeypatch,
                      capsys=capsys)  # fmt: skip
    assert done.returncode == 2 and "afile is a file, not a folder" in done.stderr, done.stderr[-2000:]
    assert (workdir / "afile").read_text() == "mine\n"


def test_a_jsonl_output_keeps_every_float_as_it_came(workdir, data_cli):
    # pandas' to_json wrote 10 significant digits: a score of 1e-12 came back 0.0 (a tie), 0.30000000001 as 0.3
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1e-12, "rejected_score": 0.0,
           "ref_logp": -123.456789012345}  # fmt: skip
    (workdir / "floats.jsonl").write_text(json.dumps(row) + "\n")
    assert data_cli("filter", "floats.jsonl", "floats_kept.jsonl").returncode == 0
    assert json.loads((workdir / "floats_kept.jsonl").read_text()) == row
