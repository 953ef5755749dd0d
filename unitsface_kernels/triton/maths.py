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
def log1p(u):
    """log(1 + u), accurate for small u too: fl(1 + u) − 1 is exact, and log(w)·u/(w − 1) is
    log1p(u) to a few ulps (Goldberg's trick; log(1 + u) alone loses all of a u below the
    rounding of 1 + u, which a pair term far below the threshold is)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def softplus_sigmoid(z):
    """(softplus(z), σ(z)) from one exponential e = e^{−|z|}: softplus = max(z, 0) + log1p(e),
    σ = 1/(1 + e) for z ≥ 0, e/(1 + e) below. NaN stays NaN in both."""
    e = tl.exp(-tl.abs(z))
    pos = z >= 0.0
    return tl.where(z > 0.0, z, 0.0) + log1p(e), tl.where(pos, 1.0, e) / (1.0 + e)


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
