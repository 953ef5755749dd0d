"""The settings object of each op family, declared once (docs/design.md §3).

:class:`UssOptions` and :class:`UnitsfaceOptions` hold every scalar setting of a loss (scale,
margins, forms, the clamp, the normalisation eps). One is built and checked once — by a
public function from its keyword arguments, or by a module when it is built — with the
``*_options`` constructors below, which name each argument as the caller wrote it; it is then
carried down unchanged: module → :mod:`.ops` → :mod:`.contract` → kernels.

Every backend's ops take it as one ``float[] options`` argument: the fields in declaration
order, booleans as 0.0/1.0 (:meth:`pack`). The Triton kernels read them back with
:meth:`unpack`, the C++ ops with the struct of the same name in ``csrc/options.h`` (same
fields, same order), the eager reference with :meth:`unpack` too. A new setting is a new
field here, read by each backend's kernels: no op signature, fake kernel, autograd rule or
distributed wrapper changes. :meth:`keywords` turns an object back into the public keyword
arguments (the eager formulas of :mod:`.reference` take those, and the modules show them).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields, replace

from . import validation as check

FORMS = ("pairs", "lse")
EPS = 1e-5
"""The default normalisation eps, x̂ = x / max(‖x‖, eps): the official heads' 1e-5.
insightface's PartialFC_V2 and pytorch-metric-learning normalise with F.normalize's 1e-12,
which their drop-ins carry (docs/design.md §1)."""
LIBRARY_EPS = 1e-12
"""F.normalize's default eps: what arcface_torch's PartialFC_V2 and pytorch-metric-learning
normalise with."""
REDUCTIONS = ("mean", "sum", "none")
ANGLE_EPS = 1e-3
"""AdaFace's ε (``angle_clip``): its clamp of every cosine to ±(1 − ε), its clip of θ + a to
[ε, π − ε] and the σ + ε of its norm standardisation."""
ARCFACE_GRADS = ("exact", "straight_through")


class _Packed:
    """pack() / unpack() of a frozen dataclass of floats and bools."""

    def pack(self) -> list[float]:
        return [float(v) for v in astuple(self)]

    @classmethod
    def unpack(cls, values):
        flags = cls._BOOL_FIELDS
        if len(values) != len(flags):
            raise ValueError(f"{cls.__name__} has {len(flags)} fields, got {len(values)} "
                             "option values")
        return cls(*(bool(v) if flag else float(v) for flag, v in zip(flags, values)))


@dataclass(frozen=True)
class UssOptions(_Packed):
    """USS (docs/design.md §1.1): z⁺ = b − s(cos − m), z⁻ = s·cos − b."""

    scale: float         # s
    margin: float        # m, the positive margin
    lse: bool            # the log-sum-exp form (else "pairs")
    clamp: bool          # the official clamp of every softplus argument to [−s, s]
    in_batch: bool       # the reference set is the batch itself (pairs j ≠ i)
    eps: float           # the normalisation eps: x̂ = x / max(‖x‖, eps)

    @property
    def form(self) -> str:
        return "lse" if self.lse else "pairs"

    def keywords(self) -> dict:
        """The public keyword arguments that build this object (:func:`uss_options`)."""
        return dict(scale=self.scale, margin=self.margin, form=self.form,
                    official_clamp=self.clamp, eps=self.eps)

    def threshold_init(self) -> "UssOptions":
        """The settings of b₀ = mean_i lse_{N_i}(s·cos_ij) (docs/design.md §1.1): the lse form
        with m = 0 and no clamp, whose negative statistic B_i at b = 0 is that lse."""
        return replace(self, margin=0.0, lse=True, clamp=False)


@dataclass(frozen=True)
class UnitsfaceOptions(_Packed):
    """The margin softmax over class centres (§1.2), plus λ·USS on the bank rows of the same
    classes (§1.3) when the op is given a bank."""

    scale: float                    # s, shared by both parts
    margin_arc: float               # m2 (ArcFace)
    margin_cos: float               # m3 (CosFace)
    arcface_straight_through: bool  # insightface ≥ 2022-12: no fallback, f' taken as 1
    easy_margin: bool               # the margin only where cos > 0
    uss_margin: float               # m of the USS part
    uss_weight: float               # λ
    uss_lse: bool
    uss_clamp: bool                 # the official clamp in the USS part
    eps: float                      # the normalisation eps: x̂ = x / max(‖x‖, eps)
    # The margin family (docs/design.md §1.5): CosFace/ArcFace leave these at their defaults.
    row_margins: bool = False       # a_i, d_i from margin_rows (MarginRow.A, .D), not m2, m3
    no_fallback: bool = False       # cos(θ + a) − d everywhere (ElasticFace-Arc)
    angle_clip: bool = False        # AdaFace: cosines in ±(1 − ε), cos(clip(θ + a, ε, π − ε)) − d
    curricular: bool = False        # negatives c > MarginRow.HARD become c·(MarginRow.T + c)
    interclass_threshold: float = 0.0   # τ > 0: negatives with c > τ get logit 0, no gradient
    sub_centers: float = 1.0        # K rows per class in centres (row c·K + k), the class
    #                                 cosine their maximum (an integer ≥ 1, packed as a float)
    saved_exp_bytes: float = 0.0    # the memory the forward may keep its W tiles'
    #                                 exponentials in (bytes; :meth:`keeps_exps`)

    @property
    def arc(self) -> bool:
        return self.margin_arc != 0.0

    @property
    def k(self) -> int:
        """K, the sub-centres per class, as an int."""
        return int(self.sub_centers)

    @property
    def margin_family(self) -> bool:
        """Whether any setting beyond CosFace/ArcFace is on (docs/design.md §1.5)."""
        return (self.needs_margin_rows or self.no_fallback or self.angle_clip
                or self.interclass_threshold > 0.0 or self.sub_centers != 1.0)

    @property
    def needs_margin_rows(self) -> bool:
        """Whether the ops read the per-row margin inputs ``margin_rows`` [4, B]
        (:class:`~unitsface_kernels.layouts.MarginRow`)."""
        return self.row_margins or self.curricular

    @property
    def cos_limit(self) -> float:
        """Every cosine is clamped to [−lim, lim] before the logits (AdaFace: 1 − ε)."""
        return 1.0 - ANGLE_EPS if self.angle_clip else 1.0

    def keeps_exps(self, rows: int, columns: int, itemsize: int) -> bool:
        """Whether a forward over `rows` × `columns` (the classes of S) in a dtype of
        `itemsize` bytes keeps its W tiles' exponentials e'_ij = exp(z_ij − the max over a
        group of columns) for the backward, which then reads them instead of recomputing the
        W cosines (docs/design.md §2, where a backend does it): they fit the caller's
        budget, and every column but the target has z = s·cos, recovered from e' to 2⁻⁹/s
        in bf16. The decision margins keep the recompute (the inter-class filter,
        curricular's hard negatives, AdaFace's angle clip: a cosine that far off can cross
        their thresholds), as do sub-centres (the class cosine is a maximum over K rows)."""
        return (0 < rows * columns * itemsize <= self.saved_exp_bytes and self.k == 1
                and not self.curricular and not self.angle_clip
                and self.interclass_threshold == 0.0)

    @property
    def arcface_grad(self) -> str:
        return "straight_through" if self.arcface_straight_through else "exact"

    @property
    def uss_form(self) -> str:
        return "lse" if self.uss_lse else "pairs"

    def keywords(self, uss: bool = True) -> dict:
        """The public keyword arguments that build this object (:func:`unitsface_options`;
        without ``uss``, those of the margin softmax alone: :func:`softmax_options`)."""
        out = dict(scale=self.scale, margin_arc=self.margin_arc, margin_cos=self.margin_cos,
                   arcface_grad=self.arcface_grad, easy_margin=self.easy_margin, eps=self.eps)
        if uss:
            out.update(uss_margin=self.uss_margin, uss_form=self.uss_form,
                       uss_weight=self.uss_weight, official_clamp=self.uss_clamp)
        return out

    def threshold_init(self) -> UssOptions:
        """The settings of b₀ over the bank rows of the USS part (see
        :meth:`UssOptions.threshold_init`)."""
        return UssOptions(self.scale, 0.0, True, False, False, self.eps)


for _cls in (UssOptions, UnitsfaceOptions):
    # which fields are bools, read by unpack (named once: torch.compile traces no fields())
    _cls._BOOL_FIELDS = tuple(f.type == "bool" for f in fields(_cls))


# ----------------------------------------------------------------------------- from arguments

def uss_options(*, scale, margin, form, official_clamp, in_batch=False,
                eps=EPS) -> UssOptions:
    return UssOptions(check.scale(scale), check.cos_margin(margin, "margin"),
                      check.choice(form, FORMS, "form") == "lse",
                      check.flag(official_clamp, "official_clamp"), bool(in_batch),
                      check.norm_eps(eps))


def softmax_options(*, scale, margin_arc, margin_cos, arcface_grad,
                    easy_margin, eps=EPS, saved_exp_bytes=0) -> UnitsfaceOptions:
    """The margin softmax alone (no bank)."""
    return unitsface_options(scale=scale, margin_arc=margin_arc, margin_cos=margin_cos,
                             arcface_grad=arcface_grad, easy_margin=easy_margin, uss_margin=0.0,
                             uss_form="pairs", uss_weight=0.0, official_clamp=False, eps=eps,
                             saved_exp_bytes=saved_exp_bytes)


def unitsface_options(*, scale, margin_arc, margin_cos, arcface_grad, easy_margin, uss_margin,
                      uss_form, uss_weight, official_clamp, eps=EPS,
                      saved_exp_bytes=0) -> UnitsfaceOptions:
    margin_arc = check.finite(margin_arc, "margin_arc")
    if not 0.0 <= margin_arc < math.pi:
        raise ValueError(f"margin_arc must lie in [0, π), got {margin_arc!r}")
    return UnitsfaceOptions(
        check.scale(scale), margin_arc, check.cos_margin(margin_cos, "margin_cos"),
        check.choice(arcface_grad, ARCFACE_GRADS, "arcface_grad") == "straight_through",
        check.flag(easy_margin, "easy_margin"), check.cos_margin(uss_margin, "uss_margin"),
        check.non_negative(uss_weight, "uss_weight"),
        check.choice(uss_form, FORMS, "uss_form") == "lse",
        check.flag(official_clamp, "official_clamp"), check.norm_eps(eps),
        saved_exp_bytes=float(check.byte_budget(saved_exp_bytes, "saved_exp_bytes")))
