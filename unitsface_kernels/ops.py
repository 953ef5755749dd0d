"""Public loss functions: argument checks, backend choice and the call into a backend.

The maths is docs/design.md §1; :mod:`unitsface_kernels.reference` states it in eager
PyTorch and :mod:`unitsface_kernels.contract` wires the fused kernels into autograd. With
``shard=`` the class-parallel versions of :mod:`unitsface_kernels.distributed` run instead.

Each public function checks its arguments, builds its op family's settings object
(:mod:`.options`) and resolves its backend once, then calls the internal entry of the family
— :func:`run_uss`, :func:`run_threshold_init`, :func:`run_unitsface` — which checks nothing
and goes straight to a backend. The modules (:mod:`unitsface_kernels.nn`) call those entries
directly with the settings object they built and the batch they checked.
"""

from __future__ import annotations

import torch

from . import backends, contract, distributed, margin_calls, margins, options, reference
from . import validation as check
from .bank import bank_update_  # noqa: F401  (public name)
from .layouts import UssStat
from .options import EPS, UnitsfaceOptions, UssOptions
from .sampling import sample_classes  # noqa: F401  (public name)


# ----------------------------------------------------------------------------- internal entries

def run_uss(o: UssOptions, x, labels, bias, ref, ref_labels, ref_valid, *, backend: str,
            reduction: str = "mean"):
    """The USS loss of checked inputs on a resolved backend. ``o.in_batch``: the batch is
    its own reference set (``ref``, ``ref_labels`` unused); else ``ref_labels=None`` means
    bank row c holds class c."""
    if backend == "reference":
        rows = reference.uss_rows(x, labels, bias, None if o.in_batch else ref,
                                  None if o.in_batch else ref_labels, ref_valid, **o.keywords())
    else:
        ref, ref_labels = _reference_set(o, x, labels, ref, ref_labels)
        rows = contract.forward_op("uss", backend)(x, ref, labels, ref_labels, ref_valid, bias,
                                                   o.pack())[0]
    return reference.reduce_rows(rows.to(reference.compute_dtype(x.dtype)), reduction)


@torch.no_grad()
def run_threshold_init(o: UssOptions, x, labels, ref, ref_labels, ref_valid, *, backend: str):
    """b₀ (see :func:`uss_bias_init`) of checked inputs on a resolved backend, with the scale,
    eps and reference set of the loss settings ``o``."""
    if backend == "reference":
        return reference.eager_uss_bias_init(x, labels, None if o.in_batch else ref,
                                             None if o.in_batch else ref_labels, ref_valid,
                                             scale=o.scale, eps=o.eps)
    ref, ref_labels = _reference_set(o, x, labels, ref, ref_labels)
    zero = torch.zeros((), dtype=reference.compute_dtype(x.dtype), device=x.device)
    stats = contract.forward_op("uss", backend)(x, ref, labels, ref_labels, ref_valid, zero,
                                                o.threshold_init().pack())[1]
    return reference.mean_of_finite(stats[UssStat.B])


def run_unitsface(o: UnitsfaceOptions, x, labels, centres, bank, bias, *, bank_valid, index,
                  sparse_grad: bool, backend: str, reduction: str = "mean", margin_rows=None):
    """The unitsface family of checked inputs on a resolved backend: the margin softmax over
    the classes (of ``index``), plus λ·USS on their bank rows when ``bank`` is given;
    ``margin_rows`` [4, B], the margin family's per-row inputs when ``o`` reads them."""
    if backend == "reference" and not o.margin_family:
        if bank is None:
            rows = reference.margin_softmax_rows(x, centres, labels, index=index,
                                                 sparse_grad=sparse_grad,
                                                 **o.keywords(uss=False))
        else:
            rows = reference.unitsface_loss(x, labels, centres, bank, bias,
                                            bank_valid=bank_valid, index=index,
                                            reduction="none", sparse_grad=sparse_grad,
                                            **o.keywords())
    else:
        rows = margin_calls.op_rows(o, x, labels, centres, bank, bias, bank_valid=bank_valid,
                                    index=index, sparse_grad=sparse_grad, backend=backend,
                                    margin_rows=margin_rows)[0]
    return reference.reduce_rows(rows.to(reference.compute_dtype(x.dtype)), reduction)


def _run_class_loss(o: UnitsfaceOptions, call, x, labels, centres, bank, bias, *, bank_valid,
                    index, sparse_grad: bool, backend: str, reduction: str):
    """The checked call of a public class-centre loss: through the margin family's per-row
    terms and state when it names a margin (`call`, margin_calls.checked_call), else
    :func:`run_unitsface` with the settings `o` alone."""
    if call is not None:
        return margin_calls.run_margin_unitsface(
            margins.margin_options(call.margin, o), call, x, labels, centres, bank, bias,
            bank_valid=bank_valid, index=index, sparse_grad=sparse_grad, backend=backend,
            reduction=reduction)
    return run_unitsface(o, x, labels, centres, bank, bias, bank_valid=bank_valid, index=index,
                         sparse_grad=sparse_grad, backend=backend, reduction=reduction)


def _reference_set(o: UssOptions, x, labels, ref, ref_labels):
    """The fused ops' explicit reference set: the batch itself (in-batch), or ref with its
    labels (l_j = j for a memory bank)."""
    if o.in_batch:
        return x, labels
    if ref_labels is None:
        ref_labels = torch.arange(ref.shape[0], device=x.device)
    return ref, ref_labels


# ----------------------------------------------------------------------------- checks

def _uss_inputs(x, labels, bias, ref, ref_labels, ref_valid):
    """Checked (x, labels, ref, ref_labels, ref_valid, bias, value checks); ref=None stays
    None (in-batch pairs), ref_labels=None stays None (a memory bank)."""
    x = check.embeddings(x)
    labels = check.labels(labels, x.shape[0], x.device)
    values = check.ValueChecks()
    if ref is None:
        if ref_labels is not None or ref_valid is not None:
            raise ValueError("ref_labels and ref_valid need ref: with ref=None the batch is its "
                             "own reference set (in-batch pairs)")
    else:
        ref = check.reference_rows(ref, x, "ref")
        if ref_labels is None:
            values.label_range(labels, ref.shape[0], "labels",
                               "memory-bank mode: bank row c holds class c")
        else:
            ref_labels = check.labels(ref_labels, ref.shape[0], x.device, "ref_labels")
    n = x.shape[0] if ref is None else ref.shape[0]
    if ref_valid is not None:
        ref_valid = check.mask(ref_valid, n, x.device, "ref_valid")
    bias = check.bias(bias, n, x)
    return x, labels, ref, ref_labels, ref_valid, bias, values


def _class_inputs(x, centres, labels, index, k: int = 1):
    """Checked (x, centres, labels, index, value checks) for the class-centre losses, with
    K = k rows of centres per class."""
    x = check.embeddings(x)
    centres = check.reference_rows(centres, x, "centres")
    num_classes = margin_calls.check_sub_centres(centres, k)
    labels = check.labels(labels, x.shape[0], x.device)
    values = check.ValueChecks()
    values.label_range(labels, num_classes, "labels", "class ids of the centres")
    if index is not None:
        index = check.index_tensor(index, x.device)
        values.index(index, num_classes, labels)
    return x, centres, labels, index, values


# ----------------------------------------------------------------------------- public

def fused_uss_loss(x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0,
                   margin=0.1, form="pairs", official_clamp=False, reduction="mean",
                   backend="auto", shard=None, eps=EPS):
    """The unified-threshold sample-to-sample loss (docs/design.md §1.1) without a B×N matrix.

    pairs: L_i = Σ_{P_i} softplus(b − s(cos_ij − m)) + Σ_{N_i} softplus(s·cos_ij − b)
    lse:   L_i = softplus(lse_{P_i}(b − s(cos_ij − m))) + softplus(lse_{N_i}(s·cos_ij − b))

    Args:
        x: (B, D) embeddings. labels: (B,) integer labels.
        bias: the unified threshold b (a number or a one-element tensor, learnable), or one
            b_j per reference row (N values). The implied cosine threshold is t = b / s.
        ref: (N, D) reference rows; None → in-batch pairs (j ≠ i), gradient into both sides.
            A memory bank is a buffer (no gradient); class centres W carry a gradient.
        ref_labels: (N,) labels of ref; None → l_j = j (a memory bank, one row per class).
        ref_valid: (N,) bool, False for bank slots never written; None → all valid. A row
            marked invalid takes no part, whatever it holds.
        scale: s > 0. margin: m in [−1, 1], the positive margin. form: "pairs" (official)
            or "lse".
        official_clamp: clamp each softplus argument to [−s, s] as the official code does.
        eps: the normalisation eps, x̂ = x / max(‖x‖, eps), in (0, 1] (the official 1e-5;
            F.normalize's default is 1e-12).
        reduction: "mean" over rows, "sum", or "none" (per-row losses).
        backend: "auto", "triton", "native" or "reference".
        shard: a :class:`~unitsface_kernels.distributed.ClassShard` for class-parallel
            training (memory-bank mode only): ``ref`` and ``ref_valid`` (and a per-class bias)
            are then this rank's rows [start, stop), ``ref_labels`` must be None, and the
            loss is over the batches of all ranks (see :mod:`unitsface_kernels.distributed`).

    Returns the loss in float32 (float64 for float64 inputs).
    """
    if shard is not None:
        if ref is None or ref_labels is not None:
            raise ValueError("shard= is the class-parallel memory-bank mode: pass the shard's "
                             "bank rows as ref and leave ref_labels=None (in-batch pairs and "
                             "labelled reference sets are not class-sharded)")
        return distributed.uss_loss(x, labels, bias, ref, shard, bank_valid=ref_valid,
                                    scale=scale, margin=margin, form=form,
                                    official_clamp=official_clamp, reduction=reduction,
                                    backend=backend, eps=eps)
    check.choice(reduction, options.REDUCTIONS, "reduction")
    o = options.uss_options(scale=scale, margin=margin, form=form,
                            official_clamp=official_clamp, in_batch=ref is None, eps=eps)
    x, labels, ref, ref_labels, ref_valid, bias, values = _uss_inputs(
        x, labels, bias, ref, ref_labels, ref_valid)
    backend = backends.resolve(backend, x.device, "uss")
    values.run()
    return run_uss(o, x, labels, bias, ref, ref_labels, ref_valid, backend=backend,
                   reduction=reduction)


def uss_bias_init(x, labels, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0,
                  backend="auto", eps=EPS):
    """The official data-dependent initial threshold (docs/design.md §1.1), detached:

        b₀ = mean_i logsumexp_{j ∈ N_i}(s·cos_ij)

    over the rows that have at least one negative (NaN when none has), the cosines normalised
    with ``eps``. The fused backends get it from the lse-form forward pass with b = 0 and
    m = 0, whose negative statistic is exactly logsumexp_{N_i}(s·cos_ij); nothing B×N is
    formed.
    """
    o = options.uss_options(scale=scale, margin=0.0, form="lse", official_clamp=False,
                            in_batch=ref is None, eps=eps)
    x, labels, ref, ref_labels, ref_valid, _, values = _uss_inputs(
        x, labels, 0.0, ref, ref_labels, ref_valid)
    backend = backends.resolve(backend, x.device, "uss")
    values.run()
    return run_threshold_init(o, x, labels, ref, ref_labels, ref_valid, backend=backend)


def fused_margin_softmax_loss(x, centres, labels, *, scale=64.0, margin_arc=0.0, margin_cos=0.4,
                              arcface_grad="exact", easy_margin=False, index=None,
                              sparse_grad=False, reduction="mean", backend="auto", shard=None,
                              eps=EPS, margin=None, margin_state=None, margin_training=True,
                              margin_drawn=None, generator=None, saved_exp_bytes=0):
    """CosFace / ArcFace softmax over normalised class centres (docs/design.md §1.2),
    optionally over a partial-FC index S, without a B×C (or B×|S|) matrix:

        L_i = logsumexp_{c∈S} z_ic − z_{i,y_i},  z_ic = s·cos_ic (c ≠ y_i),
        z_iy = s·(cos(θ_iy + m2) − m3)  (insightface's fallback when θ + m2 > π)

    Args:
        x: (B, D) embeddings. centres: (C, D) class centres W (they take a gradient; they may
            be float32 master weights for half-precision x, read rounded to x's dtype, their
            gradient in float32).
        labels: (B,) classes in [0, C). index: sorted unique classes holding every label
            (see :func:`sample_classes`); rows of W outside it get exactly zero gradient.
        sparse_grad: with an index, W's gradient is a sparse COO tensor of the rows of the
            index (no dense C × D gradient; :class:`~unitsface_kernels.optim.SparseSGD`
            steps it), like ``nn.Embedding(sparse=True)``.
        scale: s > 0. margin_arc: m2 in [0, π) (ArcFace 0.5). margin_cos: m3 in [−1, 1]
            (CosFace 0.4, UniTSFace's).
        arcface_grad: "exact" (f' exact, with insightface's fallback past π; insightface
            before 2022-12) or "straight_through" (arcface_torch today: no fallback, the
            target's gradient taken as if the margin were additive).
        easy_margin: apply the margin only where cos > 0 (insightface's easy_margin).
        eps: the normalisation eps of x and W, x̂ = x / max(‖x‖, eps) (see
            :func:`fused_uss_loss`).
        reduction: "mean", "sum" or "none". backend: "auto", "triton", "native", "reference".
        saved_exp_bytes: a memory budget (bytes, 0: none) for the triton backend's forward to
            keep its B × |S| exponentials (in x's dtype: 102 MB for B = 512, |S| = 100k in
            bf16) when they fit, so that its backward skips recomputing the cosines
            (docs/design.md §2; not with sub-centres, the inter-class filter, CurricularFace
            or AdaFace). The other backends ignore it.
        shard: a :class:`~unitsface_kernels.distributed.ClassShard` for class-parallel
            training: ``centres`` are this rank's rows [start, stop), ``index`` holds LOCAL
            class ids, and the loss is over the batches of all ranks
            (see :mod:`unitsface_kernels.distributed`).

    The margin family (docs/design.md §1.5):
        margin: a :class:`~unitsface_kernels.margins.Margin` (``margins.margin(kind, ...)``:
            arcface with K sub-centres and inter-class filtering, curricular, adaface,
            magface, elastic_arc, elastic_cos); margin_arc, margin_cos, arcface_grad and
            easy_margin must then keep their defaults. With K sub-centres ``centres`` holds
            C·K rows (class c: rows c·K … c·K + K − 1); labels and ``index`` are classes.
        margin_state: a :class:`~unitsface_kernels.margins.MarginState` on x's device,
            required by the kinds with moving statistics (curricular, adaface); its tensors
            are updated in place by a training call, after every check has passed.
        margin_training: whether the call updates the moving statistics (True); False reads
            them frozen (the authors' code updates them in eval mode too).
        margin_drawn: (B,) explicit ElasticFace margins (to reproduce another implementation's
            draws); else they are drawn from N(m, std) with ``generator``.
        MagFace's regulariser λ_g·g(‖x_i‖) is added to each row's loss.

    The loss reported per row is lse − z_iy, exact for every p_iy (insightface's
    DistCrossEntropy reports −log(max(p_iy, 1e-30)), which differs only above 69).
    """
    if shard is not None:
        return distributed.margin_softmax_loss(
            x, centres, labels, shard, scale=scale, margin_arc=margin_arc,
            margin_cos=margin_cos, arcface_grad=arcface_grad, easy_margin=easy_margin,
            index=index, sparse_grad=sparse_grad, reduction=reduction, backend=backend, eps=eps,
            margin=margin, margin_state=margin_state, margin_training=margin_training,
            margin_drawn=margin_drawn, generator=generator, saved_exp_bytes=saved_exp_bytes)
    check.choice(reduction, options.REDUCTIONS, "reduction")
    sparse_grad = check.flag(sparse_grad, "sparse_grad")
    margin_calls.refuse_softmax_settings(margin, margin_arc=margin_arc, margin_cos=margin_cos,
                                         arcface_grad=arcface_grad, easy_margin=easy_margin)
    o = options.softmax_options(scale=scale, margin_arc=margin_arc, margin_cos=margin_cos,
                                arcface_grad=arcface_grad, easy_margin=easy_margin, eps=eps,
                                saved_exp_bytes=saved_exp_bytes)
    x, centres, labels, index, values = _class_inputs(x, centres, labels, index,
                                                      margin_calls.sub_centres_of(margin))
    call = margin_calls.checked_call(margin, margin_state, margin_training, margin_drawn,
                                     generator, x)
    backend = backends.resolve(backend, x.device, "unitsface")
    values.run()
    return _run_class_loss(o, call, x, labels, centres, None, None, bank_valid=None,
                           index=index, sparse_grad=sparse_grad, backend=backend,
                           reduction=reduction)


def fused_unitsface_loss(x, labels, centres, bank, bias, *, bank_valid=None, index=None,
                         scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact",
                         easy_margin=False, uss_margin=0.1, uss_form="pairs", uss_weight=1.0,
                         official_clamp=False, sparse_grad=False, reduction="mean",
                         backend="auto", shard=None, eps=EPS, margin=None, margin_state=None,
                         margin_training=True, margin_drawn=None, generator=None,
                         saved_exp_bytes=0):
    """The UniTSFace objective in one pass over the classes (docs/design.md §1.3):

        L_i = L_softmax,i(x; W[S], m2, m3) + λ·L_uss,i(x; bank[S], b, bank_valid[S])

    The kernel streams tiles of the class index S once, loading the W and bank rows of the
    same classes and sharing the x tile, norms and labels; the backward is one pass too.

    Args:
        x: (B, D). labels: (B,) in [0, C). centres: (C, D) W, with gradient.
        bank: (C, D) memory bank (a buffer, no gradient). centres and bank may be float32 for
            half-precision x, or half for float32 x: they are read rounded to x's dtype.
        bias: the unified threshold b (a learnable scalar) or one b_c per class (C values).
        bank_valid: (C,) bool, slots written so far; None → all valid.
        index: partial-FC classes (sorted, unique, holding every label), shared by both parts.
        margin_arc, margin_cos, arcface_grad, easy_margin: the softmax part, as in
            :func:`fused_margin_softmax_loss`.
        uss_margin: m of USS. uss_form: "pairs" or "lse". uss_weight: λ ≥ 0.
        official_clamp: the official clamp of USS's softplus arguments to [−s, s].
        eps: the normalisation eps of x, W and the bank rows (see :func:`fused_uss_loss`).
        sparse_grad: W's gradient as a sparse COO tensor of the index's rows (see
            :func:`fused_margin_softmax_loss`).
        shard: a :class:`~unitsface_kernels.distributed.ClassShard` for class-parallel
            training: centres, bank, bank_valid (and a per-class bias) are this rank's rows
            [start, stop), ``index`` holds LOCAL class ids, a scalar bias is replicated, and
            the loss is over the batches of all ranks (see :mod:`unitsface_kernels.distributed`).
        margin, margin_state, margin_training, margin_drawn, generator: a margin of the family
            for the softmax part, as in :func:`fused_margin_softmax_loss`; with K sub-centres
            centres holds C·K rows while bank, bank_valid and a per-class bias keep C.
        saved_exp_bytes: the memory budget of the softmax part's stored exponentials, as in
            :func:`fused_margin_softmax_loss`.
    """
    if shard is not None:
        return distributed.unitsface_loss(
            x, labels, centres, bank, bias, shard, bank_valid=bank_valid, index=index,
            scale=scale, margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
            easy_margin=easy_margin, uss_margin=uss_margin, uss_form=uss_form,
            uss_weight=uss_weight, official_clamp=official_clamp, sparse_grad=sparse_grad,
            reduction=reduction, backend=backend, eps=eps, margin=margin,
            margin_state=margin_state, margin_training=margin_training,
            margin_drawn=margin_drawn, generator=generator, saved_exp_bytes=saved_exp_bytes)
    check.choice(reduction, options.REDUCTIONS, "reduction")
    sparse_grad = check.flag(sparse_grad, "sparse_grad")
    margin_calls.refuse_softmax_settings(margin, margin_arc=margin_arc, margin_cos=margin_cos,
                                         arcface_grad=arcface_grad, easy_margin=easy_margin)
    o = options.unitsface_options(
        scale=scale, margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
        easy_margin=easy_margin, uss_margin=uss_margin, uss_form=uss_form,
        uss_weight=uss_weight, official_clamp=official_clamp, eps=eps,
        saved_exp_bytes=saved_exp_bytes)
    k = margin_calls.sub_centres_of(margin)
    x, centres, labels, index, values = _class_inputs(x, centres, labels, index, k)
    bank = check.reference_rows(bank, x, "bank")
    if bank.shape[0] * k != centres.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but centres has {centres.shape[0]} "
                         f"(sub_centers={k} per class): one bank row per class")
    if bank_valid is not None:
        bank_valid = check.mask(bank_valid, bank.shape[0], x.device, "bank_valid")
    bias = check.bias(bias, bank.shape[0], x, per="class")
    call = margin_calls.checked_call(margin, margin_state, margin_training, margin_drawn,
                                     generator, x)
    backend = backends.resolve(backend, x.device, "unitsface")
    values.run()
    return _run_class_loss(o, call, x, labels, centres, bank, bias, bank_valid=bank_valid,
                           index=index, sparse_grad=sparse_grad, backend=backend,
                           reduction=reduction)
