"""Operand loads of the fused kernels and the dtypes they are read and written in
(docs/design.md §2, §4).

Reference rows of another 16/32-bit dtype than x (fp32 master weights, a half bank) are read
as x's dtype by rounding after the load, in registers: no host copy exists. Reference rows
marked invalid are loaded as zeros with a norm of 1 (:func:`ref_rows_ok`, :func:`inv_norm_of`):
whatever they hold reaches nothing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .maths import inv_norm

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
"""The Triton dtype of each torch dtype the kernels read."""


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly (triton 3.8: errors of 1e10), so
    there bf16 tiles are widened to fp32 before the dot; compiled kernels keep bf16. The
    interpreter also converts fp32 to bf16 by truncation (GPUs round to nearest), so there
    the kernels write bf16 outputs into fp32 buffers that the host rounds (:func:`out_dtype`)."""
    return dtype == torch.bfloat16 and interpreting()


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a buffer that a kernel writes a `dtype` result into: `dtype` itself,
    except under :func:`upcast_tiles` (fp32, cast by the host with rounding to nearest)."""
    return torch.float32 if upcast_tiles(dtype) else dtype


@triton.jit
def round_bf16(v):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32; NaN stays NaN.
    Under the interpreter only (:func:`upcast_tiles`), whose own conversion truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def as_operand(t, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile as x's dtype XT reads it: reference rows of another 16/32-bit dtype
    are rounded to XT after the load (docs/design.md §4). UPCAST (bf16 under the
    interpreter): fp32 holding the bf16 values, rounded to nearest even as the GPU's
    conversion does."""
    if UPCAST:
        if t.dtype == tl.bfloat16:
            return t.to(tl.float32)
        return round_bf16(t.to(tl.float32))
    return t.to(XT)


@triton.jit
def to_store(v, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A computed tile rounded to XT for a buffer of :func:`out_dtype` (under UPCAST: fp32
    holding bf16 values, rounded to nearest even)."""
    if UPCAST:
        return round_bf16(v.to(tl.float32))
    return v.to(XT)


@triton.jit
def rows_chunk(ptr, ids, ok, D, k0, BK: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """Features [k0, k0 + BK) of rows `ids` of a row-major matrix with D columns (zero past D
    and where not `ok`), as x's dtype XT reads them (:func:`as_operand`)."""
    offs = k0 + tl.arange(0, BK)
    t = tl.load(ptr + ids[:, None].to(tl.int64) * D + offs[None, :],
                mask=ok[:, None] & (offs[None, :] < D), other=0.0)
    return as_operand(t, XT, UPCAST)


@triton.jit
def ref_rows_ok(valid_ptr, ids, in_range, HAS_VALID: tl.constexpr):
    """Which reference rows `ids` are read: in range and, with a validity mask, marked valid.
    Rows outside are loaded as zeros with a norm of 1 (:func:`inv_norm_of`), so an invalid
    row contributes nothing, whatever it holds (docs/design.md §5)."""
    if HAS_VALID:
        return in_range & (tl.load(valid_ptr + ids, mask=in_range, other=0) != 0)
    return in_range


@triton.jit
def inv_norm_of(norm_ptr, offs, ok, eps):
    """1 / max(‖t‖, eps) of the rows at `offs` of a norms vector; 1 where not `ok`."""
    return inv_norm(tl.load(norm_ptr + offs, mask=ok, other=1.0), eps)


@triton.jit
def row_block(nx_ptr, y_ptr, rows, B, eps):
    """(rows in range, 1/max(‖x_i‖, eps), labels y_i (−1 for padding)) of a block of rows."""
    row_ok = rows < B
    return (row_ok, inv_norm_of(nx_ptr, rows, row_ok, eps),
            tl.load(y_ptr + rows, mask=row_ok, other=-1))


@triton.jit
def unit_rows(t, inv):
    """The rows of a tile at their F.normalize length (t·inv), in the tile's dtype. The
    gradient products take their normalisation here, on the operand tile (|t̂| ≤ 1), rather
    than on the gradient weights: g/max(‖t‖, eps) reaches 64·1e5 for a row below the eps,
    past float16's range."""
    return (t.to(inv.dtype) * inv[:, None]).to(t.dtype)
