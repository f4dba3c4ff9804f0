"""Several processes (DDP over gloo on CPU, launched with torchrun): the same steps as one process.

Two processes with 2 pairs each must take the optimizer steps one process takes with 4 pairs: the same pairs, the
same gradients (DDP's all-reduce armed by a forward through its wrapper), metrics gathered over both. With token
budget batches the processes hold different numbers of pairs; every pair must still weigh the same. A cached
reference is computed by both processes, each its share of the rows. A stream is shared by the processes. DeepSpeed
ZeRO-3 (its CPU accelerator runs on gloo) partitions the policy and the reference and must take the same steps too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from launch import ACCELERATE, TORCHRUN, launch
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

import fastdpo

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


# the token budget runs: rank r takes every 2nd batch, so a step of 2 processes = 2 accumulated batches of one
BUDGET = {"max_tokens_per_batch": 150}
TAIL = {"pairs": 7, "per_device_train_batch_size": 1, "max_steps": -1, "num_train_epochs": 1}  # an epoch of 4 steps


def ddp_runs(tmp_path: Path, processes: int, name: str) -> dict[str, list[dict]]:
    """Each run's logged steps, all trained in one launch of ``processes`` processes: 4 pairs per step (2 per
    process), the token budget, and the cached reference (each process computes its share, process 0 writes the
    file) written under ``tmp_path/cache_<name>``."""
    pairs = {"per_device_train_batch_size": 4 // processes}
    runs = {
        "pairs": pairs,
        "budget": {**BUDGET, "gradient_accumulation_steps": 2 // processes},
        "cached": {**pairs, "precompute_ref_log_probs": True, "ref_cache_dir": str(tmp_path / f"cache_{name}")},
        # a stream: each process reads it whole and keeps its share of every 4 rows (accelerate's shard)
        "stream": {**pairs, "stream": True},
        "dropin": {**pairs, "trainer": "dropin"},
        # 7 pairs, 1 a process: accelerate repeats a pair to even out the last step, which TRL's metrics leave out
        "dropin_tail": {**TAIL, "trainer": "dropin"},
        "trl_tail": {**TAIL, "trainer": "trl"},
        # accelerate splits each batch of 4 over the processes: the balanced deal took other pairs per step before
        "split": {"per_device_train_batch_size": 4, "accelerator_config": {"split_batches": True}},
        # RPO's NLL is a token mean over each process's micro-batch: the balanced deal changed its pairs, and the loss
        "rpo": {**pairs, "loss_type": ["sigmoid", "sft"]},
        "trl_rpo": {**pairs, "loss_type": ["sigmoid", "sft"], "trainer": "trl"},
        # the ORPO drop-in against TRL's (its NLL too is a token mean over each process's micro-batch)
        "orpo": {**pairs, "trainer": "orpo_dropin"},
        "trl_orpo": {**pairs, "trainer": "orpo_trl"},
        # prompts that fill max_length: dropped by every process, warned of once
        "drops": {**pairs, "max_length": 12},
    }
    results = launch(WORKER, tmp_path / name, tmp_path / "model", processes, runs)
    for result in results.values():
        assert not result["zero3_partitioned"] and result["engine"] != "DeepSpeedEngine"
    # the cached reference: each process computes its share of the 16 pairs (process 0 computed all of them, while
    # the other waited: on NCCL, up to ddp_timeout); a cache read computes none
    assert results["cached"]["reference_rows_computed"] == 16 // processes
    return {run: result["logs"] for run, result in results.items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """The tiny model's folder, and the single-process runs both tests compare with."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    tiny_model(build_tiny_tokenizer(), tmp_path / "model")
    return tmp_path, ddp_runs(tmp_path, 1, "one")


TOKEN_MEANS = ("logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy")


def assert_same_steps(ours: list[dict], expected: list[dict]) -> None:
    assert len(ours) == len(expected) == 2
    for got, want in zip(ours, expected, strict=True):
        assert got["num_tokens"] == want["num_tokens"]  # the same pairs, counted over both processes
        # per-token means too: a mean of the processes' token means was off (logits/rejected 9x, the token accuracy)
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen", *TOKEN_MEANS):  # (fp32 sums reordered)
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_two_processes_take_the_steps_of_one(one_process):
    tmp_path, one = one_process
    two = ddp_runs(tmp_path, 2, "two")
    for run in ("pairs", "budget", "cached", "stream", "dropin"):
        assert_same_steps(two[run], one[run])
    assert_same_steps(two["split"], one["pairs"])
    # (TRL's batches: balance_ranks is off; 1e-4: our packed forward against TRL's padded one, fp32 sums reordered)
    for ours, theirs in zip(two["rpo"], two["trl_rpo"], strict=True):
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    for ours, theirs in zip(two["orpo"], two["trl_orpo"], strict=True):  # (DDP's all-reduce armed through the wrapper)
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "nll_loss", "log_odds_ratio"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    # the drop-in's metrics at the end of the data are TRL's: its token sums and num_tokens leave out the pair
    # accelerate repeats (gather_for_metrics: num_tokens 601 where 476), its rewards and log-probs keep it (gather)
    assert len(two["dropin_tail"]) == len(two["trl_tail"]) == 4
    for ours, theirs in zip(two["dropin_tail"], two["trl_tail"], strict=True):
        assert ours["num_tokens"] == theirs["num_tokens"]
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "rewards/accuracies", *TOKEN_MEANS):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    assert len(list((tmp_path / "cache_two").glob("*.arrow"))) == 1  # one file, written once
    assert (tmp_path / "two" / "stderr.txt").read_text().count("train data: ") == 1  # (it was said by each process)


# What fastdpo/configs/accelerate/zero3.yaml asks of DeepSpeed, as TrainingArguments(deepspeed=...) takes it
# (stage3_param_persistence_threshold 0: DeepSpeed keeps parameters under it whole, every one of this tiny model's)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto"}  # fmt: skip


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed next to this Python")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_takes_the_steps_of_one_process(one_process):
    # policy and reference partitioned over 2 processes (DeepSpeed's CPU accelerator, gloo); the fused head runs as
    # the LM head module's forward, so ZeRO-3 gathers its weight for the forward and again for the backward
    tmp_path, one = one_process
    one = one["pairs"]
    two = launch(WORKER, tmp_path / "zero3", tmp_path / "model", 2,
                 {"zero3": {"per_device_train_batch_size": 2, "deepspeed": ZERO3}})["zero3"]  # fmt: skip
    assert two["zero3_partitioned"] and two["engine"] == "DeepSpeedEngine"
    assert_same_steps(two["logs"], one)
    # the shipped accelerate config, through accelerate launch (DeepSpeed keeps this tiny model's parameters whole:
    # all are under its default persistence threshold; the run above partitions them)
    config = Path(fastdpo.__file__).parent / "configs" / "accelerate" / "zero3.yaml"
    launched = launch(WORKER, tmp_path / "yaml", tmp_path / "model", 2, {"yaml": {"per_device_train_batch_size": 2}},
                      accelerate_config=config)["yaml"]  # fmt: skip
    assert launched["engine"] == "DeepSpeedEngine"
    assert_same_steps(launched["logs"], one)


# accelerate enables FSDP only on accelerators: TrainingArguments' FSDP2 options, as fsdp2.yaml sets them
FSDP2 = {"fsdp": "full_shard auto_wrap",
         "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                         "reshard_after_forward": True}}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp2_on_two_gpus_takes_the_steps_of_one_process(tmp_path):
    # the trainer's FSDP2 path through accelerate (on CPU, only the sharded step runs: tests/test_fsdp2.py)
    tiny_model(build_tiny_tokenizer(), tmp_path / "model")
    gpu = {"use_cpu": False, "bf16": False, "gradient_checkpointing": True}
    one = launch(WORKER, tmp_path / "one", tmp_path / "model", 1, {"one": {"per_device_train_batch_size": 4, **gpu}})
    two = launch(WORKER, tmp_path / "fsdp2", tmp_path / "model", 2,
                 {"fsdp2": {"per_device_train_batch_size": 2, **gpu, **FSDP2}})  # fmt: skip
    assert not two["fsdp2"]["zero3_partitioned"] and two["fsdp2"]["engine"] != "DeepSpeedEngine"
    assert_same_steps(two["fsdp2"]["logs"], one["one"]["logs"])
