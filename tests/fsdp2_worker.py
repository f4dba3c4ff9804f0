"""FSDP2 on CPU (gloo): ``torchrun --nproc_per_node 2 fsdp2_worker.py OUT MODEL``, for tests/test_fsdp2.py.

accelerate enables FSDP only on accelerators (on CPU its ``fsdp`` options silently leave plain DDP), so this worker
shards the model itself with ``fully_shard`` as accelerate's FSDP2 plugin does (every decoder layer, then the root)
and runs what ``DPOTrainer.compute_loss`` runs: the packed step through the root's forward (``forward_as``). Each
process takes its half of the pairs; its mean loss is weighted by its share of the pairs times the world size
(FSDP2 averages gradients over processes), so the gathered gradients must be those of one process on all pairs.
Rank 0 writes OUT/result.json with both.
"""

from __future__ import annotations

import json
import pathlib
import random
import sys

import torch
import torch.distributed as dist
from launch import end_processes
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

from fastdpo.data import pack_pairs
from fastdpo.model.hooks import forward_as
from fastdpo.ops import LossConfig
from fastdpo.train.step import preference_step


def pairs(vocab: int, count: int) -> list[dict]:
    rng = random.Random(0)

    def ids(low, high):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))]

    return [{"prompt_ids": ids(2, 9), "chosen_ids": ids(1, 11), "rejected_ids": ids(3, 7)} for _ in range(count)]


def gradients(model: torch.nn.Module, examples: list[dict], scale: float, ref_logps: torch.Tensor) -> None:
    batch = pack_pairs(examples, pack_length=None, split_pairs=True)
    config = LossConfig(loss_type=["sigmoid"], beta=0.1)

    def packed_forward(*args, **kwargs):
        return preference_step(model, batch, config, ref_logps=ref_logps[batch.pair_ids]).loss

    with forward_as(model, packed_forward):
        loss = model()  # through the root's hooks: they gather the root's parameters (the LM head among them)
    (loss * scale).backward()


def main() -> None:
    out, model_dir = pathlib.Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.train()
    examples = pairs(model.config.vocab_size, 7)  # 4 pairs on rank 0, 3 on rank 1
    ref_logps = -20.0 - torch.rand(len(examples), 2, generator=torch.Generator().manual_seed(1))
    if rank == 0:  # the expected gradients: one process, every pair
        plain = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        plain.train()
        gradients(plain, examples, 1.0, ref_logps)
        expected = {name: p.grad for name, p in plain.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mine = examples[rank::world]
    gradients(model, mine, len(mine) * world / len(examples), ref_logps[rank::world])
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # a collective: every rank
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        errors = {name: float((grads[name] - expected[name]).abs().max()) for name in expected}
        scales = {name: float(expected[name].abs().max()) for name in expected}
        result = {"world_size": world, "sharded": sharded, "errors": errors, "scales": scales}
        (out / "result.json").write_text(json.dumps(result))
    end_processes()  # a barrier, then exit without tearing gloo down (tests/launch.py says why)


if __name__ == "__main__":
    main()
