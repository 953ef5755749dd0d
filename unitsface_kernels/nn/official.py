"""The other heads of the official UniTSFace code (CVI-SZU/UniTSFace, head.py) as modules, with
the official initialisations (the README's table lists each with its function):

* :class:`NormalizedBCE` — ``Normalized_BCE_Loss``: one threshold per class, init log(10·C);
* :class:`UnifiedCrossEntropy` — ``Unified_Cross_Entropy_Loss``: one threshold, init log(10·C);
* :class:`SampleToSampleSoftmax` — ``Sample_to_Sample_Based_Softmax_Loss``: the CosFace
  softmax over the memory bank (m = 0.1);
* :class:`SampleToSampleBCE` — ``Sample_to_Sample_Based_BCE_Loss``: one threshold per bank
  row, shifted by the official b₀ while their mean is ≤ 0.

The unified threshold's head is :class:`~unitsface_kernels.nn.USSLoss`, the normalised
softmax :class:`~unitsface_kernels.nn.PartialFC` (or ``UniTSFaceHead(..., with_uss=False)``).
Like the official heads they default to ``official_clamp=True``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import distributed, options
from .. import validation as check
from ..backends import BACKENDS
from ..distributed import gather_batch
from ..ops import fused_margin_softmax_loss, fused_uss_loss, uss_bias_init
from . import checkpoint
from .parts import (MemoryBank, Threshold, checked_batch, no_autocast, readable,
                    resolve_backend, setup_classes, shard_repr)


class _CentreBCE(checkpoint.Official, Threshold):
    """Per-pair BCE against the class centres W (the USS formulas with ref = W, l_c = c):
    Σ_c softplus(b_c − s(cos_ic − m)) [c = y_i] + softplus(s·cos_ic − b_c) [c ≠ y_i].
    Single-process (under DDP it is replicated like any module)."""

    per_class: bool

    OFFICIAL = (checkpoint.CENTRES, checkpoint.CENTRE_BIAS)

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.4, official_clamp: bool = True, backend: str = "auto"):
        super().__init__()
        options.uss_options(scale=scale, margin=margin, form="pairs",
                            official_clamp=official_clamp)  # checks the settings
        self.scale, self.margin, self.official_clamp = scale, margin, official_clamp
        self.backend = check.choice(backend, BACKENDS, "backend")
        self.embedding_size = check.count(embedding_size, "embedding_size")
        self.num_classes = check.count(num_classes, "num_classes")
        self.shard = None
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self._init_threshold(self.num_classes if self.per_class else 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: W kaiming normal (a=1, fan_in); every b = log(10·C)."""
        nn.init.kaiming_normal_(self.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
        with torch.no_grad():
            self.bias.fill_(math.log(10 * self.num_classes))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x, labels = checked_batch(self, x, labels)
        resolve_backend(self, x.device, "uss")
        with no_autocast(x.device):
            return fused_uss_loss(x, labels, self.bias, readable(self.weight, x.dtype),
                                  scale=self.scale, margin=self.margin,
                                  official_clamp=self.official_clamp, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"scale={self.scale}, margin={self.margin}, "
                f"official_clamp={self.official_clamp}, backend={self.backend!r}")


class NormalizedBCE(_CentreBCE):
    """The official ``Normalized_BCE_Loss``: per-pair BCE against the class centres with one
    learnable threshold b_c per class (``bias``, C values, init log(10·C)), m = 0.4."""

    per_class = True


class UnifiedCrossEntropy(_CentreBCE):
    """The official ``Unified_Cross_Entropy_Loss``: per-pair BCE against the class centres with
    one learnable unified threshold (``bias``, init log(10·C)), m = 0.4; its cosine threshold
    is ``threshold`` = b / s."""

    per_class = False


class _BankHead(checkpoint.Official, Threshold, MemoryBank):
    """A sample-to-sample head on a class-sharded memory bank (see the package docstring)."""

    def _init_classes(self, embedding_size, num_classes, bank_dtype, backend, class_parallel,
                      process_group) -> None:
        self.backend = check.choice(backend, BACKENDS, "backend")
        setup_classes(self, embedding_size, num_classes, class_parallel, process_group)
        self._init_bank(self.num_local, self.embedding_size, bank_dtype)

    def _batch_and_bank(self, x: Tensor, labels: Tensor, family: str):
        """The checked batch (gathered over the ranks when sharded) and the bank as the loss
        reads it."""
        x, labels = checked_batch(self, x, labels)
        resolve_backend(self, x.device, family)
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
        bank, valid = self._bank_for_loss(x.dtype)
        return x, labels, bank, valid

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"scale={self.scale}, margin={self.margin}, backend={self.backend!r}"
                f"{shard_repr(self)}")


class SampleToSampleSoftmax(_BankHead):
    """The official ``Sample_to_Sample_Based_Softmax_Loss``: the CosFace softmax of the batch
    against the memory bank (s·cos, margin m = 0.1 on the own class's row), the bank updated
    after the loss. Every bank row takes part, as in the official head (whose memory is never
    masked): a row never written is zero, i.e. a logit of 0."""

    OFFICIAL = (checkpoint.FEAT_MEM,)

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.1, bank_dtype: torch.dtype = torch.float32,
                 backend: str = "auto", class_parallel: Optional[bool] = None,
                 process_group=None):
        super().__init__()
        options.softmax_options(scale=scale, margin_arc=0.0, margin_cos=margin,
                                arcface_grad="exact", easy_margin=False)  # checks
        self.scale, self.margin = scale, margin
        self._init_classes(embedding_size, num_classes, bank_dtype, backend, class_parallel,
                           process_group)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x, labels, bank, _ = self._batch_and_bank(x, labels, "unitsface")
        kw = dict(scale=self.scale, margin_cos=self.margin, backend=self.backend)
        with no_autocast(x.device):
            if self.shard is not None:
                loss = distributed.margin_softmax_loss(x, bank, labels, self.shard, gathered=True,
                                                       **kw)
            else:
                loss = fused_margin_softmax_loss(x, bank, labels, **kw)
        return self._update_bank(x, labels, loss, (x,))


class SampleToSampleBCE(_BankHead):
    """The official ``Sample_to_Sample_Based_BCE_Loss``: per-pair BCE of the batch against the
    memory bank with one learnable threshold per bank row (``bias``, starting at 0; while their
    mean is ≤ 0 in training mode, every b_j is shifted by the official
    b₀ = mean_i lse_{N_i}(s·cos_ij) — over the valid rows here, the official head having no
    validity), m = 0.1, the official clamp by default."""

    OFFICIAL = (checkpoint.FEAT_MEM, checkpoint.BANK_BIAS)

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.1, official_clamp: bool = True,
                 bank_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 class_parallel: Optional[bool] = None, process_group=None):
        super().__init__()
        options.uss_options(scale=scale, margin=margin, form="pairs",
                            official_clamp=official_clamp)  # checks the settings
        self.scale, self.margin, self.official_clamp = scale, margin, official_clamp
        self._init_classes(embedding_size, num_classes, bank_dtype, backend, class_parallel,
                           process_group)
        self._init_threshold(self.num_local)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x, labels, bank, valid = self._batch_and_bank(x, labels, "uss")
        kw = dict(scale=self.scale, margin=self.margin, official_clamp=self.official_clamp,
                  backend=self.backend)
        if self.shard is not None:
            self._maybe_init_threshold(lambda: distributed.uss_bias_init(
                x, labels, bank, self.shard, bank_valid=valid, scale=self.scale,
                backend=self.backend, gathered=True), add=True)
            with no_autocast(x.device):
                loss = distributed.uss_loss(x, labels, self.bias, bank, self.shard,
                                            bank_valid=valid, gathered=True, **kw)
        else:
            self._maybe_init_threshold(lambda: uss_bias_init(
                x.detach(), labels, bank, None, valid, scale=self.scale, backend=self.backend),
                add=True)
            with no_autocast(x.device):
                loss = fused_uss_loss(x, labels, self.bias, bank, None, valid, **kw)
        return self._update_bank(x, labels, loss, (x, self.bias))
