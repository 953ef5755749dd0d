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
Like the official heads they default to ``official_clamp=True``, and to the official
normalisation eps 1e-5 (``eps``; at most 1e-5 for the heads on a memory bank,
docs/design.md §1.4). Each holds its settings object in ``options``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import options
from .. import validation as check
from ..backends import BACKENDS
from ..distributed import gather_batch
from ..options import EPS
from . import checkpoint
from .calls import (Settings, bank_eps, begin_call, call_threshold_init, call_unitsface,
                    call_uss)
from .parts import MemoryBank, Threshold, no_autocast, readable, setup_classes, shard_repr


class _CentreBCE(Settings, checkpoint.Official, Threshold):
    """Per-pair BCE against the class centres W (the USS formulas with ref = W, l_c = c):
    Σ_c softplus(b_c − s(cos_ic − m)) [c = y_i] + softplus(s·cos_ic − b_c) [c ≠ y_i].
    Single-process (under DDP it is replicated like any module)."""

    per_class: bool

    OFFICIAL = (checkpoint.CENTRES, checkpoint.CENTRE_BIAS)
    SETTINGS = ("scale", "margin", "official_clamp", "eps")

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.4, official_clamp: bool = True, eps: float = EPS,
                 backend: str = "auto"):
        super().__init__()
        self.options = options.uss_options(scale=scale, margin=margin, form="pairs",
                                           official_clamp=official_clamp, eps=eps)
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
        x, labels, backend = begin_call(self, x, labels, "uss")
        with no_autocast(x.device):
            return call_uss(self, backend, x, labels, self.bias, readable(self.weight, x.dtype))

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"{self.settings_repr()}, backend={self.backend!r}")


class NormalizedBCE(_CentreBCE):
    """The official ``Normalized_BCE_Loss``: per-pair BCE against the class centres with one
    learnable threshold b_c per class (``bias``, C values, init log(10·C)), m = 0.4."""

    per_class = True


class UnifiedCrossEntropy(_CentreBCE):
    """The official ``Unified_Cross_Entropy_Loss``: per-pair BCE against the class centres with
    one learnable unified threshold (``bias``, init log(10·C)), m = 0.4; its cosine threshold
    is ``threshold`` = b / s."""

    per_class = False


class _BankHead(Settings, checkpoint.Official, Threshold, MemoryBank):
    """A sample-to-sample head on a class-sharded memory bank (see the package docstring)."""

    def _init_classes(self, embedding_size, num_classes, bank_dtype, backend, class_parallel,
                      process_group) -> None:
        bank_eps(self.options.eps)
        self.backend = check.choice(backend, BACKENDS, "backend")
        setup_classes(self, embedding_size, num_classes, class_parallel, process_group)
        self._init_bank(self.num_local, self.embedding_size, bank_dtype)

    def _batch_and_bank(self, x: Tensor, labels: Tensor, family: str):
        """The checked batch (gathered over the ranks when sharded), the backend, and the bank
        as the loss reads it."""
        x, labels, backend = begin_call(self, x, labels, family)
        if self.shard is not None:
            x, labels = gather_batch(x, labels, self.shard)
        bank, valid = self._bank_for_loss(x.dtype)
        return x, labels, backend, bank, valid

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"{self.settings_repr()}, backend={self.backend!r}{shard_repr(self)}")


class SampleToSampleSoftmax(_BankHead):
    """The official ``Sample_to_Sample_Based_Softmax_Loss``: the CosFace softmax of the batch
    against the memory bank (s·cos, margin m = 0.1 on the own class's row), the bank updated
    after the loss. Every bank row takes part, as in the official head (whose memory is never
    masked): a row never written is zero, i.e. a logit of 0."""

    OFFICIAL = (checkpoint.FEAT_MEM,)
    SETTINGS = ("scale", "margin", "eps")

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.1, bank_dtype: torch.dtype = torch.float32,
                 eps: float = EPS, backend: str = "auto",
                 class_parallel: Optional[bool] = None, process_group=None):
        super().__init__()
        self.options = options.softmax_options(scale=scale, margin_arc=0.0, margin_cos=margin,
                                               arcface_grad="exact", easy_margin=False,
                                               eps=eps)
        self._init_classes(embedding_size, num_classes, bank_dtype, backend, class_parallel,
                           process_group)

    def settings(self) -> dict:
        return dict(scale=self.options.scale, margin=self.options.margin_cos,
                    eps=self.options.eps)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x, labels, backend, bank, _ = self._batch_and_bank(x, labels, "unitsface")
        with no_autocast(x.device):
            loss = call_unitsface(self, backend, x, labels, bank)
        return self._update_bank(x, labels, loss, (x,))


class SampleToSampleBCE(_BankHead):
    """The official ``Sample_to_Sample_Based_BCE_Loss``: per-pair BCE of the batch against the
    memory bank with one learnable threshold per bank row (``bias``, starting at 0; while their
    mean is ≤ 0 in training mode, every b_j is shifted by the official
    b₀ = mean_i lse_{N_i}(s·cos_ij) — over the valid rows here, the official head having no
    validity), m = 0.1, the official clamp by default."""

    OFFICIAL = (checkpoint.FEAT_MEM, checkpoint.BANK_BIAS)
    SETTINGS = ("scale", "margin", "official_clamp", "eps")

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 margin: float = 0.1, official_clamp: bool = True,
                 bank_dtype: torch.dtype = torch.float32, eps: float = EPS,
                 backend: str = "auto", class_parallel: Optional[bool] = None,
                 process_group=None):
        super().__init__()
        self.options = options.uss_options(scale=scale, margin=margin, form="pairs",
                                           official_clamp=official_clamp, eps=eps)
        self._init_classes(embedding_size, num_classes, bank_dtype, backend, class_parallel,
                           process_group)
        self._init_threshold(self.num_local)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x, labels, backend, bank, valid = self._batch_and_bank(x, labels, "uss")
        self._maybe_init_threshold(lambda: call_threshold_init(self, backend, x, labels, bank,
                                                               valid), add=True)
        with no_autocast(x.device):
            loss = call_uss(self, backend, x, labels, self.bias, bank, valid)
        return self._update_bank(x, labels, loss, (x, self.bias))
