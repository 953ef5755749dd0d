"""Drop-in modules over the fused losses (DESIGN.md §4): :class:`UniTSFaceHead` (the whole
UniTSFace head: margin softmax + USS on a memory bank, with a learnable unified threshold),
:class:`PartialFC` (the sample-to-class part alone, shaped like insightface's PartialFC_V2) and
:class:`USSLoss` (the sample-to-sample part alone, memory-bank or in-batch).

Conventions shared by the three modules:

* **Precision.** The losses are computed in the dtype of the embeddings ``x``: under
  ``torch.autocast`` a bf16/fp16 backbone output makes the head's class-centre and bank GEMMs
  run in bf16/fp16 (what ``F.linear`` does in insightface's PartialFC_V2 under autocast), while
  the parameters stay float32 masters — ``weight`` (and the bank) are cast to ``x.dtype`` for the
  call and the weight's gradient flows back through the cast in float32. The loss is float32,
  accumulation is float32 inside every backend, and autocast is switched off around the call so
  that it cannot lower the precision of the eager reference any further. Feed float32
  embeddings (``x.float()``) to get a float32 head under autocast.
* **Memory bank.** One row per class holding the last normalised embedding seen for it
  (``bank``, dtype ``bank_dtype``), and ``bank_valid`` marking rows written so far; rows never
  written take no part in the loss. In training mode the bank is updated with the batch
  *after* the loss is computed (the official order; the last occurrence of a label wins), under
  ``no_grad``; in eval mode it is left alone (like BatchNorm's running statistics). The fused
  backends keep the bank for their backward pass, so when the update would overwrite the very
  tensor the loss used, the loss is given a snapshot (one C×D copy per step; none is needed
  when the bank is cast to ``x.dtype`` anyway, e.g. a float32 bank under bf16 autocast).
* **Unified threshold.** ``bias`` is the 1-element parameter b (initially 0); the cosine
  threshold it implies is ``threshold = b / scale``. In training mode, while b ≤ 0, the first
  USS call sets b from the data, as the official code does:
  b ← mean_i logsumexp_{j∈N_i}(s·cos_ij) over the reference rows the loss uses (the valid bank
  rows of the sampled classes, or the batch itself in in-batch mode). When there is no
  negative yet (an empty bank) b is left at 0 and the next call tries again.
* **Compilation.** The loss functions are custom ops, so ``torch.compile`` (non-fullgraph)
  traces them; the partial-FC sampling, the ``b ≤ 0`` test and the bank update are excluded
  from the graph (``torch.compiler.disable``: clean graph breaks). When USS is off, ``bias``
  still gets a (zero) gradient, so DDP never sees an unused parameter.
* **Class-parallel training** (insightface's PartialFC_V2 layout, :mod:`.distributed`). When
  torch.distributed is initialised with more than one rank (or ``class_parallel=True``), the
  memory-bank modules shard the classes: rank r holds only the rows [class_start,
  class_start + num_local) of ``weight``, ``bank`` and ``bank_valid`` (insightface's split).
  Each call all-gathers the ranks' embeddings and labels, returns the loss over the global
  batch (the same value on every rank), samples partial FC from the rank's own shard, and
  writes the bank rows of its shard from the gathered batch. Gradients: ``weight`` gets
  exactly ∂L/∂W of its rows, ``bias`` the full ∂L/∂b on every rank, and the embeddings
  w·∂L/∂x (insightface's convention) — so wrap the *backbone only* in DDP (which averages),
  never the head: its parameters are shards, not replicas. ``state_dict`` holds the shard.
  ``class_parallel=False`` keeps a replicated single-process head under DDP: wrap backbone
  and head together, with ``broadcast_buffers=False`` so that each rank keeps the bank of the
  features it saw. In-batch ``USSLoss`` is never sharded.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed, reference
from .distributed import ClassShard, gather_batch
from .backends import BACKENDS
from .options import FORMS
from .ops import (bank_update_, fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                  sample_classes, uss_bias_init)

__all__ = ["UniTSFaceHead", "PartialFC", "USSLoss", "pair_cosine"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- helpers

def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _choice(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _sample_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {rate!r}")
    return float(rate)


def _bank_dtype(dtype) -> torch.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bank_dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def _flat_labels(labels: Tensor) -> Tensor:
    """(B,) or (B, 1) labels, as insightface accepts them."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    return labels.reshape(-1) if labels.dim() == 2 and labels.shape[1] == 1 else labels


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in the compute dtype; a differentiable cast, so a float32 master gets the gradient."""
    return t if t.dtype == dtype else t.to(dtype)


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _no_autocast(device: torch.device):
    """The modules choose the compute dtype themselves (see the module docstring)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _class_shard(num_classes: int, class_parallel: Optional[bool], group) -> Optional[ClassShard]:
    """This rank's ClassShard when class-parallel (None: auto, i.e. torch.distributed is
    initialised with more than one rank in ``group``), else None (one process holds all)."""
    if class_parallel is None:
        class_parallel = (torch.distributed.is_available() and torch.distributed.is_initialized()
                          and torch.distributed.get_world_size(group) > 1)
    return ClassShard.from_group(num_classes, group) if class_parallel else None


def pair_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) row-wise in float32 (float64 for float64 inputs), with the eps rule of
    the losses: x̂ = x / max(||x||, 1e-5)."""
    return (reference.normalize(a) * reference.normalize(b)).sum(-1)


# ----------------------------------------------------------------------------- shared parts

class _UnifiedThreshold(nn.Module):
    """The learnable unified threshold b (``bias``), its cosine threshold b/s and deployment
    verification; the data-dependent initialisation of b."""

    scale: float

    def _init_threshold(self, scale) -> None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.zeros(1))

    @property
    def threshold(self) -> float:
        """The learned cosine threshold t = b / s: same identity when cos(a, b) > t."""
        return float(self.bias.detach().reshape(-1)[0]) / self.scale

    @torch.no_grad()
    def verify(self, a: Tensor, b: Tensor) -> Tensor:
        """Face verification at the learned threshold: a bool tensor, cos(a_i, b_i) > t.
        a and b are embeddings of shape (..., D) (broadcastable)."""
        return pair_cosine(a, b) > self.threshold

    @torch.compiler.disable  # data-dependent (b ≤ 0?): a clean graph break under compile
    @torch.no_grad()
    def _maybe_init_bias(self, x: Tensor, labels: Tensor, ref=None, ref_labels=None,
                         ref_valid=None) -> None:
        """Official: while b ≤ 0, b ← mean_i logsumexp_{N_i}(s·cos_ij), before the loss."""
        if not self.training or not bool(self.bias.detach().le(0).all()):
            return
        b0 = uss_bias_init(x.detach(), labels, ref, ref_labels, ref_valid, scale=self.scale,
                           backend=self.backend)
        if bool(torch.isfinite(b0)):  # NaN: no negative yet (empty bank); try again next call
            self.bias.copy_(b0.reshape(1).to(self.bias.dtype))

    @torch.compiler.disable
    @torch.no_grad()
    def _maybe_init_bias_sharded(self, x_all: Tensor, labels_all: Tensor, bank: Tensor,
                                 valid: Tensor, index: Optional[Tensor]) -> None:
        """The same over the sharded bank (the gathered batch; b₀ is equal on every rank)."""
        if not self.training or not bool(self.bias.detach().le(0).all()):
            return
        b0 = distributed.uss_bias_init(x_all, labels_all, bank, self.shard, bank_valid=valid,
                                       index=index, scale=self.scale, backend=self.backend,
                                       gathered=True)
        if bool(torch.isfinite(b0)):
            self.bias.copy_(b0.reshape(1).to(self.bias.dtype))


class _MemoryBank(nn.Module):
    """Buffers ``bank`` (C×D, normalised rows) and ``bank_valid`` (C, bool)."""

    def _init_bank(self, num_classes: int, embedding_size: int, dtype: torch.dtype) -> None:
        self.register_buffer("bank", torch.zeros(num_classes, embedding_size,
                                                 dtype=_bank_dtype(dtype)))
        self.register_buffer("bank_valid", torch.zeros(num_classes, dtype=torch.bool))

    def _bank_for_loss(self, x: Tensor, *grad_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The bank (in x's dtype) and validity that the loss reads. The fused backends save
        them for the backward pass, so when the training-mode update would overwrite these
        very tensors before the backward runs, the loss gets a snapshot instead."""
        bank, valid = _as(self.bank, x.dtype), self.bank_valid
        saves = self.backend != "reference" or getattr(self, "shard", None) is not None
        if self.training and saves and _needs_graph(x, *grad_inputs):
            if bank is self.bank:
                bank = bank.clone()
            valid = valid.clone()
        return bank, valid

    @torch.compiler.disable
    @torch.no_grad()
    def _update_bank(self, x: Tensor, labels: Tensor) -> None:
        """bank[y_i] ← x̂_i, bank_valid[y_i] ← True, last occurrence wins (training only).
        Class-parallel: x, labels are the gathered batch; this rank writes its shard's rows."""
        if not self.training:
            return
        if getattr(self, "shard", None) is not None:
            distributed.bank_update_(self.bank, self.bank_valid, x, labels, self.shard)
        else:
            bank_update_(self.bank, self.bank_valid, x.detach(), labels)

    @torch.no_grad()
    def reset_bank(self) -> None:
        """Forget every stored feature (all rows invalid)."""
        self.bank.zero_()
        self.bank_valid.zero_()


@torch.compiler.disable  # random sampling with a data-dependent size
def _setup_classes(module, embedding_size, num_classes, sample_rate, class_parallel,
                   process_group) -> None:
    """The class-centre heads' shared attributes: sizes, sample rate, this rank's shard
    [class_start, class_start + num_local) and the partial-FC sample size."""
    module.embedding_size = _positive_int(embedding_size, "embedding_size")
    module.num_classes = _positive_int(num_classes, "num_classes")
    module.sample_rate = _sample_rate(sample_rate)
    module.shard = _class_shard(module.num_classes, class_parallel, process_group)
    module.class_start = module.shard.start if module.shard is not None else 0
    module.num_local = (module.shard.num_local if module.shard is not None
                        else module.num_classes)
    module.num_sample = max(1, int(module.sample_rate * module.num_local))


def _partial_fc_index(module, labels: Tensor) -> Optional[Tensor]:
    """Partial FC: in training mode with num_sample < num_local, every class of the batch plus
    random others (sorted); otherwise None (all classes)."""
    if not module.training or module.num_sample >= module.num_local:
        return None
    return sample_classes(labels, module.num_local, module.num_sample)


@torch.compiler.disable
def _shard_index(module, labels_all: Tensor) -> Optional[Tensor]:
    """Partial FC on this rank's shard: LOCAL class ids holding every class of the gathered
    batch that falls in the shard, plus random others (None: all the shard's classes)."""
    if not module.training or module.num_sample >= module.num_local:
        return None
    return module.shard.sample(labels_all, module.num_sample)


# ----------------------------------------------------------------------------- modules

class PartialFC(nn.Module):
    """The sample-to-class margin softmax (CosFace/ArcFace) with partial FC, shaped like
    insightface's ``PartialFC_V2``:

        loss = PartialFC(512, 93431, sample_rate=0.2)(embeddings, labels)

    ``weight`` (num_classes × embedding_size) is initialised normal(0, 0.01) as in insightface.
    In training mode with ``sample_rate < 1`` each call samples ``int(sample_rate·C)`` classes
    (all classes of the batch plus random others, :func:`~unitsface_kernels.sample_classes`);
    the other rows of ``weight`` get exactly zero gradient. In eval mode all classes are used.

    The module owns classes ``[class_start, class_start + num_local)``: all of them in one
    process; under torch.distributed (``class_parallel``, see the module docstring) this
    rank's shard, with ``sample_rate`` applied to the shard as in insightface
    (``int(sample_rate·num_local)`` classes per rank). ``process_group``: the ranks sharing
    the classes (None: the default group).
    """

    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 1.0, *,
                 scale: float = 64.0, margin_cos: float = 0.4, margin_arc: float = 0.0,
                 backend: str = "auto", class_parallel: Optional[bool] = None,
                 process_group=None):
        super().__init__()
        _setup_classes(self, embedding_size, num_classes, sample_rate, class_parallel,
                       process_group)
        self.scale = float(scale)
        self.margin_cos = float(margin_cos)
        self.margin_arc = float(margin_arc)
        self.backend = _choice(backend, BACKENDS, "backend")
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def local_labels(self, labels: Tensor) -> Tensor:
        """Global class ids → rows of this module's ``weight`` (identity in one process;
        −1 for classes of other shards)."""
        return self.shard.local_labels(labels) if self.shard is not None else labels

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        labels = _flat_labels(labels)
        if self.shard is not None:
            x_all, y_all = gather_batch(embeddings, labels, self.shard)
            index = _shard_index(self, y_all)
            with _no_autocast(embeddings.device):
                return distributed.margin_softmax_loss(
                    x_all, _as(self.weight, x_all.dtype), y_all, self.shard, scale=self.scale,
                    margin_arc=self.margin_arc, margin_cos=self.margin_cos, index=index,
                    backend=self.backend, gathered=True)
        index = _partial_fc_index(self, labels)
        with _no_autocast(embeddings.device):
            return fused_margin_softmax_loss(
                embeddings, _as(self.weight, embeddings.dtype), labels, scale=self.scale,
                margin_arc=self.margin_arc, margin_cos=self.margin_cos, index=index,
                backend=self.backend)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, scale={self.scale}, "
                f"margin_cos={self.margin_cos}, margin_arc={self.margin_arc}, "
                f"backend={self.backend!r}{_shard_repr(self)}")


class USSLoss(_UnifiedThreshold, _MemoryBank):
    """The unified-threshold-integrated sample-to-sample loss (DESIGN.md §1.1) alone, with a
    learnable b (``bias``; data-initialised at the first training call while b ≤ 0).

    mode="bank": the reference set is the module's memory bank (``bank``, ``bank_valid``;
        needs embedding_size and num_classes), updated with the batch after the loss.
    mode="inbatch": the reference set is the batch itself (pairs i ≠ j); no state but b.

    In bank mode under torch.distributed the bank is class-sharded (``class_parallel``,
    ``process_group``: see the module docstring); the in-batch mode stays per rank.
    """

    def __init__(self, embedding_size: Optional[int] = None, num_classes: Optional[int] = None,
                 *, scale: float = 64.0, margin: float = 0.1, form: str = "pairs",
                 official_clamp: bool = False, mode: str = "bank",
                 bank_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 class_parallel: Optional[bool] = None, process_group=None):
        super().__init__()
        self.mode = _choice(mode, ("bank", "inbatch"), "mode")
        self.form = _choice(form, FORMS, "form")
        self.margin = float(margin)
        self.official_clamp = bool(official_clamp)
        self.backend = _choice(backend, BACKENDS, "backend")
        self._init_threshold(scale)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.shard = None
        if self.mode == "bank":
            if embedding_size is None or num_classes is None:
                raise ValueError("mode='bank' needs embedding_size and num_classes (one bank "
                                 "row per class); mode='inbatch' needs neither")
            self.embedding_size = _positive_int(embedding_size, "embedding_size")
            self.num_classes = _positive_int(num_classes, "num_classes")
            self.shard = _class_shard(self.num_classes, class_parallel, process_group)
            self.class_start = self.shard.start if self.shard is not None else 0
            self.num_local = (self.shard.num_local if self.shard is not None
                              else self.num_classes)
            self._init_bank(self.num_local, self.embedding_size, bank_dtype)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        labels = _flat_labels(labels)
        opts = dict(scale=self.scale, margin=self.margin, form=self.form,
                    official_clamp=self.official_clamp, backend=self.backend)
        if self.mode == "inbatch":
            self._maybe_init_bias(x, labels)
            with _no_autocast(x.device):
                return fused_uss_loss(x, labels, self.bias, **opts)
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
            bank, valid = self._bank_for_loss(x, self.bias)
            self._maybe_init_bias_sharded(x, labels, bank, valid, None)
            with _no_autocast(x.device):
                loss = distributed.uss_loss(x, labels, self.bias, bank, self.shard,
                                            bank_valid=valid, gathered=True, **opts)
        else:
            bank, valid = self._bank_for_loss(x, self.bias)
            self._maybe_init_bias(x, labels, bank, None, valid)
            with _no_autocast(x.device):
                loss = fused_uss_loss(x, labels, self.bias, bank, None, valid, **opts)
        self._update_bank(x, labels)
        return loss

    def extra_repr(self) -> str:
        size = (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                if self.mode == "bank" else "")
        return (f"{size}mode={self.mode!r}, scale={self.scale}, margin={self.margin}, "
                f"form={self.form!r}, official_clamp={self.official_clamp}, "
                f"backend={self.backend!r}{_shard_repr(self)}")


class UniTSFaceHead(_UnifiedThreshold, _MemoryBank):
    """The UniTSFace training head (Li et al., NeurIPS 2023): CosFace/ArcFace softmax over
    the class centres (with partial FC when sample_rate < 1) plus λ·USS against a memory bank
    of the last feature of every class, computed in one fused pass; returns the loss.

        head = UniTSFaceHead(512, num_classes)
        loss = head(backbone(images), labels, with_uss=epoch > 0)   # official schedule
        same = head.verify(emb_a, emb_b)                            # cos > head.threshold

    Parameters: ``weight`` (C×D class centres, initialised as the official code does:
    ``kaiming_normal_(a=1, mode="fan_in")``, i.e. normal(0, 1/√D)) and ``bias`` (b, starting
    at 0). Buffers: ``bank`` (C×D, ``bank_dtype``) and ``bank_valid`` (C, bool). See the
    module docstring for the dtype policy, the bank update and the initialisation of b.

    Args:
        sample_rate: partial-FC rate; training steps use int(rate·C) classes (the batch's and
            random others) for both the softmax and USS; eval mode uses all classes.
        scale, margin_cos, margin_arc: s and the CosFace m3 (0.4, UniTSFace's) / ArcFace m2.
        uss_margin, uss_form, uss_weight: USS's positive margin m, "pairs" (official) or
            "lse", and its weight λ.
        class_parallel, process_group: class-parallel training under torch.distributed
            (None: automatic when initialised with several ranks; see the module docstring):
            this rank then holds the rows [class_start, class_start + num_local) of weight and
            bank, and samples int(sample_rate·num_local) classes of its shard per step.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, sample_rate: float = 1.0,
                 scale: float = 64.0, margin_cos: float = 0.4, margin_arc: float = 0.0,
                 uss_margin: float = 0.1, uss_form: str = "pairs", uss_weight: float = 1.0,
                 bank_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 class_parallel: Optional[bool] = None, process_group=None):
        super().__init__()
        _setup_classes(self, embedding_size, num_classes, sample_rate, class_parallel,
                       process_group)
        self.margin_cos = float(margin_cos)
        self.margin_arc = float(margin_arc)
        self.uss_margin = float(uss_margin)
        self.uss_form = _choice(uss_form, FORMS, "uss_form")
        self.uss_weight = float(uss_weight)
        self.backend = _choice(backend, BACKENDS, "backend")
        self._init_threshold(scale)
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        self._init_bank(self.num_local, self.embedding_size, bank_dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: kaiming normal with a=1, fan_in (std 1/√D); b = 0; empty bank."""
        nn.init.kaiming_normal_(self.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
        with torch.no_grad():
            self.bias.zero_()
        self.reset_bank()

    def forward(self, x: Tensor, labels: Tensor, with_uss: bool = True) -> Tensor:
        labels = _flat_labels(labels)
        if self.shard is not None:
            return self._forward_sharded(x, labels, with_uss)
        index = _partial_fc_index(self, labels)
        weight = _as(self.weight, x.dtype)
        common = dict(scale=self.scale, margin_arc=self.margin_arc, margin_cos=self.margin_cos,
                      index=index, backend=self.backend)
        if with_uss:
            bank, valid = self._bank_for_loss(x, self.weight, self.bias)
            if index is None:
                self._maybe_init_bias(x, labels, bank, None, valid)
            else:  # the reference rows that this step's loss uses: the sampled classes
                self._maybe_init_bias(x, labels, bank[index], index, valid[index])
            with _no_autocast(x.device):
                loss = fused_unitsface_loss(
                    x, labels, weight, bank, self.bias, bank_valid=valid,
                    uss_margin=self.uss_margin, uss_form=self.uss_form,
                    uss_weight=self.uss_weight, **common)
        else:
            with _no_autocast(x.device):
                loss = fused_margin_softmax_loss(x, weight, labels, **common)
            loss = loss + 0.0 * self.bias.sum()  # b takes part (zero gradient): DDP-friendly
        self._update_bank(x, labels)
        return loss

    def _forward_sharded(self, x: Tensor, labels: Tensor, with_uss: bool) -> Tensor:
        """Class-parallel: the loss over every rank's batch from this rank's class shard."""
        x_all, y_all = gather_batch(x, labels, self.shard)
        index = _shard_index(self, y_all)
        weight = _as(self.weight, x_all.dtype)
        common = dict(scale=self.scale, margin_arc=self.margin_arc, margin_cos=self.margin_cos,
                      index=index, backend=self.backend, gathered=True)
        if with_uss:
            bank, valid = self._bank_for_loss(x_all, self.weight, self.bias)
            self._maybe_init_bias_sharded(x_all, y_all, bank, valid, index)
            with _no_autocast(x.device):
                loss = distributed.unitsface_loss(
                    x_all, y_all, weight, bank, self.bias, self.shard, bank_valid=valid,
                    uss_margin=self.uss_margin, uss_form=self.uss_form,
                    uss_weight=self.uss_weight, **common)
        else:
            with _no_autocast(x.device):
                loss = distributed.margin_softmax_loss(x_all, weight, y_all, self.shard,
                                                       **common)
            loss = loss + 0.0 * self.bias.sum()
        self._update_bank(x_all, y_all)
        return loss

    # --------------------------------------------------------------- the official checkpoint

    _OFFICIAL = {"weight": "sample_to_class_loss.weight",
                 "feat_mem": "sample_to_sample_loss.feat_mem",
                 "bias": "sample_to_sample_loss.bias"}

    @staticmethod
    def _official_key(state_dict: Mapping[str, Tensor], full: str, short: str) -> Optional[str]:
        hits = [k for k in state_dict if k == full or k.endswith("." + full)]
        if len(hits) > 1:
            raise ValueError(f"state_dict has several {full!r} entries: {hits}")
        if hits:
            return hits[0]
        return short if short in state_dict else None

    @torch.no_grad()
    def load_official(self, state_dict: Mapping[str, Tensor]) -> "UniTSFaceHead":
        """Load the head of the official UniTSFace code (CVI-SZU/UniTSFace): the tensors
        ``sample_to_class_loss.weight`` (C×D), ``sample_to_sample_loss.feat_mem`` (C×D, raw
        features) and ``sample_to_sample_loss.bias`` (b), with any prefix (e.g. ``module.``
        of DataParallel) or none (``weight``, ``feat_mem``, ``bias``). A training checkpoint
        ``{"state_dict": ...}`` is unwrapped. The bank stores the normalised rows of
        ``feat_mem``; rows with a zero (or non-finite) norm stay invalid. The weight is
        required; a missing feat_mem or bias leaves that part as it is. Returns self.
        A class-parallel head takes the full C×D tensors (and keeps its shard's rows) or
        its shard's rows.
        """
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
            state_dict = state_dict["state_dict"]
        keys = {short: self._official_key(state_dict, full, short)
                for short, full in self._OFFICIAL.items()}
        if keys["weight"] is None:
            raise KeyError("state_dict has no 'sample_to_class_loss.weight' (or 'weight') entry")
        weight = self._shard_rows(state_dict[keys["weight"]])
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"{keys['weight']} has shape {tuple(weight.shape)}, this head's "
                             f"weight is {tuple(self.weight.shape)}")
        feat = None
        if keys["feat_mem"] is not None:
            feat = self._shard_rows(state_dict[keys["feat_mem"]])
            if tuple(feat.shape) != tuple(self.bank.shape):
                raise ValueError(f"{keys['feat_mem']} has shape {tuple(feat.shape)}, this "
                                 f"head's bank is {tuple(self.bank.shape)}")
        bias = None
        if keys["bias"] is not None:
            bias = state_dict[keys["bias"]]
            if bias.numel() != 1:
                raise ValueError(
                    f"{keys['bias']} holds {bias.numel()} values; UniTSFaceHead learns one "
                    "unified threshold (the per-class bias of the official "
                    "Sample_to_Sample_Based_BCE_Loss is not supported)")
        self.weight.copy_(weight.to(self.weight))
        if bias is not None:
            self.bias.copy_(bias.reshape(1).to(self.bias))
        if feat is not None:
            feat = feat.to(device=self.bank.device, dtype=torch.float64)
            norm = feat.norm(dim=1)
            valid = torch.isfinite(feat).all(dim=1) & (norm > 0)
            rows = torch.where(valid[:, None], F.normalize(torch.nan_to_num(feat), dim=1,
                                                          eps=reference.EPS), 0.0)
            self.bank.copy_(rows.to(self.bank.dtype))
            self.bank_valid.copy_(valid)
        return self

    def _shard_rows(self, t: Tensor) -> Tensor:
        """A full C×D checkpoint tensor → this shard's rows (class-parallel heads)."""
        if (self.shard is not None and t.dim() == 2 and t.shape[0] == self.num_classes
                and self.num_local != self.num_classes):
            return t[self.shard.start:self.shard.stop]
        return t

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, scale={self.scale}, "
                f"margin_cos={self.margin_cos}, margin_arc={self.margin_arc}, "
                f"uss_margin={self.uss_margin}, uss_form={self.uss_form!r}, "
                f"uss_weight={self.uss_weight}, bank_dtype={self.bank.dtype}, "
                f"backend={self.backend!r}{_shard_repr(self)}")


def _shard_repr(module) -> str:
    shard = getattr(module, "shard", None)
    return "" if shard is None else f", shard=[{shard.start}, {shard.stop})"
