"""Every axis of the modules (issue 27): seeded draws of a module of unitsface_kernels.nn —
UniTSFaceHead, PartialFC, USSLoss (bank and in-batch) and the official heads — with its
settings (scale 2 to 64, partial FC, form, clamp, dtypes), its start (fresh, or loaded from an
official checkpoint by load_official), its backend, and an order of calls (a backward after
each forward; two forwards before one backward, whose first graph must keep the old bank
rows; a forward never backwarded, whose update lands at the next call). Each call is replayed
on a float64 shadow of the module's state with the eager formulas of
unitsface_kernels.reference in the official order: the data-dependent threshold start while
b ≤ 0 (over the rows the loss uses: the sampled classes' bank rows under partial FC), the loss,
then the bank update. Loss, gradients, threshold and bank must agree.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter

import pytest
import torch
from helpers import INTERPRETING, LOSS_RTOL, grad_rtol, rel_err
from unitsface_kernels import native, reference
from unitsface_kernels.nn import (NormalizedBCE, PartialFC, SampleToSampleBCE,
                                  SampleToSampleSoftmax, UnifiedCrossEntropy, UniTSFaceHead,
                                  USSLoss, heads)

DRAWS = int(os.environ.get("UNITSFACE_AXES_DRAWS", "0")) or 14
MODULES = ("UniTSFaceHead", "PartialFC", "USSLoss-bank", "USSLoss-inbatch", "NormalizedBCE",
           "UnifiedCrossEntropy", "SampleToSampleSoftmax", "SampleToSampleBCE")
BANKED = ("UniTSFaceHead", "USSLoss-bank", "SampleToSampleSoftmax", "SampleToSampleBCE")
CENTRED = ("UniTSFaceHead", "PartialFC", "NormalizedBCE", "UnifiedCrossEntropy")
SCHEDULES = ("step", "two_forwards", "no_backward")


def _backends():
    out = ["reference"] + (["triton"] if INTERPRETING else [])
    return out + (["native"] if native.has_family("unitsface") and native.has_family("uss")
                  else [])


def _axes(name):
    axes = {"backend": tuple(_backends()), "scale": (2.0, 16.0, 30.0, 64.0),
            "x_dtype": (torch.float32, torch.bfloat16), "schedule": SCHEDULES,
            "start": ("fresh", "official")}
    if name in ("UniTSFaceHead", "PartialFC"):
        axes["sample_rate"] = (1.0, 0.5)
    if name in BANKED:
        axes["bank_dtype"] = (torch.float32, torch.bfloat16)
    if name in ("UniTSFaceHead", "USSLoss-bank", "USSLoss-inbatch"):
        axes["form"] = ("pairs", "lse")
    if name not in ("PartialFC", "SampleToSampleSoftmax"):
        axes["official_clamp"] = (True, False)
    return axes


def _build(name, pick, c, d):
    """The module of a draw."""
    kw = dict(scale=pick["scale"], backend=pick["backend"])
    for k in ("sample_rate", "bank_dtype", "official_clamp"):
        if k in pick:
            kw[k] = pick[k]
    if name == "UniTSFaceHead":
        return UniTSFaceHead(d, c, uss_form=pick["form"], margin_arc=0.2, uss_weight=0.7, **kw)
    if name == "PartialFC":
        return PartialFC(d, c, margin_arc=0.3, margin_cos=0.1, **kw)
    if name.startswith("USSLoss"):
        mode = name.split("-")[1]
        return USSLoss(d, c if mode == "bank" else None, mode=mode, form=pick["form"], **kw)
    return {"NormalizedBCE": NormalizedBCE, "UnifiedCrossEntropy": UnifiedCrossEntropy,
            "SampleToSampleSoftmax": SampleToSampleSoftmax,
            "SampleToSampleBCE": SampleToSampleBCE}[name](d, c, **kw)


def _official_checkpoint(rng, module, g):
    """A random checkpoint in the official code's names (with a DataParallel prefix, or the
    short names, or wrapped in {"state_dict": ...}) for the module's entries: feat_mem holds
    raw features, zero and tiny rows and a NaN row (stored invalid)."""
    prefix = rng.choice(["", "module."])
    short = rng.random() < 0.25
    sd = {}
    for entry in module.official_entries():
        key = entry.short if short else prefix + entry.key
        if entry.kind == "weight":
            sd[key] = torch.randn(module.weight.shape, generator=g)
        elif entry.kind == "feat_mem":
            feat = torch.randn(module.bank.shape, generator=g) * 3
            feat[0] = 0.0
            feat[1] *= 1e-7
            feat[2, 0] = math.nan
            sd[key] = feat
        else:
            sd[key] = (torch.rand(module.bias.shape, generator=g) * 8).reshape(
                module.bias.shape if rng.random() < 0.5 else (-1,))
    return {"state_dict": sd} if rng.random() < 0.3 else sd


class Shadow:
    """The module's state in float64 (weight, b, bank, bank_valid) and its calls by the eager
    formulas, in the official order."""

    def __init__(self, name, module, x_dtype):
        self.name, self.m, self.xd = name, module, x_dtype
        self.weight = (module.weight.detach().to(x_dtype).double().requires_grad_()
                       if hasattr(module, "weight") else None)
        self.bias = module.bias.detach().double().requires_grad_() if hasattr(
            module, "bias") else None
        if name in BANKED:
            self.bank = module.bank.detach().clone()
            self.valid = module.bank_valid.clone()

    def _bank64(self):
        return self.bank.to(self.xd).double()

    def call(self, x, labels, index):
        """(the float64 loss, the float64 leaf of x) of one forward of the module, with the
        threshold start before it and the bank update after it done on the shadow."""
        m, name = self.m, self.name
        x64 = x.detach().double().requires_grad_()
        s = m.scale
        b = self.bias
        if name in ("UniTSFaceHead", "USSLoss-bank", "USSLoss-inbatch", "SampleToSampleBCE") \
                and float(b.detach().mean()) <= 0:
            with torch.no_grad():
                if name == "USSLoss-inbatch":
                    b0 = reference.eager_uss_bias_init(x64, labels, scale=s)
                elif index is None:
                    b0 = reference.eager_uss_bias_init(x64, labels, self._bank64(), None,
                                                       self.valid, scale=s)
                else:
                    b0 = reference.eager_uss_bias_init(x64, labels, self._bank64()[index],
                                                       index, self.valid[index], scale=s)
                if math.isfinite(float(b0)):
                    new = b + b0 if name == "SampleToSampleBCE" else b0.expand_as(b)
                    self.bias = b = new.detach().clone().requires_grad_()
        clamp = getattr(m, "official_clamp", False)
        if name == "UniTSFaceHead":
            loss = reference.unitsface_loss(
                x64, labels, self.weight, self._bank64(), b, bank_valid=self.valid, index=index,
                scale=s, margin_arc=m.margin_arc, margin_cos=m.margin_cos,
                uss_margin=m.uss_margin, uss_form=m.uss_form, uss_weight=m.uss_weight,
                official_clamp=clamp)
        elif name == "PartialFC":
            loss = reference.margin_softmax_loss(x64, self.weight, labels, scale=s,
                                                 margin_arc=m.margin_arc,
                                                 margin_cos=m.margin_cos, index=index)
        elif name == "USSLoss-inbatch":
            loss = reference.uss_loss(x64, labels, b, scale=s, margin=m.margin, form=m.form,
                                      official_clamp=clamp)
        elif name in ("USSLoss-bank", "SampleToSampleBCE"):
            loss = reference.uss_loss(x64, labels, b, self._bank64(), None, self.valid,
                                      scale=s, margin=m.margin, form=getattr(m, "form", "pairs"),
                                      official_clamp=clamp)
        elif name == "SampleToSampleSoftmax":
            loss = reference.margin_softmax_loss(x64, self._bank64(), labels, scale=s,
                                                 margin_arc=0.0, margin_cos=m.margin)
        else:  # the class-centre BCE heads
            loss = reference.uss_loss(x64, labels, b, self.weight, scale=s, margin=m.margin,
                                      official_clamp=clamp)
        if name in BANKED:
            reference.eager_bank_update_(self.bank, self.valid, x.detach(), labels)
        return loss, x64


def _close(got, want, dtype, what, scale=1.0, floor=0.0):
    """got within a few roundings of `dtype` of the float64 want (a scalar: against the size
    of the losses, as helpers.assert_close_grad), or within `floor` (the norm of the error
    that fp32 arithmetic on terms of size s leaves: a confident row's gradient is ~0)."""
    if want.numel() == 1:
        tol = 2 * torch.finfo(dtype).eps * abs(float(want)) + 1e-5 * max(1.0, abs(float(want)),
                                                                           scale)
        assert abs(float(got) - float(want)) <= tol, (what, float(got), float(want))
        return
    if want.norm() == 0:
        assert torch.count_nonzero(got) == 0, what
        return
    err, tol = rel_err(got, want), 3 * grad_rtol(want, dtype)
    assert err <= tol or float((got.double() - want).norm()) <= floor, \
        f"{what}: rel. err {err:.3g} > {tol:.3g}"


COVERAGE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def coverage_report():
    yield
    for name, counts in COVERAGE.items():
        print(f"\nmodule axes coverage, {name}: {sum(counts['backend'].values())} draws")
        for axis, values in _axes(name).items():
            key = [str(v).replace("torch.", "") for v in values]
            print(f"  {axis:15s} " + ", ".join(f"{k} {counts[axis][k]}" for k in key))


@pytest.mark.parametrize("name", MODULES)
def test_module_draws(name, monkeypatch):
    """DRAWS seeded draws of the module `name`: each call of the module against its float64
    shadow; every axis value hit."""
    rng = random.Random(f"axes-modules-{name}")
    counts = COVERAGE.setdefault(name, {a: Counter() for a in _axes(name)})
    sampled = []
    real_index = heads.partial_fc_index

    def recording(module, labels):
        sampled.append(real_index(module, labels))
        return sampled[-1]

    monkeypatch.setattr(heads, "partial_fc_index", recording)
    for k in range(DRAWS):
        pick = {a: rng.choice(v) for a, v in _axes(name).items()}
        for a, v in pick.items():
            counts[a][str(v).replace("torch.", "")] += 1
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        torch.manual_seed(rng.randrange(1 << 30))
        c, d, b = rng.choice([5, 12, 17]), rng.choice([4, 9, 16]), rng.choice([1, 3, 6])
        module = _build(name, pick, c, d)
        if pick["start"] == "official":
            sd = _official_checkpoint(rng, module, g)
            module.load_official(sd)
            _check_loaded(module, sd, _build(name, pick, c, d))
        where = f"{name} draw {k}: " + ", ".join(f"{a}={v}" for a, v in pick.items())
        _run_schedule(name, module, pick, rng, g, c, d, b, sampled, where)
    for axis, values in _axes(name).items():
        missed = [v for v in values if not counts[axis][str(v).replace("torch.", "")]]
        assert not missed, f"{name}: {axis} values {missed} never drawn"


def _check_loaded(module, sd, fresh):
    """load_official: the tensors land where they belong (feat_mem by the bank's rule), and
    the module's state_dict loads into a fresh module with the same state (a round trip)."""
    sd = sd.get("state_dict", sd)
    for entry in module.official_entries():
        value = next((v for k, v in sd.items() if k.endswith(entry.short)), None)
        if value is None:
            continue
        if entry.kind == "weight":
            assert torch.equal(module.weight.detach(), value)
        elif entry.kind == "bias":
            assert torch.equal(module.bias.detach().reshape(-1), value.reshape(-1))
        else:
            finite = torch.isfinite(value).all(1)
            assert torch.equal(module.bank_valid, finite)
            want = reference.bank_rows(value[finite]).to(module.bank.dtype)
            torch.testing.assert_close(module.bank[finite], want, rtol=0,
                                       atol=2 * torch.finfo(module.bank.dtype).eps, equal_nan=True)
    state = module.state_dict()
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v.nan_to_num(), state[k].nan_to_num()), k


def _run_schedule(name, module, pick, rng, g, c, d, b, sampled, where):
    module.train()
    shadow = Shadow(name, module, pick["x_dtype"])
    xs, losses, shadow_losses, shadow_xs = [], [], [], []
    schedule = pick["schedule"]
    for step in range(3):
        labels = torch.randint(0, c, (b,), generator=g)
        if name == "USSLoss-inbatch":
            labels = torch.randint(0, 2, (b,), generator=g)
        x = torch.randn(b, d, generator=g).to(pick["x_dtype"]).requires_grad_()
        sampled.clear()
        loss = module(x, labels)
        index = sampled[-1] if sampled else None
        want, x64 = shadow.call(x, labels, index)
        value = float(want.detach())
        at = f"{where}, step {step}"
        assert math.isnan(float(loss)) == math.isnan(value), (at, float(loss), value)
        if not math.isnan(value):
            # relative, and absolute at the rounding of the loss's terms (of size s) in fp32
            tol = (LOSS_RTOL[pick["x_dtype"]] * abs(value)
                   + 4 * torch.finfo(torch.float32).eps * module.scale)
            assert abs(float(loss) - value) <= tol, f"{at}: loss {float(loss)} vs {value}"
        if hasattr(module, "bias") and shadow.bias is not None:
            _close(module.bias.detach().double(), shadow.bias.detach(), torch.float32,
                   f"{at}: threshold")
        xs.append(x), losses.append(loss), shadow_xs.append(x64), shadow_losses.append(want)
        if schedule == "step" or (schedule == "two_forwards" and step % 2 == 1) or (
                schedule == "no_backward" and step == 2):
            _backward(module, shadow, xs, losses, shadow_xs, shadow_losses, at)
        elif schedule == "no_backward":
            xs, losses, shadow_xs, shadow_losses = [], [], [], []
        if name in BANKED and schedule != "two_forwards":
            torch.testing.assert_close(module.bank, shadow.bank, rtol=0,
                                       atol=2 * torch.finfo(module.bank.dtype).eps, equal_nan=True)
            assert torch.equal(module.bank_valid, shadow.valid), at
    if xs:
        _backward(module, shadow, xs, losses, shadow_xs, shadow_losses, f"{where}, end")
    if name in BANKED:
        torch.testing.assert_close(module.bank, shadow.bank, rtol=0,
                                   atol=2 * torch.finfo(module.bank.dtype).eps, equal_nan=True)


def _backward(module, shadow, xs, losses, shadow_xs, shadow_losses, at):
    """Backward of the pending losses on both sides: ∂x of each call, ∂W, ∂b."""
    params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
              if p is not None]
    for p in params:
        p.grad = None
    sum(losses).backward()
    leaves = shadow_xs + [t for t in (shadow.weight, shadow.bias) if t is not None]
    want = torch.autograd.grad(sum(shadow_losses), leaves, allow_unused=True)
    scale = float(sum(abs(float(w.detach())) for w in shadow_losses))
    eps = torch.finfo(torch.float32).eps
    for x, w in zip(xs, want):
        if w is not None and torch.isfinite(w).all():
            floor = 4 * eps * module.scale * math.sqrt(w.numel()) / x.shape[0]
            _close(x.grad, w, x.dtype, f"{at}: ∂x", scale, floor)
    floor = 4 * eps * module.scale * len(xs)
    rest = list(want[len(xs):])
    if shadow.weight is not None:
        w = rest.pop(0)
        dt = max(module.weight.dtype, xs[0].dtype, key=lambda t: torch.finfo(t).eps)
        if w is not None and module.weight.grad is not None:
            _close(module.weight.grad.to_dense().to(dt), w, dt, f"{at}: ∂W", scale,
                   floor * math.sqrt(w.numel()))
    if shadow.bias is not None:
        w = rest.pop(0)
        got = module.bias.grad
        if w is not None and got is not None:
            _close(got.double().reshape(w.shape), w, torch.float32, f"{at}: ∂b", scale,
                   floor * math.sqrt(w.numel()))
    xs.clear(), losses.clear(), shadow_xs.clear(), shadow_losses.clear()
