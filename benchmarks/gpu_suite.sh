#!/usr/bin/env bash
# GPU suite: the headline first, then the cost models' measured inputs, then the rest as time
# allows — one call, at most SUITE_SECONDS (480 = 8 minutes) from a bare GPU machine.
#
#     bash benchmarks/gpu_suite.sh          # from anywhere; writes into ${OUT:-benchmarks/results}
#     DRY_RUN=1 OUT=/tmp/plan bash benchmarks/gpu_suite.sh   # the plan, every command parsed
#
# Steps, in this order, each under its own `timeout` (the suite goes on after a failure):
#   env        device, date, python/torch/triton/CUDA versions, the compilers
#   wheels     peers that travel as .whl/ (cut-cross-entropy, Liger-Kernel), into /tmp/site
#   build      the extension, CC and CXX the system compiler (torch passes `-ccbin $CC` to nvcc)
#   extension  import it in a separate process; set it aside if that fails (native off)
#   headline   THE HEADLINE TABLE: bf16, B=512, D=512, C=100k, the objective and the softmax
#              part, every implementation in this one process on this card: ours first, then
#              the peers, then eager and torch.compile, each with a time budget (--impl-budget)
#   ceilings   the cost models' inputs measured here (mm rate per product, HBM, L2, launches)
#   cost_triton, cost_native   per-kernel measured times beside both models' predictions
#   tests      pytest -m cuda
#   accuracy   worst loss error / gradient cosine vs the float64 reference, every variant
#   capture_triton, capture_native   a head step captured in a CUDA graph: replayed vs eager
#              (equal?), both step times, the launches of an eager step (extras.log)
#   cost_persistent, cost_resident   cost_triton's table for the cosine tiles from persistent
#              programs (UNITSFACE_TRITON_PERSISTENT=1), and from x-resident ones (=resident)
#   cost_saved_exps   the same with x-resident tiles and the stored exponentials
#              (saved_exp_bytes: the backward without the W cosines' products)
#   curve      the benchmark's other class counts (10k; 1M at rate 0.1, dense and sparse_grad)
#   sweep, fusion, head_step   tuning aids, as time allows
# Each step's limit is its own (the *_S knobs below), cut to what is left of SUITE_SECONDS;
# a step with under 10 s left is skipped. The plan (DRY_RUN=1) shows the limits each step gets
# if every step before it ran to its limit.
#
# Files (flat, at most 8) in $OUT: suite.log (environment, build, headline output, the step
# records and the summary), bench.json / bench.md / bench.png (the benchmark: headline and
# curve), inputs.json (the measured inputs), cost.log (ceilings and both cost models), tests.log
# (cuda tests, accuracy), extras.log (curve output, sweep, fusion, head_step).
#
# Knobs (environment): PYTHON (python3), OUT, SUITE_SECONDS (480), DRY_RUN, TEST_WORKERS (8),
# TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16), SYSTEM_CC / SYSTEM_CXX (/usr/bin/gcc, /usr/bin/g++),
# HEADLINE_IMPL_S (15: seconds per implementation), BENCH_ARGS (extra arguments for the
# headline's `python -m benchmarks`).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-}"
SUITE_SECONDS="${SUITE_SECONDS:-480}"
GRACE=5         # timeout -k: a step that ignores SIGTERM is killed this much later
RESERVE=15      # for the summary (its python prints the benchmark table)
MIN_STEP=10
FILES=(suite.log bench.json bench.md bench.png inputs.json cost.log tests.log extras.log)
LOG="$OUT/suite.log"
PLAN=$(mktemp "${TMPDIR:-/tmp}/gpu_suite_plan.XXXXXX")   # DRY_RUN: the steps, for dryrun.py
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for f in "${FILES[@]}"; do rm -f "$OUT/$f"; done
: >"$LOG"
T0=$(date +%s)
SPENT=0         # seconds used: the clock, or under DRY_RUN the limits of the steps so far
SUMMARY=()

spent() { if [ -n "$DRY_RUN" ]; then echo "$SPENT"; else echo $(( $(date +%s) - T0 )); fi; }

# run_step NAME LIMIT LOG CMD...: run CMD under `timeout` (LIMIT, cut to what is left of
# SUITE_SECONDS), append its output to LOG, record the outcome; never stops the suite. Under
# DRY_RUN the step goes into the plan instead (benchmarks/dryrun.py parses it afterwards).
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left t rc dt what
  left=$(( SUITE_SECONDS - $(spent) - RESERVE - GRACE ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_STEP" ]; then
    echo "== $name: skipped, no time left" | tee -a "$log"
    SUMMARY+=("$name: skipped (no time left)")
    # the plan still carries it, so that the dry run parses its command too
    [ -n "$DRY_RUN" ] && printf '%s\t0\t%s\t%s\n' "$name" "$(basename "$log")" "$(printf '%q ' "$@")" >>"$PLAN"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" >>"$log"
  echo "== $name (limit ${limit}s) -> $(basename "$log")"
  if [ -n "$DRY_RUN" ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$(basename "$log")" "$(printf '%q ' "$@")" >>"$PLAN"
    SPENT=$(( SPENT + limit + GRACE ))
    SUMMARY+=("$name: planned, limit ${limit}s")
    return 0
  fi
  t=$(date +%s)
  timeout -k "$GRACE" "$limit" "$@" >>"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t ))
  if [ $rc -eq 0 ]; then what=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMEOUT after ${limit}s"
  else what="FAILED (rc=$rc)"; fi
  echo "== $name: $what (${dt}s)" | tee -a "$log"
  SUMMARY+=("$name: $what (${dt}s)")
  return $rc
}

have_ext() { [ -z "$DRY_RUN" ] && ls unitsface_kernels/_C*.so >/dev/null 2>&1; }

[ -n "$DRY_RUN" ] && : >"$PLAN"

# The image presets CC and CXX to /opt/gcc, whose build of the extension crashes on the first
# C++ exception (2026-11-28); torch passes `-ccbin $CC` to nvcc, so both are overridden, for
# the build and for whatever compiles later (torch.compile, Triton).
export CC="${SYSTEM_CC:-/usr/bin/gcc}" CXX="${SYSTEM_CXX:-/usr/bin/g++}"

# ---------------------------------------------------------------------------- env
ENV_SCRIPT='echo "# gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"
nvidia-smi -L 2>&1 || true
"$0" -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| triton\", triton.__version__, \"| cuda\", torch.version.cuda, \"| gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))"
echo "CC=${CC:-<unset>} CXX=${CXX:-<unset>}"
command -v nvcc && nvcc --version | tail -n 2'
bash -n -c "$ENV_SCRIPT" || echo "!! env script: syntax error" | tee -a "$LOG"
run_step env 20 "$LOG" bash -c "$ENV_SCRIPT" "$PY"
[ -z "$DRY_RUN" ] && sed -n '2,4p' "$LOG"

# ---------------------------------------------------------------------------- wheels
# Peers the GPU image lacks (pure-Python wheels; torch and triton are there) travel as .whl/
# in the repository root (benchmarks/README.md): installed beside the image's packages.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  run_step wheels 20 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# ---------------------------------------------------------------------------- build
have_ext && rm -f unitsface_kernels/_C*.so
run_step build 90 "$LOG" env CC="$CC" CXX="$CXX" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py -q build_ext --inplace
if have_ext || [ -n "$DRY_RUN" ]; then
  # a broken extension must not take the rest down: set it aside if it does not import
  if ! run_step extension 20 "$LOG" "$PY" -c 'from unitsface_kernels import native; native.require(); print("native extension loads; families:", [f for f in ("unitsface", "uss") if native.has_family(f)])'; then
    mkdir -p /tmp/unitsface_broken_ext && mv unitsface_kernels/_C*.so /tmp/unitsface_broken_ext/
    echo "!! the extension does not import; moved to /tmp/unitsface_broken_ext (native off)" | tee -a "$LOG"
  fi
fi

# ---------------------------------------------------------------------------- headline
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
run_step headline 140 "$LOG" "$PY" -m benchmarks --out "$OUT" --stem bench --classes 100k \
  --no-check --repeats 20 --impl-budget "${HEADLINE_IMPL_S:-15}" --budget 120 ${BENCH_ARGS:-}

# ---------------------------------------------------------------------------- cost models
run_step ceilings 30 "$OUT/cost.log" "$PY" -m benchmarks.ceilings --json "$OUT/inputs.json"
INPUTS=()
{ [ -n "$DRY_RUN" ] || [ -s "$OUT/inputs.json" ]; } && INPUTS=(--inputs "$OUT/inputs.json")
# the objective's kernels, then fused_uss_loss's (a memory bank: the same kernels' bank programs)
run_step cost_triton 60 "$OUT/cost.log" "$PY" -m benchmarks.cost_model ${INPUTS[@]+"${INPUTS[@]}"} --measure \
  --op fused_unitsface_loss fused_uss_loss
if have_ext || [ -n "$DRY_RUN" ]; then
  run_step cost_native 25 "$OUT/cost.log" "$PY" -m benchmarks.native_cost ${INPUTS[@]+"${INPUTS[@]}"} --measure
fi

# ---------------------------------------------------------------------------- cuda tests
# parallel workers (pytest-xdist) and a per-test timeout (pytest-timeout) where the image has them
PYTEST_ARGS=()
if [ -z "$DRY_RUN" ]; then
  "$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && PYTEST_ARGS+=(--timeout=60)
  [ "${TEST_WORKERS:-8}" != 0 ] && "$PY" -c 'import xdist' >/dev/null 2>&1 \
    && PYTEST_ARGS+=(-n "${TEST_WORKERS:-8}")
fi
run_step tests 90 "$OUT/tests.log" "$PY" -m pytest -q -rfE -m cuda -p no:cacheprovider \
  ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} tests
run_step accuracy 30 "$OUT/tests.log" "$PY" -m benchmarks.accuracy

# ---------------------------------------------------------------------------- capture
# a UniTSFaceHead training step with partial FC (1M classes at rate 0.1: the headline's 100k
# sampled, bf16 embeddings) captured in a CUDA graph: replayed vs eager (equal?), the step
# time of each and the launches of an eager step, per backend
CAPTURE=(examples/capture_step.py --classes 1000000 --batch 512 --dim 512 --sample-rate 0.1
  --dtype bfloat16 --steps 10 --profile --no-compile)
run_step capture_triton 35 "$OUT/extras.log" "$PY" "${CAPTURE[@]}" --backend triton
if have_ext || [ -n "$DRY_RUN" ]; then
  run_step capture_native 25 "$OUT/extras.log" "$PY" "${CAPTURE[@]}" --backend native
fi

# ---------------------------------------------------------------------------- as time allows
# the objective's cosine tiles from persistent programs (UNITSFACE_TRITON_PERSISTENT=1, and
# =resident: the x row block kept in shared memory; off by default until these steps have
# timed them): their per-kernel times beside the model's
run_step cost_persistent 30 "$OUT/cost.log" "$PY" -m benchmarks.cost_model ${INPUTS[@]+"${INPUTS[@]}"} --measure \
  --persistent --op fused_unitsface_loss
run_step cost_resident 30 "$OUT/cost.log" "$PY" -m benchmarks.cost_model ${INPUTS[@]+"${INPUTS[@]}"} --measure \
  --persistent resident --op fused_unitsface_loss
run_step cost_saved_exps 30 "$OUT/cost.log" "$PY" -m benchmarks.cost_model ${INPUTS[@]+"${INPUTS[@]}"} --measure \
  --persistent resident --saved-exps --op fused_unitsface_loss
run_step curve 60 "$OUT/extras.log" "$PY" -m benchmarks --out "$OUT" --stem bench --resume \
  --classes 10k 100k 1M --no-check --impl-budget 8 --budget 45
run_step sweep 40 "$OUT/extras.log" "$PY" -m benchmarks.tile_sweep
run_step fusion 20 "$OUT/extras.log" "$PY" -m benchmarks.fusion --repeats 10
run_step head_step 40 "$OUT/extras.log" "$PY" -m benchmarks.head_step --device cuda --steps 5

# ---------------------------------------------------------------------------- summary
{
  echo
  echo "================ gpu_suite summary ($(spent)s of ${SUITE_SECONDS}s) ================"
  if [ -s "$OUT/bench.json" ]; then
    "$PY" -m benchmarks.report "$OUT/bench.json" 2>&1
  else
    echo "(no benchmark results: see the headline step in suite.log)"
  fi
  echo "---------------- steps ----------------"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [ -s "$OUT/cost.log" ]; then
    echo "---------------- cost models ----------------"
    grep -E "^(device inputs|  (mm rate|HBM|L2|launch gap)|predicted|  predicted|measured on)" "$OUT/cost.log"
  fi
  grep -E "(passed|failed|error|no tests ran)" "$OUT/tests.log" 2>/dev/null | tail -n 1
} | tee -a "$LOG"
if [ -n "$DRY_RUN" ]; then
  "$PY" -m benchmarks.dryrun --plan "$PLAN" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  rm -f "$PLAN"
  exit "$rc"
fi
rm -f "$PLAN"
extra=$(ls -A "$OUT" | grep -v -x -F "$(printf '%s\n' "${FILES[@]}")")
[ -n "$extra" ] && echo "!! files in $OUT beyond the suite's own: $extra" | tee -a "$LOG"
ls -la "$OUT"
exit 0
