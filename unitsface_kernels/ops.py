"""Public loss functions: argument checks, backend choice and the call into a backend.

The maths is DESIGN.md §1; :mod:`unitsface_kernels.reference` states it in eager PyTorch and
:mod:`unitsface_kernels.library` wires the fused kernels into autograd.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from . import native, reference
from . import validation as check
from .library import forward_op

BACKENDS = ("auto", "triton", "native", "reference")
FORMS = ("pairs", "lse")
REDUCTIONS = ("mean", "sum", "none")


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """backend="auto": CUDA tensors → triton (else native); CPU tensors → native (else the
    eager reference). An explicit backend that cannot run here raises and says why."""
    check.choice(backend, BACKENDS, "backend")
    if backend == "auto":
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        return "native" if native.has_op(op) else "reference"
    if backend == "triton" and not _triton_usable(device):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors and an installed triton (on the CPU only "
            f"under TRITON_INTERPRET=1, for tests); got tensors on {device}")
    if backend == "native":
        native.require()
        if not native.has_op(op):
            raise RuntimeError(f"the native backend of this build has no {op} op; use "
                               "backend='triton' (CUDA) or backend='reference'")
    return backend


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """The loss comes back in float32 (float64 for float64 inputs, so gradcheck is exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _uss_inputs(x, labels, bias, ref, ref_labels, ref_valid):
    """Checked (x, labels, ref, ref_labels, ref_valid, bias, in_batch) for the USS loss."""
    x = check.embeddings(x)
    labels = check.labels(labels, x.shape[0], x.device)
    if ref is None:
        if ref_labels is not None or ref_valid is not None:
            raise ValueError("ref_labels and ref_valid need ref: with ref=None the batch is its "
                             "own reference set (in-batch pairs)")
        ref, ref_labels, in_batch = x, labels, True
    else:
        ref = check.reference_rows(ref, x, "ref")
        in_batch = False
        if ref_labels is None:
            check.label_range(labels, ref.shape[0], "labels",
                              "memory-bank mode: bank row c holds class c")
            ref_labels = torch.arange(ref.shape[0], device=x.device)
        else:
            ref_labels = check.labels(ref_labels, ref.shape[0], x.device, "ref_labels")
    if ref_valid is not None:
        ref_valid = check.mask(ref_valid, ref.shape[0], x.device, "ref_valid")
    bias = check.bias(bias, ref.shape[0], x)
    return x, labels, ref, ref_labels, ref_valid, bias, in_batch


def fused_uss_loss(x, labels, bias, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0,
                   margin=0.1, form="pairs", official_clamp=False, reduction="mean",
                   backend="auto", shard=None):
    """The unified-threshold sample-to-sample loss (DESIGN.md §1.1) without a B×N matrix.

    pairs: L_i = Σ_{P_i} softplus(b − s(cos_ij − m)) + Σ_{N_i} softplus(s·cos_ij − b)
    lse:   L_i = softplus(lse_{P_i}(b − s(cos_ij − m))) + softplus(lse_{N_i}(s·cos_ij − b))

    Args:
        x: (B, D) embeddings. labels: (B,) integer labels.
        bias: the unified threshold b (a number or a one-element tensor, learnable), or one
            b_j per reference row (N values). The implied cosine threshold is t = b / s.
        ref: (N, D) reference rows; None → in-batch pairs (j ≠ i), gradient into both sides.
            A memory bank is a buffer (no gradient); class centres W carry a gradient.
        ref_labels: (N,) labels of ref; None → l_j = j (a memory bank, one row per class).
        ref_valid: (N,) bool, False for bank slots never written; None → all valid.
        scale: s. margin: m, the positive margin. form: "pairs" (official) or "lse".
        official_clamp: clamp each softplus argument to [−s, s] as the official code does.
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
        from . import distributed

        return distributed.uss_loss(x, labels, bias, ref, shard, bank_valid=ref_valid,
                                    scale=scale, margin=margin, form=form,
                                    official_clamp=official_clamp, reduction=reduction,
                                    backend=backend)
    check.choice(form, FORMS, "form")
    check.choice(reduction, REDUCTIONS, "reduction")
    scale = check.positive_number(scale, "scale")
    margin = check.real_number(margin, "margin")
    x, labels, ref, ref_labels, ref_valid, bias, in_batch = _uss_inputs(
        x, labels, bias, ref, ref_labels, ref_valid)
    backend = resolve_backend(backend, x.device, "uss")
    if backend == "reference":
        rows = reference.uss_rows(x, labels, bias, None if in_batch else ref,
                                  None if in_batch else ref_labels, ref_valid, scale=scale,
                                  margin=margin, form=form, official_clamp=official_clamp)
    else:
        rows = forward_op("uss", backend)(x, ref, labels, ref_labels, ref_valid, bias, scale,
                                          margin, form == "lse", bool(official_clamp),
                                          in_batch)[0]
    return reference.reduce_rows(rows.to(_loss_dtype(x)), reduction)


@torch.no_grad()
def uss_bias_init(x, labels, ref=None, ref_labels=None, ref_valid=None, *, scale=64.0,
                  backend="auto"):
    """The official data-dependent initial threshold (DESIGN.md §1.1), detached:

        b₀ = mean_i logsumexp_{j ∈ N_i}(s·cos_ij)

    over the rows that have at least one negative (NaN when none has). The fused backends
    get it from the lse-form forward pass with b = 0, whose negative statistic is exactly
    logsumexp_{N_i}(s·cos_ij); nothing B×N is formed.
    """
    scale = check.positive_number(scale, "scale")
    x, labels, ref, ref_labels, ref_valid, _, in_batch = _uss_inputs(
        x, labels, 0.0, ref, ref_labels, ref_valid)
    backend = resolve_backend(backend, x.device, "uss")
    if backend == "reference":
        return reference.uss_bias_init(x, labels, None if in_batch else ref,
                                       None if in_batch else ref_labels, ref_valid, scale=scale)
    zero = torch.zeros((), dtype=_loss_dtype(x), device=x.device)
    stats = forward_op("uss", backend)(x, ref, labels, ref_labels, ref_valid, zero, scale, 0.0,
                                       True, False, in_batch)[1]
    neg = stats[2]
    has = neg > -float("inf")
    return neg[has].mean() if bool(has.any()) else neg.new_tensor(float("nan"))


def _margins(scale, margin_arc, margin_cos):
    scale = check.positive_number(scale, "scale")
    margin_arc = check.real_number(margin_arc, "margin_arc")
    if not 0.0 <= margin_arc < math.pi:
        raise ValueError(f"margin_arc must lie in [0, π), got {margin_arc}")
    return scale, margin_arc, check.real_number(margin_cos, "margin_cos")


def _class_inputs(x, centres, labels, index):
    """Checked (x, centres, labels, index) for the class-centre losses."""
    x = check.embeddings(x)
    centres = check.reference_rows(centres, x, "centres")
    labels = check.labels(labels, x.shape[0], x.device)
    check.label_range(labels, centres.shape[0], "labels", "class ids of the centres")
    if index is not None:
        index = check.class_index(index, centres.shape[0], labels, x.device)
    return x, centres, labels, index


def fused_margin_softmax_loss(x, centres, labels, *, scale=64.0, margin_arc=0.0, margin_cos=0.4,
                              index=None, reduction="mean", backend="auto", shard=None):
    """CosFace / ArcFace softmax over normalised class centres (DESIGN.md §1.2), optionally
    over a partial-FC index S, without a B×C (or B×|S|) matrix:

        L_i = logsumexp_{c∈S} z_ic − z_{i,y_i},  z_ic = s·cos_ic (c ≠ y_i),
        z_iy = s·(cos(θ_iy + m2) − m3)  (insightface's fallback when θ + m2 > π)

    Args:
        x: (B, D) embeddings. centres: (C, D) class centres W (they take a gradient).
        labels: (B,) classes in [0, C). index: sorted unique int64 classes holding every
            label (see :func:`sample_classes`); rows of W outside it get exactly zero gradient.
        scale: s. margin_arc: m2 (ArcFace 0.5). margin_cos: m3 (CosFace 0.4, UniTSFace's).
        reduction: "mean", "sum" or "none". backend: "auto", "triton", "native", "reference".
        shard: a :class:`~unitsface_kernels.distributed.ClassShard` for class-parallel
            training: ``centres`` are this rank's rows [start, stop), ``index`` holds LOCAL
            class ids, and the loss is over the batches of all ranks
            (see :mod:`unitsface_kernels.distributed`).
    """
    if shard is not None:
        from . import distributed

        return distributed.margin_softmax_loss(
            x, centres, labels, shard, scale=scale, margin_arc=margin_arc,
            margin_cos=margin_cos, index=index, reduction=reduction, backend=backend)
    check.choice(reduction, REDUCTIONS, "reduction")
    scale, margin_arc, margin_cos = _margins(scale, margin_arc, margin_cos)
    x, centres, labels, index = _class_inputs(x, centres, labels, index)
    backend = resolve_backend(backend, x.device, "unitsface")
    if backend == "reference":
        rows = reference.margin_softmax_rows(x, centres, labels, scale=scale,
                                             margin_arc=margin_arc, margin_cos=margin_cos,
                                             index=index)
    else:
        rows = forward_op("unitsface", backend)(
            x, centres, None, labels, index, None, None, scale, margin_arc, margin_cos, 0.0, 0.0,
            False)[0]
    return reference.reduce_rows(rows.to(_loss_dtype(x)), reduction)


def fused_unitsface_loss(x, labels, centres, bank, bias, *, bank_valid=None, index=None,
                         scale=64.0, margin_arc=0.0, margin_cos=0.4, uss_margin=0.1,
                         uss_form="pairs", uss_weight=1.0, reduction="mean", backend="auto",
                         shard=None):
    """The UniTSFace objective in one pass over the classes (DESIGN.md §1.3):

        L_i = L_softmax,i(x; W[S], m2, m3) + λ·L_uss,i(x; bank[S], b, bank_valid[S])

    The kernel streams tiles of the class index S once, loading the W and bank rows of the
    same classes and sharing the x tile, norms and labels; the backward is one pass too.

    Args:
        x: (B, D). labels: (B,) in [0, C). centres: (C, D) W, with gradient.
        bank: (C, D) memory bank (a buffer, no gradient), same dtype as x.
        bias: the unified threshold b (a learnable scalar) or one b_c per class (C values).
        bank_valid: (C,) bool, slots written so far; None → all valid.
        index: partial-FC classes (sorted, unique, holding every label), shared by both parts.
        uss_margin: m of USS. uss_form: "pairs" or "lse". uss_weight: λ.
        shard: a :class:`~unitsface_kernels.distributed.ClassShard` for class-parallel
            training: centres, bank, bank_valid (and a per-class bias) are this rank's rows
            [start, stop), ``index`` holds LOCAL class ids, a scalar bias is replicated, and
            the loss is over the batches of all ranks (see :mod:`unitsface_kernels.distributed`).
    """
    if shard is not None:
        from . import distributed

        return distributed.unitsface_loss(
            x, labels, centres, bank, bias, shard, bank_valid=bank_valid, index=index,
            scale=scale, margin_arc=margin_arc, margin_cos=margin_cos, uss_margin=uss_margin,
            uss_form=uss_form, uss_weight=uss_weight, reduction=reduction, backend=backend)
    check.choice(reduction, REDUCTIONS, "reduction")
    check.choice(uss_form, FORMS, "uss_form")
    scale, margin_arc, margin_cos = _margins(scale, margin_arc, margin_cos)
    uss_margin = check.real_number(uss_margin, "uss_margin")
    uss_weight = check.real_number(uss_weight, "uss_weight")
    x, centres, labels, index = _class_inputs(x, centres, labels, index)
    bank = check.reference_rows(bank, x, "bank")
    if bank.shape[0] != centres.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but centres has {centres.shape[0]}: "
                         "one bank row per class")
    if bank_valid is not None:
        bank_valid = check.mask(bank_valid, bank.shape[0], x.device, "bank_valid")
    bias = check.bias(bias, bank.shape[0], x)
    backend = resolve_backend(backend, x.device, "unitsface")
    if backend == "reference":
        rows = reference.unitsface_loss(
            x, labels, centres, bank, bias, bank_valid=bank_valid, index=index, scale=scale,
            margin_arc=margin_arc, margin_cos=margin_cos, uss_margin=uss_margin,
            uss_form=uss_form, uss_weight=uss_weight, reduction="none")
    else:
        rows = forward_op("unitsface", backend)(
            x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc, margin_cos,
            uss_margin, uss_weight, uss_form == "lse")[0]
    return reference.reduce_rows(rows.to(_loss_dtype(x)), reduction)


def sample_classes(labels, num_classes, num_sample, generator=None):
    """Partial-FC class sampling (An et al., CVPR 2022): every class present in `labels` plus
    uniformly random others, `num_sample` classes in all (all positives when they alone
    exceed it, all classes when num_sample ≥ num_classes), as a sorted int64 index on the
    labels' device. Reproducible under `generator` (on any device)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in check.INT_DTYPES:
        raise TypeError("labels must be an integer tensor")
    num_classes = int(check.positive_number(num_classes, "num_classes"))
    num_sample = int(check.positive_number(num_sample, "num_sample"))
    labels = labels.reshape(-1).to(torch.int64)
    check.label_range(labels, num_classes, "labels", "class ids")
    positives = torch.unique(labels)
    k = min(num_classes, max(num_sample, positives.numel()))
    # random scores in [0, 1) for all classes; positives get 2 so that top-k keeps them all
    device = generator.device if generator is not None else labels.device
    scores = torch.rand(num_classes, generator=generator, device=device).to(labels.device)
    scores[positives] = 2.0
    return torch.topk(scores, k, sorted=False).indices.sort().values


def bank_update_(bank, bank_valid, x, labels):
    """In place: bank[y_i] ← x̂_i (normalised, eps 1e-5, stored in the bank's dtype) and
    bank_valid[y_i] ← True; when a label repeats, its last row wins. Uses the compiled op
    when the extension is built, else the eager reference (same result)."""
    if native.has_op("bank_update"):
        native.bank_update_(bank, bank_valid, x, labels)
    else:
        native.check_bank_update_args(bank, bank_valid, x, labels)
        check.label_range(labels, bank.shape[0], "labels", "bank rows")
        reference.bank_update_(bank, bank_valid, x.detach(), labels)
    return bank
