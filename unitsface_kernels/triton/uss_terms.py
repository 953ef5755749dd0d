"""The USS maths of docs/design.md §1.1 as Triton device functions (the Python statement is
reference.uss_z / uss_masks / uss_lse_terms), read by the bank programs of the fused cosine
kernel (fused._uss_part), which run the USS family and the objective's λ·USS part alike:

    z⁺_ij = b_j − s·(cos_ij − m)  (j ∈ P_i),        z⁻_ij = s·cos_ij − b_j  (j ∈ N_i)
    pairs: ∂L_i/∂cos_ij = −s·σ(z⁺) (P), s·σ(z⁻) (N)      (zero where the official clamp is
                                                          active)
    lse:   ∂L_i/∂cos_ij = −s·e^{z⁺ − A_i}·σ(A_i) (P), s·e^{z⁻ − B_i}·σ(B_i) (N)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .maths import clamp, sigmoid, softplus_sigmoid


@triton.jit
def uss_terms(cos, y, lj, rows, cols, row_ok, col_ok, b, scale, margin,
              IN_BATCH: tl.constexpr):
    """P and N masks of a cosine tile and each pair's softplus argument z: z⁺ in P, z⁻
    elsewhere (P and N are disjoint, so one tile holds both). Column j has the label lj[j] and
    the threshold b (one value, or a row of one per column: shape (1, N)); `col_ok` says which
    columns are read (loads.ref_rows_ok): the rest are in neither set. IN_BATCH: the batch is
    its own reference set, row `rows[i]` is column `cols[i]` and not its own positive."""
    ok = row_ok[:, None] & col_ok[None, :]
    same = y[:, None] == lj[None, :]
    pos = ok & same
    if IN_BATCH:
        pos = pos & (rows[:, None] != cols[None, :])
    neg = ok & (y[:, None] != lj[None, :])
    z = tl.where(pos, b - scale * (cos - margin), scale * cos - b)
    return pos, neg, z


@triton.jit
def uss_row_stats(stats_ptr, rows, row_ok, B):
    """The backward's per-row USS statistics (A, σA', B, σB' of the lse form, σ' zero where
    the official clamp is active or the set is empty), stored as four rows of B values from
    `stats_ptr`."""
    return (tl.load(stats_ptr + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0))


@triton.jit
def uss_pairs_grad(z, sig, pos, neg, scale, CLAMP: tl.constexpr):
    """The pairs form's ∂L_i/∂cos_ij from z and sig = σ(z): −s·σ(z⁺) (P), s·σ(z⁻) (N), zero
    outside P ∪ N and where the official clamp is active (its gradient: 1 inside [−s, s], 0
    outside; a NaN z keeps its NaN)."""
    g = scale * sig
    if CLAMP:
        g = tl.where((z < -scale) | (z > scale), 0.0, g)
    return tl.where(pos, -g, tl.where(neg, g, 0.0))


@triton.jit
def uss_pairs_grad_signed(z, sig, pos, scale, CLAMP: tl.constexpr):
    """:func:`uss_pairs_grad` where σ is already zero outside P ∪ N (z = −∞ there): −s·σ(z⁺)
    (P), s·σ elsewhere; one mask instead of two."""
    g = scale * sig
    if CLAMP:
        g = tl.where((z < -scale) | (z > scale), 0.0, g)
    return tl.where(pos, -g, g)


@triton.jit
def uss_grad(z, pos, neg, scale, a, fa, bn, fb, LSE: tl.constexpr, CLAMP: tl.constexpr):
    """∂L_i/∂cos_ij of USS for the saved statistics, zero outside P ∪ N (for lse, fa = σ(A_i)
    is already zero where the clamp on A_i is active, fb likewise)."""
    if LSE:
        g = scale * tl.exp(z - tl.where(pos, a[:, None], bn[:, None]))
        g = g * tl.where(pos, fa[:, None], fb[:, None])
        return tl.where(pos, -g, tl.where(neg, g, 0.0))
    return uss_pairs_grad(z, sigmoid(z), pos, neg, scale, CLAMP)


@triton.jit
def uss_lse_terms(stat, scale, CLAMP: tl.constexpr):
    """One lse statistic's part of the per-row loss and its backward factor (the Python
    statement: reference.uss_lse_terms): softplus(stat), 0 for an empty set (stat = −∞; the
    official clamp clamps stat to [−s, s] first); σ(stat) where the clamp is inactive, 0
    where it is active or the set is empty. A NaN statistic gives NaN in both."""
    empty = stat == float("-inf")
    arg = clamp(stat, -scale, scale) if CLAMP else stat
    sp, sig = softplus_sigmoid(arg)
    if CLAMP:  # (written so that a NaN counts as inside: it reaches the gradient)
        inside = ~((stat < -scale) | (stat > scale))
    else:
        inside = ~empty
    return tl.where(empty, 0.0, sp), tl.where(inside, sig, 0.0)
