"""The ``fastdpo`` command, run as a user runs it: in a subprocess, on a tiny local model and JSON Lines data."""

from __future__ import annotations

import hashlib
import json
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
    for name in ("loss", "rewards_margins", "rewards_accuracies"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2  # the final model reloads


def test_an_existing_run_directory_is_not_overwritten(workdir):
    out = workdir / "kept_run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = hashlib.sha256((out / "notes.txt").read_bytes()).hexdigest()
    done = fastdpo("dpo", "--config", "dpo.yaml", "--output_dir", "kept_run", cwd=workdir)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastdpo: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr  # one line, no traceback
    assert errors[0].startswith("fastdpo: error: column 'output_dir'") and "--overwrite" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert hashlib.sha256((out / "notes.txt").read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [({"betta": 0.2}, [], "did you mean 'beta'?"),
     ({}, ["--bta", "0.3"], "did you mean --beta?"),
     ({"data_filter": "some"}, [], "column 'data_filter'"),
     ({"loss_type": "sigmod"}, [], "column 'loss_type'")],
)  # fmt: skip
def test_bad_configs_fail_with_one_clear_line(workdir, config, flags, expected):
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "model", "dataset_name": "pairs.jsonl",
                                    "output_dir": "bad_run", **config}))  # fmt: skip
    done = fastdpo("dpo", "--config", "bad.yaml", *flags, cwd=workdir)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error:") and expected in line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_sft_run(workdir):
    done = fastdpo("sft", "--config", "sft.yaml", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads(line) for line in (workdir / "sft_run" / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == [1, 2]
    assert (workdir / "sft_run" / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_every_subcommand_has_help(workdir):
    for args in ([], ["dpo"], ["sft"], ["env"]):
        done = fastdpo(*args, "--help", cwd=workdir)
        assert done.returncode == 0 and "usage: fastdpo" in done.stdout, args


def test_env_reports_versions_device_and_head(workdir):
    done = fastdpo("env", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["versions"]["torch"] and info["versions"]["fastdpo"]
    assert info["head_impl_auto"] in ("torch", "triton") and isinstance(info["cpp_packer"], bool)
