"""SFTTrainer in two processes (DDP over gloo on CPU, torchrun) takes the optimizer steps of one process.

One process with 4 examples per step; two processes with 1 example each and 2 accumulation steps: the same 4
examples per step, so the same loss and gradients if the loss is divided by the step's targets over both
processes and both micro-batches (times 2, which DDP's averaging undoes) and DDP's all-reduce is armed by a
forward through its wrapper. Run as a script, this file is the worker: ``python THIS OUT MODEL JSON_RUNS``
(``launch.serve``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from launch import TORCHRUN, launch, serve

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
# every run smooths its labels: the head-row term (fastdpo.ops.label_smoothing) under DDP and ZeRO-3 too
SMOOTHING = {"label_smoothing_factor": 0.1}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny model's folder, and the logged steps of one process with 4 examples per step (both tests' yardstick)."""
    import torch
    from test_train_sft import tiny_llama_config
    from tiny_tokenizer import build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    tmp_path = tmp_path_factory.mktemp("sft_distributed")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(build_tiny_tokenizer())).save_pretrained(tmp_path / "model")
    runs = {"one": {"per_device_train_batch_size": 4, **SMOOTHING}}
    one = launch(HERE, tmp_path / "one", tmp_path / "model", 1, runs)
    return tmp_path, one["one"]["logs"]


def assert_two_take_the_steps_of_one(one_process, name: str, **two_options) -> None:
    """Two processes with 1 example each and 2 accumulation steps (plus ``two_options``) vs ``one_process``."""
    tmp_path, one = one_process
    result = launch(HERE, tmp_path / name, tmp_path / "model", 2, {name: {"per_device_train_batch_size": 1,
                    "gradient_accumulation_steps": 2, **SMOOTHING, **two_options}})[name]  # fmt: skip
    assert result["zero3_partitioned"] == ("deepspeed" in two_options)
    two = result["logs"]
    assert len(one) == len(two) == 2
    for got, want in zip(two, one, strict=True):
        assert got["num_tokens"] == want["num_tokens"]  # the same examples, counted over both processes
        for name in ("loss", "grad_norm"):  # fp32 sums in another order
            assert got[name] == pytest.approx(want[name], rel=1e-5), name


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_two_processes_take_the_steps_of_one(one_process):
    assert_two_take_the_steps_of_one(one_process, "two")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_takes_the_steps_of_one_process(one_process):
    # every parameter partitioned (the head's too: run_head lets ZeRO-3 gather it)
    from test_train_distributed import ZERO3

    assert_two_take_the_steps_of_one(one_process, "zero3", deepspeed=ZERO3)


def train(out: Path, model_dir: str, options: dict):
    import datasets
    import torch
    from test_train_sft import common_args, prompt_completion_rows
    from tiny_tokenizer import build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    from fastdpo.train import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    args = SFTConfig(**{**common_args(out, "run"), "disable_tqdm": True, "use_cpu": True, **options})
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model, args=args, train_dataset=prompt_completion_rows(16, seed=2),
                         processing_class=build_tiny_tokenizer())  # fmt: skip
    trainer.train()
    return trainer


if __name__ == "__main__":
    serve(train)
