"""The memory bank's update (docs/design.md §1.1): one row per class holding the last feature
seen for it.

The bank stores, for an embedding x, a row r with F.normalize(r) = F.normalize(x)
(:func:`unitsface_kernels.reference.bank_rows`: the unit vector x̂, or x itself below the eps),
and marks the row valid when x is finite: a non-finite feature is stored but takes no part in
any loss, on every path that writes the bank (this update, ``load_official``)."""

from __future__ import annotations

import torch

from . import native, reference
from . import validation as check

_BANK_DTYPES = check.FLOAT_DTYPES


def check_update_args(bank, bank_valid, x, labels) -> torch.Tensor:
    """Every argument of :func:`bank_update_` (labels returned as int64), values included."""
    for name, t in (("bank", bank), ("bank_valid", bank_valid), ("x", x), ("labels", labels)):
        check.tensor(t, name)
    if bank.dim() != 2:
        raise ValueError(f"bank must be 2-D (C, D), got shape {tuple(bank.shape)}")
    if bank_valid.dim() != 1 or bank_valid.shape[0] != bank.shape[0]:
        raise ValueError(f"bank_valid must have shape (C,) = ({bank.shape[0]},) like bank's "
                         f"rows, got shape {tuple(bank_valid.shape)}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if x.shape[1] != bank.shape[1]:
        raise ValueError(f"x has embedding size {x.shape[1]} but bank has {bank.shape[1]}")
    for name, t in (("bank_valid", bank_valid), ("x", x), ("labels", labels)):
        if t.device != bank.device:
            raise ValueError(f"{name} is on {t.device} but bank is on {bank.device}")
    if bank.dtype not in _BANK_DTYPES:
        raise TypeError(f"bank must be float16, bfloat16, float32 or float64, got {bank.dtype}")
    if bank_valid.dtype != torch.bool:
        raise TypeError(f"bank_valid must be a bool tensor, got {bank_valid.dtype}")
    if x.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous (it is updated in place)")
    if not bank_valid.is_contiguous():
        raise ValueError("bank_valid must be contiguous (it is updated in place)")
    labels = check.labels(labels, x.shape[0], bank.device)
    check.label_range(labels, bank.shape[0], "labels", "bank rows")
    return labels


def bank_update_(bank, bank_valid, x, labels):
    """In place: bank[y_i] ← the bank row of x_i (x̂_i, or x_i when ||x_i|| < 1e-5, stored in
    the bank's dtype) and bank_valid[y_i] ← x_i is finite; when a label repeats, its last row
    wins. No gradient flows into the bank (x is detached). Uses the compiled op when the
    extension is built, else the eager reference (same result). Every check runs before
    anything is written."""
    return write_rows_(bank, bank_valid, x, check_update_args(bank, bank_valid, x, labels))


def write_rows_(bank, bank_valid, x, labels):
    """:func:`bank_update_` of arguments checked already (int64 labels in range): the
    modules', whose batch was checked when the call began."""
    x = x.detach()
    if native.has_op("bank_update_", bank.device.type):
        torch.ops.unitsface.bank_update_(bank, bank_valid, x.contiguous(), labels)
        # A C++ op does not bump the version counters of what it writes: without this, a loss
        # that saved the bank for its backward would silently use the updated rows.
        torch.autograd.graph.increment_version([bank, bank_valid])
    elif check.values_readable(bank, bank_valid, x, labels):  # meta tensors: nothing to write
        reference.eager_bank_update_(bank, bank_valid, x, labels)
    return bank
