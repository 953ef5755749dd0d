"""The margin-softmax maths of docs/design.md §1.2 as Triton device functions (the Python
statement is reference.target_logit).

    f(c)  = cos(θ + m2) − m3 = c·cos m2 − sin θ·sin m2 − m3
    exact (default):  sin θ = sqrt(max(1 − c², 1e-12)); insightface's fallback c − m2·sin m2 − m3
                      where θ + m2 > π (c ≤ −cos m2);
                      f'(c) = cos m2 + sin m2 · c / sin θ  (cos m2 where 1 − c² ≤ 1e-12; 1 on
                      the fallback)
    straight-through (ST, arcface_torch since 2022-12): sin θ = sqrt(max(1 − c², 0)), no
                      fallback, f' = 1
    easy margin (EASY): f(c) = c and f' = 1 where c ≤ 0 (then no fallback either)
    z_ic  = s·f(cos_ic) for c = y_i, s·cos_ic otherwise, with cos clamped to [−1, 1]
    ∂L_i/∂cos_ic = s·p_ic (c ≠ y_i),  s·(p_iy − 1)·f'(cos_iy),  p = softmax_c(z_ic)

f and f' are evaluated once per row (on the row's target cosine, picked out of the tile by a
row reduction), never on the whole tile: the tile's only transcendental is the exp of the
softmax. The trigonometric constants come precomputed: cos m2, sin m2 and m2·sin m2. A NaN
cosine stays NaN through the clamp and f, and so does its gradient: the clamp's gradient is
zero only where it is active, 1 at a NaN (reference.clamp_sym), so the NaN reaches ∂W of every
column the row meets, in every feature, even where ∂W has no projection (a centre below the
eps), as in the reference (docs/design.md §5).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .maths import clamp, clamp_min

SIN_FLOOR = tl.constexpr(1e-12)
"""The floor of 1 − cos² under sin θ in the exact form (reference.target_logit)."""


@triton.jit
def target_logit(c, m3, cos_m2, sin_m2, m2_sin_m2, ARC: tl.constexpr, ST: tl.constexpr,
                 EASY: tl.constexpr):
    """f(c) of the target class."""
    if ARC:
        if ST:
            f = c * cos_m2 - tl.sqrt(clamp_min(1.0 - c * c, 0.0)) * sin_m2
        else:
            f = c * cos_m2 - tl.sqrt(clamp_min(1.0 - c * c, SIN_FLOOR)) * sin_m2
            if not EASY:
                f = tl.where(c > -cos_m2, f, c - m2_sin_m2)  # NaN: c − m2_sin_m2 is NaN
        f = f - m3
    else:
        f = c - m3
    if EASY:
        f = tl.where(c > 0.0, f, c)
    return f


@triton.jit
def target_slope(c, cos_m2, sin_m2, ARC: tl.constexpr, ST: tl.constexpr, EASY: tl.constexpr):
    """f'(c) of the target class (1 for CosFace and straight-through)."""
    if ARC:
        if not ST:
            one_minus = 1.0 - c * c
            sin_t = tl.sqrt(clamp_min(one_minus, SIN_FLOOR))
            slope = tl.where(one_minus > SIN_FLOOR, cos_m2 + sin_m2 * c / sin_t, cos_m2)
            # where f(c) = c (easy margin, c ≤ 0) or on the fallback (c ≤ −cos m2): 1
            return tl.where(c > (0.0 if EASY else -cos_m2), slope, 1.0)
    return tl.full(c.shape, 1.0, c.dtype)


@triton.jit
def target_cos(c, is_target):
    """Per row, the clamped cosine of its target column in the tile (0 when the tile holds
    none; `is_target` marks at most one column per row, the index being unique)."""
    return tl.sum(tl.where(is_target, c, 0.0), axis=1)


@triton.jit
def softmax_logits(cos_raw, is_target, scale, m3, cos_m2, sin_m2, m2_sin_m2, ARC: tl.constexpr,
                   ST: tl.constexpr, EASY: tl.constexpr):
    """(clamped cos, z, the per-row target logit s·f(c_iy) — the row's target cosine taken
    from this tile, so meaningful only for rows whose target lies in it) of a cosine tile."""
    c = clamp(cos_raw, -1.0, 1.0)
    z_t = scale * target_logit(target_cos(c, is_target), m3, cos_m2, sin_m2, m2_sin_m2, ARC, ST,
                               EASY)
    z = tl.where(is_target, z_t[:, None], scale * c)
    return c, z, z_t


@triton.jit
def softmax_grad(cos_raw, c, z, is_target, ok, lse, scale, cos_m2, sin_m2, ARC: tl.constexpr,
                 ST: tl.constexpr, EASY: tl.constexpr):
    """∂L_i/∂cos_ic of the tile (zero outside `ok` and where the [−1, 1] clamp is active: the
    gradient of the reference's clamp, NaN at a NaN cosine); f' is taken per row."""
    p = tl.exp(z - lse[:, None])
    slope = target_slope(target_cos(c, is_target), cos_m2, sin_m2, ARC, ST, EASY)
    g = scale * tl.where(is_target, (p - 1.0) * slope[:, None], p)
    return tl.where(ok & ~((cos_raw < -1.0) | (cos_raw > 1.0)), g, 0.0)
