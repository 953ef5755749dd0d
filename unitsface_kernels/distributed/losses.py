"""The class-parallel losses: every rank runs a backend's forward op on its class shard, the
per-row statistics are combined across ranks (:mod:`.statistics`), and the backward op runs
with the global statistics (see the package docstring).

As in :mod:`unitsface_kernels.ops`, each public function checks its arguments (agreed on by
every rank), builds its settings object and resolves its backend once, then calls an
internal entry (:func:`run_shard_uss`, :func:`run_shard_unitsface`,
:func:`run_shard_threshold_init`) that the modules call directly with their settings object
and their gathered, checked batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import backends, contract, margin_calls, margins, options, reference
from .. import bank as memory_bank
from .. import validation as check
from ..layouts import UssStat
from ..options import EPS
from . import statistics
from .collectives import checked_on_all, gather
from .shard import ClassShard, require


@dataclass
class _Spec:
    family: str          # "unitsface" (margin softmax [+ USS on the bank]) or "uss" (bank)
    backend: str
    options: Any         # UnitsfaceOptions | UssOptions
    shard: ClassShard
    has_bank: bool = False
    replicated_bias: bool = True
    sparse_grad: bool = False  # W's gradient as a sparse tensor of the index's rows


class _ShardRows(torch.autograd.Function):
    """Global per-row losses of the gathered batch from this rank's class shard, and the
    global statistics (no gradient).

    Inputs that take a gradient: x (gathered), the reference rows with a gradient (centres;
    None for the bank-only USS), the threshold b. The other tensors ride along in `rest`
    (``margin_rows``: the margin family's per-row inputs of the gathered batch, or None).
    Always the plain forward (no per-row gradients: they would use the local statistics)."""

    @staticmethod
    def forward(ctx, x, centres, bias, spec, rest):
        labels, index, bank, bank_valid, ref_labels, margin_rows = rest
        fwd = contract.forward_op(spec.family, spec.backend)
        packed = spec.options.pack()
        group = spec.shard.group
        if spec.family == "unitsface":
            rows, stats, *saved = fwd(x, centres, bank, labels, index, bank_valid, bias,
                                      margin_rows, packed, False, spec.sparse_grad)
            total, stats = statistics.combine_unitsface(rows, stats, spec.options,
                                                        spec.has_bank, group)
        else:
            rows, stats, *saved = fwd(x, bank, labels, ref_labels, bank_valid, bias, packed)
            total, stats = statistics.combine_uss(rows, stats, spec.options, group)
        ctx.spec = spec
        ctx.save_for_backward(x, centres, bias, labels, index, bank, bank_valid, ref_labels,
                              margin_rows, stats, *saved)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_rows, _):
        spec = ctx.spec
        x, centres, bias, labels, index, bank, bank_valid, ref_labels, margin_rows, stats, \
            *saved = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        bwd = contract.backward_op(spec.family, spec.backend)
        packed = spec.options.pack()
        grad_rows = grad_rows.contiguous()
        if spec.family == "unitsface":
            dx, dw, db = bwd(grad_rows, x, centres, bank, labels, index, bank_valid, bias,
                             margin_rows, stats, *saved, packed, [need_dx, need_dw, need_db])
            if need_dw:  # the backward gives the rows of the index (K per class)
                dw = contract.expand_rows(dw, index, centres.shape, spec.sparse_grad,
                                          spec.options.k)
        else:
            dx, _, db = bwd(grad_rows, x, bank, labels, ref_labels, bank_valid, bias, stats,
                            *saved, packed, [need_dx, False, need_db])
            dw = None
        if need_db and spec.replicated_bias:
            db = db.contiguous().clone()
            dist.all_reduce(db, group=spec.shard.group)  # every rank: the full ∂L/∂b
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                None, None)


# ----------------------------------------------------------------------------- the batch

def _batch(x, labels, shard, gathered, validate, index):
    """(x_global, labels_global, local labels, validate(x), local index) with every check
    agreed on by all ranks: the shard's tensors are checked before the gather (their errors
    travel with the shapes), the partial-FC index after it (it must hold the local labels of
    the global batch). With gathered=True the batch came from :func:`gather_batch`."""
    shard = require(shard)
    if gathered:
        x = check.embeddings(x)
        labels = check.labels(labels, x.shape[0], x.device)
        local = shard.local_labels(labels)
        checked, idx = checked_on_all(shard, x.device, lambda: (
            validate(x), _local_index(index, local, shard, x.device)))
        return x, labels, local, checked, idx
    x, labels, checked, any_index = gather(x, labels, shard, validate, index is not None)
    local = shard.local_labels(labels)
    idx = None
    if any_index:  # every rank checks, or none: the check is a collective
        idx = checked_on_all(shard, x.device, lambda: _local_index(index, local, shard, x.device))
    return x, labels, local, checked, idx


def _local_rows(t, name, x, shard, k: int = 1):
    """The shard's rows of `t`: K = k per class (centres with sub-centres: rows
    [start·K, stop·K) of the global W)."""
    t = check.reference_rows(t, x, name)
    if t.shape[0] != shard.num_local * k:
        per = f" × sub_centers={k}" if k > 1 else ""
        raise ValueError(f"{name} has {t.shape[0]} rows but this rank's shard holds "
                         f"{shard.num_local} classes [{shard.start}, {shard.stop}){per}: pass "
                         "the shard's rows only")
    return t


def _local_index(index, local, shard, device):
    """A partial-FC index of LOCAL class ids (sorted, unique) holding every local label."""
    if index is None:
        return None
    index = check.index_tensor(index, device)
    checks = check.ValueChecks()
    checks.index(index, shard.num_local, local[local >= 0], labels_name="local labels")
    checks.run()
    return index


def _local_bank(bank, bank_valid, x, shard):
    bk = _local_rows(bank, "bank", x, shard)
    valid = (check.mask(bank_valid, shard.num_local, x.device, "bank_valid")
             if bank_valid is not None else None)
    return bk, valid


def _rows(spec, x, centres, bias, labels, index, bank, bank_valid, ref_labels, reduction):
    rows = _ShardRows.apply(x, centres, bias, spec,
                            (labels, index, bank, bank_valid, ref_labels, None))[0]
    return reference.reduce_rows(rows.to(reference.compute_dtype(x.dtype)), reduction)


def _margin_rows(spec, call, x, centres, bias, local, index, bank, bank_valid, reduction):
    """The unitsface family with a margin of the family on this rank's shard (the steps of
    :mod:`unitsface_kernels.margin_calls`, over the gathered batch): the target cosines from
    the rank that owns each label (the others give 0; summed over the ranks), the per-row
    inputs and moving statistics from the gathered batch — the same on every rank
    (ElasticFace's draws too, from one generator seeded alike on every rank, or
    ``margin_drawn`` of the global batch) — then the shard's op with the global statistics.
    MagFace's terms are formed on every rank alike: their gradient is shared by the ranks."""
    o = spec.options
    with margin_calls.no_autocast(x.device):
        c_target = margins.target_cosines(o, x, centres, local)
        dist.all_reduce(c_target, group=spec.shard.group)
        rows, margin_rows = margin_calls.per_row_inputs(o, call, x, c_target)
        total, stats = _ShardRows.apply(x, centres, bias, spec, (local, index, bank, bank_valid,
                                                                 None, margin_rows))
        total = margin_calls.finish_rows(o, total.to(reference.compute_dtype(x.dtype)), stats,
                                         c_target, rows, share=spec.shard.world_size)
    margin_calls.commit_state(call, rows.state)
    return reference.reduce_rows(total, reduction)


# ----------------------------------------------------------------------------- internal entries

def run_shard_unitsface(o, x, labels, centres, bank, bias, shard, *, bank_valid, index,
                        sparse_grad: bool, backend: str, reduction: str = "mean", margin=None):
    """The unitsface family on this rank's shard from checked inputs: the gathered batch
    (global class ids), the shard's rows, ``index`` of LOCAL class ids holding every local
    label; a scalar ``bias`` is the replicated unified threshold. ``margin``: a checked
    :class:`~unitsface_kernels.margin_calls.MarginCall` for the gathered batch, whose fields
    ``o`` already carries."""
    spec = _Spec("unitsface", backend, o, shard, has_bank=bank is not None,
                 replicated_bias=bias is None or bias.numel() == 1, sparse_grad=sparse_grad)
    if margin is not None:
        return _margin_rows(spec, margin, x, centres, bias, shard.local_labels(labels), index,
                            bank, bank_valid, reduction)
    return _rows(spec, x, centres, bias, shard.local_labels(labels), index, bank, bank_valid,
                 None, reduction)


def run_shard_uss(o, x, labels, bias, bank, shard, *, bank_valid, backend: str,
                  reduction: str = "mean"):
    """USS against this rank's bank rows from checked inputs (the gathered batch)."""
    spec = _Spec("uss", backend, o, shard, has_bank=True, replicated_bias=bias.numel() == 1)
    ref_labels = torch.arange(shard.num_local, device=x.device)
    return _rows(spec, x, None, bias, shard.local_labels(labels), None, bank, bank_valid,
                 ref_labels, reduction)


@torch.no_grad()
def run_shard_threshold_init(o, x, labels, bank, shard, *, bank_valid, index, backend: str):
    """b₀ over all ranks' valid bank rows (of the LOCAL classes ``index`` when given) from
    checked inputs (the gathered batch), with the scale and eps of the loss settings ``o``."""
    classes = torch.arange(shard.num_local, device=x.device) if index is None else index
    valid = bank_valid[classes] if bank_valid is not None else None
    zero = torch.zeros((), dtype=reference.compute_dtype(x.dtype), device=x.device)
    stats = contract.forward_op("uss", backend)(
        x.detach(), bank[classes].contiguous(), shard.local_labels(labels), classes.contiguous(),
        valid, zero, o.threshold_init().pack())[1]
    (neg,), _ = statistics.all_reduce_stats([stats[UssStat.B]], [], shard.group)
    return reference.mean_of_finite(neg)


# ----------------------------------------------------------------------------- the losses

def margin_softmax_loss(x, centres, labels, shard, *, scale=64.0, margin_arc=0.0,
                        margin_cos=0.4, arcface_grad="exact", easy_margin=False, index=None,
                        sparse_grad=False, reduction="mean", backend="auto", gathered=False,
                        eps=EPS, margin=None, margin_state=None, margin_training=True,
                        margin_drawn=None, generator=None, saved_exp_bytes=0):
    """Class-parallel CosFace/ArcFace softmax (partial FC): ``centres`` are this rank's rows
    [start, stop); ``index`` (optional) is a sorted index of LOCAL class ids that holds every
    class of the global batch falling in the shard (:meth:`ClassShard.sample`).

    ``x``/``labels`` are this rank's batch (global class ids), or the gathered global batch
    with ``gathered=True``. Returns the global mean ("mean"), sum ("sum") or the global
    per-row losses ("none", all ranks' rows in rank order), identical on every rank. The
    settings are those of :func:`~unitsface_kernels.fused_margin_softmax_loss`; with a margin
    of the family (``margin`` …) see :func:`_margin_rows`: ``margin_drawn`` holds the margins
    of the global batch, ``generator`` must be seeded alike on every rank, ``margin_state``
    ends identical on every rank, and with K sub-centres ``centres`` are the shard's rows
    [start·K, stop·K)."""
    def validate(x):
        check.choice(reduction, options.REDUCTIONS, "reduction")
        check.flag(sparse_grad, "sparse_grad")
        o = _margin_settings(margin, options.softmax_options(
            scale=scale, margin_arc=margin_arc, margin_cos=margin_cos,
            arcface_grad=arcface_grad, easy_margin=easy_margin, eps=eps,
            saved_exp_bytes=saved_exp_bytes),
            margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
            easy_margin=easy_margin)
        return o, _local_rows(centres, "centres", x, shard, o.k)

    x, labels, _, (o, w), idx = _batch(x, labels, shard, gathered, validate, index)
    call = _margin_call(shard, x, margin, margin_state, margin_training, margin_drawn,
                        generator)
    return run_shard_unitsface(o, x, labels, w, None, None, shard, bank_valid=None, index=idx,
                               sparse_grad=bool(sparse_grad),
                               backend=backends.resolve(backend, x.device, "unitsface"),
                               reduction=reduction, margin=call)


def _margin_settings(margin, o, **given):
    """The settings `o` with the fields of a margin of the family (`given`: the CosFace/ArcFace
    keywords, which must then keep their defaults)."""
    margin_calls.refuse_softmax_settings(margin, **given)
    return o if margin is None else margins.margin_options(margins.checked(margin), o)


def _margin_call(shard, x, margin, state, training, drawn, generator):
    """The checked margin arguments for the gathered batch x, agreed on by every rank."""
    return checked_on_all(shard, x.device, lambda: margin_calls.checked_call(
        margin, state, training, drawn, generator, x))


def unitsface_loss(x, labels, centres, bank, bias, shard, *, bank_valid=None, index=None,
                   scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact",
                   easy_margin=False, uss_margin=0.1, uss_form="pairs", uss_weight=1.0,
                   official_clamp=False, sparse_grad=False, reduction="mean", backend="auto",
                   gathered=False, eps=EPS, margin=None, margin_state=None,
                   margin_training=True, margin_drawn=None, generator=None, saved_exp_bytes=0):
    """Class-parallel UniTSFace objective: ``centres``, ``bank``, ``bank_valid`` (and a
    per-class ``bias``) are this rank's rows; a scalar ``bias`` is the replicated unified
    threshold (it gets the full ∂L/∂b on every rank). ``index``: LOCAL class ids, as in
    :func:`margin_softmax_loss`, as is a margin of the family."""
    def validate(x):
        check.choice(reduction, options.REDUCTIONS, "reduction")
        check.flag(sparse_grad, "sparse_grad")
        o = _margin_settings(margin, options.unitsface_options(
            scale=scale, margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
            easy_margin=easy_margin, uss_margin=uss_margin, uss_form=uss_form,
            uss_weight=uss_weight, official_clamp=official_clamp, eps=eps,
            saved_exp_bytes=saved_exp_bytes),
            margin_arc=margin_arc, margin_cos=margin_cos, arcface_grad=arcface_grad,
            easy_margin=easy_margin)
        w = _local_rows(centres, "centres", x, shard, o.k)
        return (o, w) + _local_bank(bank, bank_valid, x, shard) + (
            check.bias(bias, shard.num_local, x, per="class of the shard"),)

    x, labels, _, (o, w, bk, valid, b), idx = _batch(x, labels, shard, gathered, validate,
                                                     index)
    call = _margin_call(shard, x, margin, margin_state, margin_training, margin_drawn,
                        generator)
    return run_shard_unitsface(o, x, labels, w, bk, b, shard, bank_valid=valid, index=idx,
                               sparse_grad=bool(sparse_grad),
                               backend=backends.resolve(backend, x.device, "unitsface"),
                               reduction=reduction, margin=call)


def uss_loss(x, labels, bias, bank, shard, *, bank_valid=None, scale=64.0, margin=0.1,
             form="pairs", official_clamp=False, reduction="mean", backend="auto",
             gathered=False, eps=EPS):
    """Class-parallel USS in memory-bank mode: ``bank`` (and ``bank_valid``, a per-class
    ``bias``) are this rank's rows [start, stop); bank row c of the shard holds class
    start + c. A scalar ``bias`` is the replicated unified threshold."""
    def validate(x):
        check.choice(reduction, options.REDUCTIONS, "reduction")
        o = options.uss_options(scale=scale, margin=margin, form=form,
                                official_clamp=official_clamp, eps=eps)
        return (o,) + _local_bank(bank, bank_valid, x, shard) + (
            check.bias(bias, shard.num_local, x, per="class of the shard"),)

    x, labels, _, (o, bk, valid, b), _ = _batch(x, labels, shard, gathered, validate, None)
    return run_shard_uss(o, x, labels, b, bk, shard, bank_valid=valid,
                         backend=backends.resolve(backend, x.device, "uss"),
                         reduction=reduction)


def shard_uss_bias_init(x, labels, bank, shard, *, bank_valid=None, index=None, scale=64.0,
                        backend="auto", gathered=False, eps=EPS):
    """The official initial threshold over the sharded bank, the same on every rank:
    b₀ = mean_i logsumexp_{j∈N_i}(s·cos_ij) over all ranks' valid bank rows (of the sampled
    LOCAL classes ``index`` when given), averaged over the rows that have a negative
    (NaN when none has)."""
    def validate(x):
        return (options.uss_options(scale=scale, margin=0.0, form="lse", official_clamp=False,
                                    eps=eps),
                _local_rows(bank, "bank", x, shard))

    x, labels, _, (o, bk), index = _batch(x.detach(), labels, shard, gathered, validate, index)
    return run_shard_threshold_init(o, x, labels, bk, shard, bank_valid=bank_valid,
                                    index=index, backend=backends.resolve(backend, x.device,
                                                                          "uss"))


@torch.no_grad()
def shard_bank_update_(bank, bank_valid, x, labels, shard):
    """This rank's part of the memory-bank update from the GATHERED batch (x, labels in
    global ids): bank[y − start] ← x's bank row for the rows whose class is in the shard (the
    last occurrence of a label wins). No communication, no check (the module checked the
    batch)."""
    local = shard.local_labels(labels)
    mine = local >= 0
    if bool(mine.any()):
        memory_bank.write_rows_(bank, bank_valid, x[mine], local[mine])
    return bank
