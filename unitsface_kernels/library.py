"""The fused backends as torch.library custom ops: forward and backward are separate ops with
fake (meta) implementations, and autograd links them, so torch.compile(fullgraph=True) traces
the public functions and autograd never sees inside a kernel.

    unitsface::uss_fwd_triton(x, ref, labels, ref_labels, ref_valid, bias, scale, margin,
                              lse, clamp, in_batch) -> (rows, stats, nx, nr)
    unitsface::uss_bwd_triton(grad_rows, ..., need_dx, need_dref, need_dbias) -> (dx, dref, dbias)
        stats [4, B] = (A, σ(A)·[A unclamped], B, σ(B)·[B unclamped]) of the lse form
    unitsface::unitsface_fwd_triton(x, centres, bank?, labels, index?, bank_valid?, bias?, scale,
        margin_arc, margin_cos, uss_margin, uss_weight, uss_lse) -> (rows, stats, nx, nw, nb)
    unitsface::unitsface_bwd_triton(grad_rows, ..., need_dx, need_dw, need_dbias) -> (dx, dw, dbias)
        the margin softmax over the (partial-FC) classes, plus λ·USS on the bank rows of the
        same classes when a bank is given; stats [7, B] = (lse_c z_ic, A, σA, B, σB, z_iy,
        local USS loss). Labels that match no column (e.g. −1) have no target there: z_iy = 0.

A native backend registers C++ ops `uss_fwd`/`uss_bwd`, `unitsface_fwd`/`unitsface_bwd` with
the same schemas and calls :func:`register_family` for them.

In in-batch mode the same tensor is passed as x and ref, so autograd adds ∂x and ∂ref.
Gradients that are not needed come back as empty tensors (custom ops return no None).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("unitsface::uss_fwd_triton", mutates_args=())
def uss_fwd_triton(x: Tensor, ref: Tensor, labels: Tensor, ref_labels: Tensor,
                   ref_valid: Optional[Tensor], bias: Tensor, scale: float, margin: float,
                   lse: bool, clamp: bool, in_batch: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .triton.uss import uss_forward

    return uss_forward(x, ref, labels, ref_labels, ref_valid, bias, scale, margin, lse, clamp,
                       in_batch)


def uss_fwd_fake(x, ref, labels, ref_labels, ref_valid, bias, scale, margin, lse, clamp,
                 in_batch):
    acc = _loss_dtype(x)
    b = x.shape[0]
    return (x.new_empty(b, dtype=acc), x.new_empty(4, b, dtype=acc), x.new_empty(b, dtype=acc),
            x.new_empty(ref.shape[0], dtype=acc))


@torch.library.custom_op("unitsface::uss_bwd_triton", mutates_args=())
def uss_bwd_triton(grad_rows: Tensor, x: Tensor, ref: Tensor, labels: Tensor, ref_labels: Tensor,
                   ref_valid: Optional[Tensor], bias: Tensor, nx: Tensor, nr: Tensor,
                   stats: Tensor, scale: float, margin: float, lse: bool, clamp: bool,
                   in_batch: bool, need_dx: bool, need_dref: bool,
                   need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .triton.uss import uss_backward

    dx, dref, dbias = uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr,
                                   stats, scale, margin, lse, clamp, in_batch, need_dx, need_dref,
                                   need_dbias)
    return _or_empty(dx, x), _or_empty(dref, ref), _or_empty(dbias, bias)


def uss_bwd_fake(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats, scale,
                 margin, lse, clamp, in_batch, need_dx, need_dref, need_dbias):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(ref) if need_dref else ref.new_empty(0),
            torch.empty_like(bias) if need_dbias else bias.new_empty(0))




# ---------------------------------------------------------------- margin softmax (+ USS on the bank)
#   unitsface::unitsface_fwd_triton(x, centres, bank?, labels, index?, bank_valid?, bias?, scale,
#       margin_arc, margin_cos, uss_margin, uss_weight, uss_lse) -> (rows, stats, nx, nw, nb)
# Without a bank it is the partial-FC margin softmax alone.

@torch.library.custom_op("unitsface::unitsface_fwd_triton", mutates_args=())
def unitsface_fwd_triton(x: Tensor, centres: Tensor, bank: Optional[Tensor], labels: Tensor,
                         index: Optional[Tensor], bank_valid: Optional[Tensor],
                         bias: Optional[Tensor], scale: float, margin_arc: float,
                         margin_cos: float, uss_margin: float, uss_weight: float,
                         uss_lse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton.fused import fused_forward

    return fused_forward(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                         margin_cos, uss_margin, uss_weight, uss_lse)


def unitsface_fwd_fake(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                       margin_cos, uss_margin, uss_weight, uss_lse):
    acc = _loss_dtype(x)
    b = x.shape[0]
    n = centres.shape[0] if index is None else index.shape[0]
    return (x.new_empty(b, dtype=acc), x.new_empty(7, b, dtype=acc), x.new_empty(b, dtype=acc),
            x.new_empty(n, dtype=acc), x.new_empty(n if bank is not None else 0, dtype=acc))


@torch.library.custom_op("unitsface::unitsface_bwd_triton", mutates_args=())
def unitsface_bwd_triton(grad_rows: Tensor, x: Tensor, centres: Tensor, bank: Optional[Tensor],
                         labels: Tensor, index: Optional[Tensor], bank_valid: Optional[Tensor],
                         bias: Optional[Tensor], nx: Tensor, nw: Tensor, nb: Tensor,
                         stats: Tensor, scale: float, margin_arc: float, margin_cos: float,
                         uss_margin: float, uss_weight: float, uss_lse: bool, need_dx: bool,
                         need_dw: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .triton.fused import fused_backward

    dx, dw, dbias = fused_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias,
                                   nx, nw, nb, stats, scale, margin_arc, margin_cos, uss_margin,
                                   uss_weight, uss_lse, need_dx, need_dw, need_dbias)
    return _or_empty(dx, x), _or_empty(dw, centres), _or_empty(dbias, x)


def unitsface_bwd_fake(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb,
                       stats, scale, margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                       need_dx, need_dw, need_dbias):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(centres) if need_dw else centres.new_empty(0),
            torch.empty_like(bias) if (need_dbias and bias is not None) else x.new_empty(0))


def _uss_setup(ctx, inputs, output):
    x, ref, labels, ref_labels, ref_valid, bias, *options = inputs
    _, stats, nx, nr = output
    ctx.mark_non_differentiable(stats, nx, nr)
    ctx.save_for_backward(x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats)
    ctx.options = tuple(options)


def _uss_backward(bwd_op, ctx, grad_rows):
    x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dref, dbias = bwd_op(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr,
                             stats, *ctx.options, need[0], need[1], need[5])
    return (dx if need[0] else None, dref if need[1] else None, None, None, None,
            dbias if need[5] else None) + (None,) * len(ctx.options)


def _unitsface_setup(ctx, inputs, output):
    x, centres, bank, labels, index, bank_valid, bias, *options = inputs
    _, stats, nx, nw, nb = output
    ctx.mark_non_differentiable(stats, nx, nw, nb)
    ctx.save_for_backward(x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats)
    ctx.options = tuple(options)


def _unitsface_backward(bwd_op, ctx, grad_rows):
    x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dbias = need[6] and bias is not None
    dx, dw, dbias = bwd_op(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw,
                           nb, stats, *ctx.options, need[0], need[1], need_dbias)
    return (dx if need[0] else None, dw if need[1] else None, None, None, None, None,
            dbias if need_dbias else None) + (None,) * len(ctx.options)


_FAMILIES = {"uss": (_uss_setup, _uss_backward, uss_fwd_fake, uss_bwd_fake),
             "unitsface": (_unitsface_setup, _unitsface_backward, unitsface_fwd_fake,
                           unitsface_bwd_fake)}


def register_family(family: str, fwd: str, bwd: str, *, fakes: bool) -> None:
    """Link `unitsface::<fwd>` to `unitsface::<bwd>` in autograd (and give both the family's
    fake kernels when `fakes`, for ops defined in C++). Every backend of a family shares the
    op signatures above, so this is all a new backend needs."""
    setup, backward, fwd_fake, bwd_fake = _FAMILIES[family]
    if fakes:
        torch.library.register_fake(f"unitsface::{fwd}")(fwd_fake)
        torch.library.register_fake(f"unitsface::{bwd}")(bwd_fake)
    bwd_op = getattr(torch.ops.unitsface, bwd)

    def _backward(ctx, grad_rows, *_):
        return backward(bwd_op, ctx, grad_rows)

    torch.library.register_autograd(f"unitsface::{fwd}", _backward, setup_context=setup)


uss_fwd_triton.register_fake(uss_fwd_fake)
uss_bwd_triton.register_fake(uss_bwd_fake)
unitsface_fwd_triton.register_fake(unitsface_fwd_fake)
unitsface_bwd_triton.register_fake(unitsface_bwd_fake)
register_family("uss", "uss_fwd_triton", "uss_bwd_triton", fakes=False)
register_family("unitsface", "unitsface_fwd_triton", "unitsface_bwd_triton", fakes=False)


FORWARD_VARIANTS: dict = {}
"""(family, backend) → a callable taking the forward op's arguments and returning its outputs
first (possibly followed by more): a backend's faster forward, e.g. native's fused
``unitsface_fwd_g`` for CPU training steps (registered by unitsface_kernels.native)."""


def forward_op(family: str, backend: str):
    """The forward op of a fused backend: `<family>_fwd_triton` or the native `<family>_fwd`
    (or the backend's registered variant of it, see FORWARD_VARIANTS)."""
    variant = FORWARD_VARIANTS.get((family, backend))
    if variant is not None:
        return variant
    return getattr(torch.ops.unitsface, f"{family}_fwd_triton" if backend == "triton"
                   else f"{family}_fwd")
