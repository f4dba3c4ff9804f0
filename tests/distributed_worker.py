"""DPOTrainer runs for tests/test_train_distributed.py: ``python distributed_worker.py OUT MODEL JSON_RUNS``.

Run alone, or under ``torchrun --nproc_per_node N`` (gloo on CPU). A run's ``stream: true`` streams the pairs
(``to_iterable_dataset``); ``pairs: N`` takes N pairs (16); ``trainer: dropin`` trains with
``fastdpo.trl.DPOTrainer``, ``trainer: trl`` with ``trl.DPOTrainer`` (TRL's config), ``trainer: orpo_dropin`` /
``orpo_trl`` with ``fastdpo.trl.ORPOTrainer`` / TRL's experimental ``ORPOTrainer``. Rank 0 writes each run's
logged steps to OUT/<run>/logs.json (``launch.serve``).
"""

import warnings

import datasets
import torch
from launch import serve
from test_train_dpo import common_args, synthetic_pairs
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaForCausalLM

from fastdpo.model import reference_cache
from fastdpo.train import DPOConfig, DPOTrainer


def train(out, model_dir: str, options: dict) -> DPOTrainer:
    datasets.disable_progress_bars()
    computed = []  # the rows whose reference log-probs this process computed (a cached reference: its share)
    compute = reference_cache.compute_reference_logps

    def counted(reference, rows, **kwargs):
        computed.append(len(rows))
        return compute(reference, rows, **kwargs)

    def load():
        return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    options = dict(options)
    data = synthetic_pairs(options.pop("pairs", 16))
    data = data.to_iterable_dataset() if options.pop("stream", False) else data
    config, trainer_class = DPOConfig, DPOTrainer
    kind = options.pop("trainer", "native")
    reference = {"ref_model": load()}
    if kind in ("orpo_dropin", "orpo_trl"):  # TRL's experimental ORPO trainer, or the drop-in: no reference
        import fastdpo.trl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        config, reference = ORPOConfig, {}
        trainer_class = fastdpo.trl.ORPOTrainer if kind == "orpo_dropin" else ORPOTrainer
    elif kind != "native":
        import trl

        import fastdpo.trl

        config, trainer_class = trl.DPOConfig, (fastdpo.trl.DPOTrainer if kind == "dropin" else trl.DPOTrainer)
    args = config(**{**common_args(out, "run"), "disable_tqdm": True, "use_cpu": True, **options})
    reference_cache.compute_reference_logps = counted
    try:
        trainer = trainer_class(load(), args=args, train_dataset=data, processing_class=build_tiny_tokenizer(),
                                **reference)  # fmt: skip
    finally:
        reference_cache.compute_reference_logps = compute
    trainer.reference_rows_computed = sum(computed)
    trainer.train()
    return trainer


if __name__ == "__main__":
    serve(train)
