#!/usr/bin/env bash
# One command on a GPU machine: install what its image lacks from bench/wheels (built on any machine with
# `make gpu-wheels`), then run the `gpu` tests, the lean layers' benchmark (bench/layers_gpu.py), the head-op benchmark
# and the end-to-end DPO benchmark (and, with
# GPU_DPO_LARGE_ARGS set, a second end-to-end run into <OUT_DIR>/large; with GPU_DPO_PROFILE_ARGS set, a profile of
# the DPO step per engine), writing
# everything to bench/results/<device>/ (or to the folder given as the first argument).
#
#     bash bench/gpu.sh [OUT_DIR] [PACK.tar.gz]
#
# Each step has its own time limit and its log lands next to its results; a failing step is recorded and the next
# one still runs. With PACK given, the results folder is packed into that one file after every step (a device
# call that returns a few files keeps whatever was measured before it was cut off).
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
pack=${2:-}
mkdir -p "$out"

packup() { [ -n "$pack" ] && tar czf "$pack" -C "$(dirname "$out")" "$(basename "$out")"; return 0; }

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -m pip list --path /tmp/fastdpo-site 2>/dev/null | tail -n +3
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(transformers|accelerate|peft|pyarrow|fsspec|tokenizers|huggingface.hub) "
    "$PY" -c "import datasets, trl, liger_kernel, cut_cross_entropy; print('imports ok: datasets', datasets.__version__, 'trl', trl.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
packup

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, pack the results
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "step $name: exit $rc after $((SECONDS - start)) s (limit $limit)" | tee -a "$out/steps.txt"
    [ $rc -eq 0 ] || status=1
    packup
}

# 1. correctness at real shapes (the files holding `gpu` tests; collecting the others needs CPU-only peers)
step gpu_tests "${GPU_TEST_TIMEOUT:-150}" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/test_kernels_gpu.py tests/test_offload.py tests/test_model_packed.py tests/test_attention.py \
    tests/test_lean.py
tail -15 "$out/gpu_tests.log"
# 1b. the lean layers' kernels against transformers' own norm, MLP and RoPE (seconds)
step layers_gpu "${GPU_LAYERS_TIMEOUT:-60}" "$PY" -m bench.layers_gpu --out "$out" ${GPU_LAYERS_ARGS:-}
cat "$out/layers_gpu.md" 2>/dev/null
# 2. the head op against its peers (results written after every shape)
step head_gpu "${GPU_HEAD_TIMEOUT:-150}" "$PY" -m bench.head_gpu --out "$out" \
    ${GPU_HEAD_ARGS:---tokens 2048 8192 32768 --hidden 2048 4096 --vocab 32000 128256 --repeats 5}
cat "$out/head_gpu.md" 2>/dev/null
# 3. end to end (results written after every engine)
step dpo_gpu "${GPU_DPO_TIMEOUT:-330}" "$PY" -m bench.dpo_gpu --out "$out" \
    ${GPU_DPO_ARGS:---pairs 128 --steps 10 --timeout 90}
cat "$out/dpo_gpu.md" 2>/dev/null
# 4. optional: end to end at a second setting (e.g. a larger batch, where the logits outweigh the optimizer states)
if [ -n "${GPU_DPO_LARGE_ARGS:-}" ]; then
    step dpo_gpu_large "${GPU_DPO_LARGE_TIMEOUT:-150}" "$PY" -m bench.dpo_gpu --out "$out/large" $GPU_DPO_LARGE_ARGS
    cat "$out/large/dpo_gpu.md" 2>/dev/null
fi
# 5. optional: where a DPO step's time goes (torch.profiler over two steps per engine; see bench/dpo_gpu.py)
if [ -n "${GPU_DPO_PROFILE_ARGS:-}" ]; then
    step dpo_gpu_profile "${GPU_DPO_PROFILE_TIMEOUT:-150}" "$PY" -m bench.dpo_gpu --profile --out "$out" \
        $GPU_DPO_PROFILE_ARGS
    head -12 "$out/dpo_gpu_profile.md" 2>/dev/null
fi
exit $status
