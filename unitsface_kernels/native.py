"""Loading and wrapping the compiled extension ``unitsface_kernels._C``.

Importing ``_C`` registers the C++ (CPU) and CUDA ops as ``torch.ops.unitsface.*``. The
package works without it (``reference`` and ``triton`` backends); asking for the native
backend then raises an error that says how to build it. This module never falls back to
another backend itself: ``unitsface_kernels.ops`` does the dispatch.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["available", "load", "require", "has_op", "NATIVE_OPS", "bank_update_"]

BUILD_HINT = (
    "the native backend needs the compiled extension unitsface_kernels._C; build it with "
    "`pip install --no-build-isolation .` (or `make build`)"
)

_lock = threading.Lock()
_tried = False
_C = None  # the extension module once loaded
_load_error: BaseException | None = None


def load():
    """Import ``unitsface_kernels._C`` once; return the module, or None if it is missing.

    The first successful load also registers the fake (meta) implementations of the ops,
    so that torch.compile / FakeTensor tracing works.
    """
    global _tried, _C, _load_error
    if _tried:
        return _C
    with _lock:
        if _tried:
            return _C
        try:
            from unitsface_kernels import _C as ext  # registers torch.ops.unitsface.*
        except (ImportError, OSError) as e:  # not built, or built against another torch/CUDA
            _load_error = e
        else:
            _register_fakes()
            _C = ext
        _tried = True
    return _C


def available() -> bool:
    """True when the compiled extension can be imported."""
    return load() is not None


def require():
    """Return the extension module, or raise RuntimeError saying how to build it."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"{BUILD_HINT}. Importing it failed with: {_load_error!r}") from _load_error
    return ext


# Op families of the native backend -> the torch.ops.unitsface ops (defined in csrc/ops.cpp)
# that implement them. When a family's C++/CUDA ops land in csrc/, list them here (and add
# their fake implementations to _register_fakes below); ops.resolve_backend then picks
# "native" for that family.
NATIVE_OPS: dict[str, tuple[str, ...]] = {
    "bank_update": ("bank_update_",),
    # chunked ATen GEMM + fused epilogue (csrc/uss.cpp, csrc/unitsface.cpp, csrc/*_cuda.cu),
    # with the schemas of the Triton ops of unitsface_kernels.library
    "uss": ("uss_fwd", "uss_bwd"),
    "unitsface": ("unitsface_fwd", "unitsface_bwd"),
}

# Op families whose forward/backward pair gets the autograd wiring (and fake kernels) of
# unitsface_kernels.library.register_family once the extension is loaded.
_FAMILIES = ("uss", "unitsface")


def has_op(op: str) -> bool:
    """True when the extension is loaded and provides op family ``op`` (a key of
    NATIVE_OPS, e.g. "bank_update") or the single op ``unitsface::<op>``."""
    if load() is None:
        return False
    return all(hasattr(torch.ops.unitsface, name) for name in NATIVE_OPS.get(op, (op,)))


def _register_fakes() -> None:
    # Fake implementations: shapes/dtypes only, no data. The ops that mutate their inputs
    # in place and return nothing have a no-op fake.
    @torch.library.register_fake("unitsface::bank_update_")
    def _bank_update_fake(bank, bank_valid, x, labels):
        return None

    # The loss families: the fakes and the autograd link of library.py (shared with the
    # Triton ops, whose signatures these C++ ops repeat). An older build without them is
    # skipped (has_op then reports the family missing).
    from . import library

    for family in _FAMILIES:
        fwd, bwd = NATIVE_OPS[family]
        if hasattr(torch.ops.unitsface, fwd) and hasattr(torch.ops.unitsface, bwd):
            library.register_family(family, fwd, bwd, fakes=True)
    if hasattr(torch.ops.unitsface, "unitsface_fwd_g"):
        _register_fused_unitsface(library)


# --------------------------------------------------------------------------------------
# unitsface_fwd_g / unitsface_bwd_g: the fused CPU forward of the objective
# --------------------------------------------------------------------------------------
# unitsface_fwd_g returns unitsface_fwd's outputs plus dx_rows [B, D] = ∂L_i/∂x_i and
# db_rows [B] = ∂L_i/∂b, formed during the forward sweep (the softmax part of ∂x accumulated
# with flash-attention's running-max rescaling). Since L_i depends on x only through x_i,
# ∂L/∂x = grad_rows[:, None] · dx_rows for any upstream gradient, and unitsface_bwd_g only
# recomputes the W cosines for ∂W: 6 GEMMs per training step instead of 7. The public
# functions use it (through library.FORWARD_VARIANTS) for CPU tensors when x takes a gradient.

def _unitsface_fwd_g_fake(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                          margin_cos, uss_margin, uss_weight, uss_lse):
    from .library import unitsface_fwd_fake

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return unitsface_fwd_fake(x, centres, bank, labels, index, bank_valid, bias, scale,
                              margin_arc, margin_cos, uss_margin, uss_weight, uss_lse) + (
        x.new_empty(x.shape, dtype=acc), x.new_empty(x.shape[0], dtype=acc))


def _unitsface_bwd_g_fake(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw,
                          nb, stats, dx_rows, db_rows, scale, margin_arc, margin_cos,
                          uss_margin, uss_weight, uss_lse, need_dx, need_dw, need_dbias):
    from .library import unitsface_bwd_fake

    return unitsface_bwd_fake(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx,
                              nw, nb, stats, scale, margin_arc, margin_cos, uss_margin,
                              uss_weight, uss_lse, need_dx, need_dw, need_dbias)


def _unitsface_g_setup(ctx, inputs, output):
    x, centres, bank, labels, index, bank_valid, bias, *options = inputs
    _, stats, nx, nw, nb, dx_rows, db_rows = output
    ctx.mark_non_differentiable(stats, nx, nw, nb, dx_rows, db_rows)
    ctx.save_for_backward(x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats,
                          dx_rows, db_rows)
    ctx.options = tuple(options)


def _unitsface_g_backward(ctx, grad_rows, *_):
    (x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats, dx_rows,
     db_rows) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dbias = need[6] and bias is not None
    dx, dw, dbias = torch.ops.unitsface.unitsface_bwd_g(
        grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats, dx_rows,
        db_rows, *ctx.options, need[0], need[1], need_dbias)
    return (dx if need[0] else None, dw if need[1] else None, None, None, None, None,
            dbias if need_dbias else None) + (None,) * len(ctx.options)


def unitsface_forward(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                      margin_cos, uss_margin, uss_weight, uss_lse):
    """The native forward of the objective as the public functions call it: the fused
    unitsface_fwd_g when it pays (CPU tensors, grad mode on, x takes a gradient), else the
    plain unitsface_fwd. Either way the first five outputs are unitsface_fwd's."""
    ops = torch.ops.unitsface
    fused = (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad
             and hasattr(ops, "unitsface_fwd_g"))
    op = ops.unitsface_fwd_g if fused else ops.unitsface_fwd
    return op(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc, margin_cos,
              uss_margin, uss_weight, uss_lse)


def _register_fused_unitsface(library) -> None:
    torch.library.register_fake("unitsface::unitsface_fwd_g")(_unitsface_fwd_g_fake)
    torch.library.register_fake("unitsface::unitsface_bwd_g")(_unitsface_bwd_g_fake)
    torch.library.register_autograd("unitsface::unitsface_fwd_g", _unitsface_g_backward,
                                    setup_context=_unitsface_g_setup)
    if hasattr(library, "FORWARD_VARIANTS"):
        library.FORWARD_VARIANTS[("unitsface", "native")] = unitsface_forward


# --------------------------------------------------------------------------------------
# bank_update_
# --------------------------------------------------------------------------------------

_BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_bank_update_args(bank, bank_valid, x, labels) -> None:
    for name, t in (("bank", bank), ("bank_valid", bank_valid), ("x", x), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bank_update_: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bank.dim() != 2:
        raise ValueError(f"bank_update_: bank must be 2-D (C, D), got shape {tuple(bank.shape)}")
    if bank_valid.dim() != 1 or bank_valid.shape[0] != bank.shape[0]:
        raise ValueError(
            f"bank_update_: bank_valid must have shape (C,) = ({bank.shape[0]},) like bank's rows, "
            f"got shape {tuple(bank_valid.shape)}"
        )
    if x.dim() != 2:
        raise ValueError(f"bank_update_: x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"bank_update_: labels must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"bank_update_: labels has {labels.shape[0]} entries but x has {x.shape[0]} rows"
        )
    if x.shape[1] != bank.shape[1]:
        raise ValueError(
            f"bank_update_: D mismatch: x has D = {x.shape[1]} but bank has D = {bank.shape[1]}"
        )
    for name, t in (("bank_valid", bank_valid), ("x", x), ("labels", labels)):
        if t.device != bank.device:
            raise ValueError(f"bank_update_: {name} is on {t.device} but bank is on {bank.device}")
    if bank.dtype not in _BANK_DTYPES:
        raise TypeError(
            f"bank_update_: bank must be float32, bfloat16, float16 or float64, got {bank.dtype}"
        )
    if bank_valid.dtype != torch.bool:
        raise TypeError(f"bank_update_: bank_valid must be a bool tensor, got {bank_valid.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"bank_update_: x must be a floating-point tensor, got {x.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"bank_update_: labels must be an integer tensor (int64 or int32), got {labels.dtype}"
        )
    if not bank.is_contiguous():
        raise ValueError("bank_update_: bank must be contiguous (it is updated in place)")
    if not bank_valid.is_contiguous():
        raise ValueError("bank_update_: bank_valid must be contiguous (it is updated in place)")
    # The label range ([0, C)) is checked by the op itself (on CUDA it needs a sync).


def bank_update_(bank: torch.Tensor, bank_valid: torch.Tensor, x: torch.Tensor,
                 labels: torch.Tensor) -> None:
    """In place: ``bank[labels[i]] = normalize(x[i])`` and ``bank_valid[labels[i]] = True``.

    The normalisation is F.normalize's (``x / max(||x||, 1e-5)``), computed in float32
    (float64 for float64 ``x``) and stored in ``bank.dtype``. When a label occurs several
    times, the last occurrence wins (deterministically, on CPU and CUDA). Rows whose label
    is not in the batch are untouched. No gradient flows into the bank: ``x`` is detached.

    Raises TypeError/ValueError naming the bad argument, and RuntimeError when the
    extension is not built.
    """
    require()
    check_bank_update_args(bank, bank_valid, x, labels)
    torch.ops.unitsface.bank_update_(bank, bank_valid, x.detach(), labels)
    # A C++ op does not bump the version counters of what it writes: without this, a loss
    # that saved the bank for its backward would silently use the updated rows.
    torch.autograd.graph.increment_version([bank, bank_valid])
