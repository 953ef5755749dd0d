"""The native backend's CUDA sweep (csrc/cuda/unitsface_sweep.cu and its kernels) run on the
CPU: the same source built for the host with the emulation of csrc/emu/cuda_emu.h (CUDA
threads as fibers, shuffles and barriers emulated), its ops put in place of the native CPU
kernels of the unitsface family for the duration of this module, and compared with the
float64 reference through the public functions (helpers.check) or, where the public functions
cannot reach a case (labels outside the index, as class-parallel ranks have), op by op.

Chunk budgets (the `budget` fixture): "300" gives chunks of one slice of 128 columns (301
classes: three chunks, the last one partial), None the L2-sized plan. Memory from torch.empty
is filled with NaN here (torch's deterministic mode), so a kernel that lets a padded column,
an unwritten accumulator or the tail of a chunk buffer reach a result fails. The numbers of
the GPU (speed, cuBLAS's rounding) are not tested here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (FORMS, MARGINS, REQUIRE_NATIVE, assert_close_grad, assert_close_loss,
                     assert_rows_close, check, check_empty_bank_is_softmax_alone, check_frozen_x,
                     check_invalid_rows_reach_nothing, check_nan_in_valid_bank_row, cuda_emulation,
                     make_case, same_label_and_zero_rows, with_tiny_rows)
from unitsface_kernels import (contract, fused_margin_softmax_loss, fused_unitsface_loss, native,
                               options, reference)

pytestmark = pytest.mark.skipif(
    not native.has_family("unitsface") and not REQUIRE_NATIVE,
    reason="the native extension is not built (the public functions refuse backend='native')")


@pytest.fixture(scope="module", autouse=True)
def emulated():
    """backend="native" on CPU tensors runs the emulated CUDA sweep; torch.empty gives NaN."""
    with cuda_emulation():
        yield


@pytest.fixture
def sweep_dx(monkeypatch):
    """The plain forward, and ∂x from the backward's sweep (what class-parallel ranks run)
    instead of the forward's per-row gradients."""
    monkeypatch.setattr(contract, "ROW_GRADS", set())


def opts(**kw):
    """The packed options of the public functions' defaults, updated with kw."""
    kw = dict(dict(scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact",
                   easy_margin=False, uss_margin=0.1, uss_form="pairs", uss_weight=1.0,
                   official_clamp=False), **kw)
    return options.unitsface_options(**kw).pack()


def case_of(b=37, c=301, d=70, dtype=torch.float32, **kw):
    return make_case("unitsface", b, c, d, dtype, **kw)


def test_emulation_runs():
    """The public function really reaches the emulated ops (not the native CPU kernels)."""
    case = case_of(b=5, c=20, d=8)
    got = fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                               case["bias"], bank_valid=case["bank_valid"], reduction="none",
                               backend="native")
    rows = torch.ops.unitsface_emu.unitsface_fwd(
        case["x"], case["centres"], case["bank"], case["labels"], None, case["bank_valid"],
        case["bias"], None, opts())[0]
    torch.testing.assert_close(got, rows.float(), rtol=0, atol=0)


@pytest.mark.parametrize("budget", ["300", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled,vector_bias,official_clamp",
                         [(False, False, False), (True, False, True), (True, True, False)])
def test_parity(budget, form, sampled, vector_bias, official_clamp):
    case = case_of(sampled=sampled, vector_bias=vector_bias, seed=3)
    check(case, "native", uss_form=form, official_clamp=official_clamp, margin_arc=0.2,
          uss_weight=0.7)


@pytest.mark.parametrize("budget", ["300"], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampled", [False, True])
def test_parity_sweep_dx(budget, form, sampled, sweep_dx):
    check(case_of(sampled=sampled, vector_bias=sampled, seed=4), "native", uss_form=form)


@pytest.mark.parametrize("form", FORMS)
def test_frozen_x(form):
    check_frozen_x(case_of(sampled=True, seed=5), uss_form=form)


@pytest.mark.parametrize("form", FORMS)
def test_per_class_threshold_gradient_alone(form):
    """Only a per-class b takes a gradient: the backward sweeps the bank part alone (no W row
    staged through the index)."""
    check_frozen_x(case_of(sampled=True, vector_bias=True, seed=6), frozen=("x", "centres"),
                   uss_form=form)


@pytest.mark.parametrize("margins", list(MARGINS))
def test_margins(margins):
    check(case_of(sampled=True, seed=6), "native", **MARGINS[margins])


@pytest.mark.parametrize("budget", ["300"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vector_bias", [False, True])
def test_dtypes(budget, dtype, form, vector_bias):
    case = case_of(dtype=dtype, sampled=True, vector_bias=vector_bias, seed=7)
    check(case, "native", uss_form=form)


def test_fp16_rows_below_eps():
    """fp16 tiles leave the inverse norms out: a centre and a bank row below the eps (whose
    g·inv_r would overflow fp16) still give the reference's gradients."""
    case = case_of(dtype=torch.float16, seed=8)
    case["centres"][[0, 4]] *= 1e-7
    case["bank"][[1, 5]] *= 1e-7
    for form in FORMS:
        check(case, "native", uss_form=form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,c,d", [(1, 1, 8), (1, 301, 70), (5, 3000, 3)])
def test_shapes(form, b, c, d):
    """One row, one class, an odd D, and 3000 classes: slices of 512 columns (several vectors
    per lane), a second, partial chunk."""
    check(case_of(b, c, d, sampled=c > 1, seed=b + c), "native", uss_form=form)


@pytest.mark.parametrize("budget", ["300", None], indirect=True)
@pytest.mark.parametrize("form", FORMS)
def test_all_same_labels_and_zero_rows(budget, form):
    check(same_label_and_zero_rows(case_of(d=24, sampled=True, seed=9)), "native", uss_form=form)


@pytest.mark.parametrize("form", FORMS)
def test_softmax_alone_and_empty_bank(form):
    case = case_of(d=24, sampled=True, seed=10)
    check(dict(case, family="softmax"), "native")
    check_empty_bank_is_softmax_alone(case, uss_form=form)


@pytest.mark.parametrize("budget", ["300"], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("frozen_x", [False, True])
def test_nan_in_invalid_bank_rows_reaches_nothing(budget, form, frozen_x):
    check_invalid_rows_reach_nothing(case_of(sampled=True, vector_bias=True, seed=11), "bank",
                                     "bank_valid", frozen_x, uss_form=form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("row_grads", [True, False])
def test_nan_propagates(form, row_grads, monkeypatch):
    """NaN in x reaches its own row's loss and ∂x (and ∂W, ∂b, which sum over rows); NaN in a
    valid bank row reaches every row (each has it as a negative)."""
    if not row_grads:
        monkeypatch.setattr(contract, "ROW_GRADS", set())
    case = case_of(seed=12)
    case["x"][3, 2] = float("nan")
    x = case["x"].clone().requires_grad_()
    rows = fused_unitsface_loss(x, case["labels"], case["centres"], case["bank"], case["bias"],
                                bank_valid=case["bank_valid"], uss_form=form,
                                reduction="none", backend="native")
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()
    rows.sum().backward()
    assert torch.isnan(x.grad[3]).all()
    assert torch.isfinite(torch.cat([x.grad[:3], x.grad[4:]])).all()
    check_nan_in_valid_bank_row(case_of(seed=13), uss_form=form)


@pytest.mark.parametrize("budget", ["300"], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("vector_bias", [False, True])
def test_ops_with_classes_outside_the_index(budget, form, row_grads, vector_bias):
    """Op level, as a class-parallel rank calls them: labels of classes outside the index have
    no target and no positive. The forward's rows and statistics and the backward's gradients
    (from the reference's statistics) against the reference's per-op forms in float64."""
    case = case_of(vector_bias=vector_bias, seed=14)
    case["x"] = case["x"].double()
    for k in ("centres", "bank", "bias"):
        case[k] = case[k].double()
    absent = case["labels"][:5]
    keep = ~torch.isin(torch.arange(301), absent)
    keep[torch.randperm(301, generator=torch.Generator().manual_seed(0))[:100]] = False
    index = keep.nonzero()[:, 0]
    args = (case["x"], case["centres"], case["bank"], case["labels"], index,
            case["bank_valid"], case["bias"], None,
            opts(uss_form=form, uss_weight=0.7, margin_arc=0.2))
    ref = reference.unitsface_fwd(*args)
    got = torch.ops.unitsface_emu.unitsface_fwd(*args, row_grads)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-10)
    go = torch.rand(case["x"].shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    saved = (ref[1],) + tuple(got[2:])
    want = reference.unitsface_bwd(go, *args[:8], ref[1], *ref[2:], args[8], [True] * 3)
    grads = torch.ops.unitsface_emu.unitsface_bwd(go, *args[:8], *saved, args[8], [True] * 3)
    scale = float(ref[0].abs().sum())
    for name, g, w in zip(("x", "centres", "bias"), grads, want):
        assert_close_grad(g, w, torch.float64, name, scalar_scale=scale)
    assert_close_loss(got[0], ref[0], torch.float64)


@pytest.mark.parametrize("budget", ["300"], indirect=True)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eps_from_the_options(budget, form, row_grads, dtype):
    """The sweep normalises with the options' eps (1e-12 here), in the norms kernel, the ∂W
    projection and both ∂x finishes: rows of x, W and the bank with norms below 1e-5, at 1e-12
    and below it, against the reference's per-op forms with the same options; and the default
    eps gives another loss."""
    case = case_of(vector_bias=True, seed=16)
    case = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}
    labels = case["labels"]
    case["x"] = with_tiny_rows(case["x"], range(4))
    case["centres"] = with_tiny_rows(case["centres"], labels[:4].tolist())
    case["bank"] = with_tiny_rows(case["bank"], [298, 299, 300, 297])
    index = torch.arange(0, 301, 2)
    index = torch.unique(torch.cat([index, labels, torch.tensor([297, 298, 299, 300])]))
    packed = opts(uss_form=form, uss_weight=0.7, margin_arc=0.2, eps=1e-12)
    args = (case["x"], case["centres"], case["bank"], labels, index, case["bank_valid"],
            case["bias"], None, packed)
    ref = reference.unitsface_fwd(*args)
    got = torch.ops.unitsface_emu.unitsface_fwd(*args, row_grads)
    assert_close_loss(got[0], ref[0], dtype)
    for g, w in zip(got[2:4], ref[2:4]):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=0)
    default = reference.unitsface_fwd(*args[:8], opts(uss_form=form, uss_weight=0.7,
                                                      margin_arc=0.2))
    assert not torch.allclose(got[0].double(), default[0].double(), rtol=1e-3, atol=0)
    go = torch.rand(case["x"].shape[0], dtype=dtype, generator=torch.Generator().manual_seed(1))
    want = reference.unitsface_bwd(go, *args[:8], ref[1], *ref[2:], packed, [True] * 3)
    grads = torch.ops.unitsface_emu.unitsface_bwd(go, *args[:8], *got[1:], packed, [True] * 3)
    for name, g, w in zip(("x", "centres"), grads, want):
        assert g.dtype == dtype
        assert_rows_close(name, g, w, 1e-8 if dtype == torch.float64 else 1e-4)
    # (∂b sums bounded terms over the rows, the tiny ones no larger than the others)
    assert_close_grad(grads[2], want[2], dtype, "bias", scalar_scale=float(ref[0].abs().sum()))
    assert float(grads[0][3].abs().max()) > 1e6  # ∂x of a row at norm 4e-13: of order 1/eps


def step_launches(leaves, labels, bank, index=None):
    """One step (loss and backward) on the emulated sweep: its kernel launches plus the GEMMs
    the driver calls (ATen's, counted by the profiler), and its loss (the gradients are in the
    leaves); the margin softmax alone without a bank."""
    from torch.profiler import ProfilerActivity, profile
    before = torch.ops.unitsface_emu.kernel_launches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if bank is not None:
            loss = fused_unitsface_loss(leaves["x"], labels, leaves["centres"], bank,
                                        leaves["bias"], index=index, backend="native")
        else:
            loss = fused_margin_softmax_loss(leaves["x"], leaves["centres"], labels,
                                             index=index, backend="native")
        loss.backward()
    kernels = torch.ops.unitsface_emu.kernel_launches() - before
    return kernels + sum(e.name in ("aten::mm", "aten::baddbmm") for e in prof.events()), loss


@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_no_stored_exponentials(row_grads, dtype):
    """The sweep returns exps and exp_rows empty (x's dtype, the statistics' dtype) whatever
    saved_exp_bytes says, and its backward refuses non-empty ones."""
    case = case_of(b=5, c=20, d=8, dtype=dtype)
    args = (case["x"], case["centres"], case["bank"], case["labels"], None, case["bank_valid"],
            case["bias"], None, opts(saved_exp_bytes=2**30))
    out = torch.ops.unitsface_emu.unitsface_fwd(*args, row_grads)
    exps, exp_rows = out[7:]
    assert exps.shape == (0,) and exps.dtype == dtype
    assert exp_rows.shape == (0,) and exp_rows.dtype == out[1].dtype
    go = torch.rand(5, dtype=dtype)
    with pytest.raises(ValueError, match="exps and exp_rows must be empty"):
        torch.ops.unitsface_emu.unitsface_bwd(go, *args[:8], *out[1:7], torch.ones(3, dtype=dtype),
                                              exp_rows, args[8], [True] * 3)


@pytest.mark.parametrize("budget", ["300", None], indirect=True)
@pytest.mark.parametrize("row_grads", [True, False])
@pytest.mark.parametrize("with_bank", [True, False])
@pytest.mark.parametrize("sampled", [False, True])
def test_cost_model_launches(budget, row_grads, with_bank, sampled, monkeypatch):
    """benchmarks/native_cost.py walks the driver's chunk loop: its launches for a step (the
    emulation's kernel launches plus the GEMMs the driver calls) are the driver's, with the
    rows read in place (where W and the bank happen to lie: native_cost.layout_of) or staged
    through a partial-FC index."""
    from benchmarks import native_cost
    if not row_grads:
        monkeypatch.setattr(contract, "ROW_GRADS", set())
    case = case_of(b=37, c=301, d=16, sampled=sampled, seed=15)
    leaves = {k: case[k].clone().requires_grad_() for k in ("x", "centres", "bias")}
    got, _ = step_launches(leaves, case["labels"], case["bank"] if with_bank else None,
                           case["index"])
    layout = native_cost.layout_of(leaves["centres"].data_ptr(), case["bank"].data_ptr())
    S = 301 if case["index"] is None else case["index"].numel()
    m = native_cost.model(native_cost.Step(37, 16, S, 4, bank=with_bank, row_grads=row_grads,
                                           index=sampled, layout=layout))
    assert got == m.total("launches")


@pytest.mark.parametrize("budget", ["300", None], indirect=True)
@pytest.mark.parametrize("layout", ["w_below", "bank_below", "apart"])
@pytest.mark.parametrize("row_grads", [True, False])
def test_tables_in_place_layouts(budget, layout, row_grads, monkeypatch):
    """W and the bank read in place (no index, no mask, x's dtype) as two views of one storage:
    W's rows below the bank's, above them, or 4 bytes off a multiple of 16 bytes from them.
    Where a batch stride reaches from one table to the other, a chunk's dots are one batched
    GEMM over both, whichever lies first (the dots' parts in address order), and with W below
    so are the ∂x products of a single slice per part; apart, a GEMM per table. The loss and
    gradients are the float64 reference's, the launches the cost model's for that layout."""
    from benchmarks import native_cost
    if not row_grads:
        monkeypatch.setattr(contract, "ROW_GRADS", set())
    C, D = 301, 16
    case = case_of(b=37, c=C, d=D, seed=17)
    gap = 1 if layout == "apart" else 0  # (one fp32 element: 4 bytes)
    storage = torch.empty(2 * C * D + gap)
    lower, upper = storage[:C * D].view(C, D), storage[C * D + gap:].view(C, D)
    centres, bank = (upper, lower) if layout == "bank_below" else (lower, upper)
    centres.copy_(case["centres"])
    bank.copy_(case["bank"])
    assert native_cost.layout_of(centres.data_ptr(), bank.data_ptr()) == layout
    leaves = {"x": case["x"].clone().requires_grad_(), "centres": centres.requires_grad_(),
              "bias": case["bias"].clone().requires_grad_()}
    got, loss = step_launches(leaves, case["labels"], bank)
    m = native_cost.model(native_cost.Step(37, D, C, 4, row_grads=row_grads, layout=layout))
    assert got == m.total("launches")
    names = ("x", "centres", "bias")
    ref = {k: case[k].double().requires_grad_() for k in names}
    want = fused_unitsface_loss(ref["x"], case["labels"], ref["centres"], case["bank"].double(),
                                ref["bias"], backend="reference")
    want.backward()
    assert_close_loss(loss.detach(), want.detach(), torch.float32)
    for k in names:
        assert_close_grad(leaves[k].grad, ref[k].grad, torch.float32, k,
                          scalar_scale=float(want.detach().abs()))


# ----------------------------------------------------------------------------- the margin family

@pytest.mark.parametrize("kind", ["cosface_k3", "arcface_k2", "interclass", "curricular",
                                  "adaface", "magface", "magface_fallback", "elastic_arc",
                                  "elastic_cos", "everything"])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_margin_family_ops_float64(kind, sampled, with_bank):
    """test_margin_ops.py's cases of the family on the emulated sweep: forward (plain) and
    backward against the reference's per-op forms, to round-off."""
    from test_margin_native import assert_float64_exact, go_of, reference_ops, run_ops
    from test_margin_ops import _case
    o, args = _case(kind, torch.float64, sampled, with_bank)
    go = go_of(args)
    want, want_g = reference_ops(args, go)
    ops = torch.ops.unitsface_emu
    got, got_g = run_ops(ops.unitsface_fwd, ops.unitsface_bwd, args, go, False)
    assert_float64_exact(got, got_g, want, want_g)


@pytest.mark.parametrize("budget", ["300", None], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("sampled", [False, True])
def test_margin_family_whole(budget, dtype, row_grads, sampled):
    """Row margins + curricular + inter-class filter + K = 2 + a bank (+ a partial-FC index)
    on the emulated sweep over three chunks (budget "300") or one: float64 to round-off, the
    other dtypes within their rounding; with the forward's per-row gradients or ∂x from the
    backward's sweep."""
    from test_margin_native import (assert_float64_exact, assert_low_precision, family_case,
                                    go_of, reference_ops, run_ops)
    o, args = family_case(dtype, sampled=sampled)
    go = go_of(args)
    want, want_g = reference_ops(args, go)
    ops = torch.ops.unitsface_emu
    got, got_g = run_ops(ops.unitsface_fwd, ops.unitsface_bwd, args, go, row_grads)
    if dtype == torch.float64:
        assert_float64_exact(got, got_g, want, want_g)
    else:
        assert_low_precision(got, got_g, want, want_g, dtype)
