"""The margin family (docs/design.md §1.4, §1.5) in eager PyTorch: its settings, its per-row
inputs and moving statistics, and the float64 oracle of each margin as its authors' public
code computes it.

A margin is described by three pieces, the shape every backend computes it in:

* **per-row inputs**, made once per step before the pass over the classes: an angular margin
  a_i and an additive margin d_i (from the feature norms, drawn from a distribution, or fixed),
  plus the moving statistics the margin keeps (updated from the whole batch — over every rank
  in class-parallel training — and returned, never updated in place here): :func:`row_inputs`,
  handed to the ops as ``margin_rows`` by :func:`margin_rows`;
* **the target logit** s·f(c; a_i, d_i) of the target cosine c;
* **a modulation of the negatives** n(c) where the margin has one (CurricularFace's hard
  negatives, insightface's inter-class filtering, AdaFace's clamp of every cosine).

The last two are formulas of the ops, written once in Python in :mod:`.reference`
(``target_logit``, ``class_cosines``, ``negative_cosines``); a margin picks them through the
settings of the ops (:func:`option_fields`).

Two settings apply to every margin: ``sub_centers`` K (sub-center ArcFace: K rows per class in
W, row c·K + k, the class cosine the maximum over them, its gradient reaching the arg-max row
only) and ``interclass_threshold`` τ (insightface: a negative whose cosine exceeds τ > 0 gets
logit 0 — it stays in the softmax's sum as e⁰ — and no gradient).

Where a paper and its code disagree, the code is followed; docs/design.md §1.5 lists each case.
The oracle :func:`margin_family_rows` materialises the B × N cosines (it is not a fast path)
and is differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from . import validation as check
from .layouts import MarginRow
from .options import ANGLE_EPS, EPS, UnitsfaceOptions, softmax_options
from .reference import (clamp_sym, class_cosines, class_row_ids, negative_cosines, normalize,
                        readable_rows, target_logit)

KINDS = ("arcface", "curricular", "adaface", "magface", "elastic_arc", "elastic_cos")


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Margin:
    """Settings of one margin of the family (checked by :func:`margin`).

    kind          what the target logit is:
      "arcface"       cos(θ + m2) − m3 (CosFace with m2 = 0), insightface's fallback
                      cos − m2·sin m2 − m3 where θ + m2 > π (the base of sub-center ArcFace);
      "curricular"    CurricularFace (Huang et al., CVPR 2020): the target as "arcface" with
                      m2 = m; a negative with cos > cos(θ_y + m) becomes cos·(t + cos), t the
                      moving average of the batch's mean target cosine (momentum `momentum`);
      "adaface"       AdaFace (Kim et al., CVPR 2022): every cosine clamped to [−1 + ε, 1 − ε]
                      (ε = 1e-3), the target cos(clip(θ − m·z_i, ε, π − ε)) − (m + m·z_i),
                      z_i = clip(h·(‖x_i‖ − μ)/(σ + ε), −1, 1) with the norm clipped to
                      [1e-3, 100] and taken without gradient, μ, σ moving averages of the
                      batch's norm mean and std (momentum `momentum`, authors' t_alpha);
      "magface"       MagFace (Meng et al., CVPR 2021): cos(θ + a_i) with a_i linear in the
                      clipped norm ‖x_i‖ ∈ [l_a, u_a] ↦ [l_m, u_m] (gradient into the norm),
                      easy margin by default, plus the regulariser λ_g·g(‖x_i‖),
                      g(a) = a/u_a² + 1/a, added to each row's loss;
      "elastic_arc"   ElasticFace-Arc (Boutros et al., CVPRW 2022): cos(θ + a_i), a_i ~ N(m, σ);
      "elastic_cos"   ElasticFace-Cos: cos − d_i, d_i ~ N(m, σ); with ``plus`` the drawn margins
                      are ordered by the target cosines (the authors' "+" variant).
    """

    kind: str = "arcface"
    m: float = 0.5                  # the margin (m2 for arcface, the mean for elastic)
    m3: float = 0.0                 # arcface only: the additive part (CosFace)
    momentum: float = 0.01          # curricular (fixed 0.01 in the code), adaface (t_alpha)
    h: float = 0.333                # adaface: the norm's concentration
    std: float = 0.0125             # elastic: σ of the drawn margins
    plus: bool = False              # elastic: margins ordered by the target cosines
    norm_bounds: tuple = (10.0, 110.0)   # magface: l_a, u_a
    margin_bounds: tuple = (0.45, 0.8)   # magface: l_m, u_m
    lambda_g: float = 20.0          # magface: weight of the regulariser g
    easy_margin: bool = True        # magface: the margin only where cos > 0 (its default)
    straight_through: bool = False  # arcface: arcface_torch's convention (f' taken as 1)
    sub_centers: int = 1            # K rows per class (sub-center ArcFace)
    interclass_threshold: float = 0.0   # τ > 0: negatives above it get logit 0, no gradient


SETTINGS = tuple(f.name for f in fields(Margin) if f.name != "kind")
"""The settings of a Margin beyond its kind (named once: torch.compile traces no fields())."""

DEFAULTS = {"adaface": dict(m=0.4, momentum=1.0), "elastic_cos": dict(m=0.35)}
"""Each kind's defaults where they differ from the dataclass's: its authors' code's
(AdaFace's head.py: m = 0.4, t_alpha = 1.0; ElasticFace-Cos: m = 0.35)."""



def margin(kind: str = "arcface", **settings) -> Margin:
    """A checked :class:`Margin`; every bad setting raises naming it (docs/design.md §5)."""
    check.choice(kind, KINDS, "kind")
    for name in settings:
        if name not in SETTINGS:
            raise TypeError(f"margin() got an unexpected setting {name!r}")
    out = replace(Margin(kind=kind, **DEFAULTS.get(kind, {})), **settings)
    for name in ("m", "m3", "h", "lambda_g"):
        check.finite(getattr(out, name), name)
    if kind in ("arcface", "curricular", "elastic_arc") and not 0.0 <= out.m < math.pi:
        raise ValueError(f"m must lie in [0, π) (an angle), got {out.m!r}")
    check.cos_margin(out.m3, "m3")
    if not 0.0 < check.finite(out.momentum, "momentum") <= 1.0:
        raise ValueError(f"momentum must lie in (0, 1], got {out.momentum!r}")
    if check.finite(out.std, "std") < 0:
        raise ValueError(f"std must be ≥ 0, got {out.std!r}")
    check.flag(out.plus, "plus")
    check.flag(out.easy_margin, "easy_margin")
    if check.flag(out.straight_through, "straight_through") and kind != "arcface":
        raise ValueError(f"straight_through applies to kind='arcface' only, not {kind!r}")
    for name in ("norm_bounds", "margin_bounds"):
        lo, hi = (check.finite(v, name) for v in getattr(out, name))
        if not lo < hi:
            raise ValueError(f"{name} must hold lower < upper, got {getattr(out, name)!r}")
    if out.norm_bounds[0] <= 0:
        raise ValueError(f"norm_bounds must be positive (g divides by the norm), got "
                         f"{out.norm_bounds!r}")
    check.count(out.sub_centers, "sub_centers")
    if not 0.0 <= check.finite(out.interclass_threshold, "interclass_threshold") <= 1.0:
        raise ValueError("interclass_threshold must lie in [0, 1] (0: off), got "
                         f"{out.interclass_threshold!r}")
    return out


def checked(mg) -> Margin:
    """`mg` as a caller handed it in: a :class:`Margin` whose settings pass :func:`margin`'s
    checks (a Margin built directly is checked here; while torch.compile traces, only its
    type is: the settings checks are host code on constants, run by every eager call)."""
    if not isinstance(mg, Margin):
        raise TypeError("margin must be a unitsface_kernels.margins.Margin (margins.margin(...)), "
                        f"got {type(mg).__name__}")
    if torch.compiler.is_compiling():
        return mg
    return margin(mg.kind, **{name: getattr(mg, name) for name in SETTINGS})


@dataclass
class MarginState:
    """The moving statistics a margin keeps (a module's buffers), with their authors' initial
    values: CurricularFace's t = 0, AdaFace's norm mean 20 and std 100."""

    t: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    norm_mean: torch.Tensor = field(default_factory=lambda: torch.full((), 20.0))
    norm_std: torch.Tensor = field(default_factory=lambda: torch.full((), 100.0))


STATISTICS = tuple(f.name for f in fields(MarginState))
"""The moving statistics of a MarginState, by name."""


# ----------------------------------------------------------------------------- per-row inputs

@dataclass
class RowInputs:
    """The per-row inputs of one step: angular a [B], additive d [B] (either may carry a
    gradient: MagFace's a does), the regulariser per row (MagFace; zeros otherwise) and the
    state after this step's update."""

    a: torch.Tensor
    d: torch.Tensor
    extra: torch.Tensor
    state: MarginState


def _ema(old: torch.Tensor, new: torch.Tensor, momentum: float, ok: torch.Tensor):
    """momentum·new + (1 − momentum)·old where `ok`, else old (a statistic that cannot be
    measured on this batch keeps its value: it is never poisoned)."""
    new = torch.where(ok, new, old.to(new.dtype))
    return (momentum * new + (1.0 - momentum) * old.to(new.dtype)).to(old.dtype)


def norm_statistics(norms: torch.Tensor):
    """(mean, unbiased std, count) of the finite entries of the clipped norms [B] — AdaFace's
    batch statistics. A batch with no finite norm has no mean, one with fewer than two none
    std: :func:`row_inputs` then keeps the moving values (with the authors' code, a B = 1
    batch would make the moving std NaN for ever)."""
    ok = torch.isfinite(norms)
    n = ok.sum()
    v = torch.where(ok, norms, torch.zeros_like(norms))
    mean = v.sum() / n.clamp_min(1)
    var = torch.where(ok, (norms - mean) ** 2, torch.zeros_like(norms)).sum() / (n - 1).clamp_min(1)
    return mean, var.sqrt(), n


def row_inputs(mg: Margin, x: torch.Tensor, target_cos: torch.Tensor, state: MarginState, *,
               training: bool = True, drawn: torch.Tensor | None = None,
               generator: torch.Generator | None = None, batch_stats=None) -> RowInputs:
    """The per-row inputs of margin `mg` for embeddings x [B, D] whose target cosines are
    `target_cos` [B] (detached use only: CurricularFace's t, ElasticFace+'s order).

    Moving statistics update in training only (eval reads them); CurricularFace's and AdaFace's
    authors update them on every forward, eval included — a module that wants that passes
    training=True. `batch_stats` overrides the batch's own statistics with global ones
    (class-parallel: (mean target cosine,) for curricular, (norm mean, norm std, count) for
    adaface, reduced over the ranks). ElasticFace's margins are `drawn` [B] when given (to
    reproduce another implementation's draws), else drawn from `generator`."""
    bsz = x.shape[0]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(bsz, dtype=dt, device=x.device)
    state = MarginState(state.t, state.norm_mean, state.norm_std)
    if mg.kind == "arcface":
        return RowInputs(zeros + mg.m, zeros + mg.m3, zeros, state)
    if mg.kind == "curricular":
        if training:
            with torch.no_grad():
                mean = batch_stats[0] if batch_stats is not None else target_cos.to(dt).mean()
                state.t = _ema(state.t, mean, mg.momentum, torch.isfinite(mean))
        return RowInputs(zeros + mg.m, zeros, zeros, state)
    if mg.kind == "adaface":
        norms = x.detach().to(dt).norm(dim=1).clip(1e-3, 100.0)
        if training:
            mean, std, n = batch_stats if batch_stats is not None else norm_statistics(norms)
            state.norm_mean = _ema(state.norm_mean, mean, mg.momentum, n >= 1)
            state.norm_std = _ema(state.norm_std, std, mg.momentum, n >= 2)
        z = (norms - state.norm_mean.to(dt)) / (state.norm_std.to(dt) + ANGLE_EPS)
        z = (z * mg.h).clip(-1.0, 1.0)
        return RowInputs(-mg.m * z, mg.m + mg.m * z, zeros, state)
    if mg.kind == "magface":
        (l_a, u_a), (l_m, u_m) = mg.norm_bounds, mg.margin_bounds
        a_norm = clip_with_grad(x.to(dt).norm(dim=1), l_a, u_a)
        a = (u_m - l_m) / (u_a - l_a) * (a_norm - l_a) + l_m
        return RowInputs(a, zeros, mg.lambda_g * (a_norm / u_a ** 2 + 1.0 / a_norm), state)
    # elastic: margins drawn per row
    if drawn is None:
        drawn = torch.randn(bsz, generator=generator, dtype=dt,
                            device=generator.device if generator is not None else x.device)
        drawn = (mg.m + mg.std * drawn).to(x.device)
    drawn = drawn.to(dt).reshape(bsz)
    if mg.plus:
        drawn = elastic_plus_order(drawn, target_cos.detach().to(dt))
    if mg.kind == "elastic_arc":
        return RowInputs(drawn, zeros, zeros, state)
    return RowInputs(zeros, drawn, zeros, state)


def elastic_plus_order(drawn: torch.Tensor, target_cos: torch.Tensor) -> torch.Tensor:
    """ElasticFace+'s assignment, as its code does it: the drawn margins sorted ascending, and
    row k given sorted[order[k]], order the rows sorted by target cosine descending. (The
    paper describes giving larger margins to rows of larger cosine — a rank assignment; the
    code indexes the sorted margins by the sort order itself, which is what is reproduced.)"""
    order = torch.sort(target_cos, descending=True).indices
    return torch.sort(drawn).values[order]


def clip_with_grad(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """torch.clamp with its gradient (1 inside, 0 outside) but NaN in, NaN out for both."""
    return torch.where(t < lo, torch.full_like(t, lo),
                       torch.where(t > hi, torch.full_like(t, hi), t))


# ----------------------------------------------------------------------------- the ops' settings

def option_fields(mg: Margin) -> dict:
    """The :class:`~unitsface_kernels.options.UnitsfaceOptions` fields with which the
    ``unitsface`` ops compute margin `mg` (docs/design.md §1.5): every formula of the family
    lives in :mod:`.reference` (target_logit, class_cosines, negative_cosines) and in the
    kernels; a margin is a choice of those fields plus its per-row inputs."""
    out = dict(margin_arc=0.0, margin_cos=0.0, arcface_straight_through=False,
               easy_margin=False, row_margins=False, no_fallback=False, angle_clip=False,
               curricular=False, interclass_threshold=float(mg.interclass_threshold),
               sub_centers=float(mg.sub_centers))
    if mg.kind == "arcface":
        out.update(margin_arc=float(mg.m), margin_cos=float(mg.m3),
                   arcface_straight_through=mg.straight_through)
    elif mg.kind == "curricular":
        out.update(margin_arc=float(mg.m), curricular=True)
    elif mg.kind == "adaface":
        out.update(row_margins=True, angle_clip=True)
    elif mg.kind == "magface":
        out.update(row_margins=True, easy_margin=mg.easy_margin)
    elif mg.kind == "elastic_arc":
        out.update(row_margins=True, no_fallback=True)
    else:  # elastic_cos: a = 0, cos(θ + 0) − d = c − d
        out.update(row_margins=True)
    return out


def margin_options(mg: Margin, base: UnitsfaceOptions) -> UnitsfaceOptions:
    """`base` (scale, eps, the USS part) with the margin fields of `mg`."""
    return replace(base, **option_fields(mg))


def target_of(o: UnitsfaceOptions, c: torch.Tensor, a, d) -> torch.Tensor:
    """f(c; a, d) of the target cosines c with the settings `o` (:func:`reference.target_logit`);
    a, d: m2, m3 of `o` unless ``o.row_margins`` (then the per-row margins, broadcasting)."""
    if not o.row_margins:
        a, d = o.margin_arc, o.margin_cos
    return target_logit(c, a, d, straight_through=o.arcface_straight_through,
                        easy_margin=o.easy_margin, no_fallback=o.no_fallback,
                        angle_clip=o.angle_clip)


def hard_threshold(o: UnitsfaceOptions, c_target: torch.Tensor, a) -> torch.Tensor:
    """CurricularFace's HARD_i = cos(θ_iy + a_i) without the fallback, taken without gradient
    (its code compares the negatives with it under no_grad)."""
    a = a if o.row_margins else o.margin_arc
    return target_logit(c_target.detach(), a, 0.0, no_fallback=True).detach()


def margin_rows(o: UnitsfaceOptions, rows: RowInputs, c_target: torch.Tensor):
    """The ops' ``margin_rows [4, B]`` (:class:`~unitsface_kernels.layouts.MarginRow`; None
    when `o` reads none), detached: A, D = a_i, d_i; HARD_i (curricular) = cos(θ_iy + a_i)
    without fallback; T_i = t, the moving average after this step's update."""
    if not o.needs_margin_rows:
        return None
    a, d = rows.a.detach(), rows.d.detach()
    out = torch.zeros(len(MarginRow), a.shape[0], dtype=a.dtype, device=a.device)
    out[MarginRow.A], out[MarginRow.D] = a, d
    if o.curricular:
        out[MarginRow.HARD] = hard_threshold(o, c_target.to(a.dtype), a)
        out[MarginRow.T] = rows.state.t.detach().to(a.dtype)
    return out


def target_cosines(o: UnitsfaceOptions, x: torch.Tensor, centres: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """c_iy [B], detached: the class cosine of each row's target (the maximum over its K
    sub-centre rows, clamped to ±o.cos_limit) from a gather of the B·K target rows of
    `centres` — read rounded to x's dtype and normalised with o.eps, as the kernels read them;
    O(B·K·D), no B × N matrix. A label −1 (a class of another shard) gives 0: summed over the
    ranks, each row gets the one rank's value that owns its class."""
    k = o.k
    with torch.no_grad():
        mine = labels >= 0
        rows = class_row_ids(torch.where(mine, labels, torch.zeros_like(labels)), k)
        w = normalize(readable_rows(centres[rows], None, x.dtype), o.eps)
        per = (w.reshape(x.shape[0], k, -1) * normalize(x, o.eps)[:, None, :]).sum(-1)
        c = clamp_sym(per.max(dim=1).values, o.cos_limit)
        return torch.where(mine, c, torch.zeros_like(c))


# ----------------------------------------------------------------------------- the oracle

def margin_logits(o: UnitsfaceOptions, cos: torch.Tensor, local: torch.Tensor,
                  rows: RowInputs) -> torch.Tensor:
    """z [B, N] = s·(n(c) on the negatives, f(c_y) on the target column `local` [B]) from the
    sub-centre cosines [B, N·K], with the formulas of :mod:`.reference`; `rows.a` may carry
    a gradient (MagFace), which reaches the target through f."""
    c = clamp_sym(class_cosines(cos, o.k), o.cos_limit)
    c_t = c.gather(1, local[:, None])
    f = target_of(o, c_t, rows.a[:, None], rows.d[:, None])
    hard = hard_threshold(o, c_t, rows.a[:, None]) if o.curricular else None
    t = rows.state.t.to(c.dtype) if o.curricular else None
    neg = negative_cosines(c, hard, t, curricular=o.curricular,
                           interclass_threshold=o.interclass_threshold)
    return o.scale * neg.scatter(1, local[:, None], f)


def margin_family_rows(x, centres, labels, mg: Margin, state: MarginState, *, scale=64.0,
                       index=None, training=True, drawn=None, generator=None, eps=EPS):
    """Per-row loss of the margin softmax with margin `mg` over all classes or the partial-FC
    index S (sorted classes; with K sub-centres the rows c·K … c·K + K − 1 of each class of S
    are read): L_i = lse_c z_ic − z_{i,y_i} + extra_i (MagFace's λ_g·g), differentiated by
    autograd (MagFace's a_i carries its gradient into the norm).

    Returns (rows [B], the state after this step's update)."""
    o = margin_options(mg, softmax_options(scale=scale, margin_arc=0.0, margin_cos=0.0,
                                           arcface_grad="exact", easy_margin=False, eps=eps))
    k = mg.sub_centers
    if index is None:
        w, local = centres, labels
    else:
        w, local = centres[class_row_ids(index, k)], torch.searchsorted(index, labels)
    cos = normalize(x, eps) @ normalize(readable_rows(w, None, x.dtype), eps).T
    c_t = clamp_sym(class_cosines(cos, k), o.cos_limit).gather(1, local[:, None])[:, 0]
    rows = row_inputs(mg, x, c_t.detach(), state, training=training, drawn=drawn,
                      generator=generator)
    z = margin_logits(o, cos, local, rows)
    loss = torch.logsumexp(z, dim=1) - z.gather(1, local[:, None])[:, 0] + rows.extra
    return loss, rows.state
