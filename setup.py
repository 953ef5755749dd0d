"""Build script for unitsface_kernels.

The Python package (reference, triton and the public API) is pure Python. The optional
native backend is a torch extension, ``unitsface_kernels._C``, built from ``csrc/``:

* a ``CUDAExtension`` (the C++ sources ``csrc/*.cpp`` + ``csrc/cpu/*.cpp`` and the CUDA
  sources ``csrc/cuda/*.cu``) when torch is a CUDA build and an nvcc is found;
* otherwise a ``CppExtension`` (the C++ sources only; the ops then exist for CPU tensors).

``csrc/`` is laid out by concern, as pytorch/extension-cpp: the shared headers, the
device-agnostic drivers and the Python module at the top, the CPU kernels and drivers in
``csrc/cpu/``, the CUDA kernels and drivers in ``csrc/cuda/`` (``csrc/emu/`` is the test-only
host build of the CUDA sweep, not part of the extension).

Build it with ``pip install --no-build-isolation .`` (or ``make build``): without
``--no-build-isolation`` pip would build against a fresh torch downloaded into an isolated
environment, whose ABI need not match the torch that imports the extension.

Environment variables:
  UNITSFACE_NO_EXT=1     build a pure-Python package (no ``_C``; the ``native`` backend is
                         then unavailable, everything else works).
  UNITSFACE_NO_CUDA=1    build the CPU-only ``CppExtension`` even with a CUDA torch (fast
                         builds on machines without a GPU).
  CUDA_HOME              CUDA toolkit root (else derived from ``nvcc`` on PATH, see below).
  TORCH_CUDA_ARCH_LIST   GPU architectures; defaults to "8.0;9.0" when unset and no GPU is
                         visible (torch would otherwise refuse to guess).
  MAX_JOBS               parallel compile jobs (ninja).
  UNITSFACE_CXXFLAGS     extra flags for the C++ compiler, after the defaults (e.g. "-g0": no
                         debug info, which halves the C++ compile time; same machine code).
  UNITSFACE_BUILD_TEMP   where the object files go (default build/obj-<python>-<torch>-<cuda|cpu>,
                         kept between builds so that ninja only recompiles what changed).
"""

import glob
import os
import re
import shlex
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_nvcc(path):
    """Return the real nvcc behind ``path``.

    ``path`` may be a symlink or a small shell wrapper such as
    ``#!/bin/sh\\nexec /usr/local/cuda-13.0/bin/nvcc "$@"``. Torch derives CUDA_HOME as
    ``dirname(dirname(which nvcc))``, which for a wrapper in /usr/local/bin gives
    /usr/local: the headers happen to be found there but ``-L/usr/local/lib64`` has no
    libcudart, so the link fails. Following the wrapper gives the real toolkit root.
    """
    seen = set()
    path = os.path.realpath(path)
    while path not in seen:
        seen.add(path)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            break
        if not head.startswith(b"#!"):
            break  # a real binary
        m = re.search(rb"([^\s\"'=]+/bin/nvcc)\b", head)
        if m is None:
            break
        target = os.path.realpath(m.group(1).decode())
        if not os.path.isfile(target):
            break
        path = target
    return path


def _find_cuda_home():
    """CUDA_HOME env var, else the toolkit of the (resolved) nvcc on PATH, else None."""
    home = os.environ.get("CUDA_HOME", "").strip() or os.environ.get("CUDA_PATH", "").strip()
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(_resolve_nvcc(nvcc)))
    return None


def _openmp_flags():
    """-fopenmp when the C++ compiler accepts it.

    at::parallel_for's OpenMP implementation is a header template
    (ATen/ParallelOpenMP.h): it only runs in parallel if *our* translation unit is
    compiled with -fopenmp. Torch wheels ship libgomp.so.1 and load it first, so linking
    the system libgomp (same soname) resolves to the same runtime.
    """
    if sys.platform == "win32":
        return ["/openmp"], []
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run(
                [cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ).returncode == 0
        except OSError:
            ok = False
    if not ok:
        print("unitsface_kernels: the C++ compiler has no -fopenmp; the CPU ops run single-threaded")
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _extensions():
    if _flag("UNITSFACE_NO_EXT"):
        print("unitsface_kernels: UNITSFACE_NO_EXT set, building the pure-Python package")
        return [], {}

    import torch

    use_cuda = bool(torch.version.cuda) and not _flag("UNITSFACE_NO_CUDA")
    cuda_home = _find_cuda_home() if use_cuda else None
    if use_cuda and cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = cuda_home

    from torch.utils import cpp_extension

    if use_cuda and not cuda_home:
        cuda_home = cpp_extension.CUDA_HOME  # torch's own guess (e.g. /usr/local/cuda)
    if use_cuda and not (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
        print("unitsface_kernels: no nvcc found; building the CPU-only extension")
        use_cuda = False
    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    omp_compile, omp_link = _openmp_flags()
    # No -std flag: torch.utils.cpp_extension adds the standard that torch needs (C++20 for
    # torch >= 2.10; forcing c++17 breaks the ATen headers).
    # -fno-trapping-math (clang's default; results are unchanged, IEEE semantics kept): with
    # trapping maths GCC keeps float comparisons out of the selects that the vectoriser needs,
    # and the AVX2 copies of the CPU row kernels stayed scalar (see csrc/cpu/row_kernels.h).
    cxx_flags = (["-O3", "-fno-trapping-math"] + omp_compile
                 + shlex.split(os.environ.get("UNITSFACE_CXXFLAGS", "")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []

    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a visible GPU torch cannot pick the arch list; A100 + H100/H200.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # ATen/cuda/CUDAContext.h includes cublas_v2.h, cusparse.h and cusolverDn.h. A
        # minimal toolkit (nvcc + cudart only) lacks them, but the pip wheels torch depends
        # on ship them (site-packages/nvidia/cu13/include, or nvidia/<lib>/include for
        # CUDA 12). Put the toolkit's own include dir first so its headers win, and the
        # wheels' include dirs after it only as a fallback for the missing ones.
        include_dirs.append(os.path.join(cuda_home, "include"))
        include_dirs += _nvidia_wheel_include_dirs(torch.__file__, torch.version.cuda)
        define_macros.append(("UNITSFACE_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            name="unitsface_kernels._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=omp_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="unitsface_kernels._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_link,
        )
    print(f"unitsface_kernels: building {'CUDA' if use_cuda else 'C++'} extension from {sources}"
          + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})"
             if use_cuda else ""))
    kind = "cuda" if use_cuda else "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{kind}"
    tag = re.sub(r"[^A-Za-z0-9.-]+", "_", tag)  # a plain path for ninja (no '+', ':', spaces)
    return [ext], {"build_ext": _build_ext_class(cpp_extension, tag)}


def _build_ext_class(cpp_extension, tag):
    """torch's BuildExtension (ninja: incremental, parallel up to MAX_JOBS) with its object
    files in a fixed directory, ``build/obj-<tag>`` (or ``$UNITSFACE_BUILD_TEMP``).

    pip's editable install compiles in a throw-away temporary directory, so every
    ``make build`` and then the wheel build recompiled all of csrc/ (the nvcc part takes
    minutes). With the objects kept, ninja recompiles only what changed (it tracks the
    headers through depfiles and the compile commands in its log), and a ``pip wheel``
    after ``pip install -e`` only links. The tag (Python, torch version, CUDA or CPU) keeps
    builds against another torch, or without CUDA, from overwriting each other's objects.
    """
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = (os.environ.get("UNITSFACE_BUILD_TEMP", "").strip()
                               or os.path.join(ROOT, "build", f"obj-{tag}"))

    return BuildExt


def _nvidia_wheel_include_dirs(torch_file, cuda_version):
    """Include dirs of the nvidia-* pip wheels installed next to torch (may be empty).

    CUDA 13 wheels share one tree (nvidia/cu13/include); CUDA 12 wheels have one per
    library (nvidia/cublas/include, nvidia/cusparse/include, ...).
    """
    major = (cuda_version or "").split(".")[0]
    site_dirs = [os.path.dirname(os.path.dirname(torch_file))] + sys.path
    for base in site_dirs:
        nv = os.path.join(base, "nvidia")
        if not os.path.isdir(nv):
            continue
        combined = os.path.join(nv, f"cu{major}", "include")
        if os.path.isdir(combined):
            return [combined]
        dirs = sorted(glob.glob(os.path.join(nv, "*", "include")))
        if dirs:
            return dirs
    return []


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["unitsface_kernels", "unitsface_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
