# unitsface_kernels developer targets. Everything runs in the project venv (.venv), except
# the smoke tests of the installed wheel, which make fresh ones (tests_installed/smoke.sh).
#
#   make venv          create .venv (if missing) with torch and the test/bench tools
#   make build         compile unitsface_kernels._C in place (pip install -e, no build isolation)
#   make wheel         build the wheel into build/dist from make build's objects (only links)
#   make smoke         install that wheel into a fresh venv and run tests_installed/ there
#   make smoke-oldest  the same against the oldest supported torch (CPU-only extension)
#   make test          all of the above, then the test suite (Triton interpreted without a GPU)
#   make bench         run the benchmarks
#   make clean         remove build outputs

SHELL := bash
.SHELLFLAGS := -eo pipefail -c

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch runs the first `ninja` on PATH. Builds use the venv's (pip's ninja package) whether or
# not the venv is activated: a ninja of another version discards the build log of the kept
# objects ("build log version is too old; starting over") and everything recompiles.
WITH_VENV_PATH := PATH="$(abspath $(VENV))/bin:$$PATH"
TORCH_VERSION ?= 2.14.1
# The oldest torch that pyproject.toml declares (the GPU machines' image runs it): make test
# builds and smoke-tests the wheel against it too, so the declared range is a tested one.
OLDEST_TORCH ?= 2.11.0
OLDEST_TORCH_PINS ?= "numpy<2.4"

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
# pytest-xdist workers for make test: most tests are single-threaded (Triton's interpreter is
# numpy), so one per core halves the suite's time on the 2-core CI machine. worksteal: an idle
# worker takes queued tests from the other (the slow compile checks otherwise end the run alone).
TEST_WORKERS ?= 2

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
BUILD_STAMP := build/.native-built
# The oldest Triton the kernels must compile with (the lent GPUs' image has 3.6), unpacked
# for tests/test_triton_compile.py only; the venv keeps the triton that torch wants.
OLD_TRITON := build/triton-3.6.0

.PHONY: venv build wheel smoke smoke-oldest test bench clean
# The wheel builds share build/lib.* (setuptools' staging dir), so they must not run at once;
# ninja already compiles in parallel (MAX_JOBS), make-level parallelism gains nothing here.
.NOTPARALLEL:

venv: $(PY)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION) pytest pytest-xdist numpy ninja tqdm matplotlib psutil pytorch-metric-learning lightning

# Editable install: tests import the in-tree package, with _C compiled next to it.
# --no-build-isolation: compile against the venv's torch (same ABI as at import time).
# --no-deps: the venv already has them; do not touch the index.
# The object files stay in build/obj-<python>-<torch>-<cuda|cpu> (setup.py), not in pip's
# temporary dir: ninja recompiles only what changed in csrc/ (headers included) and the
# wheel below reuses them.
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(PY) setup.py pyproject.toml $(CSRC)
	@mkdir -p build
	@echo "CUDA_HOME=$${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=$$TORCH_CUDA_ARCH_LIST MAX_JOBS=$$MAX_JOBS"
	$(WITH_VENV_PATH) $(PIP) install --no-build-isolation --no-deps -v -e . 2>&1 | tee build/build.log
	@touch $@

$(OLD_TRITON)/.installed: $(PY)
	$(PIP) install --no-deps --target $(OLD_TRITON) triton==3.6.0
	@touch $@

# The wheel that users get, from the objects that make build compiled: ninja finds them up
# to date, so this only links and zips (seconds, where compiling again takes minutes). Always
# rebuilt, because the Python files may have changed. build/lib.* is setuptools' staging
# dir: a module renamed or deleted in the tree would otherwise stay there and be packed.
wheel: $(BUILD_STAMP)
	rm -rf build/dist build/lib.* build/bdist.*
	$(WITH_VENV_PATH) $(PIP) wheel -v --no-build-isolation --no-deps -w build/dist . \
	  > build/wheel.log 2>&1 \
	  || { tail -n 40 build/wheel.log; exit 1; }
	@ls build/dist/unitsface_kernels-*.whl

# The installed wheel, in a fresh venv outside the repo with the torch it was built against,
# tested from a directory without the sources (tests_installed/smoke.sh says how).
smoke: wheel
	tests_installed/smoke.sh $(TORCH_VERSION) build/dist/unitsface_kernels-*.whl

# The oldest declared torch: a fresh venv with it, the wheel built there against it (a
# compiled extension only loads into the torch it was built against; CPU-only, which skips
# nvcc), then the same tests. numpy < 2.4: the interpreter of torch 2.11's triton (3.6) calls
# int() on one-element arrays, which numpy 2.4 refuses.
smoke-oldest:
	tests_installed/smoke.sh $(OLDEST_TORCH) --build-cpu build/dist-torch$(OLDEST_TORCH) $(OLDEST_TORCH_PINS)

# Packaging first (it fails fast), then the full suite on the in-tree package.
# UNITSFACE_REQUIRE_NATIVE=1: the extension was just built, so a native backend that does not
# load is a failure of the run, not a skip (tests/helpers.py).
test: build $(OLD_TRITON)/.installed smoke smoke-oldest
	UNITSFACE_REQUIRE_NATIVE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

bench: build
	$(PY) -m benchmarks

clean:
	rm -rf build dist *.egg-info unitsface_kernels/_C*.so unitsface_kernels/_C*.pyd
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
