"""The native backend (csrc/: chunked ATen GEMM + fused epilogue) on its own: parity with the
float64 reference across chunk sizes, CPU instruction sets and intra-op thread counts,
gradcheck, edge cases, invalid bank rows, the margin options, the fused forward (row_grads),
the op-level contract (torch.library.opcheck against contract.py's schemas and fakes), and the
memory bound (no B×N block, checked with the profiler, which sees allocations made inside C++
ops).

The shared suites (test_uss.py, test_unitsface.py, test_margin_softmax.py) run "native" too;
this file adds what only the native backend has. Cases come from helpers.make_case and are
compared with helpers.check, through the public functions with backend="native"; op-level
checks call torch.ops.unitsface.*_native.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import subprocess

import pytest
import torch

from helpers import (DTYPES, FORMS, MARGINS, assert_rows_close, check,
                     check_empty_bank_is_softmax_alone, check_frozen_x,
                     check_invalid_rows_reach_nothing, check_nan_in_valid_bank_row, grad_names,
                     leaves_of, loss_of, make_case, run, same_label_and_zero_rows, with_tiny_rows)
from unitsface_kernels import (backends, fused_margin_softmax_loss, fused_unitsface_loss,
                               fused_uss_loss, native, options, reference, uss_bias_init)

pytestmark = pytest.mark.skipif(
    not (native.has_family("uss") and native.has_family("unitsface")),
    reason="the native extension (uss, unitsface ops) is not built")

OPS = torch.ops.unitsface
# Elements per chunk buffer: tiny budgets force many chunks (and 1-column chunks), the
# default exercises the single-chunk path of these small shapes.
BUDGETS = ["1", "97", "1000", None]
ISAS = ["base", "avx2", "avx512"]
USS_MODES = ["bank", "inbatch", "centres"]
SOFTMAX_MARGINS = list(MARGINS)  # cosface, arcface, combined, arcface_st, arcface_easy


def cpu_isa() -> str | None:
    """The widest of the extension's instruction sets that this CPU runs, from /proc/cpuinfo's
    flags (the same features csrc/cpu/row_kernels.h asks the CPU for); None off x86 Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
    except (OSError, StopIteration):
        return None
    flags = set(line.split(":", 1)[1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "bmi2"} <= flags else "base"


def capped_isa(cap: str) -> str:
    """The instruction set the row kernels must run under UNITSFACE_NATIVE_ISA=cap."""
    widest = cpu_isa() or "base"
    return ISAS[min(ISAS.index(cap), ISAS.index(widest))]


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("UNITSFACE_NATIVE_ISA", request.param)
    if cpu_isa() is not None:  # the cap is what the row kernels run (read at every call)
        assert native.selected_isa() == capped_isa(request.param)
    return request.param


def test_selected_isa(monkeypatch):
    """_C reports the instruction set its row kernels run: this CPU's widest (as /proc/cpuinfo
    says), capped by UNITSFACE_NATIVE_ISA; an unknown cap is an error naming the variable."""
    monkeypatch.delenv("UNITSFACE_NATIVE_ISA", raising=False)
    widest = native.selected_isa()
    assert widest in ISAS
    if cpu_isa() is not None:
        assert widest == cpu_isa()
    for cap in ISAS:
        monkeypatch.setenv("UNITSFACE_NATIVE_ISA", cap)
        assert native.selected_isa() == ISAS[min(ISAS.index(cap), ISAS.index(widest))]
    monkeypatch.setenv("UNITSFACE_NATIVE_ISA", "sse9")
    with pytest.raises(ValueError, match="UNITSFACE_NATIVE_ISA must be base, avx2 or avx512"):
        native.selected_isa()
    case = uss_case("bank", 5, 30, 8)
    with pytest.raises(ValueError, match="UNITSFACE_NATIVE_ISA"):
        OPS.uss_fwd_native(*uss_args(case))


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def uss_case(mode, b=37, n=53, d=70, dtype=torch.float32, device="cpu", **kw):
    kw.setdefault("vector_bias", mode == "centres")
    return make_case("uss", b, n, d, dtype, device, mode=mode, **kw)


def unitsface_case(b=37, c=301, d=70, dtype=torch.float32, device="cpu", **kw):
    return make_case("unitsface", b, c, d, dtype, device, **kw)


def family_kw(case, form, official_clamp=False, **kw):
    """The keyword arguments of the case's public function for a USS form and clamp."""
    if case["family"] == "uss":
        return dict(form=form, official_clamp=official_clamp, **kw)
    if case["family"] == "unitsface":
        return dict(uss_form=form, official_clamp=official_clamp, **kw)
    return kw


# ---------------------------------------------------------------- parity: chunks and ISAs

@pytest.mark.parametrize("budget", BUDGETS, indirect=True)
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", USS_MODES)
@pytest.mark.parametrize("official_clamp", [False, True])
def test_uss_chunks_and_isas(budget, isa, form, mode, official_clamp):
    case = uss_case(mode, seed=7)
    check(case, "native", form=form, official_clamp=official_clamp, scale=32.0)


@pytest.mark.parametrize("budget", BUDGETS, indirect=True)
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("margins", ["cosface", "arcface", "combined"])
def test_unitsface_chunks_and_isas(budget, isa, form, sampled, vector_bias, margins):
    case = unitsface_case(sampled=sampled, vector_bias=vector_bias, seed=11)
    check(case, "native", uss_form=form, uss_weight=0.7, **MARGINS[margins])


@pytest.mark.parametrize("budget", ["97", None], indirect=True)
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("form", FORMS)
def test_unitsface_frozen_x_chunks_and_isas(budget, isa, form):
    """x without a gradient: the plain forward and backward (no per-row gradients)."""
    case = unitsface_case(sampled=True, vector_bias=True, seed=5)
    check_frozen_x(case, uss_form=form, margin_arc=0.3, margin_cos=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_unitsface_dtypes_many_chunks(dtype, form, monkeypatch):
    """Half types are upcast chunk by chunk on the CPU; the loss stays fp32 (fp64)."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "500")
    case = unitsface_case(dtype=dtype, sampled=True, vector_bias=True, seed=2)
    check(case, "native", uss_form=form, margin_arc=0.5, margin_cos=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", USS_MODES)
def test_uss_dtypes_many_chunks(dtype, mode, monkeypatch):
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "500")
    check(uss_case(mode, dtype=dtype, seed=3), "native", form="lse")


# ---------------------------------------------------------------- threads (the split merge)

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family,kw", [
    ("uss", dict(mode="bank")), ("uss", dict(mode="inbatch")), ("uss", dict(mode="centres")),
    ("unitsface", dict(sampled=False)), ("unitsface", dict(sampled=True, vector_bias=True)),
    ("softmax", dict(sampled=True))])
def test_thread_counts_small_chunks(threads, form, family, kw, monkeypatch):
    """With 2 intra-op threads and many chunks the sweep runs in 2 splits whose statistics
    (sums, (max, sum-exp) pairs, the fused forward's accumulators) are merged at the end; with
    1 thread there is one split."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "150")
    if family == "uss":
        kw = dict(kw, vector_bias=kw["mode"] == "centres")
    case = make_case(family, 37, 53 if family == "uss" else 301, 24, **kw)
    with num_threads(threads):
        check(case, "native", **family_kw(case, form))
        if family != "uss":
            check_frozen_x(case, **family_kw(case, form))


# ---------------------------------------------------------------- gradcheck (float64)

@pytest.mark.parametrize("budget", ["5", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("official_clamp", [False, True])
@pytest.mark.parametrize("mode,vector_bias", [("bank", False), ("bank", True),
                                              ("inbatch", False), ("centres", True)])
def test_uss_gradcheck(budget, form, official_clamp, mode, vector_bias):
    case = uss_case(mode, 9, 13, 6, torch.float64, vector_bias=vector_bias,
                    num_labels=3 if mode == "inbatch" else None)
    names = grad_names(case)

    def f(*tensors):
        kw = dict(case, **dict(zip(names, tensors)))
        return loss_of(kw, "native", "none", scale=16.0, form=form,
                       official_clamp=official_clamp)

    inputs = [case[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("budget", ["5", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("with_bank", [True, False])
def test_unitsface_gradcheck(budget, form, sampled, vector_bias, with_bank):
    """Through the fused forward (x takes a gradient: row_grads) and the plain one (x
    frozen)."""
    case = unitsface_case(7, 17, 6, torch.float64, sampled=sampled, vector_bias=vector_bias,
                          rate=0.6)

    def f(x, w, bias):
        if not with_bank:
            return fused_margin_softmax_loss(x, w, case["labels"], index=case["index"],
                                             scale=8.0, margin_arc=0.3, margin_cos=0.1,
                                             reduction="none", backend="native")
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, margin_cos=0.1, uss_form=form,
                                    uss_weight=0.5, reduction="none", backend="native")

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    frozen = lambda w, bias: f(case["x"], w, bias)  # noqa: E731
    assert torch.autograd.gradcheck(frozen, inputs[1:], eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("margins", ["arcface_st", "arcface_easy"])
@pytest.mark.parametrize("official_clamp", [False, True])
def test_unitsface_gradcheck_options(margins, official_clamp):
    """The exact gradient of the easy margin, and the official clamp (a straight-through
    gradient is not the derivative of the loss: compared with the reference below instead)."""
    case = unitsface_case(7, 17, 6, torch.float64, sampled=True, rate=0.6)
    kw = dict(MARGINS[margins], scale=8.0, uss_form="lse", official_clamp=official_clamp,
              reduction="none", backend="native")
    if kw.get("arcface_grad") == "straight_through":
        check(case, "native", **{k: v for k, v in kw.items() if k not in ("reduction",
                                                                         "backend")})
        return

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"], **kw)

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- the margin options

@pytest.mark.parametrize("margins", SOFTMAX_MARGINS)
@pytest.mark.parametrize("family", ["softmax", "unitsface"])
@pytest.mark.parametrize("frozen_x", [False, True])
def test_margin_options(margins, family, frozen_x, monkeypatch):
    """arcface_grad="straight_through" (no fallback, f' = 1) and easy_margin against the
    reference, with targets on both sides of the fallback (m2 = 2.5: θ + m2 > π wherever
    cos < 0.80) and of the easy margin's cos = 0."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "300")
    case = make_case(family, 37, 301, 8, sampled=True, vector_bias=family == "unitsface")
    kw = dict(MARGINS[margins], scale=8.0)
    if kw["margin_arc"]:
        kw["margin_arc"] = 2.5
    if frozen_x:
        check_frozen_x(case, **kw)
    else:
        check(case, "native", **kw)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("frozen_x", [False, True])
def test_unitsface_official_clamp(form, sampled, frozen_x, monkeypatch):
    """official_clamp in the unitsface family's USS part: a small scale and a large threshold
    put many softplus arguments (pairs) and statistics (lse) outside [−s, s]."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "300")
    case = unitsface_case(sampled=sampled, vector_bias=True, seed=4)
    case["bias"] = case["bias"] * 0.5
    kw = dict(scale=4.0, uss_form=form, official_clamp=True)
    if frozen_x:
        check_frozen_x(case, **kw)
    else:
        check(case, "native", **kw)
    # and the clamp is not a no-op here
    clamped = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                                   case["bias"], bank_valid=case["bank_valid"],
                                   index=case["index"], backend="native", **kw)
    plain = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                                 case["bias"], bank_valid=case["bank_valid"],
                                 index=case["index"], backend="native",
                                 **dict(kw, official_clamp=False))
    assert not torch.allclose(clamped, plain)


# ---------------------------------------------------------------- invalid rows, NaN

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["uss", "unitsface"])
@pytest.mark.parametrize("frozen_x", [False, True])
@pytest.mark.parametrize("budget", ["300", None], indirect=True)
def test_nan_in_invalid_bank_row_reaches_nothing(form, family, frozen_x, budget):
    """A row marked invalid contributes nothing whatever it holds: NaN and inf in invalid bank
    rows give the loss and gradients of the same rows zeroed, all finite."""
    if family == "uss":
        case = uss_case("bank", seed=6)
        bank, valid = "ref", "ref_valid"
    else:
        case = unitsface_case(sampled=True, vector_bias=True, seed=6)
        bank, valid = "bank", "bank_valid"
    check_invalid_rows_reach_nothing(case, bank, valid, frozen_x, **family_kw(case, form))


@pytest.mark.parametrize("form", FORMS)
def test_nan_propagates(form):
    """NaN in x reaches its own row; NaN in a valid bank row reaches every row (each has it
    as a negative): never hidden."""
    case = unitsface_case(sampled=False)
    case["x"][3, 2] = float("nan")
    rows = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                                case["bias"], uss_form=form, reduction="none", backend="native")
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()
    case = uss_case("bank")
    case["x"][3, 2] = float("nan")
    rows = fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], form=form,
                          reduction="none", backend="native")
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()
    check_nan_in_valid_bank_row(unitsface_case(sampled=False), uss_form=form)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("budget", ["7", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", USS_MODES)
def test_uss_all_same_labels(budget, form, mode):
    check(uss_case(mode, d=24, num_labels=1), "native", form=form)


@pytest.mark.parametrize("budget", ["7", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
def test_unitsface_all_same_labels_and_zero_rows(budget, form):
    check(same_label_and_zero_rows(unitsface_case(d=24, sampled=True)), "native", uss_form=form)


@pytest.mark.parametrize("form", FORMS)
def test_uss_empty_bank(form):
    """Every bank slot unwritten: no pair at all, loss and gradients exactly 0."""
    case = uss_case("bank", d=24)
    case["ref_valid"][:] = False
    loss, grads = run(case, "native", form=form)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grads["x"]) == 0 and torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("form", FORMS)
def test_unitsface_empty_bank_is_softmax_alone(form):
    check_empty_bank_is_softmax_alone(unitsface_case(d=24, sampled=True), uss_form=form)


@pytest.mark.parametrize("mode", USS_MODES)
def test_uss_zero_embeddings(mode):
    case = uss_case(mode, d=24)
    case["x"][[0, 5]] = 0.0
    if mode != "inbatch":
        case["ref"][[1, 7]] = 0.0
    for form in FORMS:
        check(case, "native", form=form)


@pytest.mark.parametrize("budget", ["3", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vector_bias", [False, True])
def test_partial_fc_zero_gradient(budget, form, vector_bias):
    case = unitsface_case(d=24, sampled=True, vector_bias=vector_bias, rate=0.2)
    _, grads = check(case, "native", uss_form=form)  # checks the zeros
    sampled = torch.zeros(301, dtype=torch.bool)
    sampled[case["index"]] = True
    assert torch.count_nonzero(grads["centres"][~sampled]) == 0
    assert torch.count_nonzero(grads["centres"][sampled].abs().sum(1)) == int(sampled.sum())


def test_bias_init():
    case = uss_case("bank", d=24)
    got = uss_bias_init(case["x"], case["labels"], case["ref"], ref_valid=case["ref_valid"],
                        backend="native")
    want = uss_bias_init(case["x"], case["labels"], case["ref"], ref_valid=case["ref_valid"],
                         backend="reference")
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))


# ---------------------------------------------------------------- the op-level contract

def uf_options(form="lse", **kw):
    args = dict(scale=64.0, margin_arc=0.2, margin_cos=0.3, arcface_grad="exact",
                easy_margin=False, uss_margin=0.1, uss_form=form, uss_weight=0.7,
                official_clamp=False)
    args.update(kw)
    return options.unitsface_options(**args).pack()


def uf_args(case, form="lse", **kw):
    return (case["x"], case["centres"], case["bank"], case["labels"], case["index"],
            case["bank_valid"], case["bias"], None, uf_options(form, **kw))


def uss_args(case, form="lse"):
    ref = case["x"] if case["ref"] is None else case["ref"]
    ref_labels = case["labels"] if case["ref"] is None else torch.arange(ref.shape[0])
    packed = options.uss_options(scale=16.0, margin=0.1, form=form, official_clamp=False,
                                 in_batch=case["ref"] is None).pack()
    return (case["x"], ref, case["labels"], ref_labels, case["ref_valid"], case["bias"], packed)


# ---------------------------------------------------------------- the normalisation eps

@pytest.mark.parametrize("budget", ["97", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("row_grads", [False, True])
def test_unitsface_eps_from_the_options(budget, form, sampled, row_grads):
    """unitsface_{fwd,bwd}_native normalise with the options' eps (1e-12 here, as
    insightface's and pytorch-metric-learning's F.normalize), not a constant: rows of x, W and
    the bank with norms below 1e-5, at 1e-12 and below it match the reference's per-op forms
    read with the same options, and differ from them under the default eps."""
    case = unitsface_case(9, 40, 8, torch.float64, sampled=sampled, vector_bias=True, rate=0.5)
    labels = case["labels"]
    cols = case["index"] if sampled else torch.arange(40)
    targets = labels[:4] if not sampled else labels[torch.isin(labels, cols)][:4]
    case = dict(case, x=with_tiny_rows(case["x"], range(4)),
                centres=with_tiny_rows(case["centres"], targets.tolist()),
                bank=with_tiny_rows(case["bank"], cols[-4:].tolist()))
    args = uf_args(case, form, eps=1e-12)
    want = reference.unitsface_fwd(*args)
    got = OPS.unitsface_fwd_native(*args, row_grads)
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    valid = case["bank_valid"][cols]  # (an invalid bank row's norm is the op's own business)
    torch.testing.assert_close(got[4][valid], want[4][valid], rtol=1e-9, atol=1e-12)
    other = reference.unitsface_fwd(*uf_args(case, form))  # the default eps, 1e-5
    assert not torch.allclose(got[0], other[0], rtol=1e-3, atol=0)
    go = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    needs = [True, True, True]
    want_g = reference.unitsface_bwd(go, *args[:8], want[1], *want[2:], args[8], needs)
    got_g = OPS.unitsface_bwd_native(go, *args[:8], *got[1:], args[8], needs)
    for name, g, w in zip(("x", "centres", "bias"), got_g, want_g):
        assert_rows_close(name, g, w, 1e-8)
    # the tiny rows' ∂x is of order 1/eps: the eps was applied to them
    assert float(got_g[0][3].abs().max()) > 1e6


@pytest.mark.parametrize("budget", ["97", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", USS_MODES)
def test_uss_eps_from_the_options(budget, form, mode):
    """uss_{fwd,bwd}_native with eps = 1e-12 and rows of x and of the reference set below 1e-5,
    at 1e-12 and below it: the loss and every gradient (∂ref of class centres too) against the
    float64 reference formula with the same eps (autograd)."""
    case = uss_case(mode, 9, 30, 8, torch.float64, vector_bias=mode != "inbatch")
    x = with_tiny_rows(case["x"], range(4))
    ref = None if case["ref"] is None else with_tiny_rows(case["ref"], [0, 2, 5, 7])
    in_batch = ref is None
    ref_labels = case["labels"] if in_batch else torch.arange(30)
    packed = options.uss_options(scale=16.0, margin=0.1, form=form, official_clamp=False,
                                 in_batch=in_batch, eps=1e-12).pack()
    args = (x, x if in_batch else ref, case["labels"], ref_labels, case["ref_valid"],
            case["bias"], packed)
    rows, stats, nx, nr = OPS.uss_fwd_native(*args)
    want = reference.uss_fwd(*args)
    for g, w in zip((rows, stats, nx), want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    valid = slice(None) if case["ref_valid"] is None else case["ref_valid"]
    torch.testing.assert_close(nr[valid], want[3][valid], rtol=1e-9, atol=1e-12)
    default = reference.uss_fwd(*args[:6], options.uss_options(
        scale=16.0, margin=0.1, form=form, official_clamp=False, in_batch=in_batch).pack())
    assert not torch.allclose(rows, default[0], rtol=1e-3, atol=0)
    go = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    needs = [True, mode != "bank", True]
    got = OPS.uss_bwd_native(go, *args[:6], stats, nx, nr, packed, needs)
    if in_batch:  # x is the reference set too: its gradient is the row and the column side
        got = (got[0] + got[1], x.new_empty(0), got[2])
    leaves = {"x": x.clone().requires_grad_(), "bias": case["bias"].clone().requires_grad_()}
    if mode == "centres":
        leaves["ref"] = ref.clone().requires_grad_()
    eager = reference.uss_rows(leaves["x"], case["labels"], leaves["bias"],
                               None if in_batch else leaves.get("ref", ref),
                               None if in_batch else ref_labels, case["ref_valid"], scale=16.0,
                               margin=0.1, form=form, eps=1e-12)
    (eager * go).sum().backward()
    names = ("x", "ref", "bias")
    for name, g in zip(names, got):
        if name not in leaves:
            assert g.numel() == 0
            continue
        assert_rows_close(name, g, leaves[name].grad, 1e-8)


@pytest.mark.parametrize("cls", [options.UssOptions, options.UnitsfaceOptions])
def test_option_fields_match_the_dataclasses(cls):
    """csrc/options.h unpacks the packed options through its field table: the same names in
    the same order as the Python dataclass (a field added on one side only fails here)."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    assert native.require().option_fields(cls.__name__) == names
    with pytest.raises(ValueError, match="no settings struct"):
        native.require().option_fields("Options")


def test_option_flag_packing_is_checked_by_name():
    """A flag packed as anything but 0.0 / 1.0 is refused, naming the field."""
    case = uss_case("bank", 5, 30, 8)
    args = list(uss_args(case))
    packed = list(args[6])
    packed[[f.name for f in dataclasses.fields(options.UssOptions)].index("clamp")] = 0.5
    with pytest.raises(ValueError, match=r"UssOptions\.clamp is a flag"):
        OPS.uss_fwd_native(*args[:6], packed)
    with pytest.raises(ValueError, match="UssOptions has 6 fields, got 5"):
        OPS.uss_fwd_native(*args[:6], packed[:5])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
def test_labels_matching_no_column_have_no_target(form, sampled):
    """Class-parallel training relies on it: a label outside the columns (−1, or a class of
    another shard) has z_iy = 0 and no USS positive, so rows = lse + λ·USS(negatives)."""
    case = unitsface_case(9, 40, 8, torch.float64, sampled=sampled, rate=0.5)
    labels = case["labels"].clone()
    labels[:3] = -1
    if sampled:  # a class that the index does not hold
        outside = [c for c in range(40) if c not in set(case["index"].tolist())]
        labels[3] = outside[0]
    case = dict(case, labels=labels)
    args = uf_args(case, form, margin_arc=0.2, margin_cos=0.3)
    fwd = OPS.unitsface_fwd_native(*args, False)
    rows, stats = fwd[:2]
    cols = case["index"] if sampled else torch.arange(40)
    xh = reference.normalize(case["x"])
    cw = (xh @ reference.normalize(case["centres"][cols]).T).clamp(-1, 1)
    valid = case["bank_valid"][cols]
    cb = xh @ reference.normalize(reference.readable_rows(case["bank"][cols], valid)).T
    lse = torch.logsumexp(64.0 * cw, dim=1)
    missing = ~torch.isin(labels, cols)
    assert missing[:3].all() and (missing[3] or not sampled)
    torch.testing.assert_close(stats[0][missing], lse[missing])
    assert (stats[5][missing] == 0).all()
    z_neg = 64.0 * cb - case["bias"]
    if form == "pairs":
        uss = torch.where(valid, reference.softplus(z_neg), 0.0).sum(1)
    else:
        uss = reference.softplus(torch.logsumexp(z_neg.masked_fill(~valid, -math.inf), dim=1))
    torch.testing.assert_close(rows[missing], (lse + 0.7 * uss)[missing])
    # and the backward runs (no target: the softmax gradient is s·p everywhere)
    out = OPS.unitsface_bwd_native(torch.ones(9, dtype=torch.float64), *args[:8], *fwd[1:],
                                   args[8], [True, True, True])
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_row_grads_match_plain(form, sampled, vector_bias, threads, device, monkeypatch):
    """unitsface_fwd_native(row_grads=True) = the plain forward plus dx_rows = ∂L_i/∂x_i and
    db_rows = ∂L_i/∂b; its backward (which uses them) equals the plain backward for any
    upstream gradient (CPU, and the CUDA sweep with its own kernels)."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "300")
    case = unitsface_case(21, 301, 40, torch.float64, device, sampled=sampled,
                          vector_bias=vector_bias, seed=9)
    args = uf_args(case, form, margin_arc=0.5, margin_cos=0.1, official_clamp=True, scale=16.0)
    with num_threads(threads):
        plain = OPS.unitsface_fwd_native(*args, False)
        fused = OPS.unitsface_fwd_native(*args, True)
        assert plain[5].numel() == 0 and plain[6].numel() == 0
        assert fused[5].shape == (21, 40) and fused[6].shape == (21,)
        for a, b in zip(plain[:5], fused[:5]):
            torch.testing.assert_close(a, b)
        go = torch.rand(21, dtype=torch.float64, device=device)
        want = OPS.unitsface_bwd_native(go, *args[:8], *plain[1:], args[8], [True, True, True])
        got = OPS.unitsface_bwd_native(go, *args[:8], *fused[1:], args[8], [True, True, True])
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_native_keeps_no_exponentials(dtype, row_grads, device):
    """The native forward ignores saved_exp_bytes and returns exps and exp_rows empty, in x's
    dtype and the statistics' (the triton backend's stored exponentials, docs/design.md §2);
    its backward refuses non-empty ones rather than ignore what another backend stored."""
    case = unitsface_case(5, 30, 8, dtype, device, sampled=True, vector_bias=True)
    args = uf_args(case)
    out = OPS.unitsface_fwd_native(*args, row_grads)
    budget = OPS.unitsface_fwd_native(*args[:8], uf_options(saved_exp_bytes=2**30), row_grads)
    for a, b in zip(out, budget):
        torch.testing.assert_close(a, b)
    exps, exp_rows = out[7:]
    assert exps.shape == (0,) and exps.dtype == dtype and exps.device == case["x"].device
    assert exp_rows.shape == (0,) and exp_rows.dtype == out[1].dtype
    go = torch.rand(5, dtype=dtype, device=device)
    stored = torch.ones(3, device=device)
    for bad in ((stored.to(dtype), exp_rows), (exps, stored.to(out[1].dtype))):
        with pytest.raises(ValueError, match="exps and exp_rows must be empty"):
            OPS.unitsface_bwd_native(go, *args[:8], *out[1:7], *bad, args[8], [True] * 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("with_bank", [True, False])
def test_opcheck_unitsface(dtype, row_grads, with_bank):
    """The schemas of contract.py, the fakes' shapes and dtypes (empty tensors for what is not
    formed), no aliasing, autograd through the registered rule."""
    case = unitsface_case(5, 30, 8, dtype, sampled=True, vector_bias=True)
    if not with_bank:
        case = dict(case, bank=None, bank_valid=None, bias=None)
    args = uf_args(case)
    grads = [case[k].clone().requires_grad_() for k in ("x", "centres")]
    torch.library.opcheck(OPS.unitsface_fwd_native.default, (*grads, *args[2:], row_grads))
    out = OPS.unitsface_fwd_native(*args, row_grads)
    for needs in ([True, True, True], [False, True, False], [False, False, False]):
        bwd_args = (torch.rand(5), *args[:8], *out[1:], args[8], needs)
        torch.library.opcheck(OPS.unitsface_bwd_native.default, bwd_args)
        got = OPS.unitsface_bwd_native(*bwd_args)
        # ∂centres holds the rows of the index's classes (contract.py)
        centres_rows = case["centres"][case["index"]]
        for g, need, t in zip(got, needs, (case["x"], centres_rows, case["bias"])):
            if need and t is not None:
                assert (g.shape, g.dtype) == (t.shape, t.dtype)
            else:
                assert g.numel() == 0 and g.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", USS_MODES)
def test_opcheck_uss(dtype, mode):
    case = uss_case(mode, 5, 30, 8, dtype, vector_bias=True)
    if mode == "inbatch":
        case["bias"] = case["bias"][:1]
    args = uss_args(case)
    x = case["x"].clone().requires_grad_()
    ref = x if mode == "inbatch" else args[1].clone().requires_grad_(mode == "centres")
    torch.library.opcheck(OPS.uss_fwd_native.default, (x, ref, *args[2:]))
    out = OPS.uss_fwd_native(*args)
    for needs in ([True, mode != "bank", True], [False, False, True], [False, False, False]):
        bwd_args = (torch.rand(5), *args[:6], *out[1:], args[6], needs)
        torch.library.opcheck(OPS.uss_bwd_native.default, bwd_args)


@pytest.mark.parametrize("family", ["uss", "unitsface"])
def test_torch_compile_fullgraph(family):
    case = unitsface_case(21, 45, 16, sampled=True)

    def f(x, w, bias):
        if family == "uss":
            return fused_uss_loss(x, case["labels"], bias, w, form="lse", backend="native")
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    backend="native")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    loss = compiled(*leaves)
    loss.backward()
    again = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    expected = f(*again)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, b in zip(leaves, again):
        torch.testing.assert_close(a.grad, b.grad)


def test_backend_auto_picks_native_on_cpu():
    assert backends.resolve("auto", torch.device("cpu"), "uss") == "native"
    assert backends.resolve("auto", torch.device("cpu"), "unitsface") == "native"


# ---------------------------------------------------------------- memory (docs/design.md §7)

def _largest_cpu_allocation(fn):
    """Bytes of the largest single CPU allocation while fn runs, from the profiler's memory
    events, which come from the CPU allocator itself: they include the tensors that C++ ops
    allocate internally (a TorchDispatchMode does not see inside a custom op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.nbytes() > 0),
               default=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("frozen_x", [False, True])
def test_unitsface_no_bxs_allocation(form, frozen_x, monkeypatch):
    b, c, d = 64, 4096, 16
    case = unitsface_case(b, c, d, vector_bias=True)
    budget = 16 * 1024  # elements per chunk buffer: 256-column chunks
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", str(budget))
    leaves = {k: case[k].clone().requires_grad_(k != "x" or not frozen_x)
              for k in ("x", "centres", "bias")}

    def step():
        fused_unitsface_loss(leaves["x"], case["labels"], leaves["centres"], case["bank"],
                             leaves["bias"], bank_valid=case["bank_valid"], uss_form=form,
                             backend="native").backward()

    largest = _largest_cpu_allocation(step)
    # ∂W (C × D) is the largest tensor the step must write; no B × C block exists
    assert largest <= c * d * 4, largest
    assert c * d < b * c
    # the detector sees allocations made inside the ops: with a larger budget the largest
    # allocation is the (bigger) chunk buffer itself, one B × 2048 block per split (thread)
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", str(b * 2048))
    largest = _largest_cpu_allocation(step)
    splits = min(torch.get_num_threads(), c // 2048)
    assert largest == splits * b * 2048 * 4, largest


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", USS_MODES)
def test_uss_no_bxn_allocation(form, mode, monkeypatch):
    b, n, d = 64, 2048, 16
    case = uss_case(mode, b, n, d)
    n_ref = b if mode == "inbatch" else n
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", str(b * 16))
    leaves = leaves_of(case)

    def step():
        loss_of(leaves, "native", form=form).backward()

    largest = _largest_cpu_allocation(step)
    assert largest < b * n_ref * 4, largest
    assert largest >= b * 16 * 4  # the chunk buffer is seen


def test_profiler_sees_the_reference_matrix():
    """The eager reference does form B×N: the allocation check above would catch it."""
    case = uss_case("bank", 64, 2048, 16)
    largest = _largest_cpu_allocation(lambda: loss_of(case, "reference"))
    assert largest >= 64 * 2048 * 4


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("budget", ["100000", None], indirect=True)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", USS_MODES)
def test_cuda_uss_parity(budget, dtype, form, mode):
    check(uss_case(mode, 300, 5003, 130, dtype, "cuda"), "native", form=form)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", ["100000", None], indirect=True)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("margins", ["arcface", "arcface_st", "arcface_easy"])
def test_cuda_unitsface_parity(budget, dtype, form, sampled, margins):
    case = unitsface_case(257, 3001, 130, dtype, "cuda", sampled=sampled, vector_bias=sampled)
    check(case, "native", uss_form=form, official_clamp=sampled, **MARGINS[margins])


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
def test_cuda_gradcheck(form):
    case = unitsface_case(7, 17, 6, torch.float64, "cuda", sampled=True, vector_bias=True,
                          rate=0.6)

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, uss_form=form,
                                    reduction="none", backend="native")

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    c = uss_case("inbatch", 9, 13, 6, torch.float64, "cuda", num_labels=3)

    def g(x, bias):
        return fused_uss_loss(x, c["labels"], bias, scale=16.0, form=form, reduction="none",
                              backend="native")

    inputs = [c[k].clone().requires_grad_() for k in ("x", "bias")]
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["uss", "unitsface"])
def test_cuda_nan_in_invalid_bank_row(form, family):
    if family == "uss":
        case, bank, valid = uss_case("bank", device="cuda"), "ref", "ref_valid"
    else:
        case = unitsface_case(device="cuda", sampled=True, vector_bias=True)
        bank, valid = "bank", "bank_valid"
    case[bank][(~case[valid]).nonzero()[:, 0]] = float("nan")
    check(case, "native", **family_kw(case, form))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """The CUDA epilogue kernels and the CPU loops share csrc/epilogue.h: same numbers."""
    case = unitsface_case(64, 999, 64, torch.float64, sampled=True, vector_bias=True)
    on_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    for form in FORMS:
        a = OPS.unitsface_fwd_native(*uf_args(case, form), False)
        b = OPS.unitsface_fwd_native(*uf_args(on_gpu, form), False)
        for t, u in zip(a, b):
            torch.testing.assert_close(t, u.cpu())


# ---------------------------------------------------------------- vectorised row kernels

@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_row_kernels_are_vectorised_per_instruction_set():
    """The AVX2 and AVX-512 copies of the float row kernels are vector code (their loops only
    if-convert without trapping-math: setup.py's -fno-trapping-math): count the ymm/zmm
    instructions of each in the built extension's disassembly."""
    so = native.require().__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], check=True,
                             capture_output=True, text=True).stdout
    counts, name = {}, None
    for line in listing.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
        elif name is not None:
            for reg in ("ymm", "zmm"):
                if reg in line:
                    counts[(name, reg)] = counts.get((name, reg), 0) + 1
    for isa, reg in (("4avx2", "ymm"), ("6avx512", "zmm")):
        for kernel in ("uss_fwd", "uss_bwd", "softmax_fwd", "softmax_bwd"):
            hits = [n for (n, r) in counts if r == reg and f"cpu{isa}{len(kernel)}{kernel}If" in n]
            assert hits, f"no {reg} code in the {isa[1:]} {kernel}<float>"
            assert max(counts[(n, reg)] for n in hits) >= 50, (isa, kernel, counts)
