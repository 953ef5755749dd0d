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
    """Global USS rows and stats [4, B] = (A, σA', B, σB') from this rank's partials
    (o: UssOptions)."""
    if not o.lse:
        _, (total,) = all_reduce_stats([], [rows], group)
        return total, torch.zeros_like(stats)
    (a, b), _ = all_reduce_stats([stats[0], stats[2]], [], group)
    total, fa, fb = reference.uss_lse_terms(a, b, o.scale, o.clamp)
    return total, torch.stack([a, fa, b, fb])


def combine_unitsface(rows: Tensor, stats: Tensor, o, has_bank: bool,
                      group) -> tuple[Tensor, Tensor]:
    """Global rows and stats [7, B] = (lse_c z_ic, A, σA', B, σB', z_iy, USS loss) from this
    rank's partials (o: UnitsfaceOptions)."""
    lse_parts, sum_parts = [stats[0]], [stats[5]]
    if has_bank:
        if o.uss_lse:
            lse_parts += [stats[1], stats[3]]
        else:
            sum_parts.append(stats[6])
    lse, sums = all_reduce_stats(lse_parts, sum_parts, group)
    out = torch.zeros_like(stats)
    out[0], out[5] = lse[0], sums[0]
    total = lse[0] - sums[0]
    if has_bank:
        if o.uss_lse:
            uss, fa, fb = reference.uss_lse_terms(lse[1], lse[2], o.scale, o.uss_clamp)
            out[1], out[2], out[3], out[4] = lse[1], fa, lse[2], fb
        else:
            uss = sums[1]
        out[6] = uss
        total = total + o.uss_weight * uss
    return total, out
