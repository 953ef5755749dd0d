"""Class-parallel training over torch.distributed (docs/design.md §2): insightface's PartialFC_V2 +
DistCrossEntropy structure, without their B_global × C_local logit matrix.

Rank r of w owns the classes [start, stop) — insightface's split,
num_local = C // w + (r < C % w), start = C // w · r + min(r, C % w) — for the class centres,
the memory bank and a per-class threshold. One training step:

1. The embeddings and labels of all ranks are all-gathered (after an all-gather of their
   shapes, so that mismatched batches fail with a clear error on every rank instead of
   hanging); the gather is autograd-aware.
2. Every rank runs the per-row forward op of a backend (the fused ``triton``/``native`` ops of
   :mod:`unitsface_kernels.contract`, or the eager per-op forms of
   :mod:`unitsface_kernels.reference`) on its
   shard, with local labels (y − start, or −1 for a class of another shard: no target there,
   z_iy = 0). It returns per-row *partial* statistics.
3. The partials are combined with two all-reduces of O(B_global) numbers: MAX, then SUM of
   exp(stat − max) for the log-sum-exps (softmax lse, USS A and B) packed with the plain
   sums (target logit, USS pair sums). Every rank then holds the global per-row losses, and
   the loss is the global mean on every rank.
4. Backward: every rank calls the backward op with the GLOBAL statistics (global lse; for USS
   lse the global A, σ(A), B, σ(B)), which gives exactly ∂L/∂W_shard (and ∂L/∂b_shard for a
   per-class threshold) and this shard's part of ∂L/∂x_global. The x parts are summed over
   ranks (reduce-scatter on NCCL, all-reduce elsewhere) and each rank keeps its rows, scaled
   by w: the gradient reaching a rank's embeddings is w·∂L/∂x_local, insightface's
   convention, so that a DDP-wrapped backbone (which averages) ends with ∂L/∂θ. A replicated
   (scalar) threshold b gets the full ∂L/∂b on every rank (all-reduce), so ranks never drift.

Nothing of size B_global × C_local exists with a fused backend; the ``reference`` backend is the
eager statement of the same per-shard op (it materialises B_global × C_local cosines, like the
single-process reference) and works wherever torch does — CPU training without the compiled
extension, and the tests' second opinion.

Entry points: :class:`ClassShard`; :func:`gather_batch`; :func:`margin_softmax_loss`,
:func:`uss_loss`, :func:`unitsface_loss` (also reached through ``shard=`` of the public
``fused_*`` functions); :func:`shard_uss_bias_init`, :func:`shard_bank_update_` and
:meth:`ClassShard.sample` for the modules' threshold, memory bank and partial FC; the
internal entries ``run_shard_*`` of :mod:`.losses`, which the modules call with their
settings object and their checked, gathered batch.

Layout: :mod:`.shard` (shard geometry), :mod:`.collectives` (the gather and the cross-rank
agreement on inputs), :mod:`.statistics` (combining the partial statistics), :mod:`.losses`
(the losses themselves).
"""

from .collectives import gather_batch
from .losses import (margin_softmax_loss, shard_bank_update_, shard_uss_bias_init,
                     unitsface_loss, uss_loss)
from .shard import ClassShard, split_classes

__all__ = ["ClassShard", "split_classes", "gather_batch", "margin_softmax_loss", "uss_loss",
           "unitsface_loss", "shard_uss_bias_init", "shard_bank_update_"]
