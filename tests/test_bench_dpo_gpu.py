"""bench.dpo_gpu's --profile mode, run on a CPU with the tiny model (the GPU run has only the device to add)."""

from __future__ import annotations

import re

import pytest

from bench import dpo_gpu


def test_profile_mode_writes_the_busy_share_and_the_operator_table(tmp_path):
    dpo_gpu.main(["--device", "cpu", "--model", "tiny", "--profile", "--engines", "fastdpo", "--data", "short",
                  "--pairs", "8", "--batch", "2", "--steps", "4", "--out", str(tmp_path)])  # fmt: skip
    report = (tmp_path / "dpo_gpu_profile.md").read_text()
    row = re.search(r"\| short \| fastdpo DPOTrainer \| ([\d.]+) \| ([\d.]+) \| n/a \(CPU\) \| 0 \|", report)
    assert row and float(row[1]) > 0, report  # two steps took time; a CPU run has no device kernels
    assert "aten::mm" in report and "Self CPU" in report  # the operator table of the recorded steps
    assert not (tmp_path / "dpo_gpu.json").exists()  # profiled steps are not benchmark results


def test_profile_needs_the_steps_it_records(capsys):
    with pytest.raises(SystemExit):
        dpo_gpu.main(["--device", "cpu", "--profile", "--steps", "3"])
    assert "--steps of at least 4" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["fastdpo_lean", "fastdpo_varlen_leanact"])
def test_option_engines_train_with_their_options(tmp_path, engine):
    # the lowest-memory fastdpo engine and the speed-and-memory candidate build and train (their GPU time and memory
    # are what the GPU run measures)
    dpo_gpu.main(["--device", "cpu", "--model", "tiny", "--engines", engine, "--data", "short",
                  "--pairs", "4", "--batch", "2", "--steps", "2", "--out", str(tmp_path)])  # fmt: skip
    report = (tmp_path / "dpo_gpu.md").read_text()
    name = re.escape(dpo_gpu.ENGINES[engine])
    row = re.search(rf"\| short \| {name} \| ([\d,]+) \|", report)
    assert row and int(row[1].replace(",", "")) > 0, report
    assert (tmp_path / "dpo_gpu.png").read_bytes().startswith(b"\x89PNG")  # its chart beside the table


def test_a_precomputed_reference_is_not_counted_in_the_timed_steps():
    # TRL's precompute runs its reference pass when the trainer is built: its steps' useful TFLOP/s counted that pass
    # (151 where 114 on the H200), and the docstring put it in the first step, which it is not in
    from transformers import LlamaConfig

    from bench.flops import ModelShape, dpo_step_flops

    shape = ModelShape.from_config(LlamaConfig(**dpo_gpu.MODELS["tiny"]))
    steps = [{"seq_lens": [30, 40, 25, 35], "scored": 90}] * 3
    result = {"steps": steps, "step_ends": [0.0, 1.0, 2.0], "padding": [(0, 130)] * 3, "num_tokens": 390}
    plain = dpo_gpu.summarize({**result, "engine": "trl"}, shape)
    cached = dpo_gpu.summarize({**result, "engine": "trl_precompute"}, shape)
    parts = dpo_step_flops(shape, steps[0]["seq_lens"], head_tokens=90)
    policy = parts.policy_body + parts.policy_head + parts.policy_attention
    assert cached["useful_tflops"] == pytest.approx(plain["useful_tflops"] * policy / parts.total)
    assert "setup s" in dpo_gpu.__doc__ and "not in ``train()``" in dpo_gpu.__doc__


def test_summarize_rewrites_a_stored_runs_table_from_its_recorded_steps(tmp_path):
    import shutil

    shutil.copy(dpo_gpu.RESULTS / "NVIDIA_H200" / "run3" / "dpo_gpu.json", tmp_path)
    dpo_gpu.main(["--summarize", str(tmp_path)])
    lines = (tmp_path / "dpo_gpu.md").read_text().splitlines()
    row = next(line for line in lines if "precompute_ref_log_probs" in line)
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[8:10] == ["16.2", "0.6"] and cells[12] == "114"  # setup s, first step s; useful TFLOP/s
