"""Bad input and bad data (docs/design.md §5), drawn at random: seeded draws of settings,
shapes, dtypes, layouts and values run every backend on the same draw, and each call either
raises a clear error naming an argument, or agrees with the float64 reference — with NaN
exactly where the reference has it (data NaN propagates, a row marked invalid contributes
nothing whatever it holds). A call that raises changes none of its inputs.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import DTYPES, INTERPRETING, all_backends, as_float64, grad_names, leaves_of, loss_of
from unitsface_kernels import bank_update_, native, sample_classes

ARGUMENTS = ("x", "labels", "bias", "ref", "ref_labels", "ref_valid", "centres", "bank",
             "bank_valid", "index", "scale", "margin", "margin_arc", "margin_cos", "uss_margin",
             "uss_weight", "form", "uss_form", "reduction", "official_clamp", "arcface_grad",
             "easy_margin", "backend", "num_classes", "num_sample")
DRAWS = 120


def _backends(family):
    op = "uss" if family == "uss" else "unitsface"
    return [b for b in all_backends("cpu", op) if isinstance(b, str)]


# ----------------------------------------------------------------------------- draws

def _settings(rng, family, bad):
    """Keyword settings of one call; with `bad`, one of them out of its documented range."""
    kw = dict(scale=rng.choice([8.0, 16.0, 64.0]))
    if family == "uss":
        kw.update(margin=rng.uniform(-0.2, 0.5), form=rng.choice(["pairs", "lse"]),
                  official_clamp=rng.random() < 0.5)
    else:
        kw.update(margin_arc=rng.choice([0.0, 0.3, 0.5]), margin_cos=rng.choice([0.0, 0.2, 0.4]),
                  arcface_grad=rng.choice(["exact", "straight_through"]),
                  easy_margin=rng.random() < 0.3)
    if family == "unitsface":
        kw.update(uss_margin=rng.uniform(0, 0.3), uss_form=rng.choice(["pairs", "lse"]),
                  uss_weight=rng.uniform(0, 2), official_clamp=rng.random() < 0.5)
    kw["reduction"] = rng.choice(["mean", "sum", "none"])
    if bad:
        name = rng.choice(sorted(k for k in kw if k != "reduction") + ["reduction"])
        value = kw[name]
        if isinstance(value, bool):
            kw[name] = rng.choice([0.5, "yes", None])
        elif isinstance(value, str):
            kw[name] = rng.choice(["", value.upper(), 3])
        else:
            out_of_range = {"scale": -1.0, "margin_arc": 4.0, "uss_weight": -1.0}.get(name, 1.5)
            kw[name] = rng.choice([math.nan, math.inf, -math.inf, out_of_range, "1"])
    return kw


def _case(rng, family, dtype):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    # D ≥ 3: at D = 1 every cosine is ±1, where ArcFace's sin θ = sqrt(1 − cos²) turns the
    # rounding of a cosine into a loss error of 1e-3 (an ill-conditioned input, not a bug)
    b, n, d = rng.randint(1, 9), rng.randint(1, 13), rng.randint(3, 10)
    mode = rng.choice(["bank", "inbatch", "centres"]) if family == "uss" else None
    labels = torch.randint(0, n, (b,), generator=g)
    case = dict(family=family, mode=mode, x=torch.randn(b, d, generator=g).to(dtype),
                labels=labels)
    if family == "uss":
        case["ref"] = None if mode == "inbatch" else torch.randn(n, d, generator=g).to(dtype)
        case["ref_valid"] = (torch.rand(n, generator=g) < 0.7) if mode == "bank" else None
        n_ref = b if mode == "inbatch" else n
        case["bias"] = (torch.rand(n_ref if rng.random() < 0.3 else 1, generator=g) * 10).to(dtype)
        return case
    case["centres"] = torch.randn(n, d, generator=g).to(dtype)
    if family == "unitsface":
        case["bank"] = torch.randn(n, d, generator=g).to(dtype)
        case["bank_valid"] = torch.rand(n, generator=g) < 0.7
        case["bias"] = (torch.rand(n if rng.random() < 0.3 else 1, generator=g) * 10).to(dtype)
    case["index"] = (sample_classes(labels, n, rng.randint(1, n), generator=g)
                     if rng.random() < 0.5 else None)
    return case


def _data(rng, case):
    """Bad data: zero rows, NaN/Inf in x or in a reference row, NaN in an invalid bank row."""
    what = rng.choice(["none", "zero_x", "nan_x", "inf_x", "nan_ref", "nan_invalid"])
    x = case["x"]
    i = rng.randrange(x.shape[0])
    if what == "zero_x":
        x[i] = 0
    elif what == "nan_x":
        x[i, rng.randrange(x.shape[1])] = math.nan
    elif what == "inf_x":
        x[i, rng.randrange(x.shape[1])] = math.inf
    ref_name = "ref" if case["family"] == "uss" else "bank"
    ref = case.get(ref_name) if case["family"] != "softmax" else case["centres"]
    valid = case.get("ref_valid" if case["family"] == "uss" else "bank_valid")
    if what == "nan_ref" and ref is not None:
        ref[rng.randrange(ref.shape[0])] = math.nan
    if what == "nan_invalid" and valid is not None and not bool(valid.all()):
        ref[int((~valid).nonzero()[0])] = math.nan
    return what


def _corrupt(rng, case):
    """One bad argument of the call: a wrong shape, dtype, range or layout."""
    c = case
    b = c["x"].shape[0]
    options = ["labels_range", "labels_dtype", "labels_shape", "x_dim", "x_dtype", "bias_size"]
    if c["family"] != "uss" or c["mode"] != "inbatch":
        options += ["ref_width"]
    if c.get("index") is not None:
        options += ["index_missing", "index_unsorted", "index_range"]
    what = rng.choice(options)
    n = (c["ref"] if c["family"] == "uss" and c["ref"] is not None else
         c.get("centres", c["x"])).shape[0]
    if what == "labels_range":
        c["labels"] = c["labels"].clone()
        c["labels"][rng.randrange(b)] = rng.choice([-1, n, n + 5]) if not (
            c["family"] == "uss" and c["mode"] == "inbatch") else c["labels"][0]
        if c["family"] == "uss" and c["mode"] == "inbatch":
            return None  # any integer is a label in-batch: not an error
    elif what == "labels_dtype":
        c["labels"] = c["labels"].float()
    elif what == "labels_shape":
        c["labels"] = torch.cat([c["labels"], c["labels"][:1]])
    elif what == "x_dim":
        c["x"] = c["x"][0]
    elif what == "x_dtype":  # an integer x, or a float dtype other than the reference rows'
        inbatch = c["family"] == "uss" and c["mode"] == "inbatch"
        c["x"] = c["x"].to(torch.int32) if inbatch or rng.random() < 0.5 else c["x"].to(
            torch.float64 if c["x"].dtype != torch.float64 else torch.float32)
    elif what == "bias_size":
        if "bias" not in c:
            return None
        c["bias"] = torch.zeros(2 + max(n, b))
    elif what == "ref_width":
        key = "ref" if c["family"] == "uss" else "centres"
        c[key] = torch.cat([c[key], c[key][:, :1]], 1)
    elif what == "index_missing":
        keep = c["index"] != c["labels"][0]
        if not bool(keep.any()):
            return None
        c["index"] = c["index"][keep]
    elif what == "index_unsorted":
        if c["index"].numel() < 2:
            return None
        c["index"] = c["index"].flip(0)
    elif what == "index_range":
        c["index"] = torch.cat([c["index"], torch.tensor([n])])
    return what


# ----------------------------------------------------------------------------- running

def _call(case, backend, kw):
    """(loss, grads) of one call on leaf copies, or the exception it raised."""
    try:
        leaves = leaves_of(case)
        loss = loss_of(leaves, backend, **kw)
        names = [k for k in grad_names(case)
                 if isinstance(leaves.get(k), torch.Tensor) and leaves[k].requires_grad]
        grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in names], allow_unused=True)
        return loss.detach(), dict(zip(names, grads))
    except (TypeError, ValueError, KeyError) as e:
        return e


def _snapshot(case):
    return {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}


def _nan_pattern(t):
    return torch.isnan(t.detach().double()) if t.dim() else torch.isnan(t.detach().double())[None]


def _agree(got, want, dtype, backend, draw):
    loss, grads = got
    ref_loss, ref_grads = want
    assert torch.equal(_nan_pattern(loss), _nan_pattern(ref_loss)), (backend, draw, loss, ref_loss)
    both = ~_nan_pattern(ref_loss).reshape(-1)
    a, b = loss.double().reshape(-1)[both], ref_loss.double().reshape(-1)[both]
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    atol = tol * (1 + float(b.abs().max()) if b.numel() else 1)
    assert torch.allclose(a, b, rtol=tol, atol=atol), \
        (backend, draw, a, b)
    for name, g in grads.items():
        r = ref_grads[name]
        if g is None or r is None:
            assert g is None or not torch.count_nonzero(g)
            assert r is None or not torch.count_nonzero(r)
            continue
        # NaN exactly where the float64 gradient is NaN (entries too large for the dtype
        # overflow — a zero embedding's gradient is ~1/eps — and are not data NaN)
        fits = ~(r.abs() > torch.finfo(g.dtype).max)
        assert torch.equal(torch.isnan(g)[fits], torch.isnan(r)[fits]), (backend, draw, name)


@pytest.mark.parametrize("family", ["uss", "softmax", "unitsface"])
def test_random_draws(family):
    """Each draw: good inputs with bad data, or one bad setting, or one bad argument; every
    backend does what the reference does (raise naming an argument, or agree with it)."""
    rng = random.Random(f"validation-{family}")
    backends = _backends(family)
    seen = {"ok": 0, "setting": 0, "argument": 0}
    for draw in range(DRAWS):
        dtype = rng.choice(DTYPES if INTERPRETING else [torch.float32, torch.float64])
        case = _case(rng, family, dtype)
        kind = rng.choice(["ok", "ok", "setting", "argument"])
        kw = _settings(rng, family, bad=kind == "setting")
        if kind == "argument" and _corrupt(rng, case) is None:
            kind = "ok"
        bad_data = _data(rng, case) if kind == "ok" else "none"
        before = _snapshot(case)
        results = {b: _call(case, b, kw) for b in backends}
        for name, t in _snapshot(case).items():
            assert torch.equal(t.nan_to_num(), before[name].nan_to_num()), (draw, name)
        if kind != "ok":
            for b, r in results.items():
                assert isinstance(r, Exception), (draw, kind, b, kw)
                assert any(f"{a} " in str(r) or f"{a}[" in str(r) or str(r).startswith(a)
                           for a in ARGUMENTS), (draw, b, r)
            seen[kind] += 1
            continue
        want = _call(as_float64(case), "reference", kw)
        assert not isinstance(want, Exception), (draw, want)
        for b, r in results.items():
            assert not isinstance(r, Exception), (draw, b, bad_data, r)
            _agree(r, want, dtype, b, (draw, bad_data))
        seen["ok"] += 1
    assert min(seen.values()) >= DRAWS // 10, seen  # every kind of draw happened


# ----------------------------------------------------------------------------- bank_update_

@pytest.mark.parametrize("change,error,match", [
    (dict(labels=torch.tensor([0, 1, 6])), ValueError,
     r"labels must lie in \[0, 6\).*got labels\[2\] = 6"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels must be an integer tensor"),
    (dict(x=torch.zeros(3, 5)), ValueError, "x has embedding size 5 but bank has 4"),
    (dict(bank_valid=torch.zeros(6)), TypeError, "bank_valid must be a bool tensor"),
    (dict(x=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "x must be float16"),
])
def test_bank_update_errors_change_nothing(change, error, match):
    args = dict(bank=torch.randn(6, 4), bank_valid=torch.rand(6) < 0.5, x=torch.randn(3, 4),
                labels=torch.tensor([0, 1, 2]))
    args.update(change)
    before = (args["bank"].clone(), args["bank_valid"].clone())
    with pytest.raises(error, match=match):
        bank_update_(**args)
    assert torch.equal(args["bank"], before[0]) and torch.equal(args["bank_valid"], before[1])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_bank_update_any_integer_labels(dtype):
    bank, valid = torch.zeros(6, 4), torch.zeros(6, dtype=torch.bool)
    x = torch.randn(3, 4)
    bank_update_(bank, valid, x, torch.tensor([5, 1, 2]).to(dtype))
    assert valid.tolist() == [False, True, True, False, False, True]
    torch.testing.assert_close(bank[5], x[0] / x[0].norm())


@pytest.mark.parametrize("update", ["public", "reference"])
def test_bank_rule_zero_tiny_and_non_finite_rows(update):
    """One rule on every path (bank_update_ runs the native op when it is built): the stored
    row r has F.normalize(r) = F.normalize(x) (x itself below the eps); a finite row is valid
    (zero included), a non-finite one is not."""
    from unitsface_kernels import reference

    fn = bank_update_ if update == "public" else reference.eager_bank_update_
    bank, valid = torch.ones(4, 3), torch.zeros(4, dtype=torch.bool)
    x = torch.tensor([[0.0, 0.0, 0.0], [3e-6, 0.0, 4e-6], [1.0, math.nan, 0.0], [0.0, 2.0, 0.0]])
    fn(bank, valid, x, torch.arange(4))
    assert valid.tolist() == [True, True, False, True]
    torch.testing.assert_close(bank[[0, 1, 3]], torch.tensor(
        [[0.0, 0.0, 0.0], [3e-6, 0.0, 4e-6], [0.0, 1.0, 0.0]]))


def test_native_and_reference_bank_updates_agree():
    if not native.has_op("bank_update_"):
        pytest.skip("the native extension is not built")
    from unitsface_kernels import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    x[3] = 0
    x[5] = 1e-7
    x[7, 2] = math.inf
    labels = torch.randint(0, 30, (40,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        a = (torch.zeros(30, 8, dtype=dtype), torch.zeros(30, dtype=torch.bool))
        b = (torch.zeros(30, 8, dtype=dtype), torch.zeros(30, dtype=torch.bool))
        bank_update_(*a, x, labels)
        reference.eager_bank_update_(*b, x, labels)
        torch.testing.assert_close(a[0], b[0], equal_nan=True, rtol=0, atol=0)
        assert torch.equal(a[1], b[1])
