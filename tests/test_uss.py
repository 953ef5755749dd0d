"""fused_uss_loss: every backend against the float64 reference (docs/design.md §1.1, §5, §7)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (DTYPES, FORMS, CountingKernel, LargestAllocation, all_backends, check,
                     fp64_backends, fused_backends, grad_names, make_case, passes_gradcheck, run)
from unitsface_kernels import fused_uss_loss, reference, uss_bias_init
from unitsface_kernels.options import UssOptions

MODES = ["bank", "inbatch", "centres"]


# In-batch pairs have N = B: the reference-size axis only applies to the other modes.
SHAPE_CASES = [(mode, b, n, d)
               for mode, (b, n, d) in itertools.product(
                   MODES, itertools.product([1, 37], [1, 53, 300], [8, 70, 130]))
               if mode != "inbatch" or n == 53]


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode,b,n,d", SHAPE_CASES)
def test_shapes_fp32(backend, form, mode, b, n, d):
    case = make_case("uss", b, n, d, torch.float32, "cpu", mode=mode, seed=b * n + d)
    check(case, backend, torch.float32, form=form)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("official_clamp", [False, True])
def test_dtypes(backend, dtype, form, mode, official_clamp):
    case = make_case("uss", 37, 53, 70, dtype, "cpu", mode=mode, seed=3)
    check(case, backend, dtype, form=form, official_clamp=official_clamp,
                          scale=32.0)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["bank", "centres"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_vector_bias_and_reductions(backend, form, mode, reduction):
    case = make_case("uss", 29, 61, 40, torch.float32, "cpu", mode=mode, vector_bias=True,
                     seed=5)
    loss, _ = check(case, backend, torch.float32, reduction=reduction, form=form)
    assert loss.shape == ((29,) if reduction == "none" else ())


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_all_same_labels(backend, form, mode):
    """One class for the whole batch: in-batch mode has no negatives at all."""
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode=mode, num_labels=1)
    check(case, backend, torch.float32, form=form)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_rows_without_positives(backend, form):
    """Labels whose bank slot is empty, and in-batch singletons, have no positive pair."""
    case = make_case("uss", 40, 53, 24, torch.float32, "cpu", mode="bank")
    case["ref_valid"][case["labels"][:20]] = False
    check(case, backend, torch.float32, form=form)
    case = make_case("uss", 40, 0, 24, torch.float32, "cpu", mode="inbatch", num_labels=1000)
    check(case, backend, torch.float32, form=form)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_all_invalid_bank(backend, form):
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode="bank")
    case["ref_valid"][:] = False
    loss, grads = run(case, backend, form=form)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grads["x"]) == 0 and torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_inbatch_pairs_exclude_self(backend, form):
    """In-batch, row i is not its own positive. With s = 2 and b = 1.5 the pair (i, i) would
    add z⁺ = b − s(1 − m) = −0.3 to every row's positives (pairs: + softplus(−0.3) ≈ 0.55;
    lse: ≥ 0.019 here), far above the tolerance (at the usual s = 64, z⁺ ≈ −50 and no test
    could see it)."""
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode="inbatch", seed=4)
    case["bias"] = torch.tensor([1.5])
    loss, _ = check(case, backend, torch.float32, form=form, scale=2.0, reduction="none")
    with_self = fused_uss_loss(case["x"], case["labels"], 1.5, case["x"], case["labels"],
                               scale=2.0, form=form, reduction="none", backend="reference")
    assert (with_self - loss).min() > 0.01


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("mode", MODES)
def test_zero_embeddings(backend, mode):
    """A zero row is legal (x̂ = x / eps = 0): its cosines are 0 and its gradient finite. A
    row below the eps (here half of it, 5e-6) is not normalised either: x̂ = x / eps, of norm
    0.5, and its gradient has no projection term (the plain derivative of x / eps; with one,
    that row's gradient would be off by about a quarter)."""
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode=mode)
    case["x"][[0, 5]] = 0.0
    case["x"][9] *= 5e-6 / case["x"][9].norm()
    if mode != "inbatch":
        case["ref"][[1, 7]] = 0.0
        case["ref"][11] *= 5e-6 / case["ref"][11].norm()
    check(case, backend, torch.float32, form="pairs")


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_nan_propagates(backend, form):
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode="bank")
    case["x"][3, 2] = float("nan")
    loss = fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], form=form,
                          reduction="none", backend=backend)
    assert torch.isnan(loss[3]) and torch.isfinite(torch.cat([loss[:3], loss[4:]])).all()


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("official_clamp", [False, True])
@pytest.mark.parametrize("mode,vector_bias", [("bank", False), ("bank", True),
                                              ("inbatch", False), ("centres", True)])
def test_gradcheck(backend, form, official_clamp, mode, vector_bias):
    case = make_case("uss", 9, 13, 6, torch.float64, "cpu", mode=mode, vector_bias=vector_bias,
                     num_labels=3 if mode == "inbatch" else None)
    names = grad_names(case)

    def f(*tensors):
        kw = dict(case, **dict(zip(names, tensors)))
        return fused_uss_loss(kw["x"], kw["labels"], kw["bias"], kw["ref"], None, kw["ref_valid"],
                              scale=16.0, form=form, official_clamp=official_clamp,
                              reduction="none", backend=backend)

    inputs = [case[k].detach().clone().requires_grad_() for k in names]
    assert passes_gradcheck(f, inputs, backend)


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("mode", MODES)
def test_bias_init(backend, mode):
    case = make_case("uss", 37, 53, 24, torch.float32, "cpu", mode=mode)
    got = uss_bias_init(case["x"], case["labels"], case["ref"], ref_valid=case["ref_valid"],
                        backend=backend)
    # the official formula on dense cosines (head.py's Unified_Threshold... first call)
    xh = reference.normalize(case["x"].double())
    rh = xh if mode == "inbatch" else reference.normalize(case["ref"].double())
    ref_labels = case["labels"] if mode == "inbatch" else torch.arange(53)
    valid = case["ref_valid"] if case["ref_valid"] is not None else torch.ones(len(rh), dtype=bool)
    neg = (case["labels"][:, None] != ref_labels[None, :]) & valid[None, :]
    lse = torch.logsumexp((64 * xh @ rh.T).masked_fill(~neg, -float("inf")), dim=1)
    expected = lse[torch.isfinite(lse)].mean()
    assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected))


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_no_bxn_allocation(backend, form, mode):
    """Nothing of B·N elements is created in forward or backward, where B·N ≫ (B+N)·D."""
    b, n, d = 64, 1024, 16
    case = make_case("uss", b, n, d, torch.float32, "cpu", mode=mode, vector_bias=mode == "centres")
    n_ref = b if mode == "inbatch" else n
    limit = b * n_ref
    x = case["x"].requires_grad_()
    bias = case["bias"].requires_grad_()
    ref = case["ref"].requires_grad_() if mode == "centres" else case["ref"]
    with LargestAllocation() as mode_all:
        loss = fused_uss_loss(x, case["labels"], bias, ref, None, case["ref_valid"], form=form,
                              backend=backend)
        loss.backward()
    assert mode_all.largest < min(limit, n * b), (mode_all.largest, mode_all.where)
    # inside the custom ops' bodies too (the mode does not see through a custom op call)
    if backend == "triton":
        from unitsface_kernels.triton.uss_loss import uss_backward, uss_forward

        ref_t = x.detach() if mode == "inbatch" else ref.detach()
        ref_labels = case["labels"] if mode == "inbatch" else torch.arange(n)
        opts = UssOptions(64.0, 0.1, form == "lse", False, mode == "inbatch", 1e-5).pack()
        with LargestAllocation() as inner:
            rows, stats, nx, nr = uss_forward(x.detach(), ref_t, case["labels"], ref_labels,
                                              case["ref_valid"], bias.detach(), opts)
            uss_backward(torch.ones_like(rows), x.detach(), ref_t, case["labels"], ref_labels,
                         case["ref_valid"], bias.detach(), stats, nx, nr, opts,
                         [True, mode == "centres", True])
        assert inner.largest < limit, (inner.largest, inner.where)


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss")[:1])  # triton
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_runs_the_fused_engine(backend, form, mode, monkeypatch):
    """docs/design.md §2: the USS family runs on the fused engine's kernels, bank programs
    alone — forward: one cosine launch over all references; backward, per chunk of
    references: the cosine kernel, ∂ref (when the reference rows take a gradient: in-batch,
    class centres) and ∂x — and matches the reference."""
    from unitsface_kernels.triton import fused

    names = ("_cos_kernel", "_dw_kernel", "_dx_kernel")
    counters = {name: CountingKernel(getattr(fused, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(fused, name, counter)
    b, n = (150, 0) if mode == "inbatch" else (37, 301)
    case = make_case("uss", b, n, 16, torch.float32, "cpu", mode=mode, seed=11,
                     vector_bias=mode == "centres")
    check(case, backend, torch.float32, form=form)
    n_ref = b if mode == "inbatch" else n
    chunks = fused.plan(b, n_ref, 16, torch.float32, torch.device("cpu"), 1).n_chunks
    assert chunks >= 2
    cos = counters["_cos_kernel"].launches
    assert all(k["BANK_PROGS"] and not k["W_PROGS"] and k["HAS_LABELS"] for k in cos)
    assert all(k["IN_BATCH"] == (mode == "inbatch") for k in cos)
    assert len([k for k in cos if not k["BACKWARD"]]) == 1
    assert len([k for k in cos if k["BACKWARD"]]) == chunks
    ref_grad = mode != "bank"
    assert len(counters["_dw_kernel"].launches) == (chunks if ref_grad else 0)
    assert len(counters["_dx_kernel"].launches) == chunks


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss")[:1])  # triton
@pytest.mark.parametrize("form", FORMS)
def test_triton_reads_other_dtype_refs_rounded(backend, form):
    """Reference rows in fp32 with bf16 embeddings (docs/design.md §4) are read rounded to
    bf16 in registers: the loss and ∂x are those of the call on a bf16 copy, bit for bit, and
    ∂ref, in fp32, rounds to that call's."""
    case = make_case("uss", 37, 53, 24, torch.bfloat16, "cpu", mode="centres", seed=2)
    ref32 = torch.randn(53, 24, generator=torch.Generator().manual_seed(5))
    out = {}
    for ref in (ref32, ref32.to(torch.bfloat16)):
        x = case["x"].clone().requires_grad_()
        r = ref.clone().requires_grad_()
        loss = fused_uss_loss(x, case["labels"], case["bias"], r, form=form, reduction="none",
                              backend=backend)
        loss.sum().backward()
        out[ref.dtype] = (loss.detach(), x.grad, r.grad)
    mixed, copy = out[torch.float32], out[torch.bfloat16]
    assert torch.equal(mixed[0], copy[0]) and torch.equal(mixed[1], copy[1])
    assert mixed[2].dtype == torch.float32
    assert torch.equal(mixed[2].to(torch.bfloat16), copy[2])


def test_allocation_detector_sees_the_reference_matrix():
    """The eager reference does form B×N: the detector above would catch a fused backend that
    did."""
    case = make_case("uss", 64, 2048, 16, torch.float32, "cpu", mode="bank")
    with LargestAllocation() as mode_all:
        fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], backend="reference")
    assert mode_all.largest >= 64 * 2048


def test_torch_compile_fullgraph():
    backend = "triton" if fused_backends("cpu", "uss")[0] == "triton" else "reference"
    case = make_case("uss", 21, 45, 16, torch.float32, "cpu", mode="bank")

    def f(x, bias):
        return fused_uss_loss(x, case["labels"], bias, case["ref"], ref_valid=case["ref_valid"],
                              form="lse", backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = case["x"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_()
    loss = compiled(x, bias)
    loss.backward()
    x2 = case["x"].clone().requires_grad_()
    bias2 = case["bias"].clone().requires_grad_()
    f(x2, bias2).backward()
    torch.testing.assert_close(loss, f(x2.detach(), bias2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, bias2.grad)


def test_reference_hand_computed():
    """Two rows, two bank rows, unit vectors at known angles; s = 2, m = 0.1, b = 0.5."""
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    sp = lambda z: torch.log1p(torch.exp(torch.tensor(z, dtype=torch.float64)))  # noqa: E731
    # row 0: positive j=0 (cos 1), negative j=1 (cos 0.6); row 1: negative j=0 (cos 0),
    # positive j=1 (cos 0.8)
    row0 = sp(0.5 - 2 * (1 - 0.1)) + sp(2 * 0.6 - 0.5)
    row1 = sp(2 * 0 - 0.5) + sp(0.5 - 2 * (0.8 - 0.1))
    got = reference.uss_loss(x, labels, torch.tensor(0.5), bank, scale=2.0, margin=0.1,
                             reduction="none")
    torch.testing.assert_close(got, torch.stack([row0, row1]))
    # lse form with one member per set is the same as pairs
    got_lse = reference.uss_loss(x, labels, torch.tensor(0.5), bank, scale=2.0, margin=0.1,
                                 form="lse", reduction="none")
    torch.testing.assert_close(got_lse, got)


def test_reference_matches_official_formula():
    """The official UniTSFace head (its USS forward, restated): clamp, log(1+exp), one-hot
    masks, sum over the bank, mean over rows."""
    g = torch.Generator().manual_seed(0)
    x, feat_mem = torch.randn(16, 32, generator=g), torch.randn(40, 32, generator=g)
    labels, bias, s, m = torch.randint(0, 40, (16,), generator=g), torch.tensor([7.5]), 64.0, 0.1
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(x, eps=1e-5),
                                     torch.nn.functional.normalize(feat_mem, eps=1e-5))
    one_hot = torch.zeros(16, 40, dtype=torch.bool).scatter_(1, labels[:, None], True)
    p = torch.log(1 + torch.exp(-(s * (cos - m) - bias).clamp(-s, s)))
    n = torch.log(1 + torch.exp((s * cos - bias).clamp(-s, s)))
    official = (one_hot * p + (~one_hot) * n).sum(1).mean()
    ours = reference.uss_loss(x, labels, bias, feat_mem, scale=s, margin=m, official_clamp=True)
    torch.testing.assert_close(ours, official)
    # the per-class bias of the official sample-to-sample BCE head
    vec = torch.rand(1, 40, generator=g) * 10
    p = torch.log(1 + torch.exp(-(s * (cos - m) - vec).clamp(-s, s)))
    n = torch.log(1 + torch.exp((s * cos - vec).clamp(-s, s)))
    official = (one_hot * p + (~one_hot) * n).sum(1).mean()
    ours = reference.uss_loss(x, labels, vec, feat_mem, scale=s, margin=m, official_clamp=True)
    torch.testing.assert_close(ours, official)


def _clamp_both_bounds_case(form):
    """(x, bank, labels, loss, ∂b) at s = 8, b = 5, m = 0.1: a positive at cos = −0.6 has
    z⁺ = 5 − 8·(−0.7) = 10.6 > s (the upper bound is active), a negative at cos = −0.6 has
    z⁻ = −4.8 − 5 = −9.8 < −s (the lower bound), a negative at cos = 0.8 has z⁻ = 1.4
    (inside). By value: gradchecks cannot see a wrong bound (the loss is flat there)."""
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bank = torch.tensor([[-0.6, 0.8], [-0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0])
    sp = lambda z: float(torch.nn.functional.softplus(torch.tensor(z, dtype=torch.float64)))  # noqa: E731
    if form == "pairs":
        want = sp(8.0) + sp(-8.0) + sp(1.4)
        want_db = 0.0 - torch.sigmoid(torch.tensor(1.4, dtype=torch.float64)).item()
    else:  # A = 10.6 → clamped to 8; B = lse(−9.8, 1.4) (inside)
        big_b = float(torch.logsumexp(torch.tensor([-9.8, 1.4], dtype=torch.float64), 0))
        want = sp(8.0) + sp(big_b)
        want_db = -torch.sigmoid(torch.tensor(big_b, dtype=torch.float64)).item()
    return x, bank, labels, want, want_db


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_official_clamp_both_bounds_by_value(backend, form):
    """The loss by value, ∂b of the clamped terms zero (:func:`_clamp_both_bounds_case`)."""
    x, bank, labels, want, want_db = _clamp_both_bounds_case(form)
    bias = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    loss = fused_uss_loss(x, labels, bias, bank, scale=8.0, margin=0.1, form=form,
                          official_clamp=True, backend=backend)
    loss.backward()
    assert abs(loss.item() - want) <= 1e-9 * want
    assert abs(bias.grad.item() - want_db) <= 1e-9


@pytest.mark.parametrize("form", FORMS)
def test_reference_ops_clamp_both_bounds_by_value(form):
    """The same through the per-op reference that the class-parallel code runs
    (reference.uss_fwd / uss_bwd): its backward reads the factors σ(A)·[A inside the clamp],
    σ(B)·[B inside] that the forward saves, where the reference backend's autograd never
    forms them."""
    x, bank, labels, want, want_db = _clamp_both_bounds_case(form)
    opts = UssOptions(8.0, 0.1, form == "lse", True, False, 1e-5).pack()
    bias, ref_labels = torch.tensor([5.0], dtype=torch.float64), torch.arange(3)
    rows, stats, nx, nr = reference.uss_fwd(x, bank, labels, ref_labels, None, bias, opts)
    _, _, db = reference.uss_bwd(torch.ones_like(rows), x, bank, labels, ref_labels, None, bias,
                                 stats, nx, nr, opts, [False, False, True])
    assert abs(rows.item() - want) <= 1e-9 * want
    assert abs(db.item() - want_db) <= 1e-9


@pytest.mark.parametrize("backend", all_backends("cpu", "uss"))
def test_label_bound(backend):
    """Bank mode: labels in [0, N) — N − 1 is a class, N is out of range."""
    case = make_case("uss", 6, 12, 8, torch.float32, "cpu", mode="bank")
    case["labels"][2] = 11
    check(case, backend)
    case["labels"][2] = 12
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\).*got labels\[2\] = 12"):
        run(case, backend)


# ---------------------------------------------------------------- bad input (docs/design.md §5)

def _good():
    return make_case("uss", 8, 12, 6, torch.float32, "cpu", mode="bank")


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(x=c["x"][0]), "x must be 2-D"),
    (lambda c: c.update(x=c["x"][:0], labels=c["labels"][:0]), "x is empty"),
    (lambda c: c.update(x=c["x"].long()), "x must be float16"),
    (lambda c: c.update(labels=c["labels"][:-1]), r"labels must have shape \(8,\)"),
    (lambda c: c.update(labels=c["labels"].float()), "labels must be an integer tensor"),
    (lambda c: c.update(labels=c["labels"] + 100), r"labels must lie in \[0, 12\)"),
    (lambda c: c.update(labels=c["labels"] - 100), r"labels must lie in \[0, 12\)"),
    (lambda c: c.update(ref=c["ref"][:, :5]), "ref has embedding size 5 but x has 6"),
    (lambda c: c.update(ref=c["ref"].double()), "ref has dtype torch.float64"),
    (lambda c: c.update(ref=c["ref"][:0]), "ref has no rows"),
    (lambda c: c.update(ref_valid=c["ref_valid"].long()), "ref_valid must be a bool tensor"),
    (lambda c: c.update(ref_valid=c["ref_valid"][:3]), r"ref_valid must have shape \(12,\)"),
    (lambda c: c.update(bias=torch.zeros(5)), "bias must hold 1 value"),
    (lambda c: c.update(bias=torch.zeros(1, dtype=torch.long)), "bias must be a floating"),
    (lambda c: c.update(bias="b"), "bias must be a torch.Tensor"),
])
def test_bad_inputs(mutate, match):
    case = _good()
    mutate(case)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], None,
                       case["ref_valid"], backend="reference")


@pytest.mark.parametrize("kw,match", [
    (dict(form="cosine"), "form must be one of"),
    (dict(reduction="max"), "reduction must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(scale=0.0), "scale must be positive"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(margin="0.1"), "margin must be a real number"),
    (dict(margin=float("nan")), "margin must be finite"),
    (dict(margin=1.5), r"margin must lie in \[-1, 1\]"),
    (dict(official_clamp=0.5), "official_clamp must be a bool"),
])
def test_bad_options(kw, match):
    case = _good()
    with pytest.raises((ValueError, TypeError), match=match):
        fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], **kw)


def test_bad_ref_labels_and_in_batch_options():
    case = _good()
    with pytest.raises(ValueError, match="ref_labels must have shape"):
        fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"],
                       ref_labels=torch.arange(5))
    with pytest.raises(ValueError, match="ref_labels and ref_valid need ref"):
        fused_uss_loss(case["x"], case["labels"], case["bias"], ref_valid=case["ref_valid"])


def test_non_contiguous_inputs_are_accepted():
    case = _good()
    x_t = case["x"].t().contiguous().t()  # same values, column-major
    assert not x_t.is_contiguous()
    a = fused_uss_loss(x_t, case["labels"], case["bias"], case["ref"], backend="reference")
    b = fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], backend="reference")
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

CUDA_CASES = [(torch.bfloat16, 300, 5003, 512), (torch.float32, 300, 5003, 512),
              (torch.bfloat16, 1, 1000, 512), (torch.float16, 257, 777, 130)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "uss"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,b,n,d", CUDA_CASES)
def test_cuda_parity(backend, dtype, form, mode, b, n, d):
    case = make_case("uss", b, n, d, dtype, "cuda", mode=mode, vector_bias=mode == "centres")
    check(case, backend, dtype, form=form)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fp64_backends("cuda", "uss"))
@pytest.mark.parametrize("form", FORMS)
def test_cuda_gradcheck(backend, form):
    case = make_case("uss", 9, 13, 6, torch.float64, "cuda", mode="centres", vector_bias=True)

    def f(x, bias, ref):
        return fused_uss_loss(x, case["labels"], bias, ref, scale=16.0, form=form,
                              reduction="none", backend=backend)

    inputs = [case[k].detach().clone().requires_grad_() for k in ("x", "bias", "ref")]
    assert passes_gradcheck(f, inputs, backend)


@pytest.mark.cuda
def test_cuda_triton_refuses_float64():
    case = make_case("uss", 9, 13, 6, torch.float64, "cuda", mode="bank")
    with pytest.raises(TypeError, match="no float64 kernels for GPUs"):
        fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], backend="triton")
