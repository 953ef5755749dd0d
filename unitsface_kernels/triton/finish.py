"""Host-side finishing of the fused kernels' partial results, O(B·D + |S|) torch operations
after the sweep (docs/design.md §2). The USS lse finish is reference.uss_lse_terms."""

from __future__ import annotations

import torch

from .. import reference


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merge per-slice (max, sum-exp) pairs [slices, B] into logsumexp per row; −inf if empty."""
    top = m.max(dim=0).values
    total = (s * torch.exp(m - top)).sum(dim=0)
    # total == 0 only for an empty set; a NaN total stays NaN (NaN inputs are never hidden).
    return torch.where(total == 0, torch.full_like(top, -float("inf")), top + torch.log(total))


def uss_lse_finish(partial: torch.Tensor, scale: float, clamp: bool):
    """The lse form's per-row loss and the backward's statistics [4, B] = (A, σA', B, σB')
    from per-slice partials [slices, 4, B] = (max⁺, sumexp⁺, max⁻, sumexp⁻):
    :func:`~unitsface_kernels.reference.uss_lse_terms` of the merged A and B."""
    a = merge_lse(partial[:, 0], partial[:, 1])
    b = merge_lse(partial[:, 2], partial[:, 3])
    rows, fa, fb = reference.uss_lse_terms(a, b, scale, clamp)
    return rows, torch.stack([a, fa, b, fb])


def tangent_grad(acc_g, t, norms, eps: float):
    """(G − (t̂·G)·t̂) / max(‖t‖, eps), without the projection when ‖t‖ < eps (eps: the
    options' normalisation eps): the normalisation's gradient with h = Σ_j g_ij cos_ij taken
    as t̂·G, its exact value, from G itself. The projection then removes exactly G's own
    radial part, rounding included (with h summed apart in fp32, the rounding of G's radial
    part, e.g. from half-precision g tiles, would stay in the result and dominate it where
    the gradient is nearly radial)."""
    inv = 1.0 / norms.clamp_min(eps)
    tc = t.to(acc_g.dtype)
    h = (acc_g * tc).sum(dim=1) * inv
    proj = torch.where(norms >= eps, h, torch.zeros_like(h))
    return inv[:, None] * (acc_g - (proj * inv)[:, None] * tc)
