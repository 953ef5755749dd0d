"""Partial-FC class sampling (An et al., CVPR 2022; docs/design.md §1.2)."""

from __future__ import annotations

import torch

from . import validation as check


def sample_classes(labels, num_classes, num_sample, generator=None):
    """Every class present in `labels` plus uniformly random others, `num_sample` classes in
    all (all positives when they alone exceed it, all classes when num_sample ≥ num_classes),
    as a sorted int64 index on the labels' device. Reproducible under `generator` (on any
    device). `num_classes` and `num_sample` are positive integers."""
    labels = check.tensor(labels, "labels")
    if labels.dtype not in check.INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    num_classes = check.count(num_classes, "num_classes")
    num_sample = check.count(num_sample, "num_sample")
    labels = labels.reshape(-1).to(torch.int64)
    check.label_range(labels, num_classes, "labels", "class ids")
    return draw_classes(labels, num_classes, num_sample, generator)


def draw_classes(labels, num_classes: int, num_sample: int, generator=None):
    """:func:`sample_classes` of checked arguments (int64 labels in [0, num_classes)): what
    the modules call with the batch they checked."""
    positives = torch.unique(labels)
    k = min(num_classes, max(num_sample, positives.numel()))
    # random scores in [0, 1) for all classes; positives get 2 so that top-k keeps them all
    device = generator.device if generator is not None else labels.device
    scores = torch.rand(num_classes, generator=generator, device=device).to(labels.device)
    scores[positives] = 2.0
    return torch.topk(scores, k, sorted=False).indices.sort().values
