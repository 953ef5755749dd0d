"""Loading the official UniTSFace code's checkpoints (CVI-SZU/UniTSFace, head.py) into the
modules: the whole checkpoint is checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from ..bank import bank_update_


@dataclass(frozen=True)
class Entry:
    """One tensor of an official head: the module attribute it fills, its key in the official
    model (``sample_to_class_loss.weight``, …), whether a checkpoint must hold it, and its
    kind: "weight" (C × D parameter), "feat_mem" (C × D raw features → the bank) or "bias"
    (the threshold parameter, any shape with the same number of values)."""

    attr: str
    key: str
    required: bool
    kind: str

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


CENTRES = Entry("weight", "sample_to_class_loss.weight", True, "weight")
CENTRE_BIAS = Entry("bias", "sample_to_class_loss.bias", False, "bias")
FEAT_MEM = Entry("bank", "sample_to_sample_loss.feat_mem", True, "feat_mem")
BANK_BIAS = Entry("bias", "sample_to_sample_loss.bias", False, "bias")


class Official:
    """A module that loads its official head's tensors: the entries ``official_entries()``
    lists (by default the class's ``OFFICIAL``)."""

    OFFICIAL: tuple[Entry, ...] = ()

    def official_entries(self) -> tuple[Entry, ...]:
        return self.OFFICIAL

    def load_official(self, state_dict):
        """Load this head's tensors from a checkpoint of the official UniTSFace code
        (CVI-SZU/UniTSFace): ``sample_to_class_loss.weight`` (C×D class centres),
        ``sample_to_sample_loss.feat_mem`` (C×D raw features) and the thresholds
        (``….bias``), those of them this head has, with any key prefix (e.g. ``module.`` of
        DataParallel) or none (``weight``, ``feat_mem``, ``bias``); a training checkpoint
        ``{"state_dict": ...}`` is unwrapped. The bank stores the rows of ``feat_mem`` by the
        bank's one rule (bank_update_: valid when finite). A missing required tensor raises;
        a missing optional one leaves its part as it is. A class-parallel head takes the full
        C×D tensors (and keeps its shard's rows) or its shard's rows. The whole checkpoint is
        checked before anything is written. Returns self."""
        return load_official(self, state_dict, self.official_entries())


def _find(state_dict: Mapping, entry: Entry):
    hits = [k for k in state_dict
            if isinstance(k, str) and (k == entry.key or k.endswith("." + entry.key))]
    if len(hits) > 1:
        raise ValueError(f"state_dict has several {entry.key!r} entries: {hits}")
    if hits:
        return hits[0]
    return entry.short if entry.short in state_dict else None


def _rows(module, t: Tensor) -> Tensor:
    """A full C × D checkpoint tensor → this shard's rows (class-parallel modules)."""
    shard = getattr(module, "shard", None)
    if shard is not None and t.dim() == 2 and t.shape[0] == module.num_classes:
        return t[shard.start:shard.stop]
    return t


def _checked(module, key: str, value, entry: Entry) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"state_dict[{key!r}] is on the meta device: it holds no values")
    if not value.is_floating_point():
        raise TypeError(f"state_dict[{key!r}] must be a floating tensor, got {value.dtype}")
    if entry.kind == "bias":
        shard, want = getattr(module, "shard", None), module.bias.numel()
        if shard is not None and want > 1 and value.numel() == module.num_classes:
            value = value.reshape(-1)[shard.start:shard.stop]  # the full per-class vector
        if value.numel() != want:
            what = "one unified threshold" if want == 1 else f"{want} thresholds (one per class)"
            raise ValueError(f"state_dict[{key!r}] holds {value.numel()} values; this "
                             f"{type(module).__name__} learns {what}")
        return value
    value = _rows(module, value)
    target = module.weight if entry.kind == "weight" else module._buffers["bank"]
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, this "
                         f"{type(module).__name__}'s {entry.attr} has {tuple(target.shape)}")
    return value


@torch.no_grad()
def load_official(module, state_dict, entries: tuple[Entry, ...]):
    """Fill `module` from an official checkpoint: a state_dict (any key prefix, such as
    DataParallel's ``module.``, or none) or a training checkpoint ``{"state_dict": ...}``.
    feat_mem rows are written with the bank's one rule (bank_update_: the row of the feature,
    valid when finite). Every entry is checked first; a bad checkpoint changes nothing."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    found = {}
    for entry in entries:
        key = _find(state_dict, entry)
        if key is None:
            if entry.required:
                raise KeyError(f"state_dict has no {entry.key!r} (or {entry.short!r}) entry")
            continue
        found[entry] = _checked(module, key, state_dict[key], entry)
    for entry, value in found.items():
        if entry.kind == "feat_mem":
            module.reset_bank()
            bank, valid = module._buffers["bank"], module._buffers["bank_valid"]
            value = value.to(device=bank.device)
            bank_update_(bank, valid, value, torch.arange(value.shape[0], device=bank.device))
        else:
            target = getattr(module, entry.attr)
            target.copy_(value.reshape(target.shape).to(target))
    return module
