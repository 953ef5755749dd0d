"""The Triton engine's finishing kernels (unitsface_kernels/triton/finish.py) against their
torch statements in float64, interpreted here and compiled on a GPU, at shapes that run every
loop more than once (more slots than a merge step, more split-K slices than a step, D wider
than a feature step) and on the edge cases the whole-op tests reach only by chance: empty
sets, K sub-centre slots, NaN partials, rows below the eps. The ops' own tests
(test_unitsface.py, test_uss.py) check them end to end against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from unitsface_kernels import reference
from unitsface_kernels.layouts import USS_STATS, UnitsfaceStat, UssStat
from unitsface_kernels.triton import finish
from unitsface_kernels.triton.maths import NEG_BIG

F64 = torch.float64
# Triton runs CPU tensors under its interpreter only (conftest sets it where there is no GPU);
# on a GPU the compiled kernels run the same cases (NaN through tl.max, libdevice's log and
# exp, rounding to nearest on the store).
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               torch.cuda.is_available(), reason="Triton's interpreter runs where no GPU is")),
           pytest.param("cuda", marks=pytest.mark.cuda)]


def _lse(m, s):
    """logsumexp of per-slot (max, sum-exp) [slots, B], −inf for an empty set."""
    top = m.max(dim=0).values
    total = (s * torch.exp(m - top)).sum(dim=0)
    return torch.where(total == 0, -math.inf, top + torch.log(total))


def _fpart(tiles, kp, b, *, empty_rows=(), gen):
    """Forward partials as the cosine kernel writes them: per slot a max, a positive
    sum-exp (≥ 1: the max's own term), the target logit in one slot per row; the USS slots
    (each column tile's first) with pairs sums or lse pairs. Rows in `empty_rows` have
    empty USS sets (max NEG_BIG, sum-exp 0)."""
    f = torch.zeros(tiles * kp, finish.N_FP, b, dtype=F64)
    f[:, 0] = 20 * torch.randn(tiles * kp, b, generator=gen, dtype=F64)
    f[:, 1] = 1 + 5 * torch.rand(tiles * kp, b, generator=gen, dtype=F64)
    target_slot = torch.randint(0, tiles * kp, (b,), generator=gen)
    f[target_slot, 2, torch.arange(b)] = torch.randn(b, generator=gen, dtype=F64)
    f[:, 3] = 30 * torch.randn(tiles * kp, b, generator=gen, dtype=F64)
    f[:, 4] = torch.rand(tiles * kp, b, generator=gen, dtype=F64)
    f[:, 5] = 30 * torch.randn(tiles * kp, b, generator=gen, dtype=F64)
    f[:, 6] = 1 + torch.rand(tiles * kp, b, generator=gen, dtype=F64)
    for r in empty_rows:
        f[:, 3, r], f[:, 4, r] = NEG_BIG.value, 0.0
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles,kp", [(1, 1), (600, 1), (70, 4)])
@pytest.mark.parametrize("form", ["pairs", "lse", None])
@pytest.mark.parametrize("clamp", [False, True])
def test_merge_objective(tiles, kp, form, clamp, device):
    """The objective's statistics and per-row loss: lse over every slot (KP per column tile),
    the target logit summed, the USS part over each column tile's first slot; 600 slots take
    each merge loop three steps, 280 the softmax's two; row 2's positive set is empty."""
    b, scale, lam = 37, 64.0, 0.7
    gen = torch.Generator().manual_seed(tiles + kp)
    f = _fpart(tiles, kp, b, empty_rows=(2,), gen=gen)
    stats = torch.full((len(UnitsfaceStat), b), float("nan"), dtype=F64, device=device)
    db = torch.empty(b, dtype=F64, device=device)
    rows = finish.merge_partials(f.to(device), tiles, stats, uss=form is not None,
                                 lse_form=form == "lse", clamp=clamp, scale=scale,
                                 uss_weight=lam, kp=kp, db_rows=db if form == "pairs" else None)
    stats, db, rows = stats.cpu(), db.cpu(), rows.cpu()
    lse = _lse(f[:, 0], f[:, 1])
    target = f[:, 2].sum(dim=0)
    want = {UnitsfaceStat.LSE: lse, UnitsfaceStat.TARGET: target}
    u = f[::kp]
    uss = torch.zeros(b, dtype=F64)
    uss_stats = torch.zeros(4, b, dtype=F64)
    if form == "lse":
        a, bn = _lse(u[:, 3], u[:, 4]), _lse(u[:, 5], u[:, 6])
        assert a[2] == -math.inf  # the empty set
        uss, fa, fb = reference.uss_lse_terms(a, bn, scale, clamp)
        uss_stats = reference.uss_stats(a, fa, bn, fb)
    elif form == "pairs":
        uss = u[:, 3].sum(dim=0)
        torch.testing.assert_close(db, u[:, 4].sum(dim=0) / -scale, rtol=1e-12, atol=1e-12)
    want[UnitsfaceStat.USS_LOSS] = uss
    for row, v in want.items():
        torch.testing.assert_close(stats[row], v, rtol=1e-12, atol=1e-12, msg=row.name)
    torch.testing.assert_close(stats[USS_STATS], uss_stats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, lse - target + lam * uss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pairs", "lse"])
def test_merge_uss_family(form, device):
    """The USS family's [4, B] statistics (layouts.UssStat) and its loss rows, no softmax."""
    b, tiles, scale = 19, 300, 30.0
    f = _fpart(tiles, 1, b, empty_rows=(0, 5), gen=torch.Generator().manual_seed(3))
    stats = torch.full((len(UssStat), b), float("nan"), dtype=F64, device=device)
    rows = finish.merge_partials(f.to(device), tiles, stats, uss=True, lse_form=form == "lse",
                                 clamp=True, scale=scale)
    stats, rows = stats.cpu(), rows.cpu()
    if form == "lse":
        a, bn = _lse(f[:, 3], f[:, 4]), _lse(f[:, 5], f[:, 6])
        want_rows, fa, fb = reference.uss_lse_terms(a, bn, scale, True)
        want = reference.uss_stats(a, fa, bn, fb)
        assert rows[0] == want_rows[0] and (stats[UssStat.SIGMA_A, [0, 5]] == 0).all()
    else:
        want_rows, want = f[:, 3].sum(dim=0), torch.zeros(4, b, dtype=F64)
    torch.testing.assert_close(rows, want_rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_all_empty_and_nan(device):
    """A row whose every slot is empty has lse −∞; a NaN max or sum-exp in one slot makes its
    row's lse NaN (tl.max may drop a NaN: the merged sum keeps it) and no other row's."""
    b, tiles = 5, 530
    f = _fpart(tiles, 1, b, gen=torch.Generator().manual_seed(1))
    f[:, 0, 0], f[:, 1, 0] = NEG_BIG.value, 0.0
    f[277, 0, 1] = float("nan")
    f[3, 1, 2] = float("nan")
    f[500, 3, 3] = float("nan")
    stats = torch.empty(len(UnitsfaceStat), b, dtype=F64, device=device)
    rows = finish.merge_partials(f.to(device), tiles, stats, uss=True, lse_form=False,
                                 clamp=False, scale=64.0, uss_weight=1.0)
    stats, rows = stats.cpu(), rows.cpu()
    lse = stats[UnitsfaceStat.LSE]
    assert lse[0] == -math.inf
    assert lse[1].isnan() and lse[2].isnan() and lse[3:].isfinite().all()
    assert rows[3].isnan() and stats[UnitsfaceStat.USS_LOSS, 4].isfinite()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_parts,d", [(1, 70), (21, 70), (3, 1100)])
@pytest.mark.parametrize("with_go", [False, True])
def test_tangent(n_parts, d, with_go, device):
    """∂x's finish: go·[(G − (x̂·G)·x̂)/max(‖x‖, eps) + extra] with G the sum of the slices;
    21 slices and D = 1100 take its loops more than one step, 11 rows more than one block of
    rows under the interpreter; row 1 is below the eps (no projection), row 2 is zero."""
    b, eps = 11, 1e-5
    gen = torch.Generator().manual_seed(n_parts * d)
    part = torch.randn(n_parts, b, d, generator=gen, dtype=F64)
    x = torch.randn(b, d, generator=gen, dtype=F64)
    x[1] *= 1e-7 / x[1].norm()
    x[2] = 0
    nx = x.norm(dim=1)
    go = torch.randn(b, generator=gen, dtype=F64) if with_go else None
    extra = torch.randn(b, d, generator=gen, dtype=F64) if with_go else None
    on = (lambda t: None if t is None else t.to(device))  # noqa: E731
    got = finish.tangent_grad(on(part), on(x), on(nx), eps, go=on(go), extra=on(extra)).cpu()
    g = part.sum(dim=0)
    inv = 1 / nx.clamp_min(eps)
    h = torch.where(nx >= eps, (g * x).sum(dim=1) * inv, 0.0)
    want = inv[:, None] * (g - (h * inv)[:, None] * x)
    if with_go:
        want = go[:, None] * (want + extra)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    assert got.dtype == F64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tangent_casts_and_nan(dtype, device):
    """The backward's ∂x in x's dtype (rounded to nearest from fp32 slices); a NaN norm or a
    NaN slice entry reaches its row only."""
    b, d = 4, 40
    gen = torch.Generator().manual_seed(5)
    part = torch.randn(3, b, d, generator=gen)
    x = torch.randn(b, d, generator=gen).to(dtype)
    nx = x.float().norm(dim=1)
    nx[1] = float("nan")
    part[2, 2, 7] = float("nan")
    go = torch.rand(b, generator=gen)
    got = finish.tangent_grad(part.to(device), x.to(device), nx.to(device), 1e-5,
                              go=go.to(device), dtype=dtype).cpu()
    assert got.dtype == dtype
    assert got[1].isnan().all() and got[2].isnan().all()
    keep = [0, 3]
    xd, gd, nd = x.double()[keep], part.double().sum(dim=0)[keep], nx.double()[keep]
    want = go.double()[keep, None] / nd[:, None] * (
        gd - ((gd * xd).sum(dim=1) / nd ** 2)[:, None] * xd)
    # one rounding to the dtype (fp32: the sums' rounding, far below it)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    torch.testing.assert_close(got[keep].double(), want, rtol=ulp, atol=ulp * want.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
def test_go_unit_rows(dtype, device):
    """x̂' = go·x/max(‖x‖, eps) in x's dtype (one rounding); rows below the eps are scaled by
    1/eps, not normalised."""
    b, d = 11, 300
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b, d, generator=gen, dtype=F64)
    x[3] *= 1e-8 / x[3].norm()
    x = x.to(dtype)
    acc = F64 if dtype == F64 else torch.float32
    nx = x.to(acc).norm(dim=1)
    go = torch.randn(b, generator=gen, dtype=acc)
    got = finish.go_unit_rows(x.to(device), go.to(device), nx.to(device), 1e-5).cpu()
    want = (x.to(acc) * (go / nx.clamp_min(1e-5))[:, None]).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0 if dtype != torch.float32 else 1e-6,
                               atol=0 if dtype != torch.float32 else 1e-7)
