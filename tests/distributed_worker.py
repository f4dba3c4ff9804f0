"""A DPOTrainer run for tests/test_train_distributed.py: ``python distributed_worker.py OUT MODEL JSON_ARGS``.

Run alone, or under ``torchrun --nproc_per_node N`` (gloo on CPU). Rank 0 writes the logged steps to OUT/logs.json.
"""

import json
import pathlib
import sys

import datasets
import torch
from launch import finish
from test_train_dpo import common_args, synthetic_pairs
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaForCausalLM

from fastdpo.train import DPOConfig, DPOTrainer


def main() -> None:
    out, model_dir, extra = pathlib.Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()

    def load():
        return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    args = DPOConfig(**{**common_args(out, "run"), "disable_tqdm": True, "use_cpu": True, **extra})
    trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=synthetic_pairs(16),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    finish(trainer, out)


if __name__ == "__main__":
    main()
