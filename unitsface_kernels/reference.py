"""Eager PyTorch formulas of docs/design.md §1: the oracle every fused backend is tested against,
and the one home in Python of each formula.

Everything here materialises the B×N cosine matrix on purpose: it is the plain, readable
statement of the maths (and what the official UniTSFace code does), not a fast path.
Half-precision inputs are upcast to float32 and float64 inputs stay float64
(:func:`compute_dtype`), so calling these functions on ``x.double()`` gives the float64
reference.

Notation: x̂ = x / max(||x||, eps) (``F.normalize``; eps the settings' normalisation eps,
1e-5 by default as in the official code: ``eps=`` of the formulas, ``o.eps`` of the per-op
forms), cos_ij = x̂_i · r̂_j, s = scale,
softplus(z) = log(1 + e^z). Reference rows marked invalid are read as zero rows: they take
no part in the loss, and whatever they hold (NaN included) reaches no gradient.

The module has three parts: the elementary formulas; the losses (what the public functions
compute with ``backend="reference"``, differentiated by autograd); and the per-op eager forms
:func:`uss_fwd` / :func:`uss_bwd` / :func:`unitsface_fwd` / :func:`unitsface_bwd`, with the
arguments and outputs of the op contract (:mod:`unitsface_kernels.contract`), which the
class-parallel code runs on a shard with global statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layouts import USS_STATS, MarginRow, UnitsfaceStat, UssStat
from .options import ANGLE_EPS, EPS, UnitsfaceOptions, UssOptions


# ============================================================================ formulas

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64, every other float dtype is float32.
    Losses come back in it; every backend accumulates in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """t / max(||t||, eps) row-wise, in the compute dtype (eps: the options' normalisation eps,
    1e-5 by default as in the official code)."""
    return F.normalize(t.to(compute_dtype(t.dtype)), dim=-1, eps=eps)


def softplus(z: torch.Tensor) -> torch.Tensor:
    # logaddexp(z, 0) is exact for all z (F.softplus switches to z above a threshold).
    return torch.logaddexp(z, torch.zeros_like(z))


def masked_logsumexp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp of z over mask; −inf (with a zero, not NaN, gradient) for a row
    with no member."""
    has_any = mask.any(dim=1)
    filled = torch.where(mask, z, torch.full_like(z, -math.inf))
    # Rows with no member would give NaN gradients (exp(-inf - -inf)); give them a dummy 0 row.
    filled = torch.where(has_any[:, None], filled, torch.zeros_like(z))
    lse = torch.logsumexp(filled, dim=1)
    return torch.where(has_any, lse, torch.full_like(lse, -math.inf))


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' averages the per-row losses over the batch, 'sum' adds them, 'none' keeps them."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class _ReadAs(torch.autograd.Function):
    """Rows rounded to x's dtype, returned in x's compute dtype; their gradient goes back in the
    rows' own dtype straight from the compute dtype (autograd's cast would round it to x's
    dtype first — and overflow, for a bf16 row's gradient of ~1/eps under fp16 x)."""

    @staticmethod
    def forward(ctx, ref, dtype):
        ctx.ref_dtype = ref.dtype
        return ref.to(dtype).to(compute_dtype(dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.ref_dtype), None


def readable_rows(ref: torch.Tensor, valid: torch.Tensor | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference rows as the losses read them: rounded to x's dtype (`dtype`: reference
    rows may be fp32 master weights for half embeddings, or a half bank for fp32 ones; then
    given in x's compute dtype), and rows marked invalid are zero."""
    if dtype is not None and ref.dtype != dtype:
        ref = _ReadAs.apply(ref, dtype)
    if valid is None:
        return ref
    return torch.where(valid[:, None], ref, torch.zeros((), dtype=ref.dtype, device=ref.device))


class _RowsWithSparseGrad(torch.autograd.Function):
    """t[index] whose gradient is a sparse COO tensor of those rows (``sparse_grad``)."""

    @staticmethod
    def forward(ctx, t, index):
        ctx.save_for_backward(index)
        ctx.shape = t.shape
        return t[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index[None], grad, ctx.shape, is_coalesced=True), None


def class_rows(t: torch.Tensor, index, sparse_grad: bool = False) -> torch.Tensor:
    """The rows of the classes of the index (all rows without one); with ``sparse_grad`` the
    gradient reaching t is sparse (only those rows)."""
    if index is None:
        return t
    return _RowsWithSparseGrad.apply(t, index) if sparse_grad else t[index]


def uss_z(cos: torch.Tensor, bias: torch.Tensor, scale: float, margin: float):
    """(z⁺, z⁻) = (b_j − s·(cos_ij − m), s·cos_ij − b_j); `bias` holds 1 value or one per
    column."""
    b = bias.to(cos.dtype).reshape(1, -1)
    return b - scale * (cos - margin), scale * cos - b


def uss_lse_terms(a: torch.Tensor, b: torch.Tensor, scale: float, clamp: bool):
    """The finish of the lse form from its statistics A_i = lse_P z⁺, B_i = lse_N z⁻ (−inf for
    an empty set): the loss softplus(A) + softplus(B), an empty set adding 0 (also under the
    official clamp, which clamps A and B to [−s, s]); and the backward's factors
    σ(A)·[A inside the clamp], σ(B)·[B inside the clamp] (zero for an empty set)."""
    rows = torch.zeros_like(a)
    factors = []
    for stat in (a, b):
        empty = stat == -math.inf
        arg = clamp_sym(stat, scale) if clamp else stat
        rows = rows + torch.where(empty, torch.zeros_like(stat), softplus(arg))
        # (written so that a NaN statistic counts as inside: its NaN reaches the gradient)
        inside = ~((stat < -scale) | (stat > scale)) if clamp else ~empty
        factors.append(torch.where(inside, torch.sigmoid(stat), torch.zeros_like(stat)))
    return rows, factors[0], factors[1]


def uss_stats(a, fa, b, fb) -> torch.Tensor:
    """The lse form's statistics stacked in the :class:`UssStat` layout [4, B]."""
    by_row = {UssStat.A: a, UssStat.SIGMA_A: fa, UssStat.B: b, UssStat.SIGMA_B: fb}
    return torch.stack([by_row[row] for row in UssStat])  # (traceable: no list item stores)


def clamp_sym(z: torch.Tensor, scale: float) -> torch.Tensor:
    """z clamped to [−s, s] (the official clamp; the cosines' clamp to [−1, 1]), its gradient
    zero where the clamp is active.
    Unlike torch.clamp's, its gradient at a NaN is NaN: data NaN reaches the gradients of
    what it touches (docs/design.md §5)."""
    return torch.where(z > scale, scale, torch.where(z < -scale, -scale, z))


def uss_pair_terms(z: torch.Tensor, scale: float, clamp: bool) -> torch.Tensor:
    """softplus of one pair's argument (clamped to [−s, s] by the official clamp)."""
    return softplus(clamp_sym(z, scale) if clamp else z)


def _pair_sums(pos, neg, z_pos, z_neg, scale, clamp):
    """Σ_P softplus(z⁺) + Σ_N softplus(z⁻) per row. The arguments outside their set are zeroed
    before the softplus, so that a NaN there (a NaN row of x meets every column) sends no
    NaN through the softplus's derivative into the thresholds of columns it does not use."""
    zero = torch.zeros_like(z_pos)
    return (torch.where(pos, uss_pair_terms(torch.where(pos, z_pos, zero), scale, clamp),
                        zero).sum(1)
            + torch.where(neg, uss_pair_terms(torch.where(neg, z_neg, zero), scale, clamp),
                          zero).sum(1))


def target_logit(cos: torch.Tensor, margin_arc, margin_cos, *, straight_through: bool = False,
                 easy_margin: bool = False, no_fallback: bool = False,
                 angle_clip: bool = False) -> torch.Tensor:
    """f(cos) of the target class (docs/design.md §1.2, §1.5); the margins m2 = a, m3 = d are
    numbers, or per-row tensors broadcasting against cos (the margin family's a_i, d_i).

    f = cos(θ + a) − d with θ = arccos(cos), written as cos·cos a − sin θ·sin a − d.
    Exact (default): sin θ = sqrt(max(1 − cos², 1e-12)) so that f' stays finite at cos = ±1,
    and insightface's fallback cos − a·sin a − d where θ + a > π (cos ≤ −cos a) keeps f
    monotone (``no_fallback``: ElasticFace-Arc, none). ``straight_through`` (insightface's
    arcface_torch since 2022-12): no fallback, and the gradient is taken as if f(cos) = cos
    (f' = 1). ``easy_margin``: f(cos) = cos where cos ≤ 0 (the margin only applies to positive
    cosines). ``angle_clip`` (AdaFace): f = cos(clip(θ + a, ε, π − ε)) − d, ε = ANGLE_EPS,
    without fallback (its gradient zero where the clip is active)."""
    if isinstance(margin_arc, float) and margin_arc == 0.0:
        f = cos - margin_cos
    elif angle_clip:
        theta = torch.acos(cos)
        f = torch.cos(clamp_sym(theta + margin_arc - math.pi / 2, math.pi / 2 - ANGLE_EPS)
                      + math.pi / 2) - margin_cos
    else:
        a = margin_arc
        cos_a, sin_a = ((math.cos(a), math.sin(a)) if isinstance(a, float)
                        else (torch.cos(a), torch.sin(a)))
        floor = 0.0 if straight_through else 1e-12
        sin_t = torch.sqrt(torch.clamp(1.0 - cos * cos, min=floor))
        f = cos * cos_a - sin_t * sin_a
        if not (straight_through or easy_margin or no_fallback):
            f = torch.where(cos > -cos_a, f, cos - a * sin_a)
        f = f - margin_cos
    if easy_margin:
        f = torch.where(cos > 0, f, cos)
    if straight_through:
        f = cos + (f - cos).detach()
    return f


def class_row_ids(classes: torch.Tensor, k: int) -> torch.Tensor:
    """The rows of centres that hold `classes` with K = k sub-centres each (row c·k + r), in
    the order (class, r)."""
    if k == 1:
        return classes
    return (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)


def class_cosines(cos: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N·K] cosines of every sub-centre → [B, N] class cosines, the maximum over each
    class's K rows; its gradient reaches the first arg-max row only (a NaN row is the
    maximum: it propagates)."""
    if k == 1:
        return cos
    per = cos.reshape(cos.shape[0], -1, k)
    return per.gather(2, per.max(dim=2).indices[..., None])[..., 0]


def negative_cosines(c: torch.Tensor, hard, t, *, curricular: bool,
                     interclass_threshold: float) -> torch.Tensor:
    """n(c), the negatives' cosines after the margin family's modulation (docs/design.md
    §1.5): CurricularFace's c·(t + c) where c > `hard` (per row [B, 1]; t [B, 1] the moving
    average, no gradient through either), then insightface's inter-class filtering: 0 where
    c > τ > 0, with no gradient."""
    out = c
    if curricular:
        out = torch.where(c > hard, c * (t + c), c)
    if interclass_threshold > 0:
        out = torch.where(c.detach() > interclass_threshold, torch.zeros_like(c), out)
    return out


# ============================================================================ the losses

def uss_masks(labels, ref_labels, ref_valid, in_batch: bool):
    """P_ij = (l_j = y_i) ∧ v_j ∧ (j ≠ i in in-batch mode),  N_ij = (l_j ≠ y_i) ∧ v_j."""
    same = labels[:, None] == ref_labels[None, :]
    valid = ref_valid[None, :].bool()
    pos = same & valid
    if in_batch:
        pos &= ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return pos, ~same & valid


def _reference_set(x, labels, ref, ref_labels, ref_valid, eps=EPS):
    """(r̂, l, v, in_batch) with the defaults of docs/design.md §1.1: ref=None → the batch
    itself, ref_labels=None → l_j = j (a memory bank, one row per class), ref_valid=None →
    all valid."""
    if ref is None:
        ref, ref_labels, in_batch = x, labels, True
    else:
        in_batch = False
        if ref_labels is None:
            ref_labels = torch.arange(ref.shape[0], device=ref.device)
    if ref_valid is None:
        ref_valid = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    return (normalize(readable_rows(ref, ref_valid, x.dtype), eps), ref_labels, ref_valid,
            in_batch)


def uss_rows(x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *,
             scale=64.0, margin=0.1, form="pairs", official_clamp=False, eps=EPS):
    """Per-row USS loss L_i (docs/design.md §1.1).

    pairs: L_i = Σ_{P_i} softplus(b_j − s(cos_ij − m)) + Σ_{N_i} softplus(s·cos_ij − b_j)
    lse:   L_i = softplus(lse_{P_i}(b_j − s(cos_ij − m))) + softplus(lse_{N_i}(s·cos_ij − b_j))
    official_clamp clamps each softplus argument to [−s, s] first (per pair for "pairs",
    the two logsumexps for "lse"); an empty set contributes 0.
    ``bias`` is a scalar b (numel 1) or one b_j per reference row (numel N).
    """
    xh = normalize(x, eps)
    rh, ref_labels, ref_valid, in_batch = _reference_set(x, labels, ref, ref_labels, ref_valid,
                                                         eps)
    z_pos, z_neg = uss_z(xh @ rh.T, bias, scale, margin)
    pos, neg = uss_masks(labels, ref_labels, ref_valid, in_batch)
    if form == "pairs":
        return _pair_sums(pos, neg, z_pos, z_neg, scale, official_clamp)
    if form == "lse":
        return uss_lse_terms(masked_logsumexp(z_pos, pos), masked_logsumexp(z_neg, neg),
                             scale, official_clamp)[0]
    raise ValueError(f"form must be 'pairs' or 'lse', got {form!r}")


def uss_loss(x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *,
             scale=64.0, margin=0.1, form="pairs", official_clamp=False, reduction="mean",
             eps=EPS):
    """USS loss with a reduction over rows; see :func:`uss_rows`."""
    rows = uss_rows(x, labels, bias, ref, ref_labels, ref_valid, scale=scale, margin=margin,
                    form=form, official_clamp=official_clamp, eps=eps)
    return reduce_rows(rows, reduction)


def eager_uss_bias_init(x, labels, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0,
                        eps=EPS):
    """The official data-dependent initial threshold: b₀ = mean_i logsumexp_{j∈N_i}(s·cos_ij),
    averaged over the rows that have at least one negative (NaN when none has; a detached
    scalar)."""
    with torch.no_grad():
        xh = normalize(x, eps)
        rh, ref_labels, ref_valid, in_batch = _reference_set(x, labels, ref, ref_labels,
                                                             ref_valid, eps)
        _, neg = uss_masks(labels, ref_labels, ref_valid, in_batch)
        return mean_of_finite(masked_logsumexp(scale * (xh @ rh.T), neg))


def mean_of_finite(stat: torch.Tensor) -> torch.Tensor:
    """The mean of the entries > −inf (rows with a negative), NaN when there is none; no host
    synchronisation."""
    has = stat > -math.inf
    total = torch.where(has, stat, torch.zeros_like(stat)).sum()
    return total / has.sum()  # 0/0 = NaN when no row has a negative


def margin_softmax_rows(x, centres, labels, *, scale=64.0, margin_arc=0.0, margin_cos=0.4,
                        arcface_grad="exact", easy_margin=False, index=None, sparse_grad=False,
                        eps=EPS):
    """Per-row CosFace/ArcFace softmax loss (docs/design.md §1.2) over all classes or over the
    partial-FC index S: L_i = logsumexp_c z_ic − z_{i,y_i}, z_ic = s·cos_ic (c ≠ y_i),
    z_iy = s·f(cos_iy) (:func:`target_logit`), cos clamped to [−1, 1]."""
    w = readable_rows(class_rows(centres, index, sparse_grad), None, x.dtype)
    local = labels if index is None else torch.searchsorted(index, labels)
    cos = clamp_sym(normalize(x, eps) @ normalize(w, eps).T, 1.0)
    target = target_logit(cos.gather(1, local[:, None]), margin_arc, margin_cos,
                          straight_through=arcface_grad == "straight_through",
                          easy_margin=easy_margin)
    logits = (scale * cos).scatter(1, local[:, None], scale * target)
    return torch.logsumexp(logits, dim=1) - scale * target[:, 0]


def margin_softmax_loss(x, centres, labels, *, reduction="mean", **kw):
    """Margin softmax with a reduction over rows; see :func:`margin_softmax_rows`."""
    return reduce_rows(margin_softmax_rows(x, centres, labels, **kw), reduction)


def unitsface_loss(x, labels, centres, bank, bias, *, bank_valid=None, index=None, scale=64.0,
                   margin_arc=0.0, margin_cos=0.4, arcface_grad="exact", easy_margin=False,
                   uss_margin=0.1, uss_form="pairs", uss_weight=1.0, official_clamp=False,
                   reduction="mean", sparse_grad=False, eps=EPS):
    """The UniTSFace objective (docs/design.md §1.3): per row,
    L_i = L_softmax,i(x; W, margins) + λ·L_uss,i(x; bank, b), both over the same classes
    (all of them, or the partial-FC index S; the bank row of class c has label c)."""
    soft = margin_softmax_rows(x, centres, labels, scale=scale, margin_arc=margin_arc,
                               margin_cos=margin_cos, arcface_grad=arcface_grad,
                               easy_margin=easy_margin, index=index, sparse_grad=sparse_grad,
                               eps=eps)
    classes = torch.arange(bank.shape[0], device=bank.device) if index is None else index
    valid = bank_valid if bank_valid is not None else torch.ones(
        bank.shape[0], dtype=torch.bool, device=bank.device)
    bias_rows = bias if (index is None or bias.numel() == 1) else bias.reshape(-1)[index]
    uss = uss_rows(x, labels, bias_rows, bank[classes], classes, valid[classes], scale=scale,
                   margin=uss_margin, form=uss_form, official_clamp=official_clamp, eps=eps)
    return reduce_rows(soft + uss_weight * uss, reduction)


def bank_rows(x: torch.Tensor) -> torch.Tensor:
    """What the memory bank stores for embeddings x (docs/design.md §1.1): a row r with
    F.normalize(r) = F.normalize(x) — the unit vector x̂ when ||x|| ≥ 1e-5, x itself below
    (a tiny feature stays below the eps, so the loss reads it as the official code's raw
    feature bank does: x / 1e-5)."""
    xc = x.to(compute_dtype(x.dtype))
    norm = xc.norm(dim=-1, keepdim=True)
    return torch.where(norm >= EPS, xc / norm, xc)


@torch.no_grad()
def eager_bank_update_(bank, bank_valid, x, labels):
    """bank[y_i] ← :func:`bank_rows` (x_i), bank_valid[y_i] ← x_i is finite; when a label
    repeats, its last row wins."""
    b = labels.numel()
    last = torch.full((bank.shape[0],), -1, dtype=torch.long, device=labels.device)
    last.scatter_reduce_(0, labels, torch.arange(b, device=labels.device), reduce="amax")
    rows = last[labels]  # each entry's winning row: repeats write the same values (no sync)
    bank[labels] = bank_rows(x[rows]).to(bank.dtype)
    bank_valid[labels] = torch.isfinite(x[rows]).all(dim=1)
    return bank


# ============================================================================ per-op forms
# The op contract's forward and backward in eager PyTorch (arguments and outputs as in
# unitsface_kernels.contract). The backward is autograd of a surrogate whose gradient in the
# logits is exactly the kernels' g for the given (possibly global) statistics.

def _class_tiles(x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                 o: UnitsfaceOptions, sparse_grad: bool = False):
    """Eager logits of the classes S: z (softmax), the target mask, and USS (pos, neg, z⁺, z⁻).
    With the margin family's settings (docs/design.md §1.5): the class cosine is the maximum
    over its K sub-centre rows, every cosine is clamped to ±o.cos_limit, the target's margins
    come per row from `margin_rows` (``row_margins``) and the negatives are modulated.
    ``sparse_grad``: the centres' gradient is a sparse tensor of the index's rows (autograd of
    the eager form, as the fused ops' autograd rule gives it)."""
    k = o.k
    classes = (torch.arange(centres.shape[0] // k, device=x.device) if index is None
               else index)
    xh = normalize(x, o.eps)
    rows = class_rows(centres, None if index is None else class_row_ids(index, k), sparse_grad)
    w = normalize(readable_rows(rows, None, x.dtype), o.eps)
    cos = clamp_sym(class_cosines(xh @ w.T, k), o.cos_limit)
    is_t = labels[:, None] == classes[None, :]
    m = None if margin_rows is None else margin_rows.to(cos.dtype)[:, :, None]
    a, d = (m[MarginRow.A], m[MarginRow.D]) if o.row_margins else (o.margin_arc, o.margin_cos)
    f = target_logit(cos, a, d, straight_through=o.arcface_straight_through,
                     easy_margin=o.easy_margin, no_fallback=o.no_fallback,
                     angle_clip=o.angle_clip)
    neg = negative_cosines(cos, None if m is None else m[MarginRow.HARD],
                           None if m is None else m[MarginRow.T], curricular=o.curricular,
                           interclass_threshold=o.interclass_threshold)
    z = o.scale * torch.where(is_t, f, neg)
    uss = None
    if bank is not None:
        valid = (torch.ones_like(classes, dtype=torch.bool) if bank_valid is None
                 else bank_valid[classes])
        cos_b = xh @ normalize(readable_rows(bank[classes], valid, x.dtype), o.eps).T
        b = bias.reshape(-1)
        z_pos, z_neg = uss_z(cos_b, b if b.numel() == 1 else b[classes], o.scale, o.uss_margin)
        uss = (is_t & valid[None, :], ~is_t & valid[None, :], z_pos, z_neg)
    return z, is_t, uss


def _uss_surrogate(pos, neg, z_pos, z_neg, stats4, lse, clamp, scale):
    """Per row, a function of z⁺, z⁻ whose gradient is the USS g for the given statistics
    (the pairs loss itself; for lse σ(A)·Σ_P e^{z⁺ − A} + σ(B)·Σ_N e^{z⁻ − B}); `stats4`
    in the :class:`UssStat` layout."""
    if not lse:
        return _pair_sums(pos, neg, z_pos, z_neg, scale, clamp)
    a, fa, b, fb = (stats4[k] for k in (UssStat.A, UssStat.SIGMA_A, UssStat.B, UssStat.SIGMA_B))
    out = torch.zeros_like(a)
    for z, mask, stat, f in ((z_pos, pos, a, fa), (z_neg, neg, b, fb)):
        safe = torch.where(torch.isfinite(stat), stat, torch.zeros_like(stat))
        e = torch.exp(torch.where(mask, z - safe[:, None], torch.full_like(z, -math.inf)))
        out = out + f * e.sum(1)
    return out


def _uss_stats(pos, neg, z_pos, z_neg, lse, clamp, scale):
    """(USS rows, stats [4, B] in the :class:`UssStat` layout — zeros for pairs)."""
    if lse:
        a, b = masked_logsumexp(z_pos, pos), masked_logsumexp(z_neg, neg)
        rows, fa, fb = uss_lse_terms(a, b, scale, clamp)
        return rows, uss_stats(a, fa, b, fb)
    rows = _uss_surrogate(pos, neg, z_pos, z_neg, None, False, clamp, scale)
    return rows, rows.new_zeros(len(UssStat), rows.shape[0])


def _norms(*tensors):
    return tuple(t.to(compute_dtype(t.dtype)).norm(dim=1) for t in tensors)


def unitsface_fwd(x, centres, bank, labels, index, bank_valid, bias, margin_rows, options,
                  row_grads=False, sparse_grad=False):
    """Eager unitsface_fwd: (rows, stats [7, B], ||x||, ||W[S]|| (K rows per class),
    ||bank[S]||, ∅, ∅, ∅, ∅): no row gradients, no stored exponentials."""
    o = UnitsfaceOptions.unpack(options)
    z, is_t, uss = _class_tiles(x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                                o, sparse_grad)
    stats = z.new_zeros(len(UnitsfaceStat), x.shape[0])
    stats[UnitsfaceStat.LSE] = torch.logsumexp(z, dim=1)
    stats[UnitsfaceStat.TARGET] = torch.where(is_t, z, torch.zeros_like(z)).sum(1)
    rows = stats[UnitsfaceStat.LSE] - stats[UnitsfaceStat.TARGET]
    if uss is not None:
        stats[UnitsfaceStat.USS_LOSS], stats[USS_STATS] = _uss_stats(*uss, o.uss_lse,
                                                                     o.uss_clamp, o.scale)
        rows = rows + o.uss_weight * stats[UnitsfaceStat.USS_LOSS]
    sel = [slice(None) if index is None else index] * 2
    if index is not None:
        sel[0] = class_row_ids(index, o.k)
    read = [readable_rows(t[s], None, x.dtype)
            for t, s in zip((centres, bank), sel) if t is not None]
    nb = _norms(read[1])[0] if bank is not None else stats.new_empty(0)
    return ((rows, stats) + _norms(x, read[0])
            + (nb, stats.new_empty(0), stats.new_empty(0), x.new_empty(0), stats.new_empty(0)))


def _grads_of(row, go, wanted):
    """autograd.grad of Σ_i go_i·row_i for the leaves that are not None."""
    leaves = [t for t in wanted if t is not None]
    grads = iter(torch.autograd.grad((go.to(row.dtype) * row).sum(), leaves) if leaves else ())
    return [next(grads) if t is not None else None for t in wanted]


def _leaf(t, need):
    return t.detach().requires_grad_() if (need and t is not None) else None


def unitsface_bwd(grad_rows, x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                  stats, nx, nw, nb, dx_rows, db_rows, exps, exp_rows, options, needs):
    """Eager unitsface_bwd from the (global) statistics: autograd of the surrogate
    Σ_i go_i·[Σ_c e^{z_ic − lse_i} − z_iy + λ·USS'_i]; ∂centres of the rows of the index."""
    o = UnitsfaceOptions.unpack(options)
    with torch.enable_grad():
        leaves = [_leaf(t, n) for t, n in zip((x, centres, bias), needs)]
        xv, wv, bv = (leaf if leaf is not None else t
                      for leaf, t in zip(leaves, (x, centres, bias)))
        z, is_t, uss = _class_tiles(xv, wv, bank, labels, index, bank_valid, bv, margin_rows,
                                    o)
        lse = stats[UnitsfaceStat.LSE].to(z.dtype)
        row = (torch.exp(z - lse[:, None]).sum(1)
               - torch.where(is_t, z, torch.zeros_like(z)).sum(1))
        if uss is not None:
            row = row + o.uss_weight * _uss_surrogate(*uss, stats[USS_STATS].to(z.dtype),
                                                      o.uss_lse, o.uss_clamp, o.scale)
        grads = _grads_of(row, grad_rows, leaves)
    if grads[1] is not None and index is not None:
        grads[1] = grads[1][class_row_ids(index, o.k)]
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def uss_fwd(x, ref, labels, ref_labels, ref_valid, bias, options):
    """Eager uss_fwd (reference rows with their own labels): (rows, stats [4, B], ||x||, ||r||)."""
    o = UssOptions.unpack(options)
    valid = torch.ones_like(ref_labels, dtype=torch.bool) if ref_valid is None else ref_valid
    cos = normalize(x, o.eps) @ normalize(readable_rows(ref, valid, x.dtype), o.eps).T
    pos, neg = uss_masks(labels, ref_labels, valid, o.in_batch)
    rows, stats = _uss_stats(pos, neg, *uss_z(cos, bias, o.scale, o.margin), o.lse, o.clamp,
                             o.scale)
    return (rows, stats) + _norms(x, readable_rows(ref, None, x.dtype))


def uss_bwd(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, stats, nx, nr, options,
            needs):
    """Eager uss_bwd from the (global) statistics; ∂ref is not formed (the class-parallel
    memory bank takes no gradient)."""
    o = UssOptions.unpack(options)
    valid = torch.ones_like(ref_labels, dtype=torch.bool) if ref_valid is None else ref_valid
    with torch.enable_grad():
        xv, bv = _leaf(x, needs[0]), _leaf(bias, needs[2])
        cos = (normalize(xv if xv is not None else x, o.eps)
               @ normalize(readable_rows(ref, valid, x.dtype), o.eps).T)
        pos, neg = uss_masks(labels, ref_labels, valid, o.in_batch)
        z_pos, z_neg = uss_z(cos, bv if bv is not None else bias, o.scale, o.margin)
        row = _uss_surrogate(pos, neg, z_pos, z_neg, stats.to(z_pos.dtype), o.lse, o.clamp,
                             o.scale)
        dx, db = _grads_of(row, grad_rows, [xv, bv])
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, empty, db if db is not None else empty)
