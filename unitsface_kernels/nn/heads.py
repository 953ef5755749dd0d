"""The training heads: :class:`PartialFC` (the margin softmax over class centres, shaped like
insightface's PartialFC_V2), :class:`USSLoss` (the sample-to-sample loss alone) and
:class:`UniTSFaceHead` (both, in one pass)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from .. import margins, options
from .. import validation as check
from ..backends import BACKENDS
from ..distributed import gather_batch
from ..options import EPS, LIBRARY_EPS
from . import checkpoint
from .margin import MarginHead
from .calls import (Settings, bank_eps, begin_call, call_threshold_init, call_unitsface,
                    call_uss)
from .parts import (FreshWeights, MemoryBank, Threshold, fresh_rows, no_autocast,
                    partial_fc_index, readable, setup_classes, shard_repr)


class PartialFC(Settings, checkpoint.Official, MarginHead, FreshWeights):
    """The sample-to-class margin softmax (CosFace/ArcFace) with partial FC, shaped like
    insightface's ``PartialFC_V2``:

        loss = PartialFC(512, 93431, sample_rate=0.2)(embeddings, labels)

    ``weight`` (num_classes × embedding_size) is initialised normal(0, 0.01) as in insightface.
    In training mode with ``sample_rate < 1`` each call samples ``int(sample_rate·C)`` classes
    (all classes of the batch plus random others, :func:`~unitsface_kernels.sample_classes`);
    the other rows of ``weight`` get exactly zero gradient. In eval mode all classes are used.

    The module owns classes ``[class_start, class_start + num_local)``: all of them in one
    process; under torch.distributed (``class_parallel``, see the package docstring) this
    rank's shard, with ``sample_rate`` applied to the shard as in insightface
    (``int(sample_rate·num_local)`` classes per rank). ``process_group``: the ranks sharing
    the classes (None: the default group). ``arcface_grad`` and ``easy_margin``: the ArcFace
    conventions of :func:`~unitsface_kernels.fused_margin_softmax_loss`. ``fp16``: compute
    the loss in float16 from float32 embeddings (what PartialFC_V2's ``fp16`` does). ``eps``:
    the normalisation eps, x̂ = x / max(‖x‖, eps) (the official 1e-5; the drop-ins below
    carry their library's F.normalize eps, 1e-12).
    ``sparse_grad``: with partial FC, ``weight`` gets a sparse gradient of the sampled rows
    (no dense C × D gradient per step); step it with
    :class:`~unitsface_kernels.optim.SparseSGD`, which keeps the other rows exactly where
    dense SGD would (the module brings the rows it reads up to date first).

    :meth:`from_insightface` builds one from arcface_torch's ``CombinedMarginLoss``;
    ``load_official`` loads the official normalised softmax head's ``weight``. The settings
    are checked once, when the module is built, and held in ``options`` (a
    :class:`~unitsface_kernels.options.UnitsfaceOptions`); ``scale``, ``margin_cos``, … read
    them.

    ``margin``: a margin of the family (:func:`unitsface_kernels.margins.margin`: sub-center
    ArcFace, inter-class filtering, CurricularFace, AdaFace, MagFace, ElasticFace; see
    :class:`~unitsface_kernels.nn.margin.MarginHead` for its moving statistics, buffers
    updated in training mode only). With K sub-centres ``weight`` is (C·K) × D, class c's rows
    c·K … c·K + K − 1; partial FC samples classes, all K rows of each (the sparse gradient
    holds those rows).

    ``saved_exp_bytes``: the memory the triton backend's forward may keep its B × |S|
    exponentials in, so that its backward skips recomputing the cosines
    (:func:`~unitsface_kernels.fused_margin_softmax_loss`; 0: never).
    """

    OFFICIAL = (checkpoint.CENTRES,)
    SETTINGS = ("scale", "margin_cos", "margin_arc", "arcface_grad", "easy_margin", "eps")

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 1.0, *,
                 scale: float = 64.0, margin_cos: float = 0.4, margin_arc: float = 0.0,
                 arcface_grad: str = "exact", easy_margin: bool = False, fp16: bool = False,
                 sparse_grad: bool = False, eps: float = EPS, backend: str = "auto",
                 class_parallel: Optional[bool] = None, process_group=None,
                 margin: Optional[margins.Margin] = None,
                 margin_generator: Optional[torch.Generator] = None, saved_exp_bytes: int = 0):
        super().__init__()
        self.options = options.softmax_options(scale=scale, margin_arc=margin_arc,
                                               margin_cos=margin_cos, arcface_grad=arcface_grad,
                                               easy_margin=easy_margin, eps=eps,
                                               saved_exp_bytes=saved_exp_bytes)
        k = self._init_margin(margin, dict(margin_arc=margin_arc, margin_cos=margin_cos,
                                           arcface_grad=arcface_grad, easy_margin=easy_margin),
                              margin_generator)
        if self.margin is not None:
            self.options = margins.margin_options(self.margin, self.options)
        self.fp16 = check.flag(fp16, "fp16")
        self.sparse_grad = check.flag(sparse_grad, "sparse_grad")
        self.backend = check.choice(backend, BACKENDS, "backend")
        setup_classes(self, embedding_size, num_classes, class_parallel, process_group,
                      sample_rate)
        self.weight = nn.Parameter(torch.empty(self.num_local * k, self.embedding_size))
        self.reset_parameters()

    @classmethod
    def from_insightface(cls, margin_loss, embedding_size: int, num_classes: int,
                         sample_rate: float = 1.0, fp16: bool = False, *,
                         arcface_grad: str = "straight_through", eps: float = LIBRARY_EPS,
                         **kwargs) -> "PartialFC":
        """The drop-in for arcface_torch's ``PartialFC_V2(margin_loss, embedding_size,
        num_classes, sample_rate, fp16)``, reading ``s``, ``m1``, ``m2``, ``m3``,
        ``easy_margin`` and ``interclass_filtering_threshold`` from its ``CombinedMarginLoss``
        and computing what that loss computes:

        * m1 = 1 and m3 = 0: ArcFace with m2 — as arcface_torch today
          (``arcface_grad="straight_through"``: arccos → +m2 → cos without a fallback, the
          target's gradient taken as additive; ``easy_margin`` is not read there, as
          arcface_torch does not), or as insightface before 2022-12 with
          ``arcface_grad="exact"`` (exact gradient, the cos − m2·sin m2 fallback, or
          ``easy_margin`` when the object sets it);
        * m3 > 0: CosFace with m3 (arcface_torch then ignores m2, and so does this).

        The normalisation is PartialFC_V2's F.normalize: ``eps`` = 1e-12 (not the official
        UniTSFace heads' 1e-5), which only embeddings or centres shorter than 1e-5 see.
        Inter-class filtering (``interclass_filtering_threshold`` τ > 0: a negative with
        cos > τ gets logit 0 and no gradient) becomes ``margin=margins.margin("arcface", …,
        interclass_threshold=τ)``. SphereFace's m1 ≠ 1 and a negative m3 with m1 = 1
        (arcface_torch raises) are not expressible by the fused kernels: they raise a
        ValueError naming the setting. Keyword arguments go to the
        constructor (backend, class_parallel, process_group)."""
        missing = [a for a in ("s", "m1", "m2", "m3") if not hasattr(margin_loss, a)]
        if missing:
            raise TypeError(f"margin_loss must look like insightface's CombinedMarginLoss "
                            f"(attributes s, m1, m2, m3); {type(margin_loss).__name__} has no "
                            f"{', '.join(missing)}")
        s, m1, m2, m3 = (check.finite(getattr(margin_loss, a), f"margin_loss.{a}")
                         for a in ("s", "m1", "m2", "m3"))
        filtering = check.finite(getattr(margin_loss, "interclass_filtering_threshold", 0) or 0,
                                 "margin_loss.interclass_filtering_threshold")
        if m1 != 1.0:
            raise ValueError(f"margin_loss.m1 = {m1}: SphereFace's multiplicative margin is "
                             "not supported by the fused kernels (m1 must be 1)")
        easy = bool(getattr(margin_loss, "easy_margin", False)) and arcface_grad == "exact"
        if m3 == 0.0:
            chosen = dict(margin_arc=m2, margin_cos=0.0, easy_margin=easy)
        elif m3 > 0.0:
            chosen = dict(margin_arc=0.0, margin_cos=m3)
        else:
            raise ValueError(f"margin_loss.m3 = {m3}: CombinedMarginLoss supports m3 ≥ 0 only")
        if filtering <= 0:
            return cls(embedding_size, num_classes, sample_rate, scale=s,
                       arcface_grad=arcface_grad, fp16=fp16, eps=eps, **chosen, **kwargs)
        # the filter is a margin of the family: arcface (or CosFace) with τ
        if chosen.get("easy_margin"):
            raise ValueError("margin_loss.easy_margin with interclass_filtering_threshold > 0 "
                             "is not expressible with arcface_grad='exact': take "
                             "arcface_grad='straight_through' (arcface_torch's)")
        if not 0.0 < filtering <= 1.0:
            raise ValueError(f"margin_loss.interclass_filtering_threshold = {filtering}: a "
                             "cosine threshold must lie in [0, 1]")
        mg = margins.margin("arcface", m=chosen["margin_arc"], m3=chosen["margin_cos"],
                            straight_through=(arcface_grad == "straight_through"
                                              and chosen["margin_arc"] > 0),
                            interclass_threshold=filtering)
        return cls(embedding_size, num_classes, sample_rate, scale=s, fp16=fp16, eps=eps,
                   margin=mg, **kwargs)

    @classmethod
    def from_pml(cls, loss, sample_rate: float = 1.0, **kwargs) -> "PartialFC":
        """The drop-in for pytorch-metric-learning's ``CosFaceLoss`` / ``ArcFaceLoss``
        (``loss(embeddings, labels)`` → ``head(embeddings, labels)``): the same ``scale`` and
        margin (CosFace: ``margin_cos = loss.margin``; ArcFace: ``margin_arc = loss.margin``,
        which PML holds in radians, with the exact gradient and the cos − m·sin m fallback
        where θ > π − m, i.e. ``arcface_grad="exact"``), and ``weight`` = ``loss.W``
        transposed (PML stores W as D × C), in W's dtype and on its device (this rank's rows
        when class-parallel). With ``sample_rate=1`` the loss and its gradients are PML's
        (``head.weight.grad`` is ``loss.W.grad`` transposed); ``sample_rate < 1`` is partial
        FC, which PML does not have. Optimise ``head.parameters()`` instead of ``loss``'s.
        The normalisation is PML's F.normalize: ``eps`` = 1e-12.

        What differs: cosines are clamped to [−1, 1] here (PML clamps only the target's
        before its arccos: a difference of rounding); where the target's cosine is exactly ±1
        PML's arccos has an infinite derivative and this stays finite (sin θ ≥ 1e-6); PML
        casts W to the embeddings' dtype in place, here a float32 ``weight`` stays float32
        (the kernels read it rounded to the embeddings' dtype). Miners (``indices_tuple``)
        and ``ref_emb`` are not taken; ``collect_stats`` changes no number
        and records nothing here. ``SubCenterArcFaceLoss`` (K = ``loss.sub_centers``
        sub-centres per class, PML's column c·K + k: the same row order as here) becomes
        ``margin=margins.margin("arcface", m=loss.margin, sub_centers=K)`` with the weight
        (C·K, D); its ``get_outliers`` (a data-cleaning helper, not the loss) is not taken.
        Another loss class (SphereFaceLoss, …), a reducer other than MeanReducer, a weight or
        embedding regulariser, or a distance other than plain CosineSimilarity raise a
        TypeError or ValueError naming it.
        Keyword arguments go to the constructor (backend, class_parallel, process_group, …;
        an explicit setting such as ``arcface_grad`` wins over the one read from ``loss``).
        """
        try:
            from pytorch_metric_learning import distances as pml_distances
            from pytorch_metric_learning import losses as pml_losses
            from pytorch_metric_learning import reducers as pml_reducers
        except ImportError:  # then `loss` cannot be one of its losses
            pml_losses = None
        kinds = () if pml_losses is None else (pml_losses.CosFaceLoss, pml_losses.ArcFaceLoss,
                                               pml_losses.SubCenterArcFaceLoss)
        if type(loss) not in kinds:  # other subclasses (SphereFaceLoss, …) compute more
            raise TypeError(f"loss must be pytorch_metric_learning's CosFaceLoss, ArcFaceLoss or "
                            f"SubCenterArcFaceLoss; got "
                            f"{type(loss).__module__}.{type(loss).__name__}")
        name = type(loss).__name__
        for reg in ("weight_regularizer", "embedding_regularizer"):
            if getattr(loss, reg, None) is not None:
                raise ValueError(f"loss.{reg} = {getattr(loss, reg)!r}: a regulariser is not "
                                 f"supported by the fused kernels (build the {name} without it)")
        if type(loss.reducer) is not pml_reducers.MeanReducer:
            raise ValueError(f"loss.reducer is {type(loss.reducer).__name__}: the fused kernels "
                             "reduce by the mean over the batch (MeanReducer, PML's default)")
        dist = loss.distance
        if (type(dist) is not pml_distances.CosineSimilarity or dist.p != 2 or dist.power != 1
                or not dist.normalize_embeddings):
            raise ValueError(f"loss.distance is {dist!r} (p={getattr(dist, 'p', None)}, "
                             f"power={getattr(dist, 'power', None)}): the fused kernels compute "
                             "the plain cosine (CosineSimilarity(), PML's default)")
        s = check.scale(loss.scale, "loss.scale")
        m = check.finite(loss.margin, "loss.margin")
        if name == "CosFaceLoss":
            margin_kw = dict(margin_arc=0.0, margin_cos=check.cos_margin(m, "loss.margin"))
        elif not 0.0 <= m < torch.pi:
            raise ValueError(f"loss.margin = {m!r} rad: an ArcFace margin must lie in [0, π)")
        elif name == "SubCenterArcFaceLoss":
            margin_kw = dict(margin=margins.margin("arcface", m=m, sub_centers=loss.sub_centers))
        else:
            margin_kw = dict(margin_arc=m, margin_cos=0.0, arcface_grad="exact")
        k = loss.sub_centers if name == "SubCenterArcFaceLoss" else 1
        w = loss.W.detach()
        if w.dim() != 2 or w.shape[1] != loss.num_classes * k:
            raise ValueError(f"loss.W has shape {tuple(w.shape)}, expected (embedding_size, "
                             f"num_classes={loss.num_classes} × sub_centers={k})")
        head = cls(w.shape[0], loss.num_classes, sample_rate,
                   **{"scale": s, "eps": LIBRARY_EPS, **margin_kw, **kwargs})
        rows = w.t()[head.class_start * k:(head.class_start + head.num_local) * k]
        head.weight = nn.Parameter(rows.clone(memory_format=torch.contiguous_format))
        return head

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def local_labels(self, labels: Tensor) -> Tensor:
        """Global class ids → rows of this module's ``weight`` (identity in one process;
        −1 for classes of other shards)."""
        return self.shard.local_labels(labels) if self.shard is not None else labels

    def settings(self) -> dict:
        return self.options.keywords(uss=False)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, labels, backend = begin_call(self, embeddings, labels, "unitsface", "embeddings")
        if self.fp16 and x.dtype == torch.float32:
            x = x.half()
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
        index = partial_fc_index(self, labels)
        fresh_rows(self.weight, self.weight_rows(index))
        with no_autocast(x.device):
            return call_unitsface(self, backend, x, labels, readable(self.weight, x.dtype),
                                  index=index)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, {self.settings_repr()}, "
                f"sparse_grad={self.sparse_grad}, backend={self.backend!r}{shard_repr(self)}"
                f"{self.margin_repr()}")


class USSLoss(Settings, checkpoint.Official, Threshold, MemoryBank):
    """The unified-threshold-integrated sample-to-sample loss (docs/design.md §1.1) alone, with
    a learnable b (``bias``; data-initialised at the first training call while b ≤ 0): the
    official ``Unified_Threshold_Integrated_Sample_to_Sample_Loss`` (with its clamp: the
    module default is ``official_clamp=True``).

    mode="bank": the reference set is the module's memory bank (``bank``, ``bank_valid``;
        needs embedding_size and num_classes), updated with the batch after the loss.
    mode="inbatch": the reference set is the batch itself (pairs i ≠ j); no state but b.

    In bank mode under torch.distributed the bank is class-sharded (``class_parallel``,
    ``process_group``: see the package docstring); the in-batch mode stays per rank.
    ``eps``: the normalisation eps (≤ 1e-5 in bank mode, see docs/design.md §1.4). The
    settings are held in ``options`` (a :class:`~unitsface_kernels.options.UssOptions`).
    """

    SETTINGS = ("scale", "margin", "form", "official_clamp", "eps")

    def __init__(self, embedding_size: Optional[int] = None, num_classes: Optional[int] = None,
                 *, scale: float = 64.0, margin: float = 0.1, form: str = "pairs",
                 official_clamp: bool = True, mode: str = "bank",
                 bank_dtype: torch.dtype = torch.float32, eps: float = EPS,
                 backend: str = "auto", class_parallel: Optional[bool] = None,
                 process_group=None):
        super().__init__()
        self.mode = check.choice(mode, ("bank", "inbatch"), "mode")
        self.options = options.uss_options(scale=scale, margin=margin, form=form,
                                           official_clamp=official_clamp,
                                           in_batch=self.mode == "inbatch", eps=eps)
        self.backend = check.choice(backend, BACKENDS, "backend")
        self.embedding_size = self.num_classes = None
        self.shard = None
        if self.mode == "bank":
            if embedding_size is None or num_classes is None:
                raise ValueError("mode='bank' needs embedding_size and num_classes (one bank "
                                 "row per class); mode='inbatch' needs neither")
            bank_eps(self.options.eps)
            setup_classes(self, embedding_size, num_classes, class_parallel, process_group)
            self._init_bank(self.num_local, self.embedding_size, bank_dtype)
        elif embedding_size is not None:
            self.embedding_size = check.count(embedding_size, "embedding_size")
        self._init_threshold()

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        if self.mode == "inbatch":
            if self.embedding_size is None:  # any width, checked as this one from now on
                self.embedding_size = check.embeddings(x).shape[1]
            x, labels, backend = begin_call(self, x, labels, "uss")
            self._maybe_init_threshold(lambda: call_threshold_init(self, backend, x, labels))
            with no_autocast(x.device):
                return call_uss(self, backend, x, labels, self.bias, None)
        x, labels, backend = begin_call(self, x, labels, "uss")
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
        bank, valid = self._bank_for_loss(x.dtype)
        self._maybe_init_threshold(lambda: call_threshold_init(self, backend, x, labels, bank,
                                                               valid))
        with no_autocast(x.device):
            loss = call_uss(self, backend, x, labels, self.bias, bank, valid)
        return self._update_bank(x, labels, loss, (x, self.bias))

    def official_entries(self) -> tuple[checkpoint.Entry, ...]:
        # bank mode needs feat_mem; in-batch mode has the threshold alone
        if self.mode == "inbatch":
            return (checkpoint.BANK_BIAS,)
        return checkpoint.FEAT_MEM, checkpoint.BANK_BIAS

    def extra_repr(self) -> str:
        size = (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                if self.mode == "bank" else "")
        return (f"{size}mode={self.mode!r}, {self.settings_repr()}, "
                f"backend={self.backend!r}{shard_repr(self)}")


class UniTSFaceHead(Settings, checkpoint.Official, Threshold, MemoryBank, MarginHead,
                    FreshWeights):
    """The UniTSFace training head (Li et al., NeurIPS 2023): CosFace/ArcFace softmax over
    the class centres (with partial FC when sample_rate < 1) plus λ·USS against a memory bank
    of the last feature of every class, computed in one fused pass; returns the loss.

        head = UniTSFaceHead(512, num_classes)
        loss = head(backbone(images), labels, with_uss=epoch > 0)   # official schedule
        same = head.verify(emb_a, emb_b)                            # cos > head.threshold

    Parameters: ``weight`` (C×D class centres, initialised as the official code does:
    ``kaiming_normal_(a=1, mode="fan_in")``, i.e. normal(0, 1/√D)) and ``bias`` (b, starting
    at 0). Buffers: ``bank`` (C×D, ``bank_dtype``) and ``bank_valid`` (C, bool). See the
    package docstring for the dtype policy, the bank update and the initialisation of b.

    Args:
        sample_rate: partial-FC rate; training steps use int(rate·C) classes (the batch's and
            random others) for both the softmax and USS; eval mode uses all classes.
        scale, margin_cos, margin_arc, arcface_grad, easy_margin: the softmax part (CosFace
            m3 = 0.4 is UniTSFace's choice; ArcFace conventions as in
            :func:`~unitsface_kernels.fused_margin_softmax_loss`).
        uss_margin, uss_form, uss_weight: USS's positive margin m, "pairs" (official) or
            "lse", and its weight λ. official_clamp: the official head's clamp of USS's
            softplus arguments to [−s, s] (default True: this module is the official head).
        sparse_grad: with partial FC, ``weight`` gets a sparse gradient of the sampled rows
            (see :class:`PartialFC`; step it with :class:`~unitsface_kernels.optim.SparseSGD`).
        eps: the normalisation eps, x̂ = x / max(‖x‖, eps), of both parts (the official 1e-5;
            at most 1e-5, see docs/design.md §1.4).
        class_parallel, process_group: class-parallel training under torch.distributed
            (None: automatic when initialised with several ranks; see the package docstring):
            this rank then holds the rows [class_start, class_start + num_local) of weight and
            bank, and samples int(sample_rate·num_local) classes of its shard per step.
        margin: a margin of the family for the softmax part, as in :class:`PartialFC`
            (``weight`` is (C·K) × D with K sub-centres; the bank keeps one row per class).
        saved_exp_bytes: the memory budget of the softmax part's stored exponentials (triton
            backend; see :class:`PartialFC`).

    The settings are checked once, when the module is built, and held in ``options`` (a
    :class:`~unitsface_kernels.options.UnitsfaceOptions`), which every call hands down to the
    kernels; ``scale``, ``margin_cos``, … read them.
    """

    OFFICIAL = (checkpoint.CENTRES, replace(checkpoint.FEAT_MEM, required=False),
                checkpoint.BANK_BIAS)
    SETTINGS = ("scale", "margin_cos", "margin_arc", "arcface_grad", "easy_margin",
                "uss_margin", "uss_form", "uss_weight", "official_clamp", "eps")

    def __init__(self, embedding_size: int, num_classes: int, *, sample_rate: float = 1.0,
                 scale: float = 64.0, margin_cos: float = 0.4, margin_arc: float = 0.0,
                 arcface_grad: str = "exact", easy_margin: bool = False,
                 uss_margin: float = 0.1, uss_form: str = "pairs", uss_weight: float = 1.0,
                 official_clamp: bool = True, sparse_grad: bool = False,
                 bank_dtype: torch.dtype = torch.float32, eps: float = EPS,
                 backend: str = "auto", class_parallel: Optional[bool] = None,
                 process_group=None, margin: Optional[margins.Margin] = None,
                 margin_generator: Optional[torch.Generator] = None, saved_exp_bytes: int = 0):
        super().__init__()
        self.options = options.unitsface_options(
            scale=scale, margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
            easy_margin=easy_margin, uss_margin=uss_margin, uss_form=uss_form,
            uss_weight=uss_weight, official_clamp=official_clamp, eps=eps,
            saved_exp_bytes=saved_exp_bytes)
        k = self._init_margin(margin, dict(margin_arc=margin_arc, margin_cos=margin_cos,
                                           arcface_grad=arcface_grad, easy_margin=easy_margin),
                              margin_generator)
        if self.margin is not None:
            self.options = margins.margin_options(self.margin, self.options)
        bank_eps(self.options.eps)
        self.sparse_grad = check.flag(sparse_grad, "sparse_grad")
        self.backend = check.choice(backend, BACKENDS, "backend")
        setup_classes(self, embedding_size, num_classes, class_parallel, process_group,
                      sample_rate)
        self._init_threshold()
        self.weight = nn.Parameter(torch.empty(self.num_local * k, self.embedding_size))
        self._init_bank(self.num_local, self.embedding_size, bank_dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: kaiming normal with a=1, fan_in (std 1/√D); b = 0; empty bank."""
        nn.init.kaiming_normal_(self.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
        with torch.no_grad():
            self.bias.zero_()
        self.reset_bank()

    def forward(self, x: Tensor, labels: Tensor, with_uss: bool = True) -> Tensor:
        with_uss = check.flag(with_uss, "with_uss")
        x, labels, backend = begin_call(self, x, labels, "unitsface")
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
        index = partial_fc_index(self, labels)
        fresh_rows(self.weight, self.weight_rows(index))
        weight = readable(self.weight, x.dtype)
        if not with_uss:
            with no_autocast(x.device):
                loss = call_unitsface(self, backend, x, labels, weight, index=index)
            loss = loss + 0.0 * self.bias.sum()  # b takes part (zero gradient): DDP-friendly
            return self._update_bank(x, labels, loss, ())
        bank, valid = self._bank_for_loss(x.dtype)
        # b₀ over the reference rows this step's loss uses: the (sampled) classes' bank rows
        self._maybe_init_threshold(lambda: call_threshold_init(self, backend, x, labels, bank,
                                                               valid, index))
        with no_autocast(x.device):
            loss = call_unitsface(self, backend, x, labels, weight, bank, self.bias, valid,
                                  index)
        return self._update_bank(x, labels, loss, (x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, {self.settings_repr()}, "
                f"sparse_grad={self.sparse_grad}, "
                f"bank_dtype={self._buffers['bank'].dtype}, "
                f"backend={self.backend!r}{shard_repr(self)}{self.margin_repr()}")
