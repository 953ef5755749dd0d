"""The margin-softmax maths of DESIGN.md §1.2 as Triton device functions.

    f(c)  = cos(θ + m2) − m3 = c·cos m2 − sin θ·sin m2 − m3,  sin θ = sqrt(max(1 − c², 1e-12))
            (insightface's fallback c − m2·sin m2 − m3 when θ + m2 > π, i.e. c ≤ −cos m2)
    f'(c) = cos m2 + sin m2 · c / sin θ   (cos m2 where 1 − c² ≤ 1e-12; 1 on the fallback)
    z_ic  = s·f(cos_ic) for c = y_i, s·cos_ic otherwise, with cos clamped to [−1, 1]
    ∂L_i/∂cos_ic = s·p_ic (c ≠ y_i),  s·(p_iy − 1)·f'(cos_iy),  p = softmax_c(z_ic)

The trigonometric constants come precomputed: cos m2, sin m2 and m2·sin m2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def target_logit(c, m3, cos_m2, sin_m2, m2_sin_m2, ARC: tl.constexpr):
    if ARC:
        sin_t = tl.sqrt(tl.maximum(1.0 - c * c, 1e-12))
        f = tl.where(c > -cos_m2, c * cos_m2 - sin_t * sin_m2, c - m2_sin_m2)
    else:
        f = c
    return f - m3


@triton.jit
def target_slope(c, cos_m2, sin_m2, ARC: tl.constexpr):
    if ARC:
        one_minus = 1.0 - c * c
        sin_t = tl.sqrt(tl.maximum(one_minus, 1e-12))
        slope = tl.where(one_minus > 1e-12, cos_m2 + sin_m2 * c / sin_t, cos_m2)
        return tl.where(c > -cos_m2, slope, 1.0)
    return tl.full(c.shape, 1.0, c.dtype)


@triton.jit
def softmax_logits(cos_raw, is_target, scale, m3, cos_m2, sin_m2, m2_sin_m2, ARC: tl.constexpr):
    """(clamped cos, z) of a cosine tile."""
    c = tl.minimum(tl.maximum(cos_raw, -1.0), 1.0)
    z = scale * tl.where(is_target, target_logit(c, m3, cos_m2, sin_m2, m2_sin_m2, ARC), c)
    return c, z


@triton.jit
def softmax_grad(cos_raw, c, z, is_target, ok, lse, scale, cos_m2, sin_m2, ARC: tl.constexpr):
    """∂L_i/∂cos_ic of the tile (zero outside `ok` and where the [−1, 1] clamp is active)."""
    p = tl.exp(z - lse[:, None])
    g = scale * tl.where(is_target, (p - 1.0) * target_slope(c, cos_m2, sin_m2, ARC), p)
    return tl.where(ok & (cos_raw >= -1.0) & (cos_raw <= 1.0), g, 0.0)
