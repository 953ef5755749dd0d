# unitsface_kernels developer targets. Everything runs in the project venv (.venv).
#
#   make venv    create .venv (if missing) with torch and the test/bench tools
#   make build   compile unitsface_kernels._C in place (pip install -e, no build isolation)
#   make test    build, then run the test suite (Triton in interpreter mode without a GPU)
#   make bench   run the benchmarks
#   make clean   remove build outputs

SHELL := bash
.SHELLFLAGS := -eo pipefail -c

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.14.1

# CUDA toolkit root. nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc doing
# `exec /usr/local/cuda-13.0/bin/nvcc "$@"`); torch would then guess CUDA_HOME=/usr/local and
# fail to link cudart. Follow the wrapper to the real nvcc. (setup.py does the same when
# CUDA_HOME is unset; this just makes the choice visible in the build log.)
NVCC_ON_PATH := $(shell command -v nvcc 2>/dev/null)
NVCC_REAL := $(shell f='$(NVCC_ON_PATH)'; \
	if [ -n "$$f" ] && grep -Iq . "$$f"; then \
	  g=$$(grep -oE '[^[:space:]"'"'"'=]+/bin/nvcc' "$$f" | head -n1); [ -x "$$g" ] && f="$$g"; \
	fi; [ -n "$$f" ] && readlink -f "$$f" || true)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC_REAL))
ifneq ($(strip $(CUDA_HOME)),)
export CUDA_HOME
endif
# 9.0 = H100/H200 (CI); override e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0".
TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCH_CUDA_ARCH_LIST
MAX_JOBS ?= 2
export MAX_JOBS

CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
BUILD_STAMP := build/.native-built
# The oldest Triton the kernels must compile with (the lent GPUs' image has 3.6), unpacked
# for tests/test_triton_compile.py only; the venv keeps the triton that torch wants.
OLD_TRITON := build/triton-3.6.0

.PHONY: venv build test bench clean

venv: $(PY)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION) pytest numpy ninja tqdm matplotlib psutil pytorch-metric-learning lightning

# Editable install: tests import the in-tree package, with _C compiled next to it.
# --no-build-isolation: compile against the venv's torch (same ABI as at import time).
# --no-deps: the venv already has them; do not touch the index.
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(PY) setup.py pyproject.toml $(CSRC)
	@mkdir -p build
	@echo "CUDA_HOME=$${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=$$TORCH_CUDA_ARCH_LIST MAX_JOBS=$$MAX_JOBS"
	$(PIP) install --no-build-isolation --no-deps -v -e . 2>&1 | tee build/build.log
	@touch $@

$(OLD_TRITON)/.installed: $(PY)
	$(PIP) install --no-deps --target $(OLD_TRITON) triton==3.6.0
	@touch $@

test: build $(OLD_TRITON)/.installed
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks

clean:
	rm -rf build dist *.egg-info unitsface_kernels/_C*.so unitsface_kernels/_C*.pyd
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
