"""Fused Triton kernels and C++/CUDA ops for the UniTSFace face-recognition losses.

    from unitsface_kernels import fused_uss_loss

docs/design.md lists the public names; :mod:`unitsface_kernels.reference` holds the eager
formulas every backend is tested against.
"""

from . import contract as _contract  # noqa: F401  (defines the custom ops)
from . import margins, reference
from . import nn  # noqa: F401  (modules: UniTSFaceHead, PartialFC, USSLoss, the official heads)
from .ops import (bank_update_, fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                  sample_classes, uss_bias_init)
from .validation import checks

__all__ = ["fused_uss_loss", "fused_margin_softmax_loss", "fused_unitsface_loss",
           "sample_classes", "bank_update_", "uss_bias_init", "checks", "reference", "margins"]
__version__ = "0.1.0"
