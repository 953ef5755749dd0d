"""The partial-FC margin softmax and the one-pass UniTSFace objective (DESIGN.md §1.2–§1.3).

One kernel streams over tiles of the class index S (all classes, or the partial-FC sample).
For column j the class is c = S_j: the kernel reads W[c] (and, with USS, bank[c]) straight
through the index, so no gathered copy of W exists and only sampled rows are touched. Each
program shares its x tile, norms and labels between the two losses:

    L_i = [lse_j z_ij − z_{i,y_i}] + λ·USS_i(x; bank[S], b, bank_valid[S])

Forward writes per-slice partials (online max / sum-exp and the target logit, plus the USS
statistics); the backward recomputes the tiles from the merged per-row statistics:
the row kernel accumulates G_i = Σ_j g_ij ŵ_j + λ Σ_j g'_ij b̂_j (and h_i likewise) for ∂x;
the column kernel accumulates Σ_i g_ij x̂_i per class for ∂W[c] (written in place at row c,
projected and scaled in the kernel) and the per-class ∂b for a vector threshold.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (NEG_BIG, check_width, cos_tile, mma, feature_chunk, gather_tile, inv_norm,
                     launch_config, load_tile, num_splits, softplus, upcast_tiles)
from .margin_softmax import softmax_grad, softmax_logits
from .norms import row_norms
from .uss import acc_dtype, lse_rows, merge_lse, normalised_grad, online_lse, uss_grad, uss_terms

# params: scale, m3, cos m2, sin m2, m2·sin m2, USS margin, USS weight λ
# per row: lse of the softmax, the USS lse statistics (A, σA, B, σB), the target logit and
# the USS loss; the kernels read the first five, the rest serve class-parallel training
_N_STATS = 7


@triton.jit
def _params(params_ptr):
    return (tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2),
            tl.load(params_ptr + 3), tl.load(params_ptr + 4), tl.load(params_ptr + 5),
            tl.load(params_ptr + 6))


@triton.jit
def _class_ids(idx_ptr, cols, S, HAS_INDEX: tl.constexpr):
    """(class c = S_j of each column, column in range)."""
    ok = cols < S
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=ok, other=-1)
    else:
        cls = tl.where(ok, cols, -1)
    return cls, ok


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                bias_ptr, bias_stride, params_ptr, out_ptr, B, S, D, tiles_per_split,
                HAS_INDEX: tl.constexpr, ARC: tl.constexpr, HAS_USS: tl.constexpr,
                USS_LSE: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DP: tl.constexpr, UPCAST: tl.constexpr):
    """out[split, k, i]: k = 0, 1 running max / sum-exp of z; 2 Σ target logit; 3..6 USS
    (pairs: 3 = Σ softplus; lse: max⁺, sumexp⁺, max⁻, sumexp⁻)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
    inv_x = inv_norm(tl.load(nx_ptr + rows, mask=row_ok, other=1.0))
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    m = tl.full((BLOCK_M,), NEG_BIG, inv_x.dtype)
    se = tl.zeros((BLOCK_M,), inv_x.dtype)
    zt = tl.zeros((BLOCK_M,), inv_x.dtype)
    m_p = tl.full((BLOCK_M,), NEG_BIG, inv_x.dtype)
    s_p = tl.zeros((BLOCK_M,), inv_x.dtype)
    m_n = tl.full((BLOCK_M,), NEG_BIG, inv_x.dtype)
    s_n = tl.zeros((BLOCK_M,), inv_x.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        cls, col_ok = _class_ids(idx_ptr, cols, S, HAS_INDEX)
        w_tile = gather_tile(w_ptr, cls, col_ok, D, DP, UPCAST)
        inv_w = inv_norm(tl.load(nw_ptr + cols, mask=col_ok, other=1.0))
        is_target = y[:, None] == cls[None, :]
        cos_c, z = softmax_logits(cos_tile(x_tile, w_tile, inv_x, inv_w), is_target, scale,
                                  m3, cos_m2, sin_m2, mm, ARC)
        m, se = online_lse(m, se, z, col_ok[None, :])
        zt += tl.sum(tl.where(is_target & col_ok[None, :], z, 0.0), axis=1)  # −1: padding
        if HAS_USS:
            b_tile = gather_tile(bank_ptr, cls, col_ok, D, DP, UPCAST)
            inv_b = inv_norm(tl.load(nb_ptr + cols, mask=col_ok, other=1.0))
            pos, neg, z_pos, z_neg = uss_terms(cos_tile(x_tile, b_tile, inv_x, inv_b), y, cls,
                                               cls, rows, cols, B, S, valid_ptr, bias_ptr,
                                               bias_stride, scale, uss_m, False, HAS_VALID)
            if USS_LSE:
                m_p, s_p = online_lse(m_p, s_p, z_pos, pos)
                m_n, s_n = online_lse(m_n, s_n, z_neg, neg)
            else:
                s_p += tl.sum(tl.where(pos, softplus(z_pos), 0.0)
                              + tl.where(neg, softplus(z_neg), 0.0), axis=1)
    base = out_ptr + split * 7 * B + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + B, se, mask=row_ok)
    tl.store(base + 2 * B, zt, mask=row_ok)
    if HAS_USS:
        tl.store(base + 3 * B, m_p if USS_LSE else s_p, mask=row_ok)
        tl.store(base + 4 * B, s_p, mask=row_ok)
        tl.store(base + 5 * B, m_n, mask=row_ok)
        tl.store(base + 6 * B, s_n, mask=row_ok)


@triton.jit
def _row_stats(stats_ptr, rows, row_ok, B):
    """Per-row statistics of the backward: lse of the softmax, USS (A, σA, B, σB)."""
    return (tl.load(stats_ptr + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 4 * B + rows, mask=row_ok, other=0.0))


@triton.jit
def _bwd_rows_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                     bias_ptr, bias_stride, params_ptr, go_ptr, stats_ptr, g_out_ptr, hs_out_ptr,
                     B, S, D, tiles_per_split,
                     HAS_INDEX: tl.constexpr, ARC: tl.constexpr, HAS_USS: tl.constexpr,
                     USS_LSE: tl.constexpr, HAS_VALID: tl.constexpr, NEED_DX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
                     DC: tl.constexpr, UPCAST: tl.constexpr):
    """Per slice: G_i (g_out), h_i = Σ g·cos over both losses and Σ_j g'_ij of USS (hs_out).
    Program (·, ·, k) accumulates features [k·DC, (k+1)·DC) of G_i (cosines need all D)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * DC
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
    inv_x = inv_norm(tl.load(nx_ptr + rows, mask=row_ok, other=1.0))
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    lse, a, fa, bn, fb = _row_stats(stats_ptr, rows, row_ok, B)
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    acc_g = tl.zeros((BLOCK_M, DC), inv_x.dtype)
    h = tl.zeros((BLOCK_M,), inv_x.dtype)
    gsum = tl.zeros((BLOCK_M,), inv_x.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        cls, col_ok = _class_ids(idx_ptr, cols, S, HAS_INDEX)
        w_tile = gather_tile(w_ptr, cls, col_ok, D, DP, UPCAST)
        inv_w = inv_norm(tl.load(nw_ptr + cols, mask=col_ok, other=1.0))
        is_target = y[:, None] == cls[None, :]
        cos_w = cos_tile(x_tile, w_tile, inv_x, inv_w)
        c, z = softmax_logits(cos_w, is_target, scale, m3, cos_m2, sin_m2, mm, ARC)
        g = softmax_grad(cos_w, c, z, is_target, row_ok[:, None] & col_ok[None, :], lse, scale,
                         cos_m2, sin_m2, ARC) * go[:, None]
        h += tl.sum(g * cos_w, axis=1)
        if NEED_DX:
            w_part = feature_chunk(w_tile, w_ptr, cls, col_ok, D, d0, DP, DC, UPCAST)
            acc_g = mma((g * inv_w[None, :]).to(w_tile.dtype), w_part, acc_g)
        if HAS_USS:
            b_tile = gather_tile(bank_ptr, cls, col_ok, D, DP, UPCAST)
            inv_b = inv_norm(tl.load(nb_ptr + cols, mask=col_ok, other=1.0))
            cos_b = cos_tile(x_tile, b_tile, inv_x, inv_b)
            pos, neg, z_pos, z_neg = uss_terms(cos_b, y, cls, cls, rows, cols, B, S, valid_ptr,
                                               bias_ptr, bias_stride, scale, uss_m, False,
                                               HAS_VALID)
            gu = uss_grad(z_pos, z_neg, pos, neg, scale, a, fa, bn, fb, USS_LSE,
                          False) * (go * uss_w)[:, None]
            h += tl.sum(gu * cos_b, axis=1)
            gsum += tl.sum(gu, axis=1)
            if NEED_DX:
                b_part = feature_chunk(b_tile, bank_ptr, cls, col_ok, D, d0, DP, DC, UPCAST)
                acc_g = mma((gu * inv_b[None, :]).to(b_tile.dtype), b_part, acc_g)
    if NEED_DX:
        offs_d = d0 + tl.arange(0, DC)
        g_ptrs = g_out_ptr + (split * B + rows[:, None]).to(tl.int64) * D + offs_d[None, :]
        tl.store(g_ptrs, acc_g, mask=row_ok[:, None] & (offs_d[None, :] < D))
    first = d0 == 0  # every feature chunk computes h and Σg; the first one writes them
    tl.store(hs_out_ptr + split * 2 * B + rows, h, mask=row_ok & first)
    tl.store(hs_out_ptr + split * 2 * B + B + rows, gsum, mask=row_ok & first)


@triton.jit
def _bwd_cols_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                     bias_ptr, bias_stride, params_ptr, go_ptr, stats_ptr, dw_ptr, dbias_ptr,
                     B, S, D,
                     HAS_INDEX: tl.constexpr, ARC: tl.constexpr, HAS_USS: tl.constexpr,
                     USS_LSE: tl.constexpr, HAS_VALID: tl.constexpr, NEED_DW: tl.constexpr,
                     NEED_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DP: tl.constexpr, DC: tl.constexpr, UPCAST: tl.constexpr):
    """∂W[c] = (Σ_i g_ic x̂_i − (Σ_i g_ic cos_ic)·ŵ_c) / max(||w_c||, eps) for the classes of
    this column block (features [k·DC, (k+1)·DC) in program (·, k)), and
    ∂b_c = −(1/s)·Σ_i g'_ic for a per-class USS threshold."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d0 = tl.program_id(1) * DC
    cls, col_ok = _class_ids(idx_ptr, cols, S, HAS_INDEX)
    w_tile = gather_tile(w_ptr, cls, col_ok, D, DP, UPCAST)
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
    inv_w = inv_norm(nw)
    if NEED_DBIAS:
        b_tile = gather_tile(bank_ptr, cls, col_ok, D, DP, UPCAST)
        inv_b = inv_norm(tl.load(nb_ptr + cols, mask=col_ok, other=1.0))
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    acc_g = tl.zeros((BLOCK_N, DC), inv_w.dtype)
    h = tl.zeros((BLOCK_N,), inv_w.dtype)
    gsum = tl.zeros((BLOCK_N,), inv_w.dtype)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
        inv_x = inv_norm(tl.load(nx_ptr + rows, mask=row_ok, other=1.0))
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
        lse, a, fa, bn, fb = _row_stats(stats_ptr, rows, row_ok, B)
        if NEED_DW:
            is_target = y[:, None] == cls[None, :]
            cos_w = cos_tile(x_tile, w_tile, inv_x, inv_w)
            c, z = softmax_logits(cos_w, is_target, scale, m3, cos_m2, sin_m2, mm, ARC)
            g = softmax_grad(cos_w, c, z, is_target, row_ok[:, None] & col_ok[None, :], lse,
                             scale, cos_m2, sin_m2, ARC) * go[:, None]
            h += tl.sum(g * cos_w, axis=0)
            x_part = feature_chunk(x_tile, x_ptr, rows, row_ok, D, d0, DP, DC, UPCAST)
            acc_g = mma(tl.trans((g * inv_x[:, None]).to(x_tile.dtype)), x_part, acc_g)
        if NEED_DBIAS:
            pos, neg, z_pos, z_neg = uss_terms(cos_tile(x_tile, b_tile, inv_x, inv_b), y, cls,
                                               cls, rows, cols, B, S, valid_ptr, bias_ptr,
                                               bias_stride, scale, uss_m, False, HAS_VALID)
            gu = uss_grad(z_pos, z_neg, pos, neg, scale, a, fa, bn, fb, USS_LSE,
                          False) * (go * uss_w)[:, None]
            gsum += tl.sum(gu, axis=0)
    if NEED_DW:
        proj = tl.where(nw >= 1e-5, h, 0.0) * inv_w
        w_part = feature_chunk(w_tile, w_ptr, cls, col_ok, D, d0, DP, DC, UPCAST)
        dw = inv_w[:, None] * (acc_g - proj[:, None] * w_part.to(acc_g.dtype))
        offs_d = d0 + tl.arange(0, DC)
        dw_ptrs = dw_ptr + cls[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & (offs_d[None, :] < D))
    if NEED_DBIAS:
        tl.store(dbias_ptr + cls, -gsum / scale, mask=col_ok & (d0 == 0))


def _setup(x, centres, bank, index, bank_valid, bias, scale, margin_arc, margin_cos,
           uss_margin, uss_weight):
    """Kernel arguments shared by forward and backward."""
    acc = acc_dtype(x)
    params = torch.tensor([scale, margin_cos, math.cos(margin_arc), math.sin(margin_arc),
                           margin_arc * math.sin(margin_arc), uss_margin, uss_weight],
                          dtype=acc, device=x.device)
    has_uss = bank is not None
    b = bias.detach().reshape(-1).to(acc).contiguous() if has_uss else params
    return dict(
        params=params, bias=b, bias_stride=1 if (has_uss and b.numel() > 1) else 0,
        bank=bank if has_uss else centres,
        idx=index if index is not None else params,
        valid=bank_valid if (has_uss and bank_valid is not None) else params,
        n_classes=centres.shape[0] if index is None else index.shape[0],
        flags=dict(HAS_INDEX=index is not None, ARC=margin_arc != 0.0, HAS_USS=has_uss,
                   HAS_VALID=has_uss and bank_valid is not None,
                   UPCAST=upcast_tiles(x.dtype)))


def fused_forward(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                  margin_cos, uss_margin, uss_weight, uss_lse):
    """Per-row loss (softmax + λ·USS when `bank` is given) and the backward's statistics.

    Returns (rows, stats [5, B], ||x_i||, ||W[S_j]||, ||bank[S_j]|| (empty without USS))."""
    bsz, d = x.shape
    check_width(d, x.dtype, x.device)
    a = _setup(x, centres, bank, index, bank_valid, bias, scale, margin_arc, margin_cos,
               uss_margin, uss_weight)
    n_cls = a["n_classes"]
    nx = row_norms(x)
    nw = row_norms(centres, index)
    nb = row_norms(bank, index) if bank is not None else nx.new_empty(0)
    cfg = launch_config(d, x.device, x.dtype)
    row_blocks = triton.cdiv(bsz, cfg.block_m)
    n_tiles = triton.cdiv(n_cls, cfg.block_n)
    splits = num_splits(row_blocks, n_tiles, x.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    out = torch.empty(splits, 7, bsz, dtype=nx.dtype, device=x.device)
    _fwd_kernel[(row_blocks, splits)](
        x, centres, a["bank"], nx, nw, nb if bank is not None else nw, labels, a["idx"],
        a["valid"], a["bias"], a["bias_stride"], a["params"], out, bsz, n_cls, d,
        tiles_per_split, USS_LSE=uss_lse, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **a["flags"])
    stats = torch.zeros(_N_STATS, bsz, dtype=nx.dtype, device=x.device)
    stats[0] = merge_lse(out[:, 0], out[:, 1])
    rows = stats[0] - out[:, 2].sum(dim=0)
    stats[5] = out[:, 2].sum(dim=0)
    if bank is not None:
        if uss_lse:
            stats[6], stats[1:5] = lse_rows(out[:, 3:], scale, False)
        else:
            stats[6] = out[:, 3].sum(dim=0)
        rows = rows + uss_weight * stats[6]
    return rows, stats, nx, nw, nb


def fused_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb,
                   stats, scale, margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                   need_dx, need_dw, need_dbias):
    """(∂x, ∂centres, ∂bias); None where not needed. ∂centres is zero outside the index."""
    bsz, d = x.shape
    a = _setup(x, centres, bank, index, bank_valid, bias, scale, margin_arc, margin_cos,
               uss_margin, uss_weight)
    n_cls = a["n_classes"]
    cfg = launch_config(d, x.device, x.dtype)
    go = grad_rows.to(nx.dtype).contiguous()
    nb_arg = nb if bank is not None else nw
    common = (x, centres, a["bank"], nx, nw, nb_arg, labels, a["idx"], a["valid"], a["bias"],
              a["bias_stride"], a["params"], go, stats)
    launch = dict(USS_LSE=uss_lse, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **a["flags"])
    vector_bias = a["bias_stride"] == 1
    dx = dw = dbias = None
    if need_dx or (need_dbias and not vector_bias):
        row_blocks = triton.cdiv(bsz, cfg.block_m)
        n_tiles = triton.cdiv(n_cls, cfg.block_n)
        splits = num_splits(row_blocks, n_tiles, x.device)
        g_part = torch.empty(splits if need_dx else 0, bsz, d, dtype=nx.dtype, device=x.device)
        hs = torch.empty(splits, 2, bsz, dtype=nx.dtype, device=x.device)
        _bwd_rows_kernel[(row_blocks, splits, cfg.dp // cfg.dc if need_dx else 1)](
            *common, g_part, hs, bsz, n_cls, d, triton.cdiv(n_tiles, splits), NEED_DX=need_dx,
            DC=cfg.dc if need_dx else cfg.dp, **launch)
        hs = hs.sum(dim=0)
        if need_dx:
            dx = normalised_grad(g_part.sum(dim=0), hs[0], x, nx).to(x.dtype)
        if need_dbias and not vector_bias:
            dbias = (-hs[1].sum() / scale).reshape(bias.shape).to(bias.dtype)
    need_dbias_vec = need_dbias and vector_bias
    if need_dw or need_dbias_vec:
        dw = (torch.zeros_like(centres) if index is not None else torch.empty_like(centres)) \
            if need_dw else centres.new_empty(0)
        db = torch.zeros(bias.numel() if need_dbias_vec else 0, dtype=nx.dtype, device=x.device)
        grid = (triton.cdiv(n_cls, cfg.block_n), cfg.dp // cfg.dc if need_dw else 1)
        _bwd_cols_kernel[grid](
            *common, dw, db, bsz, n_cls, d, NEED_DW=need_dw, NEED_DBIAS=need_dbias_vec,
            DC=cfg.dc if need_dw else cfg.dp, **launch)
        if need_dbias_vec:
            dbias = db.reshape(bias.shape).to(bias.dtype)
        if not need_dw:
            dw = None
    return dx, dw, dbias
