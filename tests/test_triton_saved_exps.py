"""The triton backend's stored exponentials (``saved_exp_bytes``, docs/design.md §2): the
forward keeps e'_ij = exp(z_ij − the max of its group of columns) of the W tiles and the
rows' target cosines, and the backward takes the W cosines from them instead of recomputing
the products. Against the float64 reference and against the recomputing backward, on the
cases every backend is tested on (compiled on a GPU too: the `cuda` cases); the rules that
decide when they are kept; the op's outputs and fake."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton

from helpers import (FP32_GRAD_RTOL, check, make_case, passes_gradcheck, rel_err, run,
                     same_label_and_zero_rows)
from unitsface_kernels import contract, fused_unitsface_loss, margins, native, options
from unitsface_kernels.nn import PartialFC
from unitsface_kernels.triton import config

BUDGET = 1 << 40
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               torch.cuda.is_available(), reason="Triton's interpreter runs where no GPU is")),
           pytest.param("cuda", marks=pytest.mark.cuda)]

FORMS = {
    "objective cosface pairs": ("unitsface", dict()),
    "objective arcface lse": ("unitsface", dict(margin_arc=0.5, margin_cos=0.0,
                                                uss_form="lse")),
    "softmax arcface easy": ("softmax", dict(margin_arc=0.5, margin_cos=0.0,
                                             easy_margin=True)),
    "softmax arcface straight-through": ("softmax", dict(margin_arc=0.5, margin_cos=0.0,
                                                         arcface_grad="straight_through")),
}


def _check(case, **kw):
    """The stored path against the float64 reference (a half-precision gradient may carry
    one rounding more than the recomputing path's two: e' itself), and against the
    recomputing path on the same inputs."""
    dtype = case["x"].dtype
    loss, grads = check(case, "triton", roundings=3, saved_exp_bytes=BUDGET, **kw)
    plain_loss, plain = run(case, "triton", **kw)
    torch.testing.assert_close(loss, plain_loss)  # (the sum-exp merged from 32-column groups)
    tight = {torch.float64: 1e-12, torch.float32: 10 * FP32_GRAD_RTOL}.get(dtype)
    for name in grads:
        if tight is not None:
            assert rel_err(grads[name], plain[name]) <= tight, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("form", FORMS)
def test_against_reference(form, dtype, device):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64 kernels for GPUs")
    if device == "cpu" and form.startswith("softmax") and dtype in (torch.float16,
                                                                    torch.float64):
        pytest.skip("interpreted: the objective's cases run these dtypes (CI time)")
    family, kw = FORMS[form]
    rows, classes = (37, 90) if device == "cpu" else (300, 3000)  # GPU: several tiles
    _check(make_case(family, rows, classes, 40, dtype, device, sampled=True, rate=0.7), **kw)


@pytest.mark.parametrize("shape", [(1, 7, 5), (9, 33, 17)])
def test_odd_shapes_one_row_dense_classes(shape):
    _check(make_case("unitsface", *shape, torch.float32), margin_arc=0.5, margin_cos=0.0)


def test_same_labels_and_zero_rows():
    case = same_label_and_zero_rows(make_case("unitsface", 13, 40, 24, torch.float32,
                                              sampled=True, rate=0.5))
    _check(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", ["1", "resident"])
def test_persistent_forwards(persistent, monkeypatch, device):
    """The forward's tiles may be the persistent launches' (resident: 16 columns under the
    interpreter, 32 on a GPU, not the backward's): the backward reads the maxima with the
    forward's tiling."""
    monkeypatch.setenv("UNITSFACE_TRITON_PERSISTENT", persistent)
    rows, classes, d = (21, 70, 32) if device == "cpu" else (300, 3000, 512)
    _check(make_case("unitsface", rows, classes, d, torch.bfloat16, device, sampled=True,
                     rate=0.8), margin_arc=0.5, margin_cos=0.0)


@pytest.mark.parametrize("width", [128, 64])
def test_groups_of_a_wide_tile(width, monkeypatch):
    """GPU-wide cosine tiles (128 columns: four groups of 32, each its own maximum, merged
    into the tile's sum-exp; 64: two), which the interpreter's own tiles do not reach (and
    its configuration takes no tile knob)."""
    interpreted = config.fused_config

    def wide(*args, **kw):
        cfg = interpreted(*args, **kw)
        return dataclasses.replace(cfg, cos=config.GemmTiles(16, width, 32, 4, 1),
                                   chunk=max(cfg.chunk, width))
    monkeypatch.setattr(config, "fused_config", wide)
    case = make_case("unitsface", 19, 300, 24, torch.float32, sampled=True, rate=0.9)
    _check(case, margin_arc=0.5, margin_cos=0.0)


def test_row_margins():
    """A margin of the family with per-row margins (MagFace) keeps them: only the target's
    logit changes, and it comes from the stored cosine."""
    case = make_case("softmax", 19, 60, 24, torch.float32, sampled=True, rate=0.6)
    mg = margins.margin("magface")
    loss, grads = run(case, "triton", margin=mg, saved_exp_bytes=BUDGET)
    plain_loss, plain = run(case, "triton", margin=mg)
    torch.testing.assert_close(loss, plain_loss)
    for name in grads:
        assert rel_err(grads[name], plain[name]) <= 10 * FP32_GRAD_RTOL, name


def test_underflow_is_harmless():
    """With s = 300 most e' underflow to 0 (p < e⁻⁸⁷): their gradient is 0, as good as the
    recomputed one, and Σ go·g·cos stays finite."""
    case = make_case("softmax", 17, 50, 24, torch.float32)
    loss, grads = run(case, "triton", scale=300.0, saved_exp_bytes=BUDGET)
    plain_loss, plain = run(case, "triton", scale=300.0)
    torch.testing.assert_close(loss, plain_loss)
    for name in grads:
        assert torch.isfinite(grads[name]).all()
        assert rel_err(grads[name], plain[name]) <= 1e-5, name


def test_nan_propagates_as_without():
    """NaN in an embedding and in a sampled centre: the same NaN pattern in the loss and
    every gradient as the recomputing backward's."""
    case = make_case("unitsface", 11, 30, 16, torch.float32, sampled=True, rate=0.6)
    case["x"][3, 2] = float("nan")
    loss, grads = run(case, "triton", reduction="none", saved_exp_bytes=BUDGET)
    plain_loss, plain = run(case, "triton", reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(plain_loss)) and torch.isnan(loss).any()
    for name in grads:
        assert torch.equal(torch.isnan(grads[name]), torch.isnan(plain[name])), name
        assert torch.isnan(grads[name]).any(), name
    case["x"][3, 2] = 0.0
    case["centres"][case["index"][4], 0] = float("nan")
    loss, grads = run(case, "triton", reduction="none", saved_exp_bytes=BUDGET)
    assert torch.isnan(loss).all()
    assert torch.isnan(grads["x"]).all() and torch.isnan(grads["centres"][case["index"]]).all()


def test_gradcheck_float64():
    case = make_case("unitsface", 5, 12, 6, torch.float64, sampled=True, rate=0.7)

    def f(x, w, b):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], b,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.4, margin_cos=0.0,
                                    backend="triton", saved_exp_bytes=BUDGET)
    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    assert passes_gradcheck(f, inputs, "triton")


def _op_args(case, budget, **kw):
    o = options.unitsface_options(scale=16.0, margin_arc=0.3, margin_cos=0.1,
                                  arcface_grad="exact", easy_margin=False, uss_margin=0.1,
                                  uss_form="pairs", uss_weight=0.5, official_clamp=False,
                                  saved_exp_bytes=budget, **kw)
    return (case["x"], case["centres"], case["bank"], case["labels"], case["index"],
            case["bank_valid"], case["bias"], None, o.pack(), False)


def test_outputs_and_fake():
    """exps [B, S] in x's dtype, exp_rows [G + 1, B]: the maxima of the groups of columns,
    then the target cosines (raw: as the product gives them); the fake kernel says the same
    (torch.library.opcheck); the budget is in bytes of x's dtype, B·|S|·itemsize."""
    case = make_case("unitsface", 6, 90, 8, torch.float64, sampled=True, rate=0.6)
    b, s = 6, case["index"].numel()
    fwd = contract.forward_op("unitsface", "triton")
    out = fwd(*_op_args(case, b * s * 8))
    exps, exp_rows = out[-2:]
    assert exps.shape == (b, s) and exps.dtype == torch.float64
    assert exp_rows.shape[1] == b and exp_rows.shape[0] >= 2
    unit = torch.nn.functional.normalize
    want = (unit(case["x"], eps=1e-5) * unit(case["centres"][case["labels"]], eps=1e-5)).sum(1)
    torch.testing.assert_close(exp_rows[-1], want)
    # e'_ij = exp(z_ij − m_ig): every group's largest is 1, and off the target
    # log e'_ij + m_ig = s·cos_ij
    groups = exp_rows.shape[0] - 1
    width = triton.next_power_of_2(triton.cdiv(s, groups))
    group = torch.arange(s) // width
    assert group[-1] == groups - 1 and groups > 1
    for g in range(groups):
        torch.testing.assert_close(exps[:, group == g].amax(1), torch.ones(b, dtype=exps.dtype))
    cos = unit(case["x"], eps=1e-5) @ unit(case["centres"][case["index"]], eps=1e-5).T
    off = case["labels"][:, None] != case["index"][None, :]
    z = exps.log() + exp_rows[group].T
    torch.testing.assert_close(z[off], 16.0 * cos[off])
    torch.library.opcheck(fwd, _op_args(case, b * s * 8))
    for budget in (b * s * 8 - 1, 0):
        out = fwd(*_op_args(case, budget))
        assert out[-2].numel() == 0 and out[-1].numel() == 0


def test_which_settings_keep_them():
    base = dict(scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact",
                easy_margin=False, uss_margin=0.1, uss_form="pairs", uss_weight=1.0,
                official_clamp=False)
    o = options.unitsface_options(**base, saved_exp_bytes=512 * 100_000 * 2)
    assert o.keeps_exps(512, 100_000, 2) and not o.keeps_exps(512, 100_001, 2)
    assert not o.keeps_exps(512, 100_000, 4) and not o.keeps_exps(0, 5, 2)
    assert not options.unitsface_options(**base).keeps_exps(1, 1, 2)
    for mg, keeps in (("magface", True), ("elastic_arc", True), ("curricular", False),
                      ("adaface", False)):
        assert margins.margin_options(margins.margin(mg), o).keeps_exps(8, 8, 2) == keeps, mg
    for setting in (dict(sub_centers=2), dict(interclass_threshold=0.3)):
        assert not margins.margin_options(margins.margin("arcface", **setting),
                                          o).keeps_exps(8, 8, 2)


@pytest.mark.parametrize("value,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                         ("1GB", TypeError)])
def test_bad_budget_is_named(value, error):
    case = make_case("unitsface", 4, 9, 6, torch.float32)
    with pytest.raises(error, match="saved_exp_bytes"):
        fused_unitsface_loss(case["x"], case["labels"], case["centres"], case["bank"],
                             case["bias"], backend="triton", saved_exp_bytes=value)
    with pytest.raises(error, match="saved_exp_bytes"):
        PartialFC(6, 9, saved_exp_bytes=value)


@pytest.mark.skipif(not native.has_family("unitsface"), reason="the native extension is not built")
def test_native_ignores_the_budget():
    case = make_case("unitsface", 9, 20, 8, torch.float32, sampled=True, rate=0.6)
    loss, grads = run(case, "native", saved_exp_bytes=BUDGET)
    plain_loss, plain = run(case, "native")
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=0)
