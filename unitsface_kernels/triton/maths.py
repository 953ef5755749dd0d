"""Jitted per-element and per-tile maths shared by the fused kernels (docs/design.md §1, §2):
the one Triton statement of each (the margin softmax's own maths: margin_softmax.py; USS's:
uss_terms.py).

NaN and Inf in the data propagate (docs/design.md §5): tl.maximum / tl.minimum have maxnum
semantics (max(NaN, a) = a), so every clamp and max of a data value here is written with
comparisons that a NaN fails (:func:`clamp`, :func:`clamp_min`), and a NaN reaches the loss
and gradients of exactly the rows it touches, as in the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The running max of an empty set: finite, so exp(m_old - m_new) stays defined (a constexpr,
# since jitted code may only read constexpr globals).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def clamp(z, lo, hi):
    """z clamped to [lo, hi]; NaN stays NaN (tl.minimum / tl.maximum would drop it)."""
    return tl.where(z < lo, lo, tl.where(z > hi, hi, z))


@triton.jit
def clamp_min(z, lo):
    """max(z, lo); NaN stays NaN."""
    return tl.where(z < lo, lo, z)


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def softplus_sigmoid(z):
    """(softplus(z), σ(z)) from one exponential e = e^{−|z|} and one reciprocal r = 1/w of
    w = fl(1 + e): softplus = max(z, 0) + log1p(e), σ = r for z ≥ 0, e·r below. log1p(e) is
    log(w) + (e − (w − 1))·r: w − 1 is exact (e ≤ 1), so e − (w − 1) is the rounding error
    of 1 + e and the correction log(1 + e) − log(w) = log(1 − (w − 1 − e)/w) to first order,
    its second-order rest far below an ulp (log(w) alone loses all of an e below the rounding
    of 1 + e, which a pair term far below the threshold is; for w = 1 this is e itself).
    NaN stays NaN in both."""
    e = tl.exp(-tl.abs(z))
    w = 1.0 + e
    r = 1.0 / w
    log1p_e = tl.log(w) + (e - (w - 1.0)) * r
    return tl.where(z > 0.0, z, 0.0) + log1p_e, tl.where(z >= 0.0, 1.0, e) * r


@triton.jit
def inv_norm(norm, eps):
    """1 / max(‖t‖, eps): the scale of F.normalize(t, eps) (eps: the options' normalisation
    eps); NaN for a NaN norm."""
    return 1.0 / clamp_min(norm, eps)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation (fp64 for fp64); 'ieee' keeps fp32 out of TF32."""
    return tl.dot(a, b, acc=acc, input_precision="ieee")


@triton.jit
def scaled_cos(dots, inv_x, inv_r):
    """cos_ij = (x_i · r_j) / (max(‖x_i‖, eps) · max(‖r_j‖, eps)) from raw dot products."""
    return dots * inv_x[:, None] * inv_r[None, :]
