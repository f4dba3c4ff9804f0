"""Run a training worker script in 1 process, or in N under torchrun or accelerate launch (gloo on CPU).

The worker takes ``OUT MODEL JSON_RUNS``: named runs, each a dict of trainer options, which every process trains in
turn (``serve``): one launch pays the processes' start (~10 s of imports each) once for all its runs. After each,
rank 0 writes ``OUT/<name>/logs.json`` as ``{"world_size": N, "logs": [...], "zero3_partitioned": bool, "engine":
wrapper class}``. Each launch gets its own free port: torchrun's ``--standalone`` and port 0 rendezvous were seen to
hang on this machine.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
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


def serve(train) -> None:
    """The worker's main: ``train(out, model, options)`` trains one run and returns its trainer; each run of argv's
    ``OUT MODEL JSON_RUNS`` trains in turn (the trainers of one process share accelerate's state, as transformers'
    do), rank 0 writes its logs, and under several processes all then leave together (``end_processes``). Every
    trainer stays referenced until then: none of their DDP reducers is freed while gloo runs."""
    import torch.distributed as dist

    out, model, runs = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or any("deepspeed" in o for o in runs.values()):
        skip_deepspeed_shm_build()
    trainers = []
    for name, options in runs.items():
        trainers.append(train(out / name, model, options))
        if trainers[-1].args.process_index == 0:
            write_logs(trainers[-1], out / name)
    if dist.is_available() and dist.is_initialized():
        end_processes()


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op with g++ when it starts (~30 s alone, ~2 min
    beside the suite's other worker on 2 cores, and every time on a fresh machine) that only its
    ``inference_all_reduce`` calls: training reduces through torch.distributed either way. Built as None, as
    DeepSpeed builds it where the op is not compatible."""
    # (the package's name ``deepspeed.comm.torch`` is torch itself, re-exported by ``deepspeed.comm``)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def write_logs(trainer, out: Path) -> None:
    """``out/logs.json``: the trainer's logged steps, its world size, whether ZeRO-3 partitioned its models, the
    class that wrapped the policy, and the rows whose reference log-probs it computed (where the worker counts them)."""
    logs = [log for log in trainer.state.log_history if "loss" in log]
    models = [trainer.model, *([trainer.ref_model] if getattr(trainer, "ref_model", None) is not None else [])]
    # under ZeRO-3, parameters over DeepSpeed's persistence threshold are partitioned: numel 0 outside a gather
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for m in models for p in m.parameters())
    result = {"world_size": trainer.args.world_size, "logs": logs, "zero3_partitioned": partitioned,
              "engine": type(trainer.model_wrapped).__name__,
              "reference_rows_computed": getattr(trainer, "reference_rows_computed", None)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs.json").write_text(json.dumps(result))


def end_processes() -> None:
    """Wait for every process, then exit without tearing gloo down.

    Two ways to leave gloo that were seen to fail on a 2-core runner: exiting with its threads alive aborts the
    process ("terminate called without an active exception", and torchrun then kills the others, possibly before
    rank 0 wrote its logs); and destroying the process group while DDP's reducer still holds it hangs when the
    trainer is freed (the reducer's last reference joins gloo's thread while holding the GIL that thread waits
    for). So after a barrier every process ends with ``os._exit(0)``: the results are on disk, nothing is left to
    tear down.
    """
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(command: list[str], timeout: float = 300) -> str:
    """Run a launcher command; its stderr. On failure, fail with its stderr's end. On a timeout the launcher's whole
    process group is killed: killing only the launcher would leave its workers running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise AssertionError(f"{command[0]} ran over {timeout} s and was killed: {stderr[-3000:]}") from None
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def launch(worker: Path, out: Path, model: Path, processes: int, runs: dict[str, dict],
           accelerate_config: Path | None = None) -> dict[str, dict]:  # fmt: skip
    """What ``worker`` wrote for each of ``runs`` (name: options), all trained by one launch of ``processes``
    processes (``serve``): torchrun, or ``accelerate launch --config_file accelerate_config``; their stderr is kept
    in ``out/stderr.txt``."""
    out.mkdir()
    arguments = [str(worker), str(out), str(model), json.dumps(runs)]
    port = str(free_port())
    if accelerate_config is not None:
        command = [ACCELERATE, "launch", "--config_file", str(accelerate_config), "--num_processes", str(processes),
                   "--mixed_precision", "no", "--main_process_port", port, *arguments]  # fmt: skip
    elif processes == 1:
        command = [sys.executable, *arguments]
    else:
        command = [TORCHRUN, "--nproc_per_node", str(processes), "--master_port", port, *arguments]
    (out / "stderr.txt").write_text(run_processes(command))
    results = {name: json.loads((out / name / "logs.json").read_text()) for name in runs}
    assert all(result["world_size"] == processes for result in results.values())
    return results
