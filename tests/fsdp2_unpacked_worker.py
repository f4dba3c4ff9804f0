"""Worker of test_fsdp2.py's unpacked-body test (torchrun, 2 processes, gloo): OPT (whose masks ignore position_ids,
so fastdpo runs its segments unpacked) fully sharded, with a batch whose rows hold two sequences on rank 0 only.
Every rank must run the body as often as the others, or the layers' all-gathers stop matching and the run hangs."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from launch import end_processes
from torch.distributed.fsdp import fully_shard
from transformers import OPTForCausalLM

from fastdpo.data import pack_pairs
from fastdpo.model.hooks import forward_as
from fastdpo.ops import LossConfig
from fastdpo.train.step import preference_step


def main(out: Path, model_dir: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    model = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    for layer in model.model.decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    generator = torch.Generator().manual_seed(rank)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=generator).tolist()

    if rank == 0:  # two short sequences share a row as long as the longest one
        examples = [{"prompt_ids": ids(2), "chosen_ids": ids(3), "rejected_ids": ids(20)},
                    {"prompt_ids": ids(2), "chosen_ids": ids(3), "rejected_ids": ids(4)}]  # fmt: skip
    else:  # one sequence per row
        examples = [{"prompt_ids": ids(5), "chosen_ids": ids(10), "rejected_ids": ids(12)}]
    batch = pack_pairs(examples, pack_length=None, split_pairs=True)
    config = LossConfig(loss_type=["sigmoid"], beta=0.1)
    reference = -20.0 - torch.rand(len(examples), 2, generator=generator)
    losses = []
    for _ in range(2):
        with forward_as(model, lambda *a, **k: preference_step(model, batch, config, ref_logps=reference).loss):
            loss = model()
        loss.backward()
        losses.append(float(loss))
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "rows": batch.input_ids.shape[0]}))
    end_processes()  # a barrier, then exit without tearing gloo down (tests/launch.py says why)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
