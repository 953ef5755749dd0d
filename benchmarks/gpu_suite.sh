#!/usr/bin/env bash
# GPU suite: build the extension for this GPU, run the cuda-marked tests, run the GPU benchmark.
#
# Made for a bare GPU machine with no network and the image's own python3 (no .venv):
#
#     bash benchmarks/gpu_suite.sh          # from anywhere; writes into ${OUT:-benchmarks/results}
#
# Every step has a time limit (timeout) and the suite goes on after a failing step; the whole
# run takes about 5 minutes (SUITE_SECONDS, default 300; the benchmark gets what the steps
# before it leave, at least 60 s). It writes few, flat files into
# $OUT: build.log, tests.log, accuracy.log, sweep.log (tile sweep, the Triton cost model's
# predicted per-kernel times beside the measured ones, benchmarks.fusion, benchmarks.head_step,
# benchmarks.native_cost),
# bench.log and the benchmark's <device>-<date>.json/.md/.png, and prints a short summary.
#
# Knobs (environment): PYTHON (python3), OUT, SUITE_SECONDS (300), BUILD_SECONDS (90),
# TESTS_SECONDS (80), ACCURACY_SECONDS (30), SWEEP_SECONDS (45), COST_SECONDS (30),
# FUSION_SECONDS (20), HEAD_STEP_SECONDS (60), NATIVE_COST_SECONDS (30),
# TEST_WORKERS (8; 0 = serial), UNITSFACE_CXX (the C++ compiler; default /usr/bin/g++, see
# below), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16), BENCH_ARGS (extra arguments for
# `python -m benchmarks`).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
SUITE_SECONDS="${SUITE_SECONDS:-300}"
BUILD_SECONDS="${BUILD_SECONDS:-90}"
TESTS_SECONDS="${TESTS_SECONDS:-80}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Peers the GPU image lacks (cut-cross-entropy, liger-kernel: pure-Python wheels) travel as
# .whl/ in the repository root (benchmarks/README.md, "GPU suite"): installed beside the image's
# packages, not over them.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - T0 )); }

# run_step NAME LIMIT LOG CMD...: run CMD under `timeout`, append its output to LOG, record
# the outcome; never stops the suite.
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t rc dt what
  t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >>"$log"
  echo "== $name (limit ${limit}s) ..."
  timeout -k 20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t ))
  if [ $rc -eq 0 ]; then what=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMEOUT after ${limit}s"
  else what="FAILED (rc=$rc)"; fi
  echo "== $name: $what (${dt}s)" >>"$log"
  echo "== $name: $what (${dt}s)"
  SUMMARY+=("$name: $what (${dt}s)")
  return $rc
}

# The same C++ compiler for the build and for whatever compiles later (torch.compile, Triton).
# The image presets CXX=/opt/gcc/bin/g++, whose extension crashes on the first C++ exception
# (seen on 2026-11-28: every bad-input test of the op killed its pytest worker): use the
# system compiler unless UNITSFACE_CXX names another.
if [ -n "${UNITSFACE_CXX:-}" ]; then export CXX=$UNITSFACE_CXX
elif [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi

# ---------------------------------------------------------------------------- 0. environment
{
  echo "# gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
  nvidia-smi -L 2>&1 || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
  echo "CXX=${CXX:-<unset>}"
  command -v nvcc && nvcc --version | tail -n 2
} >"$OUT/build.log" 2>&1
head -n 5 "$OUT/build.log"

# ---------------------------------------------------------------------------- 1. build
rm -f unitsface_kernels/_C*.so
run_step build "$BUILD_SECONDS" "$OUT/build.log" \
  env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py -q build_ext --inplace

# A broken extension must not take the tests and the benchmark down with it: import it in a
# separate process first, and set it aside if that fails (the triton backend still runs).
if ls unitsface_kernels/_C*.so >/dev/null 2>&1; then
  if timeout 60 "$PY" -c 'from unitsface_kernels import native; ext = native.require(); import torch; print("native extension loads; ops:", sorted(n for n in ("unitsface_fwd_native", "uss_fwd_native", "bank_update_") if native.has_op(n)))' >>"$OUT/build.log" 2>&1; then
    SUMMARY+=("extension: $(tail -n 1 "$OUT/build.log")")
  else
    mkdir -p /tmp/unitsface_broken_ext && mv unitsface_kernels/_C*.so /tmp/unitsface_broken_ext/
    echo "!! the built extension does not import; moved to /tmp/unitsface_broken_ext (native backend off)" | tee -a "$OUT/build.log"
    SUMMARY+=("extension: BUILT BUT DOES NOT IMPORT (set aside; native off)")
  fi
else
  SUMMARY+=("extension: not built (native backend off)")
fi

# ---------------------------------------------------------------------------- 2. cuda tests
# Per-test timeout (pytest-timeout) and parallel workers (pytest-xdist: Triton's JIT compiles
# dominate the first run) when the image has them; TEST_WORKERS=0 runs serially.
PYTEST_ARGS=()
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then PYTEST_ARGS+=(--timeout=90); fi
TEST_WORKERS="${TEST_WORKERS:-8}"
if [ "$TEST_WORKERS" != 0 ] && "$PY" -c 'import xdist' >/dev/null 2>&1; then
  PYTEST_ARGS+=(-n "$TEST_WORKERS")
fi
: >"$OUT/tests.log"
run_step tests "$TESTS_SECONDS" "$OUT/tests.log" \
  "$PY" -m pytest -v -rfE -m cuda -p no:cacheprovider ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} tests
TESTS_LINE=$(grep -E "(passed|failed|error|no tests ran|skipped)" "$OUT/tests.log" | tail -n 1)
[ -n "$TESTS_LINE" ] && SUMMARY+=("pytest: $TESTS_LINE")

# ---------------------------------------------------------------------------- 3. accuracy
: >"$OUT/accuracy.log"
run_step accuracy "${ACCURACY_SECONDS:-30}" "$OUT/accuracy.log" "$PY" -m benchmarks.accuracy
cat "$OUT/accuracy.log"

# ---------------------------------------------------------------------------- 4. tile sweep
: >"$OUT/sweep.log"
run_step sweep "${SWEEP_SECONDS:-45}" "$OUT/sweep.log" "$PY" -m benchmarks.tile_sweep
# the Triton kernels' cost model: per-kernel predictions beside the measured times (same log)
run_step cost_model "${COST_SECONDS:-30}" "$OUT/sweep.log" "$PY" -m benchmarks.cost_model --measure
cat "$OUT/sweep.log"
# the one-pass objective against its two losses called separately (same log: ≤ 8 files)
run_step fusion "${FUSION_SECONDS:-20}" "$OUT/sweep.log" "$PY" -m benchmarks.fusion --repeats 10
tail -n 4 "$OUT/sweep.log"
# the head's whole training step at 1M classes (rate 0.1) against 100k (rate 1.0), sparse
# gradients + SparseSGD, and the dense-gradient baseline (issue 17; printed into sweep.log)
run_step head_step "${HEAD_STEP_SECONDS:-60}" "$OUT/sweep.log" \
  "$PY" -m benchmarks.head_step --device cuda --steps 5
tail -n 12 "$OUT/sweep.log"
# the native CUDA sweep at the headline: its cost model (launches, FLOPs, bytes, predicted time
# per kernel) beside the measured step and its kernels by group (needs the extension)
if ls unitsface_kernels/_C*.so >/dev/null 2>&1; then
  run_step native_cost "${NATIVE_COST_SECONDS:-30}" "$OUT/sweep.log" \
    "$PY" -m benchmarks.native_cost --measure
  tail -n 30 "$OUT/sweep.log"
fi

# ---------------------------------------------------------------------------- 5. benchmark
LEFT=$(( SUITE_SECONDS - $(elapsed) ))
[ $LEFT -lt 60 ] && LEFT=60
BUDGET=$(( LEFT - 30 ))
: >"$OUT/bench.log"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
run_step bench "$LEFT" "$OUT/bench.log" \
  "$PY" -m benchmarks --out "$OUT" --budget "$BUDGET" ${BENCH_ARGS:-}

# ---------------------------------------------------------------------------- summary
echo
echo "================ gpu_suite summary ($(elapsed)s) ================"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "---------------- benchmark (tail of bench.log) ----------------"
# the results table and the headline summary, without the progress bars
tr '\r' '\n' <"$OUT/bench.log" | grep -v -E '[0-9]+/[0-9]+ \[' | tail -n 45
echo "---------------- files in $OUT ----------------"
ls -la "$OUT"
exit 0
