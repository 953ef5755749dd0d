"""SparseSGD against torch.optim.SGD on the dense gradients (docs/design.md §7, "Scale"):
random row sets per step, momentum, weight decay, Nesterov, a learning-rate schedule, rows
left without gradient for many steps, reads at arbitrary steps, and a state_dict saved and
restored mid-run — weights and momentum equal to fp32 round-off (≤ 1e-6 relative)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import fused_backends
from unitsface_kernels import optim
from unitsface_kernels.optim import SparseSGD, zero_grad_step

C, D, STEPS = 60, 8, 30
RTOL = 1e-6


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(hyper, seed=0, max_lag=8):
    g = torch.Generator().manual_seed(seed)
    w0, b0 = torch.randn(C, D, generator=g), torch.randn(1, generator=g)
    dense_w, dense_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    lazy_w, lazy_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    dense = torch.optim.SGD([dense_w, dense_b], **hyper)
    lazy = SparseSGD([lazy_w, lazy_b], max_lag=max_lag, **hyper)
    return (dense, dense_w, dense_b), (lazy, lazy_w, lazy_b)


def _grads(step, g):
    """A step's gradient on a random set of rows (rows 0–4 never get one), and b's."""
    rows = torch.randperm(C - 5, generator=g)[:6] + 5
    return rows, torch.randn(len(rows), D, generator=g), torch.randn(1, generator=g)


def _set(opt_params, rows, vals, gb, sparse):
    _, w, b = opt_params
    w.grad = (torch.sparse_coo_tensor(rows[None], vals, (C, D)) if sparse
              else torch.zeros(C, D).index_put((rows,), vals))
    b.grad = gb.clone()


def _step(dense, lazy, step, g):
    """One step of both optimizers on the same random gradient (dense and sparse)."""
    rows, vals, gb = _grads(step, g)
    _set(dense, rows, vals, gb, sparse=False)
    _set(lazy, rows, vals, gb, sparse=True)
    dense[0].step()
    lazy[0].step()


def _close(dense, lazy):
    (d_opt, d_w, d_b), (l_opt, l_w, l_b) = dense, lazy
    l_opt.catch_up_all()
    assert _rel(l_w, d_w) <= RTOL and _rel(l_b, d_b) <= RTOL
    if "momentum_buffer" in d_opt.state[d_w]:
        assert _rel(l_opt.state[l_w]["momentum_buffer"],
                    d_opt.state[d_w]["momentum_buffer"]) <= RTOL


HYPERS = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
          dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
          dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3),
          dict(lr=0.1, weight_decay=5e-4)]


@pytest.mark.parametrize("hyper", HYPERS, ids=["momentum", "nesterov", "dampening", "plain"])
@pytest.mark.parametrize("read_every", [1, 7, STEPS])
@pytest.mark.parametrize("block_bytes", [None, 3 * D * 4], ids=["one_block", "3_row_blocks"])
def test_equals_dense_sgd_under_a_schedule(hyper, read_every, block_bytes, monkeypatch):
    if block_bytes is not None:  # the CPU's row blocks, several per step (and a short last one)
        monkeypatch.setattr(optim, "_CPU_BLOCK_BYTES", block_bytes)
    dense, lazy = _pair(hyper)
    schedules = [torch.optim.lr_scheduler.MultiStepLR(o[0], [8, 20], 0.1) for o in (dense, lazy)]
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        _step(dense, lazy, step, g)
        for s in schedules:
            s.step()
        if (step + 1) % read_every == 0:
            _close(dense, lazy)
    _close(dense, lazy)
    # the rows that never had a gradient moved exactly as dense SGD moved them
    assert not torch.equal(dense[1][:5], _pair(hyper)[0][1][:5])


def test_state_dict_mid_run_continues_identically():
    hyper = HYPERS[0]
    dense, lazy = _pair(hyper)
    g = torch.Generator().manual_seed(2)
    saved = None
    for step in range(STEPS):
        _step(dense, lazy, step, g)
        if step == 12:
            saved = (copy.deepcopy(lazy[0].state_dict()), lazy[1].detach().clone(),
                     lazy[2].detach().clone())
            replay = torch.Generator().manual_seed(0)
            replay.set_state(g.get_state())
    # a fresh optimizer on the saved weights and state continues exactly like the original
    _, (fresh, w, b) = _pair(hyper)
    with torch.no_grad():
        w.copy_(saved[1])
        b.copy_(saved[2])
    fresh.load_state_dict(saved[0])
    for step in range(13, STEPS):
        rows, vals, gb = _grads(step, replay)
        _set((fresh, w, b), rows, vals, gb, sparse=True)
        fresh.step()
    _close(dense, (fresh, w, b))


def test_rows_left_behind_are_caught_up_and_the_history_stays_short():
    dense, lazy = _pair(HYPERS[0], max_lag=4)
    g = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        _step(dense, lazy, step, g)
        assert len(lazy[1]._unitsface_lazy.history) < 4
    _close(dense, lazy)


def test_heads_catch_up_the_rows_they_read():
    dense, lazy = _pair(HYPERS[1])
    g = torch.Generator().manual_seed(4)
    for step in range(10):
        _step(dense, lazy, step, g)
    read = torch.tensor([0, 1, 2, 30])
    lazy[1]._unitsface_lazy.catch_up(read)
    assert _rel(lazy[1][read], dense[1][read]) <= RTOL


def test_zero_grad_step_is_torch_sgd():
    """The matrix of one step on a row with no gradient is torch.optim.SGD's step on it."""
    for hyper in HYPERS:
        w = torch.nn.Parameter(torch.randn(1, 3))
        opt = torch.optim.SGD([w], **hyper)
        w.grad = torch.randn(1, 3)
        opt.step()  # a momentum buffer exists from here on
        w0 = w.detach().clone()
        v0 = opt.state[w]["momentum_buffer"].clone() if hyper.get("momentum") else torch.zeros(1, 3)
        w.grad = torch.zeros(1, 3)
        opt.step()
        (a, b), (c, d) = zero_grad_step(hyper["lr"], hyper.get("momentum", 0.0),
                                        hyper.get("dampening", 0.0), hyper["weight_decay"],
                                        hyper.get("nesterov", False))
        torch.testing.assert_close(w.detach(), a * w0 + b * v0)
        if hyper.get("momentum"):
            torch.testing.assert_close(opt.state[w]["momentum_buffer"], c * w0 + d * v0)


@pytest.mark.parametrize("kw,match", [(dict(lr=-1.0), "lr must be"),
                                      (dict(lr=0.1, momentum=float("nan")), "momentum must be"),
                                      (dict(lr=0.1, nesterov=True), "nesterov needs"),
                                      (dict(lr=0.1, max_lag=1), "max_lag")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SparseSGD([torch.nn.Parameter(torch.zeros(2))], **kw)


# ----------------------------------------------------------------------------- with the heads

@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in fused_backends("cpu", "unitsface") if isinstance(b, str)])
@pytest.mark.parametrize("head_cls", ["UniTSFaceHead", "PartialFC"])
def test_sparse_head_trains_like_the_dense_one(backend, head_cls):
    """A head with sparse_grad=True stepped by SparseSGD and the same head with dense gradients
    stepped by torch.optim.SGD: the same losses, and after 30 partial-FC steps (rows left out
    for many of them, a learning-rate schedule) the same weights, momentum and bank."""
    import unitsface_kernels.nn as unn

    cls = getattr(unn, head_cls)
    heads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        heads.append(cls(16, 50, sample_rate=0.2, sparse_grad=sparse, backend=backend))
    lazy_opt = SparseSGD(heads[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dense_opt = torch.optim.SGD(heads[1].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedules = [torch.optim.lr_scheduler.StepLR(o, 10, 0.3) for o in (lazy_opt, dense_opt)]
    g = torch.Generator().manual_seed(5)
    for step in range(30):
        x = torch.randn(8, 16, generator=g)
        labels = torch.randint(0, 50, (8,), generator=g)
        losses = []
        for head, opt in zip(heads, (lazy_opt, dense_opt)):
            torch.manual_seed(100 + step)  # the same partial-FC draw
            loss = head(x, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert heads[0].weight.grad.is_sparse and not heads[1].weight.grad.is_sparse
        assert _rel(losses[0], losses[1]) <= 1e-5
        for s in schedules:
            s.step()
    lazy_state, dense_state = heads[0].state_dict(), heads[1].state_dict()  # brings rows up
    for name in dense_state:
        if dense_state[name].is_floating_point():
            assert _rel(lazy_state[name], dense_state[name]) <= 1e-5, name
    assert _rel(lazy_opt.state_dict()["state"][0]["momentum_buffer"],
                dense_opt.state_dict()["state"][0]["momentum_buffer"]) <= 1e-5


def test_sparse_grad_only_with_partial_fc():
    """Without an index (sample_rate 1, or eval) the gradient is dense: every row has one."""
    from unitsface_kernels.nn import PartialFC

    head = PartialFC(16, 50, sparse_grad=True, backend="reference")
    head(torch.randn(8, 16), torch.randint(0, 50, (8,))).backward()
    assert not head.weight.grad.is_sparse


# ----------------------------------------------------------------------------- option space

def _sgd_options():
    """torch.optim.SGD's option space: momentum 0 or 0.9 (with dampening, or Nesterov), weight
    decay 0 or not, maximize either way."""
    out = []
    for momentum, dampening, nesterov in ((0.0, 0.0, False), (0.9, 0.0, False),
                                          (0.9, 0.0, True), (0.9, 0.3, False)):
        for weight_decay in (0.0, 5e-4):
            for maximize in (False, True):
                out.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                weight_decay=weight_decay, maximize=maximize))
    return out


@pytest.mark.parametrize("mode", ["eager", "capturable", "capturable_tensor_lr"])
@pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zeros"])
@pytest.mark.parametrize("hyper", _sgd_options(),
                         ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_equals_torch_sgd_over_its_option_space(hyper, set_to_none, mode):
    """Gradients from autograd (an embedding lookup: sparse for SparseSGD, dense for
    torch.optim.SGD), zero_grad either way, a learning-rate schedule: after every step the rows
    stepped equal torch.optim.SGD's, and every 5 steps all weights and momentum buffers."""
    g = torch.Generator().manual_seed(7)
    w0, b0 = torch.randn(C, D, generator=g), torch.randn(1, generator=g)
    params = [(torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone()))
              for _ in range(2)]
    lr = torch.tensor(0.1, dtype=torch.float64) if mode == "capturable_tensor_lr" else 0.1
    lazy = SparseSGD(params[0], lr=lr, max_lag=8, capturable=mode != "eager", **hyper)
    dense = torch.optim.SGD(params[1], lr=0.1, **hyper)
    schedules = [torch.optim.lr_scheduler.MultiStepLR(o, [6, 15], 0.3) for o in (lazy, dense)]
    for step in range(STEPS):
        rows = (torch.randperm(C - 5, generator=g)[:6] + 5).sort().values
        vals, gb = torch.randn(6, D, generator=g), torch.randn(1, generator=g)
        for (w, b), opt, sparse in zip(params, (lazy, dense), (True, False)):
            opt.zero_grad(set_to_none=set_to_none)
            loss = (torch.nn.functional.embedding(rows, w, sparse=sparse) * vals).sum()
            (loss + (b * gb).sum()).backward()
            opt.step()
        assert params[0][0].grad.is_sparse and not params[1][0].grad.is_sparse
        assert _rel(params[0][0][rows], params[1][0][rows]) <= RTOL
        if mode == "capturable_tensor_lr":
            # a tensor lr rounds η·g before the add where torch's float alpha may fuse it: b,
            # one number that random steps move through 0, agrees to RTOL of its scale
            assert float((params[0][1] - params[1][1]).abs()) <= RTOL * max(
                1.0, float(params[1][1].abs()))
        else:
            assert _rel(params[0][1], params[1][1]) <= RTOL
        for s in schedules:
            s.step()
        if step % 5 == 4 or step == STEPS - 1:
            _close((dense, *params[1]), (lazy, *params[0]))
    assert float(lazy.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.3 ** 2)
    # rows 0-4 never had a gradient: they moved exactly when torch's SGD moved them
    moves = hyper["weight_decay"] != 0
    assert torch.equal(params[1][0][:5], w0[:5]) != moves


def test_capturable_window_bounds_the_lag():
    """A capturable SparseSGD brings a round-robin window of rows up to date at each step:
    no row lags more than max_lag / 2 steps, rows that never get a gradient included."""
    w = torch.nn.Parameter(torch.randn(C, D))
    opt = SparseSGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4, max_lag=8, capturable=True)
    lazy = w._unitsface_lazy
    for step in range(STEPS):
        w.grad = torch.sparse_coo_tensor(torch.tensor([[10, 11]]), torch.ones(2, D), (C, D))
        opt.step()
        assert int((lazy.steps - lazy.row_step).max()) <= 4 + (step == 0) * C


def test_capturable_catch_up_in_blocks(monkeypatch):
    """The capturable catch-up of every row works in fixed-size blocks (3 rows here, a short
    last one): the same weights and momentum as torch.optim.SGD."""
    monkeypatch.setattr(optim, "_DEVICE_BLOCK_BYTES", 3 * D * 4)
    hyper = HYPERS[1]
    g = torch.Generator().manual_seed(8)
    w0, b0 = torch.randn(C, D, generator=g), torch.randn(1, generator=g)
    dense_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    lazy_p = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    dense = (torch.optim.SGD(dense_p, **hyper), *dense_p)
    lazy = (SparseSGD(lazy_p, max_lag=8, capturable=True, **hyper), *lazy_p)
    for step in range(STEPS):
        rows, vals, gb = _grads(step, g)
        rows, order = rows.sort()  # a capturable step asserts sorted rows
        _set(dense, rows, vals[order], gb, sparse=False)
        _set(lazy, rows, vals[order], gb, sparse=True)
        dense[0].step()
        lazy[0].step()
        if step % 7 == 6:
            _close(dense, lazy)
    _close(dense, lazy)
