"""The margin family (docs/design.md §1.4) in eager PyTorch: the Python home of every margin
beyond CosFace/ArcFace, each as its authors' public code computes it.

A margin is described by three pieces, the shape every backend computes it in:

* **per-row inputs**, made once per step before the pass over the classes: an angular margin
  a_i and an additive margin d_i (from the feature norms, drawn from a distribution, or fixed),
  plus the moving statistics the margin keeps (updated from the whole batch — over every rank
  in class-parallel training — and returned, never updated in place here);
* **the target logit** f(c; a_i, d_i) of the target cosine c (times s), written in one
  function, :func:`target_cosine`, with the conventions of its authors (fallback where
  θ + a > π, easy margin, clipping of θ + a);
* **a modulation of the negatives** n(c) where the margin has one (CurricularFace's hard
  negatives, insightface's inter-class filtering, AdaFace's clamp of every cosine).

Two settings apply to every margin: ``sub_centers`` K (sub-center ArcFace: K rows per class in
W, row c·K + k, the class cosine the maximum over them, its gradient reaching the arg-max row
only) and ``interclass_threshold`` τ (insightface: a negative whose cosine exceeds τ > 0 gets
logit 0 — it stays in the softmax's sum as e⁰ — and no gradient).

Where a paper and its code disagree, the code is followed; docs/design.md §1.4 lists each case.
Every function here materialises the B × N cosines (it is the oracle, not a fast path) and is
differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from . import validation as check
from .options import ANGLE_EPS, EPS

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


DEFAULTS = {"adaface": dict(m=0.4, momentum=1.0), "elastic_cos": dict(m=0.35)}
"""Each kind's defaults where they differ from the dataclass's: its authors' code's
(AdaFace's head.py: m = 0.4, t_alpha = 1.0; ElasticFace-Cos: m = 0.35)."""



def margin(kind: str = "arcface", **settings) -> Margin:
    """A checked :class:`Margin`; every bad setting raises naming it (docs/design.md §5)."""
    check.choice(kind, KINDS, "kind")
    known = {f.name for f in fields(Margin)} - {"kind"}
    for name in settings:
        if name not in known:
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


@dataclass
class MarginState:
    """The moving statistics a margin keeps (a module's buffers), with their authors' initial
    values: CurricularFace's t = 0, AdaFace's norm mean 20 and std 100."""

    t: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    norm_mean: torch.Tensor = field(default_factory=lambda: torch.full((), 20.0))
    norm_std: torch.Tensor = field(default_factory=lambda: torch.full((), 100.0))


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


# ----------------------------------------------------------------------------- the logits

def class_cosines(cos: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """[B, N·K] cosines of every sub-centre → [B, N] class cosines, the maximum over each
    class's K rows (its gradient reaches the arg-max row only)."""
    if sub_centers == 1:
        return cos
    return cos.reshape(cos.shape[0], -1, sub_centers).amax(dim=2)


def target_cosine(mg: Margin, c: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """f(c; a, d), the target's cosine after the margin (its logit is s·f), for target
    cosines c [B] and per-row margins a, d [B] (:func:`row_inputs`); c is already clamped the
    way the margin clamps every cosine (:func:`clamp_cosines`).

    arcface, curricular: cos(θ + a) − d, insightface's fallback c − a·sin a − d where
      θ + a > π (c ≤ −cos a); sin θ = sqrt(max(1 − c², 1e-12)) keeps f' finite at c = ±1
      (the authors' sqrt(1 − c²) has an infinite gradient there, the only difference);
      arcface with straight_through: no fallback, and the gradient taken as if f = c − d;
    adaface: cos(clip(θ + a, ε, π − ε)) − d;
    magface: cos(θ + a), and with easy_margin c where c ≤ 0, else the fallback c − a·sin a;
    elastic_arc: cos(θ + a) with no fallback; elastic_cos: c − d."""
    if mg.kind == "elastic_cos":
        return c - d
    if mg.kind == "adaface":
        theta = torch.acos(c)
        return torch.cos(clip_with_grad(theta + a, ANGLE_EPS, math.pi - ANGLE_EPS)) - d
    if mg.straight_through:
        f = c * torch.cos(a) - torch.sqrt(torch.clamp(1.0 - c * c, min=0.0)) * torch.sin(a)
        return c + (f - c).detach() - d
    sin_t = torch.sqrt(torch.clamp(1.0 - c * c, min=1e-12))
    f = c * torch.cos(a) - sin_t * torch.sin(a)
    if mg.kind == "elastic_arc":
        return f
    if mg.kind == "magface" and mg.easy_margin:
        return torch.where(c > 0, f, c)
    return torch.where(c > -torch.cos(a), f, c - a * torch.sin(a)) - d


def clamp_cosines(mg: Margin, cos: torch.Tensor) -> torch.Tensor:
    """Every cosine clamped as the margin's code clamps it: [−1, 1], AdaFace [−1 + ε, 1 − ε]
    (its gradient zero outside)."""
    lim = 1.0 - ANGLE_EPS if mg.kind == "adaface" else 1.0
    return clip_with_grad(cos, -lim, lim)


def negative_cosines(mg: Margin, c: torch.Tensor, c_target: torch.Tensor, a: torch.Tensor,
                     state: MarginState) -> torch.Tensor:
    """n(c) of the negatives [B, N] (the target column is overwritten afterwards).

    curricular: c·(t + c) where c > cos(θ_y + a) (the margin's cos(θ + m) without the
      fallback, compared without gradient, as the code does), t the updated moving average;
    every margin with τ > 0: 0 where c > τ (no gradient), after the modulation above."""
    out = c
    if mg.kind == "curricular":
        sin_y = torch.sqrt(torch.clamp(1.0 - c_target * c_target, min=1e-12))
        hard_at = (c_target * torch.cos(a) - sin_y * torch.sin(a)).detach()
        t = state.t.to(c.dtype)
        out = torch.where(c > hard_at[:, None], c * (t + c), c)
    if mg.interclass_threshold > 0:
        out = torch.where(c.detach() > mg.interclass_threshold, torch.zeros_like(c), out)
    return out


def margin_logits(mg: Margin, cos: torch.Tensor, local: torch.Tensor, rows: RowInputs,
                  scale: float) -> torch.Tensor:
    """z [B, N] = s·(n(c) on the negatives, f(c_y) on the target column `local` [B])."""
    c = clamp_cosines(mg, class_cosines(cos, mg.sub_centers))
    c_t = c.gather(1, local[:, None])[:, 0]
    neg = negative_cosines(mg, c, c_t, rows.a, rows.state)
    f = target_cosine(mg, c_t, rows.a, rows.d)
    return scale * neg.scatter(1, local[:, None], f[:, None])


def margin_family_rows(x, centres, labels, mg: Margin, state: MarginState, *, scale=64.0,
                       index=None, training=True, drawn=None, generator=None, eps=EPS):
    """Per-row loss of the margin softmax with margin `mg` over all classes or the partial-FC
    index S (sorted classes; with K sub-centres the rows c·K … c·K + K − 1 of each class of S
    are read): L_i = lse_c z_ic − z_{i,y_i} + extra_i (MagFace's λ_g·g).

    Returns (rows [B], the state after this step's update)."""
    from .reference import normalize, readable_rows

    k = mg.sub_centers
    if index is None:
        w = centres
        local = labels
    else:
        rows_of = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
        w = centres[rows_of]
        local = torch.searchsorted(index, labels)
    w = readable_rows(w, None, x.dtype)
    cos = normalize(x, eps) @ normalize(w, eps).T
    c_t = clamp_cosines(mg, class_cosines(cos, k)).gather(1, local[:, None])[:, 0]
    rows = row_inputs(mg, x, c_t.detach(), state, training=training, drawn=drawn,
                      generator=generator)
    z = margin_logits(mg, cos, local, rows, scale)
    loss = torch.logsumexp(z, dim=1) - z.gather(1, local[:, None])[:, 0] + rows.extra
    return loss, rows.state
