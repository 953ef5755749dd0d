"""The native backend (csrc/: chunked ATen GEMM + fused epilogue) on its own: parity with the
float64 reference across chunk sizes and CPU instruction sets, gradcheck, edge cases, the
fused forward variant, the op-level contract shared with the Triton ops, and the memory
bound (no B×N block, checked with the profiler, which sees allocations made inside C++ ops).

The shared suites (test_uss.py, test_unitsface.py, test_margin_softmax.py) run "native" too,
through helpers.all_backends; this file adds what only the native backend has.
"""

from __future__ import annotations

import pytest
import torch

import test_unitsface as tuf
import test_uss as tu
from helpers import DTYPES
from unitsface_kernels import (fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                               native, reference, uss_bias_init)

pytestmark = pytest.mark.skipif(not (native.has_op("uss") and native.has_op("unitsface")),
                                reason="the native extension (uss, unitsface ops) is not built")

# Elements per chunk buffer: tiny budgets force many chunks (and 1-column chunks), the
# default exercises the single-chunk path of these small shapes.
BUDGETS = ["1", "97", "1000", None]
ISAS = ["base", "avx2", "avx512"]


@pytest.fixture
def budget(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("UNITSFACE_NATIVE_CHUNK_ELEMS", raising=False)
    else:
        monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", request.param)
    return request.param


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("UNITSFACE_NATIVE_ISA", request.param)
    return request.param


# ---------------------------------------------------------------- parity, chunks and ISAs

@pytest.mark.parametrize("budget", BUDGETS, indirect=True)
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("form", tu.FORMS)
@pytest.mark.parametrize("mode", tu.MODES)
@pytest.mark.parametrize("official_clamp", [False, True])
def test_uss_chunks_and_isas(budget, isa, form, mode, official_clamp):
    case = tu.make_case(37, 53, 70, mode, torch.float32, "cpu", seed=7,
                        vector_bias=mode == "centres")
    tu.check_against_float64(case, mode, "native", torch.float32, form=form,
                             official_clamp=official_clamp, scale=32.0)


@pytest.mark.parametrize("budget", BUDGETS, indirect=True)
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("margins", [(0.0, 0.4), (0.5, 0.0), (0.3, 0.2)])
def test_unitsface_chunks_and_isas(budget, isa, form, sampled, vector_bias, margins):
    case = tuf.make_case(37, 301, 70, torch.float32, "cpu", sampled=sampled,
                         vector_bias=vector_bias, seed=11)
    tuf.check(case, "native", torch.float32, uss_form=form, margin_arc=margins[0],
              margin_cos=margins[1], uss_weight=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", tuf.FORMS)
def test_unitsface_dtypes_many_chunks(dtype, form, monkeypatch):
    """Half types are upcast chunk by chunk on the CPU; the loss stays fp32 (fp64)."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "500")
    case = tuf.make_case(37, 301, 70, dtype, "cpu", sampled=True, vector_bias=True, seed=2)
    tuf.check(case, "native", dtype, uss_form=form, margin_arc=0.5, margin_cos=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", tu.MODES)
def test_uss_dtypes_many_chunks(dtype, mode, monkeypatch):
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "500")
    case = tu.make_case(37, 53, 70, mode, dtype, "cpu", seed=3)
    tu.check_against_float64(case, mode, "native", dtype, form="lse")


# ---------------------------------------------------------------- gradcheck (float64)

@pytest.mark.parametrize("budget", ["5", None], indirect=True)
@pytest.mark.parametrize("form", tu.FORMS)
@pytest.mark.parametrize("official_clamp", [False, True])
@pytest.mark.parametrize("mode,vector_bias", [("bank", False), ("bank", True),
                                              ("inbatch", False), ("centres", True)])
def test_uss_gradcheck(budget, form, official_clamp, mode, vector_bias):
    case = tu.make_case(9, 13, 6, mode, torch.float64, "cpu", vector_bias=vector_bias,
                        num_labels=3 if mode == "inbatch" else None)
    names = tu.grad_inputs(case, mode)

    def f(*tensors):
        kw = dict(case, **dict(zip(names, tensors)))
        return fused_uss_loss(kw["x"], kw["labels"], kw["bias"], kw["ref"], None, kw["ref_valid"],
                              scale=16.0, form=form, official_clamp=official_clamp,
                              reduction="none", backend="native")

    inputs = [case[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("budget", ["5", None], indirect=True)
@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
@pytest.mark.parametrize("with_bank", [True, False])
def test_unitsface_gradcheck(budget, form, sampled, vector_bias, with_bank):
    """Through the fused forward (x takes a gradient) and, for the W / b-only check below,
    the plain one."""
    case = tuf.make_case(7, 17, 6, torch.float64, "cpu", sampled=sampled,
                         vector_bias=vector_bias, rate=0.6)

    def f(x, w, bias):
        if not with_bank:
            return fused_margin_softmax_loss(x, w, case["labels"], index=case["index"],
                                             scale=8.0, margin_arc=0.3, margin_cos=0.1,
                                             reduction="none", backend="native")
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, margin_cos=0.1, uss_form=form,
                                    uss_weight=0.5, reduction="none", backend="native")

    inputs = [case[k].clone().requires_grad_() for k in tuf.GRAD_NAMES]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # x without a gradient: the plain forward / backward pair
    frozen = lambda w, bias: f(case["x"], w, bias)  # noqa: E731
    assert torch.autograd.gradcheck(frozen, inputs[1:], eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("budget", ["7", None], indirect=True)
@pytest.mark.parametrize("form", tu.FORMS)
@pytest.mark.parametrize("mode", tu.MODES)
def test_uss_all_same_labels(budget, form, mode):
    case = tu.make_case(37, 53, 24, mode, torch.float32, "cpu", num_labels=1)
    tu.check_against_float64(case, mode, "native", torch.float32, form=form)


@pytest.mark.parametrize("budget", ["7", None], indirect=True)
@pytest.mark.parametrize("form", tuf.FORMS)
def test_unitsface_all_same_labels_and_zero_rows(budget, form):
    case = tuf.make_case(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["labels"][:] = case["index"][0]
    case["x"][[2, 9]] = 0.0
    case["centres"][case["index"][[0, 5]]] = 0.0
    case["bank"][case["index"][:4]] = 0.0
    tuf.check(case, "native", torch.float32, uss_form=form)


@pytest.mark.parametrize("form", tu.FORMS)
def test_uss_empty_bank(form):
    """Every bank slot unwritten: no pair at all, loss and gradients exactly 0."""
    case = tu.make_case(37, 53, 24, "bank", torch.float32, "cpu")
    case["ref_valid"][:] = False
    loss, grads = tu.run(case, "bank", "native", form=form)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grads["x"]) == 0 and torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("form", tuf.FORMS)
def test_unitsface_empty_bank_is_softmax_alone(form):
    case = tuf.make_case(37, 301, 24, torch.float32, "cpu", sampled=True)
    case["bank_valid"][:] = False
    loss, grads = tuf.check(case, "native", torch.float32, uss_form=form)
    soft = fused_margin_softmax_loss(case["x"], case["centres"], case["labels"],
                                     index=case["index"], backend="native")
    torch.testing.assert_close(loss, soft)
    assert torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("mode", tu.MODES)
def test_uss_zero_embeddings(mode):
    case = tu.make_case(37, 53, 24, mode, torch.float32, "cpu")
    case["x"][[0, 5]] = 0.0
    if mode != "inbatch":
        case["ref"][[1, 7]] = 0.0
    tu.check_against_float64(case, mode, "native", torch.float32, form="pairs")
    tu.check_against_float64(case, mode, "native", torch.float32, form="lse")


@pytest.mark.parametrize("budget", ["3", None], indirect=True)
@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("vector_bias", [False, True])
def test_partial_fc_zero_gradient(budget, form, vector_bias):
    case = tuf.make_case(37, 301, 24, torch.float32, "cpu", sampled=True,
                         vector_bias=vector_bias, rate=0.2)
    _, grads = tuf.check(case, "native", torch.float32, uss_form=form)  # checks the zeros
    sampled = torch.zeros(301, dtype=torch.bool)
    sampled[case["index"]] = True
    assert torch.count_nonzero(grads["centres"][~sampled]) == 0
    assert torch.count_nonzero(grads["centres"][sampled].abs().sum(1)) == int(sampled.sum())


@pytest.mark.parametrize("form", tu.FORMS)
def test_nan_propagates(form):
    case = tuf.make_case(37, 301, 24, torch.float32, "cpu", sampled=False)
    case["x"][3, 2] = float("nan")
    rows = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                                case["bias"], uss_form=form, reduction="none", backend="native")
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()
    case = tu.make_case(37, 53, 24, "bank", torch.float32, "cpu")
    case["x"][3, 2] = float("nan")
    rows = fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"], form=form,
                          reduction="none", backend="native")
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()


def test_bias_init():
    case = tu.make_case(37, 53, 24, "bank", torch.float32, "cpu")
    got = uss_bias_init(case["x"], case["labels"], case["ref"], ref_valid=case["ref_valid"],
                        backend="native")
    want = uss_bias_init(case["x"], case["labels"], case["ref"], ref_valid=case["ref_valid"],
                         backend="reference")
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))


# ---------------------------------------------------------------- the op-level contract

def _unitsface_op_args(case, form):
    return (case["x"], case["centres"], case["bank"], case["labels"], case["index"],
            case["bank_valid"], case["bias"], 64.0, 0.2, 0.3, 0.1, 0.7, form == "lse")


@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("sampled", [False, True])
def test_labels_matching_no_column_have_no_target(form, sampled):
    """Class-parallel training relies on it: a label outside the columns (−1, or a class of
    another shard) has z_iy = 0 and no USS positive, so rows = lse + λ·USS(negatives)."""
    case = tuf.make_case(9, 40, 8, torch.float64, "cpu", sampled=sampled, rate=0.5)
    labels = case["labels"].clone()
    labels[:3] = -1
    if sampled:  # a class that the index does not hold
        outside = [c for c in range(40) if c not in set(case["index"].tolist())]
        labels[3] = outside[0]
    case = dict(case, labels=labels)
    rows, stats, nx, nw, nb = torch.ops.unitsface.unitsface_fwd(*_unitsface_op_args(case, form))
    cols = case["index"] if sampled else torch.arange(40)
    xh = reference.normalize(case["x"])
    cw = (xh @ reference.normalize(case["centres"][cols]).T).clamp(-1, 1)
    cb = xh @ reference.normalize(case["bank"][cols]).T
    lse = torch.logsumexp(64.0 * cw, dim=1)
    missing = ~torch.isin(labels, cols)
    assert missing[:3].all() and (missing[3] or not sampled)
    torch.testing.assert_close(stats[0][missing], lse[missing])
    assert (stats[5][missing] == 0).all()
    z_neg = 64.0 * cb - case["bias"]
    valid = case["bank_valid"][cols]
    if form == "pairs":
        uss = torch.where(valid, torch.nn.functional.softplus(z_neg, threshold=1e9), 0.0).sum(1)
    else:
        lse_n = torch.logsumexp(z_neg.masked_fill(~valid, -float("inf")), dim=1)
        uss = torch.nn.functional.softplus(lse_n)
    torch.testing.assert_close(rows[missing], (lse + 0.7 * uss)[missing])
    # and the backward runs (no target: the softmax gradient is s·p everywhere)
    out = torch.ops.unitsface.unitsface_bwd(torch.ones(9, dtype=torch.float64), case["x"],
                                            *_unitsface_op_args(case, form)[1:7], nx, nw, nb,
                                            stats, *_unitsface_op_args(case, form)[7:], True,
                                            True, True)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
def test_fused_forward_matches_plain(form, sampled, vector_bias, monkeypatch):
    """unitsface_fwd_g = unitsface_fwd plus ∂L_i/∂x_i and ∂L_i/∂b; its backward equals the
    plain backward for any upstream gradient."""
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", "300")
    case = tuf.make_case(21, 301, 40, torch.float64, "cpu", sampled=sampled,
                         vector_bias=vector_bias, seed=9)
    args = _unitsface_op_args(case, form)
    ops = torch.ops.unitsface
    plain = ops.unitsface_fwd(*args)
    fused = ops.unitsface_fwd_g(*args)
    for a, b in zip(plain, fused[:5]):
        torch.testing.assert_close(a, b)
    go = torch.rand(21, dtype=torch.float64)
    tail = args[7:]
    want = ops.unitsface_bwd(go, *args[:7], *plain[2:5], plain[1], *tail, True, True, True)
    got = ops.unitsface_bwd_g(go, *args[:7], *fused[2:5], fused[1], fused[5], fused[6], *tail,
                              True, True, True)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


def test_outputs_follow_the_triton_contract():
    """Shapes / dtypes of the native ops are those of library.py's fakes (which the Triton
    ops share), for float32 and float64."""
    from unitsface_kernels import library

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        case = tuf.make_case(5, 30, 8, dtype, "cpu", sampled=True, vector_bias=True)
        args = _unitsface_op_args(case, "lse")
        out = torch.ops.unitsface.unitsface_fwd(*args)
        fake = library.unitsface_fwd_fake(*args)
        assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in fake]
        grads = torch.ops.unitsface.unitsface_bwd(torch.ones(5), *args[:7], *out[2:5], out[1],
                                                  *args[7:], True, True, True)
        fake = library.unitsface_bwd_fake(torch.ones(5), *args[:7], *out[2:5], out[1],
                                          *args[7:], True, True, True)
        assert [(t.shape, t.dtype) for t in grads] == [(t.shape, t.dtype) for t in fake]
        none = torch.ops.unitsface.unitsface_bwd(torch.ones(5), *args[:7], *out[2:5], out[1],
                                                 *args[7:], False, False, False)
        assert all(t.numel() == 0 for t in none)
        c = tu.make_case(5, 30, 8, "centres", dtype, "cpu", vector_bias=True)
        uargs = (c["x"], c["ref"], c["labels"], torch.arange(30), None, c["bias"], 64.0, 0.1,
                 True, False, False)
        out = torch.ops.unitsface.uss_fwd(*uargs)
        fake = library.uss_fwd_fake(*uargs)
        assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("family", ["uss", "unitsface"])
def test_torch_compile_fullgraph(family):
    case = tuf.make_case(21, 45, 16, torch.float32, "cpu", sampled=True)

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
    from unitsface_kernels.ops import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), "uss") == "native"
    assert resolve_backend("auto", torch.device("cpu"), "unitsface") == "native"


# ---------------------------------------------------------------- memory (DESIGN.md §7)

def _largest_cpu_allocation(fn):
    """Bytes of the largest single CPU allocation while fn runs, from the profiler's memory
    events, which come from the CPU allocator itself: they include the tensors that C++ ops
    allocate internally (a TorchDispatchMode does not see inside a custom op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.nbytes() > 0),
               default=0)


@pytest.mark.parametrize("form", tuf.FORMS)
def test_unitsface_no_bxs_allocation(form, monkeypatch):
    b, c, d = 64, 4096, 16
    case = tuf.make_case(b, c, d, torch.float32, "cpu", sampled=False, vector_bias=True)
    budget = 16 * 1024  # elements per chunk buffer: 256-column chunks
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", str(budget))
    leaves = {k: case[k].clone().requires_grad_() for k in tuf.GRAD_NAMES}

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


@pytest.mark.parametrize("form", tu.FORMS)
@pytest.mark.parametrize("mode", tu.MODES)
def test_uss_no_bxn_allocation(form, mode, monkeypatch):
    b, n, d = 64, 2048, 16
    case = tu.make_case(b, n, d, mode, torch.float32, "cpu", vector_bias=mode == "centres")
    n_ref = b if mode == "inbatch" else n
    monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", str(b * 16))
    x = case["x"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_()
    ref = case["ref"].clone().requires_grad_() if mode == "centres" else case["ref"]

    def step():
        fused_uss_loss(x, case["labels"], bias, ref, None, case["ref_valid"], form=form,
                       backend="native").backward()

    largest = _largest_cpu_allocation(step)
    assert largest < b * n_ref * 4, largest
    assert largest >= b * 16 * 4  # the chunk buffer is seen


def test_profiler_sees_the_reference_matrix():
    """The eager reference does form B×N: the allocation check above would catch it."""
    case = tu.make_case(64, 2048, 16, "bank", torch.float32, "cpu")
    largest = _largest_cpu_allocation(
        lambda: fused_uss_loss(case["x"], case["labels"], case["bias"], case["ref"],
                               backend="reference"))
    assert largest >= 64 * 2048 * 4


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("budget", ["100000", None], indirect=True)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", tu.FORMS)
@pytest.mark.parametrize("mode", tu.MODES)
def test_cuda_uss_parity(budget, dtype, form, mode):
    case = tu.make_case(300, 5003, 130, mode, dtype, "cuda", vector_bias=mode == "centres")
    tu.check_against_float64(case, mode, "native", dtype, form=form)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", ["100000", None], indirect=True)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", tuf.FORMS)
@pytest.mark.parametrize("sampled", [False, True])
def test_cuda_unitsface_parity(budget, dtype, form, sampled):
    case = tuf.make_case(257, 3001, 130, dtype, "cuda", sampled=sampled, vector_bias=sampled)
    tuf.check(case, "native", dtype, uss_form=form, margin_arc=0.5, margin_cos=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("form", tuf.FORMS)
def test_cuda_gradcheck(form):
    case = tuf.make_case(7, 17, 6, torch.float64, "cuda", sampled=True, vector_bias=True,
                         rate=0.6)

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, uss_form=form,
                                    reduction="none", backend="native")

    inputs = [case[k].clone().requires_grad_() for k in tuf.GRAD_NAMES]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    c = tu.make_case(9, 13, 6, "inbatch", torch.float64, "cuda", num_labels=3)

    def g(x, bias):
        return fused_uss_loss(x, c["labels"], bias, scale=16.0, form=form, reduction="none",
                              backend="native")

    inputs = [c[k].clone().requires_grad_() for k in ("x", "bias")]
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """The CUDA epilogue kernels and the CPU loops share csrc/epilogue.h: same numbers."""
    case = tuf.make_case(64, 999, 64, torch.float64, "cpu", sampled=True, vector_bias=True)
    on_gpu = {k: (v.cuda() if v is not None else None) for k, v in case.items()}
    for form in tuf.FORMS:
        a = torch.ops.unitsface.unitsface_fwd(*_unitsface_op_args(case, form))
        b = torch.ops.unitsface.unitsface_fwd(*_unitsface_op_args(on_gpu, form))
        for t, u in zip(a, b):
            torch.testing.assert_close(t, u.cpu())
