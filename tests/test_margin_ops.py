"""The margin family in the unitsface ops (docs/design.md §1.5): every fused backend's forward
and backward of ``unitsface_{fwd,bwd}`` with the family's settings and ``margin_rows``, against
the eager per-op forms of the reference (float64: to round-off; float32 and half: within the
dtype's rounding), with and without partial FC, a bank (the objective) and K sub-centres."""

from __future__ import annotations

import math

import pytest
import torch

from unitsface_kernels import contract, options, reference
from unitsface_kernels.layouts import MarginRow, UnitsfaceStat

from helpers import assert_close_grad, assert_close_loss, fused_backends, make_case

DIM = 12


def _settings(kind: str) -> dict:
    """Option fields (beyond the CosFace/ArcFace ones) of one margin of the family."""
    return {
        "cosface_k3": dict(margin_cos=0.4, sub_centers=3.0),
        "arcface_k2": dict(margin_arc=0.5, sub_centers=2.0),
        "interclass": dict(margin_arc=0.5, interclass_threshold=0.2),
        "curricular": dict(margin_arc=0.5, curricular=True),
        "adaface": dict(row_margins=True, angle_clip=True),
        "magface": dict(row_margins=True, easy_margin=True),
        "magface_fallback": dict(row_margins=True),
        "elastic_arc": dict(row_margins=True, no_fallback=True),
        "elastic_cos": dict(row_margins=True),
        "everything": dict(margin_arc=0.4, curricular=True, interclass_threshold=0.25,
                           sub_centers=2.0),
    }[kind]


KINDS = ["cosface_k3", "arcface_k2", "interclass", "curricular", "adaface", "magface",
         "magface_fallback", "elastic_arc", "elastic_cos", "everything"]


def _options(kind: str, with_bank: bool) -> options.UnitsfaceOptions:
    fields = dict(margin_arc=0.0, margin_cos=0.0)
    fields.update(_settings(kind))
    extra = {k: fields.pop(k) for k in list(fields) if k not in ("margin_arc", "margin_cos",
                                                                 "easy_margin")}
    base = options.unitsface_options(
        scale=16.0, margin_arc=fields["margin_arc"], margin_cos=fields["margin_cos"],
        arcface_grad="exact", easy_margin=fields.get("easy_margin", False), uss_margin=0.1,
        uss_form="lse", uss_weight=0.5 if with_bank else 0.0, official_clamp=False)
    from dataclasses import replace
    return replace(base, **extra)


def _margin_rows(kind, o, x, centres, labels, gen):
    """margin_rows [4, B] as a caller of the family makes them (docs/design.md §1.5)."""
    if not o.needs_margin_rows:
        return None
    b = x.shape[0]
    acc = reference.compute_dtype(x.dtype)
    rows = torch.zeros(len(MarginRow), b, dtype=acc)
    if kind == "adaface":
        z = torch.rand(b, generator=gen, dtype=acc) * 2 - 1
        rows[MarginRow.A], rows[MarginRow.D] = -0.4 * z, 0.4 + 0.4 * z
    elif kind.startswith("magface"):
        rows[MarginRow.A] = 0.45 + 0.35 * torch.rand(b, generator=gen, dtype=acc)
    elif kind == "elastic_arc":
        rows[MarginRow.A] = 0.5 + 0.05 * torch.randn(b, generator=gen, dtype=acc)
    elif kind == "elastic_cos":
        rows[MarginRow.D] = 0.35 + 0.05 * torch.randn(b, generator=gen, dtype=acc)
    if o.curricular:
        k = o.k
        xh = reference.normalize(x.to(acc), o.eps)
        w = reference.normalize(centres.to(acc), o.eps)
        per = (xh[:, None, :] * w[(labels[:, None] * k + torch.arange(k))]).sum(-1)
        c_y = per.amax(1).clamp(-1, 1)
        sin_y = torch.sqrt(torch.clamp(1 - c_y * c_y, min=1e-12))
        rows[MarginRow.HARD] = c_y * math.cos(o.margin_arc) - sin_y * math.sin(o.margin_arc)
        rows[MarginRow.T] = 0.3
    return rows


def _case(kind, dtype, sampled, with_bank, seed=0):
    o = _options(kind, with_bank)
    k = o.k
    case = make_case("unitsface", 9, 23, DIM, torch.float64, sampled=sampled, vector_bias=True,
                     rate=0.5, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    # K sub-centres per class: rows c·K + r
    case["centres"] = torch.randn(23 * k, DIM, generator=gen, dtype=torch.float64)
    # a few rows near their target and near each other, so that the curricular hard negatives,
    # the filter and the fallback all occur
    case["x"][:3] = case["centres"][case["labels"][:3] * k] + 0.3 * case["x"][:3]
    for name in ("x", "centres", "bank", "bias"):
        case[name] = case[name].to(dtype)
    # the per-row inputs of the rounded inputs, as a caller makes them
    rows = _margin_rows(kind, o, case["x"], case["centres"].to(case["x"].dtype),
                        case["labels"], gen)
    if not with_bank:
        case.update(bank=None, bank_valid=None, bias=None)
    if rows is not None:
        rows = rows.to(reference.compute_dtype(dtype))
    args = (case["x"], case["centres"], case["bank"], case["labels"], case["index"],
            case["bank_valid"], case["bias"], rows, o.pack())
    return o, args


def _run(backend, args, go, needs):
    fwd = contract.forward_op("unitsface", backend)
    bwd = contract.backward_op("unitsface", backend)
    out = fwd(*args, False, False)
    grads = bwd(go, *args[:8], *out[1:], args[8], needs)
    return out, grads


def _reference(args, go, needs):
    dt = torch.float64
    args64 = tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in args)
    return _run("reference", args64, go.to(dt), needs)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_margin_family_op_float64(backend, kind, sampled, with_bank):
    """float64: rows, statistics, norms and the three gradients to round-off."""
    o, args = _case(kind, torch.float64, sampled, with_bank)
    go = torch.rand(args[0].shape[0], dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(7))
    needs = [True, True, with_bank]
    want, want_g = _reference(args, go, needs)
    got, got_g = _run(backend, args, go, needs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for row in (UnitsfaceStat.LSE, UnitsfaceStat.TARGET):
        torch.testing.assert_close(got[1][row], want[1][row], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[3], want[3], rtol=1e-10, atol=1e-12)  # K norms per class
    for name, g, w in zip(("x", "centres", "bias"), got_g, want_g):
        if w.numel():
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"∂{name}")


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("kind", ["arcface_k2", "curricular", "adaface", "magface",
                                  "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_margin_family_op_low_precision(backend, kind, dtype):
    """float32 and bf16 inputs against the float64 reference of the same (rounded) inputs."""
    o, args = _case(kind, dtype, True, True, seed=3)
    go = torch.ones(args[0].shape[0], dtype=torch.float32)
    needs = [True, True, True]
    want, want_g = _reference(args, go, needs)
    got, got_g = _run(backend, args, go, needs)
    assert_close_loss(got[0], want[0], torch.float32 if dtype == torch.float32 else dtype)
    # Triton's ∂x and ∂W of a half-precision call are products of the gradient tiles stored
    # in x's dtype (docs/design.md §2), then rounded to their own dtype: two roundings, and on
    # 9 rows little averaging between them (gradient cosine ≥ 0.99999 here, §7 asks ≥ 0.999)
    roundings = 3 if backend == "triton" else 2
    assert_close_grad(got_g[0], want_g[0], dtype, "x", roundings=roundings)
    assert_close_grad(got_g[1], want_g[1], dtype, "centres", roundings=roundings)


def test_reference_sub_centre_gradient_reaches_the_arg_max_row_only():
    """K = 3: ∂L/∂W is zero on every sub-centre row that is not its class's maximum for some
    row of the batch."""
    o, args = _case("cosface_k3", torch.float64, False, False)
    x, centres, labels = args[0], args[1], args[3]
    _, (dx, dw, _) = _run("reference", args, torch.ones(x.shape[0], dtype=torch.float64),
                          [True, True, False])
    cos = reference.normalize(x) @ reference.normalize(centres).T
    arg = cos.reshape(x.shape[0], -1, 3).argmax(2)  # [B, C]
    hit = torch.zeros(centres.shape[0], dtype=torch.bool)
    hit[(torch.arange(arg.shape[1]) * 3 + arg).reshape(-1)] = True
    assert (dw[~hit] == 0).all() and (dw[hit].abs().sum(1) > 0).all()
