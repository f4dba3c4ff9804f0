#!/usr/bin/env bash
# One command on a GPU machine: install what its image lacks from bench/wheels (built on any machine with
# `make gpu-wheels`), then run the `gpu` tests, the sm_90 compile report and the head-op benchmark, writing
# everything to bench/results/<device>/ (or to the folder given as the first argument).
#
#     bash bench/gpu.sh [OUT_DIR]
#
# Each step's log lands next to its results; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G "bench/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdpo-site \
        bench/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/fastdpo-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # the source tree imports as fastdpo without installing

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || {
    echo "gpu.sh: no CUDA device visible to $PY" >&2; exit 1; }
out=${1:-bench/results/$device}
mkdir -p "$out"

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(trl|liger-kernel|cut-cross-entropy|transformers|datasets) "
} > "$out/environment.txt" 2>&1

# Each step has its own time limit (a device call may allow 10 minutes in all); head_gpu writes its results after
# every shape, so a step cut short keeps what it measured. Extra arguments go to head_gpu (default: a short sweep;
# pass e.g. --tokens 2048 8192 32768 --hidden 2048 4096 --vocab 32000 128256 for the full grid).
status=0
timeout "${GPU_TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.txt" 2>&1 || status=1
tail -3 "$out/gpu_tests.txt"
timeout 120 "$PY" -m fastdpo.kernels.compile_report > "$out/kernel_report.md" 2>&1 || status=1
bench_args=("${@:2}")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--tokens 8192 32768 --hidden 4096 --vocab 128256 --repeats 5)
timeout "${GPU_BENCH_TIMEOUT:-300}" "$PY" -m bench.head_gpu --out "$out" "${bench_args[@]}" > "$out/head_gpu.log" 2>&1 \
    || status=1
cat "$out/head_gpu.md" 2>/dev/null
exit $status
