"""Several processes (DDP over gloo on CPU, launched with torchrun): the same steps as one process.

Two processes with 2 pairs each must take the optimizer steps one process takes with 4 pairs: the same pairs, the
same gradients (DDP's all-reduce armed by a forward through its wrapper), metrics gathered over both. With token
budget batches the processes hold different numbers of pairs; every pair must still weigh the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def launch(tmp_path: Path, name: str, model: Path, processes: int, **extra) -> dict:
    out = tmp_path / name
    out.mkdir()
    worker = [str(HERE / "distributed_worker.py"), str(out), str(model), json.dumps(extra)]
    command = [sys.executable, *worker] if processes == 1 else [
        TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *worker]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "logs.json").read_text())
    assert result["world_size"] == processes
    return result["logs"]


def assert_same_steps(ours: list[dict], expected: list[dict]) -> None:
    assert len(ours) == len(expected) == 2
    for got, want in zip(ours, expected, strict=True):
        assert got["num_tokens"] == want["num_tokens"]  # the same pairs, counted over both processes
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):  # fp32 sums in another order
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_two_processes_take_the_steps_of_one(tmp_path):
    model = tmp_path / "model"
    tiny_model(build_tiny_tokenizer(), model)
    one = launch(tmp_path, "one", model, 1, per_device_train_batch_size=4)
    two = launch(tmp_path, "two", model, 2, per_device_train_batch_size=2)
    assert_same_steps(two, one)
    # token budgets: rank r takes every 2nd batch, so a step of 2 processes = 2 accumulated batches of one
    budget = {"max_tokens_per_batch": 150}
    one = launch(tmp_path, "budget_one", model, 1, gradient_accumulation_steps=2, **budget)
    two = launch(tmp_path, "budget_two", model, 2, **budget)
    assert_same_steps(two, one)
