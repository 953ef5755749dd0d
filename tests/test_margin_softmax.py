"""fused_margin_softmax_loss and sample_classes (docs/design.md §1.2): every backend against the
float64 reference, partial FC, the ArcFace conventions and their edge cases, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import (DTYPES, MARGINS, LargestAllocation, all_backends, check, fp64_backends,
                     fused_backends, make_case, passes_gradcheck, run)
from unitsface_kernels import fused_margin_softmax_loss, reference, sample_classes


def case_of(b, c, d, dtype, device, **kw):
    return make_case("softmax", b, c, d, dtype, device, **kw)


# One case of 1000 classes (8 chunks of the interpreter's 128, K steps of 32 over D = 130
# with a partial last one); the others stay at ≤ 301 classes (3 chunks), which keeps the
# interpreted Triton calls within CI's time.
SHAPES = list(itertools.product([1, 37], [1, 301], [8, 70, 130])) + [(37, 1000, 130)]


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margin", ["cosface", "arcface"])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("b,c,d", SHAPES)
def test_shapes_fp32(backend, margin, sampled, b, c, d):
    case = case_of(b, c, d, torch.float32, "cpu", sampled=sampled, seed=b + c + d)
    check(case, backend, torch.float32, **MARGINS[margin])


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", ["cosface", "arcface", "combined"])
@pytest.mark.parametrize("sampled", [False, True])
def test_dtypes(backend, dtype, margin, sampled):
    check(case_of(37, 301, 70, dtype, "cpu", sampled=sampled, seed=2), backend, dtype,
          **MARGINS[margin])


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("margin", ["arcface_st", "arcface_easy"])
def test_arcface_conventions(backend, dtype, margin):
    """insightface's straight-through ArcFace and easy margin, with rows past θ + m2 > π (where
    the exact convention falls back and the straight-through one does not) and rows with
    cos ≤ 0 (where the easy margin applies none)."""
    case = case_of(37, 301, 70, dtype, "cpu", sampled=True, seed=6)
    w = case["centres"][case["labels"]].float()
    g = torch.Generator().manual_seed(7)  # not the global RNG: the draw must not depend on
    # which tests ran before in the same worker
    case["x"][:6] = (-w[:6] + 0.05 * torch.randn(6, 70, generator=g)).to(dtype)  # θ + m2 > π
    case["x"][6:12] = (-0.3 * w[6:12] / w[6:12].norm(dim=1, keepdim=True)
                       + torch.randn(6, 70, generator=g) * 0.01).to(dtype)
    check(case, backend, dtype, **MARGINS[margin])


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    loss, _ = check(case_of(29, 101, 24, torch.float32, "cpu", sampled=True), backend,
                    torch.float32, reduction=reduction, **MARGINS["arcface"])
    assert loss.shape == ((29,) if reduction == "none" else ())


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_all_same_labels_and_zero_rows(backend):
    case = case_of(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["labels"][:] = case["index"][3]
    case["x"][[0, 4]] = 0.0
    case["centres"][case["index"][[1, 3]]] = 0.0  # a zero centre: the target one, too
    check(case, backend, torch.float32, **MARGINS["cosface"])


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_arcface_at_cos_plus_minus_one(backend):
    """x equal to its own centre (cos = 1, θ = 0) and opposite to another (cos = −1): the
    loss and gradients stay finite and match the reference (sin θ floored at 1e-6)."""
    case = case_of(8, 20, 16, torch.float32, "cpu", sampled=False)
    case["x"][0] = case["centres"][case["labels"][0]] * 3.0
    case["x"][1] = -case["centres"][case["labels"][1]]
    case["x"][2] = -case["centres"][(case["labels"][2] + 1) % 20]
    loss, grads = check(case, backend, torch.float32, **MARGINS["arcface"])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


# the straight-through gradient is not the loss's derivative: no gradcheck for it
EXACT_MARGINS = [m for m in MARGINS if MARGINS[m].get("arcface_grad") != "straight_through"]


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margin", EXACT_MARGINS)
@pytest.mark.parametrize("sampled", [False, True])
def test_gradcheck(backend, margin, sampled):
    gradcheck(backend, margin, "cpu", sampled)


def gradcheck(backend, margin, device, sampled):
    """float64 gradcheck of ∂x and ∂W, per row (reduction="none"), at a small scale."""
    case = case_of(7, 19, 6, torch.float64, device, sampled=sampled, rate=0.5)

    def f(x, w):
        return fused_margin_softmax_loss(x, w, case["labels"], scale=8.0, index=case["index"],
                                         reduction="none", backend=backend, **MARGINS[margin])

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres")]
    assert passes_gradcheck(f, inputs, backend)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("sampled", [False, True])
def test_no_bxs_allocation(backend, sampled):
    b, c, d = 64, 1024, 16  # B·|S| ≥ 2·C·D: the largest allocation allowed (∂W) stays below
    case = case_of(b, c, d, torch.float32, "cpu", sampled=sampled, rate=0.5)
    s = c if not sampled else case["index"].numel()
    x = case["x"].requires_grad_()
    w = case["centres"].requires_grad_()
    with LargestAllocation() as seen:
        fused_margin_softmax_loss(x, w, case["labels"], index=case["index"],
                                  backend=backend).backward()
    # the centres' gradient (C×D) is an output; nothing may reach B·|S|
    assert seen.largest < b * s, (seen.largest, seen.where)
    if backend == "triton":
        from unitsface_kernels.options import softmax_options
        from unitsface_kernels.triton.fused import fused_backward, fused_forward

        opts = softmax_options(scale=64.0, margin_arc=0.5, margin_cos=0.0, arcface_grad="exact",
                               easy_margin=False).pack()
        with LargestAllocation() as inner:
            out = fused_forward(x.detach(), w.detach(), None, case["labels"], case["index"],
                                None, None, None, opts, False)
            fused_backward(torch.ones_like(out[0]), x.detach(), w.detach(), None,
                           case["labels"], case["index"], None, None, None, *out[1:], opts,
                           [True, True, False])
        assert inner.largest < b * s, (inner.largest, inner.where)


# ---------------------------------------------------------------- sample_classes

def test_sample_classes_holds_positives_sorted_unique():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (64,), generator=g)
    index = sample_classes(labels, 1000, 100, generator=g)
    assert index.dtype == torch.int64 and index.numel() == 100
    assert bool((index[1:] > index[:-1]).all())
    assert bool(torch.isin(labels, index).all())
    # many classes, a sample barely larger than the positives: hundreds of random scores lie
    # within 1e-3 of the top, so the positives must rank above every random score, not near it
    labels = torch.randint(0, 200_000, (64,), generator=g)
    index = sample_classes(labels, 200_000, labels.unique().numel() + 8, generator=g)
    assert bool(torch.isin(labels, index).all())


def test_sample_classes_all_positives_when_they_exceed():
    labels = torch.arange(50)
    assert torch.equal(sample_classes(labels, 100, 10), torch.arange(50))
    assert torch.equal(sample_classes(torch.tensor([3]), 5, 99), torch.arange(5))


def test_sample_classes_reproducible_and_uniform():
    labels = torch.tensor([0, 1])
    a = sample_classes(labels, 500, 50, generator=torch.Generator().manual_seed(7))
    b = sample_classes(labels, 500, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # the non-positive picks are uniform: over many draws every class shows up about equally
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(500)
    for _ in range(400):
        counts[sample_classes(labels, 500, 50, generator=g)] += 1
    others = counts[2:] / 400  # expected 48/498 ≈ 0.096
    assert abs(float(others.mean()) - 48 / 498) < 1e-6 and float(others.std()) < 0.03
    assert counts[0] == counts[1] == 400


# ---------------------------------------------------------------- bad input (docs/design.md §5)

@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(labels=c["labels"] + 1000), r"labels must lie in \[0, 301\)"),
    (lambda c: c.update(index=c["index"][c["index"] != c["labels"][0]]), "are missing from index"),
    (lambda c: c.update(index=c["index"].flip(0)), "index is not sorted"),
    (lambda c: c.update(index=torch.cat([c["index"], c["index"][-1:]])), "duplicated"),
    (lambda c: c.update(index=torch.cat([c["index"], torch.tensor([301])])),
     r"index must lie in \[0, 301\)"),
    (lambda c: c.update(index=c["index"].float()), "index must be an integer tensor"),
    (lambda c: c.update(index=c["index"][:0]), "index must be a non-empty 1-D tensor"),
    (lambda c: c.update(centres=c["centres"][:, :5]), "centres has embedding size 5"),
    (lambda c: c.update(centres=c["centres"].double()), "centres has dtype torch.float64"),
    (lambda c: c.update(labels=c["labels"][:3]), r"labels must have shape \(37,\)"),
])
def test_bad_inputs(mutate, match):
    case = case_of(37, 301, 12, torch.float32, "cpu", sampled=True)
    mutate(case)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_margin_softmax_loss(case["x"], case["centres"], case["labels"],
                                  index=case["index"])


@pytest.mark.parametrize("kw,match", [
    (dict(margin_arc=-0.1), r"margin_arc must lie in \[0, π\)"),
    (dict(margin_arc=4.0), r"margin_arc must lie in \[0, π\)"),
    (dict(margin_arc=float("nan")), "margin_arc must be finite"),
    (dict(scale=-1.0), "scale must be positive"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(margin_cos=float("inf")), "margin_cos must be finite"),
    (dict(margin_cos=2.0), r"margin_cos must lie in \[-1, 1\]"),
    (dict(arcface_grad="ste"), "arcface_grad must be one of 'exact', 'straight_through'"),
    (dict(easy_margin="yes"), "easy_margin must be a bool"),
    (dict(reduction="avg"), "reduction must be one of"),
])
def test_bad_options(kw, match):
    case = case_of(5, 11, 4, torch.float32, "cpu", sampled=False)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_margin_softmax_loss(case["x"], case["centres"], case["labels"], **kw)


def test_reference_matches_insightface_style_cosface_and_arcface():
    """CosFace: s·(cos − m) on the target; ArcFace: s·cos(θ + m) with the cos − m·sin m
    fallback past π — written densely, as insightface's CombinedMarginLoss users run it."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(16, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (16,), generator=g)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    onehot = torch.nn.functional.one_hot(labels, 40).bool()
    cosface = torch.nn.functional.cross_entropy(64 * (cos - 0.4 * onehot), labels)
    torch.testing.assert_close(reference.margin_softmax_loss(x, w, labels), cosface)
    m = 0.5
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    arc = torch.where(cos > -torch.cos(torch.tensor(m)), torch.cos(theta + m),
                      cos - m * torch.sin(torch.tensor(m)))
    arcface = torch.nn.functional.cross_entropy(64 * torch.where(onehot, arc, cos), labels)
    torch.testing.assert_close(
        reference.margin_softmax_loss(x, w, labels, margin_arc=m, margin_cos=0.0), arcface)


def _dense_head(x, w, labels, target_fn):
    """F.cross_entropy of s·logits with the target logit replaced by target_fn(cos_target),
    as insightface's CombinedMarginLoss + CrossEntropy compute it (dense, float64)."""
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(x),
                                     torch.nn.functional.normalize(w)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    logits = cos.clone()
    logits[rows, labels] = target_fn(cos[rows, labels])
    return torch.nn.functional.cross_entropy(64 * logits, labels)


def test_reference_matches_insightface_conventions():
    """arcface_torch today (arccos → +m → cos under no_grad: no fallback, straight-through
    gradient) and insightface's easy_margin, written as insightface writes them; loss and
    gradients, with targets past θ + m > π and at cos ≤ 0."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    w = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (16,), generator=g)
    x[:4] = -w[labels[:4]] + 0.1 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    m = 0.5

    def straight_through(t):
        with torch.no_grad():  # insightface edits the logits in place under no_grad
            shift = torch.cos(torch.arccos(t) + m) - t
        return t + shift

    def easy(t):
        sin_t = torch.sqrt(1.0 - t * t)
        return torch.where(t > 0, t * math.cos(m) - sin_t * math.sin(m), t)

    for convention, fn in (("straight_through", straight_through), ("exact", easy)):
        kw = dict(margin_arc=m, margin_cos=0.0, arcface_grad=convention,
                  easy_margin=convention == "exact")
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        ours = reference.margin_softmax_loss(xa, wa, labels, **kw)
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        theirs = _dense_head(xb, wb, labels, fn)
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(torch.autograd.grad(ours, [xa, wa]), torch.autograd.grad(theirs, [xb, wb])):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_label_bound_and_more_classes_than_samples(backend):
    """labels in [0, C): C − 1 is a class, C is not; a batch with more distinct classes than
    num_sample gets an index of all its classes (partial FC never drops a positive)."""
    case = case_of(40, 53, 8, torch.float32, "cpu")
    case["labels"] = torch.arange(40) + 13  # 40 distinct classes, the last one is 52 = C − 1
    case["index"] = sample_classes(case["labels"], 53, 10)
    assert torch.equal(case["index"], case["labels"])
    check(case, backend, torch.float32, **MARGINS["arcface"])
    case["labels"][5] = 53
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 53\).*got labels\[5\] = 53"):
        run(case, backend)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (warn_only as the test asks)."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())

    def enable(warn_only=False):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)

    yield enable
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
def test_deterministic_mode_runs_and_repeats(backend, deterministic):
    """No backend sums with float atomics (docs/design.md §7): under
    torch.use_deterministic_algorithms(True) the backward runs without a refusal or a
    warning, and repeats bit for bit (the triton backward's ∂x slices are summed in a fixed
    order; on a GPU test_cuda_deterministic_mode checks it where order could vary)."""
    import warnings

    deterministic()
    case = case_of(37, 301, 24, torch.float32, "cpu", sampled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first, second = run(case, backend)[1], run(case, backend)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

CUDA_CASES = [(torch.bfloat16, 300, 20011, 512), (torch.float32, 300, 20011, 512),
              (torch.bfloat16, 1, 3001, 512), (torch.float16, 257, 999, 130)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype,b,c,d", CUDA_CASES)
def test_cuda_parity(backend, dtype, margin, sampled, b, c, d):
    check(case_of(b, c, d, dtype, "cuda", sampled=sampled), backend, dtype, **MARGINS[margin])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fp64_backends("cuda", "unitsface"))
@pytest.mark.parametrize("margin", EXACT_MARGINS)
def test_cuda_gradcheck(backend, margin):
    gradcheck(backend, margin, "cuda", sampled=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_mode(backend, dtype, deterministic, monkeypatch):
    """Deterministic mode: every backend runs and gives the same ∂x and ∂W twice, bit for bit
    (cuBLAS asks for its workspace setting, as for any matmul); the triton case spans several
    chunks of classes and split-K slices."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("UNITSFACE_TRITON_CHUNK_MB", "0.25")
    deterministic()
    case = case_of(300, 2001, 128, dtype, "cuda", sampled=True)

    def grads():
        x = case["x"].clone().requires_grad_()
        w = case["centres"].clone().requires_grad_()
        fused_margin_softmax_loss(x, w, case["labels"], index=case["index"],
                                  backend=backend).backward()
        return x.grad, w.grad

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)
