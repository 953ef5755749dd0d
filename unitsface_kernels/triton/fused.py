"""The partial-FC margin softmax and the one-pass UniTSFace objective (docs/design.md §1.2–§1.3).

The forward kernel and the backward kernel each stream once over tiles of the class index S
(all classes, or the partial-FC sample). For column j the class is c = S_j: the kernels read
W[c] (and, with USS, bank[c]) straight through the index, so no gathered copy of W exists and
only sampled rows are touched. Each program shares its x chunks, norms and labels between
the two losses:

    L_i = [lse_j z_ij − z_{i,y_i}] + λ·USS_i(x; bank[S], b, bank_valid[S])

The margin softmax is margin_softmax.py (CosFace / ArcFace, exact or straight-through, easy
margin); the USS part is the standalone loss's terms and gradient (common.uss_terms,
uss_pairs_sum, uss_grad), official clamp included. Bank rows marked invalid are read as zeros.

Forward: a grid of (row block, class slice) writes per-slice partials (online max / sum-exp
and the target logit, plus the USS statistics), merged on the host side in O(slices·B).

Backward: one kernel, one pass over the classes (the forward's tiling transposed): each program
owns a class tile and streams the row blocks, recomputing the cosine tiles from the merged
per-row statistics. ∂W[c] = (Σ_i g_ic x̂_i − h_c ŵ_c)/||w_c|| is owned by the program and
written in place at row c; the rows' G_i = Σ_j g_ij ŵ_j + Σ_j g'_ij b̂_j and h_i go to a
B × D fp32 accumulator by atomic adds (the flash-attention-2 backward's ∂Q pattern), so on
GPUs ∂x sums in a run-dependent order (fp32 rounding only).

Both kernels compute the cosines with the same K loop over D (:func:`_dots`), in BK-wide
chunks that feed the W and the bank dot alike.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from .. import reference
from ..options import UnitsfaceOptions
from .common import (EPS, check_width, fused_config, gather_chunk, inv_norm_of, lse_init,
                     merge_lse, mma, normalised_grad, num_splits, online_lse, out_dtype,
                     read_as, ref_rows_ok, row_block, scaled_cos, unit_rows, upcast_tiles,
                     uss_grad, uss_lse_finish, uss_pairs_sum, uss_row_stats, uss_terms)
from .margin_softmax import softmax_grad, softmax_logits
from .norms import row_norms

__all__ = ["fused_forward", "fused_backward", "check_deterministic"]

# The op's per-row statistics (unitsface_kernels.contract, stats [7, B]): the softmax's
# logsumexp, the USS lse statistics (A, σA', B, σB'), the target logit and the USS loss. The
# kernels read the first five; the last two serve class-parallel training.
STAT_LSE, STAT_USS_LSE, STAT_TARGET, STAT_USS = 0, slice(1, 5), 5, 6
N_STATS = 7

# The forward kernel's per-slice partials (out[split, k, i]): running max and sum-exp of z,
# Σ target logit, then the four USS partials (pairs: Σ softplus in the first).
PART_MAX, PART_SUMEXP, PART_TARGET, PART_USS = 0, 1, 2, 3
N_PARTIALS = tl.constexpr(7)

# params: scale, m3, cos m2, sin m2, m2·sin m2, USS margin, USS weight λ


@triton.jit
def _params(params_ptr):
    return (tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2),
            tl.load(params_ptr + 3), tl.load(params_ptr + 4), tl.load(params_ptr + 5),
            tl.load(params_ptr + 6))


@triton.jit
def _class_tile(idx_ptr, valid_ptr, nw_ptr, nb_ptr, cols, S, HAS_INDEX: tl.constexpr,
                HAS_USS: tl.constexpr, HAS_VALID: tl.constexpr):
    """A tile of columns: (class c = S_j (−1 for padding), column in range, bank row read
    (in range and valid; see common.ref_rows_ok), 1/max(||W[c]||, eps), 1/max(||bank[c]||, eps)
    (1 for bank rows not read, and without USS))."""
    ok = cols < S
    if HAS_INDEX:
        cls = tl.load(idx_ptr + cols, mask=ok, other=-1)
    else:
        cls = tl.where(ok, cols, -1)
    inv_w = inv_norm_of(nw_ptr, cols, ok)
    if HAS_USS:
        bank_ok = ref_rows_ok(valid_ptr, cls, ok, HAS_VALID)
        inv_b = inv_norm_of(nb_ptr, cols, bank_ok)
    else:
        bank_ok = ok
        inv_b = inv_w
    return cls, ok, bank_ok, inv_w, inv_b


@triton.jit
def _dots(x_ptr, rows, row_ok, w_ptr, bank_ptr, cls, col_ok, bank_ok, D, acc_like,
          HAS_USS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BK: tl.constexpr, UPCAST: tl.constexpr):
    """Raw dot products x_i · W[c] and x_i · bank[c] of a (row block, class tile), by a K loop
    over BK-wide feature chunks that share each x chunk (the bank tile stays zero without USS;
    bank rows not read are zeros), accumulated in the dtype of `acc_like`."""
    dot_w = tl.zeros((BLOCK_M, BLOCK_N), acc_like.dtype)
    dot_b = tl.zeros((BLOCK_M, BLOCK_N), acc_like.dtype)
    for k0 in range(0, D, BK):
        xk = gather_chunk(x_ptr, rows, row_ok, D, k0, BK, UPCAST)
        dot_w = mma(xk, tl.trans(gather_chunk(w_ptr, cls, col_ok, D, k0, BK, UPCAST)), dot_w)
        if HAS_USS:
            bank_k = gather_chunk(bank_ptr, cls, bank_ok, D, k0, BK, UPCAST)
            dot_b = mma(xk, tl.trans(bank_k), dot_b)
    return dot_w, dot_b


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                bias_ptr, bias_stride, params_ptr, out_ptr, B, S, D, tiles_per_split,
                HAS_INDEX: tl.constexpr, ARC: tl.constexpr, ST: tl.constexpr,
                EASY: tl.constexpr, HAS_USS: tl.constexpr, USS_LSE: tl.constexpr,
                USS_CLAMP: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    """out[split, k, i] (the PART_* layout): k = 0, 1 running max / sum-exp of z; 2 Σ target
    logit; 3..6 USS (pairs: 3 = Σ softplus; lse: max⁺, sumexp⁺, max⁻, sumexp⁻). The cosines
    come from :func:`_dots`, as in the backward, which with the same tiles recomputes them bit
    for bit (e.g. p = 1 exactly for a single class)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B)
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    m, se = lse_init(BLOCK_M, inv_x.dtype)
    zt = tl.zeros((BLOCK_M,), inv_x.dtype)
    m_p, s_p = lse_init(BLOCK_M, inv_x.dtype)  # pairs: s_p is the running Σ softplus
    m_n, s_n = lse_init(BLOCK_M, inv_x.dtype)
    col0 = split * tiles_per_split * BLOCK_N
    for t in range(tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        cls, col_ok, bank_ok, inv_w, inv_b = _class_tile(idx_ptr, valid_ptr, nw_ptr, nb_ptr,
                                                         cols, S, HAS_INDEX, HAS_USS,
                                                         HAS_VALID)
        dot_w, dot_b = _dots(x_ptr, rows, row_ok, w_ptr, bank_ptr, cls, col_ok, bank_ok, D,
                             inv_x, HAS_USS, BLOCK_M, BLOCK_N, BK, UPCAST)
        is_target = y[:, None] == cls[None, :]
        _, z = softmax_logits(scaled_cos(dot_w, inv_x, inv_w), is_target, scale, m3, cos_m2,
                              sin_m2, mm, ARC, ST, EASY)
        m, se = online_lse(m, se, z, col_ok[None, :])
        zt += tl.sum(tl.where(is_target & col_ok[None, :], z, 0.0), axis=1)  # −1: padding
        if HAS_USS:
            pos, neg, zu = uss_terms(scaled_cos(dot_b, inv_x, inv_b), y, cls, cls, rows, cols,
                                     row_ok, bank_ok, bias_ptr, bias_stride, scale, uss_m, False)
            if USS_LSE:
                m_p, s_p = online_lse(m_p, s_p, zu, pos)
                m_n, s_n = online_lse(m_n, s_n, zu, neg)
            else:
                s_p += uss_pairs_sum(zu, pos, neg, scale, USS_CLAMP)
    base = out_ptr + split * N_PARTIALS * B + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + B, se, mask=row_ok)
    tl.store(base + 2 * B, zt, mask=row_ok)
    if HAS_USS:
        tl.store(base + 3 * B, m_p if USS_LSE else s_p, mask=row_ok)
        tl.store(base + 4 * B, s_p, mask=row_ok)
        tl.store(base + 5 * B, m_n, mask=row_ok)
        tl.store(base + 6 * B, s_n, mask=row_ok)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, bank_ptr, nx_ptr, nw_ptr, nb_ptr, y_ptr, idx_ptr, valid_ptr,
                bias_ptr, bias_stride, params_ptr, go_ptr, stats_ptr, gx_ptr, hx_ptr, dw_ptr,
                gsum_ptr, B, S, D,
                HAS_INDEX: tl.constexpr, ARC: tl.constexpr, ST: tl.constexpr,
                EASY: tl.constexpr, HAS_USS: tl.constexpr, USS_LSE: tl.constexpr,
                USS_CLAMP: tl.constexpr, HAS_VALID: tl.constexpr, NEED_DX: tl.constexpr,
                NEED_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DC: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    """The whole backward in one pass over the classes. Program (j, k) owns class tile j and
    features [k·DC, (k+1)·DC) and streams every row block i: it recomputes the two cosine
    tiles (W and bank of the same classes, sharing the x chunks), forms g_ic (softmax) and
    g'_ic = λ·∂USS_i/∂cos_ic from the per-row statistics, and
      - accumulates Σ_i g_ic x̂_i and h_c = Σ_i g_ic cos_ic in registers; ∂W[c] =
        (Σ_i g_ic x̂_i − h_c ŵ_c)/max(||w_c||, eps) is written once, in place at row c;
      - adds G_i += Σ_j g_ij ŵ_j + g'_ij b̂_j (BK features at a time) and
        h_i += Σ_j g_ij cos_ij + g'_ij cos'_ij to fp32 B × D and B accumulators (gx, hx) by
        atomic adds: a program owns no rows (the B × D accumulator stays in L2);
      - sums Σ_i g'_ic per class into gsum, for ∂b.
    Programs with k > 0 recompute the cosines for their feature chunk; hx and gsum come from
    the k = 0 programs."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    d0 = tl.program_id(1) * DC
    first = d0 == 0
    cls, col_ok, bank_ok, inv_w, inv_b = _class_tile(idx_ptr, valid_ptr, nw_ptr, nb_ptr, cols, S,
                                                     HAS_INDEX, HAS_USS, HAS_VALID)
    scale, m3, cos_m2, sin_m2, mm, uss_m, uss_w = _params(params_ptr)
    acc_w = tl.zeros((BLOCK_N, DC), inv_w.dtype)
    h_c = tl.zeros((BLOCK_N,), inv_w.dtype)
    gsum = tl.zeros((BLOCK_N,), inv_w.dtype)
    n_blocks = tl.cdiv(B, BLOCK_M)
    for t in range(n_blocks):
        # Programs start on different row blocks, so that their atomic adds spread out.
        rows = ((t + pid) % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok, inv_x, y = row_block(nx_ptr, y_ptr, rows, B)
        go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)  # STAT_LSE
        dot_w, dot_b = _dots(x_ptr, rows, row_ok, w_ptr, bank_ptr, cls, col_ok, bank_ok, D,
                             inv_x, HAS_USS, BLOCK_M, BLOCK_N, BK, UPCAST)
        is_target = y[:, None] == cls[None, :]
        cos_w = scaled_cos(dot_w, inv_x, inv_w)
        c, z = softmax_logits(cos_w, is_target, scale, m3, cos_m2, sin_m2, mm, ARC, ST, EASY)
        g = softmax_grad(cos_w, c, z, is_target, row_ok[:, None] & col_ok[None, :], lse, scale,
                         cos_m2, sin_m2, ARC, ST, EASY) * go[:, None]
        if NEED_DW:
            h_c += tl.sum(g * cos_w, axis=0)
            x_part = gather_chunk(x_ptr, rows, row_ok, D, d0, DC, UPCAST)
            acc_w = mma(tl.trans(g.to(x_part.dtype)), unit_rows(x_part, inv_x), acc_w)
        if HAS_USS:
            a, fa, bn, fb = uss_row_stats(stats_ptr + B, rows, row_ok, B)  # STAT_USS_LSE
            cos_b = scaled_cos(dot_b, inv_x, inv_b)
            pos, neg, zu = uss_terms(cos_b, y, cls, cls, rows, cols, row_ok, bank_ok, bias_ptr,
                                     bias_stride, scale, uss_m, False)
            gu = uss_grad(zu, pos, neg, scale, a, fa, bn, fb, USS_LSE,
                          USS_CLAMP) * (go * uss_w)[:, None]
            gsum += tl.sum(gu, axis=0)
        if NEED_DX:
            h_x = tl.sum(g * cos_w, axis=1)
            if HAS_USS:
                h_x += tl.sum(gu * cos_b, axis=1)
            for k1 in range(d0, d0 + DC, BK):
                wk = unit_rows(gather_chunk(w_ptr, cls, col_ok, D, k1, BK, UPCAST), inv_w)
                part = mma(g.to(wk.dtype), wk, tl.zeros((BLOCK_M, BK), inv_w.dtype))
                if HAS_USS:
                    bank_k = unit_rows(gather_chunk(bank_ptr, cls, bank_ok, D, k1, BK, UPCAST),
                                       inv_b)
                    part = mma(gu.to(bank_k.dtype), bank_k, part)
                offs_k = k1 + tl.arange(0, BK)
                # int32 offsets: the B × D accumulator is far below 2^31 elements
                tl.atomic_add(gx_ptr + rows[:, None] * D + offs_k[None, :], part,
                              mask=row_ok[:, None] & (offs_k[None, :] < D), sem="relaxed")
            tl.atomic_add(hx_ptr + rows, h_x, mask=row_ok & first, sem="relaxed")
    if NEED_DW:
        # no projection below the eps (F.normalize's plain w/eps there); a NaN norm stays NaN
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=1.0)
        proj = tl.where(nw < EPS, 0.0, h_c) * inv_w
        w_own = gather_chunk(w_ptr, cls, col_ok, D, d0, DC, UPCAST)
        dw = inv_w[:, None] * (acc_w - proj[:, None] * w_own.to(acc_w.dtype))
        offs_d = d0 + tl.arange(0, DC)
        tl.store(dw_ptr + cols[:, None].to(tl.int64) * D + offs_d[None, :],
                 dw.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    if HAS_USS:
        tl.store(gsum_ptr + cols, gsum, mask=col_ok & first)


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
                   EASY=o.easy_margin, HAS_USS=has_uss, USS_LSE=o.uss_lse,
                   USS_CLAMP=o.uss_clamp, HAS_VALID=has_uss and bank_valid is not None,
                   UPCAST=upcast_tiles(x.dtype)))


def fused_forward(x, centres, bank, labels, index, bank_valid, bias, options, row_grads=False,
                  sparse_grad=False):
    """Per-row loss (softmax + λ·USS when `bank` is given) and the backward's statistics: the
    unitsface_fwd op of unitsface_kernels.contract (options: UnitsfaceOptions.pack(); no
    per-row gradients, row_grads must be False).

    Returns (rows, stats [N_STATS, B], ||x_i||, ||W[S_j]||, ||bank[S_j]|| (empty without USS),
    ∅, ∅)."""
    if row_grads:
        raise ValueError("the triton forward does not form per-row gradients (row_grads)")
    o = UnitsfaceOptions.unpack(options)
    centres, bank = read_as(centres, x), read_as(bank, x)
    bsz, d = x.shape
    check_width(d, x.dtype, x.device)
    a = _setup(x, centres, bank, index, bank_valid, bias, o)
    n_cls = a["n_classes"]
    nx = row_norms(x)
    nw = row_norms(centres, index)
    nb = row_norms(bank, index) if bank is not None else nx.new_empty(0)
    cfg = fused_config(d, x.device, x.dtype, backward=False)
    row_blocks = triton.cdiv(bsz, cfg.block_m)
    n_tiles = triton.cdiv(n_cls, cfg.block_n)
    splits = num_splits(row_blocks, n_tiles, x.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    out = torch.empty(splits, N_PARTIALS.value, bsz, dtype=nx.dtype, device=x.device)
    _fwd_kernel[(row_blocks, splits)](
        x, centres, a["bank"], nx, nw, nb if bank is not None else nw, labels, a["idx"],
        a["valid"], a["bias"], a["bias_stride"], a["params"], out, bsz, n_cls, d,
        tiles_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BK=cfg.bk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **a["flags"])
    stats = torch.zeros(N_STATS, bsz, dtype=nx.dtype, device=x.device)
    stats[STAT_LSE] = merge_lse(out[:, PART_MAX], out[:, PART_SUMEXP])
    stats[STAT_TARGET] = out[:, PART_TARGET].sum(dim=0)
    rows = stats[STAT_LSE] - stats[STAT_TARGET]
    if bank is not None:
        if o.uss_lse:
            stats[STAT_USS], stats[STAT_USS_LSE] = uss_lse_finish(out[:, PART_USS:], o.scale,
                                                                  o.uss_clamp)
        else:
            stats[STAT_USS] = out[:, PART_USS].sum(dim=0)
        rows = rows + o.uss_weight * stats[STAT_USS]
    # (two tensors: the outputs of a custom op must not alias each other)
    return rows, stats, nx, nw, nb, nx.new_empty(0), nx.new_empty(0)


def check_deterministic(device: torch.device) -> None:
    """torch.use_deterministic_algorithms(True) forbids (or, warn_only, warns about) the
    atomic adds of ∂x on a GPU, as PyTorch does for its own atomic ops; the native backend
    is deterministic. Under the interpreter the programs run in order: nothing to say."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    msg = ("the triton backend's backward of fused_margin_softmax_loss / fused_unitsface_loss "
           "sums ∂x with atomic adds, whose order (fp32 rounding) varies between runs; "
           "use backend='native' for a deterministic backward")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


def fused_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, stats, nx, nw,
                   nb, dx_rows, db_rows, options, needs):
    """(∂x, ∂centres, ∂bias): the unitsface_bwd op of unitsface_kernels.contract; empty where
    not needed. ∂centres holds the rows of the index's classes (row j: class S_j).

    One launch of :func:`_bwd_kernel` over (class tiles × feature chunks); then O(B·D + |S|)
    of host-side finishing: ∂x = (G − h·x̂)/max(||x||, eps) and ∂b = −(1/s)·Σ_i g'_ic."""
    o = UnitsfaceOptions.unpack(options)
    need_dx, need_dw, need_dbias = needs
    if need_dx:
        check_deterministic(x.device)
    w_dtype = centres.dtype
    centres, bank = read_as(centres, x), read_as(bank, x)
    bsz, d = x.shape
    a = _setup(x, centres, bank, index, bank_valid, bias, o)
    n_cls = a["n_classes"]
    cfg = fused_config(d, x.device, x.dtype, backward=True)
    acc = nx.dtype
    go = grad_rows.to(acc).contiguous()
    gx = torch.zeros(bsz if need_dx else 0, d, dtype=acc, device=x.device)
    hx = torch.zeros(bsz if need_dx else 0, dtype=acc, device=x.device)
    # every class of S gets its row (fp32 under the interpreter for bf16: see out_dtype)
    dw = torch.empty(n_cls if need_dw else 0, d, dtype=out_dtype(w_dtype), device=x.device)
    gsum = torch.empty(n_cls if bank is not None else 0, dtype=acc, device=x.device)
    # Feature chunks only serve the gradient accumulators; ∂b alone needs one program per tile.
    dc = cfg.dc if (need_dx or need_dw) else cfg.dp
    _bwd_kernel[(triton.cdiv(n_cls, cfg.block_n), cfg.dp // dc)](
        x, centres, a["bank"], nx, nw, nb if bank is not None else nw, labels, a["idx"],
        a["valid"], a["bias"], a["bias_stride"], a["params"], go, stats, gx, hx, dw, gsum,
        bsz, n_cls, d, NEED_DX=need_dx, NEED_DW=need_dw,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DC=dc, BK=cfg.bk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **a["flags"])
    dx = normalised_grad(gx, hx, x, nx).to(x.dtype) if need_dx else None
    dbias = None
    if need_dbias:
        if a["bias_stride"] == 1:  # one threshold per class: only the classes of S get one
            db = torch.zeros(bias.numel(), dtype=acc, device=x.device)
            db[index if index is not None else slice(None)] = -gsum / o.scale
        else:
            db = -gsum.sum() / o.scale
        dbias = db.reshape(bias.shape).to(bias.dtype)
    dw = dw.to(w_dtype) if need_dw else None
    # (a new empty tensor each: the outputs of a custom op must not alias each other)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, dbias))
