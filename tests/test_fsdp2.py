"""FSDP2 (``fully_shard``, gloo on CPU): the packed DPO step through the root's forward gives one process's
gradients (see tests/fsdp2_worker.py for why it shards by hand instead of through accelerate on CPU)."""

from __future__ import annotations

import json

import pytest
from launch import HERE, TORCHRUN, free_port, run_processes
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.slow


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_fully_sharded_step_has_the_gradients_of_one_process(tmp_path):
    tiny_model(build_tiny_tokenizer(), tmp_path / "model")
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(HERE / "fsdp2_worker.py"),
               str(tmp_path), str(tmp_path / "model")]  # fmt: skip
    run_processes(command)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded"]  # every parameter a DTensor shard
    assert len(result["errors"]) == 21  # every parameter of the 2-layer model (untied head) has a gradient
    for name, error in result["errors"].items():
        # fp32 sums over 2 processes in another order: relative to the gradient's own scale
        assert error <= 1e-5 * result["scales"][name] + 1e-9, (name, error, result["scales"][name])
