"""Run a training worker script in 1 process, or in N under torchrun or accelerate launch (gloo on CPU).

The worker takes ``OUT MODEL JSON_OPTIONS`` and its rank 0 writes ``OUT/logs.json`` as ``{"world_size": N,
"logs": [...], "zero3_partitioned": bool, "engine": wrapper class}`` (``finish``). Each launch gets its own free
port: torchrun's ``--standalone`` and port 0 rendezvous were seen to hang on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish(trainer, out: Path) -> None:
    """The worker's last step: rank 0 writes ``OUT/logs.json``, then every process leaves the process group.

    A process that exits with gloo's threads still running aborts ("terminate called without an active
    exception"), and torchrun then kills the others, possibly before rank 0 wrote its logs: seen on a 2-core CI
    runner. So all ranks wait for rank 0's file and tear the group down before the interpreter exits.
    """
    import torch.distributed as dist

    if trainer.args.process_index == 0:
        logs = [log for log in trainer.state.log_history if "loss" in log]
        models = [trainer.model, *([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])]
        # under ZeRO-3, parameters over DeepSpeed's persistence threshold are partitioned: numel 0 outside a gather
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for m in models for p in m.parameters())
        result = {"world_size": trainer.args.world_size, "logs": logs, "zero3_partitioned": partitioned,
                  "engine": type(trainer.model_wrapped).__name__}  # fmt: skip
        (out / "logs.json").write_text(json.dumps(result))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(worker: Path, out: Path, model: Path, processes: int, accelerate_config: Path | None = None,
           **options) -> dict:  # fmt: skip
    """What ``worker`` run with ``options`` in ``processes`` processes wrote (``finish``): torchrun, or
    ``accelerate launch --config_file accelerate_config``."""
    out.mkdir()
    arguments = [str(worker), str(out), str(model), json.dumps(options)]
    port = str(free_port())
    if accelerate_config is not None:
        command = [ACCELERATE, "launch", "--config_file", str(accelerate_config), "--num_processes", str(processes),
                   "--mixed_precision", "no", "--main_process_port", port, *arguments]  # fmt: skip
    elif processes == 1:
        command = [sys.executable, *arguments]
    else:
        command = [TORCHRUN, "--nproc_per_node", str(processes), "--master_port", port, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "logs.json").read_text())
    assert result["world_size"] == processes
    return result
