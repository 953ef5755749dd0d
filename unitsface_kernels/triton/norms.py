"""Row norms ||t_i|| in one small pass; the loss kernels turn them into 1/max(||t_i||, eps)
and never write a normalised copy of x, W or the bank. With an index, only the rows t[idx_j]
are read (partial FC touches the sampled rows alone). With `as_dtype`, the norms are those of
the rows rounded to that dtype (reference rows that the loss kernels read in x's dtype,
docs/design.md §3), rounded in registers: no copy of t is made."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .loads import TL_DTYPES, as_operand, upcast_tiles


@triton.jit
def _row_norms_kernel(t_ptr, idx_ptr, out_ptr, n_rows, D, HAS_INDEX: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, XT: tl.constexpr,
                      UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ids = tl.load(idx_ptr + rows, mask=rows < n_rows, other=0) if HAS_INDEX else rows
    acc = tl.zeros((BLOCK_R,), dtype=out_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < n_rows) & (offs[None, :] < D)
        v = tl.load(t_ptr + ids[:, None].to(tl.int64) * D + offs[None, :], mask=mask, other=0.0)
        v = as_operand(v, XT, UPCAST).to(out_ptr.dtype.element_ty)
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(acc), mask=rows < n_rows)


def row_norms(t: torch.Tensor, index: torch.Tensor | None = None,
              as_dtype: torch.dtype | None = None) -> torch.Tensor:
    """||t_i|| (or ||t[index_j]||) of a contiguous (n × D) matrix, in fp32 (fp64 for fp64),
    of the rows rounded to `as_dtype` (t's own dtype by default)."""
    d = t.shape[1]
    n = t.shape[0] if index is None else index.shape[0]
    as_dtype = as_dtype or t.dtype
    out = torch.empty(n, device=t.device,
                      dtype=torch.float64 if as_dtype == torch.float64 else torch.float32)
    block_r = 32
    block_d = min(256, max(16, triton.next_power_of_2(d)))
    _row_norms_kernel[(triton.cdiv(n, block_r),)](
        t, index if index is not None else out, out, n, d, HAS_INDEX=index is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, XT=TL_DTYPES[as_dtype],
        UPCAST=upcast_tiles(as_dtype))
    return out
