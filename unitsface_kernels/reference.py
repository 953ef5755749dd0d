"""Eager PyTorch formulas of DESIGN.md §1: the oracle every fused backend is tested against.

Everything here materialises the B×N cosine matrix on purpose: it is the plain, readable
statement of the maths (and what the official UniTSFace code does), not a fast path.
Half-precision inputs are upcast to float32 and float64 inputs stay float64, so calling these
functions on ``x.double()`` gives the float64 reference.

Notation: x̂ = x / max(||x||, 1e-5) (``F.normalize``), cos_ij = x̂_i · r̂_j, s = scale,
softplus(z) = log(1 + e^z).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5
"""The normalisation eps of F.normalize(·, eps=1e-5), as in the official code."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(t: torch.Tensor) -> torch.Tensor:
    """t / max(||t||, 1e-5) row-wise, in the compute dtype."""
    return F.normalize(t.to(compute_dtype(t.dtype)), dim=-1, eps=EPS)


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # logaddexp(z, 0) is exact for all z (F.softplus switches to z above a threshold).
    return torch.logaddexp(z, torch.zeros_like(z))


def _masked_logsumexp(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise logsumexp of z over mask; returns (lse, has_any). Empty rows give lse = -inf
    with a zero (not NaN) gradient."""
    has_any = mask.any(dim=1)
    filled = torch.where(mask, z, torch.full_like(z, -math.inf))
    # Rows with no member would give NaN gradients (exp(-inf - -inf)); give them a dummy 0 row.
    filled = torch.where(has_any[:, None], filled, torch.zeros_like(z))
    lse = torch.logsumexp(filled, dim=1)
    return torch.where(has_any, lse, torch.full_like(lse, -math.inf)), has_any


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' averages the per-row losses over the batch, 'sum' adds them, 'none' keeps them."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def uss_masks(labels, ref_labels, ref_valid, in_batch: bool):
    """P_ij = (l_j = y_i) ∧ v_j ∧ (j ≠ i in in-batch mode),  N_ij = (l_j ≠ y_i) ∧ v_j."""
    same = labels[:, None] == ref_labels[None, :]
    valid = ref_valid[None, :].bool()
    pos = same & valid
    if in_batch:
        pos &= ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return pos, ~same & valid


def _reference_set(x, labels, ref, ref_labels, ref_valid):
    """(r̂, l, v, in_batch) with the defaults of DESIGN.md §1.1: ref=None → the batch itself,
    ref_labels=None → l_j = j (a memory bank, one row per class), ref_valid=None → all valid."""
    if ref is None:
        ref, ref_labels, in_batch = x, labels, True
    else:
        in_batch = False
        if ref_labels is None:
            ref_labels = torch.arange(ref.shape[0], device=ref.device)
    if ref_valid is None:
        ref_valid = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    return normalize(ref), ref_labels, ref_valid, in_batch


def uss_rows(
    x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *,
    scale=64.0, margin=0.1, form="pairs", official_clamp=False,
):
    """Per-row USS loss L_i (DESIGN.md §1.1).

    pairs: L_i = Σ_{P_i} softplus(b_j − s(cos_ij − m)) + Σ_{N_i} softplus(s·cos_ij − b_j)
    lse:   L_i = softplus(lse_{P_i}(b_j − s(cos_ij − m))) + softplus(lse_{N_i}(s·cos_ij − b_j))
    official_clamp clamps each softplus argument to [−s, s] first (per pair for "pairs",
    the two logsumexps for "lse"); an empty set contributes 0.
    ``bias`` is a scalar b (numel 1) or one b_j per reference row (numel N).
    """
    xh = normalize(x)
    rh, ref_labels, ref_valid, in_batch = _reference_set(x, labels, ref, ref_labels, ref_valid)
    cos = xh @ rh.T
    b = bias.to(cos.dtype).reshape(1, -1)
    z_pos = b - scale * (cos - margin)
    z_neg = scale * cos - b
    pos, neg = uss_masks(labels, ref_labels, ref_valid, in_batch)

    def clamped(z):  # the official code clamps every softplus argument to [−s, s]
        return z.clamp(-scale, scale) if official_clamp else z

    if form == "pairs":
        zero = torch.zeros_like(cos)
        return (torch.where(pos, _softplus(clamped(z_pos)), zero).sum(1)
                + torch.where(neg, _softplus(clamped(z_neg)), zero).sum(1))
    if form == "lse":
        total = torch.zeros_like(cos[:, 0])
        for z, mask in ((z_pos, pos), (z_neg, neg)):
            stat, has = _masked_logsumexp(z, mask)
            # an empty set contributes 0 (not softplus(−s) once clamped)
            total = total + torch.where(has, _softplus(clamped(torch.where(has, stat, 0.0))), 0.0)
        return total
    raise ValueError(f"form must be 'pairs' or 'lse', got {form!r}")


def uss_loss(x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *,
             scale=64.0, margin=0.1, form="pairs", official_clamp=False, reduction="mean"):
    """USS loss with a reduction over rows; see :func:`uss_rows`."""
    rows = uss_rows(x, labels, bias, ref, ref_labels, ref_valid, scale=scale, margin=margin,
                    form=form, official_clamp=official_clamp)
    return reduce_rows(rows, reduction)


def uss_bias_init(x, labels, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0):
    """The official data-dependent initial threshold: b₀ = mean_i logsumexp_{j∈N_i}(s·cos_ij),
    averaged over the rows that have at least one negative (a detached scalar)."""
    with torch.no_grad():
        xh = normalize(x)
        rh, ref_labels, ref_valid, in_batch = _reference_set(x, labels, ref, ref_labels, ref_valid)
        _, neg = uss_masks(labels, ref_labels, ref_valid, in_batch)
        lse, has = _masked_logsumexp(scale * (xh @ rh.T), neg)
        return lse[has].mean() if bool(has.any()) else lse.new_tensor(math.nan)


def target_logit(cos: torch.Tensor, margin_arc: float, margin_cos: float) -> torch.Tensor:
    """f(cos) = cos(θ + m2) − m3 with θ = arccos(cos), written as
    cos·cos m2 − sin θ·sin m2 − m3 with sin θ = sqrt(max(1 − cos², 1e-12)) so that its
    derivative stays finite at cos = ±1. When θ + m2 > π (cos < −cos m2) insightface's
    fallback cos − m2·sin m2 (− m3) keeps f monotone."""
    if margin_arc == 0.0:
        return cos - margin_cos
    sin_t = torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))
    arc = cos * math.cos(margin_arc) - sin_t * math.sin(margin_arc)
    fallback = cos - margin_arc * math.sin(margin_arc)
    return torch.where(cos > -math.cos(margin_arc), arc, fallback) - margin_cos


def margin_softmax_rows(x, centres, labels, *, scale=64.0, margin_arc=0.0, margin_cos=0.4,
                        index=None):
    """Per-row CosFace/ArcFace softmax loss (DESIGN.md §1.2) over all classes or over the
    partial-FC index S: L_i = logsumexp_c z_ic − z_{i,y_i}, z_ic = s·cos_ic (c ≠ y_i),
    z_iy = s·f(cos_iy), cos clamped to [−1, 1]."""
    w = centres if index is None else centres[index]
    local = labels if index is None else torch.searchsorted(index, labels)
    cos = (normalize(x) @ normalize(w).T).clamp(-1.0, 1.0)
    target = target_logit(cos.gather(1, local[:, None]), margin_arc, margin_cos)
    logits = (scale * cos).scatter(1, local[:, None], scale * target)
    return torch.logsumexp(logits, dim=1) - scale * target[:, 0]


def margin_softmax_loss(x, centres, labels, *, scale=64.0, margin_arc=0.0, margin_cos=0.4,
                        index=None, reduction="mean"):
    """Margin softmax with a reduction over rows; see :func:`margin_softmax_rows`."""
    rows = margin_softmax_rows(x, centres, labels, scale=scale, margin_arc=margin_arc,
                               margin_cos=margin_cos, index=index)
    return reduce_rows(rows, reduction)


def unitsface_loss(x, labels, centres, bank, bias, *, bank_valid=None, index=None, scale=64.0,
                   margin_arc=0.0, margin_cos=0.4, uss_margin=0.1, uss_form="pairs",
                   uss_weight=1.0, reduction="mean"):
    """The UniTSFace objective (DESIGN.md §1.3): per row,
    L_i = L_softmax,i(x; W, margins) + λ·L_uss,i(x; bank, b), both over the same classes
    (all of them, or the partial-FC index S; the bank row of class c has label c)."""
    soft = margin_softmax_rows(x, centres, labels, scale=scale, margin_arc=margin_arc,
                               margin_cos=margin_cos, index=index)
    classes = torch.arange(bank.shape[0], device=bank.device) if index is None else index
    valid = bank_valid if bank_valid is not None else torch.ones(
        bank.shape[0], dtype=torch.bool, device=bank.device)
    bank_rows = bank if index is None else bank[index]
    bias_rows = bias if (index is None or bias.numel() == 1) else bias.reshape(-1)[index]
    uss = uss_rows(x, labels, bias_rows, bank_rows, classes, valid[classes], scale=scale,
                   margin=uss_margin, form=uss_form)
    return reduce_rows(soft + uss_weight * uss, reduction)


@torch.no_grad()
def bank_update_(bank, bank_valid, x, labels):
    """bank[y_i] ← x̂_i and bank_valid[y_i] ← True; when a label repeats, its last row wins."""
    b = labels.numel()
    last = torch.full((bank.shape[0],), -1, dtype=torch.long, device=labels.device)
    last.scatter_reduce_(0, labels, torch.arange(b, device=labels.device), reduce="amax")
    rows = last[last >= 0]
    bank[labels[rows]] = normalize(x[rows]).to(bank.dtype)
    bank_valid[labels[rows]] = True
    return bank
