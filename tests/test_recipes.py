"""The official UniTSFace code's six losses, each computed with this package's API — the
recipes of the README (functions) and the modules — against their official formulas restated
densely (head.py of the official repository: F.normalize(eps=1e-5), F.linear, one-hot masks,
clamp to [−s, s], log(1 + exp)); and PartialFC.from_insightface against arcface_torch's
CombinedMarginLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import all_backends
from unitsface_kernels import fused_margin_softmax_loss, fused_uss_loss, reference
from unitsface_kernels.nn import (NormalizedBCE, PartialFC, SampleToSampleBCE,
                                  SampleToSampleSoftmax, UnifiedCrossEntropy, USSLoss)

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
    g = torch.Generator().manual_seed(5)
    bias = (torch.rand(1, C, generator=g, dtype=torch.float64) * 30).requires_grad_()
    _check_bce(data, backend, "feat_mem", bias, 0.1, wrt="x")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_uss(data, backend):
    """The unified threshold integrated sample-to-sample loss: one b on the memory bank."""
    bias = torch.tensor([25.0], dtype=torch.float64, requires_grad=True)
    _check_bce(data, backend, "feat_mem", bias, 0.1, wrt="x")


# ----------------------------------------------------------------------------- the modules

def _official_state(data, prefix, bias=None):
    state = {f"{prefix}.weight" if prefix == "sample_to_class_loss" else f"{prefix}.feat_mem":
             data["w"] if prefix == "sample_to_class_loss" else data["feat_mem"]}
    if bias is not None:
        state[f"{prefix}.bias"] = bias
    return state


def _module_grads(loss, module, x):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x] + params)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("cls,per_class", [(NormalizedBCE, True), (UnifiedCrossEntropy, False)])
def test_class_centre_bce_modules(data, backend, cls, per_class):
    """Normalized_BCE_Loss / Unified_Cross_Entropy_Loss: the official init log(10·C), the
    checkpoint loaded, loss and gradients (x, W, b) equal to head.py's formula."""
    head = cls(D, C, backend=backend).double()
    assert head.bias.numel() == (C if per_class else 1)
    torch.testing.assert_close(head.bias.detach(),
                               torch.full_like(head.bias, math.log(10 * C)))
    g = torch.Generator().manual_seed(1)
    bias = (torch.rand(1, C if per_class else 1, generator=g, dtype=torch.float64) * 20)
    head.load_official({"module." + k: v for k, v in
                        _official_state(data, "sample_to_class_loss", bias).items()})
    x = data["x"].clone().requires_grad_()
    ours = head(x, data["labels"])
    w = data["w"].clone().requires_grad_()
    b = bias.reshape(-1).clone().requires_grad_()
    xo = data["x"].clone().requires_grad_()
    official = _official_bce(_cos(xo, w), data["labels"], b, 64.0, 0.4)
    torch.testing.assert_close(ours, official)
    for a, o in zip(_module_grads(ours, head, x), torch.autograd.grad(official, [xo, w, b])):
        torch.testing.assert_close(a.reshape(o.shape), o)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_sample_to_sample_softmax_module(data, backend):
    head = SampleToSampleSoftmax(D, C, backend=backend, bank_dtype=torch.float64)
    head.load_official(_official_state(data, "sample_to_sample_loss"))
    x = data["x"].clone().requires_grad_()
    ours = head(x, data["labels"])
    xo = data["x"].clone().requires_grad_()
    official = _official_softmax(_cos(xo, data["feat_mem"]), data["labels"], 64.0, 0.1)
    torch.testing.assert_close(ours, official)
    ours.backward()
    official.backward()
    torch.testing.assert_close(x.grad, xo.grad)
    # the bank then holds the batch's features (the last occurrence of a label wins)
    last = {int(c): i for i, c in enumerate(data["labels"])}
    torch.testing.assert_close(head.bank[list(last)],
                               reference.bank_rows(data["x"][list(last.values())]))


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_sample_to_sample_bce_module(data, backend):
    """Sample_to_Sample_Based_BCE_Loss: per-row thresholds from 0, shifted by the official b₀
    at the first call (their mean was ≤ 0), then the official loss."""
    head = SampleToSampleBCE(D, C, backend=backend, bank_dtype=torch.float64).double()
    head.load_official(_official_state(data, "sample_to_sample_loss"))
    assert head.bias.shape == (C,) and torch.count_nonzero(head.bias) == 0
    x = data["x"].clone().requires_grad_()
    ours = head(x, data["labels"])
    cos = _cos(data["x"], data["feat_mem"])
    one_hot = F.one_hot(data["labels"], C).bool()
    b0 = torch.logsumexp((64 * cos).masked_fill(one_hot, -math.inf), dim=1).mean()
    torch.testing.assert_close(head.bias.detach(), torch.full((C,), float(b0),
                                                              dtype=torch.float64))
    b = torch.full((1, C), float(b0), dtype=torch.float64, requires_grad=True)
    xo = data["x"].clone().requires_grad_()
    official = _official_bce(_cos(xo, data["feat_mem"]), data["labels"], b, 64.0, 0.1)
    torch.testing.assert_close(ours, official)
    for a, o in zip(_module_grads(ours, head, x), torch.autograd.grad(official, [xo, b])):
        torch.testing.assert_close(a.reshape(o.shape), o)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_uss_module(data, backend):
    head = USSLoss(D, C, backend=backend, bank_dtype=torch.float64).double()
    head.load_official(_official_state(data, "sample_to_sample_loss", torch.tensor([25.0])))
    x = data["x"].clone().requires_grad_()
    ours = head(x, data["labels"])
    b = torch.tensor([25.0], dtype=torch.float64, requires_grad=True)
    xo = data["x"].clone().requires_grad_()
    official = _official_bce(_cos(xo, data["feat_mem"]), data["labels"], b, 64.0, 0.1)
    torch.testing.assert_close(ours, official)
    for a, o in zip(_module_grads(ours, head, x), torch.autograd.grad(official, [xo, b])):
        torch.testing.assert_close(a.reshape(o.shape), o)


# ----------------------------------------------------------------------------- insightface

class CombinedMarginLoss:
    """A stand-in for arcface_torch's CombinedMarginLoss (losses.py at HEAD): its attributes
    and its forward on clamped cosine logits, restated (the ArcFace branch edits the logits in
    place under no_grad, so the target's gradient is taken as if the margin were additive)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.easy_margin = False

    def __call__(self, logits, labels):
        rows = torch.arange(len(labels))
        if self.interclass_filtering_threshold > 0:  # negatives above τ: logit 0, no gradient
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).float()
                dirty[rows, labels] = 0.0
            logits = (1 - dirty) * logits
        target = logits[rows, labels]
        logits = logits.clone()
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                shift = torch.cos(torch.arccos(target) + self.m2) - target
            logits[rows, labels] = target + shift
        elif self.m3 > 0:
            logits[rows, labels] = target - self.m3
        else:
            raise ValueError("unsupported")
        return logits * self.s


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2),
                                     (1.0, 0.5, 0.0, 0.1), (1.0, 0.0, 0.4, 0.1)])
def test_partial_fc_from_insightface(data, backend, margins):
    """PartialFC.from_insightface(CombinedMarginLoss(...)) computes what arcface_torch's
    PartialFC_V2 + CombinedMarginLoss + cross-entropy compute, loss and gradients."""
    margin_loss = CombinedMarginLoss(64.0, *margins)
    head = PartialFC.from_insightface(margin_loss, D, C, backend=backend).double()
    with torch.no_grad():
        head.weight.copy_(data["w"])
    x = data["x"].clone().requires_grad_()
    ours = head(x, data["labels"])
    xo, wo = data["x"].clone().requires_grad_(), data["w"].clone().requires_grad_()
    logits = F.linear(F.normalize(xo), F.normalize(wo)).clamp(-1, 1)
    theirs = F.cross_entropy(margin_loss(logits, data["labels"]), data["labels"])
    torch.testing.assert_close(ours, theirs)
    for a, o in zip(_module_grads(ours, head, x), torch.autograd.grad(theirs, [xo, wo])):
        torch.testing.assert_close(a, o)


def _insightface_step(head, margin_loss, x, w, labels):
    """(loss, ∂x, ∂W) of the head and of arcface_torch's PartialFC_V2 + CombinedMarginLoss
    (F.normalize with its default eps 1e-12) on the same data."""
    with torch.no_grad():
        head.weight.copy_(w)
    xl = x.clone().requires_grad_()
    ours = head(xl, labels)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = F.linear(F.normalize(xo), F.normalize(wo)).clamp(-1, 1)
    theirs = F.cross_entropy(margin_loss(logits, labels), labels)
    return ((ours,) + torch.autograd.grad(ours, [xl, head.weight]),
            (theirs,) + torch.autograd.grad(theirs, [xo, wo]))


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)])
def test_from_insightface_carries_its_normalisation_eps(data, margins, backend):
    """Embeddings of norm 2e-7 (arcface_torch's own synthetic set collapses its last
    BatchNorm to such): PartialFC_V2 normalises with F.normalize's 1e-12, and so does
    from_insightface (eps=1e-12 in its settings), giving the same loss and gradients; the
    official heads' 1e-5 would not."""
    margin_loss = CombinedMarginLoss(64.0, *margins)
    x = data["x"].clone()
    x[::2] = 2e-7 * F.normalize(x[::2])
    head = PartialFC.from_insightface(margin_loss, D, C, backend=backend).double()
    assert head.eps == 1e-12 and head.options.eps == 1e-12
    ours, theirs = _insightface_step(head, margin_loss, x, data["w"], data["labels"])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    official = PartialFC.from_insightface(margin_loss, D, C, backend=backend,
                                          eps=1e-5).double()
    other, _ = _insightface_step(official, margin_loss, x, data["w"], data["labels"])
    gap = (other[0] - theirs[0]).detach()
    assert abs(float(gap)) > 1e-2 * abs(float(theirs[0].detach()))


def test_from_insightface_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="margin_loss.m1 = 1.35"):
        PartialFC.from_insightface(CombinedMarginLoss(64, 1.35, 0.0, 0.0), D, C)
    with pytest.raises(ValueError, match="interclass_filtering_threshold = 1.4"):
        PartialFC.from_insightface(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 1.4), D, C)
    with pytest.raises(ValueError, match="margin_loss.m3 = -0.1"):
        PartialFC.from_insightface(CombinedMarginLoss(64, 1.0, 0.5, -0.1), D, C)
    with pytest.raises(TypeError, match="has no m1, m2"):
        PartialFC.from_insightface(type("Loss", (), {"s": 64.0, "m3": 0.4})(), D, C)
    exact = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    exact.easy_margin = True
    head = PartialFC.from_insightface(exact, D, C, 0.5, arcface_grad="exact")
    assert (head.easy_margin, head.arcface_grad, head.sample_rate) == (True, "exact", 0.5)
