"""FSDP2 (``fully_shard``, gloo on CPU): the packed DPO step through the root's forward gives one process's
gradients (see tests/fsdp2_worker.py for why it shards by hand instead of through accelerate on CPU)."""

from __future__ import annotations

import json
import math

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


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_a_body_run_unpacked_keeps_the_ranks_in_step(tmp_path):
    # whether a rank's first forward was watched and run again depended on its batch: ranks whose rows held two
    # sequences ran the body twice, the others once, and the sharded layers' all-gathers hung
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0,
                             attention_dropout=0.0)).save_pretrained(tmp_path / "opt")  # fmt: skip
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(HERE / "fsdp2_unpacked_worker.py"), str(tmp_path), str(tmp_path / "opt")]  # fmt: skip
    run_processes(command, timeout=240)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["losses"]) == 2 and all(map(math.isfinite, result["losses"]))
