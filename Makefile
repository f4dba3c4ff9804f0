# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench-cpu clean

# torch goes first and pinned: a bare `torch` resolved by pip among the other dependencies pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m fastdpo.demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects no tests; make treats that, like any non-zero exit, as a failure.
# Triton reads TRITON_INTERPRET when it decorates kernels, so the interpreter tests get their own process.
test: lint
	$(BIN)/python -m pytest -m "not interpreter"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m interpreter

bench-cpu: $(VENV)/.installed
	$(BIN)/python -m bench.head_cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
