"""The op contract (unitsface_kernels.contract, docs/design.md §3): every custom op passes
torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch); the options
pack and unpack field for field; every public function runs on meta tensors; torch.compile
traces the public functions with fullgraph=True; a call reads tensor values back at most
once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import fused_backends, make_case
from unitsface_kernels import (bank_update_, contract, fused_margin_softmax_loss,
                               fused_unitsface_loss, fused_uss_loss, native, options, uss_bias_init)
from unitsface_kernels.layouts import UnitsfaceStat, UssStat
from unitsface_kernels.nn import UniTSFaceHead, USSLoss


def _uss_args(backend_case, lse=True, in_batch=False):
    c = backend_case
    ref = c["x"] if in_batch else c["ref"]
    ref_labels = c["labels"] if in_batch else torch.arange(ref.shape[0])
    packed = options.UssOptions(16.0, 0.1, lse, True, in_batch, 1e-5).pack()
    return (c["x"], ref, c["labels"], ref_labels, c["ref_valid"], c["bias"], packed)


def _unitsface_args(c, bank=True):
    packed = options.unitsface_options(
        scale=16.0, margin_arc=0.3, margin_cos=0.1, arcface_grad="exact", easy_margin=False,
        uss_margin=0.1, uss_form="lse", uss_weight=0.5, official_clamp=True).pack()
    return (c["x"], c["centres"], c["bank"] if bank else None, c["labels"], c["index"],
            c["bank_valid"] if bank else None, c["bias"] if bank else None, None, packed, False)


def _grad(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss"))
@pytest.mark.parametrize("mode", ["bank", "inbatch", "centres"])
def test_opcheck_uss(backend, mode):
    case = make_case("uss", 5, 9, 6, torch.float64, mode=mode, vector_bias=mode == "centres")
    case["x"], case["bias"] = _grad(case["x"]), _grad(case["bias"])
    if mode == "centres":
        case["ref"] = _grad(case["ref"])
    args = _uss_args(case, in_batch=mode == "inbatch")
    fwd = contract.forward_op("uss", backend)
    torch.library.opcheck(fwd, args)
    out = fwd(*args)
    bwd = contract.backward_op("uss", backend)
    grad_args = (torch.rand(5, dtype=torch.float64),) + tuple(
        t.detach() if isinstance(t, torch.Tensor) else t for t in args[:6]) + (
        *out[1:], args[6], [True, mode == "centres", True])
    torch.library.opcheck(bwd, grad_args)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("bank", [False, True])
def test_opcheck_unitsface(backend, bank):
    case = make_case("unitsface", 5, 11, 6, torch.float64, sampled=True, vector_bias=True,
                     rate=0.6)
    for k in ("x", "centres", "bias"):
        case[k] = _grad(case[k])
    args = _unitsface_args(case, bank)
    fwd = contract.forward_op("unitsface", backend)
    torch.library.opcheck(fwd, args)
    out = fwd(*args)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args[:8])
    bwd = contract.backward_op("unitsface", backend)
    torch.library.opcheck(bwd, (torch.rand(5, dtype=torch.float64),) + detached
                          + (*out[1:], args[8], [True, True, bank]))


@pytest.mark.skipif(not native.has_family("unitsface"), reason="the native extension is not built")
def test_opcheck_unitsface_row_grads():
    """The native forward that also forms ∂L_i/∂x_i (CPU): its extra outputs and the backward
    that uses them."""
    case = make_case("unitsface", 5, 11, 6, torch.float64, sampled=True)
    for k in ("x", "centres", "bias"):
        case[k] = _grad(case[k])
    args = _unitsface_args(case)[:-1] + (True,)
    torch.library.opcheck(torch.ops.unitsface.unitsface_fwd_native, args)


@pytest.mark.skipif(not native.has_op("bank_update_"), reason="the native extension is not built")
def test_opcheck_bank_update():
    bank, valid = torch.zeros(7, 4), torch.zeros(7, dtype=torch.bool)
    torch.library.opcheck(torch.ops.unitsface.bank_update_,
                          (bank, valid, torch.randn(3, 4), torch.tensor([1, 5, 1])))


def test_options_pack_and_unpack_field_for_field():
    for cls in (options.UssOptions, options.UnitsfaceOptions):
        fields = dataclasses.fields(cls)
        values = [True if f.type == "bool" else float(i) + 0.5 for i, f in enumerate(fields)]
        packed = cls(*values).pack()
        assert packed == [float(v) for v in values]
        assert cls.unpack(packed) == cls(*values)
        with pytest.raises(ValueError, match=f"{cls.__name__} has {len(fields)} fields"):
            cls.unpack(packed[:-1])


def test_options_name_the_public_keywords():
    """keywords() is the inverse of the *_options constructors: the eager formulas and the
    modules read the same settings the kernels get."""
    kw = dict(scale=16.0, margin_arc=0.3, margin_cos=0.1, arcface_grad="straight_through",
              easy_margin=True, uss_margin=0.2, uss_form="lse", uss_weight=0.5,
              official_clamp=True, eps=1e-9)
    o = options.unitsface_options(**kw)
    assert o.keywords() == kw and options.unitsface_options(**o.keywords()) == o
    soft = {k: kw[k] for k in ("scale", "margin_arc", "margin_cos", "arcface_grad",
                               "easy_margin", "eps")}
    assert o.keywords(uss=False) == soft
    u = options.uss_options(scale=8.0, margin=0.2, form="lse", official_clamp=True,
                            in_batch=True, eps=1e-7)
    assert u.keywords() == dict(scale=8.0, margin=0.2, form="lse", official_clamp=True,
                                eps=1e-7)
    assert u.threshold_init() == options.UssOptions(8.0, 0.0, True, False, True, 1e-7)
    assert o.threshold_init() == options.UssOptions(16.0, 0.0, True, False, False, 1e-9)


def test_stats_layouts_are_named_once():
    """The ops' stats outputs have the rows the layouts name."""
    assert [s.name for s in UssStat] == ["A", "SIGMA_A", "B", "SIGMA_B"]
    assert len(UnitsfaceStat) == 7 and UnitsfaceStat.USS_LOSS == 6
    c = make_case("unitsface", 5, 11, 6, torch.float64)
    stats = contract.forward_op("unitsface", "reference")(*_unitsface_args(c))[1]
    assert stats.shape == (len(UnitsfaceStat), 5)
    u = make_case("uss", 5, 9, 6, torch.float64)
    assert contract.forward_op("uss", "reference")(*_uss_args(u))[1].shape == (len(UssStat), 5)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
def test_eps_reaches_the_kernels(backend, monkeypatch):
    """eps= of every public function and module travels in the settings object to the op
    (the packed options' last field), whichever backend runs it."""
    seen = []
    real = contract.forward_op

    def spy(family, name):
        op = real(family, name)

        def call(*args):
            packed = args[6] if family == "uss" else args[8]
            cls = options.UssOptions if family == "uss" else options.UnitsfaceOptions
            seen.append((family, cls.unpack(packed).eps))
            return op(*args)
        return call

    monkeypatch.setattr(contract, "forward_op", spy)
    u = make_case("uss", 6, 10, 4, torch.float64)
    c = make_case("unitsface", 6, 10, 4, torch.float64)
    fused_uss_loss(u["x"], u["labels"], u["bias"], u["ref"], backend=backend, eps=1e-9)
    uss_bias_init(u["x"], u["labels"], u["ref"], backend=backend, eps=1e-8)
    fused_margin_softmax_loss(c["x"], c["centres"], c["labels"], backend=backend, eps=1e-7)
    fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"], c["bias"],
                         backend=backend, eps=1e-6)
    head = UniTSFaceHead(4, 10, eps=2e-6, backend=backend).double()
    head(c["x"], c["labels"])
    USSLoss(mode="inbatch", eps=3e-6, backend=backend)(u["x"], u["labels"])
    assert seen == [("uss", 1e-9), ("uss", 1e-8), ("unitsface", 1e-7), ("unitsface", 1e-6),
                    ("uss", 2e-6), ("unitsface", 2e-6), ("uss", 3e-6), ("uss", 3e-6)]


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu", "unitsface"))
def test_eps_of_the_public_functions(backend):
    """eps=1e-12 is F.normalize's default: at norm 2e-7 every backend then computes what the
    dense formula with F.normalize computes (loss and ∂x), and eps is checked like every
    setting."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(
        9, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (6,), generator=g)
    x[::2] = 2e-7 * torch.nn.functional.normalize(x[::2])
    x.requires_grad_()
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    dense = torch.nn.functional.cross_entropy(
        64.0 * (cos - 0.4 * torch.nn.functional.one_hot(labels, 9)), labels)
    ours = fused_margin_softmax_loss(x, w, labels, eps=1e-12, backend=backend)
    torch.testing.assert_close(ours, dense)
    # ∂x of the tiny rows is of order 1/‖x‖: compared row by row, relative to each row
    got, want = (torch.autograd.grad(t, x)[0] for t in (ours, dense))
    for g_row, w_row in zip(got, want):
        torch.testing.assert_close(g_row / w_row.norm(), w_row / w_row.norm())
    x = x.detach()
    official = fused_margin_softmax_loss(x, w, labels, backend=backend)
    assert abs(float(official - dense)) > 1e-2 * float(dense)
    for fn, args in ((fused_margin_softmax_loss, (x, w, labels)),
                     (fused_uss_loss, (x, labels, 1.0, w)), (uss_bias_init, (x, labels)),
                     (fused_unitsface_loss, (x, labels, w, w, 1.0))):
        with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\], got 0.0"):
            fn(*args, eps=0.0)
        with pytest.raises(TypeError, match="eps must be a real number"):
            fn(*args, eps="1e-5")


def test_schemas_come_from_the_family_declarations():
    for family in contract.FAMILIES.values():
        for backend in contract.FUSED_BACKENDS:
            fwd, bwd = family.schemas(backend)
            for schema, direction in ((fwd, "fwd"), (bwd, "bwd")):
                op = getattr(torch.ops.unitsface, contract.op_name(family.name, backend, direction))
                assert str(op.default._schema) == f"unitsface::{schema}"


# ----------------------------------------------------------------------------- meta tensors

def _meta(case):
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("backend", ["auto", "triton", "native", "reference"])
def test_public_functions_run_on_meta_tensors(backend):
    """Shape inference: no value is read (no label range, no index order), every output has
    the shape and dtype of the real call."""
    u = _meta(make_case("uss", 6, 10, 4, torch.bfloat16))
    loss = fused_uss_loss(u["x"], u["labels"], u["bias"], u["ref"], ref_valid=u["ref_valid"],
                          reduction="none", backend=backend)
    assert loss.device.type == "meta" and loss.shape == (6,) and loss.dtype == torch.float32
    assert fused_uss_loss(u["x"], u["labels"], 3.0, backend=backend).shape == ()
    assert uss_bias_init(u["x"], u["labels"], u["ref"], backend=backend).shape == ()
    c = _meta(make_case("unitsface", 6, 10, 4, torch.float64, sampled=True))
    loss = fused_margin_softmax_loss(c["x"], c["centres"], c["labels"], index=c["index"],
                                     backend=backend)
    assert loss.device.type == "meta" and loss.dtype == torch.float64
    loss = fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"], c["bias"],
                                bank_valid=c["bank_valid"], index=c["index"], reduction="sum",
                                backend=backend)
    assert loss.device.type == "meta" and loss.shape == ()
    bank_update_(c["bank"].clone(), c["bank_valid"].clone(), c["x"], c["labels"])


def test_meta_tensors_still_check_shapes():
    c = _meta(make_case("unitsface", 6, 10, 4, sampled=True))
    with pytest.raises(ValueError, match="bank has 9 rows but centres has 10"):
        fused_unitsface_loss(c["x"], c["labels"], c["centres"], c["bank"][:9], c["bias"])


# ----------------------------------------------------------------------------- compile

def _compiled_matches_eager(fn, leaves):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a = [t.detach().clone().requires_grad_() for t in leaves]
    b = [t.detach().clone().requires_grad_() for t in leaves]
    got, want = compiled(*a), fn(*b)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", fused_backends("cpu", "unitsface"))
def test_torch_compile_fullgraph_objective(backend):
    c = make_case("unitsface", 21, 45, 16, sampled=True, vector_bias=True)

    def f(x, w, bias):
        return fused_unitsface_loss(x, c["labels"], w, c["bank"], bias, bank_valid=c["bank_valid"],
                                    index=c["index"], official_clamp=True, backend=backend)

    _compiled_matches_eager(f, [c["x"], c["centres"], c["bias"]])


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss"))
def test_torch_compile_fullgraph_uss(backend):
    c = make_case("uss", 21, 45, 16, mode="centres", vector_bias=True)

    def f(x, bias, ref):
        return fused_uss_loss(x, c["labels"], bias, ref, form="lse", backend=backend)

    _compiled_matches_eager(f, [c["x"], c["bias"], c["ref"]])


# ----------------------------------------------------------------------------- host reads

class _ReadBacks:
    """Counts the ways a tensor value reaches the host (each a synchronisation on CUDA)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counting(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in fused_backends("cpu", "unitsface") if isinstance(b, str)])
def test_one_read_back_per_call(backend, monkeypatch):
    """Every value check of a partial-FC call (label range, index order, labels missing from
    the index) and the loss itself: at most one host read-back, forward and backward."""
    c = make_case("unitsface", 37, 301, 16, sampled=True, vector_bias=True)
    x = c["x"].requires_grad_()
    reads = _ReadBacks(monkeypatch)
    fused_unitsface_loss(x, c["labels"], c["centres"], c["bank"], c["bias"],
                         bank_valid=c["bank_valid"], index=c["index"], backend=backend).backward()
    assert reads.count <= 1
