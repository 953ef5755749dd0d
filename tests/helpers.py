"""Shared test helpers: one case builder for every op family, the call of a case on a backend,
the comparison with the float64 reference and its tolerances, backends per device.

A case is a dict of tensors plus its ``family`` ("uss", "softmax", "unitsface") and, for USS,
its ``mode`` ("bank", "inbatch", "centres"). :func:`run` calls the family's public function
on a backend with leaf copies of the inputs and returns the loss and the gradients of the
inputs that take one; :func:`check` compares a backend with the float64 reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unitsface_kernels import (fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                               native, sample_classes)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Set by `make test`, which has just built the extension: its absence is an error there.
REQUIRE_NATIVE = os.environ.get("UNITSFACE_REQUIRE_NATIVE", "0") not in ("", "0")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FORMS = ["pairs", "lse"]
MARGINS = {"cosface": dict(margin_arc=0.0, margin_cos=0.4),
           "arcface": dict(margin_arc=0.5, margin_cos=0.0),
           "combined": dict(margin_arc=0.3, margin_cos=0.2),
           "arcface_st": dict(margin_arc=0.5, margin_cos=0.0, arcface_grad="straight_through"),
           "arcface_easy": dict(margin_arc=0.5, margin_cos=0.0, easy_margin=True)}


# ----------------------------------------------------------------------------- backends

def fused_backends(device: str, family: str) -> list:
    """The fused backends that can run `family` ("uss" or "unitsface") on `device`, as pytest
    params: a backend that is not present is a visible skip with its reason, never a silent
    pass."""
    out = []
    if device == "cuda" or INTERPRETING:
        out.append("triton")
    else:
        out.append(pytest.param("triton", marks=pytest.mark.skip(
            reason="CPU triton tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")))
    if native.has_family(family, device):
        out.append("native")
    elif REQUIRE_NATIVE and device == "cpu":
        raise RuntimeError(f"UNITSFACE_REQUIRE_NATIVE is set but the native {family} ops do not "
                           f"load: {native._load_error!r}")
    else:
        out.append(pytest.param("native", marks=pytest.mark.skip(
            reason=f"the native extension has no {family} ops for {device} tensors (not built)")))
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def build_cuda_emulation() -> None:
    """Compiles (once; ninja keeps the objects under build/) and loads the host build of the
    native CUDA sweep of the unitsface family (csrc/emu/): ops
    unitsface_emu::unitsface_{fwd,bwd} with the native ops' schemas."""
    from torch.utils import cpp_extension
    tag = re.sub(r"[^A-Za-z0-9.-]+", "_", f"torch{torch.__version__}")
    build_dir = os.path.join(ROOT, "build", f"cuda-emu-{tag}")
    os.makedirs(build_dir, exist_ok=True)
    csrc = os.path.join(ROOT, "csrc")
    cpp_extension.load(
        name="unitsface_cuda_emu",
        sources=[os.path.join(csrc, "emu", "unitsface_cuda_emu.cpp"),
                 os.path.join(csrc, "unitsface_args.cpp"), os.path.join(csrc, "chunking.cpp")],
        extra_include_paths=[csrc], extra_cflags=["-O1", "-g0"], build_directory=build_dir,
        is_python_module=False)


# Row norms below the default eps (1e-5), at an eps of 1e-12 (1 % over it: at exactly the eps
# the gradient jumps, and which side a norm rounds to is not the test's business) and below it.
TINY_NORMS = (3e-7, 2e-9, 1.01e-12, 4e-13)


def with_tiny_rows(t, rows):
    """t with rows[k] rescaled to the norm TINY_NORMS[k]."""
    t = t.clone()
    for r, norm in zip(rows, TINY_NORMS):
        t[r] = t[r] / t[r].norm() * norm
    return t


def assert_rows_close(name, g, w, rtol):
    """Each row of g within rtol of w's row (relative to that row: the tiny rows' gradients,
    of order 1/eps, would hide every other row in a global norm)."""
    g, w = g.detach().double().reshape(len(g), -1), w.detach().double().reshape(len(w), -1)
    err, size = (g - w).norm(dim=1), w.norm(dim=1)
    bad = err > rtol * size + 1e-12 * float(w.norm())
    assert not bad.any(), (f"{name}: rows {bad.nonzero()[:, 0].tolist()} off by {err[bad]} "
                           f"of {size[bad]}")


class CountingKernel:
    """Stands in for a jitted kernel: records each launch's keyword arguments, then launches
    the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def cuda_emulation():
    """While active, backend="native" on CPU tensors of the unitsface family runs the emulated
    CUDA sweep instead of the native CPU kernels, and torch.empty fills memory with NaN
    (torch's deterministic mode), so that a padded column or an unwritten buffer that reaches
    a result shows."""
    build_cuda_emulation()
    # the extension registers its CPU kernels when it loads: load it first, or it would
    # replace the emulation's on the first call
    assert native.has_family("unitsface"), "the native extension is not built"
    lib = torch.library.Library("unitsface", "IMPL")
    lib.impl("unitsface_fwd_native", lambda *a: torch.ops.unitsface_emu.unitsface_fwd(*a), "CPU")
    lib.impl("unitsface_bwd_native", lambda *a: torch.ops.unitsface_emu.unitsface_bwd(*a), "CPU")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        lib._destroy()


def all_backends(device: str, family: str) -> list:
    return fused_backends(device, family) + ["reference"]


def fp64_backends(device: str, family: str) -> list:
    """The fused backends with float64 kernels on `device` (gradcheck): Triton's compiled
    kernels have none (its fp64 tl.dot does not build for sm_90), its interpreter has."""
    return [b for b in fused_backends(device, family) if not (device == "cuda" and b == "triton")]


# ----------------------------------------------------------------------------- cases

def make_case(family, b, n, d, dtype=torch.float32, device="cpu", *, mode="bank", sampled=False,
              vector_bias=False, seed=0, rate=0.4, valid_rate=0.8, num_labels=None):
    """Random inputs of one call: B rows, N reference rows or classes, width D.

    uss: mode "bank" (a memory bank, l_j = j, some invalid slots), "inbatch" (ref = the batch,
    a few labels shared) or "centres" (class centres with a gradient); unitsface: class
    centres, a bank with some invalid slots and a threshold; softmax: class centres. With
    `sampled`, a partial-FC index of int(rate·N) classes (softmax, unitsface)."""
    g = torch.Generator().manual_seed(seed)
    inbatch = family == "uss" and mode == "inbatch"
    num_labels = num_labels or (max(2, b // 4) if inbatch else n)
    case = dict(family=family, mode=mode if family == "uss" else None,
                x=torch.randn(b, d, generator=g).to(dtype),
                labels=torch.randint(0, num_labels, (b,), generator=g))
    if family == "uss":
        case["ref"] = None if inbatch else torch.randn(n, d, generator=g).to(dtype)
        case["ref_valid"] = (torch.rand(n, generator=g) < valid_rate) if mode == "bank" else None
        n_ref = b if inbatch else n
        case["bias"] = (torch.rand(n_ref if vector_bias else 1, generator=g) * 20).to(dtype)
        return _to(case, device)
    case["centres"] = torch.randn(n, d, generator=g).to(dtype)
    if family == "unitsface":
        case["bank"] = torch.nn.functional.normalize(torch.randn(n, d, generator=g)).to(dtype)
        case["bank_valid"] = torch.rand(n, generator=g) < valid_rate
        case["bias"] = (torch.rand(n if vector_bias else 1, generator=g) * 20).to(dtype)
    case["index"] = (sample_classes(case["labels"], n, max(1, int(rate * n)), generator=g)
                     if sampled else None)
    return _to(case, device)


def _to(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def grad_names(case) -> tuple:
    if case["family"] == "uss":
        return ("x", "bias") + (("ref",) if case["mode"] == "centres" else ())
    if case["family"] == "softmax":
        return ("x", "centres")
    return ("x", "centres", "bias")


def loss_of(case, backend, reduction="mean", **kw):
    """The family's public function on `case` (its tensors as they are)."""
    c = case
    if c["family"] == "uss":
        return fused_uss_loss(c["x"], c["labels"], c["bias"], c["ref"], None, c["ref_valid"],
                              reduction=reduction, backend=backend, **kw)
    if c["family"] == "softmax":
        return fused_margin_softmax_loss(c["x"], c["centres"], c["labels"], index=c["index"],
                                         reduction=reduction, backend=backend, **kw)
    return fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"], c["bias"],
                                bank_valid=c["bank_valid"], index=c["index"],
                                reduction=reduction, backend=backend, **kw)


def leaves_of(case):
    """The case with detached copies of its tensors, those of grad_names() requiring grad."""
    names = grad_names(case)
    return {k: (v.detach().clone().requires_grad_(k in names)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def run(case, backend, reduction="mean", **kw):
    """(loss, {name: gradient}) of one backend; the upstream gradient is random per row."""
    leaves = leaves_of(case)
    loss = loss_of(leaves, backend, reduction, **kw)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    names = grad_names(case)
    grads = torch.autograd.grad((loss * weights).sum(), [leaves[k] for k in names])
    return loss.detach(), dict(zip(names, grads))


def as_float64(case):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def passes_gradcheck(f, inputs, backend) -> bool:
    """torch.autograd.gradcheck in float64 (eps 1e-6, atol 1e-7, rtol 1e-5). The Triton
    kernels under the CPU interpreter, where a call costs ~50 ms, take its fast mode: the
    projection vᵀ·J·u on random vectors instead of the whole Jacobian (a 25× shorter test; it
    fails on a 0.1 % error in a single entry). Every other backend and Triton on a GPU: the
    whole Jacobian."""
    fast = backend == "triton" and INTERPRETING
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def check(case, backend, dtype=None, reduction="mean", roundings=2, **kw):
    """One backend against the float64 reference on the same (rounded) inputs: loss and
    gradients within the tolerances below (`roundings`: see :func:`grad_rtol`); partial FC
    leaves unsampled rows exactly zero."""
    dtype = dtype or case["x"].dtype
    loss, grads = run(case, backend, reduction, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_loss, ref_grads = run(as_float64(case), "reference", reduction, **kw)
    assert_close_loss(loss, ref_loss, dtype)
    for name in grads:
        assert_close_grad(grads[name], ref_grads[name], dtype, name,
                          scalar_scale=float(ref_loss.abs().sum()), roundings=roundings)
    if case.get("index") is not None:  # partial FC: unsampled rows get exactly zero
        unsampled = ~torch.isin(torch.arange(case["centres"].shape[0], device=loss.device),
                                case["index"])
        assert torch.count_nonzero(grads["centres"][unsampled]) == 0
        if "bias" in grads and case["bias"].numel() > 1:
            assert torch.count_nonzero(grads["bias"][unsampled]) == 0
    return loss, grads


def check_frozen_x(case, frozen=("x",), **kw):
    """native against the float64 reference with x (and the other inputs named in `frozen`)
    taking no gradient: the plain forward and backward (no row_grads) for the unitsface
    family."""
    def grads_of(c, backend):
        leaves = leaves_of(c)
        for k in frozen:
            leaves[k] = leaves[k].detach()
        names = [k for k in grad_names(c) if k not in frozen]
        loss = loss_of(leaves, backend, "none", **kw)
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
        return loss.detach(), dict(zip(names, torch.autograd.grad((loss * weights).sum(),
                                                                   [leaves[k] for k in names])))

    dtype = case["x"].dtype
    loss, grads = grads_of(case, "native")
    ref_loss, ref_grads = grads_of(as_float64(case), "reference")
    assert_close_loss(loss, ref_loss, dtype)
    for name in grads:
        assert_close_grad(grads[name], ref_grads[name], dtype, name,
                          scalar_scale=float(ref_loss.abs().sum()))


def same_label_and_zero_rows(case):
    """The unitsface case (with an index) with every label the index's first class and zero
    rows in x, W and the bank (legal: the eps rule)."""
    case["labels"][:] = case["index"][0]
    case["x"][[2, 9]] = 0.0
    case["centres"][case["index"][[0, 5]]] = 0.0
    case["bank"][case["index"][:4]] = 0.0
    return case


def check_invalid_rows_reach_nothing(case, bank, valid, frozen_x=False, **kw):
    """A reference row marked invalid contributes nothing whatever it holds: with NaN and inf
    in invalid rows (the positives of three rows and one other) `native` matches the float64
    reference, and equals the same call with those rows zeroed."""
    case[valid][case["labels"][:3]] = False
    other = (~case[valid]).nonzero()[:, 0]
    rows = torch.cat([case["labels"][:3], other[~torch.isin(other, case["labels"][:3])][:1]])
    zeroed = dict(case, **{bank: case[bank].clone()})
    zeroed[bank][rows] = 0.0
    poisoned = dict(case, **{bank: case[bank].clone()})
    poisoned[bank][rows[0]] = float("nan")
    poisoned[bank][rows[1], 3] = float("inf")
    poisoned[bank][rows[2:]] = float("nan")
    if frozen_x:
        check_frozen_x(poisoned, **kw)
        return
    loss, grads = check(poisoned, "native", **kw)  # finite, and equal to the reference
    want_loss, want_grads = run(zeroed, "native", **kw)
    torch.testing.assert_close(loss, want_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name])


def check_nan_in_valid_bank_row(case, **kw):
    """NaN in a valid bank row of the unitsface case reaches every row's loss and ∂x (each row
    has it as a negative): never hidden."""
    case["bank"][case["bank_valid"].nonzero()[0, 0], 0] = float("nan")
    x = case["x"].clone().requires_grad_()
    rows = fused_unitsface_loss(x, case["labels"], case["centres"], case["bank"], case["bias"],
                                bank_valid=case["bank_valid"], reduction="none",
                                backend="native", **kw)
    assert torch.isnan(rows).all()
    rows.sum().backward()
    assert torch.isnan(x.grad).all()


def check_empty_bank_is_softmax_alone(case, **kw):
    """Every bank slot of the unitsface case unwritten: the loss of the margin softmax alone
    and no gradient for the threshold."""
    case["bank_valid"][:] = False
    loss, grads = check(case, "native", **kw)
    soft = fused_margin_softmax_loss(case["x"], case["centres"], case["labels"],
                                     index=case["index"], backend="native")
    torch.testing.assert_close(loss, soft)
    assert torch.count_nonzero(grads["bias"]) == 0


# ----------------------------------------------------------------------------- tolerances
# docs/design.md §7 asks loss rel. err ≤ 1e-5 (fp32) / 1e-2 (bf16) and gradient cosines
# ≥ 0.9999 / 0.999. The tests are stricter: every backend accumulates in fp32, so the loss
# (returned in fp32) of half-precision inputs is as accurate as fp32's; a half-precision
# gradient may differ from the float64 one by at most twice what rounding the float64 result
# to that dtype costs (a gradient kept in half precision somewhere inside adds another
# rounding and fails).

LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5,
             torch.bfloat16: 1e-5}
FP32_GRAD_RTOL = 1e-5
FP64_GRAD_RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grad_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def assert_close_loss(out, ref, dtype):
    assert torch.isfinite(out).all(), out
    err = rel_err(out, ref)
    assert err <= LOSS_RTOL[dtype], f"loss rel. err {err:.3g} > {LOSS_RTOL[dtype]} ({dtype})"


def grad_rtol(g_ref: torch.Tensor, dtype, roundings: int = 2) -> float:
    """The relative error a gradient of `dtype` may have against the float64 g_ref: for half
    precision, `roundings` times the error of rounding g_ref to `dtype`."""
    if dtype == torch.float64:
        return FP64_GRAD_RTOL
    if dtype == torch.float32:
        return FP32_GRAD_RTOL
    rounding = rel_err(g_ref.to(dtype), g_ref)
    return roundings * rounding + FP32_GRAD_RTOL


def assert_close_grad(g, g_ref, dtype, name, scalar_scale=1.0, roundings: int = 2):
    assert g is not None, f"no gradient for {name}"
    assert g.dtype == dtype, f"{name}.grad has dtype {g.dtype}, expected {dtype}"
    assert torch.isfinite(g).all(), f"{name}.grad is not finite"
    if g_ref.norm() == 0:
        assert torch.count_nonzero(g) == 0, f"{name}.grad should be exactly zero"
        return
    if g.numel() == 1:
        # a scalar (the unified threshold's ∂L/∂b = Σ_P σ − Σ_N σ) can cancel to nearly 0,
        # where a relative error is meaningless: compare against the size of its terms, and
        # no closer than the dtype it is returned in can store it
        v, want = float(g), float(g_ref)
        tol = (torch.finfo(dtype).eps * abs(want)
               + (FP64_GRAD_RTOL if dtype == torch.float64 else FP32_GRAD_RTOL)
               * max(1.0, abs(want), scalar_scale))
        assert abs(v - want) <= tol, f"{name}.grad {v} vs {want} (tolerance {tol:.3g})"
        return
    err, tol = rel_err(g, g_ref), grad_rtol(g_ref, dtype, roundings)
    assert err <= tol, f"{name}.grad rel. err {err:.3g} > {tol:.3g} ({dtype})"


# ----------------------------------------------------------------------------- memory

class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor that any op creates while active (of one
    dtype only, when given)."""

    def __init__(self, dtype=None):
        super().__init__()
        self.largest = 0
        self.where = None
        self.dtype = dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that live in an input's memory (copy_, set_, views: Triton's interpreter
        # uses them to stage kernel arguments) allocate nothing.
        inputs = {a.untyped_storage().data_ptr()
                  for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() > self.largest
                    and self.dtype in (None, t.dtype)
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest, self.where = t.numel(), str(func)
        return out
