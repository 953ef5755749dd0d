"""The normalisation eps is a setting (docs/design.md §1, options.UssOptions.eps /
UnitsfaceOptions.eps) that the Triton kernels and their host finishing read: with eps = 1e-12
(F.normalize's, as insightface's PartialFC_V2 and pytorch-metric-learning use), rows with
norms below the default 1e-5 are normalised, and the Triton ops match the float64 reference
with that eps — loss, statistics and every gradient. The ops are called through the contract
with options built by the options constructors."""

from __future__ import annotations

import pytest
import torch

from helpers import FORMS, fused_backends, make_case
from unitsface_kernels import contract, options, reference

TRITON = [b for b in fused_backends("cpu", "uss") if b == "triton"
          or getattr(b, "values", None) == ("triton",)]
EPS = 1e-12
TINY = (3e-7, 2e-9)  # norms of the shrunk rows: below 1e-5, above 1e-12


def _shrink(t, rows):
    for r, norm in zip(rows, TINY):
        t[r] *= norm / t[r].norm()
    return t


def _grads(out, leaves, go):
    return torch.autograd.grad((out * go).sum(), leaves)


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=what)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["bank", "inbatch", "centres"])
def test_uss_ops_read_eps(backend, form, mode):
    case = make_case("uss", 21, 45, 12, torch.float64, "cpu", mode=mode, seed=7,
                     vector_bias=mode == "centres")
    inbatch = mode == "inbatch"
    x = _shrink(case["x"], [2, 5])
    ref = x if inbatch else _shrink(case["ref"], [1, 4])
    labels, valid = case["labels"], case["ref_valid"]
    ref_labels = labels if inbatch else torch.arange(ref.shape[0])
    go = torch.rand(21, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    per_eps = {}
    for eps in (EPS, options.EPS):
        o = options.uss_options(scale=16.0, margin=0.1, form=form, official_clamp=False,
                                in_batch=inbatch, eps=eps)
        xl = x.clone().requires_grad_()
        rl = xl if inbatch else ref.clone().requires_grad_(mode == "centres")
        bl = case["bias"].clone().requires_grad_()
        out = contract.forward_op("uss", backend)(xl, rl, labels, ref_labels, valid, bl,
                                                  o.pack())
        leaves = [xl, bl] + ([rl] if mode == "centres" else [])
        per_eps[eps] = (out[0].detach(),) + _grads(out[0], leaves, go)
        if eps != EPS:
            continue
        # the per-op reference form with the same options, and the eager loss's autograd
        want = reference.uss_fwd(x, ref, labels, ref_labels, valid, case["bias"], o.pack())
        _close(out[0], want[0], "rows (per-op form)")
        _close(out[1], want[1], "stats (per-op form)")
        xr = x.clone().requires_grad_()
        rr = None if inbatch else ref.clone().requires_grad_(mode == "centres")
        br = case["bias"].clone().requires_grad_()
        rows = reference.uss_rows(xr, labels, br, rr, None, valid, scale=16.0, margin=0.1,
                                  form=form, eps=EPS)
        _close(out[0], rows, "rows")
        want_grads = _grads(rows, [xr, br] + ([rr] if mode == "centres" else []), go)
        for name, g, w in zip(("x", "bias", "ref"), per_eps[eps][1:], want_grads):
            _close(g, w, name)
    # the premise: on these rows the two eps give different results
    assert (per_eps[EPS][1] - per_eps[options.EPS][1]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("row_grads", [False, True])
def test_unitsface_ops_read_eps(backend, form, row_grads):
    case = make_case("unitsface", 21, 45, 12, torch.float64, "cpu", sampled=True, seed=9)
    x = _shrink(case["x"], [2, 5])
    centres = _shrink(case["centres"], case["index"][:2].tolist())
    bank = _shrink(case["bank"], case["index"][2:4].tolist())
    labels, index, valid, bias = case["labels"], case["index"], case["bank_valid"], case["bias"]
    go = torch.rand(21, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(scale=16.0, margin_arc=0.5, margin_cos=0.0, arcface_grad="exact",
              easy_margin=False, uss_margin=0.1, uss_form=form, uss_weight=0.7,
              official_clamp=False)
    per_eps = {}
    for eps in (EPS, options.EPS):
        o = options.unitsface_options(**kw, eps=eps)
        xl, wl, bl = (t.clone().requires_grad_() for t in (x, centres, bias))
        out = contract.forward_op("unitsface", backend)(xl, wl, bank, labels, index, valid, bl,
                                                        None, o.pack(), row_grads, False)
        per_eps[eps] = (out[0].detach(),) + _grads(out[0], [xl, wl, bl], go)
        if eps != EPS:
            continue
        want = reference.unitsface_fwd(x, centres, bank, labels, index, valid, bias, None,
                                         o.pack())
        _close(out[0], want[0], "rows (per-op form)")
        _close(out[1], want[1], "stats (per-op form)")
        xr, wr, br = (t.clone().requires_grad_() for t in (x, centres, bias))
        rows = reference.unitsface_loss(xr, labels, wr, bank, br, bank_valid=valid, index=index,
                                        reduction="none", eps=EPS, **kw)
        _close(out[0], rows, "rows")
        for name, g, w in zip(("x", "centres", "bias"), per_eps[eps][1:],
                              _grads(rows, [xr, wr, br], go)):
            _close(g, w, name)
    assert (per_eps[EPS][1] - per_eps[options.EPS][1]).abs().max() > 1e-3
