"""The GEMM-shaped Triton engine (docs/design.md §2): the USS family (§1.1), the partial-FC
margin softmax and the UniTSFace objective (§1.2–§1.3) as three kernels with the loss as
their epilogue.

Columns are reference rows: the classes of the index S (all classes, or the partial-FC
sample) for the softmax and the objective — column j is class c = S_j, whose rows W[c] and
bank[c] the kernels read in place through the index (no gathered copy of W; only sampled rows
are touched) — or the USS family's reference rows (a memory bank, class centres, the batch
itself), column j with its own label l_j. Rows of another dtype than x are rounded to x's
dtype after the load: no host copy. Three kernels:

``_cos_kernel`` — the cosine tiles. A program is one (row block, column tile) against ONE
    reference matrix: W (the margin softmax) or the bank / USS reference rows (λ·USS), both
    kinds in one launch, the row blocks of a column tile next to each other (its W and bank
    tiles stay in L2 while every row block reads them). A pipelined K loop over D, then the
    loss as the epilogue: forward — per (column tile, row) partials (the softmax's max /
    sum-exp / target logit, USS sums), merged across tiles afterwards in a fixed order (no
    atomics); backward — the gradient tile g = ∂L/∂cos from the merged statistics, stored in
    x's dtype into a B × chunk buffer, with its per-row (Σ_j g) and per-column
    (Σ_i go·g·cos, Σ_i go·g) partials. The same tiles' epilogues can run from persistent
    programs (K = 1, one launch per matrix; FusedConfig.persistent): ``_cos_stream_kernel``
    (a flat loop over (tile, K step), the next tile's loads during an epilogue) or
    ``_cos_resident_kernel`` (FusedConfig.resident: the x row block loaded once and kept in
    shared memory while 32-column reference tiles stream past it).
``_dw_kernel`` — ∂R = g̃ᵀ·x̂' per chunk for the reference rows with a gradient (W, or the
    USS family's ref: M = columns, N = features, K = rows), the normalisation's projection as
    its epilogue; each compact row of ∂R is written once. With the resident cosine programs
    and B ≤ 512, ``_dw_resident_kernel`` instead (Plan.dw_resident: persistent programs that
    keep a block of x̂' — all rows × 128 features — in shared memory while the g̃ column
    tiles stream past it, the same epilogue).
``_dx_kernel`` — ∂x += g̃·R per chunk (M = rows, N = features, K = the chunk's columns), cut
    into split-K slices whose fp32 partial sums carry over from chunk to chunk in program
    order (each slice adds to its own buffer); the slices are summed once at the end.

The margin family (docs/design.md §1.5) lives in the W programs' epilogue, each of its
settings a constexpr (:func:`margin_flags`), so CosFace/ArcFace compile as without it: the
target's per-row margins and AdaFace's angle clip read per-row terms made once per call
(margin_softmax.row_terms: no trigonometric function in a kernel), the curricular negatives
and the inter-class filter are selects on the tile (margin_softmax.py). K sub-centres per
class: a class tile's W programs are KP = K rounded up to a power of two, one per sub-tile of
BLOCK_N / KP classes, each one GEMM over the slots (sub-centre r, class) then the class
maximum and its first arg-max reduced in registers (:func:`_sub_centre_part`); the backward
writes g to the arg-max slot's column of a g buffer with K columns per class (zeros in the
others), so the two products run unchanged over the |S|·K sub-centre rows
(:meth:`Sweep.sub_centre_rows`). The bank programs stay one per column tile (one bank row per
class).

g̃ is g scaled by the reference rows' inverse norms (g_ij / max(‖r_j‖, eps)), so that both
products read raw rows: ∂x_i = Σ_j g̃_ij r_j is Σ_j g_ij r̂_j, and in ∂R the factor is the
output row's. In fp16 that scaling could overflow (1/eps ≥ 1e5), so there g stays unscaled
and the ∂x product normalises its operand tiles instead (loads.unit_rows); ∂R's epilogue takes
the factor. x̂' = go_i·x̂_i is a B × D operand made once per backward.

The settings reach the kernels as scalar arguments (:func:`kernel_scalars`: no device copy,
no host synchronisation), the normalisation eps among them. The host functions of the two op
families (:func:`fused_forward` / :func:`fused_backward` here, uss_loss.py) describe a call
as a :class:`Sweep` and run it chunk by chunk; docs/design.md §2 lists each form's launches
and GEMM-equivalents. A chunk holds as many columns as keep its gradient tiles (B × chunk in
x's dtype) within FusedConfig.chunk_bytes (L2-resident); the launches per chunk are fixed, so
a step costs O(1) launches per chunk and no block of B × |S|. Everything is summed in a fixed
order: the results are bitwise reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..layouts import USS_STATS, UnitsfaceStat
from ..options import UnitsfaceOptions, UssOptions
from ..reference import class_row_ids
from .config import Plan, check_dtype, plan
from .finish import N_FP, go_unit_rows, merge_partials, tangent_grad
from .loads import (TL_DTYPES, as_operand, inv_norm_of, out_dtype, ref_rows_ok, row_block,
                    rows_chunk, to_store, unit_rows, upcast_tiles)
from .margin_softmax import (clamp_cos, curricular_rows, needs_row_terms, row_margins,
                             row_terms, softmax_grad, softmax_grad_p, softmax_logits,
                             target_cos)
from .maths import NEG_BIG, clamp, inv_norm, mma, scaled_cos, softplus_sigmoid
from .norms import row_norms
from .uss_terms import uss_grad, uss_pairs_grad_signed, uss_row_stats, uss_terms

__all__ = ["fused_forward", "fused_backward", "plan", "Sweep", "kernel_scalars", "margin_flags"]

# The objective's per-row statistics are the rows of layouts.UnitsfaceStat (stats [7, B]):
# the kernels read the softmax's lse and the USS part's four; the target logit and the USS
# loss serve class-parallel training.
# The forward's per-(column tile, row) partials fpart[slot, k, i] are laid out as
# finish.py's merge reads them (N_FP rows of B per slot, in the order described there).
# With K sub-centres, KP slots per column tile: fpart[tile·KP + part] (the W programs'
# sub-tiles; the bank programs' rows in the first).
_N_FP = tl.constexpr(N_FP)
# The backward's per-(column tile, row) partials gsum[tile, i] = Σ_j g'_ij (bank: a scalar
# threshold's ∂b), and per-(row block, column) partials cpart[block, k, j]: Σ_i go_i·g_ij·cos_ij
# (the rows with a gradient: ∂R's projection), Σ_i go_i·g'_ij (bank: ∂b_j). ∂x's projection
# needs none: it is taken from the ∂x product itself (finish.tangent_grad).
CP_HW, CP_GSUM = 0, 1
N_CP = 2
_N_CP = tl.constexpr(N_CP)


@triton.jit
def _dots(x_ptr, rows, row_ok, r_ptr, ids, ok, D, acc, BK: tl.constexpr, XT: tl.constexpr,
          UPCAST: tl.constexpr):
    """acc + the raw dot products x_i · r[ids_j] (rows not `ok` read as zeros): the K loop
    over D in BK-wide steps, software-pipelined by the compiler (num_stages)."""
    for k0 in range(0, D, BK):
        xk = rows_chunk(x_ptr, rows, row_ok, D, k0, BK, XT, UPCAST)
        rk = rows_chunk(r_ptr, ids, ok, D, k0, BK, XT, UPCAST)
        acc = mma(xk, tl.trans(rk), acc)
    return acc


@triton.jit
def _store_g(g_ptr, g, inv_r, rows, local, row_ok, col_ok, g_stride, XT: tl.constexpr,
             SCALE_G: tl.constexpr, UPCAST: tl.constexpr):
    """g (or g̃ = g/max(‖r_j‖, eps), SCALE_G) into the chunk's B × chunk buffer, in XT."""
    if SCALE_G:
        g = g * inv_r[None, :]
    tl.store(g_ptr + rows[:, None] * g_stride + local[None, :], to_store(g, XT, UPCAST),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _col_h(colp_ptr, g, cos, go, rb, S, cols, col_ok):
    """Σ_i go_i·g_ij·cos_ij of the row block (cpart's CP_HW: ∂R's projection)."""
    tl.store(colp_ptr + rb * (_N_CP * S) + cols, tl.sum(g * cos * go[:, None], axis=0),
             mask=col_ok)


@triton.jit
def _first_max(v, sub, KP: tl.constexpr):
    """(max, first arg-max) over the middle axis of v [M, KP, N] (sub [1, KP, 1]: its index):
    as reference.class_cosines, a NaN is the maximum (the first NaN), the lower index wins
    ties. Standard reductions only (tl.max alone would drop a NaN)."""
    nan = v != v
    has_nan = tl.sum(nan.to(tl.int32), axis=1) > 0
    top = tl.max(tl.where(nan, float("-inf"), v), axis=1)
    at = tl.where(has_nan[:, None, :], nan, v == top[:, None, :])
    return (tl.where(has_nan, float("nan"), top),
            tl.min(tl.where(at, sub, KP), axis=1))


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The column halves [0, BLOCK_N/2) and [BLOCK_N/2, BLOCK_N) of a tile t [BLOCK_M,
    BLOCK_N] (in the wgmma accumulator's layout both lie in every thread: no data moves)."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


PARTS = tl.constexpr(4)
"""The epilogues' unit of work (issue 24): a quarter of a column tile (:func:`_part`), in the
cosine kernel's epilogues and ∂x's carried sums. On a whole 128 × 128 tile at once, an
epilogue's fp32 tiles, masks and per-column terms outgrew 255 registers and spilled; on a
quarter, each of them holds a quarter of that. In the wgmma accumulator's layout (2-byte
dtypes) a quarter lies in every thread, so taking it moves no data (in the fp32 FMA tiles'
layout it does)."""


@triton.jit
def _part(t, k: tl.constexpr, N_PARTS: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Columns [k·BLOCK_N/N_PARTS, (k + 1)·BLOCK_N/N_PARTS) of a tile t [BLOCK_M, BLOCK_N],
    N_PARTS 1, 2 or 4 (:func:`_halves`, of a half for quarters: no data moves)."""
    if N_PARTS == 1:
        out = t
    else:
        h0, h1 = _halves(t, BLOCK_M, BLOCK_N)
        half = h0 if k < N_PARTS // 2 else h1
        if N_PARTS == 2:
            out = half
        else:
            q0, q1 = _halves(half, BLOCK_M, BLOCK_N // 2)
            out = q0 if k % 2 == 0 else q1
    return out


@triton.jit
def _backward_rows(lse_ptr, go_ptr, rows, row_ok, COL_H: tl.constexpr):
    """(lse_i, go_i) of a row block, the W programs' backward inputs: go only where ∂R's
    projection sums read it (COL_H; else lse stands in, unread)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    if COL_H:
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    else:
        go = lse
    return lse, go


@triton.jit
def _sub_centre_part(x_ptr, w_ptr, nw_ptr, idx_ptr, go_ptr, lse_ptr, rt_ptr, rowp_ptr,
                     colp_ptr, g_ptr, rows, row_ok, inv_x, y, tile, part, col0, n_cols, B, S,
                     D, gtile, rb, g_stride, scale, m3, cos_m2, sin_m2, mm, tau, eps,
                     BACKWARD: tl.constexpr, STORE_G: tl.constexpr, COL_H: tl.constexpr,
                     HAS_INDEX: tl.constexpr, ARC: tl.constexpr, ST: tl.constexpr,
                     EASY: tl.constexpr, ROW_MARGINS: tl.constexpr, NO_FALLBACK: tl.constexpr,
                     ANGLE_CLIP: tl.constexpr, CURRICULAR: tl.constexpr, FILTER: tl.constexpr,
                     K: tl.constexpr, KP: tl.constexpr, SCALE_G: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
                     XT: tl.constexpr, UPCAST: tl.constexpr):
    """A W program with K > 1 sub-centres per class: sub-tile `part` (of KP, K rounded up to
    a power of two) of the class tile, its CN = BLOCK_N / KP classes as one BLOCK_M × BLOCK_N
    GEMM over the slots (sub-centre r, class) — slot r·CN + c: row cls_c·K + r of W, norm
    nw[j·K + r]; the slots r ≥ K are empty, −inf — then the class cosine, their maximum, and
    its first arg-max (:func:`_first_max`, a NaN row is the maximum) as a reduction over each
    class's KP slots (in-thread: a wgmma accumulator thread holds columns c and c + CN), the
    epilogue on the class tile (forward: its statistics into fpart's slot gtile·KP + part;
    backward: g goes to the arg-max slot, column j·K + r of the g buffer of width K·chunk,
    zeros in the others). One accumulator, as for K = 1. The backward's epilogue runs a
    quarter of the class tile at a time, after the rows' target cosines, as
    :func:`_softmax_part`'s does."""
    CN: tl.constexpr = BLOCK_N // KP
    tl.static_assert(BLOCK_N >= KP, "more sub-centres per class than columns in a class tile")
    slot = tl.arange(0, BLOCK_N)
    r = slot // CN
    first = tile * BLOCK_N + part * CN  # the sub-tile's first class, chunk-local
    local_s = first + slot % CN
    ok_s = (local_s < n_cols) & (r < K)
    if HAS_INDEX:
        cls_s = tl.load(idx_ptr + col0 + local_s, mask=ok_s, other=-1).to(tl.int32)
    else:
        cls_s = tl.where(ok_s, col0 + local_s, -1)
    sub_col = (col0 + local_s) * K + r  # the slot's sub-centre column of S
    cos = scaled_cos(_dots(x_ptr, rows, row_ok, w_ptr, cls_s * K + r, ok_s, D,
                           tl.zeros((BLOCK_M, BLOCK_N), inv_x.dtype), BK, XT, UPCAST),
                     inv_x, inv_norm_of(nw_ptr, sub_col, ok_s, eps))
    cos = tl.where((r < K)[None, :], cos, float("-inf"))
    sub_r = tl.arange(0, KP)[None, :, None]
    best, arg = _first_max(tl.reshape(cos, (BLOCK_M, KP, CN)), sub_r, KP)
    _, col_ok, cls = _columns(first + tl.arange(0, CN), col0, n_cols, idx_ptr, HAS_INDEX)
    d, cos_a, sin_a, a_sin_a, lo, hi = row_margins(rt_ptr, rows, row_ok, B, m3, cos_m2, sin_m2,
                                                   mm, ROW_MARGINS, ANGLE_CLIP)
    hard, t = curricular_rows(rt_ptr, rows, row_ok, B, CURRICULAR)
    is_target = (y[:, None] == cls[None, :]) & col_ok[None, :]
    c_t = target_cos(best, is_target, ANGLE_CLIP)
    if not BACKWARD:
        _, z, z_t = softmax_logits(best, is_target, c_t, scale, d, cos_a, sin_a, a_sin_a, lo,
                                   hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP,
                                   CURRICULAR, FILTER)
        _softmax_partials(rowp_ptr, z, z_t, is_target, col_ok, rows, row_ok,
                          gtile * KP + part, B)
    else:
        lse, go = _backward_rows(lse_ptr, go_ptr, rows, row_ok, COL_H)
        N_PARTS: tl.constexpr = PARTS if CN >= PARTS else CN  # (fewer: K > BLOCK_N / 4)
        PN: tl.constexpr = CN // N_PARTS
        for k in tl.static_range(N_PARTS):
            best_q = _part(best, k, N_PARTS, BLOCK_M, CN)
            arg_q = _part(arg, k, N_PARTS, BLOCK_M, CN)
            local = first + k * PN + tl.arange(0, PN)
            _, col_ok_q, cls_q = _columns(local, col0, n_cols, idx_ptr, HAS_INDEX)
            is_target_q = (y[:, None] == cls_q[None, :]) & col_ok_q[None, :]
            c, z, _ = softmax_logits(best_q, is_target_q, c_t, scale, d, cos_a, sin_a, a_sin_a,
                                     lo, hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK,
                                     ANGLE_CLIP, CURRICULAR, FILTER)
            g = softmax_grad(best_q, c, c_t, z, is_target_q,
                             row_ok[:, None] & col_ok_q[None, :], lse, scale, cos_a, sin_a, lo,
                             hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP,
                             CURRICULAR, FILTER)
            # each sub-centre's slots on the class columns (column j·K + r of the g buffer),
            # not gathered back into a slot tile (two more BLOCK_M × BLOCK_N tiles)
            for r_k in tl.static_range(K):
                hit = arg_q == r_k
                sub_col_k = (col0 + local) * K + r_k
                if COL_H:  # (g·cos on the arg-max slot only: 0·NaN elsewhere would be NaN)
                    tl.store(colp_ptr + rb * (_N_CP * S) + sub_col_k,
                             tl.sum(tl.where(hit, g * best_q, 0.0) * go[:, None], axis=0),
                             mask=col_ok_q)
                if STORE_G:
                    _store_g(g_ptr, tl.where(hit, g, 0.0),
                             inv_norm_of(nw_ptr, sub_col_k, col_ok_q, eps), rows,
                             local * K + r_k, row_ok, col_ok_q, g_stride * K, XT, SCALE_G,
                             UPCAST)


@triton.jit
def _softmax_partials(rowp_ptr, z, z_t, is_target, col_ok, rows, row_ok, slot, B):
    """The forward's partials of a class tile into fpart[slot]: per row the max and sum-exp
    of z over the tile's columns, and the target logit where the row's target lies in it."""
    zm = tl.where(col_ok[None, :], z, NEG_BIG)
    m = tl.max(zm, axis=1)
    se = tl.sum(tl.where(col_ok[None, :], tl.exp(zm - m[:, None]), 0.0), axis=1)
    _store_partials(rowp_ptr, m, se, z_t, tl.sum(is_target.to(tl.int32), axis=1) > 0, rows,
                    row_ok, slot, B)


@triton.jit
def _softmax_kept(dots, nw_ptr, idx_ptr, rowp_ptr, e_ptr, er_ptr, rows, row_ok, inv_x, y,
                  c_t, d, cos_a, sin_a, a_sin_a, lo, hi, hard, t, B, S, tile, col0,
                  n_cols, slot, scale, tau, eps, HAS_INDEX: tl.constexpr, ARC: tl.constexpr,
                  ST: tl.constexpr, EASY: tl.constexpr, NO_FALLBACK: tl.constexpr,
                  ANGLE_CLIP: tl.constexpr, CURRICULAR: tl.constexpr, FILTER: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, XT: tl.constexpr,
                  UPCAST: tl.constexpr):
    """:func:`_softmax_partials` of a W tile that also keeps its exponentials (STORE_E), a
    group of GW columns at a time (32: a quarter of a 128-column tile, which in the
    accumulator's layout moves no data; the whole tile when narrower), each group's cosines
    and logits taken from the dots as the backward's quarters take them
    (:func:`_class_cols`): e'_ij = exp(z_ij − m_ig) into exps [B, S] (e_ptr, at the
    columns of S) and the group's max m_ig into exp_rows [G + 1, B] (er_ptr; group g =
    column // GW), the tile's max and sum-exp merged from the groups' (one exponential per
    element, as without), and the rows' raw target cosines (the backward's clamp rule reads
    them) into exp_rows' last row where the tile holds the target. On the whole tile, z
    beside the stores' addresses spilled at 255 registers, and so did the target's
    reductions over the whole tile beside the dots."""
    NP: tl.constexpr = BLOCK_N // 32 if BLOCK_N > 32 else 1
    GW: tl.constexpr = BLOCK_N // NP
    tl.static_assert(NP <= PARTS, "stored exponentials: cosine tiles of at most 128 columns")
    m = tl.full((BLOCK_M,), NEG_BIG, dots.dtype)
    se = tl.zeros((BLOCK_M,), dots.dtype)
    z_t = se
    cos_t = se
    n_t = tl.zeros((BLOCK_M,), tl.int32)
    for k in tl.static_range(NP):
        local = tile * BLOCK_N + k * GW + tl.arange(0, GW)
        cos, is_target, cols, col_ok = _class_cols(_part(dots, k, NP, BLOCK_M, BLOCK_N), local,
                                                   inv_x, y, col0, n_cols, idx_ptr, nw_ptr, eps,
                                                   HAS_INDEX)
        _, z, z_t = softmax_logits(cos, is_target, c_t, scale, d, cos_a, sin_a, a_sin_a, lo,
                                   hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP,
                                   CURRICULAR, FILTER)
        cos_t += tl.sum(tl.where(is_target, cos, 0.0), axis=1)
        n_t += tl.sum(is_target.to(tl.int32), axis=1)
        zq = tl.where(col_ok[None, :], z, NEG_BIG)
        mq = tl.max(zq, axis=1)
        e = tl.where(col_ok[None, :], tl.exp(zq - mq[:, None]), 0.0)
        tl.store(e_ptr + rows[:, None] * S + cols[None, :], to_store(e, XT, UPCAST),
                 mask=row_ok[:, None] & col_ok[None, :])
        if tile * BLOCK_N + k * GW < n_cols:
            tl.store(er_ptr + ((col0 + tile * BLOCK_N + k * GW) // GW) * B + rows, mq,
                     mask=row_ok)
        top = tl.maximum(m, mq)
        se = se * tl.exp(m - top) + tl.sum(e, axis=1) * tl.exp(mq - top)
        m = top
    tl.store(er_ptr + tl.cdiv(S, GW) * B + rows, cos_t, mask=row_ok & (n_t > 0))
    _store_partials(rowp_ptr, m, se, z_t, n_t > 0, rows, row_ok, slot, B)


@triton.jit
def _store_partials(rowp_ptr, m, se, z_t, has_t, rows, row_ok, slot, B):
    """fpart[slot]: the rows' max and sum-exp of z and their target logit (0 where has_t is
    false: the target lies in another tile)."""
    out = rowp_ptr + slot * (_N_FP * B) + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + B, se, mask=row_ok)
    tl.store(out + 2 * B, tl.where(has_t, z_t, 0.0), mask=row_ok)


@triton.jit
def _columns(local, col0, n_cols, idx_ptr, HAS_INDEX: tl.constexpr):
    """(cols, col_ok, cls) of the chunk-local columns `local`: their columns of S, whether they
    lie in the chunk, and their classes (through the index; −1 outside the chunk) in 32 bits
    (< C)."""
    col_ok = local < n_cols
    cols = col0 + local
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=col_ok, other=-1).to(tl.int32)
    else:
        cls = tl.where(col_ok, cols, -1)
    return cols, col_ok, cls


@triton.jit
def _class_cols(dots, local, inv_x, y, col0, n_cols, idx_ptr, nw_ptr, eps,
                HAS_INDEX: tl.constexpr):
    """(cos, is_target, cols, col_ok) of the chunk-local class columns `local` (a quarter of a
    class tile: :func:`_softmax_part`'s backward) from their raw dots, their classes and
    inverse norms read for them alone."""
    cols, col_ok, cls = _columns(local, col0, n_cols, idx_ptr, HAS_INDEX)
    cos = scaled_cos(dots, inv_x, inv_norm_of(nw_ptr, cols, col_ok, eps))
    return cos, (y[:, None] == cls[None, :]) & col_ok[None, :], cols, col_ok


@triton.jit
def _softmax_grad_cols(cos, is_target, c_t, d, cos_a, sin_a, a_sin_a, lo, hi, hard, t, lse, go,
                       nw_ptr, colp_ptr, g_ptr, rows, row_ok, local, cols, col_ok, rb, S,
                       g_stride, scale, tau, eps, STORE_G: tl.constexpr, COL_H: tl.constexpr,
                       ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                       NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                       CURRICULAR: tl.constexpr, FILTER: tl.constexpr, SCALE_G: tl.constexpr,
                       XT: tl.constexpr, UPCAST: tl.constexpr):
    """The W programs' backward on some columns of a class tile, from their raw cosines (the
    target's among them) and the rows' target cosines c_t: g = ∂L/∂cos from the saved lse,
    then :func:`_grad_cols_out`."""
    c, z, _ = softmax_logits(cos, is_target, c_t, scale, d, cos_a, sin_a, a_sin_a, lo, hi,
                             hard, t, tau, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP, CURRICULAR,
                             FILTER)
    g = softmax_grad(cos, c, c_t, z, is_target, row_ok[:, None] & col_ok[None, :], lse, scale,
                     cos_a, sin_a, lo, hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK,
                     ANGLE_CLIP, CURRICULAR, FILTER)
    _grad_cols_out(g, cos, go, nw_ptr, colp_ptr, g_ptr, rows, row_ok, local, cols, col_ok, rb,
                   S, g_stride, eps, STORE_G, COL_H, SCALE_G, XT, UPCAST)


@triton.jit
def _grad_cols_out(g, cos_h, go, nw_ptr, colp_ptr, g_ptr, rows, row_ok, local, cols, col_ok, rb,
                   S, g_stride, eps, STORE_G: tl.constexpr, COL_H: tl.constexpr,
                   SCALE_G: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """What the W programs' backward writes of some columns of a class tile from their
    g = ∂L/∂cos: Σ_i go_i·g_ij·cos_h_ij into cpart (COL_H; cos_h: the cosines as that sum
    reads them) and g̃ into the chunk's g buffer at chunk-local columns `local` (STORE_G)."""
    if COL_H:
        _col_h(colp_ptr, g, cos_h, go, rb, S, cols, col_ok)
    if STORE_G:
        _store_g(g_ptr, g, inv_norm_of(nw_ptr, cols, col_ok, eps), rows, local, row_ok,
                 col_ok, g_stride, XT, SCALE_G, UPCAST)


@triton.jit
def _softmax_part(dots, inv_w, nw_ptr, idx_ptr, go_ptr, lse_ptr, rt_ptr, rowp_ptr, colp_ptr,
                  g_ptr, rows, row_ok, inv_x, y, cols, col_ok, cls, B, S, tile, col0, n_cols,
                  gtile, rb, g_stride, scale, m3, cos_m2, sin_m2, mm, tau, eps,
                  BACKWARD: tl.constexpr, STORE_G: tl.constexpr, COL_H: tl.constexpr,
                  HAS_INDEX: tl.constexpr, ARC: tl.constexpr, ST: tl.constexpr,
                  EASY: tl.constexpr, ROW_MARGINS: tl.constexpr, NO_FALLBACK: tl.constexpr,
                  ANGLE_CLIP: tl.constexpr, CURRICULAR: tl.constexpr, FILTER: tl.constexpr,
                  SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  XT: tl.constexpr, UPCAST: tl.constexpr, STORE_E: tl.constexpr):
    """A W program's epilogue: the margin softmax on one (row block, class tile) from its raw
    dots and the columns' inverse norms inv_w (loaded before the K loop by a program per
    tile: after it, the AdaFace forward spilled), one row of W per class (K = 1;
    :func:`_sub_centre_part` otherwise). The rows' target cosines come from the whole tile (a
    row reduction: nothing else is live yet); then the backward's epilogue runs a quarter of
    the class tile at a time (:data:`PARTS`), each quarter reading its columns' terms again
    (:func:`_class_cols`); what it writes is per column, as on the whole tile. The forward
    with STORE_E also keeps the tile's exponentials (:func:`_softmax_kept`: g_ptr is then
    exps [B, S] and colp_ptr exp_rows [G + 1, B]), which the backward's
    :func:`_exps_grad_kernel` reads instead of these dots."""
    cos = scaled_cos(dots, inv_x, inv_w)
    is_target = (y[:, None] == cls[None, :]) & col_ok[None, :]  # −1: padding, or no target
    c_t = target_cos(cos, is_target, ANGLE_CLIP)
    d, cos_a, sin_a, a_sin_a, lo, hi = row_margins(rt_ptr, rows, row_ok, B, m3, cos_m2, sin_m2,
                                                   mm, ROW_MARGINS, ANGLE_CLIP)
    hard, t = curricular_rows(rt_ptr, rows, row_ok, B, CURRICULAR)
    if not BACKWARD and STORE_E:
        _softmax_kept(dots, nw_ptr, idx_ptr, rowp_ptr, g_ptr, colp_ptr, rows, row_ok, inv_x, y,
                      c_t, d, cos_a, sin_a, a_sin_a, lo, hi, hard, t, B, S, tile, col0, n_cols,
                      gtile, scale, tau, eps, HAS_INDEX, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP,
                      CURRICULAR, FILTER, BLOCK_M, BLOCK_N, XT, UPCAST)
    elif not BACKWARD:
        _, z, z_t = softmax_logits(cos, is_target, c_t, scale, d, cos_a, sin_a, a_sin_a, lo, hi,
                                   hard, t, tau, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP,
                                   CURRICULAR, FILTER)
        _softmax_partials(rowp_ptr, z, z_t, is_target, col_ok, rows, row_ok, gtile, B)
    else:
        lse, go = _backward_rows(lse_ptr, go_ptr, rows, row_ok, COL_H)
        PN: tl.constexpr = BLOCK_N // PARTS
        first = tile * BLOCK_N
        for k in tl.static_range(PARTS):
            local = first + k * PN + tl.arange(0, PN)
            cos, is_target, cols_q, col_ok_q = _class_cols(
                _part(dots, k, PARTS, BLOCK_M, BLOCK_N), local, inv_x, y, col0, n_cols,
                idx_ptr, nw_ptr, eps, HAS_INDEX)
            _softmax_grad_cols(cos, is_target, c_t, d, cos_a, sin_a, a_sin_a, lo, hi, hard, t,
                               lse, go, nw_ptr, colp_ptr, g_ptr, rows, row_ok, local, cols_q,
                               col_ok_q, rb, S, g_stride, scale, tau, eps, STORE_G, COL_H, ARC,
                               ST, EASY, NO_FALLBACK, ANGLE_CLIP, CURRICULAR, FILTER, SCALE_G,
                               XT, UPCAST)


@triton.jit
def _uss_cols(dots, local, rows, row_ok, inv_x, y, col0, n_cols, idx_ptr, lab_ptr, valid_ptr,
              nb_ptr, bias_ptr, scale, uss_m, eps, HAS_INDEX: tl.constexpr,
              HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr, HAS_VALID: tl.constexpr,
              VECTOR_BIAS: tl.constexpr):
    """The USS pair terms (cols, col_ok, inv_b, cos, pos, neg, z) of the chunk-local columns
    `local` (a quarter of a column tile: :func:`_uss_part`) from their raw dots, the columns'
    own terms (class, validity, inverse norm, label, threshold) read for them alone: an L1 hit
    again is cheaper than a tile's worth of them kept live. Column j: bank row of class
    c = S_j, label c (the objective), or reference row j, label l_j = lab[j] (the USS family).
    Rows not read (invalid, padding) are in neither set."""
    cols, col_ok, cls = _columns(local, col0, n_cols, idx_ptr, HAS_INDEX)
    bank_ok = ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID)
    inv_b = inv_norm_of(nb_ptr, cols, bank_ok, eps)
    cos = scaled_cos(dots, inv_x, inv_b)
    if HAS_LABELS:
        lj = tl.load(lab_ptr + cols, mask=bank_ok, other=-1).to(y.dtype)
    else:
        lj = cls.to(y.dtype)
    if VECTOR_BIAS:  # one threshold per column: b[c]
        b = tl.load(bias_ptr + cls, mask=bank_ok, other=0.0).to(cos.dtype)[None, :]
    else:
        b = tl.load(bias_ptr).to(cos.dtype)
    pos, neg, z = uss_terms(cos, y, lj, rows, cols, row_ok, bank_ok, b, scale, uss_m,
                            IN_BATCH)
    return cols, col_ok, inv_b, cos, pos, neg, z


@triton.jit
def _uss_part(dots, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr, ustats_ptr,
              rowp_ptr, colp_ptr, g_ptr, rows, row_ok, inv_x, y, B, S, tile, col0, n_cols,
              gtile, rb, g_stride, scale, uss_m, uss_w, eps,
              BACKWARD: tl.constexpr, STORE_G: tl.constexpr, ROW_G: tl.constexpr,
              COL_G: tl.constexpr, COL_H: tl.constexpr, HAS_INDEX: tl.constexpr,
              HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr, USS_LSE: tl.constexpr,
              USS_CLAMP: tl.constexpr, HAS_VALID: tl.constexpr, VECTOR_BIAS: tl.constexpr,
              SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              XT: tl.constexpr, UPCAST: tl.constexpr):
    """A bank program's epilogue: λ·USS on one (row block, column tile) from its raw dots —
    the objective's part or the USS family (:func:`_uss_cols`). g' = λ·∂USS_i/∂cos_ij,
    without go (the forward forms it for the pairs form with STORE_G, the objective's row
    gradients: it needs no global statistic). The epilogue runs a quarter of the column tile
    at a time (:data:`PARTS`), each quarter reading its columns' terms again; per-column
    results are those of the whole tile, per-row sums add the quarters' sums in order, and
    the lse form takes its two maxima over the whole tile first (a second pass: still one
    exponential per pair)."""
    PN: tl.constexpr = BLOCK_N // PARTS
    first = tile * BLOCK_N
    out = rowp_ptr + gtile * (_N_FP * B) + 3 * B + rows  # the forward's FP_USS, …
    if not BACKWARD and USS_LSE:
        # each pair's exponential shifted by the maximum of its own set over the tile
        m_p = tl.full((BLOCK_M,), NEG_BIG, dots.dtype)
        m_n = tl.full((BLOCK_M,), NEG_BIG, dots.dtype)
        for k in tl.static_range(PARTS):
            _, _, _, _, pos, neg, z = _uss_cols(
                _part(dots, k, PARTS, BLOCK_M, BLOCK_N), first + k * PN + tl.arange(0, PN),
                rows, row_ok, inv_x, y, col0, n_cols, idx_ptr, lab_ptr, valid_ptr, nb_ptr,
                bias_ptr, scale, uss_m, eps, HAS_INDEX, HAS_LABELS, IN_BATCH, HAS_VALID,
                VECTOR_BIAS)
            m_p = tl.maximum(m_p, tl.max(tl.where(pos, z, NEG_BIG), axis=1))
            m_n = tl.maximum(m_n, tl.max(tl.where(neg, z, NEG_BIG), axis=1))
        se_p = tl.zeros((BLOCK_M,), dots.dtype)
        se_n = tl.zeros((BLOCK_M,), dots.dtype)
        for k in tl.static_range(PARTS):
            _, _, _, _, pos, neg, z = _uss_cols(
                _part(dots, k, PARTS, BLOCK_M, BLOCK_N), first + k * PN + tl.arange(0, PN),
                rows, row_ok, inv_x, y, col0, n_cols, idx_ptr, lab_ptr, valid_ptr, nb_ptr,
                bias_ptr, scale, uss_m, eps, HAS_INDEX, HAS_LABELS, IN_BATCH, HAS_VALID,
                VECTOR_BIAS)
            e = tl.exp(z - tl.where(pos, m_p[:, None], m_n[:, None]))
            se_p += tl.sum(tl.where(pos, e, 0.0), axis=1)
            se_n += tl.sum(tl.where(neg, e, 0.0), axis=1)
        tl.store(out, m_p, mask=row_ok)
        tl.store(out + B, se_p, mask=row_ok)
        tl.store(out + 2 * B, m_n, mask=row_ok)
        tl.store(out + 3 * B, se_n, mask=row_ok)
    elif not BACKWARD:
        sp_sum = tl.zeros((BLOCK_M,), dots.dtype)
        g_sum = tl.zeros((BLOCK_M,), dots.dtype)
        for k in tl.static_range(PARTS):
            local = first + k * PN + tl.arange(0, PN)
            cols, col_ok_q, inv_b, cos, pos, neg, z = _uss_cols(
                _part(dots, k, PARTS, BLOCK_M, BLOCK_N), local, rows, row_ok, inv_x, y, col0,
                n_cols, idx_ptr, lab_ptr, valid_ptr, nb_ptr, bias_ptr, scale, uss_m, eps,
                HAS_INDEX, HAS_LABELS, IN_BATCH, HAS_VALID, VECTOR_BIAS)
            zc = clamp(z, -scale, scale) if USS_CLAMP else z
            # pairs outside P ∪ N at z = −∞ (softplus 0, σ 0), so that the sign is the one
            # mask the gradient reads
            zc = tl.where(pos | neg, zc, float("-inf"))
            sp, sig = softplus_sigmoid(zc)  # one exponential for the loss and the gradient
            sp_sum += tl.sum(sp, axis=1)
            if STORE_G:
                g = uss_w * uss_pairs_grad_signed(z, sig, pos, scale, USS_CLAMP)
                _store_g(g_ptr, g, inv_b, rows, local, row_ok, col_ok_q, g_stride, XT,
                         SCALE_G, UPCAST)
                g_sum += tl.sum(g, axis=1)
        tl.store(out, sp_sum, mask=row_ok)
        if STORE_G:
            tl.store(out + B, g_sum, mask=row_ok)  # FP_GSUM
    else:
        a, fa, bn, fb = uss_row_stats(ustats_ptr, rows, row_ok, B)
        if COL_G or COL_H:
            go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
        g_sum = tl.zeros((BLOCK_M,), dots.dtype)
        for k in tl.static_range(PARTS):
            local = first + k * PN + tl.arange(0, PN)
            cols, col_ok_q, inv_b, cos, pos, neg, z = _uss_cols(
                _part(dots, k, PARTS, BLOCK_M, BLOCK_N), local, rows, row_ok, inv_x, y, col0,
                n_cols, idx_ptr, lab_ptr, valid_ptr, nb_ptr, bias_ptr, scale, uss_m, eps,
                HAS_INDEX, HAS_LABELS, IN_BATCH, HAS_VALID, VECTOR_BIAS)
            g = uss_w * uss_grad(z, pos, neg, scale, a, fa, bn, fb, USS_LSE, USS_CLAMP)
            if ROW_G:
                g_sum += tl.sum(g, axis=1)
            if COL_G:
                tl.store(colp_ptr + rb * (_N_CP * S) + S + cols,
                         tl.sum(g * go[:, None], axis=0), mask=col_ok_q)  # CP_GSUM
            if COL_H:
                _col_h(colp_ptr, g, cos, go, rb, S, cols, col_ok_q)
            if STORE_G:
                _store_g(g_ptr, g, inv_b, rows, local, row_ok, col_ok_q, g_stride, XT,
                         SCALE_G, UPCAST)
        if ROW_G:
            tl.store(rowp_ptr + gtile * B + rows, g_sum, mask=row_ok)


@triton.jit
def _cos_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, lab_ptr,
                valid_ptr, bias_ptr, go_ptr, lse_ptr, ustats_ptr, rt_ptr, rowp_ptr, colp_ptr,
                gw_ptr, gb_ptr, B, S, D, col0, n_cols, n_row_blocks, tile0, g_stride,
                scale, m3, cos_m2, sin_m2, mm, tau, uss_m, uss_w, eps,
                BACKWARD: tl.constexpr, W_PROGS: tl.constexpr, BANK_PROGS: tl.constexpr,
                STORE_GW: tl.constexpr, COL_H: tl.constexpr, STORE_GB: tl.constexpr,
                ROW_GB: tl.constexpr, COL_GB: tl.constexpr, COL_HB: tl.constexpr,
                HAS_INDEX: tl.constexpr, HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr,
                ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                ROW_MARGINS: tl.constexpr, NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                CURRICULAR: tl.constexpr, FILTER: tl.constexpr, K: tl.constexpr,
                KP: tl.constexpr, USS_LSE: tl.constexpr, USS_CLAMP: tl.constexpr,
                HAS_VALID: tl.constexpr, VECTOR_BIAS: tl.constexpr, SCALE_G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
                XT: tl.constexpr, UPCAST: tl.constexpr, STORE_E: tl.constexpr):
    """Cosine tiles of the columns [col0, col0 + n_cols) (one chunk, or all): a program per
    (row block, column tile, reference matrix), row blocks fastest, then W before bank.
    Forward: rowp = fpart (N_FP per tile); backward: rowp = gsum (one row per tile),
    colp = cpart (CP_HW from W programs with COL_H, or from bank programs with COL_HB when
    there are no W programs; S its width, |S|·K), g tiles into gw / gb (row i, column
    j − col0, row stride g_stride; gw holds K sub-centre columns per class: column
    K·(j − col0) + r, row stride K·g_stride). The settings are scalars: scale, m3, cos m2,
    sin m2, m2·sin m2, τ, the USS margin and weight λ, the normalisation eps; the margin
    family's per-row terms [8, B] (rt: margin_softmax.row_terms), read with ROW_MARGINS
    (d_i, cos a_i, …, the angle clip's bounds) or CURRICULAR (HARD_i, T_i)."""
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    q = pid // n_row_blocks
    # per column tile: KP W programs (one per sub-tile; KP = 1 without sub-centres), then
    # the bank's; `part` is the W program's sub-tile, KP for the bank's
    if KP == 1:
        part = 0
        if W_PROGS and BANK_PROGS:
            tile = q // 2
        else:
            tile = q
    elif W_PROGS and BANK_PROGS:
        tile = q // (KP + 1)
        part = q % (KP + 1)
    elif W_PROGS:
        tile = q // KP
        part = q % KP
    else:
        tile = q
        part = KP
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    # class ids and labels in 32 bits: 32 columns of a tile per thread in registers; the USS
    # family's own labels (HAS_LABELS) may be any int64
    cols, col_ok, cls = _columns(tile * BLOCK_N + tl.arange(0, BLOCK_N), col0, n_cols, idx_ptr,
                                 HAS_INDEX)
    row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B, eps)
    if not HAS_LABELS:
        y = y.to(tl.int32)
    gtile = tile0 + tile
    # which matrix this program reads: decided at run time only when one launch holds both
    # kinds (a constexpr otherwise, so a single-kind kernel compiles one part alone)
    if W_PROGS and BANK_PROGS:
        if KP == 1:
            w_prog = q % 2 == 0
        else:
            w_prog = part < KP
    else:
        w_prog = W_PROGS
    if w_prog:
        if K == 1:
            inv_w = inv_norm_of(nw_ptr, cols, col_ok, eps)
            dots = _dots(x_ptr, rows, row_ok, w_ptr, cls, col_ok, D,
                         tl.zeros((BLOCK_M, BLOCK_N), inv_x.dtype), BK, XT, UPCAST)
            _softmax_part(dots, inv_w, nw_ptr, idx_ptr, go_ptr, lse_ptr, rt_ptr, rowp_ptr,
                          colp_ptr, gw_ptr, rows, row_ok, inv_x, y, cols, col_ok, cls, B, S,
                          tile, col0, n_cols, gtile, rb, g_stride, scale, m3, cos_m2, sin_m2,
                          mm, tau, eps, BACKWARD, STORE_GW, COL_H, HAS_INDEX, ARC, ST, EASY,
                          ROW_MARGINS, NO_FALLBACK, ANGLE_CLIP, CURRICULAR, FILTER, SCALE_G,
                          BLOCK_M, BLOCK_N, XT, UPCAST, STORE_E)
        else:
            _sub_centre_part(x_ptr, w_ptr, nw_ptr, idx_ptr, go_ptr, lse_ptr, rt_ptr, rowp_ptr,
                             colp_ptr, gw_ptr, rows, row_ok, inv_x, y, tile, part, col0, n_cols,
                             B, S, D, gtile, rb, g_stride, scale, m3, cos_m2, sin_m2, mm, tau,
                             eps, BACKWARD, STORE_GW, COL_H, HAS_INDEX, ARC, ST, EASY,
                             ROW_MARGINS, NO_FALLBACK, ANGLE_CLIP, CURRICULAR, FILTER, K, KP,
                             SCALE_G, BLOCK_M, BLOCK_N, BK, XT, UPCAST)
    else:
        if KP > 1 and not BACKWARD:
            gtile = gtile * KP  # fpart's slots: the first of the column tile's KP
        dots = _dots(x_ptr, rows, row_ok, bank_ptr, cls,
                     ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID), D,
                     tl.zeros((BLOCK_M, BLOCK_N), inv_x.dtype), BK, XT, UPCAST)
        _uss_part(dots, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr, ustats_ptr,
                  rowp_ptr, colp_ptr, gb_ptr, rows, row_ok, inv_x, y, B, S, tile, col0, n_cols,
                  gtile, rb, g_stride, scale, uss_m, uss_w, eps, BACKWARD, STORE_GB, ROW_GB,
                  COL_GB, COL_HB, HAS_INDEX, HAS_LABELS, IN_BATCH, USS_LSE, USS_CLAMP,
                  HAS_VALID, VECTOR_BIAS, SCALE_G, BLOCK_M, BLOCK_N, XT, UPCAST)


@triton.jit
def _matrix_epilogue(dots, nw_ptr, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr,
                     lse_ptr, ustats_ptr, rt_ptr, rowp_ptr, colp_ptr, gw_ptr, gb_ptr, rows,
                     row_ok, inv_x, y, cols, col_ok, cls, B, S, tile, col0, n_cols, tile0, rb,
                     g_stride, scale, m3, cos_m2, sin_m2, mm, tau, uss_m, uss_w, eps,
                     BACKWARD: tl.constexpr, W_PROGS: tl.constexpr, STORE_GW: tl.constexpr,
                     COL_H: tl.constexpr, STORE_GB: tl.constexpr, ROW_GB: tl.constexpr,
                     COL_GB: tl.constexpr, COL_HB: tl.constexpr, HAS_INDEX: tl.constexpr,
                     HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr, ARC: tl.constexpr,
                     ST: tl.constexpr, EASY: tl.constexpr, ROW_MARGINS: tl.constexpr,
                     NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                     CURRICULAR: tl.constexpr, FILTER: tl.constexpr, USS_LSE: tl.constexpr,
                     USS_CLAMP: tl.constexpr, HAS_VALID: tl.constexpr,
                     VECTOR_BIAS: tl.constexpr, SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr,
                     STORE_E: tl.constexpr):
    """The epilogue of one tile of a persistent launch (one matrix, K = 1: W_PROGS, else the
    bank's): :func:`_softmax_part` or :func:`_uss_part` on its raw dots."""
    if W_PROGS:
        _softmax_part(dots, inv_norm_of(nw_ptr, cols, col_ok, eps), nw_ptr, idx_ptr, go_ptr,
                      lse_ptr, rt_ptr, rowp_ptr, colp_ptr, gw_ptr, rows, row_ok, inv_x, y,
                      cols, col_ok, cls, B, S, tile, col0, n_cols, tile0 + tile, rb, g_stride,
                      scale, m3, cos_m2, sin_m2, mm, tau, eps, BACKWARD, STORE_GW, COL_H,
                      HAS_INDEX, ARC, ST, EASY, ROW_MARGINS, NO_FALLBACK, ANGLE_CLIP,
                      CURRICULAR, FILTER, SCALE_G, BLOCK_M, BLOCK_N, XT, UPCAST, STORE_E)
    else:
        _uss_part(dots, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr, ustats_ptr,
                  rowp_ptr, colp_ptr, gb_ptr, rows, row_ok, inv_x, y, B, S, tile, col0, n_cols,
                  tile0 + tile, rb, g_stride, scale, uss_m, uss_w, eps, BACKWARD, STORE_GB,
                  ROW_GB, COL_GB, COL_HB, HAS_INDEX, HAS_LABELS, IN_BATCH, USS_LSE, USS_CLAMP,
                  HAS_VALID, VECTOR_BIAS, SCALE_G, BLOCK_M, BLOCK_N, XT, UPCAST)


@triton.jit
def _cos_stream_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, lab_ptr,
                       valid_ptr, bias_ptr, go_ptr, lse_ptr, ustats_ptr, rt_ptr, rowp_ptr,
                       colp_ptr, gw_ptr, gb_ptr, B, S, D, col0, n_cols, n_row_blocks, tile0,
                       g_stride, scale, m3, cos_m2, sin_m2, mm, tau, uss_m, uss_w, eps,
                       BACKWARD: tl.constexpr, W_PROGS: tl.constexpr,
                       BANK_PROGS: tl.constexpr, STORE_GW: tl.constexpr, COL_H: tl.constexpr,
                       STORE_GB: tl.constexpr, ROW_GB: tl.constexpr, COL_GB: tl.constexpr,
                       COL_HB: tl.constexpr, HAS_INDEX: tl.constexpr,
                       HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr, ARC: tl.constexpr,
                       ST: tl.constexpr, EASY: tl.constexpr, ROW_MARGINS: tl.constexpr,
                       NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                       CURRICULAR: tl.constexpr, FILTER: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, USS_LSE: tl.constexpr, USS_CLAMP: tl.constexpr,
                       HAS_VALID: tl.constexpr, VECTOR_BIAS: tl.constexpr,
                       SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BK: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr,
                       STORE_E: tl.constexpr):
    """:func:`_cos_kernel`'s tiles (its arguments, the same epilogues) from persistent
    programs over ONE reference matrix (W_PROGS or BANK_PROGS; K = 1): program p takes the
    tiles p, p + P, p + 2P, … (row blocks fastest, so that a wave's programs share column
    tiles in L2) in one flat loop over (tile, K step), the epilogue in the last K step of
    each tile. The loop is the compiler's to pipeline as one: the first K steps of a
    program's next tile are loaded while it runs the epilogue of this one, where a program
    per tile starts every tile with an empty pipeline (docs/design.md §2)."""
    tl.static_assert(K == 1, "a persistent launch has no sub-centres")
    tl.static_assert(W_PROGS != BANK_PROGS, "a persistent launch streams one matrix")
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    k_steps = tl.cdiv(D, BK)
    n_tiles = n_row_blocks * tl.cdiv(n_cols, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), nx_ptr.dtype.element_ty)
    for step in range(0, tl.cdiv(n_tiles - pid, n_progs) * k_steps):
        q = pid + (step // k_steps) * n_progs
        k0 = (step % k_steps) * BK
        rb = q % n_row_blocks
        tile = q // n_row_blocks
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols, col_ok, cls = _columns(tile * BLOCK_N + tl.arange(0, BLOCK_N), col0, n_cols,
                                     idx_ptr, HAS_INDEX)
        xk = rows_chunk(x_ptr, rows, rows < B, D, k0, BK, XT, UPCAST)
        if W_PROGS:
            rk = rows_chunk(w_ptr, cls, col_ok, D, k0, BK, XT, UPCAST)
        else:
            rk = rows_chunk(bank_ptr, cls, ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID), D,
                            k0, BK, XT, UPCAST)
        acc = mma(xk, tl.trans(rk), acc)
        if k0 + BK >= D:
            row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B, eps)
            if not HAS_LABELS:
                y = y.to(tl.int32)
            _matrix_epilogue(
                acc, nw_ptr, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr, lse_ptr,
                ustats_ptr, rt_ptr, rowp_ptr, colp_ptr, gw_ptr, gb_ptr, rows, row_ok, inv_x, y,
                cols, col_ok, cls, B, S, tile, col0, n_cols, tile0, rb, g_stride, scale, m3,
                cos_m2, sin_m2, mm, tau, uss_m, uss_w, eps, BACKWARD, W_PROGS, STORE_GW, COL_H,
                STORE_GB, ROW_GB, COL_GB, COL_HB, HAS_INDEX, HAS_LABELS, IN_BATCH, ARC, ST,
                EASY, ROW_MARGINS, NO_FALLBACK, ANGLE_CLIP, CURRICULAR, FILTER, USS_LSE,
                USS_CLAMP, HAS_VALID, VECTOR_BIAS, SCALE_G, BLOCK_M, BLOCK_N, XT, UPCAST,
                STORE_E)
            acc = tl.zeros((BLOCK_M, BLOCK_N), nx_ptr.dtype.element_ty)


@triton.jit
def _cos_resident_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr,
                         lab_ptr, valid_ptr, bias_ptr, go_ptr, lse_ptr, ustats_ptr, rt_ptr,
                         rowp_ptr, colp_ptr, gw_ptr, gb_ptr, B, S, D, col0, n_cols,
                         n_row_blocks, tile0, g_stride, scale, m3, cos_m2, sin_m2, mm, tau,
                         uss_m, uss_w, eps, BACKWARD: tl.constexpr, W_PROGS: tl.constexpr,
                         BANK_PROGS: tl.constexpr, STORE_GW: tl.constexpr,
                         COL_H: tl.constexpr, STORE_GB: tl.constexpr, ROW_GB: tl.constexpr,
                         COL_GB: tl.constexpr, COL_HB: tl.constexpr, HAS_INDEX: tl.constexpr,
                         HAS_LABELS: tl.constexpr, IN_BATCH: tl.constexpr,
                         ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                         ROW_MARGINS: tl.constexpr, NO_FALLBACK: tl.constexpr,
                         ANGLE_CLIP: tl.constexpr, CURRICULAR: tl.constexpr,
                         FILTER: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                         USS_LSE: tl.constexpr, USS_CLAMP: tl.constexpr,
                         HAS_VALID: tl.constexpr, VECTOR_BIAS: tl.constexpr,
                         SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
                         UPCAST: tl.constexpr, STORE_E: tl.constexpr):
    """:func:`_cos_kernel`'s tiles (its arguments, the same epilogues) from persistent
    programs that keep their x row block resident while the reference tiles stream past it
    (ONE matrix, K = 1): the launch is P = n_row_blocks · L programs, program p owns the
    row block p mod n_row_blocks and takes its column tiles l, l + L, l + 2L, … (l = p div
    n_row_blocks: a wave's programs read the same column tiles, which stay in L2 while every
    row block reads them). BK covers all of D (a power of two ≥ D): the row block is loaded
    once, before the loop, and each tile is ONE product over the whole width, so the
    compiler keeps the block in shared memory for the whole program and pipelines only the
    reference tiles (sm_90, BLOCK_M = 128, BLOCK_N = 32, D = 512, bf16: 128 KB resident,
    two 32 KB reference buffers). L2 then serves each reference tile once per row block and
    the row block once per program: BLOCK_M FLOP per byte instead of
    BLOCK_M·BLOCK_N/(BLOCK_M + BLOCK_N) (docs/design.md §2)."""
    tl.static_assert(K == 1, "a persistent launch has no sub-centres")
    tl.static_assert(W_PROGS != BANK_PROGS, "a persistent launch streams one matrix")
    pid = tl.program_id(0)
    lanes = tl.num_programs(0) // n_row_blocks
    rb = pid % n_row_blocks
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B, eps)
    if not HAS_LABELS:
        y = y.to(tl.int32)
    x_block = rows_chunk(x_ptr, rows, row_ok, D, 0, BK, XT, UPCAST)
    for tile in range(pid // n_row_blocks, tl.cdiv(n_cols, BLOCK_N), lanes):
        cols, col_ok, cls = _columns(tile * BLOCK_N + tl.arange(0, BLOCK_N), col0, n_cols,
                                     idx_ptr, HAS_INDEX)
        if W_PROGS:
            r_tile = rows_chunk(w_ptr, cls, col_ok, D, 0, BK, XT, UPCAST)
        else:
            r_tile = rows_chunk(bank_ptr, cls, ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID),
                                D, 0, BK, XT, UPCAST)
        dots = mma(x_block, tl.trans(r_tile), tl.zeros((BLOCK_M, BLOCK_N),
                                                       nx_ptr.dtype.element_ty))
        _matrix_epilogue(
            dots, nw_ptr, nb_ptr, idx_ptr, lab_ptr, valid_ptr, bias_ptr, go_ptr, lse_ptr,
            ustats_ptr, rt_ptr, rowp_ptr, colp_ptr, gw_ptr, gb_ptr, rows, row_ok, inv_x, y,
            cols, col_ok, cls, B, S, tile, col0, n_cols, tile0, rb, g_stride, scale, m3,
            cos_m2, sin_m2, mm, tau, uss_m, uss_w, eps, BACKWARD, W_PROGS, STORE_GW, COL_H,
            STORE_GB, ROW_GB, COL_GB, COL_HB, HAS_INDEX, HAS_LABELS, IN_BATCH, ARC, ST, EASY,
            ROW_MARGINS, NO_FALLBACK, ANGLE_CLIP, CURRICULAR, FILTER, USS_LSE, USS_CLAMP,
            HAS_VALID, VECTOR_BIAS, SCALE_G, BLOCK_M, BLOCK_N, XT, UPCAST, STORE_E)


@triton.jit
def _exps_grad_kernel(e_ptr, er_ptr, nx_ptr, nw_ptr, y_ptr, idx_ptr, go_ptr, lse_ptr, rt_ptr,
                      colp_ptr, g_ptr, B, S, col0, n_cols, n_row_blocks, e_groups, e_width,
                      g_stride, scale, m3, cos_m2, sin_m2, mm, tau, eps, COL_H: tl.constexpr,
                      HAS_INDEX: tl.constexpr, ARC: tl.constexpr, ST: tl.constexpr,
                      EASY: tl.constexpr, ROW_MARGINS: tl.constexpr,
                      NO_FALLBACK: tl.constexpr, SCALE_G: tl.constexpr,
                      E_WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      XT: tl.constexpr, UPCAST: tl.constexpr):
    """The W programs' backward from the forward's stored exponentials instead of the
    cosines' product (docs/design.md §2): a program per (row block, BLOCK_N columns of the
    chunk [col0, col0 + n_cols)), row blocks fastest, the row blocks those of the cosine
    kernels (cpart's). exps [B, S] (e_ptr) holds e'_ij = exp(z_ij − m_ig) and er_ptr
    [e_groups + 1, B] the maxima m_ig of the forward's groups of e_width columns
    (:func:`_softmax_kept`), then the rows' raw target cosines. Off the target

        p_ij = e'_ij·exp(m_ig − lse_i)   (one exponential per row and group)
        cos_ij = (m_ig + ln e'_ij)/s     off the target (z_ij = s·cos_ij: K = 1, no decision
                                          margin, UnitsfaceOptions.keeps_exps)

    within 2⁻⁹ (relative) and 2⁻⁹/s of the product's in bf16 (a confident target is its
    group's maximum: e' = 1 exactly); the cosine serves the clamp's gradient rule and ∂W's
    projection sums. The target's cosine (and the margin's slope, per row) is the stored
    one. An e' that underflowed (p_ij < e⁻⁸⁷) gives p = 0 and cos = −∞, which the clamp
    rule zeroes as any cosine past ±1. Then :func:`softmax_grad_p` and :func:`_grad_cols_out` a
    quarter of the columns at a time (the same g̃ tile and cpart sums as the cosine kernels'
    W programs). E_WIDE: e_width ≥ a quarter's columns, so a quarter lies in one group (the
    groups and the quarters are aligned powers of two) and its maxima are one per row."""
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    tile = pid // n_row_blocks
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, _, y = row_block(nx_ptr, y_ptr, rows, B, eps)
    y = y.to(tl.int32)
    ct_raw = tl.load(er_ptr + e_groups * B + rows, mask=row_ok, other=0.0)
    c_t, _ = clamp_cos(ct_raw, False)
    _, cos_a, sin_a, _, lo, hi = row_margins(rt_ptr, rows, row_ok, B, m3, cos_m2, sin_m2, mm,
                                             ROW_MARGINS, False)
    hard, t = curricular_rows(rt_ptr, rows, row_ok, B, False)
    lse, go = _backward_rows(lse_ptr, go_ptr, rows, row_ok, COL_H)
    inv_s = 1.0 / scale
    PN: tl.constexpr = BLOCK_N // PARTS
    for k in tl.static_range(PARTS):
        local = tile * BLOCK_N + k * PN + tl.arange(0, PN)
        cols, col_ok, cls = _columns(local, col0, n_cols, idx_ptr, HAS_INDEX)
        ok = row_ok[:, None] & col_ok[None, :]
        e = tl.load(e_ptr + rows[:, None] * S + cols[None, :], mask=ok, other=1.0)
        first = tile * BLOCK_N + k * PN
        if E_WIDE:
            m = tl.load(er_ptr + ((col0 + first) // e_width) * B + rows,
                        mask=row_ok & (first < n_cols), other=0.0)
            e = e.to(m.dtype)
            p = e * tl.exp(m - lse)[:, None]
            z = m[:, None] + tl.log(e)
        else:
            m = tl.load(er_ptr + (cols // e_width)[None, :] * B + rows[:, None], mask=ok,
                        other=0.0)
            e = e.to(m.dtype)
            p = e * tl.exp(m - lse[:, None])
            z = m + tl.log(e)
        is_target = (y[:, None] == cls[None, :]) & col_ok[None, :]
        cos = tl.where(is_target, ct_raw[:, None], z * inv_s)
        g = softmax_grad_p(p, cos, cos, c_t, is_target, ok, scale, cos_a, sin_a, lo, hi, hard,
                           t, tau, ARC, ST, EASY, NO_FALLBACK, False, False, False)
        # Σ go·g·cos reads 0 where e' underflowed (g is 0 there; −∞ would make 0·−∞ = NaN),
        # the target's cosine wherever it is, and a NaN e' as NaN
        _grad_cols_out(g, tl.where(is_target | (e != 0.0), cos, 0.0), go, nw_ptr, colp_ptr,
                       g_ptr, rows, row_ok, local, cols, col_ok, rb, S, g_stride, eps, True,
                       COL_H, SCALE_G, XT, UPCAST)


@triton.jit
def _dw_kernel(g_ptr, xg_ptr, w_ptr, nw_ptr, idx_ptr, valid_ptr, colp_ptr, dw_ptr, B, S, D,
               col0, n_cols, g_stride, n_feat_tiles, n_h_blocks, eps,
               HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
               SCALE_G: tl.constexpr, H_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
               UPCAST: tl.constexpr):
    """∂R of the chunk's columns (compact rows col0 + j of dw; R = W, or the USS family's
    reference rows): acc = Σ_i g̃_ij·x̂'_i (K loop over the rows), then :func:`_dw_out`. A
    program per (column tile, feature tile), the feature tiles of a column tile next to each
    other (its g̃ block stays in L2)."""
    pid = tl.program_id(0)
    ct = pid // n_feat_tiles
    ft = pid % n_feat_tiles
    local = ct * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = local < n_cols
    feats = ft * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = feats < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), nw_ptr.dtype.element_ty)
    for k0 in range(0, B, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < B
        gt = tl.load(g_ptr + ks[:, None] * g_stride + local[None, :],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        xt = tl.load(xg_ptr + ks[:, None] * D + feats[None, :],
                     mask=k_ok[:, None] & f_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = mma(tl.trans(gt), xt, acc)
    _dw_out(acc, col0 + local, col_ok, feats, f_ok, w_ptr, nw_ptr, idx_ptr, valid_ptr, colp_ptr,
            dw_ptr, S, D, n_h_blocks, eps, HAS_INDEX, HAS_VALID, SCALE_G, H_BLOCKS, XT, UPCAST)


@triton.jit
def _dw_resident_kernel(g_ptr, xg_ptr, w_ptr, nw_ptr, idx_ptr, valid_ptr, colp_ptr, dw_ptr, B,
                        S, D, col0, n_cols, g_stride, n_feat_tiles, n_h_blocks, eps,
                        HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
                        SCALE_G: tl.constexpr, H_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
                        UPCAST: tl.constexpr):
    """:func:`_dw_kernel`'s product from persistent programs that keep their block of x̂'
    resident (all B rows × BLOCK_N features; BK the rows rounded up to a power of two) while
    the g̃ column tiles stream past it: the launch is n_feat_tiles · L programs, program p
    owns the feature tile p mod n_feat_tiles and takes the column tiles l, l + L, … (l = p div
    n_feat_tiles). Each tile is one product over all the rows, transposed so that the
    resident block is the wide operand: ∂Rᵀ [BLOCK_N features × BLOCK_M columns] =
    x̂'ᵀ·g̃ (sm_90, bf16, B = 512: the 128 KB block against 32 KB g̃ tiles, wgmma m64n32k16
    with both operands in shared memory, the resident cosine programs' shape). L2 then
    serves x̂' once per program instead of once per column tile, and g̃ once per feature
    tile (docs/design.md §2). The same epilogue, :func:`_dw_out`, on the tile transposed."""
    pid = tl.program_id(0)
    lanes = tl.num_programs(0) // n_feat_tiles
    ft = pid % n_feat_tiles
    feats = ft * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = feats < D
    ks = tl.arange(0, BK)
    k_ok = ks < B
    xt = tl.load(xg_ptr + ks[:, None] * D + feats[None, :], mask=k_ok[:, None] & f_ok[None, :],
                 other=0.0)
    if UPCAST:
        xt = xt.to(tl.float32)
    x_block = tl.trans(xt)
    for ct in range(pid // n_feat_tiles, tl.cdiv(n_cols, BLOCK_M), lanes):
        local = ct * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = local < n_cols
        gt = tl.load(g_ptr + ks[:, None] * g_stride + local[None, :],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(x_block, gt, tl.zeros((BLOCK_N, BLOCK_M), nw_ptr.dtype.element_ty))
        _dw_out(tl.trans(acc), col0 + local, col_ok, feats, f_ok, w_ptr, nw_ptr, idx_ptr,
                valid_ptr, colp_ptr, dw_ptr, S, D, n_h_blocks, eps, HAS_INDEX, HAS_VALID,
                SCALE_G, H_BLOCKS, XT, UPCAST)


@triton.jit
def _dw_out(acc, cols, col_ok, feats, f_ok, w_ptr, nw_ptr, idx_ptr, valid_ptr, colp_ptr, dw_ptr,
            S, D, n_h_blocks, eps, HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
            SCALE_G: tl.constexpr, H_BLOCKS: tl.constexpr, XT: tl.constexpr,
            UPCAST: tl.constexpr):
    """The ∂R tile of columns `cols` (of S) and features `feats` from acc = Σ_i g̃_ij·x̂'_i
    (docs/design.md §2):

        ∂R_j = (acc or acc/max(‖r_j‖, eps)) − h_j·r_j / max(‖r_j‖, eps)²

    (no projection below the eps; a NaN norm stays NaN; zero for a row marked invalid,
    whatever it holds) with h_j = Σ_i go_i g_ij cos_ij, summed over the cosine kernel's
    n_h_blocks row blocks in order: in a loop (H_BLOCKS = 0), or unrolled (H_BLOCKS =
    n_h_blocks), where a loop would stop the resident programs' loop over tiles from being
    pipelined (it would no longer be innermost)."""
    h = tl.zeros(cols.shape, acc.dtype)
    if H_BLOCKS == 0:
        for r in range(n_h_blocks):
            h += tl.load(colp_ptr + r * (_N_CP * S) + cols, mask=col_ok, other=0.0)  # CP_HW
    else:
        for r in tl.static_range(H_BLOCKS):
            h += tl.load(colp_ptr + r * (_N_CP * S) + cols, mask=col_ok, other=0.0)
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    else:
        cls = cols
    ok = ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID)
    nw = tl.load(nw_ptr + cols, mask=ok, other=1.0)
    inv_w = inv_norm(nw, eps)
    proj = tl.where(nw < eps, 0.0, h) * inv_w * inv_w
    w = as_operand(tl.load(w_ptr + cls[:, None].to(tl.int64) * D + feats[None, :],
                           mask=ok[:, None] & f_ok[None, :], other=0.0), XT, UPCAST)
    if not SCALE_G:
        acc = acc * inv_w[:, None]
    dw = acc - proj[:, None] * w.to(acc.dtype)
    if HAS_VALID:  # (a NaN row of x reaches every column's acc, an invalid one's too)
        dw = tl.where(ok[:, None], dw, 0.0)
    tl.store(dw_ptr + cols[:, None].to(tl.int64) * D + feats[None, :],
             dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & f_ok[None, :])


@triton.jit
def _dx_slice(acc, g_ptr, r_ptr, nr_ptr, idx_ptr, valid_ptr, rows, row_ok, feats, f_ok, col0,
              k_lo, k_hi, D, g_stride, eps, HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
              SCALE_G: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
              UPCAST: tl.constexpr):
    """acc + Σ_{j ∈ [k_lo, k_hi)} g̃_ij·r_j (the chunk's columns j; rows not read are zeros;
    unscaled g: Σ g_ij·r̂_j, the operand tile normalised)."""
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < k_hi
        cols = col0 + ks
        if HAS_INDEX:
            cls = tl.load(idx_ptr + cols, mask=k_ok, other=0)
        else:
            cls = cols
        ok = ref_rows_ok(valid_ptr, cls, k_ok, HAS_VALID)
        a = tl.load(g_ptr + rows[:, None] * g_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r = as_operand(tl.load(r_ptr + cls[:, None].to(tl.int64) * D + feats[None, :],
                               mask=ok[:, None] & f_ok[None, :], other=0.0), XT, UPCAST)
        if not SCALE_G:
            r = unit_rows(r, inv_norm_of(nr_ptr, cols, ok, eps))
        acc = mma(a, r, acc)
    return acc


@triton.jit
def _dx_kernel(gw_ptr, w_ptr, nw_ptr, gb_ptr, bank_ptr, nb_ptr, idx_ptr, valid_ptr, part_ptr,
               B, D, col0, n_cols, g_stride, k_split, n_feat_tiles, accumulate, eps,
               HAS_W: tl.constexpr, HAS_BANK: tl.constexpr, HAS_INDEX: tl.constexpr,
               HAS_VALID: tl.constexpr, SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
               UPCAST: tl.constexpr):
    """Split-K slice s of the chunk's ∂x product: part[s] (+)= Σ_{j in slice s} g̃_ij·w_j
    (+ g̃'_ij·bank_j), for the output tile (row block, feature tile) of program (·, s). The
    slices' fp32 buffers carry over from chunk to chunk (`accumulate`: not the first), so
    every element is summed in one fixed order."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    rows = (pid // n_feat_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    feat0 = (pid % n_feat_tiles) * BLOCK_N
    feats = feat0 + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    f_ok = feats < D
    k_lo = s * k_split
    k_hi = tl.minimum(k_lo + k_split, n_cols)
    acc = tl.zeros((BLOCK_M, BLOCK_N), part_ptr.dtype.element_ty)
    if HAS_W:
        acc = _dx_slice(acc, gw_ptr, w_ptr, nw_ptr, idx_ptr, valid_ptr, rows, row_ok, feats,
                        f_ok, col0, k_lo, k_hi, D, g_stride, eps, HAS_INDEX, False, SCALE_G,
                        BK, XT, UPCAST)
    if HAS_BANK:
        acc = _dx_slice(acc, gb_ptr, bank_ptr, nb_ptr, idx_ptr, valid_ptr, rows, row_ok,
                        feats, f_ok, col0, k_lo, k_hi, D, g_stride, eps, HAS_INDEX, HAS_VALID,
                        SCALE_G, BK, XT, UPCAST)
    # the carried partial sums a quarter of the feature tile at a time (:data:`PARTS`): a
    # whole tile of them, as large as the accumulator, spilled beside it at 128 × 256
    PN: tl.constexpr = BLOCK_N // PARTS
    for k in tl.static_range(PARTS):
        feats_k = feat0 + k * PN + tl.arange(0, PN)
        ptrs = part_ptr + s * B * D + rows[:, None] * D + feats_k[None, :]
        mask = row_ok[:, None] & (feats_k < D)[None, :]
        acc_k = _part(acc, k, PARTS, BLOCK_M, BLOCK_N)
        if accumulate:
            acc_k += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, acc_k, mask=mask)


# ----------------------------------------------------------------------------- host side

def kernel_scalars(o: UnitsfaceOptions | UssOptions) -> dict:
    """The settings as the cosine kernel's scalar arguments (the products read eps alone):
    fp32 in compiled kernels, where every op family computes in fp32; exact Python floats
    under the interpreter, so float64 runs keep them in float64. The USS family is the USS
    part alone (λ = 1, no W programs: the softmax settings are unread)."""
    if isinstance(o, UssOptions):
        return dict(scale=o.scale, m3=0.0, cos_m2=1.0, sin_m2=0.0, mm=0.0, tau=0.0,
                    uss_m=o.margin, uss_w=1.0, eps=o.eps)
    return dict(scale=o.scale, m3=o.margin_cos, cos_m2=math.cos(o.margin_arc),
                sin_m2=math.sin(o.margin_arc), mm=o.margin_arc * math.sin(o.margin_arc),
                tau=o.interclass_threshold, uss_m=o.uss_margin, uss_w=o.uss_weight, eps=o.eps)


def margin_flags(o: UnitsfaceOptions | None) -> dict:
    """The margin family's constexprs (docs/design.md §1.5; all off for the USS family, None):
    ARC with per-row margins too (a_i may be anything), ROW_MARGINS where the target reads
    the per-row terms (margin_softmax.row_terms), K the sub-centres per class."""
    if o is None:
        return dict(ARC=False, ST=False, EASY=False, ROW_MARGINS=False, NO_FALLBACK=False,
                    ANGLE_CLIP=False, CURRICULAR=False, FILTER=False, K=1, KP=1)
    return dict(ARC=o.arc or o.row_margins, ST=o.arcface_straight_through, EASY=o.easy_margin,
                ROW_MARGINS=needs_row_terms(o), NO_FALLBACK=o.no_fallback, ANGLE_CLIP=o.angle_clip,
                CURRICULAR=o.curricular, FILTER=o.interclass_threshold > 0.0, K=o.k,
                KP=triton.next_power_of_2(o.k))


@dataclass(frozen=True)
class Sweep:
    """One call as every launch reads it: x, its norms and labels; the reference matrices W
    (W programs) and bank (bank programs: the objective's bank, or the USS family's reference
    rows) with their norms, column j reading row idx[j] (HAS_INDEX) or row j; the USS
    columns' labels `lab` (HAS_LABELS; else the class ids), validity (HAS_VALID) and
    thresholds (one, or one per column: VECTOR_BIAS); the margin family's per-row terms `rt`
    (margin_softmax.row_terms); the settings (:func:`kernel_scalars`); the flags (constexprs)
    every launch shares (:func:`margin_flags` among them). An absent tensor is another one of
    the call (a pointer no kernel reads). With K > 1 sub-centres, W's norms are per
    sub-centre row (nw[j·K + r]); the products over them read :meth:`sub_centre_rows`."""

    x: torch.Tensor
    nx: torch.Tensor
    labels: torch.Tensor
    w: torch.Tensor
    nw: torch.Tensor
    bank: torch.Tensor
    nb: torch.Tensor
    idx: torch.Tensor
    lab: torch.Tensor
    valid: torch.Tensor
    bias: torch.Tensor
    rt: torch.Tensor
    columns: int
    scalars: dict
    flags: dict

    @staticmethod
    def operand_flags(x: torch.Tensor) -> dict:
        """How the kernels read and write x's dtype (fp16: g unscaled, see the module doc)."""
        return dict(SCALE_G=x.dtype != torch.float16, XT=TL_DTYPES[x.dtype],
                    UPCAST=upcast_tiles(x.dtype))

    def sub_centre_rows(self, index) -> Sweep:
        """The sweep as the ∂W and ∂x products of W read it with K > 1: a column per sub-centre
        row (column j·K + r: row idx[j]·K + r, or row j·K + r without an index), an int
        vector of |S|·K made once per call on the device. The bank's products keep the
        classes."""
        k = self.flags["K"]
        if k == 1:
            return self
        return replace(self, idx=self.idx if index is None else class_row_ids(index, k),
                       columns=self.columns * k)


def _thresholds(bias: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return bias.detach().reshape(-1).to(acc).contiguous()


def _objective_sweep(x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                     o: UnitsfaceOptions, nx, nw, nb) -> Sweep:
    has_uss = bank is not None
    b = _thresholds(bias, nx.dtype) if has_uss else nx
    return Sweep(
        x=x, nx=nx, labels=labels, w=centres, nw=nw, bank=bank if has_uss else centres,
        nb=nb if has_uss else nw, idx=index if index is not None else labels, lab=labels,
        valid=bank_valid if (has_uss and bank_valid is not None) else labels, bias=b,
        rt=row_terms(margin_rows, o, nx),
        columns=centres.shape[0] // o.k if index is None else index.shape[0],
        scalars=kernel_scalars(o),
        flags=dict(HAS_INDEX=index is not None, HAS_LABELS=False, IN_BATCH=False,
                   USS_LSE=o.uss_lse, USS_CLAMP=o.uss_clamp,
                   HAS_VALID=has_uss and bank_valid is not None,
                   VECTOR_BIAS=has_uss and b.numel() > 1, **margin_flags(o),
                   **Sweep.operand_flags(x)))


def cos_launch(p: Plan, s: Sweep, go, lse, ustats, rowp, colp, gw, gb, col0, n_cols, *,
               backward, w_progs, bank_progs, store_gw=False, col_h=False, store_gb=False,
               row_gb=False, col_gb=False, col_hb=False, store_e=False):
    """The cosine tiles of the columns [col0, col0 + n_cols): one _cos_kernel launch (see its
    doc), or with FusedConfig.persistent (K = 1 only: config.fused_config decides) a
    _cos_stream_kernel launch per matrix, W first, of at most that many programs (one kernel
    streaming both matrices would hold both loops' pipeline buffers: 130 KB of shared memory,
    and it spilled under triton 3.6); with FusedConfig.resident a _cos_resident_kernel launch
    per matrix instead, of :func:`resident_programs`. store_e: the forward's W programs keep
    their exponentials (gw: exps [B, S]; colp: exp_rows [G + 1, B]; K = 1), in a launch
    without the bank's programs (sm_90: the W and bank programs in one kernel spilled 4–8 B
    per thread with the stores, the W programs alone nothing)."""
    assert not (store_e and bank_progs), "the programs that keep e' have a launch of their own"
    t = p.config.cos
    tiles = p.row_blocks * triton.cdiv(n_cols, t.block_n)
    if p.config.persistent:
        kernel, progs = ((_cos_resident_kernel, resident_programs(p, n_cols))
                         if p.config.resident else
                         (_cos_stream_kernel, min(tiles, p.config.persistent)))
        launches = [(kernel, (progs,), w, not w)
                    for w, on in ((True, w_progs), (False, bank_progs)) if on]
    else:
        launches = [(_cos_kernel, (tiles * (s.flags["KP"] * int(w_progs) + int(bank_progs)),),
                     w_progs, bank_progs)]
    for kernel, grid, w, bank in launches:
        kernel[grid](
            s.x, s.w, s.bank, s.nx, s.nw, s.nb, s.labels, s.idx, s.lab, s.valid, s.bias, go,
            lse, ustats, s.rt, rowp, colp, gw, gb, p.rows, s.columns * s.flags["K"], p.width,
            col0, n_cols, p.row_blocks, col0 // t.block_n, p.chunk, **s.scalars,
            BACKWARD=backward, W_PROGS=w, BANK_PROGS=bank, STORE_GW=store_gw, COL_H=col_h,
            STORE_GB=store_gb, ROW_GB=row_gb, COL_GB=col_gb, COL_HB=col_hb, BLOCK_M=t.block_m,
            BLOCK_N=t.block_n, BK=t.bk, num_warps=t.num_warps, num_stages=t.num_stages,
            STORE_E=store_e, **s.flags)


EXPS_COLS = 128
"""Columns per program of :func:`_exps_grad_kernel` (four quarters of 32: the cosine
kernels' epilogue unit)."""


def exps_grad_launch(p: Plan, s: Sweep, exps, exp_rows, go, lse, cpart, gw, col0, n_cols,
                     col_h):
    """The W programs' backward of the columns [col0, col0 + n_cols) from the forward's
    stored exponentials (:func:`_exps_grad_kernel`): the same g̃ tile into gw and (col_h)
    cpart sums as the cosine kernel's W programs."""
    groups = exp_rows.shape[0] - 1
    width = exp_width(s.columns, groups)
    f = s.flags
    _exps_grad_kernel[(p.row_blocks * triton.cdiv(n_cols, EXPS_COLS),)](
        exps, exp_rows, s.nx, s.nw, s.labels, s.idx, go, lse, s.rt, cpart, gw, p.rows,
        s.columns, col0, n_cols, p.row_blocks, groups, width, p.chunk,
        **{k: s.scalars[k] for k in ("scale", "m3", "cos_m2", "sin_m2", "mm", "tau", "eps")},
        COL_H=col_h, HAS_INDEX=f["HAS_INDEX"], ARC=f["ARC"], ST=f["ST"], EASY=f["EASY"],
        ROW_MARGINS=f["ROW_MARGINS"], NO_FALLBACK=f["NO_FALLBACK"], SCALE_G=f["SCALE_G"],
        E_WIDE=width >= EXPS_COLS // PARTS, BLOCK_M=p.config.cos.block_m, BLOCK_N=EXPS_COLS,
        XT=f["XT"], UPCAST=f["UPCAST"], num_warps=8)


def exp_group_width(p: Plan) -> int:
    """Columns per stored maximum: 32 (:func:`_softmax_kept`), or a narrower cosine tile."""
    return min(p.config.cos.block_n, 32)


def exp_groups(o: UnitsfaceOptions, x: torch.Tensor, columns: int) -> int:
    """G, the groups of columns of a forward over `columns` classes that keeps its
    exponentials: exp_rows has G + 1 rows (the contract's fake asks this too)."""
    p = plan(x.shape[0], columns, x.shape[1], x.dtype, x.device, 0, sub_centres=o.k)
    return triton.cdiv(columns, exp_group_width(p))


def exp_width(columns: int, groups: int) -> int:
    """The width of the forward's groups of columns, from their count G over `columns` (a
    power of two, the only one that gives G groups where G > 1; where G = 1, any ≥ columns
    does): the backward reads the stored maxima with the forward's tiling, whatever its own
    (the persistent knob may differ between them)."""
    return triton.next_power_of_2(triton.cdiv(columns, groups))


def resident_programs(p: Plan, n_cols: int) -> int:
    """The programs of a resident cosine launch over n_cols columns: L per row block
    (:func:`_lanes`)."""
    return _lanes(p, p.row_blocks, triton.cdiv(n_cols, p.config.cos.block_n))


def resident_dw_programs(p: Plan, n_cols: int) -> int:
    """The programs of a resident ∂W launch over n_cols columns (Plan.dw_resident): L per
    feature tile (:func:`_lanes`)."""
    t = p.dw_resident
    return _lanes(p, triton.cdiv(p.width, t.block_n), triton.cdiv(n_cols, t.block_m))


def _lanes(p: Plan, owners: int, tiles: int) -> int:
    """The programs of a resident launch whose `owners` (the resident blocks) take `tiles`
    tiles each: L per owner, L the most that keeps the launch within
    FusedConfig.persistent (at least 1: more owners than that run in waves) and no more
    than the tiles."""
    return owners * min(max(1, p.config.persistent // owners), tiles)


def forward_w_alone(p: Plan, keep: bool) -> bool:
    """Whether the forward's W programs run as one launch over all of S (their partials and
    e' are per column: they need no chunk), where they have a launch of their own anyway —
    persistent programs, or (`keep`) the stored exponentials — rather than beside the
    bank's in each chunk's launch."""
    return bool(p.config.persistent) or keep


def dw_launch(p: Plan, s: Sweep, g, xg, r, nr, has_valid, cpart, dr, col0, n_cols,
              per_class=1):
    """One _dw_kernel launch: the rows of ∂R (R = r, norms nr) of the columns
    [col0, col0 + n_cols) from the chunk's gradient tile g and x̂' = xg; per_class = K with
    the sweep's sub-centre columns (:meth:`Sweep.sub_centre_rows`: K per class of the chunk).
    With Plan.dw_resident, a _dw_resident_kernel launch instead, of
    :func:`resident_dw_programs`."""
    t = p.dw_resident or p.config.dw
    n_feat = triton.cdiv(p.width, t.block_n)
    f = s.flags
    col0, n_cols = col0 * per_class, n_cols * per_class
    if p.dw_resident is not None:
        assert per_class == 1, "the resident launches have no sub-centres"
        kernel, grid = _dw_resident_kernel, resident_dw_programs(p, n_cols)
        h_blocks = p.row_blocks  # (B ≤ 512: at most 4 on a GPU)
    else:
        kernel, grid = _dw_kernel, triton.cdiv(n_cols, t.block_m) * n_feat
        h_blocks = 0
    kernel[(grid,)](
        g, xg, r, nr, s.idx, s.valid, cpart, dr, p.rows, s.columns, p.width, col0, n_cols,
        p.chunk * per_class, n_feat, p.row_blocks, s.scalars["eps"], HAS_INDEX=f["HAS_INDEX"],
        HAS_VALID=has_valid, SCALE_G=f["SCALE_G"],
        H_BLOCKS=h_blocks, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BK=t.bk, XT=f["XT"], UPCAST=f["UPCAST"], num_warps=t.num_warps,
        num_stages=t.num_stages)


def dx_launch(p: Plan, s: Sweep, gw, gb, part, col0, n_cols, accumulate, *, has_w, has_bank,
              per_class=1):
    """One _dx_kernel launch: a chunk's split-K slices of ∂x (W and / or bank part), added to
    `part` (`accumulate`) or written (the first); per_class = K with the sweep's sub-centre
    columns (:meth:`Sweep.sub_centre_rows`, W alone: its K columns per class, slices K times
    as wide)."""
    assert per_class == 1 or not has_bank, "the bank's g tiles have one column per class"
    t = p.config.dx
    n_feat = triton.cdiv(p.width, t.block_n)
    f = s.flags
    _dx_kernel[(triton.cdiv(p.rows, t.block_m) * n_feat, p.splits)](
        gw, s.w, s.nw, gb, s.bank, s.nb, s.idx, s.valid, part, p.rows, p.width,
        col0 * per_class, n_cols * per_class, p.chunk * per_class, p.k_split * per_class,
        n_feat, int(accumulate), s.scalars["eps"], HAS_W=has_w,
        HAS_BANK=has_bank, HAS_INDEX=f["HAS_INDEX"], HAS_VALID=f["HAS_VALID"],
        SCALE_G=f["SCALE_G"], BLOCK_M=t.block_m, BLOCK_N=t.block_n, BK=t.bk, XT=f["XT"],
        UPCAST=f["UPCAST"], num_warps=t.num_warps, num_stages=t.num_stages)


def fused_forward(x, centres, bank, labels, index, bank_valid, bias, margin_rows, options,
                  row_grads=False, sparse_grad=False):
    """Per-row loss (softmax + λ·USS when `bank` is given) and the backward's statistics: the
    unitsface_fwd op of unitsface_kernels.contract (options: UnitsfaceOptions.pack()).

    With ``row_grads`` (x takes a gradient) and a pairs-form USS part, the forward also forms
    that part's per-row gradients, which need no global statistic: dx_rows = λ·∂USS_i/∂x_i
    [B, D] and db_rows = λ·∂USS_i/∂b [B] (zeros where there is no such part).

    Where ``options.keeps_exps`` allows it, the W programs also keep their tiles'
    exponentials, exps [B, S] in x's dtype and exp_rows [G + 1, B] (the maxima of the groups
    of 32 columns, :func:`exp_group_width`; the rows' raw target cosines), for the backward's
    :func:`_exps_grad_kernel`.

    Returns (rows, stats [7, B] (the rows of layouts.UnitsfaceStat), ||x_i||, the norms of
    W's rows of S (K per class: ||W[S_j·K + r]|| at j·K + r), ||bank[S_j]|| (empty without
    USS), dx_rows, db_rows, exps, exp_rows (both empty unless kept))."""
    o = UnitsfaceOptions.unpack(options)
    bsz, d = x.shape
    check_dtype(x.dtype, x.device)
    has_uss = bank is not None
    nx = row_norms(x)
    nw = row_norms(centres, None if index is None else class_row_ids(index, o.k), x.dtype)
    nb = row_norms(bank, index, x.dtype) if has_uss else nx.new_empty(0)
    s = _objective_sweep(x, centres, bank, labels, index, bank_valid, bias, margin_rows, o, nx,
                         nw, nb)
    acc = nx.dtype
    uss_rows = bool(row_grads) and has_uss and not o.uss_lse
    p = plan(bsz, s.columns, d, x.dtype, x.device, 1 if uss_rows else 0, sub_centres=o.k)
    kp = s.flags["KP"]  # the W programs' slots of fpart per column tile (sub-tiles)
    fpart = torch.empty(p.class_tiles * kp, N_FP, bsz, dtype=acc, device=x.device)
    gb = torch.empty(bsz, p.chunk if uss_rows else 0, dtype=out_dtype(x.dtype), device=x.device)
    part = torch.empty(p.splits if uss_rows else 0, bsz, d, dtype=acc, device=x.device)
    keep = o.keeps_exps(bsz, s.columns, x.element_size())
    exps = torch.empty((bsz, s.columns) if keep else (0,), dtype=out_dtype(x.dtype),
                       device=x.device)
    groups = triton.cdiv(s.columns, exp_group_width(p))
    exp_rows = torch.empty((groups + 1, bsz) if keep else (0,), dtype=acc, device=x.device)
    if keep:  # a row whose target is not among the columns (another shard's) reads 0
        exp_rows[-1].zero_()
    w_alone = forward_w_alone(p, keep)
    if w_alone:
        cos_launch(p, s, nx, nx, nx, fpart, exp_rows if keep else nx, exps if keep else gb, gb,
                   0, s.columns, backward=False, w_progs=True, bank_progs=False, store_e=keep)
    for k, (col0, n_cols) in enumerate(p.chunks()):
        if has_uss or not w_alone:
            cos_launch(p, s, nx, nx, nx, fpart, nx, gb, gb, col0, n_cols, backward=False,
                       w_progs=not w_alone, bank_progs=has_uss, store_gb=uss_rows)
        if uss_rows:
            dx_launch(p, s, gb, gb, part, col0, n_cols, k > 0, has_w=False, has_bank=True)
    stats = torch.empty(len(UnitsfaceStat), bsz, dtype=acc, device=x.device)
    db_rows = torch.empty(bsz if uss_rows else 0, dtype=acc, device=x.device)
    rows = merge_partials(fpart, p.class_tiles, stats, uss=has_uss, lse_form=o.uss_lse,
                          clamp=o.uss_clamp, scale=o.scale, uss_weight=o.uss_weight, kp=kp,
                          db_rows=db_rows if uss_rows else None)
    if uss_rows:
        dx_rows = tangent_grad(part, x, nx, o.eps)
    elif row_grads:  # nothing of the kind here: the backward forms every part
        dx_rows, db_rows = nx.new_zeros(bsz, d), nx.new_zeros(bsz)
    else:
        dx_rows = nx.new_empty(0)
    return rows, stats, nx, nw, nb, dx_rows, db_rows, exps.to(x.dtype), exp_rows


def fused_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                   stats, nx, nw, nb, dx_rows, db_rows, exps, exp_rows, options, needs):
    """(∂x, ∂centres, ∂bias): the unitsface_bwd op of unitsface_kernels.contract; empty where
    not needed. ∂centres holds the rows of the index's classes (row j·K + r: sub-centre r of
    class S_j).

    Per chunk of classes: the cosine kernel (W programs for ∂x and ∂W, or with the forward's
    stored exponentials :func:`_exps_grad_kernel` instead; bank programs only where the
    forward did not form the USS part's row gradients, or for per-class thresholds), then
    the ∂W and ∂x products; then the finishing (finish.py, O(B·D + |S|)):
    ∂x_i = go_i·[(G_i − h_i·x̂_i)/max(‖x_i‖, eps) + dx_rows_i] and ∂b = −(1/s)·Σ go·g'."""
    o = UnitsfaceOptions.unpack(options)
    need_dx, need_dw, need_db = (bool(v) for v in needs)
    bsz, d = x.shape
    has_uss = bank is not None
    s = _objective_sweep(x, centres, bank, labels, index, bank_valid, bias, margin_rows, o, nx,
                         nw, nb)
    sw = s.sub_centre_rows(index)  # W's products: a column per sub-centre row
    k = o.k
    n_cls = s.columns
    vector_bias = s.flags["VECTOR_BIAS"]
    fwd_rows = has_uss and not o.uss_lse and dx_rows.numel() > 0
    acc = nx.dtype
    go = grad_rows.to(acc).contiguous()
    w_progs = need_dx or need_dw
    stored = exps.numel() > 0  # the W tiles come from the forward's exponentials
    store_gb = has_uss and need_dx and not fwd_rows
    row_gb = has_uss and need_db and not vector_bias and not fwd_rows
    col_gb = has_uss and need_db and vector_bias
    bank_progs = store_gb or row_gb or col_gb
    p = plan(bsz, n_cls, d, x.dtype, x.device, k * int(w_progs) + int(store_gb),
             sub_centres=k)
    dev = x.device
    gw = torch.empty(bsz, p.chunk * k if w_progs else 0, dtype=out_dtype(x.dtype), device=dev)
    gb = torch.empty(bsz, p.chunk if store_gb else 0, dtype=out_dtype(x.dtype), device=dev)
    gsum = torch.empty(p.class_tiles if row_gb else 0, bsz, dtype=acc, device=dev)
    cpart = torch.empty(p.row_blocks if (need_dw or col_gb) else 0, N_CP, n_cls * k,
                        dtype=acc, device=dev)
    part = torch.empty(p.splits if need_dx else 0, bsz, d, dtype=acc, device=dev)
    dw = torch.empty(n_cls * k if need_dw else 0, d, dtype=out_dtype(centres.dtype),
                     device=dev)
    xg = go_unit_rows(x, go, nx, o.eps) if need_dw else x
    lse = stats[UnitsfaceStat.LSE]
    if w_progs or bank_progs:
        for chunk, (col0, n_cols) in enumerate(p.chunks()):
            if stored and w_progs:
                exps_grad_launch(p, s, exps, exp_rows, go, lse, cpart, gw, col0, n_cols,
                                 need_dw)
            w_cos = w_progs and not stored
            if w_cos or bank_progs:
                cos_launch(p, s, go, lse, stats[USS_STATS], gsum, cpart, gw, gb, col0, n_cols,
                           backward=True, w_progs=w_cos, bank_progs=bank_progs,
                           store_gw=w_cos, col_h=need_dw, store_gb=store_gb, row_gb=row_gb,
                           col_gb=col_gb)
            if need_dw:
                dw_launch(p, sw, gw, xg, centres, nw, False, cpart, dw, col0, n_cols, k)
            if need_dx:
                # with K > 1 the W and bank tiles differ in width: two launches, W first
                both = store_gb and k == 1
                dx_launch(p, sw, gw, gb, part, col0, n_cols, chunk > 0, has_w=True,
                          has_bank=both, per_class=k)
                if store_gb and not both:
                    dx_launch(p, s, gw, gb, part, col0, n_cols, True, has_w=False,
                              has_bank=True)
    dx = dbias = None
    if need_dx:
        dx = tangent_grad(part, x, nx, o.eps, go=go, extra=dx_rows if fwd_rows else None,
                          dtype=x.dtype)
    if need_db:
        if vector_bias:  # one threshold per class: only the classes of S get one
            db = torch.zeros(bias.numel(), dtype=acc, device=dev)
            db[index if index is not None else slice(None)] = \
                cpart[:, CP_GSUM, :n_cls].sum(dim=0) / -o.scale
        elif fwd_rows:
            db = (go * db_rows).sum()
        else:
            db = (go * gsum.sum(dim=0)).sum() / -o.scale
        dbias = db.reshape(bias.shape).to(bias.dtype)
    dw = dw.to(centres.dtype) if need_dw else None
    # (a new empty tensor each: the outputs of a custom op must not alias each other)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, dbias))
