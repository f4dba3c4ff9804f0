"""The accelerate configs fastdpo ships (fastdpo/configs/accelerate): accelerate reads each as the setup it names.

zero3.yaml also trains through ``accelerate launch`` in tests/test_train_distributed.py; DDP and FSDP2 need GPUs
under accelerate (it enables FSDP only on accelerators), and their paths are tested on CPU with torchrun
(test_train_distributed.py) and ``fully_shard`` (test_fsdp2.py).
"""

from __future__ import annotations

from importlib.resources import files

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = files("fastdpo") / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("ddp", DistributedType.MULTI_GPU), ("fsdp2", DistributedType.FSDP), ("zero3", DistributedType.DEEPSPEED)],
)
def test_accelerate_reads_each_config(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind
    assert config.mixed_precision == "bf16" and config.num_processes == 8
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_activation_checkpointing"] is False  # DPOConfig checkpoints already
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"] is True
