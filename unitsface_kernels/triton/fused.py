"""The partial-FC margin softmax and the UniTSFace objective (docs/design.md §1.2–§1.3) as
GEMM-shaped Triton kernels with the loss as their epilogue (docs/design.md §2).

Columns are the classes of the index S (all classes, or the partial-FC sample): column j is
class c = S_j, whose rows W[c] and bank[c] the kernels read in place through the index (no
gathered copy of W; only sampled rows are touched), in x's dtype (rows of another dtype are
rounded after the load: no host copy). Three kernels:

``_cos_kernel`` — the cosine tiles. A program is one (row block, class tile) against ONE
    reference matrix: W (the margin softmax) or the bank (λ·USS), both kinds in one launch,
    the row blocks of a class tile next to each other (its W and bank tiles stay in L2 while
    every row block reads them). A pipelined K loop over D, then the loss as the epilogue:
    forward — per (class tile, row) partials (the softmax's max / sum-exp / target logit,
    USS sums), merged across tiles afterwards in a fixed order (no atomics); backward — the
    gradient tile g = ∂L/∂cos from the merged statistics, stored in x's dtype into a B × chunk
    buffer, with its per-row (Σ_j g·cos, Σ_j g) and per-class (Σ_i go·g·cos, Σ_i go·g)
    partials.
``_dw_kernel`` — ∂W = g̃ᵀ·x̂' per chunk (M = classes, N = features, K = rows), the
    normalisation's projection as its epilogue; each compact row of ∂W is written once.
``_dx_kernel`` — ∂x += g̃·R per chunk (M = rows, N = features, K = the chunk's classes), cut
    into split-K slices whose fp32 partial sums carry over from chunk to chunk in program
    order (each slice adds to its own buffer); the slices are summed once at the end.

g̃ is g scaled by the reference rows' inverse norms (g_ij / max(‖r_j‖, eps)), so that both
products read raw rows: ∂x_i = Σ_j g̃_ij r_j is Σ_j g_ij r̂_j, and in ∂W the factor is the
output row's. In fp16 that scaling could overflow (1/eps = 1e5), so there g stays unscaled and
the ∂x product normalises its operand tiles instead (common.unit_rows); ∂W's epilogue takes
the factor. x̂' = go_i·x̂_i is a B × D operand made once per backward.

Per step (docs/design.md §2 lists the GEMM-equivalents of each form):

    forward:  [_cos_kernel (W and bank tiles) → _dx_kernel (bank)] per chunk, for the pairs
              USS form when x takes a gradient: its ∂x needs no global statistic, so the
              forward forms it (dx_rows, db_rows) and the backward never reads the bank;
              otherwise one _cos_kernel launch over all classes.
    backward: [_cos_kernel (W; bank only for the lse form, a per-class threshold or no
              forward ∂x) → _dw_kernel → _dx_kernel] per chunk.

A chunk holds as many classes as keep its gradient tiles (B × chunk in x's dtype) within
FusedConfig.chunk_bytes (L2-resident); the launches per chunk are fixed, so a step costs
O(1) launches per chunk and no block of B × |S|. Everything is summed in a fixed order: the
results are bitwise reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import reference
from ..options import UnitsfaceOptions
from .common import (EPS, NEG_BIG, FusedConfig, as_operand, check_width, clamp, fused_config,
                     inv_norm, inv_norm_of, merge_lse, mma, out_dtype,
                     ref_rows_ok, row_block, scaled_cos, softplus_sigmoid, tangent_grad, to_store,
                     unit_rows,
                     upcast_tiles, uss_grad, uss_lse_finish, uss_row_stats, uss_terms_of)
from .margin_softmax import softmax_grad, softmax_logits
from .norms import _TL_DTYPES, row_norms

__all__ = ["fused_forward", "fused_backward", "plan", "Plan"]

# The op's per-row statistics (unitsface_kernels.contract, stats [7, B]): the softmax's
# logsumexp, the USS lse statistics (A, σA', B, σB'), the target logit and the USS loss. The
# kernels read the first five; the last two serve class-parallel training.
STAT_LSE, STAT_USS_LSE, STAT_TARGET, STAT_USS = 0, slice(1, 5), 5, 6
N_STATS = 7

# The forward's per-(class tile, row) partials fpart[tile, k, i]: max and sum-exp of z, the
# target logit (W programs); the USS part (bank programs): pairs Σ softplus and Σ_j g'_ij
# (the latter with the forward's row gradients); lse (max⁺, sumexp⁺, max⁻, sumexp⁻).
FP_MAX, FP_SUMEXP, FP_TARGET, FP_USS, FP_GSUM = 0, 1, 2, 3, 4
N_FP = 7
_N_FP = tl.constexpr(N_FP)
# The backward's per-(class tile, row) partials gsum[tile, i] = Σ_j g'_ij (bank: a scalar
# threshold's ∂b), and per-(row block, class) partials cpart[block, k, j]: Σ_i go_i·g_ij·cos_ij
# (W: ∂W's projection), Σ_i go_i·g'_ij (bank: ∂b_j). ∂x's projection needs none: it is taken
# from the ∂x product itself (common.tangent_grad).
CP_HW, CP_GSUM = 0, 1
N_CP = 2
_N_CP = tl.constexpr(N_CP)

# params: scale, m3, cos m2, sin m2, m2·sin m2, USS margin, USS weight λ


@triton.jit
def _params(params_ptr):
    return (tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2),
            tl.load(params_ptr + 3), tl.load(params_ptr + 4), tl.load(params_ptr + 5),
            tl.load(params_ptr + 6))


@triton.jit
def _rows_chunk(ptr, ids, ok, D, k0, BK: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """Features [k0, k0 + BK) of rows `ids` of a row-major matrix with D columns (zero past D
    and where not `ok`), as x's dtype XT reads them (common.as_operand)."""
    offs = k0 + tl.arange(0, BK)
    t = tl.load(ptr + ids[:, None].to(tl.int64) * D + offs[None, :],
                mask=ok[:, None] & (offs[None, :] < D), other=0.0)
    return as_operand(t, XT, UPCAST)


@triton.jit
def _dots(x_ptr, rows, row_ok, r_ptr, ids, ok, D, acc, BK: tl.constexpr, XT: tl.constexpr,
          UPCAST: tl.constexpr):
    """acc + the raw dot products x_i · r[ids_j] (rows not `ok` read as zeros): the K loop
    over D in BK-wide steps, software-pipelined by the compiler (num_stages)."""
    for k0 in range(0, D, BK):
        xk = _rows_chunk(x_ptr, rows, row_ok, D, k0, BK, XT, UPCAST)
        rk = _rows_chunk(r_ptr, ids, ok, D, k0, BK, XT, UPCAST)
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
def _softmax_part(x_ptr, w_ptr, nw_ptr, go_ptr, stats_ptr, rowp_ptr, colp_ptr, g_ptr,
                  rows, row_ok, inv_x, y, cols, local, col_ok, cls, B, S, D, gtile, rb,
                  g_stride, scale, m3, cos_m2, sin_m2, mm,
                  BACKWARD: tl.constexpr, STORE_G: tl.constexpr, COL_H: tl.constexpr,
                  ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                  SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BK: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A W program: the margin softmax on one (row block, class tile)."""
    inv_w = inv_norm_of(nw_ptr, cols, col_ok)
    dots = _dots(x_ptr, rows, row_ok, w_ptr, cls, col_ok, D,
                 tl.zeros((BLOCK_M, BLOCK_N), inv_x.dtype), BK, XT, UPCAST)
    cos = scaled_cos(dots, inv_x, inv_w)
    is_target = (y[:, None] == cls[None, :]) & col_ok[None, :]  # −1: padding, or no target
    c, z, z_t = softmax_logits(cos, is_target, scale, m3, cos_m2, sin_m2, mm, ARC, ST, EASY)
    if not BACKWARD:
        out = rowp_ptr + gtile * (_N_FP * B) + rows
        zm = tl.where(col_ok[None, :], z, NEG_BIG)
        m = tl.max(zm, axis=1)
        se = tl.sum(tl.where(col_ok[None, :], tl.exp(zm - m[:, None]), 0.0), axis=1)
        has_t = tl.sum(is_target.to(tl.int32), axis=1) > 0
        tl.store(out, m, mask=row_ok)
        tl.store(out + B, se, mask=row_ok)
        tl.store(out + 2 * B, tl.where(has_t, z_t, 0.0), mask=row_ok)
    else:
        lse = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)  # STAT_LSE
        g = softmax_grad(cos, c, z, is_target, row_ok[:, None] & col_ok[None, :], lse, scale,
                         cos_m2, sin_m2, ARC, ST, EASY)
        if COL_H:
            go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
            tl.store(colp_ptr + rb * (_N_CP * S) + cols,
                     tl.sum(g * cos * go[:, None], axis=0), mask=col_ok)  # CP_HW
        if STORE_G:
            _store_g(g_ptr, g, inv_w, rows, local, row_ok, col_ok, g_stride, XT, SCALE_G,
                     UPCAST)


@triton.jit
def _uss_part(x_ptr, bank_ptr, nb_ptr, valid_ptr, bias_ptr, go_ptr, stats_ptr,
              rowp_ptr, colp_ptr, g_ptr, rows, row_ok, inv_x, y, cols, local, col_ok, cls,
              B, S, D, gtile, rb, g_stride, scale, uss_m, uss_w,
              BACKWARD: tl.constexpr, STORE_G: tl.constexpr, ROW_G: tl.constexpr,
              COL_G: tl.constexpr, USS_LSE: tl.constexpr, USS_CLAMP: tl.constexpr,
              HAS_VALID: tl.constexpr, VECTOR_BIAS: tl.constexpr, SCALE_G: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
              XT: tl.constexpr, UPCAST: tl.constexpr):
    """A bank program: λ·USS on one (row block, class tile); bank rows not read (invalid,
    padding) are zeros and in neither set. g' = λ·∂USS_i/∂cos_ij, without go (the forward
    forms it for the pairs form: it needs no global statistic)."""
    bank_ok = ref_rows_ok(valid_ptr, cls, col_ok, HAS_VALID)
    inv_b = inv_norm_of(nb_ptr, cols, bank_ok)
    dots = _dots(x_ptr, rows, row_ok, bank_ptr, cls, bank_ok, D,
                 tl.zeros((BLOCK_M, BLOCK_N), inv_x.dtype), BK, XT, UPCAST)
    cos = scaled_cos(dots, inv_x, inv_b)
    if VECTOR_BIAS:  # one threshold per class: b[c]
        b = tl.load(bias_ptr + cls, mask=bank_ok, other=0.0).to(cos.dtype)[None, :]
    else:
        b = tl.load(bias_ptr).to(cos.dtype)
    pos, neg, z = uss_terms_of(cos, y, cls, rows, cols, row_ok, bank_ok, b, scale, uss_m,
                               False)
    if not BACKWARD:
        out = rowp_ptr + gtile * (_N_FP * B) + 3 * B + rows  # FP_USS
        if USS_LSE:
            # one exponential per pair: each shifted by the maximum of its own set
            m_p = tl.max(tl.where(pos, z, NEG_BIG), axis=1)
            m_n = tl.max(tl.where(neg, z, NEG_BIG), axis=1)
            e = tl.exp(z - tl.where(pos, m_p[:, None], m_n[:, None]))
            tl.store(out, m_p, mask=row_ok)
            tl.store(out + B, tl.sum(tl.where(pos, e, 0.0), axis=1), mask=row_ok)
            tl.store(out + 2 * B, m_n, mask=row_ok)
            tl.store(out + 3 * B, tl.sum(tl.where(neg, e, 0.0), axis=1), mask=row_ok)
        else:
            zc = clamp(z, -scale, scale) if USS_CLAMP else z
            sp, sig = softplus_sigmoid(zc)  # one exponential for the loss and the gradient
            tl.store(out, tl.sum(tl.where(pos | neg, sp, 0.0), axis=1), mask=row_ok)
            if STORE_G:
                g = scale * sig
                if USS_CLAMP:  # the clamp's gradient: 0 outside [−s, s] (NaN z: NaN g)
                    g = tl.where((z < -scale) | (z > scale), 0.0, g)
                g = uss_w * tl.where(pos, -g, tl.where(neg, g, 0.0))
                tl.store(out + B, tl.sum(g, axis=1), mask=row_ok)  # FP_GSUM
                _store_g(g_ptr, g, inv_b, rows, local, row_ok, col_ok, g_stride, XT, SCALE_G,
                         UPCAST)
    else:
        a, fa, bn, fb = uss_row_stats(stats_ptr + B, rows, row_ok, B)  # STAT_USS_LSE
        g = uss_w * uss_grad(z, pos, neg, scale, a, fa, bn, fb, USS_LSE, USS_CLAMP)
        if ROW_G:
            tl.store(rowp_ptr + gtile * B + rows, tl.sum(g, axis=1), mask=row_ok)
        if COL_G:
            go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
            tl.store(colp_ptr + rb * (_N_CP * S) + S + cols, tl.sum(g * go[:, None], axis=0),
                     mask=col_ok)  # CP_GSUM
        if STORE_G:
            _store_g(g_ptr, g, inv_b, rows, local, row_ok, col_ok, g_stride, XT, SCALE_G,
                     UPCAST)


@triton.jit
def _cos_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                bias_ptr, params_ptr, go_ptr, stats_ptr, rowp_ptr, colp_ptr,
                gw_ptr, gb_ptr, B, S, D, col0, n_cols, n_row_blocks, tile0, g_stride,
                BACKWARD: tl.constexpr, W_PROGS: tl.constexpr, BANK_PROGS: tl.constexpr,
                STORE_GW: tl.constexpr, COL_H: tl.constexpr, STORE_GB: tl.constexpr,
                ROW_GB: tl.constexpr, COL_GB: tl.constexpr, HAS_INDEX: tl.constexpr,
                ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                USS_LSE: tl.constexpr, USS_CLAMP: tl.constexpr, HAS_VALID: tl.constexpr,
                VECTOR_BIAS: tl.constexpr, SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BK: tl.constexpr, XT: tl.constexpr,
                UPCAST: tl.constexpr):
    """Cosine tiles of the classes [col0, col0 + n_cols) of S (one chunk, or all of S): a
    program per (row block, class tile, reference matrix), row blocks fastest, then W before
    bank. Forward: rowp = fpart (N_FP per tile); backward: rowp = gsum (one row per tile),
    colp = cpart, g tiles into gw / gb (row i, column j − col0, row stride g_stride)."""
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    q = pid // n_row_blocks
    if W_PROGS and BANK_PROGS:
        tile = q // 2
    else:
        tile = q
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < n_cols
    cols = col0 + local
    # class ids and labels in 32 bits (< C): 32 columns of a tile per thread in registers
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=col_ok, other=-1).to(tl.int32)
    else:
        cls = tl.where(col_ok, cols, -1)
    row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B)
    y = y.to(tl.int32)
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    gtile = tile0 + tile
    # which matrix this program reads: decided at run time only when one launch holds both
    # kinds (a constexpr otherwise, so a single-kind kernel compiles one part alone)
    if W_PROGS and BANK_PROGS:
        w_prog = q % 2 == 0
    else:
        w_prog = W_PROGS
    if w_prog:
        _softmax_part(x_ptr, w_ptr, nw_ptr, go_ptr, stats_ptr, rowp_ptr, colp_ptr, gw_ptr,
                      rows, row_ok, inv_x, y, cols, local, col_ok, cls, B, S, D, gtile, rb,
                      g_stride, scale, m3, cos_m2, sin_m2, mm, BACKWARD, STORE_GW, COL_H,
                      ARC, ST, EASY, SCALE_G, BLOCK_M, BLOCK_N, BK, XT, UPCAST)
    else:
        _uss_part(x_ptr, bank_ptr, nb_ptr, valid_ptr, bias_ptr, go_ptr,
                  stats_ptr, rowp_ptr, colp_ptr, gb_ptr, rows, row_ok, inv_x, y, cols,
                  local, col_ok, cls, B, S, D, gtile, rb, g_stride, scale, uss_m, uss_w,
                  BACKWARD, STORE_GB, ROW_GB, COL_GB, USS_LSE, USS_CLAMP, HAS_VALID,
                  VECTOR_BIAS, SCALE_G, BLOCK_M, BLOCK_N, BK, XT, UPCAST)


@triton.jit
def _dw_kernel(g_ptr, xg_ptr, w_ptr, nw_ptr, idx_ptr, colp_ptr, dw_ptr, B, S, D, col0, n_cols,
               g_stride, n_feat_tiles, n_h_blocks, HAS_INDEX: tl.constexpr,
               SCALE_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BK: tl.constexpr, XT: tl.constexpr, UPCAST: tl.constexpr):
    """∂W of the chunk's classes (compact rows col0 + j of dw): acc = Σ_i g̃_ij·x̂'_i (K loop
    over the rows), then the epilogue (docs/design.md §2)

        ∂W_j = (acc or acc/max(‖w_j‖, eps)) − h_j·w_j / max(‖w_j‖, eps)²

    (no projection below the eps; a NaN norm stays NaN) with h_j = Σ_i go_i g_ij cos_ij summed
    over the cosine kernel's row blocks in order. A program per (class tile, feature tile),
    the feature tiles of a class tile next to each other (its g̃ block stays in L2)."""
    pid = tl.program_id(0)
    ct = pid // n_feat_tiles
    ft = pid % n_feat_tiles
    local = ct * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = local < n_cols
    cols = col0 + local
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
    h = tl.zeros((BLOCK_M,), acc.dtype)
    for r in range(n_h_blocks):
        h += tl.load(colp_ptr + r * (_N_CP * S) + cols, mask=col_ok, other=0.0)  # CP_HW
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
    inv_w = inv_norm(nw)
    proj = tl.where(nw < EPS, 0.0, h) * inv_w * inv_w
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    else:
        cls = cols
    w = as_operand(tl.load(w_ptr + cls[:, None].to(tl.int64) * D + feats[None, :],
                           mask=col_ok[:, None] & f_ok[None, :], other=0.0), XT, UPCAST)
    if not SCALE_G:
        acc = acc * inv_w[:, None]
    dw = acc - proj[:, None] * w.to(acc.dtype)
    tl.store(dw_ptr + cols[:, None].to(tl.int64) * D + feats[None, :],
             dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & f_ok[None, :])


@triton.jit
def _dx_slice(acc, g_ptr, r_ptr, nr_ptr, idx_ptr, valid_ptr, rows, row_ok, feats, f_ok, col0,
              k_lo, k_hi, D, g_stride, HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
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
            r = unit_rows(r, inv_norm_of(nr_ptr, cols, ok))
        acc = mma(a, r, acc)
    return acc


@triton.jit
def _dx_kernel(gw_ptr, w_ptr, nw_ptr, gb_ptr, bank_ptr, nb_ptr, idx_ptr, valid_ptr, part_ptr,
               B, D, col0, n_cols, g_stride, k_split, n_feat_tiles, accumulate,
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
    feats = (pid % n_feat_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    f_ok = feats < D
    k_lo = s * k_split
    k_hi = tl.minimum(k_lo + k_split, n_cols)
    acc = tl.zeros((BLOCK_M, BLOCK_N), part_ptr.dtype.element_ty)
    if HAS_W:
        acc = _dx_slice(acc, gw_ptr, w_ptr, nw_ptr, idx_ptr, valid_ptr, rows, row_ok, feats,
                        f_ok, col0, k_lo, k_hi, D, g_stride, HAS_INDEX, False, SCALE_G, BK, XT,
                        UPCAST)
    if HAS_BANK:
        acc = _dx_slice(acc, gb_ptr, bank_ptr, nb_ptr, idx_ptr, valid_ptr, rows, row_ok,
                        feats, f_ok, col0, k_lo, k_hi, D, g_stride, HAS_INDEX, HAS_VALID,
                        SCALE_G, BK, XT, UPCAST)
    ptrs = part_ptr + s * B * D + rows[:, None] * D + feats[None, :]
    mask = row_ok[:, None] & f_ok[None, :]
    if accumulate:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """How one call runs: the configuration, the chunks of classes, the ∂x product's split-K
    slices. `plan` is the only place that decides it (the cost model reads it too)."""

    config: FusedConfig
    rows: int          # B
    classes: int       # |S|
    width: int         # D
    chunk: int         # classes per chunk (a multiple of config.granule, or all of S)
    n_chunks: int
    splits: int        # split-K slices of the ∂x product
    k_split: int       # classes per slice (a multiple of config.dx.bk)

    @property
    def row_blocks(self) -> int:
        return triton.cdiv(self.rows, self.config.cos.block_m)

    @property
    def class_tiles(self) -> int:
        return triton.cdiv(self.classes, self.config.cos.block_n)

    def chunks(self):
        """(first column, columns) of every chunk, in order."""
        for k in range(self.n_chunks):
            col0 = k * self.chunk
            yield col0, min(self.chunk, self.classes - col0)

    @property
    def dx_tiles(self) -> int:
        return (triton.cdiv(self.rows, self.config.dx.block_m)
                * triton.cdiv(self.width, self.config.dx.block_n))


def plan(b: int, n_cls: int, d: int, dtype: torch.dtype, device: torch.device, g_buffers: int,
         config: FusedConfig | None = None) -> Plan:
    """Chunks and split-K slices of a call with B = b rows, |S| = n_cls classes, width d, that
    keeps `g_buffers` gradient tiles (B × chunk each) per chunk (0: one chunk, all of S)."""
    cfg = config or fused_config(d, device, dtype)
    n_cls = max(1, n_cls)
    granule = cfg.granule
    if g_buffers == 0:
        chunk, n_chunks = n_cls, 1
    else:
        if cfg.chunk:
            most = cfg.chunk
        else:
            per_class = b * dtype.itemsize * g_buffers
            most = max(granule, cfg.chunk_bytes // per_class // granule * granule)
        n_chunks = triton.cdiv(n_cls, most)
        chunk = min(most, triton.cdiv(triton.cdiv(n_cls, n_chunks), granule) * granule)
        n_chunks = triton.cdiv(n_cls, chunk)
    bk = cfg.dx.bk
    out_tiles = triton.cdiv(b, cfg.dx.block_m) * triton.cdiv(d, cfg.dx.block_n)
    splits = cfg.splits or max(1, cfg.programs // out_tiles)
    k_split = triton.cdiv(triton.cdiv(chunk, splits), bk) * bk
    splits = triton.cdiv(chunk, k_split)
    return Plan(cfg, b, n_cls, d, chunk, n_chunks, splits, k_split)


# ----------------------------------------------------------------------------- host side

def _setup(x, centres, bank, index, bank_valid, bias, o: UnitsfaceOptions):
    """Kernel arguments shared by forward and backward."""
    acc = reference.compute_dtype(x.dtype)
    params = torch.tensor([o.scale, o.margin_cos, math.cos(o.margin_arc), math.sin(o.margin_arc),
                           o.margin_arc * math.sin(o.margin_arc), o.uss_margin, o.uss_weight],
                          dtype=acc, device=x.device)
    has_uss = bank is not None
    b = bias.detach().reshape(-1).to(acc).contiguous() if has_uss else params
    return dict(
        params=params, bias=b, bias_stride=1 if (has_uss and b.numel() > 1) else 0,
        bank=bank if has_uss else centres,
        idx=index if index is not None else params,
        valid=bank_valid if (has_uss and bank_valid is not None) else params,
        n_classes=centres.shape[0] if index is None else index.shape[0],
        flags=dict(HAS_INDEX=index is not None, ARC=o.arc, ST=o.arcface_straight_through,
                   EASY=o.easy_margin, USS_LSE=o.uss_lse, USS_CLAMP=o.uss_clamp,
                   HAS_VALID=has_uss and bank_valid is not None, UPCAST=upcast_tiles(x.dtype),
                   VECTOR_BIAS=has_uss and b.numel() > 1,
                   SCALE_G=x.dtype != torch.float16, XT=_TL_DTYPES[x.dtype]))


def _cos_launch(p: Plan, x, centres, a, nx, nw, nb, labels, go, stats, rowp, colp, gw, gb,
                col0, n_cols, *, backward, w_progs, bank_progs, **flags):
    t = p.config.cos
    n_mats = int(w_progs) + int(bank_progs)
    grid = (p.row_blocks * triton.cdiv(n_cols, t.block_n) * n_mats,)
    _cos_kernel[grid](
        x, centres, a["bank"], nx, nw, nb, labels, a["idx"], a["valid"], a["bias"],
        a["params"], go, stats, rowp, colp, gw, gb, x.shape[0],
        a["n_classes"], x.shape[1], col0, n_cols, p.row_blocks, col0 // t.block_n, p.chunk,
        BACKWARD=backward, W_PROGS=w_progs, BANK_PROGS=bank_progs,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BK=t.bk, num_warps=t.num_warps,
        num_stages=t.num_stages, **flags, **a["flags"])


def _dx_launch(p: Plan, a, centres, nw, nb, gw, gb, part, col0, n_cols, k, *, has_w, has_bank):
    t = p.config.dx
    n_feat = triton.cdiv(p.width, t.block_n)
    f = a["flags"]
    _dx_kernel[(triton.cdiv(p.rows, t.block_m) * n_feat, p.splits)](
        gw, centres, nw, gb, a["bank"], nb, a["idx"], a["valid"], part, p.rows, p.width, col0,
        n_cols, p.chunk, p.k_split, n_feat, int(k > 0), HAS_W=has_w, HAS_BANK=has_bank,
        HAS_INDEX=f["HAS_INDEX"], HAS_VALID=f["HAS_VALID"], SCALE_G=f["SCALE_G"],
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BK=t.bk, XT=f["XT"], UPCAST=f["UPCAST"],
        num_warps=t.num_warps, num_stages=t.num_stages)


def fused_forward(x, centres, bank, labels, index, bank_valid, bias, options, row_grads=False,
                  sparse_grad=False):
    """Per-row loss (softmax + λ·USS when `bank` is given) and the backward's statistics: the
    unitsface_fwd op of unitsface_kernels.contract (options: UnitsfaceOptions.pack()).

    With ``row_grads`` (x takes a gradient) and a pairs-form USS part, the forward also forms
    that part's per-row gradients, which need no global statistic: dx_rows = λ·∂USS_i/∂x_i
    [B, D] and db_rows = λ·∂USS_i/∂b [B] (zeros where there is no such part).

    Returns (rows, stats [N_STATS, B], ||x_i||, ||W[S_j]||, ||bank[S_j]|| (empty without USS),
    dx_rows, db_rows)."""
    o = UnitsfaceOptions.unpack(options)
    bsz, d = x.shape
    check_width(d, x.dtype, x.device)
    a = _setup(x, centres, bank, index, bank_valid, bias, o)
    n_cls = a["n_classes"]
    has_uss = bank is not None
    nx = row_norms(x)
    nw = row_norms(centres, index, x.dtype)
    nb = row_norms(bank, index, x.dtype) if has_uss else nx.new_empty(0)
    acc = nx.dtype
    uss_rows = bool(row_grads) and has_uss and not o.uss_lse
    p = plan(bsz, n_cls, d, x.dtype, x.device, 1 if uss_rows else 0)
    fpart = torch.empty(p.class_tiles, N_FP, bsz, dtype=acc, device=x.device)
    gb = torch.empty(bsz, p.chunk if uss_rows else 0, dtype=out_dtype(x.dtype), device=x.device)
    part = torch.empty(p.splits if uss_rows else 0, bsz, d, dtype=acc, device=x.device)
    for k, (col0, n_cols) in enumerate(p.chunks()):
        _cos_launch(p, x, centres, a, nx, nw, nb if has_uss else nw, labels, nx, nx, fpart, nx,
                    gb, gb, col0, n_cols, backward=False, w_progs=True, bank_progs=has_uss,
                    STORE_GW=False, COL_H=False, STORE_GB=uss_rows, ROW_GB=False,
                    COL_GB=False)
        if uss_rows:
            _dx_launch(p, a, centres, nw, nb, gb, gb, part, col0, n_cols, k, has_w=False,
                       has_bank=True)
    stats = torch.zeros(N_STATS, bsz, dtype=acc, device=x.device)
    stats[STAT_LSE] = merge_lse(fpart[:, FP_MAX], fpart[:, FP_SUMEXP])
    stats[STAT_TARGET] = fpart[:, FP_TARGET].sum(dim=0)
    rows = stats[STAT_LSE] - stats[STAT_TARGET]
    if has_uss:
        if o.uss_lse:
            stats[STAT_USS], stats[STAT_USS_LSE] = uss_lse_finish(fpart[:, FP_USS:], o.scale,
                                                                  o.uss_clamp)
        else:
            stats[STAT_USS] = fpart[:, FP_USS].sum(dim=0)
        rows = rows + o.uss_weight * stats[STAT_USS]
    if uss_rows:
        dx_rows = tangent_grad(part.sum(dim=0), x, nx)
        db_rows = fpart[:, FP_GSUM].sum(dim=0) / -o.scale
    elif row_grads:  # nothing of the kind here: the backward forms every part
        dx_rows, db_rows = nx.new_zeros(bsz, d), nx.new_zeros(bsz)
    else:
        dx_rows, db_rows = nx.new_empty(0), nx.new_empty(0)
    return rows, stats, nx, nw, nb, dx_rows, db_rows


def fused_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, stats, nx, nw,
                   nb, dx_rows, db_rows, options, needs):
    """(∂x, ∂centres, ∂bias): the unitsface_bwd op of unitsface_kernels.contract; empty where
    not needed. ∂centres holds the rows of the index's classes (row j: class S_j).

    Per chunk of classes: the cosine kernel (W programs for ∂x and ∂W; bank programs only
    where the forward did not form the USS part's row gradients, or for per-class
    thresholds), then the ∂W and ∂x products; then O(B·D + |S|) of host-side finishing:
    ∂x_i = go_i·[(G_i − h_i·x̂_i)/max(‖x_i‖, eps) + dx_rows_i] and ∂b = −(1/s)·Σ go·g'."""
    o = UnitsfaceOptions.unpack(options)
    need_dx, need_dw, need_db = (bool(v) for v in needs)
    bsz, d = x.shape
    a = _setup(x, centres, bank, index, bank_valid, bias, o)
    n_cls = a["n_classes"]
    has_uss = bank is not None
    vector_bias = a["bias_stride"] == 1
    fwd_rows = has_uss and not o.uss_lse and dx_rows.numel() > 0
    acc = nx.dtype
    go = grad_rows.to(acc).contiguous()
    w_progs = need_dx or need_dw
    store_gb = has_uss and need_dx and not fwd_rows
    row_gb = has_uss and need_db and not vector_bias and not fwd_rows
    col_gb = has_uss and need_db and vector_bias
    bank_progs = store_gb or row_gb or col_gb
    p = plan(bsz, n_cls, d, x.dtype, x.device, int(w_progs) + int(store_gb))
    dev = x.device
    gw = torch.empty(bsz, p.chunk if w_progs else 0, dtype=out_dtype(x.dtype), device=dev)
    gb = torch.empty(bsz, p.chunk if store_gb else 0, dtype=out_dtype(x.dtype), device=dev)
    gsum = torch.empty(p.class_tiles if row_gb else 0, bsz, dtype=acc, device=dev)
    cpart = torch.empty(p.row_blocks if (need_dw or col_gb) else 0, N_CP, n_cls, dtype=acc,
                        device=dev)
    part = torch.empty(p.splits if need_dx else 0, bsz, d, dtype=acc, device=dev)
    dw = torch.empty(n_cls if need_dw else 0, d, dtype=out_dtype(centres.dtype), device=dev)
    inv_x = 1.0 / nx.clamp_min(reference.EPS)
    xg = (x.to(acc) * (go * inv_x)[:, None]).to(x.dtype) if need_dw else x
    if w_progs or bank_progs:
        for k, (col0, n_cols) in enumerate(p.chunks()):
            _cos_launch(p, x, centres, a, nx, nw, nb if has_uss else nw, labels, go, stats,
                        gsum, cpart, gw, gb, col0, n_cols, backward=True, w_progs=w_progs,
                        bank_progs=bank_progs, STORE_GW=w_progs, COL_H=need_dw,
                        STORE_GB=store_gb, ROW_GB=row_gb, COL_GB=col_gb)
            if need_dw:
                t = p.config.dw
                n_feat = triton.cdiv(d, t.block_n)
                _dw_kernel[(triton.cdiv(n_cols, t.block_m) * n_feat,)](
                    gw, xg, centres, nw, a["idx"], cpart, dw, bsz, n_cls, d, col0, n_cols,
                    p.chunk, n_feat, p.row_blocks, HAS_INDEX=a["flags"]["HAS_INDEX"],
                    SCALE_G=a["flags"]["SCALE_G"], BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                    BK=t.bk, XT=a["flags"]["XT"], UPCAST=a["flags"]["UPCAST"],
                    num_warps=t.num_warps,
                    num_stages=t.num_stages)
            if need_dx:
                _dx_launch(p, a, centres, nw, nb if has_uss else nw, gw, gb, part, col0, n_cols,
                           k, has_w=True, has_bank=store_gb)
    dx = dbias = None
    if need_dx:
        dx = tangent_grad(part.sum(dim=0), x, nx)
        if fwd_rows:
            dx = dx + dx_rows
        dx = (go[:, None] * dx).to(x.dtype)
    if need_db:
        if vector_bias:  # one threshold per class: only the classes of S get one
            db = torch.zeros(bias.numel(), dtype=acc, device=dev)
            db[index if index is not None else slice(None)] = \
                cpart[:, CP_GSUM].sum(dim=0) / -o.scale
        elif fwd_rows:
            db = (go * db_rows).sum()
        else:
            db = (go * gsum.sum(dim=0)).sum() / -o.scale
        dbias = db.reshape(bias.shape).to(bias.dtype)
    dw = dw.to(centres.dtype) if need_dw else None
    # (a new empty tensor each: the outputs of a custom op must not alias each other)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, dbias))
