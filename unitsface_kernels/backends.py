"""Which backend runs a call (docs/design.md §4): ``backend="auto"`` picks triton for CUDA
tensors and native (else the eager reference) for CPU tensors; an explicit backend that
cannot run here raises and says why."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import native
from . import validation as check

BACKENDS = ("auto", "triton", "native", "reference")


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, device: torch.device, family: str) -> str:
    """The backend that runs op family `family` ("uss", "unitsface") on `device`."""
    check.choice(backend, BACKENDS, "backend")
    if device.type == "meta":
        # shape inference: every backend's ops have fake kernels, which serve meta tensors
        return "triton" if backend == "auto" else backend
    if backend == "auto":
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "native" if native.has_family(family, device.type) else "reference"
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors and an installed triton (on the CPU only "
            f"under TRITON_INTERPRET=1, for tests); got tensors on {device}")
    if backend == "native":
        native.require()
        if not native.has_family(family, device.type):
            raise RuntimeError(f"the native backend of this build has no {family} ops for "
                               f"{device.type} tensors; rebuild the extension (a CUDA build for "
                               "CUDA tensors), or use backend='triton' (CUDA) or "
                               "backend='reference'")
    return backend
