"""Drop-in modules over the fused losses (docs/design.md §4): :class:`UniTSFaceHead` (the whole
UniTSFace head: margin softmax + USS on a memory bank, with a learnable unified threshold),
:class:`PartialFC` (the sample-to-class part alone, shaped like insightface's PartialFC_V2,
and :meth:`PartialFC.from_insightface` for arcface_torch's CombinedMarginLoss),
:class:`USSLoss` (the sample-to-sample part alone, memory-bank or in-batch), and the other
official heads (:class:`NormalizedBCE`, :class:`UnifiedCrossEntropy`,
:class:`SampleToSampleSoftmax`, :class:`SampleToSampleBCE`). Each loads its official
checkpoint with ``load_official``.

Conventions shared by the modules:

* **Settings and checks.** Settings are checked once, when a module is built, into its op
  family's settings object ``options`` (:mod:`unitsface_kernels.options`; the attributes
  ``scale``, ``margin_cos``, ``eps``, … read it). A call checks its embeddings and labels
  against the module (its ``embedding_size``, its ``num_classes``, the forward's own argument
  names) and resolves its backend once, before anything changes — a call that raises changes
  no threshold, bank or parameter — then hands the checked batch and ``options`` down to the
  kernels, checking nothing again (:mod:`.calls`).
* **Normalisation.** ``eps`` (x̂ = x / max(‖x‖, eps)) defaults to the official heads' 1e-5;
  ``PartialFC.from_insightface`` and ``PartialFC.from_pml`` carry their library's 1e-12.
  The heads on a memory bank take eps ≤ 1e-5 (docs/design.md §1.4).
* **Precision.** The losses are computed in the dtype of the embeddings ``x``: under
  ``torch.autocast`` a bf16/fp16 backbone output makes the head's class-centre and bank GEMMs
  run in bf16/fp16 (what ``F.linear`` does in insightface's PartialFC_V2 under autocast), while
  the parameters stay float32 masters. The kernels read ``weight`` (and a bank of another
  16/32-bit dtype) in place, rounding each element to ``x.dtype`` as they load it — the same
  result as a cast copy, without the copy — and the weight's gradient comes back in float32.
  The loss is float32, accumulation is float32 inside every backend, and autocast is switched
  off around the call so that it cannot lower the precision of the eager reference any
  further. Feed float32 embeddings (``x.float()``) to get a float32 head under autocast.
* **Memory bank.** One row per class holding the last feature seen for it, as
  :func:`~unitsface_kernels.bank_update_` stores it (``bank``, dtype ``bank_dtype``), and
  ``bank_valid`` marking rows written with a finite feature; rows never written take no part
  in the losses with a validity mask. In training mode the bank is updated with the batch
  *after* the loss is computed (the official order; the last occurrence of a label wins);
  in eval mode it is left alone (like BatchNorm's running statistics). The losses read the
  bank in place and the fused backends keep it for their backward pass, so a step's update is
  deferred until its backward has run (or the bank is next read: see :class:`.parts.MemoryBank`)
  — no copy of the bank is made per step.
* **Thresholds.** ``bias`` is the learnable b (one value; per class or per bank row for the
  official per-class BCE heads); the cosine threshold of a unified threshold is
  ``threshold = b / scale``, and ``verify(a, b)`` tells same-identity pairs by it. In training
  mode, while b ≤ 0 (its mean), the heads on a memory bank or on the batch start b from the
  data as the official code does: b₀ = mean_i logsumexp_{j∈N_i}(s·cos_ij) over the reference
  rows the loss uses (the valid bank rows of the sampled classes, or the batch itself in
  in-batch mode). When there is no negative yet (an empty bank) b is left alone and the next
  call tries again. The heads on class centres start at the official log(10·C).
* **Margins of the family.** :class:`PartialFC` and :class:`UniTSFaceHead` take ``margin=``
  (:func:`unitsface_kernels.margins.margin`: sub-center ArcFace, inter-class filtering,
  CurricularFace, AdaFace, MagFace, ElasticFace; docs/design.md §1.5): K sub-centres make
  ``weight`` (C·K) × D, and the moving statistics are persistent buffers, updated in training
  mode and frozen in eval mode (:class:`.margin.MarginHead`).
* **Official behaviour.** The modules are the official heads: the USS-type ones default to
  ``official_clamp=True`` (each softplus argument clamped to [−s, s], as head.py does); the
  functions keep ``official_clamp=False``.
* **Compilation.** The loss functions are custom ops, so ``torch.compile`` (non-fullgraph)
  traces them; the partial-FC sampling, the ``b ≤ 0`` test and the bank update are excluded
  from the graph (``torch.compiler.disable``: clean graph breaks). When USS is off, ``bias``
  still gets a (zero) gradient, so DDP never sees an unused parameter.
* **Host synchronisations.** A module call reads values back to the host for its own label
  check, the ``b ≤ 0`` test (training mode), partial-FC sampling (its size depends on the
  batch's classes) and the loss function's checks: a few per call, each a small read.
* **Class-parallel training** (insightface's PartialFC_V2 layout, :mod:`..distributed`). When
  torch.distributed is initialised with more than one rank (or ``class_parallel=True``), the
  memory-bank and class-centre modules shard the classes: rank r holds only the rows
  [class_start, class_start + num_local) of ``weight``, ``bank``, ``bank_valid`` and
  per-class thresholds (insightface's split). Each call all-gathers the ranks' embeddings and
  labels, returns the loss over the global batch (the same value on every rank), samples
  partial FC from the rank's own shard, and writes the bank rows of its shard from the
  gathered batch. Gradients: ``weight`` gets exactly ∂L/∂W of its rows, a unified ``bias``
  the full ∂L/∂b on every rank, and the embeddings w·∂L/∂x (insightface's convention) — so
  wrap the *backbone only* in DDP (which averages), never the head: its parameters are
  shards, not replicas. ``state_dict`` holds the shard. ``class_parallel=False`` keeps a
  replicated single-process head under DDP: wrap backbone and head together, with
  ``broadcast_buffers=False`` so that each rank keeps the bank of the features it saw.
  In-batch ``USSLoss`` and the class-centre BCE heads are never sharded.
"""

from .heads import PartialFC, UniTSFaceHead, USSLoss
from .official import NormalizedBCE, SampleToSampleBCE, SampleToSampleSoftmax, UnifiedCrossEntropy
from .parts import pair_cosine

__all__ = ["UniTSFaceHead", "PartialFC", "USSLoss", "NormalizedBCE", "UnifiedCrossEntropy",
           "SampleToSampleSoftmax", "SampleToSampleBCE", "pair_cosine"]
