"""The ``fastdpo`` command across runs: a LoRA SFT run continued by DPO, a run directory replaced with --overwrite."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import fastdpo, workdir  # noqa: F401

pytestmark = pytest.mark.slow
LORA = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]


def train_logs(out) -> list[dict]:
    return [log for log in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in log]


def test_a_lora_sft_run_continues_into_dpo_with_its_adapter(workdir):  # noqa: F811
    # transformers loaded the run's folder with its adapter attached frozen to a plain model: DPO trained nothing
    # (grad_norm 0 every step, then a traceback saving it); with --use_peft the SFT adapter was replaced by a new one
    done = fastdpo("sft", "--config", "sft.yaml", *LORA, "--output_dir", "lora_sft", "--learning_rate", "0.1",
                   cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "lora_sft" / "adapter_config.json").is_file()
    base = json.loads((workdir / "lora_sft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((workdir / "model").resolve())  # absolute: the folder loads from anywhere
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
