"""Fused USS loss (docs/design.md §1.1) in Triton: forward and hand-written backward, never a
B×N tensor.

Per tile of rows i and references j (cos from one ``tl.dot`` of full-width tiles):

    z⁺_ij = b_j − s·(cos_ij − m)  (j ∈ P_i),        z⁻_ij = s·cos_ij − b_j  (j ∈ N_i)
    pairs: L_i = Σ_P softplus(z⁺) + Σ_N softplus(z⁻)        (clamp: z → clamp(z, −s, s))
    lse:   A_i = lse_P z⁺,  B_i = lse_N z⁻,  L_i = softplus(A_i) + softplus(B_i)
                                                          (clamp: A, B → clamp(·, −s, s))

Forward: a grid of (row block, reference slice); each program keeps per-row running sums
(pairs) or running max / sum-exp pairs (lse) and writes them per slice; the slices are merged
on the host side in O(slices·B) (the lse finish is reference.uss_lse_terms).

Backward recomputes the cosine tiles and forms

    g_ij = ∂L/∂cos_ij = go_i · { −s·σ(z⁺) | s·σ(z⁻) }                         (pairs)
                       go_i · { −s·e^{z⁺ − A_i}·σ(A_i) | s·e^{z⁻ − B_i}·σ(B_i) }  (lse)

(zero where a clamp is active), then ∂L/∂b_j = −(1/s)·Σ_i g_ij, and the row kernel
accumulates G_i = Σ_j g_ij r̂_j and h_i = Σ_j g_ij cos_ij for
∂L/∂x_i = (G_i − h_i·x̂_i)/max(||x_i||, eps) (no projection when ||x_i|| < eps). The column
kernel does the same with the roles of x and r swapped for ∂L/∂r_j and the per-column bias.

The terms and their gradient are common.uss_terms / uss_pairs_sum / uss_grad, shared with the
fused objective (fused.py). Reference rows marked invalid are read as zeros (common.ref_rows_ok).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..options import UssOptions
from .common import (check_width, cos_tile, feature_chunk, gather_tile, inv_norm_of,
                     launch_config, lse_init, mma, normalised_grad, num_splits, online_lse,
                     read_as, ref_rows_ok, ref_rows_ok_again, row_block, unit_rows, upcast_tiles,
                     uss_grad, uss_lse_finish, uss_pairs_sum, uss_row_stats, uss_terms)
from .norms import row_norms

__all__ = ["uss_forward", "uss_backward"]


@triton.jit
def _ref_block(r_ptr, nr_ptr, l_ptr, valid_ptr, cols, N, D, DP: tl.constexpr,
               HAS_VALID: tl.constexpr, UPCAST: tl.constexpr):
    """Reference rows `cols`: which are read (in range and valid), their full-width tile,
    1/max(||r_j||, eps) and labels (rows not read: zeros, norm 1, label −1)."""
    col_ok = ref_rows_ok(valid_ptr, cols, cols < N, HAS_VALID)
    r_tile = gather_tile(r_ptr, cols, col_ok, D, DP, UPCAST)
    inv_r = inv_norm_of(nr_ptr, cols, col_ok)
    lj = tl.load(l_ptr + cols, mask=col_ok, other=-1)
    return col_ok, r_tile, inv_r, lj


@triton.jit
def _ref_chunk(r_tile, r_ptr, valid_ptr, cols, N, D, d0, DP: tl.constexpr, DC: tl.constexpr,
               HAS_VALID: tl.constexpr, UPCAST: tl.constexpr):
    """Features [d0, d0 + DC) of the reference rows `cols` (rows not read: zeros), for the
    gradient product: the tile itself when DC covers it, else reloaded (common.feature_chunk)
    with the validity read again, an L1 hit: kept from the start of the step instead, the mask
    stays live across the cosine product and ptxas spills more in the loop (bf16 D=512: 10 to
    14 spill instructions per step instead of 26 to 32)."""
    ok = ref_rows_ok_again(valid_ptr, cols, cols < N, HAS_VALID)
    return feature_chunk(r_tile, r_ptr, cols, ok, D, d0, DP, DC, UPCAST)


@triton.jit
def _x_block(x_ptr, nx_ptr, y_ptr, rows, B, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of x: in range, their full-width tile, 1/max(||x_i||, eps) and labels (the
    tile first: ptxas schedules the column kernel's loop with fewer spills that way)."""
    x_tile = gather_tile(x_ptr, rows, rows < B, D, DP, UPCAST)
    row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B)
    return row_ok, x_tile, inv_x, y


@triton.jit
def _uss_tile(x_tile, r_tile, inv_x, inv_r, y, lj, rows, cols, row_ok, col_ok, bias_ptr,
              bias_stride, scale, margin, IN_BATCH: tl.constexpr):
    """cos tile of the standalone loss (reference row j is column j) and its terms."""
    cos = cos_tile(x_tile, r_tile, inv_x, inv_r)
    pos, neg, z = uss_terms(cos, y, lj, cols, rows, cols, row_ok, col_ok, bias_ptr, bias_stride,
                            scale, margin, IN_BATCH)
    return cos, pos, neg, z


@triton.jit
def _ref_tile(x_tile, inv_x, y, rows, row_ok, cols, r_ptr, nr_ptr, l_ptr, valid_ptr, bias_ptr,
              bias_stride, scale, margin, N, D, IN_BATCH: tl.constexpr, HAS_VALID: tl.constexpr,
              DP: tl.constexpr, UPCAST: tl.constexpr):
    """The reference rows `cols` against a block of rows of x (the row-major kernels' step):
    (reference rows read, their tile, 1/max(||r_j||, eps), cos tile, P, N, z)."""
    col_ok, r_tile, inv_r, lj = _ref_block(r_ptr, nr_ptr, l_ptr, valid_ptr, cols, N, D, DP,
                                           HAS_VALID, UPCAST)
    cos, pos, neg, z = _uss_tile(x_tile, r_tile, inv_x, inv_r, y, lj, rows, cols, row_ok, col_ok,
                                 bias_ptr, bias_stride, scale, margin, IN_BATCH)
    return col_ok, r_tile, inv_r, cos, pos, neg, z


@triton.jit
def _params(params_ptr):
    """(scale, margin)."""
    return tl.load(params_ptr), tl.load(params_ptr + 1)


@triton.jit
def _uss_fwd_kernel(x_ptr, r_ptr, nx_ptr, nr_ptr, y_ptr, l_ptr, valid_ptr, bias_ptr, bias_stride,
                    params_ptr, out_ptr, B, N, D, tiles_per_split,
                    LSE: tl.constexpr, CLAMP: tl.constexpr, IN_BATCH: tl.constexpr,
                    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DP: tl.constexpr, UPCAST: tl.constexpr):
    """out[split, k, i]: pairs k=0 Σ softplus; lse k=0..3 (max⁺, sumexp⁺, max⁻, sumexp⁻)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, x_tile, inv_x, y = _x_block(x_ptr, nx_ptr, y_ptr, rows, B, D, DP, UPCAST)
    scale, margin = _params(params_ptr)
    m_p, s_p = lse_init(BLOCK_M, inv_x.dtype)  # pairs: s_p is the running Σ softplus
    m_n, s_n = lse_init(BLOCK_M, inv_x.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        _, _, _, _, pos, neg, z = _ref_tile(
            x_tile, inv_x, y, rows, row_ok, cols, r_ptr, nr_ptr, l_ptr, valid_ptr, bias_ptr,
            bias_stride, scale, margin, N, D, IN_BATCH, HAS_VALID, DP, UPCAST)
        if LSE:
            m_p, s_p = online_lse(m_p, s_p, z, pos)
            m_n, s_n = online_lse(m_n, s_n, z, neg)
        else:
            s_p += uss_pairs_sum(z, pos, neg, scale, CLAMP)
    base = out_ptr + split * 4 * B + rows
    if LSE:
        tl.store(base, m_p, mask=row_ok)
        tl.store(base + B, s_p, mask=row_ok)
        tl.store(base + 2 * B, m_n, mask=row_ok)
        tl.store(base + 3 * B, s_n, mask=row_ok)
    else:
        tl.store(base, s_p, mask=row_ok)


@triton.jit
def _uss_bwd_rows_kernel(x_ptr, r_ptr, nx_ptr, nr_ptr, y_ptr, l_ptr, valid_ptr, bias_ptr,
                         bias_stride, params_ptr, go_ptr, stats_ptr, g_out_ptr, hs_out_ptr,
                         B, N, D, tiles_per_split,
                         LSE: tl.constexpr, CLAMP: tl.constexpr, IN_BATCH: tl.constexpr,
                         HAS_VALID: tl.constexpr, NEED_DX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
                         DC: tl.constexpr, UPCAST: tl.constexpr):
    """Per slice: G_i = Σ_j g_ij r̂_j (g_out; features [k·DC, (k+1)·DC) in program (·, ·, k)),
    h_i = Σ_j g_ij cos_ij and Σ_j g_ij (hs_out)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * DC
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, x_tile, inv_x, y = _x_block(x_ptr, nx_ptr, y_ptr, rows, B, D, DP, UPCAST)
    go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    a, fa, bn, fb = uss_row_stats(stats_ptr, rows, row_ok, B)
    scale, margin = _params(params_ptr)
    acc_g = tl.zeros((BLOCK_M, DC), inv_x.dtype)
    h = tl.zeros((BLOCK_M,), inv_x.dtype)
    gsum = tl.zeros((BLOCK_M,), inv_x.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok, r_tile, inv_r, cos, pos, neg, z = _ref_tile(
            x_tile, inv_x, y, rows, row_ok, cols, r_ptr, nr_ptr, l_ptr, valid_ptr, bias_ptr,
            bias_stride, scale, margin, N, D, IN_BATCH, HAS_VALID, DP, UPCAST)
        g = uss_grad(z, pos, neg, scale, a, fa, bn, fb, LSE, CLAMP) * go[:, None]
        h += tl.sum(g * cos, axis=1)
        gsum += tl.sum(g, axis=1)
        if NEED_DX:
            r_part = _ref_chunk(r_tile, r_ptr, valid_ptr, cols, N, D, d0, DP, DC, HAS_VALID, UPCAST)
            acc_g = mma(g.to(r_tile.dtype), unit_rows(r_part, inv_r), acc_g)
    if NEED_DX:
        offs_d = d0 + tl.arange(0, DC)
        g_ptrs = g_out_ptr + (split * B + rows[:, None]).to(tl.int64) * D + offs_d[None, :]
        tl.store(g_ptrs, acc_g, mask=row_ok[:, None] & (offs_d[None, :] < D))
    first = d0 == 0  # every feature chunk computes h and Σg; the first one writes them
    tl.store(hs_out_ptr + split * 2 * B + rows, h, mask=row_ok & first)
    tl.store(hs_out_ptr + split * 2 * B + B + rows, gsum, mask=row_ok & first)


@triton.jit
def _uss_bwd_cols_kernel(x_ptr, r_ptr, nx_ptr, nr_ptr, y_ptr, l_ptr, valid_ptr, bias_ptr,
                         bias_stride, params_ptr, go_ptr, stats_ptr, g_out_ptr, hs_out_ptr,
                         B, N, D,
                         LSE: tl.constexpr, CLAMP: tl.constexpr, IN_BATCH: tl.constexpr,
                         HAS_VALID: tl.constexpr, NEED_DR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
                         DC: tl.constexpr, UPCAST: tl.constexpr):
    """Per reference row: G_j = Σ_i g_ij x̂_i (g_out; features [k·DC, (k+1)·DC) in program
    (·, k)), h_j = Σ_i g_ij cos_ij and Σ_i g_ij."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d0 = tl.program_id(1) * DC
    col_ok, r_tile, inv_r, lj = _ref_block(r_ptr, nr_ptr, l_ptr, valid_ptr, cols, N, D, DP,
                                           HAS_VALID, UPCAST)
    scale, margin = _params(params_ptr)
    acc_g = tl.zeros((BLOCK_N, DC), inv_r.dtype)
    h = tl.zeros((BLOCK_N,), inv_r.dtype)
    gsum = tl.zeros((BLOCK_N,), inv_r.dtype)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok, x_tile, inv_x, y = _x_block(x_ptr, nx_ptr, y_ptr, rows, B, D, DP, UPCAST)
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
        a, fa, bn, fb = uss_row_stats(stats_ptr, rows, row_ok, B)
        cos, pos, neg, z = _uss_tile(
            x_tile, r_tile, inv_x, inv_r, y, lj, rows, cols, row_ok, col_ok, bias_ptr,
            bias_stride, scale, margin, IN_BATCH)
        g = uss_grad(z, pos, neg, scale, a, fa, bn, fb, LSE, CLAMP) * go[:, None]
        h += tl.sum(g * cos, axis=0)
        gsum += tl.sum(g, axis=0)
        if NEED_DR:
            x_part = feature_chunk(x_tile, x_ptr, rows, row_ok, D, d0, DP, DC, UPCAST)
            acc_g = mma(tl.trans(g.to(x_tile.dtype)), unit_rows(x_part, inv_x), acc_g)
    if NEED_DR:
        offs_d = d0 + tl.arange(0, DC)
        g_ptrs = g_out_ptr + cols[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(g_ptrs, acc_g, mask=(cols < N)[:, None] & (offs_d[None, :] < D))
    first = d0 == 0
    tl.store(hs_out_ptr + cols, h, mask=(cols < N) & first)
    tl.store(hs_out_ptr + N + cols, gsum, mask=(cols < N) & first)


def _common_args(x, labels, ref_valid, bias, scale, margin):
    """Scale and margin as a device tensor of the accumulation dtype (kernel scalars would be
    fp32 and break float64 gradcheck), the bias flattened with its stride (0: one scalar b)."""
    acc = reference.compute_dtype(x.dtype)
    params = torch.tensor([scale, margin], dtype=acc, device=x.device)
    b = bias.detach().reshape(-1).to(acc).contiguous()
    valid = ref_valid if ref_valid is not None else labels  # a dummy pointer when unused
    return params, b, (0 if b.numel() == 1 else 1), valid


def uss_forward(x, ref, labels, ref_labels, ref_valid, bias, options):
    """Per-row loss L_i and the statistics the backward needs (the uss_fwd op of
    unitsface_kernels.contract; options: UssOptions.pack()).

    Returns (rows, stats, nx, nr): rows in fp32 (fp64 for fp64 inputs); stats is [4, B] =
    (A, σ(A)·[A unclamped], B, σ(B)·[B unclamped]) for lse and zeros for pairs.
    """
    o = UssOptions.unpack(options)
    ref = read_as(ref, x)
    bsz, d = x.shape
    n = ref.shape[0]
    check_width(d, x.dtype, x.device)
    nx = row_norms(x)
    nr = row_norms(ref)  # also in in-batch mode: the op's outputs must not alias each other
    cfg = launch_config(d, x.device, x.dtype)
    row_blocks = triton.cdiv(bsz, cfg.block_m)
    n_tiles = triton.cdiv(n, cfg.block_n)
    splits = num_splits(row_blocks, n_tiles, x.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    params, b, b_stride, valid = _common_args(x, labels, ref_valid, bias, o.scale, o.margin)
    out = torch.empty(splits, 4, bsz, dtype=nx.dtype, device=x.device)
    _uss_fwd_kernel[(row_blocks, splits)](
        x, ref, nx, nr, labels, ref_labels, valid, b, b_stride, params, out,
        bsz, n, d, tiles_per_split,
        LSE=o.lse, CLAMP=o.clamp, IN_BATCH=o.in_batch, HAS_VALID=ref_valid is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp, UPCAST=upcast_tiles(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not o.lse:
        return out[:, 0].sum(dim=0), torch.zeros(4, bsz, dtype=nx.dtype, device=x.device), nx, nr
    rows, stats = uss_lse_finish(out, o.scale, o.clamp)
    return rows, stats, nx, nr


def uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, stats, nx, nr, options,
                 needs):
    """(∂x, ∂ref, ∂bias) for the per-row upstream gradient ``grad_rows`` (the uss_bwd op of
    unitsface_kernels.contract); empty where not needed. Reference rows marked invalid get a
    zero gradient (they are read as zeros)."""
    o = UssOptions.unpack(options)
    need_dx, need_dref, need_dbias = needs
    ref_dtype, ref = ref.dtype, read_as(ref, x)
    bsz, d = x.shape
    n = ref.shape[0]
    cfg = launch_config(d, x.device, x.dtype)
    params, b, b_stride, valid = _common_args(x, labels, ref_valid, bias, o.scale, o.margin)
    go = grad_rows.to(nx.dtype).contiguous()
    flags = dict(LSE=o.lse, CLAMP=o.clamp, IN_BATCH=o.in_batch, HAS_VALID=ref_valid is not None,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp,
                 UPCAST=upcast_tiles(x.dtype), num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)
    dx = dref = dbias = None
    vector_bias = b.numel() > 1
    if need_dx or (need_dbias and not vector_bias):
        row_blocks = triton.cdiv(bsz, cfg.block_m)
        n_tiles = triton.cdiv(n, cfg.block_n)
        splits = num_splits(row_blocks, n_tiles, x.device)
        tiles_per_split = triton.cdiv(n_tiles, splits)
        g_part = torch.empty(splits if need_dx else 0, bsz, d, dtype=nx.dtype, device=x.device)
        hs = torch.empty(splits, 2, bsz, dtype=nx.dtype, device=x.device)
        _uss_bwd_rows_kernel[(row_blocks, splits, cfg.dp // cfg.dc if need_dx else 1)](
            x, ref, nx, nr, labels, ref_labels, valid, b, b_stride, params, go, stats,
            g_part, hs, bsz, n, d, tiles_per_split, NEED_DX=need_dx,
            DC=cfg.dc if need_dx else cfg.dp, **flags)
        hs = hs.sum(dim=0)
        if need_dx:
            dx = normalised_grad(g_part.sum(dim=0), hs[0], x, nx).to(x.dtype)
        if need_dbias and not vector_bias:
            dbias = (-hs[1].sum() / o.scale).reshape(bias.shape).to(bias.dtype)
    if need_dref or (need_dbias and vector_bias):
        g_ref = torch.empty(n if need_dref else 0, d, dtype=nx.dtype, device=x.device)
        hs_ref = torch.empty(2, n, dtype=nx.dtype, device=x.device)
        grid = (triton.cdiv(n, cfg.block_n), cfg.dp // cfg.dc if need_dref else 1)
        _uss_bwd_cols_kernel[grid](
            x, ref, nx, nr, labels, ref_labels, valid, b, b_stride, params, go, stats,
            g_ref, hs_ref, bsz, n, d, NEED_DR=need_dref, DC=cfg.dc if need_dref else cfg.dp,
            **flags)
        if need_dref:
            dref = normalised_grad(g_ref, hs_ref[0], ref, nr)
            if ref_valid is not None:  # (G and h of an invalid row are 0, its norm anything)
                dref = torch.where(ref_valid[:, None], dref, torch.zeros((), dtype=dref.dtype,
                                                                        device=dref.device))
            dref = dref.to(ref_dtype)
        if need_dbias and vector_bias:
            dbias = (-hs_ref[1] / o.scale).reshape(bias.shape).to(bias.dtype)
    # (a new empty tensor each: the outputs of a custom op must not alias each other)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dref, dbias))
