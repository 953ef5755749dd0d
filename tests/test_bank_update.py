"""bank_update_ (the public function, unitsface_kernels.bank) and the op it calls,
unitsface::bank_update_ (csrc/bank_update*.{cpp,cu}), against a plain Python loop over the
rule of reference.bank_rows: bank[y_i] ← x_i/||x_i|| (x_i itself below the 1e-5 eps),
bank_valid[y_i] ← x_i is finite, the last occurrence of a label wins.

The extension must be built for these tests (CI builds it): they fail, not skip, when
unitsface_kernels._C is missing. CUDA variants are marked `cuda` (see conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from unitsface_kernels import bank_update_, fused_uss_loss, native, reference

OP = torch.ops.unitsface.bank_update_
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
        norm = xi.norm()
        bank[c] = (xi / norm if norm >= 1e-5 else xi).to(bank.dtype)
        bank_valid[c] = bool(torch.isfinite(xi).all())
    return bank, bank_valid


def make_inputs(device, C=23, D=48, B=37, bank_dtype=torch.float32, x_dtype=torch.float32,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(C, D, generator=g).to(device=device, dtype=bank_dtype)
    bank_valid = (torch.rand(C, generator=g) < 0.5).to(device)
    x = (3 * torch.randn(B, D, generator=g)).to(device=device, dtype=x_dtype)
    # duplicates; rows >= C//2 untouched
    labels = torch.randint(0, C // 2, (B,), generator=g).to(device)
    return bank, bank_valid, x, labels


@pytest.mark.parametrize("call", ["public", "op"])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES, ids=str)
def test_matches_loop(device, bank_dtype, x_dtype, call):
    bank, bank_valid, x, labels = make_inputs(device, bank_dtype=bank_dtype, x_dtype=x_dtype)
    bank0, valid0 = bank.clone(), bank_valid.clone()
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())

    if call == "public":
        assert bank_update_(bank, bank_valid, x, labels) is bank
    else:
        assert OP(bank, bank_valid, x, labels) is None
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


def test_matches_the_reference(device):
    """The op and reference.eager_bank_update_ (the fallback without the extension) agree."""
    bank, bank_valid, x, labels = make_inputs(device)
    x[[0, 5]] *= 1e-7  # below the eps: stored as they are
    x[7, 3] = float("nan")
    want_bank, want_valid = bank.clone(), bank_valid.clone()
    reference.eager_bank_update_(want_bank, want_valid, x, labels)
    OP(bank, bank_valid, x, labels)
    torch.testing.assert_close(bank, want_bank, **TOL[torch.float32], equal_nan=True)
    assert torch.equal(bank_valid, want_valid)


def test_last_occurrence_wins(device):
    D = 16
    x = torch.randn(6, D, dtype=torch.float64).to(device)
    labels = torch.tensor([5, 2, 5, 5, 2, 7], device=device)
    bank = torch.zeros(8, D, dtype=torch.float64, device=device)
    bank_valid = torch.zeros(8, dtype=torch.bool, device=device)
    OP(bank, bank_valid, x, labels)
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
        OP(bank, bank_valid, x, labels)
        outs.append(bank)
        assert bank_valid.all()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    lab = labels.cpu().tolist()
    last = {c: i for i, c in enumerate(lab)}
    want = torch.stack([x[last[c]] / x[last[c]].norm() for c in range(C)])
    torch.testing.assert_close(outs[0], want, **TOL[torch.float32])


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES, ids=str)
def test_zero_and_tiny_embeddings(device, bank_dtype):
    """Below the eps the row is x itself, so that F.normalize reads it as F.normalize(x)
    (x / 1e-5), exactly as the official raw-feature bank does; a zero embedding is legal."""
    D = 8
    x = torch.zeros(4, D, device=device)
    x[1, 0] = 1e-7
    x[2] = 2.0
    x[3, :2] = 3e-6  # ||x|| = 4.2e-6 < 1e-5
    bank = torch.ones(5, D, device=device, dtype=bank_dtype)
    bank_valid = torch.zeros(5, dtype=torch.bool, device=device)
    OP(bank, bank_valid, x, torch.tensor([0, 1, 2, 3], device=device))
    assert torch.count_nonzero(bank[0]) == 0
    torch.testing.assert_close(bank[1].cpu(), x[1].cpu().to(bank_dtype), **TOL[bank_dtype])
    torch.testing.assert_close(bank[2].cpu(), torch.full((D,), D**-0.5, dtype=bank_dtype),
                               **TOL[bank_dtype])
    torch.testing.assert_close(bank[3].cpu(), x[3].cpu().to(bank_dtype), **TOL[bank_dtype])
    assert bank_valid.tolist() == [True, True, True, True, False]
    assert torch.equal(bank[4].cpu(), torch.ones(D, dtype=bank_dtype))
    if bank_dtype == torch.float32:  # what the losses read: F.normalize(row) = F.normalize(x)
        torch.testing.assert_close(F.normalize(bank[:4], eps=1e-5), F.normalize(x, eps=1e-5))


def test_non_finite_rows_are_stored_and_invalid(device):
    """A non-finite feature is stored (NaN is never hidden) but marked invalid: no loss reads
    it."""
    x = torch.randn(3, 4, device=device)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    bank = torch.zeros(4, 4, device=device)
    bank_valid = torch.ones(4, dtype=torch.bool, device=device)
    OP(bank, bank_valid, x, torch.tensor([1, 2, 3], device=device))
    assert bank[1, 1].isnan() and not bank[3].isnan().any()
    torch.testing.assert_close(bank[1, [0, 2, 3]], x[0, [0, 2, 3]])  # a NaN norm: x as it is
    assert bank[2].isnan().any()  # x / inf
    assert bank_valid.tolist() == [True, False, False, True]


def test_fp64_bank(device):
    bank, bank_valid, x, labels = make_inputs(device, bank_dtype=torch.float64,
                                              x_dtype=torch.float64)
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())
    OP(bank, bank_valid, x, labels)
    torch.testing.assert_close(bank.cpu(), want_bank, **TOL[torch.float64])
    assert torch.equal(bank_valid.cpu(), want_valid)


def test_int32_labels_noncontiguous_x_and_grad(device):
    """The public function takes any integer labels and any layout of x (the op: int64 labels,
    checked below)."""
    bank, bank_valid, x, labels = make_inputs(device)
    want_bank, want_valid = loop_bank_update(bank.cpu(), bank_valid.cpu(), x.cpu(), labels.cpu())
    x_nc = x.t().contiguous().t().requires_grad_()  # column-major view, needs grad
    assert not x_nc.is_contiguous()
    bank_update_(bank, bank_valid, x_nc, labels.int())
    torch.testing.assert_close(bank.cpu(), want_bank, **TOL[torch.float32])
    assert torch.equal(bank_valid.cpu(), want_valid)
    assert not bank.requires_grad and bank.grad_fn is None


def test_empty_batch_is_a_noop(device):
    bank, bank_valid, _, _ = make_inputs(device)
    bank0, valid0 = bank.clone(), bank_valid.clone()
    OP(bank, bank_valid, torch.empty(0, bank.shape[1], device=device),
       torch.empty(0, dtype=torch.long, device=device))
    assert torch.equal(bank, bank0) and torch.equal(bank_valid, valid0)


@pytest.mark.cuda
def test_cpu_and_cuda_agree():
    args = make_inputs("cpu", C=1000, D=512, B=512, bank_dtype=torch.bfloat16)
    args[2][[3, 9]] *= 1e-7
    args[2][5, 0] = float("nan")
    gpu = [a.cuda() for a in args]
    OP(*args)
    OP(*gpu)
    torch.testing.assert_close(gpu[0].cpu(), args[0], **TOL[torch.bfloat16], equal_nan=True)
    assert torch.equal(gpu[1].cpu(), args[1])


@pytest.mark.cuda
def test_cuda_op_skips_labels_out_of_range():
    """The CUDA kernel does not synchronise to check the label range (bank.py did): a label
    outside [0, C) in a direct call writes nothing, the others are written."""
    bank, bank_valid, x, _ = make_inputs("cuda", C=6, B=4)
    bank_valid[:] = False
    before = bank.clone()
    OP(bank, bank_valid, x, torch.tensor([0, -1, 6, 3], device="cuda"))
    assert bank_valid.tolist() == [True, False, False, True, False, False]
    assert torch.equal(bank[[1, 2, 4, 5]], before[[1, 2, 4, 5]])
    torch.testing.assert_close(bank[3], x[3] / x[3].norm())


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and the bank left unchanged. The public
# function's messages come from bank.py (every check, with one read-back for the labels),
# the op's from csrc/bank_update.cpp (the checks that read no data; on the CPU the range).
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

    def case(name, exc, public, op, cpu_only=False, **change):
        return pytest.param(base, change, exc, public, op, cpu_only, id=name)

    return [
        case("bank_1d", ValueError, r"bank must be 2-D", r"bank must be 2-D",
             bank=lambda a: a["bank"][0]),
        case("bank_valid_shape", ValueError, r"bank_valid must have shape \(C,\)",
             r"bank_valid must have shape \(C,\)", bank_valid=lambda a: a["bank_valid"][:-1]),
        case("x_1d", ValueError, r"x must be 2-D", r"x must be 2-D", x=lambda a: a["x"][0]),
        case("labels_2d", ValueError, r"labels must have shape \(4,\)", r"labels must be 1-D",
             labels=lambda a: a["labels"][None]),
        case("labels_len", ValueError, r"labels must have shape \(4,\), got \(3,\)",
             r"labels has 3 entries but x has 4 rows", labels=lambda a: a["labels"][:3]),
        case("d_mismatch", ValueError, r"x has embedding size 4 but bank has 5",
             r"D mismatch: x has D = 4 but bank has D = 5", x=lambda a: a["x"][:, :4]),
        case("bank_dtype", TypeError, r"bank must be float16, bfloat16, float32 or float64",
             r"bank must be float32, bfloat16, float16 or float64",
             bank=lambda a: a["bank"].long()),
        case("bank_valid_dtype", TypeError, r"bank_valid must be a bool tensor",
             r"bank_valid must be a bool tensor",
             bank_valid=lambda a: a["bank_valid"].to(torch.uint8)),
        case("x_dtype", TypeError, r"x must be float16, bfloat16, float32 or float64",
             r"x must be a floating-point tensor", x=lambda a: a["x"].long()),
        case("labels_dtype", TypeError, r"labels must be an integer tensor",
             r"labels must be an int64 tensor", labels=lambda a: a["labels"].float()),
        case("labels_int32_op", None, None, r"labels must be an int64 tensor",
             labels=lambda a: a["labels"].int()),
        case("labels_too_big", ValueError, r"labels must lie in \[0, 6\) .*got labels\[2\] = 6",
             r"labels must be in \[0, C\) = \[0, 6\), got labels\[2\] = 6", cpu_only=True,
             labels=lambda a: torch.tensor([0, 1, 6, 3], device=a["x"].device)),
        case("labels_negative", ValueError, r"labels must lie in \[0, 6\) .*got labels\[0\] = -1",
             r"labels must be in \[0, C\) = \[0, 6\), got labels\[0\] = -1", cpu_only=True,
             labels=lambda a: torch.tensor([-1, 1, 2, 3], device=a["x"].device)),
        case("bank_noncontiguous", ValueError, r"bank must be contiguous",
             r"bank must be contiguous",
             bank=lambda a: torch.zeros(D, C, device=a["x"].device).t()),
        case("x_aliases_bank", ValueError, r"x must not share memory with bank",
             r"x must not share memory with bank", x=lambda a: a["bank"][:4]),
    ]


@pytest.mark.parametrize("call", ["public", "op"])
@pytest.mark.parametrize("base,change,exc,public,op,cpu_only", _bad_cases())
def test_bad_input(device, call, base, change, exc, public, op, cpu_only):
    match = public if call == "public" else op
    if match is None:
        pytest.skip("accepted by this entry point")
    if call == "op" and cpu_only and device == "cuda":
        pytest.skip("the CUDA op does not synchronise to check the label range (bank.py does)")
    args = base(device)
    for k, f in change.items():
        args[k] = f(args)
    before = {k: v.clone() for k, v in args.items()}
    fn = bank_update_ if call == "public" else OP
    with pytest.raises(exc or TypeError, match=match):
        fn(args["bank"], args["bank_valid"], args["x"], args["labels"])
    for k in ("bank", "bank_valid"):
        assert torch.equal(args[k], before[k]), f"{k} was modified by a failing call"


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bank_update_(torch.zeros(2, 2), torch.zeros(2, dtype=torch.bool), [[1.0, 2.0]],
                     torch.tensor([0]))


def test_device_mismatch_public():
    # The meta device stands in for "another device" on a CPU-only machine.
    bank, bank_valid, x, labels = make_inputs("cpu")
    with pytest.raises(ValueError, match=r"x is on meta but bank is on cpu"):
        bank_update_(bank, bank_valid, x.to("meta"), labels)


@pytest.mark.cuda
@pytest.mark.parametrize("call", ["public", "op"])
@pytest.mark.parametrize("moved", ["bank_valid", "x", "labels"])
def test_device_mismatch_cuda(call, moved):
    args = dict(zip(["bank", "bank_valid", "x", "labels"], make_inputs("cuda")))
    args[moved] = args[moved].cpu()
    fn = bank_update_ if call == "public" else OP
    with pytest.raises(ValueError, match=rf"{moved} is on cpu but bank is on cuda"):
        fn(args["bank"], args["bank_valid"], args["x"], args["labels"])


# --------------------------------------------------------------------------------------
# Registration: schema, fake (meta) implementation, and the loading helpers.
# --------------------------------------------------------------------------------------

def test_opcheck(device):
    bank, bank_valid, x, labels = make_inputs(device)
    torch.library.opcheck(OP.default, (bank, bank_valid, x, labels))


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bank, bank_valid = torch.empty(10, 4), torch.empty(10, dtype=torch.bool)
        assert OP(bank, bank_valid, torch.empty(3, 4), torch.zeros(3, dtype=torch.long)) is None


def test_fake_tensor_mode_public():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bank, bank_valid = torch.empty(10, 4), torch.empty(10, dtype=torch.bool)
        assert bank_update_(bank, bank_valid, torch.empty(3, 4),
                            torch.zeros(3, dtype=torch.long)) is bank


def test_loading_helpers():
    assert native.available()
    assert native.load() is native.require()


def test_without_the_extension_the_reference_runs(monkeypatch):
    """native.require says how to build; the public function falls back to the eager
    reference (same rule)."""
    bank, bank_valid, x, labels = make_inputs("cpu")
    want_bank, want_valid = bank.clone(), bank_valid.clone()
    OP(want_bank, want_valid, x, labels)
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_load_error", ImportError("libfoo.so: cannot open"))
    assert not native.available() and not native.has_op("bank_update_")
    with pytest.raises(RuntimeError) as e:
        native.require()
    msg = str(e.value)
    assert "unitsface_kernels._C" in msg and "pip install --no-build-isolation ." in msg
    assert "make build" in msg and "libfoo.so: cannot open" in msg
    bank_update_(bank, bank_valid, x, labels)
    torch.testing.assert_close(bank, want_bank, **TOL[torch.float32])
    assert torch.equal(bank_valid, want_valid)


def test_has_op():
    assert native.has_op("bank_update_")


def test_has_op_unknown_name():
    assert not native.has_op("no_such_op")


def test_update_after_a_loss_is_seen_by_autograd():
    """Writing a bank that a fused loss saved for its backward is caught (not silently used)."""
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(12, 8, generator=g))
    valid = torch.ones(12, dtype=torch.bool)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 12, (5,), generator=g)
    loss = fused_uss_loss(x, labels, 3.0, bank, ref_valid=valid)
    bank_update_(bank, valid, x, labels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
