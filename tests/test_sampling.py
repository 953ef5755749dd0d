"""Fixed-size partial-FC sampling (docs/design.md §1.2, §5): exactly min(C, num_sample) classes
holding every class of the batch, with no host synchronisation; the same index as the default
rule whenever the batch has at most num_sample classes; the error when it has more, raised in
the eager checks mode and asserted on the device in the async one."""

from __future__ import annotations

import pytest
import torch

import unitsface_kernels as uk
from unitsface_kernels import sample_classes


@pytest.mark.parametrize("mode", ["eager", "async"])
def test_fixed_size_holds_every_positive_sorted_unique(mode):
    g = torch.Generator().manual_seed(0)
    with uk.checks(mode):
        for c, k, b in ((1000, 100, 64), (200_000, 80, 64), (37, 37, 50), (37, 60, 5)):
            labels = torch.randint(0, c, (b,), generator=g)
            index = sample_classes(labels, c, k, generator=g, fixed_size=True)
            assert index.dtype == torch.int64 and index.numel() == min(c, k)
            assert bool((index[1:] > index[:-1]).all())
            assert bool(torch.isin(labels, index).all())


def test_async_mode_samples_the_fixed_size():
    """In the async checks mode the default call is the fixed-size one."""
    labels = torch.tensor([4, 9, 9])
    with uk.checks("async"):
        a = sample_classes(labels, 50, 10, generator=torch.Generator().manual_seed(3))
    b = sample_classes(labels, 50, 10, generator=torch.Generator().manual_seed(3),
                       fixed_size=True)
    assert torch.equal(a, b) and a.numel() == 10


def test_equals_the_default_rule_where_defined():
    """Same random state, at most num_sample classes in the batch: the same index, element for
    element, as the data-dependent default."""
    g = torch.Generator().manual_seed(2)
    for draw in range(50):
        c = int(torch.randint(2, 300, (1,), generator=g))
        k = int(torch.randint(1, c + 5, (1,), generator=g))
        labels = torch.randint(0, c, (int(torch.randint(1, k + 1, (1,), generator=g)),),
                               generator=g)
        if labels.unique().numel() > k:
            continue
        seed = 100 + draw
        eager = sample_classes(labels, c, k, generator=torch.Generator().manual_seed(seed))
        fixed = sample_classes(labels, c, k, generator=torch.Generator().manual_seed(seed),
                               fixed_size=True)
        assert torch.equal(eager, fixed), draw


def test_reproducible_under_a_generator():
    labels = torch.tensor([0, 1, 7])
    runs = [sample_classes(labels, 500, 40, generator=torch.Generator().manual_seed(11),
                           fixed_size=True) for _ in range(2)]
    assert torch.equal(*runs)
    other = sample_classes(labels, 500, 40, generator=torch.Generator().manual_seed(12),
                           fixed_size=True)
    assert not torch.equal(runs[0], other)


def test_uniform_over_the_other_classes():
    """Chi-square test of the non-positive picks over many draws on a small C: each of the
    C − P other classes is picked with probability (k − P)/(C − P); the statistic stays
    below the 99.9 % quantile of χ²(C − P − 1) (a fixed generator: the test is deterministic)."""
    c, k = 40, 12
    labels = torch.tensor([3, 3, 17])  # two positives
    g = torch.Generator().manual_seed(5)
    draws = 4000
    counts = torch.zeros(c, dtype=torch.float64)
    for _ in range(draws):
        counts[sample_classes(labels, c, k, generator=g, fixed_size=True)] += 1
    assert counts[3] == counts[17] == draws
    others = torch.cat([counts[:3], counts[4:17], counts[18:]])
    expected = draws * (k - 2) / (c - 2)
    chi2 = float(((others - expected) ** 2 / expected).sum())
    # χ²(37) at 0.999 is 69.3; a sampler biased by 5 % on one class in ten gives ~ 90 here
    assert chi2 < 69.3, chi2
    assert abs(float(others.sum()) - draws * (k - 2)) == 0


def test_more_classes_than_the_sample_eager_error():
    labels = torch.arange(12)
    with pytest.raises(ValueError, match=r"labels hold 12 distinct classes but num_sample = 10"):
        sample_classes(labels, 50, 10, fixed_size=True)
    # the default rule grows the sample instead
    assert torch.equal(sample_classes(labels, 50, 10), labels)


def test_more_classes_than_the_sample_async_assert():
    """Async mode: a torch._assert_async, which on CPU tensors raises at once (on CUDA it fails
    the stream later)."""
    with uk.checks("async"), pytest.raises(RuntimeError, match="at most num_sample = 10"):
        sample_classes(torch.arange(12), 50, 10)


def test_label_range_in_both_modes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\).*labels\[1\] = 50"):
        sample_classes(torch.tensor([1, 50]), 50, 10, fixed_size=True)
    with uk.checks("async"), pytest.raises(RuntimeError, match=r"labels must lie in \[0, 50\)"):
        sample_classes(torch.tensor([1, 50]), 50, 10)


def test_checks_mode_setting(monkeypatch):
    """checks(mode) sets the mode now, and restores the previous one when used as a context
    manager; a bad mode names the argument; CUDA graph capture forces async."""
    from unitsface_kernels import validation

    assert validation.check_mode() == "eager"
    with uk.checks("async"):
        assert validation.check_mode() == "async"
        with uk.checks("eager"):
            assert validation.check_mode() == "eager"
        assert validation.check_mode() == "async"
    assert validation.check_mode() == "eager"
    with pytest.raises(ValueError, match="mode must be one of 'eager', 'async'"):
        uk.checks("lazy")
    assert validation.check_mode() == "eager"
    try:
        uk.checks("async")
        assert validation.check_mode() == "async"
    finally:
        uk.checks("eager")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert validation.check_mode() == "async"
