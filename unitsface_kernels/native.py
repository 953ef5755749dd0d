"""Loading the compiled extension ``unitsface_kernels._C``.

Importing ``_C`` registers the C++ (CPU) and CUDA kernels of the native backend for the op
schemas that :mod:`unitsface_kernels.contract` defines (``*_native`` ops, ``bank_update_``).
The package works without it (``reference`` and ``triton`` backends); asking for the native
backend then raises an error that says how to build it. This module never falls back to
another backend itself: :mod:`unitsface_kernels.backends` chooses.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["available", "load", "require", "has_op", "has_family", "selected_isa"]

BUILD_HINT = (
    "the native backend needs the compiled extension unitsface_kernels._C; build it with "
    "`pip install --no-build-isolation .` (or `make build`)"
)

_lock = threading.Lock()
_tried = False
_C = None  # the extension module once loaded
_load_error: BaseException | None = None
_kernels: frozenset = frozenset()  # (op name, "CPU" | "CUDA") registered by the extension


def load():
    """Import ``unitsface_kernels._C`` once; return the module, or None if it is missing."""
    global _tried, _C, _load_error, _kernels
    if _tried:
        return _C
    with _lock:
        if _tried:
            return _C
        try:
            from unitsface_kernels import _C as ext  # registers the kernels
        except (ImportError, OSError) as e:  # not built, or built against another torch/CUDA
            _load_error = e
        else:
            _C = ext
            _kernels = _registered_kernels()
        _tried = True
    return _C


def _registered_kernels() -> frozenset:
    """What the extension registered, read once: a plain set, so that the lookups below are
    Python that torch.compile traces (the dispatcher query itself is not)."""
    from . import contract

    names = [contract.op_name(f, "native", d) for f in contract.FAMILIES for d in ("fwd", "bwd")]
    names.append("bank_update_")
    return frozenset((name, key) for name in names for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"unitsface::{name}", key))


def available() -> bool:
    """True when the compiled extension can be imported."""
    return load() is not None


def require():
    """Return the extension module, or raise RuntimeError saying how to build it."""
    ext = load()
    if ext is None:
        raise RuntimeError(
            f"{BUILD_HINT}. Importing it failed with: {_load_error!r}") from _load_error
    return ext


def has_op(name: str, device: str = "cpu") -> bool:
    """True when the extension is loaded and registers a kernel of ``unitsface::<name>`` for
    tensors on `device` ("cpu", or "cuda" in a CUDA build)."""
    if load() is None:
        return False
    return (name, {"cpu": "CPU", "cuda": "CUDA"}.get(device)) in _kernels


def has_family(family: str, device: str = "cpu") -> bool:
    """True when the native forward and backward of op family `family` run on `device`."""
    return has_op(f"{family}_fwd_native", device) and has_op(f"{family}_bwd_native", device)


def selected_isa() -> str:
    """The instruction set whose CPU row kernels the native ops run now: "base", "avx2" or
    "avx512", the widest this CPU runs, capped by UNITSFACE_NATIVE_ISA (read at every call)."""
    return require().selected_isa()
