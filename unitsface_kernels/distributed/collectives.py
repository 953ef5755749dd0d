"""Collectives of the class-parallel code: the batch gather (autograd-aware) and the
agreement of every rank on its inputs before any data moves, so that a bad input raises the
same error on every rank instead of leaving the others waiting in a collective."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import validation as check
from .shard import ClassShard, require


# ----------------------------------------------------------------------------- gathering

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def agree(shard: ClassShard, x: Tensor, labels: Tensor, error: Optional[BaseException],
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


class GatherRows(torch.autograd.Function):
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


def gather_labels(labels: Tensor, shard: ClassShard) -> Tensor:
    parts = [torch.empty_like(labels) for _ in range(shard.world_size)]
    dist.all_gather(parts, labels, group=shard.group)
    return torch.cat(parts)


def gather_batch(x: Tensor, labels: Tensor, shard: ClassShard) -> tuple[Tensor, Tensor]:
    """(x_global, labels_global): the embeddings (autograd-aware, see :class:`GatherRows`)
    and labels of every rank, in rank order. Batch size, embedding size, dtype and the class
    shards are checked across ranks first; labels must lie in [0, num_classes)."""
    return gather(x, labels, require(shard))[:2]


def gather(x, labels, shard, validate=None, flag=False):
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
    any_flag = agree(shard, x, labels.reshape(-1), error, flag)
    x_all = GatherRows.apply(x, shard.group, shard.world_size, shard.rank)
    return x_all, gather_labels(labels, shard), checked, any_flag


def all_ok(flag: bool, shard: ClassShard, device) -> bool:
    """True on every rank when every rank says True (one tiny all-reduce)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return int(t) == 0


def checked_on_all(shard: ClassShard, device, fn):
    """Run a local check; if it fails on any rank, every rank raises (no rank left waiting)."""
    error = None
    try:
        out = fn()
    except (TypeError, ValueError) as e:
        error, out = e, None
    if not all_ok(error is None, shard, device):
        raise error if error is not None else ValueError(
            "another rank rejected its inputs (see the error raised there); every rank stops")
    return out


