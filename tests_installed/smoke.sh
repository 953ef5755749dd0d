#!/usr/bin/env bash
# Smoke-test the installed package: a fresh virtual environment OUTSIDE the source tree,
# torch from the package indexes, the wheel installed into it, and tests_installed/ run from a
# directory that holds no sources, so `import unitsface_kernels` can only find the wheel.
#
#   tests_installed/smoke.sh TORCH_VERSION WHEEL [REQUIREMENT...]
#       install WHEEL (built by `make wheel` against torch TORCH_VERSION) and test it;
#   tests_installed/smoke.sh TORCH_VERSION --build-cpu WHEEL_DIR [REQUIREMENT...]
#       build the wheel inside the fresh environment, against its torch TORCH_VERSION, with
#       the C++ extension only (UNITSFACE_NO_CUDA=1: no nvcc, a fraction of the compile
#       time), into WHEEL_DIR; then install and test it. This is how an older torch is
#       tested: a compiled extension only loads into the torch that it was built against.
#   REQUIREMENTs are installed next to torch (e.g. "numpy<2.4" for an older triton).
#
# The environment lives in a temporary directory and is deleted at the end (set
# UNITSFACE_KEEP_SMOKE_VENV=1 to keep it); nothing is cached, pip's cache included
# (--no-cache-dir), so a CI run costs the same on a clean machine. The --build-cpu build
# compiles from scratch into that directory too: its compile commands name the fresh venv's
# torch headers, so objects kept from an earlier run could never be reused.
set -euo pipefail

usage() { sed -n '6,13p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
torch_version=$1
mode=$2
shift 2
case $mode in
  --build-cpu) [[ $# -ge 1 ]] || usage; wheel_dir=$1; shift ;;
  -*) usage ;;
  *) wheel=$(readlink -f "$mode"); mode=--wheel ;;
esac
requirements=("$@")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A venv with torch is ~5 GB in thousands of files. On a disk, deleting them right after
# installing them waits for their writeback (75 s on a 2-core CI machine); on a RAM disk it takes
# 2 s and the install is no slower. So /dev/shm when it and the memory have room (10 GB),
# else $TMPDIR; UNITSFACE_SMOKE_DIR overrides.
kib_free() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
base=${UNITSFACE_SMOKE_DIR:-${TMPDIR:-/tmp}}
if [[ -z ${UNITSFACE_SMOKE_DIR:-} && -d /dev/shm && -w /dev/shm ]] \
   && (( $(kib_free /dev/shm || echo 0) > 10 << 20 )) \
   && (( $(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) > 10 << 20 )); then
  base=/dev/shm
fi
work=$(mktemp -d "$base/unitsface-smoke.XXXXXX")
cleanup() {
  if [[ ${UNITSFACE_KEEP_SMOKE_VENV:-0} == 1 ]]; then echo "smoke: kept $work"; return; fi
  rm -rf "$work"
  phase "removed $work"
}
trap cleanup EXIT
venv=$work/venv
pip=("$venv/bin/pip" install --no-cache-dir --quiet)
phase() { printf 'smoke[torch %s]: %s (%ds)\n' "$torch_version" "$1" "$SECONDS"; }

SECONDS=0
python3 -m venv "$venv"
# numpy: triton's interpreter needs it. For --build-cpu also the build tools: ninja (parallel
# compiles) and pyproject.toml's setuptools (>= 77 reads the SPDX license field; the venv's
# own setuptools may be older, and torch < 2.14 does not pull a newer one in).
extra=()
[[ $mode == --build-cpu ]] && extra=(ninja "setuptools>=77")
"${pip[@]}" "torch==$torch_version" pytest numpy "${extra[@]}" "${requirements[@]}"
phase "venv with torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"

if [[ $mode == --build-cpu ]]; then
  mkdir -p "$wheel_dir"
  wheel_dir=$(readlink -f "$wheel_dir")
  rm -f "$wheel_dir"/unitsface_kernels-*.whl
  # build/lib.* is shared by every wheel build: stale modules would be packed (see Makefile).
  rm -rf "$repo"/build/lib.* "$repo"/build/bdist.*
  # -g0: this throwaway build needs no debug info, and -g doubles the C++ compile time.
  # PATH: torch runs the first ninja on PATH; use the one just installed (no system ninja
  # needed, and none of another version touching anything).
  (cd "$repo" && export PATH="$venv/bin:$PATH" && \
     UNITSFACE_NO_CUDA=1 UNITSFACE_BUILD_TEMP="$work/obj" UNITSFACE_CXXFLAGS=-g0 \
     "$venv/bin/pip" wheel -v --no-build-isolation --no-deps --no-cache-dir -w "$wheel_dir" . \
     > "$wheel_dir/build.log" 2>&1) || { tail -n 40 "$wheel_dir/build.log"; exit 1; }
  wheel=$(ls "$wheel_dir"/unitsface_kernels-*.whl)
  phase "built $(basename "$wheel") against torch $torch_version (log: $wheel_dir/build.log)"
fi

# --no-deps: torch is there already (the version the extension was compiled against); the
# wheel's declared range is checked below by `pip check`.
"${pip[@]}" --no-deps "$wheel"
"$venv/bin/pip" check
phase "installed $(basename "$wheel")"

mkdir "$work/run"
cp "$repo"/tests_installed/test_*.py "$work/run/"
cd "$work/run"
env -u PYTHONPATH UNITSFACE_SOURCE_TREE="$repo" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider .
phase "tests passed"
