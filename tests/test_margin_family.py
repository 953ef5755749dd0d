"""The margin family at the public functions (docs/design.md §1.5): fused_margin_softmax_loss and
fused_unitsface_loss with ``margin=`` on every backend, against the float64 oracle
:func:`unitsface_kernels.margins.margin_family_rows` (itself checked against the authors' code
in tests/test_margins.py) plus :func:`unitsface_kernels.reference.uss_rows` for the USS part:
losses, gradients and the moving statistics after the step, with K sub-centres, the
inter-class filter, partial FC, sparse gradients, every reduction, degenerate batches, the
argument checks, torch.compile and autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import unitsface_kernels as uk
from unitsface_kernels import margins as M
from unitsface_kernels import optim, reference

from helpers import (all_backends, assert_close_grad, assert_close_loss, fused_backends,
                     passes_gradcheck)

B, D, C = 9, 12, 23
S = 16.0
USS = dict(uss_margin=0.1, uss_form="lse", uss_weight=0.5, official_clamp=False)

KINDS = {
    "arcface_k3": ("arcface", dict(m=0.5, sub_centers=3)),
    "cosface_filter": ("arcface", dict(m=0.0, m3=0.35, interclass_threshold=0.2)),
    "arcface_st": ("arcface", dict(m=0.5, straight_through=True)),
    "curricular": ("curricular", {}),
    "curricular_k2_filter": ("curricular", dict(sub_centers=2, interclass_threshold=0.3)),
    "adaface": ("adaface", dict(momentum=0.5)),
    "magface": ("magface", {}),
    "magface_fallback": ("magface", dict(easy_margin=False)),
    "elastic_arc": ("elastic_arc", dict(std=0.05)),
    "elastic_cos_plus": ("elastic_cos", dict(std=0.05, plus=True)),
}


def _margin(name):
    kind, settings = KINDS[name]
    return M.margin(kind, **settings)


def _state(dtype=torch.float32):
    return M.MarginState(torch.tensor(0.3, dtype=dtype), torch.tensor(12.0, dtype=dtype),
                         torch.tensor(4.0, dtype=dtype))


def _copy(state):
    return M.MarginState(state.t.clone(), state.norm_mean.clone(), state.norm_std.clone())


def _case(mg, *, b=B, sampled=False, with_bank=False, seed=0, same_labels=False,
          vector_bias=False):
    """float64 inputs: x with norms ≈ 6–30 (MagFace's clip and AdaFace's z both active), a few
    rows near their target (the fallback, hard negatives and the filter all occur)."""
    g = torch.Generator().manual_seed(seed)
    k = mg.sub_centers
    labels = (torch.full((b,), 4) if same_labels
              else torch.randint(0, C, (b,), generator=g))
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64)
    x = torch.randn(b, D, generator=g, dtype=torch.float64)
    x[: min(3, b)] = F.normalize(w[labels[:3] * k]) + 0.4 * x[: min(3, b)]
    x = x * (6.0 + 24.0 * torch.rand(b, 1, generator=g, dtype=torch.float64))
    case = dict(x=x, centres=w, labels=labels, index=None, bank=None, bank_valid=None,
                bias=None, margin=mg,
                drawn=(mg.m + 0.05 * torch.randn(b, generator=g, dtype=torch.float64)
                       if mg.kind.startswith("elastic") else None))
    if sampled:
        case["index"] = uk.sample_classes(labels, C, C // 2, generator=g)
    if with_bank:
        case["bank"] = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64))
        case["bank_valid"] = torch.rand(C, generator=g) < 0.8
        case["bias"] = (torch.rand(C if vector_bias else 1, generator=g,
                                   dtype=torch.float64) * 10)
    return case


def _cast(case, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                and k != "drawn" else v) for k, v in case.items()}


def _leaves(case):
    out = dict(case)
    for name in ("x", "centres", "bias"):
        if case[name] is not None:
            out[name] = case[name].detach().clone().requires_grad_()
    return out


def _public(c, backend, state, reduction="mean", **kw):
    common = dict(scale=S, index=c["index"], reduction=reduction, backend=backend,
                  margin=c["margin"], margin_state=state, margin_drawn=c["drawn"], **kw)
    if c["bank"] is None:
        return uk.fused_margin_softmax_loss(c["x"], c["centres"], c["labels"], **common)
    return uk.fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"], c["bias"],
                                   bank_valid=c["bank_valid"], **USS, **common)


def _oracle(c, state, reduction="mean", training=True):
    rows, after = M.margin_family_rows(c["x"], c["centres"], c["labels"], c["margin"], state,
                                       scale=S, index=c["index"], drawn=c["drawn"],
                                       training=training)
    if c["bank"] is not None:
        classes = torch.arange(C) if c["index"] is None else c["index"]
        bias = c["bias"] if c["bias"].numel() == 1 else c["bias"][classes]
        rows = rows + USS["uss_weight"] * reference.uss_rows(
            c["x"], c["labels"], bias, c["bank"][classes], classes, c["bank_valid"][classes],
            scale=S, margin=USS["uss_margin"], form=USS["uss_form"],
            official_clamp=USS["official_clamp"])
    return reference.reduce_rows(rows, reduction), after


def _run(fn, c, reduction="mean"):
    """(loss, {name: gradient}, state after) of fn(leaves, state) with a random upstream
    gradient."""
    leaves, state = _leaves(c), _state(c["x"].dtype if c["x"].dtype == torch.float64
                                       else torch.float32)
    loss, after = fn(leaves, state)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    names = [n for n in ("x", "centres", "bias") if leaves[n] is not None]
    grads = torch.autograd.grad((loss * weights).sum(), [leaves[n] for n in names])
    return loss.detach(), {n: g.to_dense() for n, g in zip(names, grads)}, after


def _ours(c, backend, reduction="mean", **kw):
    def fn(leaves, state):
        return _public(leaves, backend, state, reduction, **kw), state
    return _run(fn, c, reduction)


def _theirs(c, reduction="mean", training=True):
    return _run(lambda leaves, state: _oracle(leaves, state, reduction, training), c, reduction)


def _same_state(a, b, **tol):
    for name in ("t", "norm_mean", "norm_std"):
        torch.testing.assert_close(getattr(a, name).double(), getattr(b, name).double(),
                                   msg=name, **tol)


# ----------------------------------------------------------------------------- float64

@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_every_kind_float64(backend, name, sampled, with_bank):
    """Loss, ∂x, ∂W, ∂b and the moving statistics after the step, to float64 round-off."""
    c = _case(_margin(name), sampled=sampled, with_bank=with_bank)
    loss, grads, state = _ours(c, backend)
    want, want_grads, want_state = _theirs(c)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-9, atol=1e-11, msg=f"∂{n}")
    _same_state(state, want_state, rtol=1e-12, atol=1e-12)
    if c["index"] is not None:  # rows of unsampled classes (all K of each) get no gradient
        k = c["margin"].sub_centers
        sampled_rows = torch.zeros(C * k, dtype=torch.bool)
        sampled_rows[(c["index"][:, None] * k + torch.arange(k)).reshape(-1)] = True
        assert torch.count_nonzero(grads["centres"][~sampled_rows]) == 0


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", ["curricular", "magface"])
def test_reductions(backend, reduction, name):
    c = _case(_margin(name), sampled=True, with_bank=True, vector_bias=True, seed=2)
    loss, grads, _ = _ours(c, backend, reduction)
    want, want_grads, _ = _theirs(c, reduction)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-9, atol=1e-11, msg=f"∂{n}")


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["arcface_k3", "curricular", "adaface", "magface",
                                  "elastic_arc"])
@pytest.mark.parametrize("shape", ["one_row", "same_labels"])
def test_small_and_degenerate_batches(backend, name, shape):
    """B = 1 and a batch of one class: the oracle's numbers, and finite moving statistics
    (AdaFace's std keeps its value at B = 1)."""
    c = _case(_margin(name), b=1 if shape == "one_row" else 6, with_bank=True,
              same_labels=shape == "same_labels", seed=3)
    loss, grads, state = _ours(c, backend)
    want, want_grads, want_state = _theirs(c)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-9, atol=1e-11, msg=f"∂{n}")
    _same_state(state, want_state, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(t) for t in (state.t, state.norm_mean, state.norm_std))
    if shape == "one_row" and name == "adaface":
        assert state.norm_std == _state(torch.float64).norm_std


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["arcface_k3", "curricular_k2_filter", "adaface", "magface",
                                  "elastic_cos_plus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(backend, name, dtype):
    """float32 / bf16 / fp16 inputs against the float64 oracle of the same rounded inputs.
    Triton forms ∂x and ∂W from gradient tiles stored in x's dtype (docs/design.md §2): in
    half precision one rounding more than the result's, so three roundings there."""
    c = _cast(_case(_margin(name), sampled=True, with_bank=True, seed=4), dtype)
    loss, grads, _ = _ours(c, backend)
    assert loss.dtype == torch.float32
    want, want_grads, _ = _theirs(_cast(c, torch.float64))
    assert_close_loss(loss, want, dtype)
    for n in ("x", "centres"):
        assert_close_grad(grads[n], want_grads[n], dtype, n,
                          roundings=3 if backend == "triton" else 2)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["arcface_k3", "curricular", "adaface", "magface",
                                  "magface_fallback", "elastic_arc", "cosface_filter"])
def test_gradcheck(backend, name):
    """float64 gradcheck of the public function (statistics frozen, ElasticFace's margins
    given): MagFace's gradient into the norm through a_i is formed by the caller from the
    op's statistics. AdaFace reads the norm without gradient (its ∂x is not the derivative in
    x): only W and b there."""
    mg = _margin(name)
    c = _case(mg, b=5, with_bank=True, seed=5)
    state = _state(torch.float64)
    x = c["x"].clone().requires_grad_(mg.kind != "adaface")
    w, b = c["centres"].clone().requires_grad_(), c["bias"].clone().requires_grad_()

    def f(x, w, b):
        return _public(dict(c, x=x, centres=w, bias=b), backend, state, "none",
                       margin_training=False)

    assert passes_gradcheck(f, (x, w, b), backend)
    want, _ = _oracle(c, state, "none", training=False)
    torch.testing.assert_close(f(x, w, b).detach(), want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_sparse_grad_holds_the_k_rows_of_each_sampled_class(backend):
    c = _case(_margin("arcface_k3"), sampled=True, seed=6)
    leaves = _leaves(c)
    _public(leaves, backend, None, sparse_grad=True).backward()
    g = leaves["centres"].grad
    assert g.is_sparse
    rows = (c["index"][:, None] * 3 + torch.arange(3)).reshape(-1)
    assert torch.equal(g.coalesce().indices()[0], rows)
    leaves = _leaves(c)
    _public(leaves, backend, None).backward()
    torch.testing.assert_close(g.to_dense(), leaves["centres"].grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["curricular", "adaface"])
def test_eval_reads_the_statistics_frozen(backend, name):
    c = _case(_margin(name), seed=7)
    state = _state(torch.float64)
    before = _copy(state)
    loss = _public(c, backend, state, margin_training=False)
    _same_state(state, before, rtol=0, atol=0)
    want, _ = _oracle(c, before, training=False)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    _public(c, backend, state)                       # a training call moves them
    assert not torch.equal(torch.stack([state.t, state.norm_mean]),
                           torch.stack([before.t, before.norm_mean]))


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_elastic_draws_from_the_generator(backend):
    c = dict(_case(_margin("elastic_arc"), seed=8), drawn=None)

    def loss(seed):
        return _public(c, backend, None, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(loss(5), loss(5)) and not torch.equal(loss(5), loss(6))
    drawn = 0.5 + 0.05 * torch.randn(B, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64)
    torch.testing.assert_close(_public(dict(c, drawn=drawn), backend, None), loss(5))


# ----------------------------------------------------------------------------- checks

def _bad_calls():
    mg = _margin("curricular")
    return [
        (dict(margin_arc=0.5), "margin_arc cannot be combined with margin="),
        (dict(margin_cos=0.2, easy_margin=True), "margin_cos, easy_margin cannot be combined"),
        (dict(arcface_grad="straight_through"), "arcface_grad cannot be combined"),
        (dict(margin_state=None), "margin_state is required with margin kind 'curricular'"),
        (dict(margin_state=M.MarginState(t=torch.zeros((), device="meta"))),
         "margin_state.t is on meta but x is on cpu"),
        (dict(margin_state=M.MarginState(t=torch.zeros(2))),
         "margin_state.t must be a one-element"),
        (dict(margin_state="state"), "margin_state must be a unitsface_kernels.margins"),
        (dict(margin=M.margin("elastic_arc"), margin_drawn=torch.zeros(B + 1)),
         r"margin_drawn must have shape \(9,\)"),
        (dict(margin_drawn=torch.zeros(B)), "margin_drawn applies to the ElasticFace kinds"),
        (dict(margin=M.Margin(kind="arcface", sub_centers=0)),
         "sub_centers must be a positive integer"),
        (dict(margin=M.Margin(kind="elastic_arc", std=-1.0)), "std must be ≥ 0"),
        (dict(margin=0.5), "margin must be a unitsface_kernels.margins.Margin"),
        (dict(margin=M.margin("arcface", sub_centers=2)),
         "centres has 23 rows, not a multiple of sub_centers=2"),
        (dict(margin=None), "margin_state and margin_drawn need margin="),
        (dict(margin_training=1.0), "margin_training must be a bool"),
        (dict(generator=3), "generator must be a torch.Generator"),
    ], mg


@pytest.mark.parametrize("at", range(len(_bad_calls()[0])))
def test_bad_arguments_are_refused_by_name_and_change_nothing(at):
    (kw, message), mg = _bad_calls()[0][at], _bad_calls()[1]
    c = _case(M.margin("arcface"), seed=9)
    state = _state()
    before = _copy(state)
    args = dict(margin=mg, margin_state=state)
    args.update(kw)
    with pytest.raises((TypeError, ValueError), match=message):
        uk.fused_margin_softmax_loss(c["x"], c["centres"], c["labels"], backend="reference",
                                     **args)
    _same_state(state, before, rtol=0, atol=0)


def test_bank_rows_must_be_the_classes():
    mg = M.margin("arcface", sub_centers=3)
    c = _case(mg, with_bank=True, seed=10)
    with pytest.raises(ValueError, match=r"bank has 22 rows but centres has 69 "
                                         r"\(sub_centers=3 per class\)"):
        uk.fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"][:22], c["bias"],
                                margin=mg, backend="reference")


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_a_raising_call_changes_no_state(backend):
    """A bad label value (checked on the data) raises before the moving statistics move."""
    c = _case(_margin("adaface"), seed=11)
    state = _state()
    before = _copy(state)
    labels = c["labels"].clone()
    labels[2] = C
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 23\)"):
        _public(dict(c, labels=labels), backend, state)
    _same_state(state, before, rtol=0, atol=0)
    _public(c, backend, state)
    assert state.norm_mean != before.norm_mean


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_equal_norms_give_std_zero_and_finite_margins(backend):
    """AdaFace on a batch whose norms are all equal: the batch std is 0, the margins finite
    (σ + ε), the moving std moves towards 0 and the oracle's numbers come out."""
    c = _case(_margin("adaface"), seed=19)
    c["x"] = F.normalize(c["x"]) * 7.0
    loss, grads, state = _ours(c, backend)
    want, want_grads, want_state = _theirs(c)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["centres"], want_grads["centres"], rtol=1e-9, atol=1e-11)
    assert torch.isfinite(loss)
    assert float(state.norm_std) == pytest.approx(0.5 * 4.0, abs=1e-12)   # momentum 0.5
    _same_state(state, want_state, rtol=1e-12, atol=1e-12)


def test_nan_propagates_and_keeps_the_statistics_finite():
    c = _case(_margin("adaface"), seed=12)
    c["x"][3, 0] = math.nan
    state = _state(torch.float64)
    rows = _public(c, "reference", state, "none")
    assert torch.isnan(rows[3]) and torch.isfinite(rows[torch.arange(B) != 3]).all()
    assert torch.isfinite(state.norm_mean) and torch.isfinite(state.norm_std)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["curricular_k2_filter", "adaface", "magface", "elastic_arc"])
def test_meta_tensors(backend, name):
    """On meta tensors a margin call gives the loss's and gradients' shapes, and the shape
    checks still raise."""
    mg = _margin(name)
    c = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
         for k, v in _case(mg, with_bank=True, seed=21).items()}
    c["drawn"] = None
    state = M.MarginState(*(torch.zeros((), device="meta") for _ in range(3)))
    leaves = _leaves(c)
    loss = _public(leaves, backend, state, "none")
    assert loss.shape == (B,) and loss.device.type == "meta"
    loss.sum().backward()
    assert leaves["centres"].grad.shape == c["centres"].shape
    with pytest.raises(ValueError, match="not a multiple of sub_centers" if mg.sub_centers > 1
                       else "one bank row per class"):
        _public(dict(c, centres=c["centres"][:-1]), backend, state)


# ----------------------------------------------------------------------------- compile, autocast

@pytest.mark.parametrize("name", ["curricular", "magface", "adaface"])
def test_torch_compile_fullgraph(name):
    c = _case(_margin(name), sampled=True, seed=13)
    c = _cast(c, torch.float32)
    states = [_state(), _state()]
    names = ("x", "centres")

    def f(x, w, state):
        return _public(dict(c, x=x, centres=w), "reference", state)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [[c[n].detach().clone().requires_grad_() for n in names] for _ in range(2)]
    got, want = compiled(*leaves[0], states[0]), f(*leaves[1], states[1])
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(*leaves):
        torch.testing.assert_close(a.grad, b.grad)
    _same_state(states[0], states[1])


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_torch_compile_fullgraph_objective(backend):
    """The objective with a margin, on every backend (the fused ops are opaque to the
    compiler; the reference's eager per-op forms are traced)."""
    c = _cast(_case(_margin("curricular_k2_filter"), sampled=True, with_bank=True, seed=15),
              torch.float32)
    states = [_state(), _state()]

    def f(x, w, b, state):
        return _public(dict(c, x=x, centres=w, bias=b), backend, state)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [[c[n].detach().clone().requires_grad_() for n in ("x", "centres", "bias")]
              for _ in range(2)]
    got, want = compiled(*leaves[0], states[0]), f(*leaves[1], states[1])
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(*leaves):
        torch.testing.assert_close(a.grad, b.grad)
    _same_state(states[0], states[1])


@pytest.mark.parametrize("name", ["curricular", "magface"])
def test_autocast_changes_nothing(name):
    """The margin's per-row inputs and the reference's GEMMs run outside autocast: float32
    inputs give the float32 numbers under a bf16 autocast."""
    c = _cast(_case(_margin(name), with_bank=True, seed=14), torch.float32)
    want = _public(c, "reference", _state())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _public(c, "reference", _state())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- modules

def _module_batch(mg, seed=16):
    c = _case(mg, seed=seed)
    return c["x"], c["labels"]


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("name", ["arcface_k3", "curricular", "adaface", "magface"])
def test_partial_fc_with_a_margin(backend, name):
    """PartialFC(margin=…): weight (C·K) × D, the public function's loss with the module's
    buffers as the state; train() updates the statistics, eval() reads them frozen; they are
    persistent buffers (state_dict) starting at the authors' values; extra_repr shows it."""
    mg = _margin(name)
    head = uk.nn.PartialFC(D, C, scale=S, margin=mg, backend=backend).double()
    assert head.weight.shape == (C * mg.sub_centers, D)
    x, labels = _module_batch(mg)
    stateful = mg.kind in ("curricular", "adaface")
    if stateful:
        assert {"margin_t", "margin_norm_mean", "margin_norm_std"} <= set(head.state_dict())
        assert (float(head.margin_t), float(head.margin_norm_mean),
                float(head.margin_norm_std)) == (0.0, 20.0, 100.0)
    state = M.MarginState() if stateful else None
    if stateful:
        state = M.MarginState(*(t.double() for t in (state.t, state.norm_mean, state.norm_std)))
    want = uk.fused_margin_softmax_loss(x, head.weight.detach(), labels, scale=S, margin=mg,
                                        margin_state=state, backend="reference")
    torch.testing.assert_close(head(x, labels), want, rtol=1e-10, atol=1e-10)
    if stateful:
        moved = head.margin_state()
        _same_state(moved, state, rtol=0, atol=0)
        head.eval()
        before = _copy(moved)
        head(x, labels)
        _same_state(head.margin_state(), before, rtol=0, atol=0)
    assert f"margin={mg!r}" in repr(head)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_unitsface_head_with_a_margin(backend):
    mg = _margin("curricular_k2_filter")
    head = uk.nn.UniTSFaceHead(D, C, scale=S, margin=mg, backend=backend).double()
    assert head.weight.shape == (2 * C, D) and head.bank.shape == (C, D)
    x, labels = _module_batch(mg, seed=17)
    state = M.MarginState(*(t.double() for t in (M.MarginState().t, M.MarginState().norm_mean,
                                                   M.MarginState().norm_std)))
    want = uk.fused_margin_softmax_loss(x, head.weight.detach(), labels, scale=S, margin=mg,
                                        margin_state=state, backend="reference")
    torch.testing.assert_close(head(x, labels, with_uss=False), want, rtol=1e-10, atol=1e-10)
    _same_state(head.margin_state(), state, rtol=0, atol=0)
    loss = head(x, labels)   # with the bank written by the first call: the USS part too
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad.shape == (2 * C, D)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
def test_sparse_sgd_steps_the_k_rows_like_dense_sgd(backend):
    """Partial FC with K = 3: the sparse gradient holds the K rows of each sampled class, and
    SparseSGD over it trains the weight as dense SGD does."""
    mg = _margin("arcface_k3")
    heads = [uk.nn.PartialFC(D, C, sample_rate=0.4, scale=S, margin=mg, sparse_grad=sparse,
                             backend=backend).double() for sparse in (True, False)]
    heads[1].load_state_dict(heads[0].state_dict())
    opts = [optim.SparseSGD(heads[0].parameters(), lr=0.1, momentum=0.9,
                               weight_decay=5e-4),
            torch.optim.SGD(heads[1].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)]
    for step in range(3):
        x, labels = _module_batch(mg, seed=20 + step)
        for head, opt in zip(heads, opts):
            torch.manual_seed(step)     # the same partial-FC draw for both
            opt.zero_grad()
            head(x, labels).backward()
            if head.sparse_grad:
                g = head.weight.grad.coalesce()
                rows = g.indices()[0]
                assert bool((rows.reshape(-1, 3) % 3 == torch.arange(3)).all())
            opt.step()
    torch.testing.assert_close(heads[0].state_dict()["weight"], heads[1].weight.detach(),
                               rtol=1e-12, atol=1e-12)


def test_module_refuses_margin_with_its_own_margins():
    with pytest.raises(ValueError, match="margin_arc cannot be combined with margin="):
        uk.nn.PartialFC(D, C, margin_arc=0.5, margin=_margin("curricular"))
    with pytest.raises(TypeError, match="margin must be a unitsface_kernels.margins.Margin"):
        uk.nn.UniTSFaceHead(D, C, margin="arcface")


@pytest.mark.parametrize("head", ["PartialFC", "UniTSFaceHead"])
def test_module_draws_elastic_margins_from_its_generator(head):
    """ElasticFace in a module: margin_generator gives reproducible draws (two heads seeded
    alike agree, another seed differs, the global RNG is not consumed); it is refused for a
    kind that draws nothing, and when it is not a generator."""
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, D, generator=g), torch.randint(0, C, (6,), generator=g)

    def loss(seed):
        torch.manual_seed(5)
        module = getattr(uk.nn, head)(D, C, margin=_margin("elastic_arc"), backend="reference",
                                      margin_generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            module.weight.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(9)))
        before = torch.random.get_rng_state()
        out = module(x, labels)
        assert torch.equal(torch.random.get_rng_state(), before)
        return out.detach()

    assert torch.equal(loss(1), loss(1)) and not torch.equal(loss(1), loss(2))
    with pytest.raises(ValueError, match="margin_generator applies to the ElasticFace kinds"):
        getattr(uk.nn, head)(D, C, margin=_margin("curricular"),
                             margin_generator=torch.Generator())
    with pytest.raises(TypeError, match="margin_generator must be a torch.Generator"):
        getattr(uk.nn, head)(D, C, margin=_margin("elastic_arc"), margin_generator=3)


class _CombinedMarginLoss:
    """The attributes of arcface_torch's CombinedMarginLoss that PartialFC reads."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0.0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.easy_margin = False


@pytest.mark.parametrize("m2,m3", [(0.5, 0.0), (0.0, 0.35)])
def test_from_insightface_maps_interclass_filtering(m2, m3):
    head = uk.nn.PartialFC.from_insightface(_CombinedMarginLoss(S, 1.0, m2, m3, 0.2), D, C,
                                            backend="reference").double()
    assert head.margin.interclass_threshold == 0.2
    assert (head.margin.m, head.margin.m3, head.margin.straight_through) == (m2, m3, m2 > 0)
    x, labels = _module_batch(head.margin, seed=18)
    want, _ = M.margin_family_rows(x, head.weight.detach(), labels, head.margin, M.MarginState(),
                                   scale=S, eps=1e-12)
    torch.testing.assert_close(head(x, labels), want.mean(), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        uk.nn.PartialFC.from_insightface(_CombinedMarginLoss(S, 1.0, m2, m3, 1.5), D, C)
