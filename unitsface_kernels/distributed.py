"""Class-parallel training over torch.distributed (DESIGN.md §2): insightface's PartialFC_V2 +
DistCrossEntropy structure, without their B_global × C_local logit matrix.

Rank r of w owns the classes [start, stop) — insightface's split,
num_local = C // w + (r < C % w), start = C // w · r + min(r, C % w) — for the class centres,
the memory bank and a per-class threshold. One training step:

1. The embeddings and labels of all ranks are all-gathered (after an all-gather of their
   shapes, so that mismatched batches fail with a clear error on every rank instead of
   hanging); the gather is autograd-aware.
2. Every rank runs the per-row forward op of a backend (the fused ``triton``/``native`` ops of
   :mod:`unitsface_kernels.library`, or the eager ``reference`` of the same op below) on its
   shard, with local labels (y − start, or −1 for a class of another shard: no target there,
   z_iy = 0). It returns per-row *partial* statistics.
3. The partials are combined with two all-reduces of O(B_global) numbers: MAX, then SUM of
   exp(stat − max) for the log-sum-exps (softmax lse, USS A and B) packed with the plain
   sums (target logit, USS pair sums). Every rank then holds the global per-row losses, and
   the loss is the global mean on every rank.
4. Backward: every rank calls the backward op with the GLOBAL statistics (global lse; for USS
   lse the global A, σ(A), B, σ(B)), which gives exactly ∂L/∂W_shard (and ∂L/∂b_shard for a
   per-class threshold) and this shard's part of ∂L/∂x_global. The x parts are summed over
   ranks (reduce-scatter on NCCL, all-reduce elsewhere) and each rank keeps its rows, scaled
   by w: the gradient reaching a rank's embeddings is w·∂L/∂x_local, insightface's
   convention, so that a DDP-wrapped backbone (which averages) ends with ∂L/∂θ. A replicated
   (scalar) threshold b gets the full ∂L/∂b on every rank (all-reduce), so ranks never drift.

Nothing of size B_global × C_local exists with a fused backend; the ``reference`` backend is the
eager statement of the same per-shard op (it materialises B_global × C_local cosines, like the
single-process reference) and works wherever torch does — CPU training without the compiled
extension, and the tests' second opinion.

Entry points: :class:`ClassShard`; :func:`gather_batch`; :func:`margin_softmax_loss`,
:func:`uss_loss`, :func:`unitsface_loss` (also reached through ``shard=`` of the public
``fused_*`` functions); :func:`uss_bias_init`, :func:`bank_update_` and
:meth:`ClassShard.sample` for the modules' partial FC and memory bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import reference
from . import validation as check

__all__ = ["ClassShard", "split_classes", "gather_batch", "margin_softmax_loss", "uss_loss",
           "unitsface_loss", "uss_bias_init", "bank_update_"]


# ----------------------------------------------------------------------------- the shard

def split_classes(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """insightface's split of C classes over w ranks: (start, stop) of rank r, where
    num_local = C // w + (r < C % w) and start = C // w · r + min(r, C % w)."""
    if num_classes < world_size:
        raise ValueError(f"cannot shard {num_classes} classes over {world_size} ranks: every "
                         "rank needs at least one class")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    base, rem = divmod(num_classes, world_size)
    start = base * rank + min(rank, rem)
    return start, start + base + (rank < rem)


@dataclass(frozen=True)
class ClassShard:
    """This rank's slice [start, stop) of num_classes classes, in process group ``group``
    (None: the default group). The shards of the group's ranks must tile [0, num_classes) in
    rank order (checked at every call); :meth:`from_group` builds insightface's split."""

    start: int
    stop: int
    num_classes: int
    group: Any = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("start", "stop", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ClassShard.{name} must be an int, got {type(v).__name__}")
        if not 0 <= self.start < self.stop <= self.num_classes:
            raise ValueError(f"ClassShard needs 0 ≤ start < stop ≤ num_classes, got "
                             f"[{self.start}, {self.stop}) of {self.num_classes}")

    @classmethod
    def from_group(cls, num_classes: int, group=None) -> "ClassShard":
        """The shard of the calling rank under insightface's split of ``group``."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ClassShard.from_group needs an initialised torch.distributed "
                               "process group (torch.distributed.init_process_group)")
        start, stop = split_classes(int(num_classes), dist.get_world_size(group),
                                    dist.get_rank(group))
        return cls(start, stop, int(num_classes), group)

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def local_labels(self, labels: Tensor) -> Tensor:
        """Global class ids → rows of this shard (y − start), −1 for classes of other shards."""
        inside = (labels >= self.start) & (labels < self.stop)
        return torch.where(inside, labels - self.start, torch.full_like(labels, -1))

    def sample(self, labels: Tensor, num_sample: int, generator=None) -> Tensor:
        """Partial FC on this shard: a sorted int64 index of LOCAL class ids holding every
        class of ``labels`` (the gathered, global batch) that falls in the shard, plus uniformly
        random others, max(num_sample, #positives) in all (capped at num_local)."""
        from .ops import sample_classes

        local = self.local_labels(labels.reshape(-1).to(torch.int64))
        return sample_classes(local[local >= 0], self.num_local, max(1, int(num_sample)),
                              generator)


def _default_shard(shard) -> ClassShard:
    if not isinstance(shard, ClassShard):
        raise TypeError(f"shard must be a unitsface_kernels.distributed.ClassShard, got "
                        f"{type(shard).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard= needs an initialised torch.distributed process group")
    return shard


# ----------------------------------------------------------------------------- gathering

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _agree(shard: ClassShard, x: Tensor, labels: Tensor, error: Optional[BaseException],
           flag: bool = False) -> bool:
    """All-gather (B, D, dtype, start, stop, C, error?, flag) of every rank before any data
    moves, and raise the same kind of error on every rank when they disagree — one rank
    raising alone would leave the others waiting in the next collective. Returns whether any
    rank raised `flag` (so that all ranks take the same collective path afterwards)."""
    meta = torch.tensor([x.shape[0] if x.dim() == 2 else -1, x.shape[-1] if x.dim() else -1,
                         _DTYPE_CODES.get(x.dtype, -1), shard.start, shard.stop,
                         shard.num_classes, labels.numel(), int(error is not None), int(flag)],
                        dtype=torch.int64, device=x.device)
    world = shard.world_size
    parts = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(parts, meta, group=shard.group)
    table = torch.stack(parts).tolist()
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[7]]
    if bad:
        raise ValueError(f"rank(s) {bad} rejected its inputs (see the error raised there); "
                         "every rank stops")
    sizes = [row[0] for row in table]
    if len(set(sizes)) > 1:
        raise ValueError(f"class-parallel training needs the same batch size on every rank; got "
                         f"{sizes} (rank order)")
    dims = [row[1] for row in table]
    if len(set(dims)) > 1:
        raise ValueError(f"embedding sizes differ across ranks: {dims} (rank order)")
    dtypes = [row[2] for row in table]
    if len(set(dtypes)) > 1:
        names = {v: k for k, v in _DTYPE_CODES.items()}
        raise TypeError(f"embedding dtypes differ across ranks: {[names[d] for d in dtypes]}")
    classes = [row[5] for row in table]
    if len(set(classes)) > 1:
        raise ValueError(f"ranks disagree on num_classes: {classes}")
    stop = 0
    for r, row in enumerate(table):
        if row[3] != stop:
            raise ValueError(f"class shards do not tile [0, {classes[0]}) in rank order: rank {r} "
                             f"starts at {row[3]}, expected {stop} "
                             f"(shards: {[(t[3], t[4]) for t in table]})")
        stop = row[4]
    if stop != classes[0]:
        raise ValueError(f"class shards end at {stop}, not at num_classes = {classes[0]}")
    return any(row[8] for row in table)


class _GatherRows(torch.autograd.Function):
    """all_gather of (B, D) rows into (w·B, D); backward: the ranks' gradients of the gathered
    rows are summed, each rank keeps its own rows, times w (insightface's AllGather)."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.world, ctx.rank, ctx.rows = group, world, rank, x.shape[0]
        if dist.get_backend(group) == "nccl":
            out = x.new_empty(world * x.shape[0], *x.shape[1:])
            dist.all_gather_into_tensor(out, x, group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(ctx.rows, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            out = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return out * ctx.world, None, None, None


def _gather_labels(labels: Tensor, shard: ClassShard) -> Tensor:
    parts = [torch.empty_like(labels) for _ in range(shard.world_size)]
    dist.all_gather(parts, labels, group=shard.group)
    return torch.cat(parts)


def gather_batch(x: Tensor, labels: Tensor, shard: ClassShard) -> tuple[Tensor, Tensor]:
    """(x_global, labels_global): the embeddings (autograd-aware, see the module docstring)
    and labels of every rank, in rank order. Batch size, embedding size, dtype and the class
    shards are checked across ranks first; labels must lie in [0, num_classes)."""
    return _gather(x, labels, _default_shard(shard))[:2]


def _gather(x, labels, shard, validate=None, flag=False):
    """gather_batch, plus ``validate(x)``: a check of this rank's other inputs before anything
    moves (its error travels with the shapes, so every rank raises), and `flag` agreed on
    (any rank's). Returns (x_all, labels_all, validate(x), any flag)."""
    error = checked = None
    try:
        x = check.embeddings(x)
        labels = check.labels(labels, x.shape[0], x.device)
        check.label_range(labels, shard.num_classes, "labels", "global class ids")
        if validate is not None:
            checked = validate(x)
    except (TypeError, ValueError) as e:
        error = e
    if error is not None and not (isinstance(x, Tensor) and isinstance(labels, Tensor)):
        raise error  # cannot even describe the batch to the other ranks
    any_flag = _agree(shard, x, labels.reshape(-1), error, flag)
    x_all = _GatherRows.apply(x, shard.group, shard.world_size, shard.rank)
    return x_all, _gather_labels(labels, shard), checked, any_flag


def _all_ok(flag: bool, shard: ClassShard, device) -> bool:
    """True on every rank when every rank says True (one tiny all-reduce)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return int(t) == 0


def _checked_on_all(shard: ClassShard, device, fn):
    """Run a local check; if it fails on any rank, every rank raises (no rank left waiting)."""
    error = None
    try:
        out = fn()
    except (TypeError, ValueError) as e:
        error, out = e, None
    if not _all_ok(error is None, shard, device):
        raise error if error is not None else ValueError(
            "another rank rejected its inputs (see the error raised there); every rank stops")
    return out


# ----------------------------------------------------------------------------- combining

def _all_reduce_stats(lse_parts: list[Tensor], sum_parts: list[Tensor], group):
    """Global log-sum-exps of the per-rank lse_parts (−inf for an empty set everywhere) and
    global sums of sum_parts, in two all-reduces of O(B) numbers."""
    lse = []
    sums = []
    payload = []
    if lse_parts:
        stacked = torch.stack(lse_parts)
        top = stacked.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all empty → 0
        payload.append(torch.exp(stacked - top))
    if sum_parts:
        payload.append(torch.stack(sum_parts))
    if payload:
        flat = torch.cat(payload)
        dist.all_reduce(flat, group=group)
        k = len(lse_parts)
        if k:
            lse = list(top + torch.log(flat[:k]))  # log 0 = −inf: empty everywhere
        sums = list(flat[k:])
    return lse, sums


def _uss_lse_terms(a: Tensor, b: Tensor, scale: float, clamp: bool):
    """softplus(A) + softplus(B) (an empty set adds 0; the official clamp to [−s, s] when
    `clamp`) and σ(A)·[A unclamped], σ(B)·[B unclamped] of the backward."""
    rows = torch.zeros_like(a)
    sig = []
    for stat in (a, b):
        empty = stat == -math.inf
        arg = stat.clamp(-scale, scale) if clamp else stat
        rows = rows + torch.where(empty, torch.zeros_like(stat),
                                  torch.logaddexp(arg, torch.zeros_like(arg)))
        inside = (stat >= -scale) & (stat <= scale) if clamp else ~empty
        sig.append(torch.where(inside, torch.sigmoid(stat), torch.zeros_like(stat)))
    return rows, sig[0], sig[1]


@dataclass
class _Spec:
    family: str          # "unitsface" (margin softmax [+ USS on the bank]) or "uss" (bank)
    fwd: Any
    bwd: Any
    options: tuple       # the op's scalar arguments after the tensors
    shard: ClassShard
    scale: float
    uss_lse: bool = False
    clamp: bool = False
    has_bank: bool = False
    uss_weight: float = 1.0
    replicated_bias: bool = True


def _combine(spec: _Spec, rows: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """Global per-row losses and the backward's statistics from this rank's partials."""
    group = spec.shard.group
    if spec.family == "uss":  # stats [4, B] = (A, σA, B, σB) of the lse form
        if not spec.uss_lse:
            _, (total,) = _all_reduce_stats([], [rows], group)
            return total, torch.zeros_like(stats)
        (a, b), _ = _all_reduce_stats([stats[0], stats[2]], [], group)
        total, fa, fb = _uss_lse_terms(a, b, spec.scale, spec.clamp)
        return total, torch.stack([a, fa, b, fb])
    # unitsface: stats [7, B] = (lse_c z_ic, A, σA, B, σB, z_iy, USS loss)
    lse_parts, sum_parts = [stats[0]], [stats[5]]
    if spec.has_bank:
        if spec.uss_lse:
            lse_parts += [stats[1], stats[3]]
        else:
            sum_parts.append(stats[6])
    lse, sums = _all_reduce_stats(lse_parts, sum_parts, group)
    out = torch.zeros_like(stats)
    out[0], out[5] = lse[0], sums[0]
    total = lse[0] - sums[0]
    if spec.has_bank:
        if spec.uss_lse:
            uss, fa, fb = _uss_lse_terms(lse[1], lse[2], spec.scale, False)
            out[1], out[2], out[3], out[4] = lse[1], fa, lse[2], fb
        else:
            uss = sums[1]
        out[6] = uss
        total = total + spec.uss_weight * uss
    return total, out


class _ShardRows(torch.autograd.Function):
    """Global per-row losses of the gathered batch from this rank's class shard.

    Inputs that take a gradient: x (gathered), the reference rows with a gradient (centres;
    None for the bank-only USS), the threshold b. The other tensors ride along in `rest`."""

    @staticmethod
    def forward(ctx, x, centres, bias, spec, rest):
        labels, index, bank, bank_valid, ref_labels = rest
        if spec.family == "unitsface":
            rows, stats, *norms = spec.fwd(x, centres, bank, labels, index, bank_valid, bias,
                                           *spec.options)
        else:
            rows, stats, *norms = spec.fwd(x, bank, labels, ref_labels, bank_valid, bias,
                                           *spec.options)
        total, stats = _combine(spec, rows, stats)
        ctx.spec = spec
        ctx.save_for_backward(x, centres, bias, labels, index, bank, bank_valid, ref_labels,
                              stats, *norms)
        return total

    @staticmethod
    def backward(ctx, grad_rows):
        spec = ctx.spec
        x, centres, bias, labels, index, bank, bank_valid, ref_labels, stats, *norms = \
            ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        grad_rows = grad_rows.contiguous()
        if spec.family == "unitsface":
            dx, dw, db = spec.bwd(grad_rows, x, centres, bank, labels, index, bank_valid, bias,
                                  *norms, stats, *spec.options, need_dx, need_dw, need_db)
        else:
            dx, _, db = spec.bwd(grad_rows, x, bank, labels, ref_labels, bank_valid, bias,
                                 *norms, stats, *spec.options, need_dx, False, need_db)
            dw = None
        if need_db and spec.replicated_bias:
            db = db.contiguous().clone()
            dist.all_reduce(db, group=spec.shard.group)  # every rank: the full ∂L/∂b
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                None, None)


# ----------------------------------------------------------------------------- backends

def _ops(family: str, backend: str):
    """(forward, backward) of a family: the custom ops of a fused backend, or the eager
    per-shard reference below (same signatures, same statistics). Always the plain forward
    op, never a library.FORWARD_VARIANTS entry: a variant may form the gradient from the
    local statistics, while a shard's gradient needs the global ones."""
    if backend == "reference":
        return _REFERENCE[family]
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.unitsface, f"{family}_fwd{suffix}"),
            getattr(torch.ops.unitsface, f"{family}_bwd{suffix}"))


def _acc(x: Tensor) -> torch.dtype:
    return reference.compute_dtype(x.dtype)


def _softplus(z):
    return torch.logaddexp(z, torch.zeros_like(z))


def _masked_lse(z, mask):
    lse, _ = reference._masked_logsumexp(z, mask)
    return lse


def _ref_class_tiles(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                     margin_cos, uss_margin):
    """Eager logits of one shard: z (softmax), the target mask, and USS (pos, neg, z⁺, z⁻)."""
    classes = (torch.arange(centres.shape[0], device=x.device) if index is None else index)
    xh = reference.normalize(x)
    cos = (xh @ reference.normalize(centres[classes]).T).clamp(-1.0, 1.0)
    is_t = labels[:, None] == classes[None, :]
    z = scale * torch.where(is_t, reference.target_logit(cos, margin_arc, margin_cos), cos)
    uss = None
    if bank is not None:
        cos_b = xh @ reference.normalize(bank[classes]).T
        valid = (torch.ones_like(classes, dtype=torch.bool) if bank_valid is None
                 else bank_valid[classes])
        b = bias.to(cos_b.dtype).reshape(-1)
        b = (b if b.numel() == 1 else b[classes])[None, :]
        uss = (is_t & valid[None, :], ~is_t & valid[None, :], b - scale * (cos_b - uss_margin),
               scale * cos_b - b)
    return z, is_t, uss


def _ref_unitsface_fwd(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                       margin_cos, uss_margin, uss_weight, uss_lse):
    """Eager unitsface_fwd: (rows, stats [7, B], ||x||, ||W[S]||, ||bank[S]||)."""
    z, is_t, uss = _ref_class_tiles(x, centres, bank, labels, index, bank_valid, bias, scale,
                                    margin_arc, margin_cos, uss_margin)
    stats = z.new_zeros(7, x.shape[0])
    stats[0] = torch.logsumexp(z, dim=1)
    stats[5] = torch.where(is_t, z, torch.zeros_like(z)).sum(1)
    rows = stats[0] - stats[5]
    if uss is not None:
        pos, neg, z_pos, z_neg = uss
        if uss_lse:
            a, b = _masked_lse(z_pos, pos), _masked_lse(z_neg, neg)
            stats[6], stats[2], stats[4] = _uss_lse_terms(a, b, scale, False)
            stats[1], stats[3] = a, b
        else:
            zero = torch.zeros_like(z_pos)
            stats[6] = (torch.where(pos, _softplus(z_pos), zero).sum(1)
                        + torch.where(neg, _softplus(z_neg), zero).sum(1))
        rows = rows + uss_weight * stats[6]
    sel = slice(None) if index is None else index
    norm = lambda t: t.to(stats.dtype).norm(dim=1)  # noqa: E731
    return (rows, stats, norm(x), norm(centres[sel]),
            norm(bank[sel]) if bank is not None else stats.new_empty(0))


def _ref_unitsface_bwd(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw, nb,
                       stats, scale, margin_arc, margin_cos, uss_margin, uss_weight, uss_lse,
                       need_dx, need_dw, need_dbias):
    """Eager unitsface_bwd from the (global) statistics: autograd of the surrogate
    Σ_i go_i·[Σ_c e^{z_ic − lse_i} − z_iy + λ·USS'_i], whose gradient in z is exactly the
    kernels' g (USS' = the pair sums, or σ(A)·Σ_P e^{z⁺ − A} + σ(B)·Σ_N e^{z⁻ − B})."""
    with torch.enable_grad():
        xv = x.detach().requires_grad_(need_dx)
        wv = centres.detach().requires_grad_(need_dw)
        bv = bias.detach().requires_grad_(need_dbias) if bias is not None else None
        z, is_t, uss = _ref_class_tiles(xv, wv, bank, labels, index, bank_valid, bv, scale,
                                        margin_arc, margin_cos, uss_margin)
        go = grad_rows.to(z.dtype)
        lse = stats[0].to(z.dtype)
        row = (torch.exp(z - lse[:, None]).sum(1)
               - torch.where(is_t, z, torch.zeros_like(z)).sum(1))
        if uss is not None:
            row = row + uss_weight * _ref_uss_surrogate(*uss, stats[1:5].to(z.dtype), uss_lse,
                                                        False, scale)
        wanted = [t for t, n in ((xv, need_dx), (wv, need_dw), (bv, need_dbias)) if n]
        grads = iter(torch.autograd.grad((go * row).sum(), wanted) if wanted else ())
    dx = next(grads) if need_dx else x.new_empty(0)
    dw = next(grads) if need_dw else centres.new_empty(0)
    db = next(grads) if need_dbias else x.new_empty(0)
    return dx, dw, db


def _ref_uss_surrogate(pos, neg, z_pos, z_neg, stats4, lse, clamp, scale):
    """Per row, a function of z⁺, z⁻ whose gradient is the USS g for the given statistics."""
    if not lse:
        if clamp:
            z_pos, z_neg = z_pos.clamp(-scale, scale), z_neg.clamp(-scale, scale)
        zero = torch.zeros_like(z_pos)
        return (torch.where(pos, _softplus(z_pos), zero).sum(1)
                + torch.where(neg, _softplus(z_neg), zero).sum(1))
    a, fa, b, fb = stats4
    out = torch.zeros_like(a)
    for z, mask, stat, f in ((z_pos, pos, a, fa), (z_neg, neg, b, fb)):
        safe = torch.where(torch.isfinite(stat), stat, torch.zeros_like(stat))
        e = torch.exp(torch.where(mask, z - safe[:, None], torch.full_like(z, -math.inf)))
        out = out + f * e.sum(1)
    return out


def _ref_uss_tiles(x, ref, labels, ref_labels, ref_valid, bias, scale, margin):
    cos = reference.normalize(x) @ reference.normalize(ref).T
    valid = torch.ones_like(ref_labels, dtype=torch.bool) if ref_valid is None else ref_valid
    same = labels[:, None] == ref_labels[None, :]
    b = bias.to(cos.dtype).reshape(1, -1)
    return (same & valid[None, :], ~same & valid[None, :], b - scale * (cos - margin),
            scale * cos - b)


def _ref_uss_fwd(x, ref, labels, ref_labels, ref_valid, bias, scale, margin, lse, clamp,
                 in_batch):
    """Eager uss_fwd (reference rows with their own labels; not in-batch)."""
    pos, neg, z_pos, z_neg = _ref_uss_tiles(x, ref, labels, ref_labels, ref_valid, bias, scale,
                                            margin)
    stats = z_pos.new_zeros(4, x.shape[0])
    if lse:
        a, b = _masked_lse(z_pos, pos), _masked_lse(z_neg, neg)
        rows, fa, fb = _uss_lse_terms(a, b, scale, clamp)
        stats = torch.stack([a, fa, b, fb])
    else:
        rows = _ref_uss_surrogate(pos, neg, z_pos, z_neg, None, False, clamp, scale)
    norm = lambda t: t.to(stats.dtype).norm(dim=1)  # noqa: E731
    return rows, stats, norm(x), norm(ref)


def _ref_uss_bwd(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats, scale,
                 margin, lse, clamp, in_batch, need_dx, need_dref, need_dbias):
    with torch.enable_grad():
        xv = x.detach().requires_grad_(need_dx)
        bv = bias.detach().requires_grad_(need_dbias)
        pos, neg, z_pos, z_neg = _ref_uss_tiles(xv, ref, labels, ref_labels, ref_valid, bv, scale,
                                                margin)
        row = _ref_uss_surrogate(pos, neg, z_pos, z_neg, stats.to(z_pos.dtype), lse, clamp,
                                 scale)
        wanted = [t for t, n in ((xv, need_dx), (bv, need_dbias)) if n]
        grads = iter(torch.autograd.grad((grad_rows.to(row.dtype) * row).sum(), wanted)
                     if wanted else ())
    dx = next(grads) if need_dx else x.new_empty(0)
    db = next(grads) if need_dbias else x.new_empty(0)
    return dx, ref.new_empty(0), db


_REFERENCE = {"unitsface": (_ref_unitsface_fwd, _ref_unitsface_bwd),
              "uss": (_ref_uss_fwd, _ref_uss_bwd)}


# ----------------------------------------------------------------------------- the losses

def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _batch(x, labels, shard, gathered, validate, index):
    """(x_global, labels_global, local labels, validate(x), local index) with every check
    agreed on by all ranks: the shard's tensors are checked before the gather (their errors
    travel with the shapes), the partial-FC index after it (it must hold the local labels of
    the global batch). With gathered=True the batch came from :func:`gather_batch`."""
    shard = _default_shard(shard)
    if gathered:
        x = check.embeddings(x)
        labels = check.labels(labels, x.shape[0], x.device)
        local = shard.local_labels(labels)
        checked, idx = _checked_on_all(shard, x.device, lambda: (
            validate(x), _local_index(index, local, shard, x.device)))
        return x, labels, local, checked, idx
    x, labels, checked, any_index = _gather(x, labels, shard, validate, index is not None)
    local = shard.local_labels(labels)
    idx = None
    if any_index:  # every rank checks, or none: the check is a collective
        idx = _checked_on_all(shard, x.device,
                              lambda: _local_index(index, local, shard, x.device))
    return x, labels, local, checked, idx


def _local_rows(t, name, x, shard):
    t = check.reference_rows(t, x, name)
    if t.shape[0] != shard.num_local:
        raise ValueError(f"{name} has {t.shape[0]} rows but this rank's shard holds "
                         f"{shard.num_local} classes [{shard.start}, {shard.stop}): pass the "
                         "shard's rows only")
    return t


def _local_index(index, local, shard, device):
    """A partial-FC index of LOCAL class ids (sorted, unique) holding every local label."""
    if index is None:
        return None
    return check.class_index(index, shard.num_local, local[local >= 0], device)


def _shard_bias(bias, x, shard):
    """(bias tensor, replicated?): one value (a unified threshold, the same on every rank) or
    one per class of the shard."""
    b = check.bias(bias, shard.num_local, x)
    replicated = b.numel() == 1
    return b, replicated


def _rows(spec, x, centres, bias, labels, index, bank, bank_valid, ref_labels, reduction):
    rows = _ShardRows.apply(x, centres, bias, spec,
                            (labels, index, bank, bank_valid, ref_labels))
    return reference.reduce_rows(rows.to(_loss_dtype(x)), reduction)


def _resolve(backend, device, family):
    from .ops import resolve_backend

    return resolve_backend(backend, device, family)


def margin_softmax_loss(x, centres, labels, shard, *, scale=64.0, margin_arc=0.0,
                        margin_cos=0.4, index=None, reduction="mean", backend="auto",
                        gathered=False):
    """Class-parallel CosFace/ArcFace softmax (partial FC): ``centres`` are this rank's rows
    [start, stop); ``index`` (optional) is a sorted index of LOCAL class ids that holds every
    class of the global batch falling in the shard (:meth:`ClassShard.sample`).

    ``x``/``labels`` are this rank's batch (global class ids), or the gathered global batch
    with ``gathered=True``. Returns the global mean ("mean"), sum ("sum") or the global
    per-row losses ("none", all ranks' rows in rank order), identical on every rank."""
    from .ops import REDUCTIONS, _margins

    check.choice(reduction, REDUCTIONS, "reduction")
    scale, margin_arc, margin_cos = _margins(scale, margin_arc, margin_cos)
    x, labels, local, w, idx = _batch(
        x, labels, shard, gathered, lambda x: _local_rows(centres, "centres", x, shard), index)
    backend = _resolve(backend, x.device, "unitsface")
    fwd, bwd = _ops("unitsface", backend)
    spec = _Spec("unitsface", fwd, bwd, (scale, margin_arc, margin_cos, 0.0, 0.0, False), shard,
                 scale)
    return _rows(spec, x, w, None, local, idx, None, None, None, reduction)


def unitsface_loss(x, labels, centres, bank, bias, shard, *, bank_valid=None, index=None,
                   scale=64.0, margin_arc=0.0, margin_cos=0.4, uss_margin=0.1, uss_form="pairs",
                   uss_weight=1.0, reduction="mean", backend="auto", gathered=False):
    """Class-parallel UniTSFace objective: ``centres``, ``bank``, ``bank_valid`` (and a
    per-class ``bias``) are this rank's rows; a scalar ``bias`` is the replicated unified
    threshold (it gets the full ∂L/∂b on every rank). ``index``: LOCAL class ids, as in
    :func:`margin_softmax_loss`."""
    from .ops import FORMS, REDUCTIONS, _margins

    check.choice(reduction, REDUCTIONS, "reduction")
    check.choice(uss_form, FORMS, "uss_form")
    scale, margin_arc, margin_cos = _margins(scale, margin_arc, margin_cos)
    uss_margin = check.real_number(uss_margin, "uss_margin")
    uss_weight = check.real_number(uss_weight, "uss_weight")
    def validate(x):
        w = _local_rows(centres, "centres", x, shard)
        bk = _local_rows(bank, "bank", x, shard)
        valid = (check.mask(bank_valid, shard.num_local, x.device, "bank_valid")
                 if bank_valid is not None else None)
        return (w, bk, valid) + _shard_bias(bias, x, shard)

    x, labels, local, (w, bk, valid, b, replicated), idx = _batch(x, labels, shard, gathered,
                                                                  validate, index)
    backend = _resolve(backend, x.device, "unitsface")
    fwd, bwd = _ops("unitsface", backend)
    lse = uss_form == "lse"
    spec = _Spec("unitsface", fwd, bwd,
                 (scale, margin_arc, margin_cos, uss_margin, uss_weight, lse), shard, scale,
                 uss_lse=lse, has_bank=True, uss_weight=uss_weight, replicated_bias=replicated)
    return _rows(spec, x, w, b, local, idx, bk, valid, None, reduction)


def uss_loss(x, labels, bias, bank, shard, *, bank_valid=None, scale=64.0, margin=0.1,
             form="pairs", official_clamp=False, reduction="mean", backend="auto",
             gathered=False):
    """Class-parallel USS in memory-bank mode: ``bank`` (and ``bank_valid``, a per-class
    ``bias``) are this rank's rows [start, stop); bank row c of the shard holds class
    start + c. A scalar ``bias`` is the replicated unified threshold."""
    from .ops import FORMS, REDUCTIONS

    check.choice(form, FORMS, "form")
    check.choice(reduction, REDUCTIONS, "reduction")
    scale = check.positive_number(scale, "scale")
    margin = check.real_number(margin, "margin")
    def validate(x):
        bk = _local_rows(bank, "bank", x, shard)
        valid = (check.mask(bank_valid, shard.num_local, x.device, "bank_valid")
                 if bank_valid is not None else None)
        return (bk, valid) + _shard_bias(bias, x, shard)

    x, labels, local, (bk, valid, b, replicated), _ = _batch(x, labels, shard, gathered,
                                                             validate, None)
    backend = _resolve(backend, x.device, "uss")
    fwd, bwd = _ops("uss", backend)
    lse = form == "lse"
    spec = _Spec("uss", fwd, bwd, (scale, margin, lse, bool(official_clamp), False), shard,
                 scale, uss_lse=lse, clamp=bool(official_clamp), has_bank=True,
                 replicated_bias=replicated)
    ref_labels = torch.arange(shard.num_local, device=x.device)
    return _rows(spec, x, None, b, local, None, bk, valid, ref_labels, reduction)


@torch.no_grad()
def uss_bias_init(x, labels, bank, shard, *, bank_valid=None, index=None, scale=64.0,
                  backend="auto", gathered=False):
    """The official initial threshold over the sharded bank, the same on every rank:
    b₀ = mean_i logsumexp_{j∈N_i}(s·cos_ij) over all ranks' valid bank rows (of the sampled
    LOCAL classes ``index`` when given), averaged over the rows that have a negative
    (NaN when none has)."""
    x, labels, local, bk, index = _batch(
        x.detach(), labels, shard, gathered, lambda x: _local_rows(bank, "bank", x, shard), index)
    classes = torch.arange(shard.num_local, device=x.device) if index is None else index
    valid = bank_valid[classes] if bank_valid is not None else None
    backend = _resolve(backend, x.device, "uss")
    fwd, _ = _ops("uss", backend)
    zero = torch.zeros((), dtype=_acc(x), device=x.device)
    stats = fwd(x, bk[classes].contiguous(), local, classes.contiguous(), valid, zero,
                float(scale), 0.0, True, False, False)[1]
    (neg,), _ = _all_reduce_stats([stats[2]], [], shard.group)
    has = neg > -math.inf
    return neg[has].mean() if bool(has.any()) else neg.new_tensor(float("nan"))


@torch.no_grad()
def bank_update_(bank, bank_valid, x, labels, shard):
    """This rank's part of the memory-bank update from the GATHERED batch (x, labels in
    global ids): bank[y − start] ← x̂ for the rows whose class is in the shard (the last
    occurrence of a label wins). No communication."""
    from .ops import bank_update_ as update

    local = shard.local_labels(labels)
    mine = local >= 0
    if bool(mine.any()):
        update(bank, bank_valid, x.detach()[mine], local[mine])
    return bank
