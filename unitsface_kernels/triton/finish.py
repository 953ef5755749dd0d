"""Finishing of the fused kernels' partial results (docs/design.md §2): three small kernels
over O(B·D + tiles·B) numbers, one launch each where torch needed a few dozen operations
(each its own launch, on the step's critical path at the headline: 2 µs or more apiece).

``_merge_kernel`` — the per-row statistics from the per-(column tile, row) partials
    fpart[slot, k, i] of the cosine kernel's forward, merged across the slots in slot order
    (deterministic): the softmax's lse_i by the online rule
        (M, S) ⊕ (m, s) = (M', S·e^{M − M'} + s·e^{m − M'}),  M' = max(M, m),
    lse = M + log S (−∞ for an empty set, S = 0), the target logit and the pairs USS terms
    by plain sums, the lse USS form's A_i and B_i by the same merge, then its loss and
    factors (uss_terms.uss_lse_terms), and the per-row loss.
``_tangent_kernel`` — ∂x's normalisation from the split-K slices of the ∂x product:
        G_i = Σ_s part[s, i],  out_i = go_i·[(G_i − (x̂_i·G_i)·x̂_i)/max(‖x_i‖, eps) + extra_i]
    (no projection when ‖x_i‖ < eps). The projection h_i = x̂_i·G_i is taken from G itself, its
    exact value: it then removes exactly G's own radial part, rounding included (with h summed
    apart in fp32, the rounding of G's radial part, e.g. from half-precision g tiles, would
    stay in the result and dominate it where the gradient is nearly radial).
``_unit_rows_kernel`` — x̂'_i = go_i·x_i/max(‖x_i‖, eps) in x's dtype, the ∂R product's
    operand.

NaN propagates as in torch (docs/design.md §5): a NaN partial reaches its row's sums and
its merged lse through e^{m − M'}·s; a NaN norm reaches every output of its row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layouts import UnitsfaceStat
from .loads import TL_DTYPES, interpreting, out_dtype, to_store, upcast_tiles
from .maths import NEG_BIG, clamp_min, inv_norm
from .uss_terms import uss_lse_terms

# The cosine kernel's forward partials fpart[slot, k, i] (fused.py), k: the softmax's max
# and sum-exp of z over the slot's columns and the target logit (W programs); the USS part
# (bank programs) from k = 3: pairs Σ softplus and Σ_j g'_ij (with the forward's row
# gradients), or the lse form's (max⁺, sum-exp⁺, max⁻, sum-exp⁻).
N_FP = 7
_N_FP = tl.constexpr(N_FP)
_FP_MAX, _FP_SUMEXP, _FP_TARGET, _FP_USS, _FP_GSUM = (tl.constexpr(k) for k in range(5))
# The objective's stats rows that the merge writes (layouts.UnitsfaceStat; the USS family's
# are layouts.UssStat, rows 0–3).
_ST_LSE, _ST_USS, _ST_TARGET, _ST_USS_LOSS = (tl.constexpr(int(r)) for r in (
    UnitsfaceStat.LSE, UnitsfaceStat.USS_A, UnitsfaceStat.TARGET, UnitsfaceStat.USS_LOSS))

# The merge: 8 rows per program (a slot's partials of them are one 32-byte sector; B = 512
# gives 64 programs), 256 slots per step of its loops (each step waits on its loads: few
# steps, 4 per loop at the headline's 782 column tiles).
_MERGE_ROWS = 8
_MERGE_SLOTS = 256


@triton.jit
def _lse_merge(big_m, big_s, m, s):
    """(M, S) ⊕ the block's (m, s) [slots, rows], merged over its slots first. A NaN in m or
    s reaches S through the sum (tl.max may drop it, the exponentials keep it)."""
    mb = tl.max(m, axis=0)
    sb = tl.sum(s * tl.exp(m - mb[None, :]), axis=0)
    top = tl.where(mb > big_m, mb, big_m)
    return top, big_s * tl.exp(big_m - top) + sb * tl.exp(mb - top)


@triton.jit
def _lse_of(big_m, big_s):
    """logsumexp from the merged (M, S): −∞ for an empty set (S = 0, whose log is not taken),
    NaN stays NaN."""
    empty = big_s == 0.0
    return tl.where(empty, float("-inf"), big_m + tl.log(tl.where(empty, 1.0, big_s)))


@triton.jit
def _merge_kernel(fpart_ptr, stats_ptr, rows_ptr, db_ptr, n_tiles, B, scale, uss_w,
                  SOFTMAX: tl.constexpr, USS: tl.constexpr, LSE: tl.constexpr,
                  CLAMP: tl.constexpr, DB_ROWS: tl.constexpr, KP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """A program per block of rows. SOFTMAX (the objective; stats [7, B] in the rows of
    layouts.UnitsfaceStat, every row written): lse and the target logit over the n_tiles·KP
    slots (the W programs' KP sub-tiles of a column tile each a slot). Else the USS family:
    stats [4, B] (layouts.UssStat). USS: the USS part over each column tile's first slot
    (LSE: the lse form, else pairs, with DB_ROWS its Σ_j g'/−s); its statistics are zeros for
    pairs or without it. The per-row loss: (lse − target) + λ·USS."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    slots = tl.arange(0, BLOCK_T)
    acc_t = fpart_ptr.dtype.element_ty
    zero = tl.zeros((BLOCK_R,), acc_t)
    loss = zero
    if SOFTMAX:
        big_m = tl.full((BLOCK_R,), NEG_BIG, acc_t)
        big_s = zero
        tgt = zero
        for t0 in range(0, n_tiles * KP, BLOCK_T):
            sl = t0 + slots
            ok = (sl < n_tiles * KP)[:, None] & row_ok[None, :]
            at = fpart_ptr + sl[:, None].to(tl.int64) * (_N_FP * B) + rows[None, :]
            tgt += tl.sum(tl.load(at + _FP_TARGET * B, mask=ok, other=0.0), axis=0)
            big_m, big_s = _lse_merge(big_m, big_s,
                                      tl.load(at + _FP_MAX * B, mask=ok, other=NEG_BIG),
                                      tl.load(at + _FP_SUMEXP * B, mask=ok, other=0.0))
        lse = _lse_of(big_m, big_s)
        tl.store(stats_ptr + _ST_LSE * B + rows, lse, mask=row_ok)
        tl.store(stats_ptr + _ST_TARGET * B + rows, tgt, mask=row_ok)
        loss = lse - tgt
    uss = zero
    stats = (zero, zero, zero, zero)
    if USS:
        u0 = zero
        u1 = zero
        ma = tl.full((BLOCK_R,), NEG_BIG, acc_t)
        mb = tl.full((BLOCK_R,), NEG_BIG, acc_t)
        for t0 in range(0, n_tiles, BLOCK_T):
            sl = t0 + slots
            ok = (sl < n_tiles)[:, None] & row_ok[None, :]
            at = fpart_ptr + (sl * KP)[:, None].to(tl.int64) * (_N_FP * B) + rows[None, :]
            if LSE:  # (max⁺, sum-exp⁺, max⁻, sum-exp⁻) from k = 3 on
                ma, u0 = _lse_merge(ma, u0,
                                    tl.load(at + _FP_USS * B, mask=ok, other=NEG_BIG),
                                    tl.load(at + (_FP_USS + 1) * B, mask=ok, other=0.0))
                mb, u1 = _lse_merge(mb, u1,
                                    tl.load(at + (_FP_USS + 2) * B, mask=ok, other=NEG_BIG),
                                    tl.load(at + (_FP_USS + 3) * B, mask=ok, other=0.0))
            else:
                u0 += tl.sum(tl.load(at + _FP_USS * B, mask=ok, other=0.0), axis=0)
                if DB_ROWS:
                    u1 += tl.sum(tl.load(at + _FP_GSUM * B, mask=ok, other=0.0), axis=0)
        if LSE:
            a = _lse_of(ma, u0)
            bn = _lse_of(mb, u1)
            ta, fa = uss_lse_terms(a, scale, CLAMP)
            tb, fb = uss_lse_terms(bn, scale, CLAMP)
            uss = ta + tb
            stats = (a, fa, bn, fb)
        else:
            uss = u0
            if DB_ROWS:
                tl.store(db_ptr + rows, u1 / -scale, mask=row_ok)
        loss = loss + uss_w * uss
    first = _ST_USS if SOFTMAX else 0
    tl.store(stats_ptr + first * B + rows, stats[0], mask=row_ok)
    tl.store(stats_ptr + (first + 1) * B + rows, stats[1], mask=row_ok)
    tl.store(stats_ptr + (first + 2) * B + rows, stats[2], mask=row_ok)
    tl.store(stats_ptr + (first + 3) * B + rows, stats[3], mask=row_ok)
    if SOFTMAX:
        tl.store(stats_ptr + _ST_USS_LOSS * B + rows, uss, mask=row_ok)
    tl.store(rows_ptr + rows, loss, mask=row_ok)


def merge_partials(fpart: torch.Tensor, n_tiles: int, stats: torch.Tensor, *, uss: bool,
                   lse_form: bool, clamp: bool, scale: float, uss_weight: float = 1.0,
                   kp: int = 1, db_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row loss [B] from the forward partials fpart [n_tiles·kp, N_FP, B] (one
    launch), the statistics written into ``stats``: the objective's [7, B] (the rows of
    layouts.UnitsfaceStat, every row) or the USS family's [4, B] (layouts.UssStat). With
    ``db_rows`` [B]: the pairs USS part's row gradients of b, Σ_j g'_ij/−s."""
    b = fpart.shape[2]
    rows = torch.empty(b, dtype=fpart.dtype, device=fpart.device)
    _merge_kernel[(triton.cdiv(b, _MERGE_ROWS),)](
        fpart, stats, rows, db_rows if db_rows is not None else rows, n_tiles, b, scale,
        uss_weight, SOFTMAX=stats.shape[0] == len(UnitsfaceStat), USS=uss, LSE=lse_form,
        CLAMP=clamp, DB_ROWS=db_rows is not None, KP=kp, BLOCK_R=_MERGE_ROWS,
        BLOCK_T=_MERGE_SLOTS)
    return rows


@triton.jit
def _slices(part_ptr, n_parts, rows, row_ok, feats, f_ok, B, D, BLOCK_P: tl.constexpr):
    """G_i = Σ_s part[s, i] over the features `feats` of the rows `rows` [BLOCK_R, BLOCK_D],
    the slices summed in order, BLOCK_P of them per load."""
    acc = tl.zeros((rows.shape[0], feats.shape[0]), part_ptr.dtype.element_ty)
    sl = tl.arange(0, BLOCK_P)
    for s0 in range(0, n_parts, BLOCK_P):
        s = s0 + sl
        ptrs = part_ptr + ((s[:, None, None].to(tl.int64) * B + rows[None, :, None]) * D
                           + feats[None, None, :])
        ok = (s < n_parts)[:, None, None] & row_ok[None, :, None] & f_ok[None, None, :]
        acc += tl.sum(tl.load(ptrs, mask=ok, other=0.0), axis=0)
    return acc


@triton.jit
def _feature_step(part_ptr, n_parts, x_ptr, rows, row_ok, d0, B, D, acc_t: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Features [d0, d0 + BLOCK_D) of the rows: their offsets and mask in a B × D matrix, x
    there in acc_t, and G there (:func:`_slices`); both passes of _tangent_kernel read them."""
    feats = d0 + tl.arange(0, BLOCK_D)
    f_ok = feats < D
    at = rows[:, None] * D + feats[None, :]
    ok = row_ok[:, None] & f_ok[None, :]
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(acc_t)
    return at, ok, x, _slices(part_ptr, n_parts, rows, row_ok, feats, f_ok, B, D, BLOCK_P)


@triton.jit
def _tangent_kernel(part_ptr, n_parts, x_ptr, nx_ptr, go_ptr, extra_ptr, dx_ptr, B, D, eps,
                    HAS_GO: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, XT: tl.constexpr,
                    UPCAST: tl.constexpr):
    """A program per block of rows: h_i = x_i·G_i (pass one), then out_i (pass two, G summed
    again in the same order: the same values)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    acc_t = part_ptr.dtype.element_ty
    n = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
    inv = inv_norm(n, eps)
    hv = tl.zeros((BLOCK_R, BLOCK_D), acc_t)
    for d0 in range(0, D, BLOCK_D):
        _, _, x, g = _feature_step(part_ptr, n_parts, x_ptr, rows, row_ok, d0, B, D, acc_t,
                                   BLOCK_P, BLOCK_D)
        hv += g * x
    # (a NaN norm fails the comparison: no projection, and inv keeps the NaN)
    proj = tl.where(n >= eps, tl.sum(hv, axis=1) * inv, 0.0) * inv
    if HAS_GO:
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        at, ok, x, g = _feature_step(part_ptr, n_parts, x_ptr, rows, row_ok, d0, B, D, acc_t,
                                     BLOCK_P, BLOCK_D)
        v = inv[:, None] * (g - proj[:, None] * x)
        if HAS_EXTRA:
            v += tl.load(extra_ptr + at, mask=ok, other=0.0)
        if HAS_GO:
            v = go[:, None] * v
        tl.store(dx_ptr + at, to_store(v, XT, UPCAST), mask=ok)


def tangent_blocks(n_parts: int, d: int) -> dict:
    """_tangent_kernel's blocks: on a GPU a row per program (B programs; the slices of a
    feature block in one load); under the interpreter, which runs programs one after the
    other in Python, 8 rows per program."""
    return dict(BLOCK_R=8 if interpreting() else 1,
                BLOCK_P=min(16, triton.next_power_of_2(n_parts)),
                BLOCK_D=min(512, max(16, triton.next_power_of_2(d))))


def tangent_grad(part: torch.Tensor, x: torch.Tensor, nx: torch.Tensor, eps: float, *,
                 go: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """go_i·[(G_i − (x̂_i·G_i)·x̂_i)/max(‖x_i‖, eps) + extra_i] [B, D] with G = Σ_s part[s]
    (the split-K slices [splits, B, D] of a ∂x product), in ``dtype`` (part's by default);
    no projection where ‖x_i‖ < eps (eps: the options' normalisation eps). One launch."""
    n_parts, b, d = part.shape
    dtype = dtype or part.dtype
    out = torch.empty(b, d, dtype=out_dtype(dtype), device=part.device)
    blocks = tangent_blocks(n_parts, d)
    _tangent_kernel[(triton.cdiv(b, blocks["BLOCK_R"]),)](
        part, n_parts, x, nx, go if go is not None else nx,
        extra if extra is not None else part, out, b, d, eps, HAS_GO=go is not None,
        HAS_EXTRA=extra is not None, XT=TL_DTYPES[dtype], UPCAST=upcast_tiles(dtype),
        **blocks)
    return out.to(dtype)


@triton.jit
def _unit_rows_kernel(x_ptr, nx_ptr, go_ptr, xg_ptr, B, D, eps, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A program per block of rows: each row scaled by go_i / max(‖x_i‖, eps)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    acc_t = nx_ptr.dtype.element_ty
    f = tl.load(go_ptr + rows, mask=row_ok, other=0.0) / clamp_min(
        tl.load(nx_ptr + rows, mask=row_ok, other=1.0), eps)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (feats < D)[None, :]
        at = rows[:, None].to(tl.int64) * D + feats[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(acc_t)
        tl.store(xg_ptr + at, to_store(x * f[:, None], XT, UPCAST), mask=ok)


def go_unit_rows(x: torch.Tensor, go: torch.Tensor, nx: torch.Tensor, eps: float):
    """x̂' = go_i·x_i / max(‖x_i‖, eps) in x's dtype: the ∂R product's operand, made once per
    backward (one launch)."""
    b, d = x.shape
    out = torch.empty(b, d, dtype=out_dtype(x.dtype), device=x.device)
    blocks = unit_rows_blocks(d)
    _unit_rows_kernel[(triton.cdiv(b, blocks["BLOCK_R"]),)](
        x, nx, go, out, b, d, eps, XT=TL_DTYPES[x.dtype], UPCAST=upcast_tiles(x.dtype),
        **blocks)
    return out.to(x.dtype)


def unit_rows_blocks(d: int) -> dict:
    """_unit_rows_kernel's blocks: 8 rows per program, up to 256 features per step."""
    return dict(BLOCK_R=8, BLOCK_D=min(256, max(16, triton.next_power_of_2(d))))
