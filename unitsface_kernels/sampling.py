"""Partial-FC class sampling (An et al., CVPR 2022; docs/design.md §1.2)."""

from __future__ import annotations

import torch

from . import validation as check


def sample_classes(labels, num_classes, num_sample, generator=None, *, fixed_size=False):
    """Every class present in `labels` plus uniformly random others, as a sorted int64 index
    on the labels' device; all classes when num_sample ≥ num_classes. Reproducible under
    `generator` (on any device). `num_classes` and `num_sample` are positive integers.

    The size |S|:

    * ``fixed_size=False`` (default): max(#classes of the batch, num_sample) — a batch with
      more distinct classes than num_sample gets them all. The count is read back with the
      label check (one host synchronisation).
    * ``fixed_size=True``, and always in the async checks mode (:class:`unitsface_kernels.checks`,
      or while a CUDA graph is captured): exactly min(num_classes, num_sample), with no host
      synchronisation. A batch with more distinct classes than that is an error: a ValueError
      in the eager checks mode, a failed ``torch._assert_async`` in the async one.

    Whenever the batch has at most num_sample classes both give the same index for the same
    random state: every class gets a uniform score in [0, 1), the batch's classes score 2, and
    S is the top |S| scores, sorted. A generator on another device than the labels' costs a
    copy of the scores (for a captured call: no generator, or one on the labels' device)."""
    labels = check.tensor(labels, "labels")
    if labels.dtype not in check.INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    num_classes = check.count(num_classes, "num_classes")
    num_sample = check.count(num_sample, "num_sample")
    fixed_size = check.flag(fixed_size, "fixed_size")
    labels = labels.reshape(-1).to(torch.int64)
    values = check.ValueChecks()
    values.label_range(labels, num_classes, "labels", "class ids")
    # an out-of-range label fails the check above; clamped, it cannot fault the scatter first
    positive = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    positive.index_fill_(0, labels.clamp(0, num_classes - 1), True)
    count = positive.sum()
    k = min(num_classes, num_sample)
    if values.asynchronous or fixed_size:
        def verdict(n):
            raise ValueError(f"labels hold {n} distinct classes but num_sample = {k}: a "
                             "fixed-size partial-FC sample must hold every class of the batch")

        values.at_most(count, k, f"labels must hold at most num_sample = {k} distinct classes "
                       "(a fixed-size partial-FC sample holds every class of the batch)",
                       verdict)
        values.run()
    else:
        values.read(count)
        k = min(num_classes, max(num_sample, values.run()[0]))
    device = generator.device if generator is not None else labels.device
    scores = torch.rand(num_classes, generator=generator, device=device).to(labels.device)
    scores = torch.where(positive, 2.0, scores)
    return torch.topk(scores, k, sorted=False).indices.sort().values
