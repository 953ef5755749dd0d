"""What every module call shares: its settings and its one walk down the layers
(docs/design.md §3–§4):

* :class:`Settings` — a module holds its op family's settings object (``options``, built and
  checked once when the module is built) and shows its fields as read-only attributes in the
  words of its constructor (``head.scale``, ``head.arcface_grad``, …) and in its repr;
* :func:`begin_call` — what one call does once, before anything changes: check the batch in
  the module user's words, check that the module's tensors are on the batch's device, and
  resolve the backend. The call then hands the checked batch, the settings object and the
  resolved backend to the internal entries of :mod:`unitsface_kernels.ops` (or of
  :mod:`unitsface_kernels.distributed`), which check nothing again;
* :func:`call_unitsface`, :func:`call_uss`, :func:`call_threshold_init` — those entries for
  the module's classes: its shard's (class-parallel) or all of them.
"""

from __future__ import annotations

from torch import Tensor

from .. import margin_calls, ops
from ..distributed import losses as sharded
from ..options import EPS
from .parts import checked_batch, resolve_backend


class Settings:
    """A module with a settings object ``options`` (:mod:`unitsface_kernels.options`).
    ``SETTINGS`` names the constructor arguments shown as read-only attributes; their values
    come from :meth:`settings` (by default ``options.keywords()``)."""

    SETTINGS: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("SETTINGS", ()):
            setattr(cls, name, property(
                lambda self, name=name: self.settings()[name],
                doc=f"The {name} setting (read-only: build a new module to change it)."))

    def settings(self) -> dict:
        return self.options.keywords()

    def settings_repr(self) -> str:
        shown = self.settings()
        return ", ".join(f"{name}={shown[name]!r}" for name in self.SETTINGS)


def bank_eps(eps: float) -> None:
    """A head with a memory bank normalises with eps ≤ 1e-5: the bank stores x̂ for
    ‖x‖ ≥ 1e-5 (docs/design.md §1.4), which reads as x does for such an eps only."""
    if eps > EPS:
        raise ValueError(f"eps must be ≤ {EPS} for a head with a memory bank (the bank stores "
                         f"x / ‖x‖ for ‖x‖ ≥ {EPS}); got {eps!r}")


def begin_call(module, x, labels, family: str, x_name: str = "x") -> tuple[Tensor, Tensor, str]:
    """(x, int64 labels, backend) of a module call: the batch checked against the module (its
    embedding_size, num_classes, the forward's argument names), the module's parameters and
    buffers on x's device, and the backend that runs op family `family` there. Nothing is
    checked or resolved again further down the call."""
    x, labels = checked_batch(module, x, labels, x_name)
    for name, t in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)):
        if t.device != x.device:
            raise ValueError(f"this {type(module).__name__}'s {name} is on {t.device} but "
                             f"{x_name} is on {x.device}: move the module (.to) or the batch")
    return x, labels, resolve_backend(module, x.device, family)


def call_unitsface(module, backend: str, x, labels, centres, bank=None, bias=None, valid=None,
                   index=None):
    """The mean unitsface-family loss of a checked batch on the module's classes (the margin
    softmax over ``centres``, plus λ·USS on ``bank`` when given), with ``module.options`` and
    the module's margin of the family, if it has one (:meth:`.margin.MarginHead.margin_call`)."""
    kw = dict(bank_valid=valid, index=index, sparse_grad=getattr(module, "sparse_grad", False),
              backend=backend)
    margin = module.margin_call() if hasattr(module, "margin_call") else None
    if module.shard is not None:
        return sharded.run_shard_unitsface(module.options, x, labels, centres, bank, bias,
                                           module.shard, margin=margin, **kw)
    if margin is not None:
        return margin_calls.run_margin_unitsface(module.options, margin, x, labels, centres,
                                                 bank, bias, **kw)
    return ops.run_unitsface(module.options, x, labels, centres, bank, bias, **kw)


def call_uss(module, backend: str, x, labels, bias, ref, valid=None):
    """The mean USS loss of a checked batch against the module's reference rows (its bank, or
    its class centres; none in-batch), with ``module.options``."""
    if module.shard is not None:
        return sharded.run_shard_uss(module.options, x, labels, bias, ref, module.shard,
                                     bank_valid=valid, backend=backend)
    return ops.run_uss(module.options, x, labels, bias, ref, None, valid, backend=backend)


def call_threshold_init(module, backend: str, x, labels, bank=None, valid=None, index=None):
    """The official b₀ over the reference rows the module's loss uses this step (the valid
    bank rows of the classes of ``index``, all without one; the batch in-batch), with the
    scale and eps of ``module.options``."""
    o, x = module.options.threshold_init(), x.detach()
    if module.shard is not None:
        return sharded.run_shard_threshold_init(o, x, labels, bank, module.shard,
                                                bank_valid=valid, index=index, backend=backend)
    if index is not None:
        bank, valid = bank[index], valid[index]
    return ops.run_threshold_init(o, x, labels, bank, index, valid, backend=backend)
