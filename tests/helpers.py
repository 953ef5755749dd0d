"""Shared test helpers: backends per device, input builders, comparison metrics, tolerances."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unitsface_kernels import native

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# DESIGN.md §7: fp32 loss rel. err ≤ 1e-5, gradient cosine ≥ 0.9999; bf16 ≤ 1e-2 / ≥ 0.999.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_COS = {torch.float64: 1 - 1e-12, torch.float32: 0.9999, torch.float16: 0.999,
            torch.bfloat16: 0.999}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def fp64_backends(device: str, op: str) -> list:
    """The fused backends with float64 kernels on `device` (gradcheck): Triton's compiled
    kernels have none (its fp64 tl.dot does not build for sm_90), its interpreter has."""
    return [b for b in fused_backends(device, op) if not (device == "cuda" and b == "triton")]


def fused_backends(device: str, op: str) -> list:
    """The fused backends that can run on `device` in this process, as pytest params (a
    backend that is not present is a visible skip with its reason, never a silent pass)."""
    out = []
    if device == "cuda" or INTERPRETING:
        out.append("triton")
    else:
        out.append(pytest.param("triton", marks=pytest.mark.skip(
            reason="CPU triton tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")))
    if native.has_op(op):
        out.append("native")
    return out


def all_backends(device: str, op: str) -> list:
    return fused_backends(device, op) + ["reference"]


def dev(device: str) -> torch.device:
    return torch.device(device)


def grad_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_loss(out, ref, dtype):
    assert torch.isfinite(out).all(), out
    err = rel_err(out, ref)
    assert err <= LOSS_RTOL[dtype], f"loss rel. err {err:.3g} > {LOSS_RTOL[dtype]} ({dtype})"


def assert_close_grad(g, g_ref, dtype, name, scalar_scale=1.0):
    assert g is not None, f"no gradient for {name}"
    assert g.dtype == dtype, f"{name}.grad has dtype {g.dtype}, expected {dtype}"
    assert torch.isfinite(g).all(), f"{name}.grad is not finite"
    if g_ref.norm() == 0:
        assert torch.count_nonzero(g) == 0, f"{name}.grad should be exactly zero"
        return
    if g.numel() == 1:
        # a scalar (the unified threshold's ∂L/∂b = Σ_P σ − Σ_N σ) can cancel to nearly 0,
        # where a cosine is meaningless: compare it against the size of its terms instead
        # ... and no closer than the dtype it is returned in can store it
        rtol = max(1 - GRAD_COS[dtype], torch.finfo(dtype).eps)
        err = abs(float(g) - float(g_ref))
        assert err <= rtol * max(1.0, abs(float(g_ref)), scalar_scale), \
            f"{name}.grad {float(g)} vs {float(g_ref)}"
        return
    cos = grad_cosine(g, g_ref)
    assert cos >= GRAD_COS[dtype], f"{name}.grad cosine {cos:.8f} < {GRAD_COS[dtype]} ({dtype})"
    # the cosine ignores the scale: check the norm too
    ratio = float(g.double().norm() / g_ref.double().norm().clamp_min(1e-30))
    assert abs(ratio - 1) <= 20 * (1 - GRAD_COS[dtype]) + 1e-9, f"{name}.grad norm ratio {ratio}"


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor that any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.where = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that live in an input's memory (copy_, set_, views: Triton's interpreter
        # uses them to stage kernel arguments) allocate nothing.
        inputs = {a.untyped_storage().data_ptr()
                  for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() > self.largest
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest, self.where = t.numel(), str(func)
        return out
