"""fused_unitsface_loss (docs/design.md §1.3): the one-pass objective against the float64
reference, its equality with the two losses computed apart, the official clamp, partial FC
and bad input."""

from __future__ import annotations

import pytest
import torch

from helpers import (DTYPES, FORMS, MARGINS, CountingKernel, LargestAllocation, all_backends,
                     as_float64, check, fp64_backends, fused_backends, make_case,
                     passes_gradcheck, run)
from unitsface_kernels import fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss


def case_of(b, c, d, dtype, device, **kw):
    return make_case("unitsface", b, c, d, dtype, device, **kw)


GRAD_NAMES = ("x", "centres", "bias")


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
# 520 classes: 5 chunks of the interpreter's 128, the last one 8 columns (a partial tile)
@pytest.mark.parametrize("b,c,d", [(1, 1, 8), (37, 301, 70), (37, 520, 130), (1, 301, 70)])
def test_parity_fp32(backend, form, sampled, vector_bias, b, c, d):
    case = case_of(b, c, d, torch.float32, "cpu", sampled=sampled, vector_bias=vector_bias,
                   seed=b + c)
    check(case, backend, torch.float32, uss_form=form, margin_arc=0.2, uss_weight=0.7)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_dtypes(backend, dtype, form, margin):
    case = case_of(37, 301, 70, dtype, "cpu", sampled=True, seed=4)
    check(case, backend, dtype, uss_form=form, **MARGINS[margin])


def _hard_positives(case):
    """Bank rows of the batch's classes turned against their rows (cos ≈ −1): with b = 20 and
    s = 64, z⁺ = b − s(cos − m) ≈ 90 > s, so the official clamp is active."""
    bank = case["bank"].float()
    bank[case["labels"][:8]] = -torch.nn.functional.normalize(case["x"][:8].float())
    case["bank"] = bank.to(case["bank"].dtype)
    case["bank_valid"][case["labels"][:8]] = True
    case["bias"] = torch.full_like(case["bias"], 20.0)
    return case


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("margin", ["cosface", "arcface_st", "arcface_easy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_clamp_and_arcface_conventions(backend, form, margin, dtype):
    """official_clamp in the objective (clamp active on hard positives), with the insightface
    ArcFace conventions in its softmax part."""
    case = _hard_positives(case_of(37, 301, 70, dtype, "cpu", sampled=True, seed=8))
    check(case, backend, dtype, uss_form=form, official_clamp=True, **MARGINS[margin])


def test_reference_is_the_official_head():
    """The objective with official_clamp=True is the official UniTSFace head: the normalised
    softmax (CosFace, m = 0.4) plus the official USS (clamped, m = 0.1) on feat_mem, dense,
    as head.py computes them (issue 13's example: a bank row ≈ −x₀, b = 20)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    feat = torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    feat[0] = -x[0] + 0.01 * torch.randn(8, generator=g, dtype=torch.float64)
    b, s = torch.tensor([20.0], dtype=torch.float64), 64.0
    cos_w = F.linear(F.normalize(x, eps=1e-5), F.normalize(w, eps=1e-5))
    one_hot = F.one_hot(labels, 6).bool()
    softmax = F.cross_entropy(s * (cos_w - one_hot * 0.4), labels)
    cos_b = F.linear(F.normalize(x, eps=1e-5), F.normalize(feat, eps=1e-5))
    p = torch.log(1 + torch.exp(-(s * (cos_b - 0.1) - b).clamp(-s, s)))
    n = torch.log(1 + torch.exp((s * cos_b - b).clamp(-s, s)))
    official = softmax + (one_hot * p + (~one_hot) * n).sum(1).mean()
    ours = fused_unitsface_loss(x, labels, w, feat, b, official_clamp=True, backend="reference")
    torch.testing.assert_close(ours, official)
    unclamped = fused_unitsface_loss(x, labels, w, feat, b, backend="reference")
    assert unclamped - ours > 1.0  # the clamp matters on this case


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
def test_equals_the_two_losses_apart(backend, form):
    """One pass = softmax(W[S]) + λ·USS(bank[S], l_j = S_j, valid[S]) computed separately."""
    case = case_of(37, 301, 40, torch.float64, "cpu", sampled=True, vector_bias=True)
    idx = case["index"]
    together = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                                    case["bias"], bank_valid=case["bank_valid"], index=idx,
                                    uss_form=form, uss_weight=0.3, reduction="none",
                                    backend=backend)
    soft = fused_margin_softmax_loss(case["x"], case["centres"], case["labels"], index=idx,
                                     reduction="none", backend=backend)
    uss = fused_uss_loss(case["x"], case["labels"], case["bias"][idx], case["bank"][idx], idx,
                         case["bank_valid"][idx], form=form, reduction="none", backend=backend)
    torch.testing.assert_close(together, soft + 0.3 * uss)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("vector_bias", [False, True])
def test_threshold_gradient_alone(backend, vector_bias):
    """Only b asks for a gradient (x and W frozen): the backward's ∂b-only path."""
    case = case_of(37, 301, 70, torch.float64, "cpu", sampled=True, vector_bias=vector_bias)
    grads = []
    for impl in (backend, "reference"):
        bias = case["bias"].clone().requires_grad_()
        fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"], bias,
                             bank_valid=case["bank_valid"], index=case["index"],
                             backend=impl).backward()
        grads.append(bias.grad)
    assert torch.count_nonzero(grads[1]) > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface")[:1])  # triton
@pytest.mark.parametrize("form", FORMS)
def test_triton_launches_per_chunk(backend, form, monkeypatch):
    """docs/design.md §2: a step costs a fixed number of launches per chunk of classes,
    whatever C — forward: the cosine kernel (W and bank programs in one launch) and, for the
    pairs form, the ∂x product of its USS part; backward: the cosine kernel, ∂W and ∂x — and,
    for the pairs form, the backward reads no bank (no bank programs)."""
    from unitsface_kernels.triton import fused

    names = ("_cos_kernel", "_dw_kernel", "_dx_kernel")
    for c in (301, 620):  # 3 and 5 chunks of the interpreter's 128 classes
        counters = {name: CountingKernel(getattr(fused, name)) for name in names}
        for name, counter in counters.items():
            monkeypatch.setattr(fused, name, counter)
        case = case_of(37, c, 16, torch.float32, "cpu", seed=c)
        _, grads = run(case, backend, uss_form=form)
        assert all(torch.count_nonzero(g) > 0 for g in grads.values())
        chunks = fused.plan(37, c, 16, torch.float32, torch.device("cpu"), 2).n_chunks
        assert chunks == triton_cdiv(c, 128)
        cos = counters["_cos_kernel"].launches
        forward = [k for k in cos if not k["BACKWARD"]]
        backward = [k for k in cos if k["BACKWARD"]]
        pairs = form == "pairs"
        assert len(forward) == (chunks if pairs else 1)
        assert all(k["W_PROGS"] and k["BANK_PROGS"] for k in forward)
        assert len(backward) == chunks
        assert all(k["W_PROGS"] and k["BANK_PROGS"] != pairs for k in backward)
        assert len(counters["_dw_kernel"].launches) == chunks
        assert len(counters["_dx_kernel"].launches) == (2 if pairs else 1) * chunks


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_empty_bank_is_softmax_alone(backend):
    case = case_of(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["bank_valid"][:] = False
    loss, grads = check(case, backend, torch.float32)
    soft = fused_margin_softmax_loss(case["x"], case["centres"], case["labels"],
                                     index=case["index"], backend=backend)
    torch.testing.assert_close(loss, soft)
    assert torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_all_same_labels_zero_rows(backend):
    case = case_of(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["labels"][:] = case["index"][0]
    case["x"][[2, 9]] = 0.0
    case["bank"][case["index"][:4]] = 0.0
    check(case, backend, torch.float32, uss_form="lse")


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["x", "centres", "bank", "invalid bank"])
def test_nan_propagates(backend, form, dtype, where):
    """docs/design.md §5: a NaN in x, in W or in a valid bank row reaches the loss and the
    gradients of exactly the rows it touches, as in the float64 reference; one in an invalid
    bank row reaches nothing."""
    case = case_of(37, 301, 24, dtype, "cpu", sampled=True, seed=9)
    cls = int(case["index"][5])
    if where == "x":
        case["x"][3, 2] = float("nan")
    elif where == "centres":
        case["centres"][cls, 1] = float("nan")
    else:
        case["bank"][cls, 1] = float("nan")
        case["bank_valid"][cls] = where == "bank"
    loss, grads = run(case, backend, "none", uss_form=form)
    ref_loss, ref_grads = run(as_float64(case), "reference", "none", uss_form=form)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref_loss))
    assert bool(torch.isnan(loss).any()) == (where != "invalid bank")
    if where == "x":  # the other rows do not read x_3
        assert torch.isfinite(loss[torch.arange(37) != 3]).all()
    for name, g in grads.items():
        assert torch.equal(torch.isnan(g), torch.isnan(ref_grads[name])), name


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("official", [False, True])
def test_gradcheck(backend, form, vector_bias, official):
    """float64 gradcheck; `official`: the official clamp (active on some pairs at s = 8) and
    the easy margin (the straight-through gradient is not a derivative: no gradcheck)."""
    case = case_of(7, 17, 6, torch.float64, "cpu", sampled=True, vector_bias=vector_bias,
                   rate=0.6)

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, margin_cos=0.1, uss_form=form,
                                    uss_weight=0.5, official_clamp=official,
                                    easy_margin=official, reduction="none", backend=backend)

    inputs = [case[k].clone().requires_grad_() for k in GRAD_NAMES]
    assert passes_gradcheck(f, inputs, backend)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
def test_no_bxs_allocation(backend, form):
    b, c, d = 64, 1024, 16  # B·|S| ≥ 2·C·D: the largest allocation allowed (∂W) stays below
    case = case_of(b, c, d, torch.float32, "cpu", sampled=True, vector_bias=True, rate=0.5)
    s = case["index"].numel()
    leaves = {k: case[k].requires_grad_() for k in GRAD_NAMES}
    with LargestAllocation() as seen:
        fused_unitsface_loss(leaves["x"], case["labels"], leaves["centres"], case["bank"],
                             leaves["bias"], bank_valid=case["bank_valid"], index=case["index"],
                             uss_form=form, backend=backend).backward()
    assert seen.largest < b * s, (seen.largest, seen.where)


# ---------------------------------------------------------------- bad input (docs/design.md §5)

@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(bank=c["bank"][:-1]), "bank has 300 rows but centres has 301"),
    (lambda c: c.update(bank=c["bank"][:, :3]), "bank has embedding size 3"),
    (lambda c: c.update(bank=c["bank"].double()), "bank has dtype torch.float64"),
    (lambda c: c.update(bank_valid=c["bank_valid"][:5]), r"bank_valid must have shape \(301,\)"),
    (lambda c: c.update(bias=torch.zeros(7)), "bias must hold 1 value"),
    (lambda c: c.update(index=c["index"][c["index"] != c["labels"][0]]), "are missing from index"),
    (lambda c: c.update(labels=c["labels"] - 400), r"labels must lie in \[0, 301\)"),
])
def test_bad_inputs(mutate, match):
    case = case_of(37, 301, 12, torch.float32, "cpu", sampled=True)
    mutate(case)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                             case["bias"], bank_valid=case["bank_valid"], index=case["index"])


def test_bad_options():
    case = case_of(5, 11, 4, torch.float32, "cpu", sampled=False)
    args = (case["x"], case["labels"], case["centres"], case["bank"], case["bias"])
    with pytest.raises(ValueError, match="uss_form must be one of"):
        fused_unitsface_loss(*args, uss_form="softmax")
    with pytest.raises(TypeError, match="uss_weight must be a real number"):
        fused_unitsface_loss(*args, uss_weight=None)
    for bad, match in ((float("nan"), "uss_weight must be finite"),
                       (-1.0, "uss_weight must be ≥ 0")):
        with pytest.raises(ValueError, match=match):
            fused_unitsface_loss(*args, uss_weight=bad)
    with pytest.raises(ValueError, match="uss_margin must be finite"):
        fused_unitsface_loss(*args, uss_margin=float("inf"))
    with pytest.raises(TypeError, match="official_clamp must be a bool"):
        fused_unitsface_loss(*args, official_clamp="yes")


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

# D=1024 in bf16 and D=512 in fp32 split the one-pass backward's ∂W into feature chunks
CUDA_CASES = [(torch.bfloat16, 512, 20011, 512), (torch.float32, 512, 20011, 512),
              (torch.bfloat16, 1, 3001, 512), (torch.float16, 257, 999, 130),
              (torch.bfloat16, 129, 5003, 1024)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype,b,c,d", CUDA_CASES)
def test_cuda_parity(backend, dtype, form, sampled, b, c, d):
    case = case_of(b, c, d, dtype, "cuda", sampled=sampled, vector_bias=sampled)
    check(case, backend, dtype, uss_form=form)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fp64_backends("cuda", "unitsface"))
@pytest.mark.parametrize("form", FORMS)
def test_cuda_gradcheck(backend, form):
    case = case_of(7, 17, 6, torch.float64, "cuda", sampled=True, vector_bias=True, rate=0.6)

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, uss_form=form,
                                    reduction="none", backend=backend)

    inputs = [case[k].clone().requires_grad_() for k in GRAD_NAMES]
    assert passes_gradcheck(f, inputs, backend)
