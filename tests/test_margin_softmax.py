"""fused_margin_softmax_loss and sample_classes (DESIGN.md §1.2): every backend against the
float64 reference, partial FC, ArcFace edge cases and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (DTYPES, LargestAllocation, all_backends, assert_close_grad,
                     assert_close_loss, fp64_backends, fused_backends)
from unitsface_kernels import fused_margin_softmax_loss, reference, sample_classes

MARGINS = {"cosface": (0.0, 0.4), "arcface": (0.5, 0.0), "combined": (0.3, 0.2)}


def make_case(b, c, d, dtype, device, *, sampled, seed=0, rate=0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(dtype)
    centres = torch.randn(c, d, generator=g).to(dtype)
    labels = torch.randint(0, c, (b,), generator=g)
    index = sample_classes(labels, c, max(1, int(rate * c)), generator=g) if sampled else None
    return {k: (v.to(device) if v is not None else None)
            for k, v in dict(x=x, centres=centres, labels=labels, index=index).items()}


def run(case, backend, margin, reduction="mean", scale=64.0):
    x = case["x"].detach().clone().requires_grad_()
    w = case["centres"].detach().clone().requires_grad_()
    m2, m3 = MARGINS[margin]
    loss = fused_margin_softmax_loss(x, w, case["labels"], scale=scale, margin_arc=m2,
                                     margin_cos=m3, index=case["index"], reduction=reduction,
                                     backend=backend)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    gx, gw = torch.autograd.grad((loss * weights).sum(), [x, w])
    return loss.detach(), {"x": gx, "centres": gw}


def check(case, backend, margin, dtype, **kw):
    loss, grads = run(case, backend, margin, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_case = {k: (v.double() if v is not None and v.is_floating_point() else v)
                for k, v in case.items()}
    ref_loss, ref_grads = run(ref_case, "reference", margin, **kw)
    assert_close_loss(loss, ref_loss, dtype)
    for name in grads:
        assert_close_grad(grads[name], ref_grads[name], dtype, name)
    if case["index"] is not None:  # partial FC: unsampled centres get exactly zero
        unsampled = ~torch.isin(torch.arange(case["centres"].shape[0], device=loss.device),
                                case["index"])
        assert torch.count_nonzero(grads["centres"][unsampled]) == 0
    return loss, grads


SHAPES = list(itertools.product([1, 37], [1, 301, 1000], [8, 70, 130]))


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margin", ["cosface", "arcface"])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("b,c,d", SHAPES)
def test_shapes_fp32(backend, margin, sampled, b, c, d):
    check(make_case(b, c, d, torch.float32, "cpu", sampled=sampled, seed=b + c + d), backend,
          margin, torch.float32)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
def test_dtypes(backend, dtype, margin, sampled):
    check(make_case(37, 301, 70, dtype, "cpu", sampled=sampled, seed=2), backend, margin, dtype)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    loss, _ = check(make_case(29, 101, 24, torch.float32, "cpu", sampled=True), backend,
                    "arcface", torch.float32, reduction=reduction)
    assert loss.shape == ((29,) if reduction == "none" else ())


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_all_same_labels_and_zero_rows(backend):
    case = make_case(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["labels"][:] = case["index"][3]
    case["x"][[0, 4]] = 0.0
    case["centres"][case["index"][[1, 3]]] = 0.0  # a zero centre: the target one, too
    check(case, backend, "cosface", torch.float32)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_arcface_at_cos_plus_minus_one(backend):
    """x equal to its own centre (cos = 1, θ = 0) and opposite to another (cos = −1): the
    loss and gradients stay finite and match the reference (sin θ floored at 1e-6)."""
    case = make_case(8, 20, 16, torch.float32, "cpu", sampled=False)
    case["x"][0] = case["centres"][case["labels"][0]] * 3.0
    case["x"][1] = -case["centres"][case["labels"][1]]
    case["x"][2] = -case["centres"][(case["labels"][2] + 1) % 20]
    loss, grads = check(case, backend, "arcface", torch.float32)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
def test_gradcheck(backend, margin, sampled):
    gradcheck(backend, margin, "cpu", sampled)


def gradcheck(backend, margin, device, sampled):
    """float64 gradcheck of ∂x and ∂W, per row (reduction="none"), at a small scale."""
    case = make_case(7, 19, 6, torch.float64, device, sampled=sampled, rate=0.5)
    m2, m3 = MARGINS[margin]

    def f(x, w):
        return fused_margin_softmax_loss(x, w, case["labels"], scale=8.0, margin_arc=m2,
                                         margin_cos=m3, index=case["index"], reduction="none",
                                         backend=backend)

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres")]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("sampled", [False, True])
def test_no_bxs_allocation(backend, sampled):
    b, c, d = 64, 4096, 16
    case = make_case(b, c, d, torch.float32, "cpu", sampled=sampled, rate=0.5)
    s = c if not sampled else case["index"].numel()
    x = case["x"].requires_grad_()
    w = case["centres"].requires_grad_()
    with LargestAllocation() as seen:
        fused_margin_softmax_loss(x, w, case["labels"], index=case["index"],
                                  backend=backend).backward()
    # the centres' gradient (C×D) is an output; nothing may reach B·|S|
    assert seen.largest < b * s, (seen.largest, seen.where)
    if backend == "triton":
        from unitsface_kernels.triton.fused import fused_backward, fused_forward

        with LargestAllocation() as inner:
            out = fused_forward(x.detach(), w.detach(), None, case["labels"], case["index"],
                                None, None, 64.0, 0.5, 0.0, 0.0, 0.0, False)
            fused_backward(torch.ones_like(out[0]), x.detach(), w.detach(), None,
                           case["labels"], case["index"], None, None, *out[2:], out[1], 64.0,
                           0.5, 0.0, 0.0, 0.0, False, True, True, False)
        assert inner.largest < b * s, (inner.largest, inner.where)


# ---------------------------------------------------------------- sample_classes

def test_sample_classes_holds_positives_sorted_unique():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (64,), generator=g)
    index = sample_classes(labels, 1000, 100, generator=g)
    assert index.dtype == torch.int64 and index.numel() == 100
    assert bool((index[1:] > index[:-1]).all())
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


# ---------------------------------------------------------------- bad input (DESIGN.md §5)

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
    (lambda c: c.update(centres=c["centres"].half()), "centres has dtype torch.float16"),
    (lambda c: c.update(labels=c["labels"][:3]), r"labels must have shape \(37,\)"),
])
def test_bad_inputs(mutate, match):
    case = make_case(37, 301, 12, torch.float32, "cpu", sampled=True)
    mutate(case)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_margin_softmax_loss(case["x"], case["centres"], case["labels"],
                                  index=case["index"])


@pytest.mark.parametrize("kw,match", [
    (dict(margin_arc=-0.1), r"margin_arc must lie in \[0, π\)"),
    (dict(margin_arc=4.0), r"margin_arc must lie in \[0, π\)"),
    (dict(scale=-1.0), "scale must be a positive number"),
    (dict(reduction="avg"), "reduction must be one of"),
])
def test_bad_options(kw, match):
    case = make_case(5, 11, 4, torch.float32, "cpu", sampled=False)
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


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (warn_only as the test asks)."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())

    def enable(warn_only=False):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)

    yield enable
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface")[:1])  # triton
def test_deterministic_mode_refuses_gpu_atomics(backend, deterministic):
    """The triton backward's atomic adds of ∂x are refused on GPUs under deterministic mode
    (a warning with warn_only); on the CPU interpreter the programs run in order."""
    from unitsface_kernels.triton.fused import check_deterministic

    cuda = torch.device("cuda")
    check_deterministic(cuda)  # not enabled: silent
    deterministic()
    check_deterministic(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='native'"):
        check_deterministic(cuda)
    deterministic(warn_only=True)
    with pytest.warns(UserWarning, match="atomic adds"):
        check_deterministic(cuda)
    case = make_case(5, 11, 8, torch.float32, "cpu", sampled=False)
    x = case["x"].requires_grad_()
    fused_margin_softmax_loss(x, case["centres"], case["labels"], backend=backend).backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

CUDA_CASES = [(torch.bfloat16, 300, 20011, 512), (torch.float32, 300, 20011, 512),
              (torch.bfloat16, 1, 3001, 512), (torch.float16, 257, 999, 130)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype,b,c,d", CUDA_CASES)
def test_cuda_parity(backend, dtype, margin, sampled, b, c, d):
    check(make_case(b, c, d, dtype, "cuda", sampled=sampled), backend, margin, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fp64_backends("cuda", "unitsface"))
@pytest.mark.parametrize("margin", list(MARGINS))
def test_cuda_gradcheck(backend, margin):
    gradcheck(backend, margin, "cuda", sampled=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
def test_cuda_deterministic_mode(backend, deterministic, monkeypatch):
    """Deterministic mode: triton's backward refuses with a clear error, native runs and
    gives the same ∂x twice (cuBLAS asks for its workspace setting, as for any matmul)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic()
    case = make_case(300, 2001, 128, torch.float32, "cuda", sampled=True)

    def dx():
        x = case["x"].clone().requires_grad_()
        fused_margin_softmax_loss(x, case["centres"], case["labels"], index=case["index"],
                                  backend=backend).backward()
        return x.grad

    if backend == "triton":
        with pytest.raises(RuntimeError, match="deterministic"):
            dx()
    else:
        assert torch.equal(dx(), dx())
