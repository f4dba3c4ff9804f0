"""Several processes (DDP over gloo on CPU, launched with torchrun): the same steps as one process.

Two processes with 2 pairs each must take the optimizer steps one process takes with 4 pairs: the same pairs, the
same gradients (DDP's all-reduce armed by a forward through its wrapper), metrics gathered over both. With token
budget batches the processes hold different numbers of pairs; every pair must still weigh the same. A cached
reference is computed by the first process and read by the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import TORCHRUN, launch
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def run(tmp_path: Path, name: str, processes: int, **options) -> list[dict]:
    return launch(WORKER, tmp_path / name, tmp_path / "model", processes, **options)


def assert_same_steps(ours: list[dict], expected: list[dict]) -> None:
    assert len(ours) == len(expected) == 2
    for got, want in zip(ours, expected, strict=True):
        assert got["num_tokens"] == want["num_tokens"]  # the same pairs, counted over both processes
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):  # fp32 sums in another order
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_two_processes_take_the_steps_of_one(tmp_path):
    tiny_model(build_tiny_tokenizer(), tmp_path / "model")
    one = run(tmp_path, "one", 1, per_device_train_batch_size=4)
    two = run(tmp_path, "two", 2, per_device_train_batch_size=2)
    assert_same_steps(two, one)
    # token budgets: rank r takes every 2nd batch, so a step of 2 processes = 2 accumulated batches of one
    budget = {"max_tokens_per_batch": 150}
    one = run(tmp_path, "budget_one", 1, gradient_accumulation_steps=2, **budget)
    two = run(tmp_path, "budget_two", 2, **budget)
    assert_same_steps(two, one)
    # the cached reference: process 0 computes the file, process 1 waits and reads it
    one = run(tmp_path, "cached_one", 1, per_device_train_batch_size=4, precompute_ref_log_probs=True,
              ref_cache_dir=str(tmp_path / "cache_one"))  # fmt: skip
    two = run(tmp_path, "cached_two", 2, per_device_train_batch_size=2, precompute_ref_log_probs=True,
              ref_cache_dir=str(tmp_path / "cache_two"))  # fmt: skip
    assert_same_steps(two, one)
    assert len(list((tmp_path / "cache_two").glob("*.arrow"))) == 1  # one file, written once
