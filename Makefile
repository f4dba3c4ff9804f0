# Two commands do all set-up on a fresh machine with Python 3.11: `make quickstart` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart demo test lint bench-cpu gpu-wheels kernel-report clean

# torch goes first and pinned, so that the other dependencies resolve no other torch. TORCH_INDEX: an index for that
# step, e.g. https://download.pytorch.org/whl/cpu (PyPI's Linux wheel is the CUDA build: several GB of nvidia-*).
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml setup.py csrc/packer.cpp
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e '.[dev]'
	touch $@

# SFT then DPO of a tiny model on the built-in task, and the before/after report (writes runs/quickstart/)
quickstart: $(VENV)/.installed
	$(BIN)/fastdpo quickstart --out runs/quickstart --overwrite

demo: $(VENV)/.installed
	$(BIN)/python -m fastdpo.demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects no tests; make treats that, like any non-zero exit, as a failure.
# Triton reads TRITON_INTERPRET when it decorates kernels, so the interpreter tests get their own process.
# --durations: the slowest tests in every log, to watch the suite's time.
# -n $(WORKERS): pytest-xdist workers (CI has 2 cores). Each one single-threaded (OMP_NUM_THREADS=1): two workers of
# two torch threads each on 2 cores made the suite 2x slower, not faster. --dist loadfile keeps a test file on one
# worker, so module-scoped fixtures (the quickstart's run, trained models) are built once.
WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not interpreter" -n $(WORKERS) --dist loadfile --durations=30
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -m interpreter -n $(WORKERS) --dist load --durations=5

bench-cpu: $(VENV)/.installed
	$(BIN)/python -m bench.head_cpu

# Compile every kernel for the H100 (sm_90) here, without a GPU, and report registers, spills and tensor-core use.
kernel-report: $(VENV)/.installed
	$(BIN)/python -m fastdpo.kernels.compile_report

# Wheels for the packages a GPU machine's image lacks (Python 3.12 there), carried to it for bench/gpu.sh (see README.md).
GPU_WHEELS := transformers==5.24.0 trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels: $(VENV)/.installed
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d bench/wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
