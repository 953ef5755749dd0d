"""The margin family (docs/design.md §1.5) in the native backend's CPU kernels beyond the
op-level cases of test_margin_ops.py: the fused forward's per-row gradients (row_grads), every
CPU instruction set, many chunks and splits, NaN through a sub-centre, and the errors of the
family's inputs. Against the reference's per-op forms in float64 (to round-off) and float32.
``family_case`` also serves the CUDA sweep's emulation (test_cuda_emu.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import assert_close_grad, assert_close_loss, make_case
from test_margin_ops import KINDS, _case, _margin_rows, _options
from test_native import cpu_isa
from unitsface_kernels import native, reference

pytestmark = pytest.mark.skipif(not native.has_family("unitsface"),
                                reason="the native extension is not built")

OPS = torch.ops.unitsface


def family_case(dtype, *, b=37, c=301, d=20, k=2, sampled=True, with_bank=True, seed=5,
                **fields):
    """Op arguments of the whole family at once: per-row angular margins (ElasticFace's
    draws), curricular negatives, the inter-class filter, K sub-centres, a partial-FC index
    and a bank (fields override the settings)."""
    settings = dict(row_margins=True, curricular=True, interclass_threshold=0.25,
                    sub_centers=float(k))
    settings.update(fields)
    o = replace(_options("magface_fallback", with_bank), **settings)
    case = make_case("unitsface", b, c, d, torch.float64, sampled=sampled, vector_bias=True,
                     rate=0.6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    case["centres"] = torch.randn(c * k, d, generator=gen, dtype=torch.float64)
    # rows near their target's first sub-centre: hard negatives, filtered classes, the fallback
    case["x"][:6] = case["centres"][case["labels"][:6] * k] + 0.3 * case["x"][:6]
    rows = _margin_rows("elastic_arc" if o.row_margins else "", o, case["x"], case["centres"],
                        case["labels"], gen)
    for name in ("x", "centres", "bank", "bias"):
        case[name] = case[name].to(dtype)
    if not with_bank:
        case.update(bank=None, bank_valid=None, bias=None)
    if rows is not None:
        rows = rows.to(reference.compute_dtype(dtype))
    return o, (case["x"], case["centres"], case["bank"], case["labels"], case["index"],
               case["bank_valid"], case["bias"], rows, o.pack())


def run_ops(fwd, bwd, args, go, row_grads):
    """Forward (row_grads or not) and the backward of all three gradients."""
    out = fwd(*args, row_grads, False)
    needs = [True, True, args[2] is not None]
    return out, bwd(go, *args[:8], *out[1:], args[8], needs)


def reference_ops(args, go):
    args64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in args)
    return run_ops(reference.unitsface_fwd, reference.unitsface_bwd, args64, go.double(), False)


def assert_float64_exact(got, got_g, want, want_g):
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[3], want[3], rtol=1e-10, atol=1e-12)
    for name, g, w in zip(("x", "centres", "bias"), got_g, want_g):
        if w.numel():
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"∂{name}")


def assert_low_precision(got, got_g, want, want_g, dtype):
    assert_close_loss(got[0], want[0], torch.float32 if dtype == torch.float32 else dtype)
    assert_close_grad(got_g[0], want_g[0], dtype, "x")
    assert_close_grad(got_g[1], want_g[1], dtype, "centres")


def go_of(args):
    return torch.rand(args[0].shape[0], dtype=torch.float64,
                      generator=torch.Generator().manual_seed(7)).to(
                          reference.compute_dtype(args[0].dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_row_grads(kind, sampled, with_bank):
    """The fused forward's ∂L_i/∂x_i (and a scalar ∂b) with the family: the backward from
    dx_rows equals the reference's, and ∂W still comes from the backward's sweep."""
    o, args = _case(kind, torch.float64, sampled, with_bank)
    go = go_of(args)
    want, want_g = reference_ops(args, go)
    got, got_g = run_ops(OPS.unitsface_fwd_native, OPS.unitsface_bwd_native, args, go, True)
    assert got[5].shape == args[0].shape  # the forward formed the per-row gradients
    assert_float64_exact(got, got_g, want, want_g)


@pytest.mark.parametrize("budget", ["64", "600", None], indirect=True)
@pytest.mark.parametrize("row_grads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampled", [False, True])
def test_whole_family_many_chunks(budget, row_grads, dtype, sampled):
    """Row margins + curricular + filter + K = 2 (+ bank, index) over many chunks (budget 64:
    one class per chunk, several splits; 600: 8 classes per chunk, whose 16 columns are
    sub-centre-major, csrc/rows.h) and one; bf16 writes ∂centres through the fp32 scratch."""
    o, args = family_case(dtype, sampled=sampled)
    go = go_of(args)
    want, want_g = reference_ops(args, go)
    got, got_g = run_ops(OPS.unitsface_fwd_native, OPS.unitsface_bwd_native, args, go,
                         row_grads)
    if dtype == torch.float64:
        assert_float64_exact(got, got_g, want, want_g)
    else:
        assert_low_precision(got, got_g, want, want_g, dtype)


ISA_CAPS = [isa for isa in ("base", "avx2", "avx512")
            if cpu_isa() is not None and ("base", "avx2", "avx512").index(isa)
            <= ("base", "avx2", "avx512").index(cpu_isa())]


@pytest.mark.parametrize("isa", ISA_CAPS)
@pytest.mark.parametrize("kind", ["adaface", "magface", "everything"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("row_grads", [False, True])
def test_instruction_sets(isa, kind, dtype, row_grads, monkeypatch):
    """Each CPU instruction set's family kernels (csrc/cpu/rows_<isa>.cpp) against the
    reference."""
    monkeypatch.setenv("UNITSFACE_NATIVE_ISA", isa)
    assert native.selected_isa() == isa
    o, args = _case(kind, dtype, True, True, seed=3)
    go = go_of(args)
    want, want_g = reference_ops(args, go)
    got, got_g = run_ops(OPS.unitsface_fwd_native, OPS.unitsface_bwd_native, args, go,
                         row_grads)
    if dtype == torch.float64:
        assert_float64_exact(got, got_g, want, want_g)
    else:
        assert_low_precision(got, got_g, want, want_g, dtype)


@pytest.mark.parametrize("row_grads", [False, True])
def test_nan_sub_centre_reaches_every_row(row_grads):
    """A NaN in one sub-centre row makes its class cosine NaN for every row (the maximum
    propagates NaN): every loss and every row's ∂x is NaN, as in the reference."""
    o, args = family_case(torch.float64, c=40, sampled=False)
    centres = args[1].clone()
    centres[7 * 2 + 1, 3] = float("nan")  # class 7, its second sub-centre
    args = (args[0], centres) + args[2:]
    go = torch.ones(args[0].shape[0], dtype=torch.float64)
    want, want_g = reference_ops(args, go)
    got, got_g = run_ops(OPS.unitsface_fwd_native, OPS.unitsface_bwd_native, args, go,
                         row_grads)
    assert torch.isnan(want[0]).all() and torch.isnan(got[0]).all()
    assert torch.isnan(want_g[0]).all(dim=1).all() and torch.isnan(got_g[0]).all(dim=1).all()


def test_sub_centre_gradient_on_the_arg_max_rows_only():
    """K = 3: ∂W of a sub-centre row that is no row's class maximum is exactly zero."""
    o, args = _case("cosface_k3", torch.float64, False, False)
    go = torch.ones(args[0].shape[0], dtype=torch.float64)
    _, (dx, dw, _) = run_ops(OPS.unitsface_fwd_native, OPS.unitsface_bwd_native, args, go,
                             False)
    x, centres = args[0], args[1]
    cos = reference.normalize(x) @ reference.normalize(centres).T
    arg = cos.reshape(x.shape[0], -1, 3).argmax(2)
    hit = torch.zeros(centres.shape[0], dtype=torch.bool)
    hit[(torch.arange(arg.shape[1]) * 3 + arg).reshape(-1)] = True
    assert (dw[~hit] == 0).all() and (dw[hit].abs().sum(1) > 0).all()


def test_bad_inputs_name_the_argument():
    """centres not a multiple of K rows, margin_rows missing or of the wrong shape, and saved
    norms of the wrong length: clear errors naming the argument."""
    o, args = family_case(torch.float64, c=10, sampled=False)
    x, centres, bank, labels, index, valid, bias, rows, packed = args
    with pytest.raises(ValueError, match="centres must hold K = 2 rows per class"):
        OPS.unitsface_fwd_native(x, centres[:-1], bank, labels, index, valid, bias, rows,
                                 packed, False, False)
    with pytest.raises(ValueError, match="margin_rows"):
        OPS.unitsface_fwd_native(x, centres, bank, labels, index, valid, bias, None, packed,
                                 False, False)
    with pytest.raises(ValueError, match="margin_rows must have shape"):
        OPS.unitsface_fwd_native(x, centres, bank, labels, index, valid, bias, rows[:, :-1],
                                 packed, False, False)
    out = OPS.unitsface_fwd_native(*args, False, False)
    assert out[3].numel() == 10 * 2  # nw: the K rows of every class
    go = torch.ones(x.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="nw and nb must come from"):
        OPS.unitsface_bwd_native(go, *args[:8], out[1], out[2], out[3][:10], *out[4:],
                                 packed, [True, True, True])
    no_k = replace(o, sub_centers=2.5).pack()
    with pytest.raises(ValueError, match="sub_centers must be an integer"):
        OPS.unitsface_fwd_native(*args[:8], no_k, False, False)
