"""The margin family in the Triton engine (docs/design.md §1.5, §2): what only its layout
reaches, against the eager per-op forms of the reference — K sub-centres whose K·chunk
gradient columns cross the products' tiles and split-K slices over several class chunks,
sub-centre ties, a NaN sub-centre row, the fp16 path (g unscaled, the products normalise
their operand rows), the angle clip with a scalar margin, straight-through with per-row
margins (the per-row terms for the target: triton/margin_softmax.row_terms)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from unitsface_kernels import contract, options, reference
from unitsface_kernels.layouts import MarginRow, UnitsfaceStat
from unitsface_kernels.triton.config import fused_config, plan

from helpers import INTERPRETING, assert_close_grad, assert_close_loss, make_case

pytestmark = pytest.mark.skipif(not (INTERPRETING or torch.cuda.is_available()),
                                reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")

DEVICE = "cpu" if INTERPRETING else "cuda"
B, C, D = 37, 301, 70


def _options(with_bank, uss_form="lse", **family):
    base = options.unitsface_options(
        scale=16.0, margin_arc=family.pop("margin_arc", 0.0),
        margin_cos=family.pop("margin_cos", 0.0),
        arcface_grad=family.pop("arcface_grad", "exact"),
        easy_margin=family.pop("easy_margin", False), uss_margin=0.1, uss_form=uss_form,
        uss_weight=0.5 if with_bank else 0.0, official_clamp=False)
    return replace(base, **family)


def _inputs(o, dtype, sampled, with_bank, seed=0):
    """The op's arguments: B rows, C classes of K rows each, a few rows near their target's
    first sub-centre (so that hard negatives, the filter and the clip occur), margin_rows as
    a caller makes them (a_i, d_i drawn; HARD_i = cos(θ_iy + m2), T_i = 0.3)."""
    k = o.k
    case = make_case("unitsface", B, C, D, torch.float64, sampled=sampled, vector_bias=True,
                     rate=0.6, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64)
    x = case["x"]
    x[:6] = w[case["labels"][:6] * k] + 0.3 * x[:6]
    rows = None
    if o.needs_margin_rows:
        rows = torch.zeros(len(MarginRow), B, dtype=torch.float64)
        rows[MarginRow.A] = 0.5 * torch.rand(B, generator=g, dtype=torch.float64) - 0.1
        rows[MarginRow.D] = 0.2 * torch.rand(B, generator=g, dtype=torch.float64)
        if o.curricular:
            per = reference.normalize(x)[:, None, :] * reference.normalize(w)[
                case["labels"][:, None] * k + torch.arange(k)]
            c_y = per.sum(-1).amax(1).clamp(-1, 1)
            rows[MarginRow.HARD] = torch.cos(torch.acos(c_y) + o.margin_arc)
            rows[MarginRow.T] = 0.3
        rows = rows.to(reference.compute_dtype(dtype))
    bank = case["bank"].to(dtype) if with_bank else None
    return [x.to(dtype), w.to(dtype), bank, case["labels"], case["index"],
            case["bank_valid"] if with_bank else None,
            case["bias"].to(dtype) if with_bank else None, rows, o.pack()]


def _dev(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def _run(backend, args, needs, go=None, row_grads=False):
    fwd = contract.forward_op("unitsface", backend)
    bwd = contract.backward_op("unitsface", backend)
    if go is None:
        go = torch.linspace(0.5, 1.5, args[0].shape[0], dtype=torch.float64)
    go = go.to(args[0].device, reference.compute_dtype(args[0].dtype))
    out = fwd(*args, row_grads, False)
    return out, bwd(go, *args[:8], *out[1:], args[8], needs)


def _reference(args, needs):
    as64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    return _run("reference", as64, needs)


def _compare64(args, needs, row_grads=False):
    (rows, stats, _, nw, *_), grads = _run("triton", _dev(args), needs, row_grads=row_grads)
    (rows_r, stats_r, _, nw_r, *_), grads_r = _reference(args, needs)
    close = dict(rtol=1e-10, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(rows.cpu(), rows_r, **close)
    for row in (UnitsfaceStat.LSE, UnitsfaceStat.TARGET):
        torch.testing.assert_close(stats[row].cpu(), stats_r[row], **close)
    torch.testing.assert_close(nw.cpu(), nw_r, **close)
    for name, g, r in zip(("x", "centres", "bias"), grads, grads_r):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-11, equal_nan=True,
                                   msg=lambda m: f"∂{name}: {m}")
    return grads, grads_r


def test_sub_centres_cross_tiles_and_chunks():
    """K = 3 over several chunks: the K·chunk sub-centre columns of the g buffer cross the
    ∂W tiles and the split-K slices of ∂x at class boundaries (the interpreter's tiles are 32
    columns, its chunks 128 classes)."""
    o = _options(True, margin_arc=0.4, sub_centers=3.0)
    p = plan(B, int(0.6 * C), D, torch.float64, torch.device(DEVICE), 3 + 1)
    cfg = fused_config(D, torch.device(DEVICE), torch.float64)
    assert p.n_chunks >= 2 and (p.chunk * 3) % cfg.dw.block_m == 0
    assert (p.k_split * 3) % cfg.dx.bk == 0 and p.k_split % 3 != 0  # slices cut classes
    for sampled in (True, False):
        _compare64(_inputs(o, torch.float64, sampled, True), [True, True, True])


@pytest.mark.parametrize("uss_form,row_grads", [("lse", False), ("pairs", False),
                                                ("pairs", True)])
def test_everything_at_once_with_a_bank(uss_form, row_grads):
    """Per-row margins, the curricular negatives, the filter and K = 2 with the objective's
    USS part (its ∂x product runs apart from the sub-centre columns': two launches; with the
    forward's row gradients of the pairs form, none in the backward)."""
    o = _options(True, uss_form, margin_arc=0.3, row_margins=True, curricular=True,
                 interclass_threshold=0.2, sub_centers=2.0)
    _compare64(_inputs(o, torch.float64, True, True, seed=2), [True, True, True], row_grads)


def test_sub_centre_ties_go_to_the_first_row():
    """Sub-centres 0 and 1 of every class equal (their cosines tie bitwise): the gradient goes
    to row c·K, row c·K + 1 gets exactly zero."""
    o = _options(False, margin_cos=0.3, sub_centers=3.0)
    args = _inputs(o, torch.float64, False, False, seed=4)
    w = args[1].reshape(C, 3, D)
    w[:, 1] = w[:, 0]
    (_, dw, _), _ = _compare64(args, [True, True, False])
    dw = dw.cpu().reshape(C, 3, D)
    assert (dw[:, 1] == 0).all() and (dw[:, 0].abs().sum(1) > 0).all()


def test_nan_sub_centre_reaches_its_class():
    """A NaN in one sub-centre row of a class of S is its class's cosine in every row (NaN
    loss and gradients), the other sub-centre rows keep a zero gradient; a NaN in a class
    outside S touches nothing."""
    o = _options(False, margin_arc=0.5, sub_centers=2.0)
    args = _inputs(o, torch.float64, True, False, seed=5)
    index = args[4]
    outside = next(c for c in range(C) if c not in set(index.tolist()))
    args[1][outside * 2 + 1, 3] = math.nan
    (rows, *_), (dx, dw, _) = _run("triton", _dev(args), [True, True, False])
    assert torch.isfinite(rows).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    args[1][int(index[1]) * 2 + 1, 5] = math.nan
    (dx, dw, _), _ = _compare64(args, [True, True, False])
    (rows, *_), _ = _run("triton", _dev(args), [True, False, False])
    assert rows.isnan().all() and dx.isnan().all()
    assert (dw.cpu().reshape(-1, 2, D)[1, 0] == 0).all()  # the NaN row's sibling


@pytest.mark.parametrize("family", [
    dict(margin_arc=0.5, angle_clip=True),                       # the clip with a scalar m2
    dict(row_margins=True, arcface_grad="straight_through"),     # per-row a_i, f' = 1
    dict(row_margins=True, angle_clip=True, interclass_threshold=0.15, sub_centers=2.0),
], ids=["clip-scalar-m2", "rows-straight-through", "adaface-filter-k2"])
def test_target_forms_float64(family):
    o = _options(False, **family)
    _compare64(_inputs(o, torch.float64, True, False, seed=6), [True, True, False])


def test_angle_clip_active_on_both_sides():
    """AdaFace's clip of θ + a to [ε, π − ε] where it is active (f = ±cos ε − d, f' = 0):
    rows whose a_i brings θ + a below ε, and rows opposite their target with θ + a > π − ε."""
    o = _options(False, row_margins=True, angle_clip=True)
    args = _inputs(o, torch.float64, False, False, seed=8)
    x, w, labels, rows = args[0], args[1], args[3], args[7]
    x[6:9] = -w[labels[6:9]] + 0.01 * x[6:9]
    lim = 1 - options.ANGLE_EPS
    theta = torch.acos((reference.normalize(x) * reference.normalize(w[labels])).sum(1)
                       .clamp(-lim, lim))
    rows[MarginRow.A, :3] = -theta[:3] - 0.01
    rows[MarginRow.A, 6:9] = 0.1
    angle = theta + rows[MarginRow.A]
    assert (angle[:3] < options.ANGLE_EPS).all()
    assert (angle[6:9] > math.pi - options.ANGLE_EPS).all()
    _compare64(args, [True, True, False])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sub_centres_half_and_single(dtype):
    """K = 3 with the curricular negatives in fp16 (g unscaled: the products normalise the
    sub-centre rows by their own norms) and fp32, against float64 of the same inputs."""
    o = _options(True, margin_arc=0.4, curricular=True, sub_centers=3.0)
    args = _inputs(o, dtype, True, True, seed=7)
    needs = [True, True, True]
    (rows, *_), grads = _run("triton", _dev(args), needs)
    (rows_r, *_), grads_r = _reference(args, needs)
    assert_close_loss(rows.cpu(), rows_r, dtype)
    for name, g, r in zip(("x", "centres", "bias"), grads, grads_r):
        assert_close_grad(g.cpu(), r, dtype, name)
