"""Combining the per-row statistics of the ranks' class shards into global ones.

Every rank's forward op returns per-row *partial* statistics over its own classes; two
all-reduces of O(B_global) numbers make them global: MAX, then SUM of exp(stat − max) for the
log-sum-exps (softmax lse, USS A and B) packed with the plain sums (target logit, USS pair
sums). The backward then runs with the global statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..layouts import USS_STATS, UnitsfaceStat, UssStat


def all_reduce_stats(lse_parts: list[Tensor], sum_parts: list[Tensor], group):
    """Global log-sum-exps of the per-rank lse_parts (−inf for an empty set everywhere) and
    global sums of sum_parts, in two all-reduces of O(B) numbers."""
    lse, sums, payload = [], [], []
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


def combine_uss(rows: Tensor, stats: Tensor, o, group) -> tuple[Tensor, Tensor]:
    """Global USS rows and stats [4, B] (:class:`~unitsface_kernels.layouts.UssStat`) from
    this rank's partials (o: UssOptions)."""
    if not o.lse:
        _, (total,) = all_reduce_stats([], [rows], group)
        return total, torch.zeros_like(stats)
    (a, b), _ = all_reduce_stats([stats[UssStat.A], stats[UssStat.B]], [], group)
    total, fa, fb = reference.uss_lse_terms(a, b, o.scale, o.clamp)
    return total, reference.uss_stats(a, fa, b, fb)


def combine_unitsface(rows: Tensor, stats: Tensor, o, has_bank: bool,
                      group) -> tuple[Tensor, Tensor]:
    """Global rows and stats [7, B] (:class:`~unitsface_kernels.layouts.UnitsfaceStat`) from
    this rank's partials (o: UnitsfaceOptions)."""
    S = UnitsfaceStat
    lse_parts, sum_parts = [stats[S.LSE]], [stats[S.TARGET]]
    if has_bank:
        if o.uss_lse:
            lse_parts += [stats[S.USS_A], stats[S.USS_B]]
        else:
            sum_parts.append(stats[S.USS_LOSS])
    lse, sums = all_reduce_stats(lse_parts, sum_parts, group)
    out = torch.zeros_like(stats)
    out[S.LSE], out[S.TARGET] = lse[0], sums[0]
    total = lse[0] - sums[0]
    if has_bank:
        if o.uss_lse:
            uss, fa, fb = reference.uss_lse_terms(lse[1], lse[2], o.scale, o.uss_clamp)
            out[USS_STATS] = reference.uss_stats(lse[1], fa, lse[2], fb)
        else:
            uss = sums[1]
        out[S.USS_LOSS] = uss
        total = total + o.uss_weight * uss
    return total, out
