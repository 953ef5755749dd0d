"""The margin-softmax maths of docs/design.md §1.2 and of the margin family (§1.5) as Triton
device functions (the Python statement: reference.target_logit, reference.negative_cosines).

    f(c)  = cos(θ + a) − d = c·cos a − sin θ·sin a − d     (a, d = m2, m3, or per row a_i, d_i)
    exact (default):  sin θ = sqrt(max(1 − c², 1e-12)); insightface's fallback c − a·sin a − d
                      where θ + a > π (c ≤ −cos a), not with NO_FALLBACK (ElasticFace-Arc);
                      f'(c) = cos a + sin a · c / sin θ  (cos a where 1 − c² ≤ 1e-12; 1 on
                      the fallback)
    straight-through (ST, arcface_torch since 2022-12): sin θ = sqrt(max(1 − c², 0)), no
                      fallback, f' = 1
    easy margin (EASY): f(c) = c and f' = 1 where c ≤ 0 (then no fallback either)
    angle clip (ANGLE_CLIP, AdaFace): f = cos(clip(θ + a, ε, π − ε)) − d, no fallback; the clip
                      is decided in cosine space, per row: θ + a < ε ⇔ a < ε and
                      c > cos(ε − a); θ + a > π − ε ⇔ a > −ε and c < −cos(ε + a) (for
                      |a| < π − ε); f = ±cos ε − d and f' = 0 where it is active
    negatives:        n(c) = c·(T_i + c) where CURRICULAR and c > HARD_i (n' = T_i + 2c), else
                      c; then 0 with n' = 0 where FILTER and c > τ (insightface's inter-class
                      filtering, after the modulation)
    z_ic  = s·f(cos_ic) for c = y_i, s·n(cos_ic) otherwise, with cos clamped to ±lim
            (lim = 1 − ε with ANGLE_CLIP, else 1)
    ∂L_i/∂cos_ic = s·p_ic·n'(cos_ic) (c ≠ y_i),  s·(p_iy − 1)·f'(cos_iy),  p = softmax_c(z_ic)

f and f' are evaluated once per row (on the row's target cosine, picked out of the tile by a
row reduction), never on the whole tile: the tile's only transcendental is the exp of the
softmax. The trigonometric constants come precomputed: cos a, sin a and a·sin a — scalars
from the host for m2, or per row for the margin family's a_i (:func:`row_terms`, made once
per call on the device with the angle clip's bounds, HARD_i and T_i; the kernels read them
through :func:`row_margins` and :func:`curricular_rows`); the same functions take either. A
NaN cosine stays NaN through the clamp, f and n, and so does its gradient: the clamp's
gradient is zero only where it is active, 1 at a NaN (reference.clamp_sym), so the NaN reaches
∂W of every column the row meets, in every feature, even where ∂W has no projection (a centre
below the eps), as in the reference (docs/design.md §5).
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
import triton
import triton.language as tl

from ..layouts import MarginRow
from ..options import ANGLE_EPS, UnitsfaceOptions
from .maths import clamp, clamp_min

SIN_FLOOR = tl.constexpr(1e-12)
"""The floor of 1 − cos² under sin θ in the exact form (reference.target_logit)."""
COS_EPS = tl.constexpr(math.cos(ANGLE_EPS))
COS_LIMIT = tl.constexpr(1.0 - ANGLE_EPS)
"""AdaFace's clamp of every cosine (options.UnitsfaceOptions.cos_limit)."""
class RowTerm(IntEnum):
    """Rows of the per-row terms [8, B] (:func:`row_terms`) that the kernels read for the
    margin family: the target's d_i, cos a_i, sin a_i, a_i·sin a_i, the angle clip's bounds
    in cosine space, CurricularFace's HARD_i and T_i."""

    D = 0
    COS_A = 1
    SIN_A = 2
    A_SIN_A = 3
    CLIP_LO = 4
    CLIP_HI = 5
    HARD = 6
    T = 7


def needs_row_terms(o: UnitsfaceOptions) -> bool:
    """Whether the kernels read :func:`row_terms` for their target (ROW_MARGINS: per-row
    margins, or the angle clip's bounds) — CURRICULAR reads them for its negatives."""
    return o.row_margins or o.angle_clip


def row_terms(margin_rows: torch.Tensor | None, o: UnitsfaceOptions,
              like: torch.Tensor) -> torch.Tensor:
    """The per-row terms [8, B] (:class:`RowTerm`, in `like`'s dtype and device) made once per
    call, O(B) and no host synchronisation, so that the kernels evaluate no trigonometric
    function: a, d = margin_rows[A], [D] (``row_margins``) or m2, m3; the clip bounds
    θ + a < ε ⇔ c > cos(min(ε − a, π)) (where a < ε), θ + a > π − ε ⇔
    c < −cos(min(ε + a, π)) (where a > −ε), ±2 (never) elsewhere; HARD, T of margin_rows.
    `like` itself (unread) when the options need none."""
    if not (needs_row_terms(o) or o.curricular):
        return like
    out = like.new_zeros(len(RowTerm), like.shape[0])
    if needs_row_terms(o):
        if o.row_margins:
            a, d = (margin_rows[k].to(like.dtype) for k in (MarginRow.A, MarginRow.D))
        else:
            a, d = out[0] + o.margin_arc, out[0] + o.margin_cos
        out[RowTerm.D], out[RowTerm.COS_A], out[RowTerm.SIN_A] = d, torch.cos(a), torch.sin(a)
        out[RowTerm.A_SIN_A] = a * out[RowTerm.SIN_A]
    if o.angle_clip:
        out[RowTerm.CLIP_LO] = torch.where(
            a < ANGLE_EPS, torch.cos((ANGLE_EPS - a).clamp(max=math.pi)), 2.0)
        out[RowTerm.CLIP_HI] = torch.where(
            a > -ANGLE_EPS, -torch.cos((ANGLE_EPS + a).clamp(max=math.pi)), -2.0)
    if o.curricular:
        out[RowTerm.HARD] = margin_rows[MarginRow.HARD]
        out[RowTerm.T] = margin_rows[MarginRow.T]
    return out


_RT_D = tl.constexpr(int(RowTerm.D))
_RT_COS_A = tl.constexpr(int(RowTerm.COS_A))
_RT_SIN_A = tl.constexpr(int(RowTerm.SIN_A))
_RT_A_SIN_A = tl.constexpr(int(RowTerm.A_SIN_A))
_RT_CLIP_LO = tl.constexpr(int(RowTerm.CLIP_LO))
_RT_CLIP_HI = tl.constexpr(int(RowTerm.CLIP_HI))
_RT_HARD = tl.constexpr(int(RowTerm.HARD))
_RT_T = tl.constexpr(int(RowTerm.T))


@triton.jit
def row_term(rt_ptr, k: tl.constexpr, rows, row_ok, B):
    """Row k (:class:`RowTerm`) of the per-row terms [8, B] for a block of rows (0 past B)."""
    return tl.load(rt_ptr + k * B + rows, mask=row_ok, other=0.0)


@triton.jit
def curricular_rows(rt_ptr, rows, row_ok, B, CURRICULAR: tl.constexpr):
    """(HARD_i, T_i) of a block of rows: CurricularFace's hard-negative threshold and t (the
    row ids, unread, without CURRICULAR)."""
    if CURRICULAR:
        return (row_term(rt_ptr, _RT_HARD, rows, row_ok, B),
                row_term(rt_ptr, _RT_T, rows, row_ok, B))
    else:
        return rows, rows


@triton.jit
def row_margins(rt_ptr, rows, row_ok, B, m3, cos_m2, sin_m2, m2_sin_m2,
                ROW_MARGINS: tl.constexpr, ANGLE_CLIP: tl.constexpr):
    """The target's margin constants (d, cos a, sin a, a·sin a, lo, hi): the host's scalars
    for m2, m3, or with ROW_MARGINS those of the row block (:func:`row_terms`). lo, hi: the
    angle clip's bounds (θ + a < ε ⇔ c > lo, θ + a > π − ε ⇔ c < hi), read only with
    ANGLE_CLIP (which implies ROW_MARGINS: :func:`needs_row_terms`)."""
    if ROW_MARGINS:
        m3 = row_term(rt_ptr, _RT_D, rows, row_ok, B)
        cos_m2 = row_term(rt_ptr, _RT_COS_A, rows, row_ok, B)
        sin_m2 = row_term(rt_ptr, _RT_SIN_A, rows, row_ok, B)
        m2_sin_m2 = row_term(rt_ptr, _RT_A_SIN_A, rows, row_ok, B)
    if ANGLE_CLIP:
        lo = row_term(rt_ptr, _RT_CLIP_LO, rows, row_ok, B)
        hi = row_term(rt_ptr, _RT_CLIP_HI, rows, row_ok, B)
    else:
        lo = 2.0
        hi = -2.0
    return m3, cos_m2, sin_m2, m2_sin_m2, lo, hi


@triton.jit
def target_logit(c, m3, cos_m2, sin_m2, m2_sin_m2, lo, hi, ARC: tl.constexpr,
                 ST: tl.constexpr, EASY: tl.constexpr, NO_FALLBACK: tl.constexpr,
                 ANGLE_CLIP: tl.constexpr):
    """f(c) of the target class (the margins scalars or per-row vectors like c)."""
    if ARC:
        if ST:
            f = c * cos_m2 - tl.sqrt(clamp_min(1.0 - c * c, 0.0)) * sin_m2
        else:
            f = c * cos_m2 - tl.sqrt(clamp_min(1.0 - c * c, SIN_FLOOR)) * sin_m2
        if ANGLE_CLIP:  # NaN fails both comparisons: stays NaN
            f = tl.where(c > lo, COS_EPS, tl.where(c < hi, -COS_EPS, f))
        elif not (ST or EASY or NO_FALLBACK):
            f = tl.where(c > -cos_m2, f, c - m2_sin_m2)  # NaN: c − m2_sin_m2 is NaN
        f = f - m3
    else:
        f = c - m3
    if EASY:
        f = tl.where(c > 0.0, f, c)
    return f


@triton.jit
def target_slope(c, cos_m2, sin_m2, lo, hi, ARC: tl.constexpr, ST: tl.constexpr,
                 EASY: tl.constexpr, NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr):
    """f'(c) of the target class (1 for CosFace and straight-through)."""
    if ARC:
        if not ST:
            one_minus = 1.0 - c * c
            sin_t = tl.sqrt(clamp_min(one_minus, SIN_FLOOR))
            slope = tl.where(one_minus > SIN_FLOOR, cos_m2 + sin_m2 * c / sin_t, cos_m2)
            if ANGLE_CLIP:
                slope = tl.where((c > lo) | (c < hi), 0.0, slope)
            # where f(c) = c (easy margin, c ≤ 0) or on the fallback (c ≤ −cos a): 1
            if EASY:
                slope = tl.where(c > 0.0, slope, 1.0)
            elif not (NO_FALLBACK or ANGLE_CLIP):
                slope = tl.where(c > -cos_m2, slope, 1.0)
            return slope
    return tl.full(c.shape, 1.0, c.dtype)


@triton.jit
def negative_logit(c, hard, t, tau, CURRICULAR: tl.constexpr, FILTER: tl.constexpr):
    """n(c) of the negatives (hard, t: per row [BLOCK_M]; tau: τ)."""
    n = c
    if CURRICULAR:
        n = tl.where(c > hard[:, None], c * (t[:, None] + c), c)
    if FILTER:
        n = tl.where(c > tau, 0.0, n)
    return n


@triton.jit
def negative_grad(p, c, hard, t, tau, CURRICULAR: tl.constexpr, FILTER: tl.constexpr):
    """p·n'(c): the negatives' ∂L/∂cos over s."""
    if CURRICULAR:
        p = tl.where(c > hard[:, None], p * (t[:, None] + 2.0 * c), p)
    if FILTER:
        p = tl.where(c > tau, 0.0, p)
    return p


@triton.jit
def clamp_cos(cos_raw, ANGLE_CLIP: tl.constexpr):
    """(the cosines clamped to ±lim, where the clamp is active: |cos| > lim, false for NaN —
    the clamp's gradient is zero only there, so a NaN's passes)."""
    if ANGLE_CLIP:
        return (clamp(cos_raw, -COS_LIMIT, COS_LIMIT),
                (cos_raw < -COS_LIMIT) | (cos_raw > COS_LIMIT))
    else:
        return clamp(cos_raw, -1.0, 1.0), (cos_raw < -1.0) | (cos_raw > 1.0)


@triton.jit
def target_cos(cos_raw, is_target, ANGLE_CLIP: tl.constexpr):
    """Per row, the clamped cosine of its target column among the tile's (0 when the tile
    holds none; `is_target` marks at most one column per row, the index being unique, so
    over a tile taken in parts the parts' sum is the same)."""
    c, _ = clamp_cos(cos_raw, ANGLE_CLIP)
    return tl.sum(tl.where(is_target, c, 0.0), axis=1)


@triton.jit
def softmax_logits(cos_raw, is_target, c_t, scale, m3, cos_m2, sin_m2, m2_sin_m2, lo, hi, hard,
                   t, tau, ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                   NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                   CURRICULAR: tl.constexpr, FILTER: tl.constexpr):
    """(clamped cos, z, the per-row target logit s·f(c_iy)) of a cosine tile, c_t the rows'
    target cosines (:func:`target_cos` of the class tile, which may be larger than this
    part of it; meaningful only for rows whose target lies in it)."""
    c, _ = clamp_cos(cos_raw, ANGLE_CLIP)
    z_t = scale * target_logit(c_t, m3, cos_m2, sin_m2, m2_sin_m2, lo, hi, ARC, ST, EASY,
                               NO_FALLBACK, ANGLE_CLIP)
    z = tl.where(is_target, z_t[:, None],
                 scale * negative_logit(c, hard, t, tau, CURRICULAR, FILTER))
    return c, z, z_t


@triton.jit
def softmax_grad(cos_raw, c, c_t, z, is_target, ok, lse, scale, cos_m2, sin_m2, lo, hi, hard,
                 t, tau, ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                 NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                 CURRICULAR: tl.constexpr, FILTER: tl.constexpr):
    """∂L_i/∂cos_ic of the tile (zero outside `ok` and where the ±lim clamp is active: the
    gradient of the reference's clamp, NaN at a NaN cosine); f' is taken per row, at the
    target cosines c_t (as in :func:`softmax_logits`)."""
    return softmax_grad_p(tl.exp(z - lse[:, None]), cos_raw, c, c_t, is_target, ok, scale,
                          cos_m2, sin_m2, lo, hi, hard, t, tau, ARC, ST, EASY, NO_FALLBACK,
                          ANGLE_CLIP, CURRICULAR, FILTER)


@triton.jit
def softmax_grad_p(p, cos_raw, c, c_t, is_target, ok, scale, cos_m2, sin_m2, lo, hi, hard, t,
                   tau, ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr,
                   NO_FALLBACK: tl.constexpr, ANGLE_CLIP: tl.constexpr,
                   CURRICULAR: tl.constexpr, FILTER: tl.constexpr):
    """:func:`softmax_grad` from the probabilities p_ic = exp(z_ic − lse_i) (a caller that
    has them without the logits: fused._exps_grad_kernel)."""
    slope = target_slope(c_t, cos_m2, sin_m2, lo, hi, ARC, ST, EASY, NO_FALLBACK, ANGLE_CLIP)
    g = scale * tl.where(is_target, (p - 1.0) * slope[:, None],
                         negative_grad(p, c, hard, t, tau, CURRICULAR, FILTER))
    _, active = clamp_cos(cos_raw, ANGLE_CLIP)
    return tl.where(ok & ~active, g, 0.0)
