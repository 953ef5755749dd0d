"""unitsface::bank_update_ (the native C++/CUDA op) against a plain Python loop.

The extension must be built for these tests (CI builds it): they fail, not skip, when
unitsface_kernels._C is missing. CUDA variants are marked `cuda` (see conftest.py).
"""

import pytest
import torch

from unitsface_kernels import native

BANK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# One rounding step of the bank's dtype: the op and the loop may compute ||x|| with a
# different summation order, which can move a value across a rounding boundary.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-15),
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


@pytest.fixture(autouse=True, scope="module")
def _native_built():
    native.require()  # fails (never skips) with the build instructions when _C is missing


def loop_bank_update(bank, bank_valid, x, labels):
    """The specification: rows in batch order, so the last occurrence of a label wins."""
    bank, bank_valid = bank.clone(), bank_valid.clone()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for i, c in enumerate(labels.tolist()):
        xi = x[i].to(acc)
        bank[c] = (xi / xi.norm().clamp_min(1e-5)).to(bank.dtype)
        bank_valid[c] = True
    return bank, bank_valid


def make_inputs(device, C=23, D=48, B=37, bank_dtype=torch.float32, x_dtype=torch.float32,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(C, D, generator=g).to(device=device, dtype=bank_dtype)
    bank_valid = (torch.rand(C, generator=g) < 0.5).to(device)
    x = (3 * torch.randn(B, D, generator=g)).to(device=device, dtype=x_dtype)
    labels = torch.randint(0, C // 2, (B,), generator=g).to(device)  # duplicates; rows >= C//2 untouched
    return bank, bank_valid, x, labels


@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES, ids=str)
def test_matches_loop(device, bank_dtype, x_dtype):
    bank, bank_valid, x, labels = make_inputs(device, bank_dtype=bank_dtype, x_dtype=x_dtype)
    bank0, valid0 = bank.clone(), bank_valid.clone()
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())

    assert native.bank_update_(bank, bank_valid, x, labels) is None
    assert bank.dtype == bank_dtype and bank.device.type == device

    torch.testing.assert_close(bank.cpu(), want_bank, **TOL[bank_dtype])
    assert torch.equal(bank_valid.cpu(), want_valid)
    # Rows whose label is not in the batch are untouched, bit for bit, and so is their flag.
    untouched = torch.ones(bank.shape[0], dtype=torch.bool)
    untouched[labels.cpu()] = False
    assert untouched.any()
    assert torch.equal(bank[untouched.to(device)], bank0[untouched.to(device)])
    assert torch.equal(bank_valid[untouched.to(device)], valid0[untouched.to(device)])
    assert bank_valid[labels].all()


def test_last_occurrence_wins(device):
    D = 16
    x = torch.randn(6, D, dtype=torch.float64).to(device)
    labels = torch.tensor([5, 2, 5, 5, 2, 7], device=device)
    bank = torch.zeros(8, D, dtype=torch.float64, device=device)
    bank_valid = torch.zeros(8, dtype=torch.bool, device=device)
    native.bank_update_(bank, bank_valid, x, labels)
    for c, i in [(5, 3), (2, 4), (7, 5)]:
        want = x[i] / x[i].norm()
        torch.testing.assert_close(bank[c], want, rtol=1e-12, atol=0)
    assert bank_valid.tolist() == [False, False, True, False, False, True, False, True]
    assert torch.count_nonzero(bank[[0, 1, 3, 4, 6]]) == 0


def test_many_duplicates_deterministic(device):
    # Large enough that the CPU kernel runs in several parallel chunks and the CUDA kernel
    # in many blocks; every class is hit hundreds of times.
    C, D, B = 7, 33, 5000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g).to(device)
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    outs = []
    for _ in range(3):
        bank = torch.full((C, D), float("nan"), device=device)
        bank_valid = torch.zeros(C, dtype=torch.bool, device=device)
        native.bank_update_(bank, bank_valid, x, labels)
        outs.append(bank)
        assert bank_valid.all()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    lab = labels.cpu().tolist()
    last = {c: i for i, c in enumerate(lab)}
    want = torch.stack([x[last[c]] / x[last[c]].norm() for c in range(C)])
    torch.testing.assert_close(outs[0], want, **TOL[torch.float32])


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES, ids=str)
def test_zero_and_tiny_embeddings(device, bank_dtype):
    D = 8
    x = torch.zeros(3, D, device=device)
    x[1, 0] = 1e-7  # ||x|| < eps: divided by eps, as F.normalize does
    x[2] = 2.0
    bank = torch.ones(4, D, device=device, dtype=bank_dtype)
    bank_valid = torch.zeros(4, dtype=torch.bool, device=device)
    native.bank_update_(bank, bank_valid, x, torch.tensor([0, 1, 2], device=device))
    assert torch.count_nonzero(bank[0]) == 0  # a zero embedding is legal: a zero row
    want1 = torch.zeros(D, dtype=bank_dtype)
    want1[0] = 1e-7 / 1e-5
    torch.testing.assert_close(bank[1].cpu(), want1, **TOL[bank_dtype])
    torch.testing.assert_close(bank[2].cpu(), torch.full((D,), D**-0.5, dtype=bank_dtype),
                               **TOL[bank_dtype])
    assert bank_valid.tolist() == [True, True, True, False]
    assert torch.equal(bank[3].cpu(), torch.ones(D, dtype=bank_dtype))


def test_nan_propagates(device):
    x = torch.randn(2, 4, device=device)
    x[0, 1] = float("nan")
    bank = torch.zeros(3, 4, device=device)
    bank_valid = torch.zeros(3, dtype=torch.bool, device=device)
    native.bank_update_(bank, bank_valid, x, torch.tensor([1, 2], device=device))
    assert bank[1].isnan().all() and not bank[2].isnan().any()


def test_fp64_bank(device):
    bank, bank_valid, x, labels = make_inputs(device, bank_dtype=torch.float64, x_dtype=torch.float64)
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())
    native.bank_update_(bank, bank_valid, x, labels)
    torch.testing.assert_close(bank.cpu(), want_bank, **TOL[torch.float64])
    assert torch.equal(bank_valid.cpu(), want_valid)


def test_int32_labels_noncontiguous_x_and_grad(device):
    bank, bank_valid, x, labels = make_inputs(device)
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())
    x_nc = x.t().contiguous().t().requires_grad_()  # column-major view, needs grad
    assert not x_nc.is_contiguous()
    native.bank_update_(bank, bank_valid, x_nc, labels.int())
    torch.testing.assert_close(bank.cpu(), want_bank, **TOL[torch.float32])
    assert torch.equal(bank_valid.cpu(), want_valid)
    assert not bank.requires_grad and bank.grad_fn is None


def test_empty_batch_is_a_noop(device):
    bank, bank_valid, _, _ = make_inputs(device)
    bank0, valid0 = bank.clone(), bank_valid.clone()
    native.bank_update_(bank, bank_valid, torch.empty(0, bank.shape[1], device=device),
                        torch.empty(0, dtype=torch.long, device=device))
    assert torch.equal(bank, bank0) and torch.equal(bank_valid, valid0)


def test_cpu_and_cuda_agree():
    pytest.importorskip("torch.cuda")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = make_inputs("cpu", C=1000, D=512, B=512, bank_dtype=torch.bfloat16)
    gpu = [a.cuda() for a in args]
    native.bank_update_(*args)
    native.bank_update_(*gpu)
    torch.testing.assert_close(gpu[0].cpu(), args[0], **TOL[torch.bfloat16])
    assert torch.equal(gpu[1].cpu(), args[1])


test_cpu_and_cuda_agree = pytest.mark.cuda(test_cpu_and_cuda_agree)


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and the bank left unchanged.
# --------------------------------------------------------------------------------------

def _bad_cases():
    C, D, B = 6, 5, 4

    def base(device):
        return dict(
            bank=torch.zeros(C, D, device=device),
            bank_valid=torch.zeros(C, dtype=torch.bool, device=device),
            x=torch.randn(B, D, device=device),
            labels=torch.tensor([0, 1, 2, 3], device=device),
        )

    def case(name, exc, match, **change):
        return pytest.param(base, change, exc, match, id=name)

    return [
        case("bank_1d", ValueError, r"bank must be 2-D", bank=lambda a: a["bank"][0]),
        case("bank_valid_shape", ValueError, r"bank_valid must have shape \(C,\)",
             bank_valid=lambda a: a["bank_valid"][:-1]),
        case("x_1d", ValueError, r"x must be 2-D", x=lambda a: a["x"][0]),
        case("labels_2d", ValueError, r"labels must be 1-D", labels=lambda a: a["labels"][None]),
        case("labels_len", ValueError, r"labels has 3 entries but x has 4 rows",
             labels=lambda a: a["labels"][:3]),
        case("d_mismatch", ValueError, r"D mismatch: x has D = 4 but bank has D = 5",
             x=lambda a: a["x"][:, :4]),
        case("bank_dtype", TypeError, r"bank must be float32, bfloat16, float16 or float64",
             bank=lambda a: a["bank"].long()),
        case("bank_valid_dtype", TypeError, r"bank_valid must be a bool tensor",
             bank_valid=lambda a: a["bank_valid"].to(torch.uint8)),
        case("x_dtype", TypeError, r"x must be a floating-point tensor", x=lambda a: a["x"].long()),
        case("labels_dtype", TypeError, r"labels must be an integer tensor",
             labels=lambda a: a["labels"].float()),
        case("labels_too_big", ValueError, r"labels must be in \[0, C\) = \[0, 6\), got labels\[2\] = 6",
             labels=lambda a: torch.tensor([0, 1, 6, 3], device=a["x"].device)),
        case("labels_negative", ValueError, r"labels must be in \[0, C\) = \[0, 6\), got labels\[0\] = -1",
             labels=lambda a: torch.tensor([-1, 1, 2, 3], device=a["x"].device)),
        case("bank_noncontiguous", ValueError, r"bank must be contiguous",
             bank=lambda a: torch.zeros(D, C, device=a["x"].device).t()),
        case("x_aliases_bank", ValueError, r"x must not share memory with bank",
             x=lambda a: a["bank"][:4]),
    ]


@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize("base,change,exc,match", _bad_cases())
def test_bad_input(device, call, base, change, exc, match):
    args = base(device)
    for k, f in change.items():
        args[k] = f(args)
    before = {k: v.clone() for k, v in args.items()}
    fn = native.bank_update_ if call == "wrapper" else torch.ops.unitsface.bank_update_
    with pytest.raises(exc, match=match):
        fn(args["bank"], args["bank_valid"], args["x"], args["labels"])
    for k in ("bank", "bank_valid"):
        assert torch.equal(args[k], before[k]), f"{k} was modified by a failing call"


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        native.bank_update_(torch.zeros(2, 2), torch.zeros(2, dtype=torch.bool), [[1.0, 2.0]],
                            torch.tensor([0]))


def test_device_mismatch_wrapper():
    # The meta device stands in for "another device" on a CPU-only machine.
    bank, bank_valid, x, labels = make_inputs("cpu")
    with pytest.raises(ValueError, match=r"x is on meta but bank is on cpu"):
        native.bank_update_(bank, bank_valid, x.to("meta"), labels)


@pytest.mark.cuda
@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize("moved", ["bank_valid", "x", "labels"])
def test_device_mismatch_cuda(call, moved):
    args = dict(zip(["bank", "bank_valid", "x", "labels"], make_inputs("cuda")))
    args[moved] = args[moved].cpu()
    fn = native.bank_update_ if call == "wrapper" else torch.ops.unitsface.bank_update_
    with pytest.raises(ValueError, match=rf"{moved} is on cpu but bank is on cuda"):
        fn(args["bank"], args["bank_valid"], args["x"], args["labels"])


# --------------------------------------------------------------------------------------
# Registration: schema, fake (meta) implementation, and the loading helpers.
# --------------------------------------------------------------------------------------

def test_opcheck(device):
    bank, bank_valid, x, labels = make_inputs(device)
    torch.library.opcheck(torch.ops.unitsface.bank_update_.default, (bank, bank_valid, x, labels))


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bank, bank_valid = torch.empty(10, 4), torch.empty(10, dtype=torch.bool)
        assert native.bank_update_(bank, bank_valid, torch.empty(3, 4),
                                   torch.zeros(3, dtype=torch.long)) is None


def test_loading_helpers():
    assert native.available()
    assert native.load() is native.require()


def test_require_says_how_to_build(monkeypatch):
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_load_error", ImportError("libfoo.so: cannot open"))
    assert not native.available()
    with pytest.raises(RuntimeError) as e:
        native.require()
    msg = str(e.value)
    assert "unitsface_kernels._C" in msg and "pip install --no-build-isolation ." in msg
    assert "make build" in msg and "libfoo.so: cannot open" in msg
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        native.bank_update_(torch.zeros(2, 2), torch.zeros(2, dtype=torch.bool),
                            torch.zeros(1, 2), torch.tensor([0]))


def test_has_op(monkeypatch):
    assert native.has_op("bank_update") and native.has_op("bank_update_")
    assert not native.has_op("no_such_family")
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_C", None)
    assert not native.has_op("bank_update")


def test_update_after_a_loss_is_seen_by_autograd():
    """Writing a bank that a fused loss saved for its backward is caught (not silently used)."""
    from unitsface_kernels import bank_update_, fused_uss_loss

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(12, 8, generator=g))
    valid = torch.ones(12, dtype=torch.bool)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 12, (5,), generator=g)
    loss = fused_uss_loss(x, labels, 3.0, bank, ref_valid=valid)
    bank_update_(bank, valid, x, labels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
