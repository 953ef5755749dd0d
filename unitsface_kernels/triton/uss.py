"""Fused USS loss (DESIGN.md §1.1) in Triton: forward and hand-written backward, never a B×N tensor.

Per tile of rows i and references j (cos from one ``tl.dot`` of full-width tiles):

    z⁺_ij = b_j − s·(cos_ij − m)  (j ∈ P_i),        z⁻_ij = s·cos_ij − b_j  (j ∈ N_i)
    pairs: L_i = Σ_P softplus(z⁺) + Σ_N softplus(z⁻)        (clamp: z → clamp(z, −s, s))
    lse:   A_i = lse_P z⁺,  B_i = lse_N z⁻,  L_i = softplus(A_i) + softplus(B_i)
                                                          (clamp: A, B → clamp(·, −s, s))

Forward: a grid of (row block, reference slice); each program keeps per-row running sums
(pairs) or running max / sum-exp pairs (lse) and writes them per slice; the slices are merged
on the host side in O(slices·B).

Backward recomputes the cosine tiles and forms

    g_ij = ∂L/∂cos_ij = go_i · { −s·σ(z⁺) | s·σ(z⁻) }                         (pairs)
                       go_i · { −s·e^{z⁺ − A_i}·σ(A_i) | s·e^{z⁻ − B_i}·σ(B_i) }  (lse)

(zero where a clamp is active), then ∂L/∂b_j = −(1/s)·Σ_i g_ij, and the row kernel
accumulates G_i = Σ_j g_ij r̂_j and h_i = Σ_j g_ij cos_ij for
∂L/∂x_i = (G_i − h_i·x̂_i)/max(||x_i||, eps) (no projection when ||x_i|| < eps). The column
kernel does the same with the roles of x and r swapped for ∂L/∂r_j and the per-column bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (NEG_BIG, check_width, cos_tile, mma, feature_chunk, inv_norm, launch_config,
                     load_tile, num_splits, sigmoid, softplus, upcast_tiles)
from ..options import UssOptions
from .norms import row_norms



@triton.jit
def uss_terms(cos, y, l, ids, rows, cols, B, N, valid_ptr, bias_ptr, bias_stride, scale, margin,
              IN_BATCH: tl.constexpr, HAS_VALID: tl.constexpr):
    """P and N masks (out-of-range rows/columns in neither) and z⁺, z⁻ of a cosine tile.

    Column j is reference row `ids[j]` of the bank/validity/bias arrays (j itself, or the
    class S_j under partial FC), with label l[j]; `cols` serve the bounds and the in-batch
    self-exclusion."""
    col_ok = cols < N
    if HAS_VALID:
        col_ok = col_ok & (tl.load(valid_ptr + ids, mask=col_ok, other=0) != 0)
    ok = (rows[:, None] < B) & col_ok[None, :]
    pos = ok & (y[:, None] == l[None, :])
    if IN_BATCH:
        pos = pos & (rows[:, None] != cols[None, :])
    neg = ok & (y[:, None] != l[None, :])
    b = tl.load(bias_ptr + ids * bias_stride, mask=col_ok, other=0.0).to(cos.dtype)
    z_pos = b[None, :] - scale * (cos - margin)
    z_neg = scale * cos - b[None, :]
    return pos, neg, z_pos, z_neg


@triton.jit
def _uss_tile(x_tile, r_tile, nx, nr, y, l, rows, cols, B, N, valid_ptr, bias_ptr, bias_stride,
              scale, margin, IN_BATCH: tl.constexpr, HAS_VALID: tl.constexpr):
    """cos tile of the standalone loss (reference row j is column j) and its terms."""
    cos = cos_tile(x_tile, r_tile, inv_norm(nx), inv_norm(nr))
    pos, neg, z_pos, z_neg = uss_terms(cos, y, l, cols, rows, cols, B, N, valid_ptr, bias_ptr,
                                       bias_stride, scale, margin, IN_BATCH, HAS_VALID)
    return cos, pos, neg, z_pos, z_neg


@triton.jit
def uss_row_stats(stats_ptr, rows, row_ok, B):
    """The backward's per-row USS statistics (A, σA, B, σB of the lse form; see uss_forward),
    stored as four rows of B values from `stats_ptr`."""
    return (tl.load(stats_ptr + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0))


@triton.jit
def _ref_block(r_ptr, nr_ptr, l_ptr, cols, N, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Reference rows `cols`: full-width tile, norms and labels (padding: norm 1, label −1)."""
    r_tile = load_tile(r_ptr, cols, N, D, DP, UPCAST)
    nr = tl.load(nr_ptr + cols, mask=cols < N, other=1.0)
    l = tl.load(l_ptr + cols, mask=cols < N, other=-1)
    return r_tile, nr, l


@triton.jit
def online_lse(m, s, z, mask):
    """Merge the masked entries of a tile into the running (max, Σ exp(z − max)) per row."""
    zm = tl.where(mask, z, NEG_BIG)
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    s_new = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(zm - m_new[:, None]), 0.0), axis=1)
    return m_new, s_new


@triton.jit
def uss_grad(z_pos, z_neg, pos, neg, scale, a, fa, bn, fb,
              LSE: tl.constexpr, CLAMP: tl.constexpr):
    """g_ij / go_i = ∂L_i/∂cos_ij (see the module docstring)."""
    if LSE:
        # fa = σ(A_i), zeroed where the clamp on A_i is active (the same for fb and B_i).
        gp = -scale * tl.exp(z_pos - a[:, None]) * fa[:, None]
        gn = scale * tl.exp(z_neg - bn[:, None]) * fb[:, None]
    else:
        gp = -scale * sigmoid(z_pos)
        gn = scale * sigmoid(z_neg)
        if CLAMP:
            gp = tl.where((z_pos >= -scale) & (z_pos <= scale), gp, 0.0)
            gn = tl.where((z_neg >= -scale) & (z_neg <= scale), gn, 0.0)
    return tl.where(pos, gp, 0.0) + tl.where(neg, gn, 0.0)


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
    row_ok = rows < B
    x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
    nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    scale = tl.load(params_ptr)
    margin = tl.load(params_ptr + 1)
    m_p = tl.full((BLOCK_M,), NEG_BIG, nx.dtype)
    s_p = tl.zeros((BLOCK_M,), nx.dtype)
    m_n = tl.full((BLOCK_M,), NEG_BIG, nx.dtype)
    s_n = tl.zeros((BLOCK_M,), nx.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        r_tile, nr, l = _ref_block(r_ptr, nr_ptr, l_ptr, cols, N, D, DP, UPCAST)
        cos, pos, neg, z_pos, z_neg = _uss_tile(
            x_tile, r_tile, nx, nr, y, l, rows, cols, B, N, valid_ptr, bias_ptr, bias_stride,
            scale, margin, IN_BATCH, HAS_VALID)
        if LSE:
            m_p, s_p = online_lse(m_p, s_p, z_pos, pos)
            m_n, s_n = online_lse(m_n, s_n, z_neg, neg)
        else:
            if CLAMP:
                z_pos = tl.minimum(tl.maximum(z_pos, -scale), scale)
                z_neg = tl.minimum(tl.maximum(z_neg, -scale), scale)
            s_p += tl.sum(tl.where(pos, softplus(z_pos), 0.0) + tl.where(neg, softplus(z_neg), 0.0),
                          axis=1)
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
    row_ok = rows < B
    x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
    nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    a, fa, bn, fb = uss_row_stats(stats_ptr, rows, row_ok, B)
    scale = tl.load(params_ptr)
    margin = tl.load(params_ptr + 1)
    acc_g = tl.zeros((BLOCK_M, DC), nx.dtype)
    h = tl.zeros((BLOCK_M,), nx.dtype)
    gsum = tl.zeros((BLOCK_M,), nx.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        r_tile, nr, l = _ref_block(r_ptr, nr_ptr, l_ptr, cols, N, D, DP, UPCAST)
        cos, pos, neg, z_pos, z_neg = _uss_tile(
            x_tile, r_tile, nx, nr, y, l, rows, cols, B, N, valid_ptr, bias_ptr, bias_stride,
            scale, margin, IN_BATCH, HAS_VALID)
        g = uss_grad(z_pos, z_neg, pos, neg, scale, a, fa, bn, fb, LSE, CLAMP) * go[:, None]
        h += tl.sum(g * cos, axis=1)
        gsum += tl.sum(g, axis=1)
        if NEED_DX:
            gr = (g * inv_norm(nr)[None, :]).to(r_tile.dtype)
            r_part = feature_chunk(r_tile, r_ptr, cols, cols < N, D, d0, DP, DC, UPCAST)
            acc_g = mma(gr, r_part, acc_g)
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
    col_ok = cols < N
    r_tile, nr, l = _ref_block(r_ptr, nr_ptr, l_ptr, cols, N, D, DP, UPCAST)
    scale = tl.load(params_ptr)
    margin = tl.load(params_ptr + 1)
    acc_g = tl.zeros((BLOCK_N, DC), nr.dtype)
    h = tl.zeros((BLOCK_N,), nr.dtype)
    gsum = tl.zeros((BLOCK_N,), nr.dtype)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        x_tile = load_tile(x_ptr, rows, B, D, DP, UPCAST)
        nx = tl.load(nx_ptr + rows, mask=row_ok, other=1.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
        a, fa, bn, fb = uss_row_stats(stats_ptr, rows, row_ok, B)
        cos, pos, neg, z_pos, z_neg = _uss_tile(
            x_tile, r_tile, nx, nr, y, l, rows, cols, B, N, valid_ptr, bias_ptr, bias_stride,
            scale, margin, IN_BATCH, HAS_VALID)
        g = uss_grad(z_pos, z_neg, pos, neg, scale, a, fa, bn, fb, LSE, CLAMP) * go[:, None]
        h += tl.sum(g * cos, axis=0)
        gsum += tl.sum(g, axis=0)
        if NEED_DR:
            gx = (g * inv_norm(nx)[:, None]).to(x_tile.dtype)
            x_part = feature_chunk(x_tile, x_ptr, rows, row_ok, D, d0, DP, DC, UPCAST)
            acc_g = mma(tl.trans(gx), x_part, acc_g)
    if NEED_DR:
        offs_d = d0 + tl.arange(0, DC)
        g_ptrs = g_out_ptr + cols[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(g_ptrs, acc_g, mask=col_ok[:, None] & (offs_d[None, :] < D))
    first = d0 == 0
    tl.store(hs_out_ptr + cols, h, mask=col_ok & first)
    tl.store(hs_out_ptr + N + cols, gsum, mask=col_ok & first)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merge per-slice (max, sum-exp) pairs [slices, B] into logsumexp per row; −inf if empty."""
    top = m.max(dim=0).values
    total = (s * torch.exp(m - top)).sum(dim=0)
    # total == 0 only for an empty set; a NaN total stays NaN (NaN inputs are never hidden).
    return torch.where(total == 0, torch.full_like(top, -float("inf")), top + torch.log(total))


def _common_args(x, labels, ref_valid, bias, scale, margin):
    """Scale and margin as a device tensor of the accumulation dtype (kernel scalars would be
    fp32 and break float64 gradcheck), the bias flattened with its stride (0: one scalar b)."""
    acc = acc_dtype(x)
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
    scale, margin, lse, clamp, in_batch = o.scale, o.margin, o.lse, o.clamp, o.in_batch
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
    params, b, b_stride, valid = _common_args(x, labels, ref_valid, bias, scale, margin)
    out = torch.empty(splits, 4, bsz, dtype=nx.dtype, device=x.device)
    _uss_fwd_kernel[(row_blocks, splits)](
        x, ref, nx, nr, labels, ref_labels, valid, b, b_stride, params, out,
        bsz, n, d, tiles_per_split,
        LSE=lse, CLAMP=clamp, IN_BATCH=in_batch, HAS_VALID=ref_valid is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp, UPCAST=upcast_tiles(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not lse:
        return out[:, 0].sum(dim=0), torch.zeros(4, bsz, dtype=nx.dtype, device=x.device), nx, nr
    rows, stats = lse_rows(out[:, :4], scale, clamp)
    return rows, stats, nx, nr


def lse_rows(partial: torch.Tensor, scale: float, clamp: bool):
    """Per-row lse-form loss softplus(A) + softplus(B) from per-slice partials
    [slices, 4, B] = (max⁺, sumexp⁺, max⁻, sumexp⁻), and the backward's statistics
    [4, B] = (A, σ(A)·[A unclamped], B, σ(B)·[B unclamped]). An empty set adds 0."""
    rows = torch.zeros_like(partial[0, 0])
    stats = torch.empty_like(partial[0])
    for k in range(2):
        stat = merge_lse(partial[:, 2 * k], partial[:, 2 * k + 1])
        empty = stat == -float("inf")
        arg = stat.clamp(-scale, scale) if clamp else stat
        rows += torch.where(empty, torch.zeros_like(stat), torch.logaddexp(arg, torch.zeros_like(arg)))
        inside = (stat >= -scale) & (stat <= scale) if clamp else ~empty
        stats[2 * k] = stat
        stats[2 * k + 1] = torch.where(inside, torch.sigmoid(stat), torch.zeros_like(stat))
    return rows, stats


def normalised_grad(acc_g, h, t, norms):
    """(G − h·t̂) / max(||t||, eps), without the projection when ||t|| < eps."""
    inv = 1.0 / norms.clamp_min(1e-5)
    proj = torch.where(norms >= 1e-5, h, torch.zeros_like(h))
    return inv[:, None] * (acc_g - (proj * inv)[:, None] * t.to(acc_g.dtype))


def uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, stats, nx, nr, options,
                 needs):
    """(∂x, ∂ref, ∂bias) for the per-row upstream gradient ``grad_rows`` (the uss_bwd op of
    unitsface_kernels.contract); empty where not needed."""
    o = UssOptions.unpack(options)
    scale, margin, lse, clamp, in_batch = o.scale, o.margin, o.lse, o.clamp, o.in_batch
    need_dx, need_dref, need_dbias = needs
    bsz, d = x.shape
    n = ref.shape[0]
    cfg = launch_config(d, x.device, x.dtype)
    params, b, b_stride, valid = _common_args(x, labels, ref_valid, bias, scale, margin)
    go = grad_rows.to(nx.dtype).contiguous()
    flags = dict(LSE=lse, CLAMP=clamp, IN_BATCH=in_batch, HAS_VALID=ref_valid is not None,
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
            dbias = (-hs[1].sum() / scale).reshape(bias.shape).to(bias.dtype)
    if need_dref or (need_dbias and vector_bias):
        g_ref = torch.empty(n if need_dref else 0, d, dtype=nx.dtype, device=x.device)
        hs_ref = torch.empty(2, n, dtype=nx.dtype, device=x.device)
        grid = (triton.cdiv(n, cfg.block_n), cfg.dp // cfg.dc if need_dref else 1)
        _uss_bwd_cols_kernel[grid](
            x, ref, nx, nr, labels, ref_labels, valid, b, b_stride, params, go, stats,
            g_ref, hs_ref, bsz, n, d, NEED_DR=need_dref, DC=cfg.dc if need_dref else cfg.dp,
            **flags)
        if need_dref:
            dref = normalised_grad(g_ref, hs_ref[0], ref, nr).to(ref.dtype)
        if need_dbias and vector_bias:
            dbias = (-hs_ref[1] / scale).reshape(bias.shape).to(bias.dtype)
    empty = x.new_empty(0)
    return tuple(t if t is not None else empty for t in (dx, dref, dbias))
