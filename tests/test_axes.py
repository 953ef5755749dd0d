"""Every axis of the input space on every backend (issue 27): seeded draws of the public loss
functions, each picking independently from every axis — family and form, margin combination,
scale, partial FC, thresholds, official clamp, reduction, the dtype of every tensor, the layout
of every tensor, rows with norm 0, below, at and above the eps, invalid bank rows holding NaN,
data NaN, B = 1 and odd sizes, and a bad argument now and then — run on every backend
(reference, native, Triton under the interpreter, and the native CUDA sweep through its CPU
emulation for the unitsface family) and compared with the float64 reference: the same call on
float64 copies of the inputs, the reference rows first rounded to x's dtype as every backend
reads them (docs/design.md §4).

Tolerances come from the dtypes: the loss within LOSS_RTOL of its compute dtype; a gradient
within a few roundings (UNITS, TINY_UNITS × helpers.grad_rtol) of the float64 gradient to the
coarser of its own dtype and x's (the kernels' tiles are in x's dtype). Gradients are compared
row group by row group — the rows of an input at or below the eps, whose gradient is ~1/eps,
apart from the others, so that neither hides the other's error; the rows of classes outside
the partial-FC index and of invalid reference rows must be exactly zero; an fp32 gradient of
half-precision x must not come out rounded to x's dtype. NaN must reach exactly the rows of
each output that it reaches in the float64 reference (rows too large for a half dtype
excepted). A bad argument must raise a TypeError or ValueError naming it, on every backend,
and leave every input unchanged.

The draw count per family is fixed for CI (DRAWS); UNITSFACE_AXES_DRAWS=N runs N per family.
The coverage — draws per axis value, and the backends that ran on each — is printed once per
run (pytest -s) and every value must be hit by every backend.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter, defaultdict

import pytest
import torch
from helpers import (DTYPES, FORMS, INTERPRETING, LOSS_RTOL, REQUIRE_NATIVE, cuda_emulation,
                     grad_rtol, rel_err)
from unitsface_kernels import (fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                               native, sample_classes)
from unitsface_kernels.options import EPS

FAMILIES = ("uss-bank", "uss-inbatch", "uss-centres", "softmax", "unitsface")
DRAWS = int(os.environ.get("UNITSFACE_AXES_DRAWS", "0")) or 90
EMULATION = "cuda-emu"  # backend="native" with the CUDA sweep emulated on the CPU

# (margin_arc, margin_cos, arcface_grad, easy_margin)
MARGINS = {"cosface": (0.0, 0.4, "exact", False), "arcface": (0.5, 0.0, "exact", False),
           "arcface_st": (0.5, 0.0, "straight_through", False),
           "arcface_easy": (0.5, 0.0, "exact", True), "cosface_easy": (0.0, 0.35, "exact", True),
           "combined": (0.3, 0.2, "exact", False), "combined_st": (0.3, 0.2, "straight_through",
                                                                  False),
           "combined_easy": (0.3, 0.2, "exact", True)}
SCALES = (2.0, 16.0, 30.0, 64.0)
NORMS = ("normal", "zero", "below", "at")  # a planted row: norm 0, eps/2, eps·(1 ± 1/64)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
VECTOR_LAYOUTS = ("contiguous", "strided", "offset")
UNITS, TINY_UNITS = 3, 4
"""A gradient group's error may be UNITS × helpers.grad_rtol (which allows twice the rounding
of the float64 gradient): a group can be one or two rows of a few entries, where the rounding
of the half-precision gradient tiles inside the kernels does not average out, and the
normalisation's projection −h·x̂ cancels part of G after that rounding. The rows at or below the
eps take TINY_UNITS: their gradient, (G − h·x̂)/‖x‖ or G/eps, is ~1/eps times a difference of
terms that were rounded to the tiles' dtype before they cancel."""
NARROW = (torch.float16, torch.bfloat16, torch.float32)
HALF = (torch.float16, torch.bfloat16)


def _axes(family):
    """The axes of a family and their values (what the coverage must hit)."""
    uss_like = family != "softmax"
    rows = family != "uss-inbatch"
    axes = {"kind": ("ok", "bad"), "scale": SCALES, "reduction": ("mean", "sum", "none"),
            "batch": ("1", "odd", "even"), "width": ("odd", "even"), "x_dtype": DTYPES,
            "x_layout": LAYOUTS, "x_rows": NORMS, "labels_layout": VECTOR_LAYOUTS,
            "data": ("finite", "nan_x", "inf_x") + (("nan_ref",) if rows else ())}
    if uss_like:
        axes.update(form=FORMS, official_clamp=(False, True),
                    bias=("number", "scalar", "vector"), bias_dtype=DTYPES,
                    bias_layout=VECTOR_LAYOUTS)
    if family.startswith("uss"):
        axes["uss_margin"] = (-0.1, 0.0, 0.1, 0.4)
    if family in ("uss-bank", "uss-centres"):
        axes.update(ref_dtype=DTYPES, ref_layout=LAYOUTS, ref_rows=NORMS,
                    valid=("none", "mask"), invalid_rows=("finite", "nan"))
    if family == "uss-centres":
        axes["ref_labels"] = ("none", "given")
    if family in ("softmax", "unitsface"):
        axes.update(margins=tuple(MARGINS), index=("none", "sampled"), centres_dtype=DTYPES,
                    centres_layout=LAYOUTS, centres_rows=NORMS)
    if family == "unitsface":
        axes.update(bank_dtype=DTYPES, bank_layout=LAYOUTS, bank_rows=NORMS,
                    valid=("none", "mask"), invalid_rows=("finite", "nan"),
                    uss_weight=(0.0, 0.5, 1.0, 2.0))
    return axes


def _backends(family):
    """The backends a family runs on here; a missing native extension is an error only where
    the build is required (`make test`)."""
    op = "uss" if family.startswith("uss") else "unitsface"
    out = ["reference"]
    if INTERPRETING:
        out.append("triton")
    if native.has_family(op):
        out.append("native")
        if op == "unitsface":
            out.append(EMULATION)
    elif REQUIRE_NATIVE:
        raise RuntimeError(f"UNITSFACE_REQUIRE_NATIVE is set but the native {op} ops do not load")
    return out


# ----------------------------------------------------------------------------- draws

def _rows_with_norm(rng, t, kind, g):
    """Plants in t (in place, float64 values) a row of the norm `kind` names."""
    if kind == "normal" or t.shape[0] == 0:
        return
    i = rng.randrange(t.shape[0])
    if kind == "zero":
        t[i] = 0.0
        return
    target = EPS / 2 if kind == "below" else EPS * (1 + rng.choice([-1, 1]) / 64)
    t[i] = torch.randn(t.shape[1], generator=g, dtype=torch.float64)
    t[i] *= target / t[i].norm()


def _round(t, dtype, rows):
    """t rounded to `dtype`, nudging a row whose rounded norm came within 0.1 % of the eps
    (the eps is a kink of the gradient: its side must not depend on the rounding of the norm
    inside a kernel)."""
    out = t.to(dtype)
    for i in rows:
        while abs(float(out[i].double().norm()) / EPS - 1) < 1e-3:
            t[i] *= 1.01
            out[i] = t[i].to(dtype)
    return out


def _draw(rng, family):
    """One call: (the axis values drawn, the tensors — contiguous, in their dtypes —, the
    keyword settings, each tensor's layout, bad) with `bad` = (the argument the error must
    name, what was corrupted) or None."""
    axes = _axes(family)
    pick = {name: rng.choice(values) for name, values in axes.items()}
    # most draws are good calls on finite data
    pick["kind"] = "bad" if rng.random() < 0.2 else "ok"
    if rng.random() < 0.5:
        pick["data"] = "finite"
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    b = {"1": 1, "odd": rng.choice([3, 5, 7, 9]), "even": rng.choice([2, 4, 6, 8])}[pick["batch"]]
    d = rng.choice([5, 7, 9, 13]) if pick["width"] == "odd" else rng.choice([4, 6, 10, 16])
    n = rng.choice([1, rng.randint(2, 8), rng.randint(9, 24)])
    xd = pick["x_dtype"]
    # reference rows mix among the 16/32-bit dtypes; float64 mixes with nothing
    for name in ("ref_dtype", "centres_dtype", "bank_dtype"):
        if name in pick and (xd == torch.float64) != (pick[name] == torch.float64):
            pick[name] = xd if xd == torch.float64 else rng.choice(NARROW)
    t = {}
    x64 = torch.randn(b, d, generator=g, dtype=torch.float64)
    _rows_with_norm(rng, x64, pick["x_rows"], g)
    t["x"] = _round(x64, xd, range(b))
    kw = dict(scale=pick["scale"], reduction=pick["reduction"])
    if family.startswith("uss"):
        kw.update(margin=pick["uss_margin"], form=pick["form"],
                  official_clamp=pick["official_clamp"])
        if family == "uss-inbatch":
            t["labels"] = torch.randint(0, max(2, b // 2), (b,), generator=g)
            n = b
        else:
            classes = max(2, n // 2)
            given = pick.get("ref_labels") == "given"
            t["labels"] = torch.randint(0, classes if given else n, (b,), generator=g)
            if given:
                t["ref_labels"] = torch.randint(0, classes, (n,), generator=g)
            ref = torch.randn(n, d, generator=g, dtype=torch.float64)
            _rows_with_norm(rng, ref, pick["ref_rows"], g)
            t["ref"] = _round(ref, pick["ref_dtype"], range(n))
    else:
        t["labels"] = torch.randint(0, n, (b,), generator=g)
        pick.update(zip(("margin_arc", "margin_cos", "arcface_grad", "easy_margin"),
                        MARGINS[pick["margins"]]))
        kw.update((k, pick[k]) for k in ("margin_arc", "margin_cos", "arcface_grad",
                                         "easy_margin"))
        w = torch.randn(n, d, generator=g, dtype=torch.float64)
        _rows_with_norm(rng, w, pick["centres_rows"], g)
        t["centres"] = _round(w, pick["centres_dtype"], range(n))
        if pick["index"] == "sampled":
            t["index"] = sample_classes(t["labels"], n, rng.randint(1, n), generator=g)
    if family == "unitsface":
        kw.update(uss_margin=rng.choice([0.0, 0.1, 0.3]), uss_form=pick["form"],
                  uss_weight=pick["uss_weight"], official_clamp=pick["official_clamp"])
        bank = torch.randn(n, d, generator=g, dtype=torch.float64)
        _rows_with_norm(rng, bank, pick["bank_rows"], g)
        t["bank"] = _round(bank, pick["bank_dtype"], range(n))
    rows_name = {"uss-bank": "ref", "uss-centres": "ref", "unitsface": "bank"}.get(family)
    if "valid" in pick:
        if pick["valid"] == "mask":
            valid = torch.rand(n, generator=g) < 0.7
            t["ref_valid" if family.startswith("uss") else "bank_valid"] = valid
            if not bool(valid.all()) and pick["invalid_rows"] == "nan":
                t[rows_name][~valid] = math.nan
                t[rows_name][int((~valid).nonzero()[0]), 0] = math.inf
        else:
            pick["invalid_rows"] = None  # no invalid row: the axis does not apply
    if "bias" in pick:
        size = {"number": None, "scalar": 1, "vector": n}[pick["bias"]]
        if size is None:
            t_bias = rng.uniform(0, 10)
            pick["bias_dtype"] = pick["bias_layout"] = None
        else:
            t_bias = (torch.rand(size, generator=g, dtype=torch.float64) * 10).to(
                pick["bias_dtype"])
            if rng.random() < 0.5 and size == 1:
                t_bias = t_bias.reshape(())
        t["bias"] = t_bias
    _data(rng, pick, t, rows_name or "centres")
    bad = _corrupt(rng, family, t, kw) if pick["kind"] == "bad" else None
    if pick["kind"] == "bad" and bad is None:
        pick["kind"] = "ok"
    if pick["kind"] == "bad":
        pick["data"] = None
    layouts = {k: pick.get(f"{k}_layout") or rng.choice(
        LAYOUTS if isinstance(v, torch.Tensor) and v.dim() == 2 else VECTOR_LAYOUTS)
        for k, v in t.items() if isinstance(v, torch.Tensor)}
    return pick, t, kw, layouts, bad


def _data(rng, pick, t, rows_name):
    """Data NaN/Inf: in one entry of x, or in a valid reference row."""
    what = pick["data"]
    if what in ("nan_x", "inf_x"):
        x = t["x"]
        x[rng.randrange(x.shape[0]), rng.randrange(x.shape[1])] = (
            math.nan if what == "nan_x" else math.inf)
    elif what == "nan_ref":
        valid = t.get("ref_valid", t.get("bank_valid"))
        rows = t[rows_name]
        choices = range(rows.shape[0]) if valid is None else valid.nonzero()[:, 0].tolist()
        if not choices:
            pick["data"] = "finite"
            return
        rows[rng.choice(list(choices))] = math.nan


def _corrupt(rng, family, t, kw):
    """One bad argument (in place): returns (the argument the message must name, what), or
    None when the drawn corruption does not apply."""
    rows_name = {"softmax": "centres", "unitsface": "centres"}.get(family, "ref")
    options = ["scale_nan", "scale_negative", "reduction", "labels_float", "labels_shape"]
    options += ["margin"] if family != "unitsface" else ["margin_cos", "margin_arc",
                                                         "uss_weight", "uss_form"]
    if family.startswith("uss"):
        options += ["form", "clamp_flag"]
    if family != "uss-inbatch":
        options += ["width", "dtype_mix"]
        if "ref_labels" not in t:
            options.append("labels_range")
    if "bias" in t:
        options.append("bias_size")
    if "index" in t:
        options += ["index_unsorted", "index_missing"]
    if "ref_valid" in t or "bank_valid" in t:
        options.append("valid_dtype")
    what = rng.choice(options)
    if what == "scale_nan":
        kw["scale"] = math.nan
        return "scale", what
    if what == "scale_negative":
        kw["scale"] = -kw["scale"]
        return "scale", what
    if what == "reduction":
        kw["reduction"] = "avg"
        return "reduction", what
    if what == "margin":
        name = "margin" if family.startswith("uss") else "margin_cos"
        kw[name] = 1.5
        return name, what
    if what in ("margin_cos", "margin_arc", "uss_weight"):
        kw[what] = {"margin_cos": -1.5, "margin_arc": 4.0, "uss_weight": -1.0}[what]
        return what, what
    if what in ("form", "uss_form"):
        kw[what] = "LSE"
        return what, what
    if what == "clamp_flag":
        kw["official_clamp"] = "yes"
        return "official_clamp", what
    if what == "labels_float":
        t["labels"] = t["labels"].float()
        return "labels", what
    if what == "labels_shape":
        t["labels"] = torch.cat([t["labels"], t["labels"][:1]])
        return "labels", what
    if what == "labels_range":
        t["labels"][rng.randrange(t["labels"].numel())] = t[rows_name].shape[0]
        return "labels", what
    if what == "width":
        t[rows_name] = torch.cat([t[rows_name], t[rows_name][:, :1]], 1)
        return rows_name, what
    if what == "dtype_mix":
        other = torch.float32 if t["x"].dtype == torch.float64 else torch.float64
        t[rows_name] = t[rows_name].to(other)
        return rows_name, what
    if what == "bias_size":
        if not isinstance(t["bias"], torch.Tensor):
            return None
        t["bias"] = torch.zeros(t[rows_name if family != "uss-inbatch" else "x"].shape[0] + 2)
        return "bias", what
    if what == "index_unsorted":
        if t["index"].numel() < 2:
            return None
        t["index"] = t["index"].flip(0)
        return "index", what
    if what == "index_missing":
        keep = t["index"] != t["labels"][0]
        if bool(keep.all()) or not bool(keep.any()):
            return None
        t["index"] = t["index"][keep]
        return "index", what
    name = "ref_valid" if "ref_valid" in t else "bank_valid"
    t[name] = t[name].to(torch.uint8)
    return name, what


# ----------------------------------------------------------------------------- calls

def _grad_names(family, t):
    names = ["x"]
    if isinstance(t.get("bias"), torch.Tensor) and t["bias"].is_floating_point():
        names.append("bias")
    names += {"uss-centres": ["ref"], "softmax": ["centres"], "unitsface": ["centres"]}.get(
        family, [])
    return names


def _laid_out(v, layout):
    """The same values as v in another memory layout (a differentiable view); the memory
    around a strided or offset view holds junk (NaN, or other labels) that no kernel may read."""
    if layout == "contiguous":
        return v
    if v.dim() == 2 and layout == "transposed":
        return v.t().contiguous().t()
    junk = (torch.full((), math.nan, dtype=v.dtype) if v.is_floating_point()
            else torch.ones((), dtype=v.dtype)).expand(3)
    if layout == "offset":
        return torch.cat([junk, v.reshape(-1)])[3:].view(v.shape)
    if v.dim() == 2:  # strided: each row followed by junk (row stride D + 3)
        return torch.cat([v, junk[None, :].expand(v.shape[0], 3)], 1)[:, :v.shape[1]]
    return torch.stack([v.reshape(-1), junk[:1].expand(v.numel())], 1)[:, 0].view(v.shape)


def _call(family, t, kw, layouts, backend):
    """The public function on the draw's tensors (in their layouts): (loss, {name: grad})."""
    names = _grad_names(family, t)
    leaves = {k: (v.detach().clone().requires_grad_(k in names)
                  if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    a = {k: (_laid_out(v, layouts[k]) if isinstance(v, torch.Tensor) else v)
         for k, v in leaves.items()}
    be = "native" if backend == EMULATION else backend
    if family.startswith("uss"):
        loss = fused_uss_loss(a["x"], a["labels"], a["bias"], a.get("ref"), a.get("ref_labels"),
                              a.get("ref_valid"), backend=be, **kw)
    elif family == "softmax":
        loss = fused_margin_softmax_loss(a["x"], a["centres"], a["labels"], index=a.get("index"),
                                         backend=be, **kw)
    else:
        loss = fused_unitsface_loss(a["x"], a["labels"], a["centres"], a["bank"], a["bias"],
                                    bank_valid=a.get("bank_valid"), index=a.get("index"),
                                    backend=be, **kw)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    grads = torch.autograd.grad((loss * weights).sum(), [leaves[k] for k in names])
    return loss.detach(), dict(zip(names, grads))


def _run(family, t, kw, layouts, backend):
    """One backend on the draw (the emulated CUDA sweep with the forward's per-row gradients,
    as on a GPU; its backward's ∂x sweep is tested in tests/test_cuda_emu.py)."""
    if backend != EMULATION:
        return _call(family, t, kw, layouts, backend)
    with cuda_emulation():
        return _call(family, t, kw, layouts, backend)


def as_reference(t):
    """Float64 copies of the draw's tensors, the reference rows first rounded to x's dtype
    (how every backend reads rows of another dtype)."""
    xd = t["x"].dtype
    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.to(xd) if k in ("ref", "centres", "bank") else v
            v = v.double()
        out[k] = v
    return out


# ----------------------------------------------------------------------------- comparison

def _coarsest(*dtypes):
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _tiny_rows(v):
    """Rows at or below the eps (zero included): their gradients are ~1/eps."""
    return v.double().norm(dim=1) < 2 * EPS


def _structural_zeros(family, t, name):
    """Rows of the gradient of `name` that must be exactly zero whatever the data: classes
    outside the partial-FC index, reference rows marked invalid (and their thresholds)."""
    n = t[name].shape[0] if t[name].dim() else 1
    zero = torch.zeros(n, dtype=torch.bool)
    if name not in ("centres", "ref", "bias") or t[name].numel() == 1:
        return zero
    if "index" in t:
        zero |= ~torch.isin(torch.arange(n), t["index"])
    valid = t.get("ref_valid", t.get("bank_valid"))
    if valid is not None and (name == "bias" or family == "uss-centres"):
        zero |= ~valid
    return zero


def compare(got, want, t, family, where):
    """`got` (a backend on the draw) against `want` (the float64 reference)."""
    loss, grads = got
    ref_loss, ref_grads = want
    xd = t["x"].dtype
    assert loss.dtype == (torch.float64 if xd == torch.float64 else torch.float32), where
    nan, ref_nan = torch.isnan(loss.reshape(-1)), torch.isnan(ref_loss.reshape(-1))
    assert torch.equal(nan, ref_nan), \
        f"{where}: loss NaN at {nan.tolist()}, want {ref_nan.tolist()}"
    finite = ref_loss.reshape(-1)[~ref_nan]
    if finite.numel():
        err = rel_err(loss.reshape(-1)[~ref_nan], finite)
        assert err <= LOSS_RTOL[xd], f"{where}: loss rel. err {err:.3g} > {LOSS_RTOL[xd]}"
    scale = float(finite.abs().sum()) if finite.numel() else 1.0
    for name, g in grads.items():
        r, own = ref_grads[name], t[name].dtype
        at = f"{where}, ∂{name}"
        assert g.dtype == own, f"{at}: dtype {g.dtype}, want {own}"
        dtype = _coarsest(own, xd)
        if g.numel() == 1:
            v, w = float(g), float(r)
            assert math.isnan(v) == math.isnan(w), f"{at}: {v}, want {w}"
            tol = (torch.finfo(dtype).eps * abs(w)
                   + (1e-10 if dtype == torch.float64 else 1e-5) * max(1.0, abs(w), scale))
            assert math.isnan(w) or abs(v - w) <= tol, f"{at}: {v} vs {w} (tolerance {tol:.3g})"
            continue
        fine = g[torch.isfinite(g) & (g != 0)]
        if own == torch.float32 and xd in HALF and fine.numel() >= 8:
            # fp32 rows' gradient comes out of fp32 accumulators, never rounded to x's dtype
            # on the way
            assert torch.any(fine != fine.to(xd).to(own)), f"{at}: rounded to {xd}"
        g2, r2 = g.reshape(g.shape[0], -1), r.reshape(r.shape[0], -1)
        zero = _structural_zeros(family, t, name)
        assert torch.count_nonzero(g2[zero]) == 0, \
            f"{at}: rows {zero.nonzero()[:, 0].tolist()} must be exactly zero"
        # a half-precision gradient row of ~1/eps may overflow (inf, and NaN where two
        # overflowing parts meet): such rows are not compared
        fits = r2.nan_to_num(0).abs().amax(dim=1) <= torch.finfo(own).max / 16
        # which rows hold NaN (within a row, where an inf input leaves NaN beside zeros
        # depends on the order of the operations)
        nan_rows, ref_nan_rows = torch.isnan(g2).any(dim=1), torch.isnan(r2).any(dim=1)
        assert torch.equal(nan_rows[fits], ref_nan_rows[fits]), \
            f"{at}: NaN in rows {nan_rows.nonzero()[:, 0].tolist()}, want " \
            f"{ref_nan_rows.nonzero()[:, 0].tolist()}"
        compared = fits & ~torch.isnan(r2).any(dim=1)
        tiny = _tiny_rows(t[name]) if g.dim() == 2 else torch.zeros_like(fits)
        for group, units in ((tiny & compared, TINY_UNITS), (~tiny & compared, UNITS)):
            if not bool(group.any()) or r2[group].norm() == 0:
                continue
            err = rel_err(g2[group], r2[group])
            tol = units * grad_rtol(r2[group].to(torch.float64), dtype)
            assert err <= tol, f"{at} (rows {group.nonzero()[:, 0].tolist()}): rel. err " \
                               f"{err:.3g} > {tol:.3g} (compared in {dtype})"


def _snapshot(t):
    return {k: v.clone() for k, v in t.items() if isinstance(v, torch.Tensor)}


def _unchanged(t, before):
    return all(torch.equal(t[k].nan_to_num(), v.nan_to_num())
               and torch.equal(torch.isnan(t[k]) if t[k].is_floating_point() else t[k],
                               torch.isnan(v) if v.is_floating_point() else v)
               for k, v in before.items())


def check_bad(family, t, kw, layouts, backend, bad, where):
    """A bad argument: a TypeError or ValueError naming it, and no input changed."""
    name, what = bad
    before = _snapshot(t)
    with pytest.raises((TypeError, ValueError)) as e:
        _run(family, t, kw, layouts, backend)
    assert re.search(rf"\b{name}\b", str(e.value)), f"{where} ({what}): {e.value!r} " \
                                                    f"does not name {name}"
    assert _unchanged(t, before), f"{where} ({what}): an input changed"


# ----------------------------------------------------------------------------- coverage

COVERAGE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def coverage_report():
    """Prints, once per run, how many draws hit each axis value and which backends ran on it."""
    yield
    for family, (counts, ran, backends) in COVERAGE.items():
        everywhere = all(set(backends) <= ran[a][_key(v)]
                         for a, values in _axes(family).items() for v in values)
        print(f"\naxes coverage, {family}: {sum(counts['kind'].values())} draws on "
              f"{', '.join(backends)}; "
              + ("every value ran on every backend" if everywhere else "NOT every backend ran"
                 " on every value"))
        for axis, values in _axes(family).items():
            cells = []
            for v in values:
                missing = [b for b in backends if b not in ran[axis][_key(v)]]
                cells.append(f"{_key(v)} {counts[axis][_key(v)]}"
                             + (f" (not on {', '.join(missing)})" if missing else ""))
            print(f"  {axis:15s} " + ", ".join(cells))


def _key(v):
    return str(v).replace("torch.", "")


@pytest.mark.parametrize("family", FAMILIES)
def test_draws(family):
    """DRAWS seeded draws of `family`: every backend against the float64 reference (or the
    same error); every axis value hit, on every backend."""
    rng = random.Random(f"axes-{family}")
    backends = _backends(family)
    counts, ran = defaultdict(Counter), defaultdict(lambda: defaultdict(set))
    COVERAGE[family] = (counts, ran, backends)
    for k in range(DRAWS):
        pick, t, kw, layouts, bad = _draw(rng, family)
        where = f"{family} draw {k} " + ", ".join(f"{a}={_key(v)}" for a, v in pick.items()
                                                   if v is not None)
        applicable = {a: _key(v) for a, v in pick.items() if a in _axes(family) and v is not None}
        for a, v in applicable.items():
            counts[a][v] += 1
        want = None if bad else _call(family, as_reference(t), kw, layouts, "reference")
        for backend in backends:
            if bad:
                check_bad(family, t, kw, layouts, backend, bad, f"{where} on {backend}")
            else:
                compare(_run(family, t, kw, layouts, backend), want, t, family,
                        f"{where} on {backend}")
            for a, v in applicable.items():
                ran[a][v].add(backend)
    unhit = [f"{a}={_key(v)}" + ("" if counts[a][_key(v)] else " (no draw)")
             for a, values in _axes(family).items() for v in values
             if set(backends) - ran[a][_key(v)]]
    assert not unhit, f"{family}: axis values not run on every backend in {DRAWS} draws: {unhit}"


# ----------------------------------------------------------------------------- regimes
# The regimes of issue 27, each alone on every backend it concerns.

def _agrees(family, t, kw, backend, layouts=None):
    """`backend` against the float64 reference on the tensors t (contiguous unless laid out)."""
    layouts = {k: "contiguous" for k, v in t.items() if isinstance(v, torch.Tensor)} | (
        layouts or {})
    want = _call(family, as_reference(t), kw, layouts, "reference")
    got = _run(family, t, kw, layouts, backend)
    compare(got, want, t, family, f"{family} on {backend}")
    return got, want


def _case(family, b=7, n=19, d=12, dtype=torch.float32, rows_dtype=None, seed=0, index=True):
    """Contiguous random inputs of a family (no NaN, no bad row)."""
    g = torch.Generator().manual_seed(seed)
    rows_dtype = rows_dtype or dtype
    t = {"x": torch.randn(b, d, generator=g).to(dtype),
         "labels": torch.randint(0, n, (b,), generator=g)}
    if family.startswith("uss"):
        t["ref"] = torch.randn(n, d, generator=g).to(rows_dtype)
        t["ref_valid"] = torch.rand(n, generator=g) < 0.7
        t["bias"] = torch.rand(1, generator=g).to(dtype) * 10
        return t
    t["centres"] = torch.randn(n, d, generator=g).to(rows_dtype)
    if index:
        t["index"] = sample_classes(t["labels"], n, n // 2, generator=g)
    if family == "unitsface":
        t["bank"] = torch.randn(n, d, generator=g).to(rows_dtype)
        t["bank_valid"] = torch.rand(n, generator=g) < 0.7
        t["bias"] = torch.rand(n, generator=g).to(dtype) * 10
    return t


def _tiny(t, name, rows, norms):
    for i, norm in zip(rows, norms):
        v = t[name][i].double()
        t[name][i] = (v * (norm / v.norm()) if norm else v * 0).to(t[name].dtype)


@pytest.mark.parametrize("family", ["softmax", "unitsface", "uss-bank", "uss-centres"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_rows_near_the_eps(family, dtype, form):
    """Embeddings and reference rows of norm 0, eps/2, 0.98·eps and 1.02·eps (a wrong
    projection guard moves their gradient by a quarter or more) on every backend."""
    norms = (0.0, EPS / 2, 0.98 * EPS, 1.02 * EPS)
    t = _case(family, b=9, dtype=dtype, seed=1)
    _tiny(t, "x", range(4), norms)
    for name in ("centres", "bank", "ref"):
        if name in t:
            rows = t["index"][:4].tolist() if "index" in t else range(4)
            _tiny(t, name, rows, norms)
    kw = dict(scale=30.0)
    if family == "unitsface":
        kw.update(uss_form=form, margin_arc=0.3, margin_cos=0.1)
    elif family.startswith("uss"):
        kw.update(form=form)
    for backend in _backends(family)[1:]:
        _agrees(family, t, kw, backend)


@pytest.mark.parametrize("family", ["softmax", "unitsface", "uss-bank", "uss-centres"])
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16),
                                    (torch.float32, torch.float16)],
                         ids=["fp16-x_fp32-rows", "bf16-x_fp32-rows", "fp32-x_bf16-rows",
                              "fp32-x_fp16-rows"])
def test_mixed_dtypes(family, dtypes):
    """x in one dtype, the reference rows (centres, bank, ref) in another: read rounded to x's
    dtype, gradients in their own dtype, on every backend (the fused ones included). The row of
    row 0's class lies below the eps, where fp16's subnormals round its entries by percents:
    a backend that reads it unrounded anywhere (a norm, a target row) is off by as much."""
    t = _case(family, dtype=dtypes[0], rows_dtype=dtypes[1], seed=2)
    for name in ("centres", "bank", "ref"):
        if name in t:
            _tiny(t, name, [int(t["labels"][0])], [EPS / 2])
    kw = dict(scale=64.0) | ({"margin_arc": 0.5, "margin_cos": 0.0}
                             if family in ("softmax", "unitsface") else {})
    for backend in _backends(family)[1:]:
        _agrees(family, t, kw, backend)


@pytest.mark.parametrize("family", ["softmax", "unitsface"])
@pytest.mark.parametrize("margins", ["cosface_easy", "combined_easy", "arcface_easy"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_easy_margin_loss_values(family, margins, reduction):
    """easy_margin: the margin only where the target cosine is positive — the loss values
    (per row) against the reference, with targets on both sides of 0 (a wrong branch whose
    gradient happens to agree would pass a gradcheck, not this)."""
    t = _case(family, b=8, seed=3, index=False)
    y = t["labels"]
    sign = torch.tensor([1.0, -1.0] * 4)[:, None]
    t["x"] = sign * torch.nn.functional.normalize(t["centres"][y]) + 0.3 * t["x"]
    kw = dict(scale=16.0, reduction=reduction) | dict(zip(
        ("margin_arc", "margin_cos", "arcface_grad", "easy_margin"), MARGINS[margins]))
    cos = torch.nn.functional.cosine_similarity(t["x"], t["centres"][y])
    assert (cos > 0).any() and (cos < 0).any()
    for backend in _backends(family):
        (loss, _), (want, _) = _agrees(family, t, kw, backend)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["softmax", "unitsface", "uss-bank", "uss-centres",
                                    "uss-inbatch"])
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_non_contiguous_inputs(family, layout):
    """Every tensor of the call in a non-contiguous layout (or at a storage offset), with junk
    (NaN) in the memory around it, on every backend."""
    t = _case(family, seed=4)
    if family == "uss-inbatch":
        t.pop("ref"), t.pop("ref_valid")
        t["labels"] = t["labels"] % 3
    layouts = {k: (layout if v.dim() == 2 or layout != "transposed" else "strided")
               for k, v in t.items()}
    for backend in _backends(family)[1:]:
        _agrees(family, t, dict(scale=64.0), backend, layouts)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("data", ["finite", "nan_x"])
def test_centres_uss_invalid_rows_get_exactly_zero(form, data):
    """Centres-mode USS with ref_valid: ∂ref is exactly zero on the invalid rows whatever they
    hold (NaN, inf, large values) and whatever x holds (a NaN row of x)."""
    t = _case("uss-centres", seed=5)
    invalid = (~t["ref_valid"]).nonzero()[:, 0]
    assert invalid.numel() >= 3
    t["ref"][invalid[0]] = math.nan
    t["ref"][invalid[1], 0] = math.inf
    t["ref"][invalid[2]] *= 1e30
    if data == "nan_x":
        t["x"][2, 1] = math.nan
    for backend in _backends("uss-centres"):
        (_, grads), _ = _agrees("uss-centres", t, dict(scale=32.0, form=form), backend)
        assert torch.count_nonzero(grads["ref"][invalid]) == 0, backend


@pytest.mark.parametrize("family, index", [("softmax", False), ("softmax", True),
                                           ("unitsface", False), ("unitsface", True),
                                           ("uss-centres", False)],
                         ids=["softmax", "softmax-pfc", "unitsface", "unitsface-pfc",
                              "uss-centres"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("data", ["inf", "nan"])
def test_inf_embedding_reaches_every_centre_gradient(family, dtype, data, index):
    """An inf (or NaN) entry in one embedding, beside centres (and bank rows) of norm 0 and
    below the eps: that row's cosines are NaN with every column, so its loss, its ∂x and the
    ∂W of every column it meets are NaN in every entry (docs/design.md §5) — a sub-eps centre
    included, whose ∂W has no projection to spread the NaN across its features: there the NaN
    must come through the gradient g of the NaN cosine itself (the [−1, 1] clamp's gradient
    is 1 at a NaN, not 0). The other rows stay finite, and centres outside the partial-FC
    index exactly zero. Element by element against the float64 reference, on every backend."""
    t = _case(family, b=7, n=9, d=6, dtype=dtype, seed=6, index=index)
    name = "ref" if family.startswith("uss") else "centres"
    if family.startswith("uss"):
        t.pop("ref_valid")
    cols = t["index"][[0, 1, 2]].tolist() if index else [2, 4, 5]
    for rows in ("centres", "bank", "ref"):
        if rows in t:
            _tiny(t, rows, cols, [0.0, EPS * 1e-2, 0.0])
    t["x"][2, 0] = math.inf if data == "inf" else math.nan
    kw = dict(scale=30.0, reduction="none")
    if family == "softmax":
        kw.update(margin_arc=0.3, margin_cos=0.1)
    touched = torch.zeros(t[name].shape[0], dtype=torch.bool)
    touched[t["index"] if index else slice(None)] = True
    for backend in _backends(family):
        (loss, grads), (_, want) = _agrees(family, t, kw, backend)
        where = f"{family} on {backend}"
        assert torch.isnan(loss).tolist() == [i == 2 for i in range(7)], where
        for k, g in grads.items():
            assert torch.equal(torch.isnan(g), torch.isnan(want[k])), \
                f"{where}, ∂{k}: NaN at {torch.isnan(g).nonzero().tolist()}, want " \
                f"{torch.isnan(want[k]).nonzero().tolist()}"
        assert torch.isnan(grads["x"][2]).all() and torch.isfinite(grads["x"][[0, 1, 3]]).all()
        assert torch.isnan(grads[name][touched]).all(), f"{where}: ∂{name} not NaN everywhere"
        assert torch.count_nonzero(grads[name][~touched]) == 0, where


@pytest.mark.parametrize("dtype", HALF)
def test_emulation_row_grads_of_a_confident_row(dtype):
    """Half-precision x, two classes, CosFace at s = 64: row 5's target dominates (its float64
    ∂x is ~1e-12); the emulated CUDA sweep's forward per-row gradients, row by row, against the
    float64 reference. The sweep once put the target's weight e^{z_t − m} ≈ 1 into its tile of
    x's dtype and cancelled it against −s·κ_t·ŵ_y at the end (~u·s left); it now keeps the
    target out of the tile and forms s·(p_y − 1) as −s·So/S from the other columns' sum-exp.
    (The backends that form p_y − 1 as e^{z_t − lse} − 1 in fp32 — native CPU, Triton, the
    CUDA backward's sweep — miss this row in bf16 by ~u₃₂·s: docs/mutation.md.)"""
    if EMULATION not in _backends("softmax"):
        pytest.skip("the native extension is not built")
    t = _case("softmax", b=8, n=2, d=10, dtype=dtype, seed=0, index=False)
    layouts = {k: "contiguous" for k in t}
    kw = dict(scale=64.0, margin_arc=0.0, margin_cos=0.4)
    with cuda_emulation():
        (_, got), _ = _call("softmax", t, kw, layouts, EMULATION), None
    _, want = _call("softmax", as_reference(t), kw, layouts, "reference")
    for i in range(t["x"].shape[0]):
        err = rel_err(got["x"][i], want["x"][i])
        assert err <= UNITS * grad_rtol(want["x"][i], dtype), (i, err)
