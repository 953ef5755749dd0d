"""Class-parallel heads inside a model that DistributedDataParallel wraps whole (PyTorch
Lightning's DDP strategy wraps the LightningModule, head included).

DDP treats every parameter and buffer of the module it wraps as a replica: it broadcasts rank
0's values when it is built (and the buffers before every forward), checks that every rank has
the same shapes, and averages the gradients. A class-parallel head holds *shards* — rank r owns
the rows [class_start, class_start + num_local) of the class centres and of the memory bank —
so each of those would be wrong: rank 0's rows would overwrite the others' (or, with uneven
shards, DDP refuses the shapes), and the gradient of rank r's rows would be averaged with the
gradients of other classes' rows. The head's gradients are already complete where they are:
each rank gets exactly ∂L/∂W of its own rows, a replicated unified threshold the full ∂L/∂b on
every rank (the head all-reduces it), and the embeddings w·∂L/∂x, which DDP's average turns into
the backbone's ∂L/∂θ (see :mod:`unitsface_kernels.distributed`).

So the head's parameters and buffers must not be DDP's business: :func:`ignore_shards_in_ddp`
lists them in the model's ``_ddp_params_and_buffers_to_ignore`` (through DDP's own
``_set_params_and_buffers_to_ignore_for_model``), which DDP reads when it is built — call it
after the head exists and before DDP wraps the model (in Lightning: ``configure_model``). DDP
then neither broadcasts, checks, buckets nor averages them; Lightning's own state sync for
non-fitting stages reads the same list. Everything else (the backbone) stays data-parallel.

Checkpoints: Lightning's DDP strategy writes rank 0's ``state_dict`` only, which holds rank 0's
shard. :func:`gather_shards` (a collective: call it on every rank, e.g. in
``on_save_checkpoint``) replaces each shard by the full tensor over all classes, so the file
holds the whole head — loadable in one process or in another number of ranks — and
:func:`slice_shards` (``on_load_checkpoint``) cuts full tensors back to this rank's rows. The
gather holds the full C × D tensors on every rank while the checkpoint is written; for heads too
large for that, save each rank's ``head.state_dict()`` to its own file instead (as insightface
does).

Two more things to keep per rank: clip the gradients of the backbone only (a norm over shard
gradients differs per rank and would scale the replicated backbone differently on each), and
seed the head's initialisation and partial-FC sampling per rank.
"""

from __future__ import annotations

from typing import Iterator, MutableMapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .official import SampleToSampleBCE

__all__ = ["sharded_modules", "ignore_shards_in_ddp", "gather_shards", "slice_shards"]


def sharded_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every class-parallel module inside ``model`` (itself
    included): the modules whose ``shard`` is a ClassShard."""
    for name, module in model.named_modules():
        if getattr(module, "shard", None) is not None and hasattr(module, "num_local"):
            yield name, module


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _row_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The module's own tensors that hold one row per class of its shard: the class centres,
    the bank and its validity, per-class (or per-bank-row) thresholds — not a unified one."""
    tensors = list(module.named_parameters(recurse=False)) + list(module._buffers.items())
    for name, t in tensors:
        if t is None or t.dim() == 0 or t.shape[0] != module.num_local:
            continue
        if name == "bias" and not isinstance(module, SampleToSampleBCE) and t.numel() == 1:
            continue  # the unified threshold b: one value, the same on every rank
        yield name, t


def ignore_shards_in_ddp(model: nn.Module) -> list[str]:
    """Keep the parameters and buffers of every class-parallel head inside ``model`` out of
    DistributedDataParallel(model): no broadcast from rank 0, no shape check, no gradient
    averaging (the heads' gradients are complete on each rank). Call it after the heads are
    built and before DDP wraps ``model`` (Lightning: at the end of ``configure_model``). Adds
    to names ignored already; returns the names this call added (none in one process)."""
    names = []
    for prefix, module in sharded_modules(model):
        names += [_qualified(prefix, n) for n, _ in module.named_parameters()]
        names += [_qualified(prefix, n) for n, _ in module.named_buffers()]
    if names:
        before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, before + [n for n in names if n not in before])
    return names


def _gather_rows(t: Tensor, module) -> Tensor:
    """The full tensor over all classes from every rank's rows (a collective of the shard's
    group; the shards tile [0, num_classes) in rank order)."""
    shard = module.shard
    world = shard.world_size
    sizes = [None] * world
    dist.all_gather_object(sizes, (shard.start, t.shape[0]), group=shard.group)
    longest = max(n for _, n in sizes)
    send = t.detach()
    if send.dtype == torch.bool:  # not every backend gathers bools
        send = send.to(torch.uint8)
    padded = send.new_zeros((longest,) + tuple(send.shape[1:]))
    padded[:send.shape[0]] = send
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    order = sorted(range(world), key=lambda r: sizes[r][0])
    full = torch.cat([parts[r][:sizes[r][1]] for r in order])
    return full.to(t.dtype)


def gather_shards(model: nn.Module, state_dict: MutableMapping[str, Tensor],
                  prefix: str = "") -> MutableMapping[str, Tensor]:
    """Replace, in ``state_dict`` (``model.state_dict()``, keys under ``prefix``), the rows of
    every class-parallel head by the full tensors over all classes. A collective: every rank of
    the heads' groups must call it (Lightning calls ``on_save_checkpoint`` on every rank).
    Returns ``state_dict``."""
    for name, module in sharded_modules(model):
        for tname, t in _row_tensors(module):
            key = prefix + _qualified(name, tname)
            if key in state_dict:
                state_dict[key] = _gather_rows(state_dict[key], module)
    return state_dict


def slice_shards(model: nn.Module, state_dict: MutableMapping[str, Tensor],
                 prefix: str = "") -> MutableMapping[str, Tensor]:
    """The inverse of :func:`gather_shards` before ``load_state_dict``: every full tensor (one
    row per class of num_classes) of a class-parallel head is cut to this rank's rows; a tensor
    that is already a shard is left alone. Returns ``state_dict``."""
    for name, module in sharded_modules(model):
        for tname, _ in _row_tensors(module):
            key = prefix + _qualified(name, tname)
            t = state_dict.get(key)
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == module.num_classes:
                state_dict[key] = t[module.shard.start:module.shard.stop]
    return state_dict
