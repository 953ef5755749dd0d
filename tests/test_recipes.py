"""The official UniTSFace code's six losses, each computed with this package's API (the recipes
of the README), against their official formulas restated densely (head.py of the official
repository: F.normalize(eps=1e-5), F.linear, one-hot masks, clamp to [−s, s], log(1 + exp))."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import all_backends
from unitsface_kernels import fused_margin_softmax_loss, fused_uss_loss

B, C, D = 24, 60, 32


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(B, D, generator=g, dtype=torch.float64),
                w=torch.randn(C, D, generator=g, dtype=torch.float64),
                feat_mem=torch.randn(C, D, generator=g, dtype=torch.float64),
                labels=torch.randint(0, C, (B,), generator=g))


def _cos(x, r):
    return F.linear(F.normalize(x, eps=1e-5), F.normalize(r, eps=1e-5))


def _official_bce(cos, labels, bias, s, m):
    """The official BCE-style heads: per-pair log(1 + exp(·)) of clamped logits."""
    one_hot = F.one_hot(labels, cos.shape[1]).bool()
    p = torch.log(1 + torch.exp(-(s * (cos - m) - bias).clamp(-s, s)))
    n = torch.log(1 + torch.exp((s * cos - bias).clamp(-s, s)))
    return (one_hot * p + (~one_hot) * n).sum(1).mean()


def _official_softmax(cos, labels, s, m):
    one_hot = F.one_hot(labels, cos.shape[1]).bool()
    return F.cross_entropy(s * (cos - one_hot * m), labels)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _check_softmax(data, backend, ref, margin, wrt):
    """The recipe fused_margin_softmax_loss(x, data[ref], labels, margin_cos=margin) against
    the official normalised softmax: loss, and the gradient of `wrt` ("x" or "ref")."""
    leaves = dict(x=data["x"].clone(), ref=data[ref].clone())
    leaves[wrt].requires_grad_()
    ours = fused_margin_softmax_loss(leaves["x"], leaves["ref"], data["labels"], scale=64.0,
                                     margin_cos=margin, backend=backend)
    official = _official_softmax(_cos(leaves["x"], leaves["ref"]), data["labels"], 64.0, margin)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(*(_grads(v, [leaves[wrt]])[0] for v in (ours, official)))


def _check_bce(data, backend, ref, bias, margin, wrt):
    """The recipe fused_uss_loss(x, labels, bias, data[ref], official_clamp=True) against the
    official BCE head: loss, and the gradients of `wrt` ("x" or "ref") and of the bias."""
    leaves = dict(x=data["x"].clone(), ref=data[ref].clone())
    leaves[wrt].requires_grad_()
    ours = fused_uss_loss(leaves["x"], data["labels"], bias, leaves["ref"], scale=64.0,
                          margin=margin, official_clamp=True, backend=backend)
    official = _official_bce(_cos(leaves["x"], leaves["ref"]), data["labels"], bias, 64.0,
                             margin)
    torch.testing.assert_close(ours, official)
    wanted = [leaves[wrt], bias]
    for a, b in zip(_grads(ours, wanted), _grads(official, wanted)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_normalized_softmax_cosface(data, backend):
    """CosFace (m3 = 0.4) over the class centres, which carry the gradient."""
    _check_softmax(data, backend, "w", 0.4, wrt="ref")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_normalized_bce(data, backend):
    """Per-class bias (1, C), initialised to log(10·C); class centres carry a gradient."""
    bias = torch.full((1, C), math.log(C * 10), dtype=torch.float64, requires_grad=True)
    _check_bce(data, backend, "w", bias, 0.4, wrt="ref")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_unified_cross_entropy(data, backend):
    """One learnable bias for all classes: the sample-to-class unified threshold."""
    bias = torch.tensor([math.log(C * 10)], dtype=torch.float64, requires_grad=True)
    _check_bce(data, backend, "w", bias, 0.4, wrt="ref")


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_sample_to_sample_softmax(data, backend):
    """The memory bank in place of the centres, margin 0.1, no gradient into the bank."""
    _check_softmax(data, backend, "feat_mem", 0.1, wrt="x")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_sample_to_sample_bce(data, backend):
    """One bias per bank row, on the memory bank, margin 0.1."""
    bias = (torch.rand(1, C, dtype=torch.float64) * 30).requires_grad_()
    _check_bce(data, backend, "feat_mem", bias, 0.1, wrt="x")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_uss(data, backend):
    """The unified threshold integrated sample-to-sample loss: one b on the memory bank."""
    bias = torch.tensor([25.0], dtype=torch.float64, requires_grad=True)
    _check_bce(data, backend, "feat_mem", bias, 0.1, wrt="x")
