"""SGD for class-centre heads with partial FC, touching only the rows that were sampled
(docs/design.md §7, "Scale").

With partial FC a step's weight gradient lives on the sampled rows S (a sparse gradient: the
heads' ``sparse_grad=True``). Dense SGD with momentum μ, dampening δ, weight decay λ (and
Nesterov) still moves every other row — its momentum and its decay — so an optimizer that
skipped them would not be SGD. For a row without gradient, one step of torch.optim.SGD is
linear in (w, v) with coefficients that depend only on the step's learning rate η
(:func:`zero_grad_step`). :class:`SparseSGD` records these 2×2 matrices per step and applies
their product to a row only when the row is needed: when it next has a gradient, when a head
reads it (the heads call ``catch_up(rows)`` through the parameter's ``_unitsface_lazy``
handle before a forward over those rows), and for every row when the weights or the optimizer
state are read (``state_dict``, :meth:`SparseSGD.catch_up_all`). The result equals
torch.optim.SGD on the dense gradient to fp32 round-off, for any learning-rate schedule (the
rate is read from the param group at each step, as torch's schedulers set it). A row left
behind ``max_lag`` steps is brought up to date then, so the history stays short.

Parameters with dense gradients (the threshold b, or a head without partial FC) are stepped
as torch.optim.SGD steps them. AdamW is not offered: its second-moment decay does not
compose into a replayable closed form once the learning rate or the bias correction change.

``capturable=True`` keeps that bookkeeping on the device instead (:class:`_DeviceLazyRows`),
so that a step reads nothing back and launches the same kernels every time: it can be
captured in a CUDA graph (``examples/capture_step.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Matrix = tuple[tuple[float, float], tuple[float, float]]
_IDENTITY: Matrix = ((1.0, 0.0), (0.0, 1.0))
_CPU_BLOCK_BYTES = 1 << 20
"""On the CPU the rows are gathered, updated and written back in blocks of about this size,
so that the temporaries stay in cache instead of being fresh |S| × D allocations (each new
page of which costs a fault): the step then costs about one read and write of its rows."""
_DEVICE_BLOCK_BYTES = 64 << 20
"""The capturable catch-up of many rows (every row: the dense step, ``state_dict``) works in
blocks of about this size of rows."""


def _row_blocks(rows: Tensor, p: Tensor):
    """`rows` in blocks (one block on GPUs, where a large gather is the fast one)."""
    if p.device.type != "cpu":
        return (rows,)
    row_bytes = max(1, p[0].numel() * p.element_size()) if p.dim() else p.element_size()
    return rows.split(max(1, _CPU_BLOCK_BYTES // row_bytes))


def _coalesced(grad: Tensor, capturable: bool) -> Tensor:
    """A sparse gradient with sorted unique row indices. The heads' gradients have them, but
    autograd's accumulation rebuilds the tensor without the flag; checking the order costs a
    read of the indices where coalescing would sort them and sum the values. Capturable: the
    order is asserted on the device instead (coalescing has a data-dependent size), so a
    step's gradient must come from one backward of one head."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    ordered = (rows[1:] > rows[:-1]).all()
    if capturable:
        torch._assert_async(ordered, "SparseSGD(capturable=True) needs a sparse gradient with "
                            "sorted unique rows (one backward of one head per step)")
    elif rows.numel() >= 2 and not bool(ordered):
        return grad.coalesce()
    return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                   is_coalesced=True)


def zero_grad_step(lr: float, momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool) -> Matrix:
    """One step of torch.optim.SGD on a row whose raw gradient is 0 (and whose momentum
    buffer exists), as the matrix of (w, v) → (w', v'):

        g = λ·w,  v' = μ·v + (1 − δ)·g,  w' = w − η·(g + μ·v' if Nesterov else v')

    Without momentum w' = (1 − η·λ)·w. (The sign of `maximize` does not matter: it negates
    the raw gradient, 0 here.)"""
    a0, a1 = _affine_parts(momentum, dampening, weight_decay, nesterov)
    return tuple(tuple(c0 + lr * c1 for c0, c1 in zip(r0, r1)) for r0, r1 in zip(a0, a1))


def _affine_parts(momentum: float, dampening: float, weight_decay: float,
                  nesterov: bool) -> tuple[Matrix, Matrix]:
    """(A₀, A₁) with :func:`zero_grad_step` = A₀ + η·A₁ (the matrix is affine in the learning
    rate η): the device form of a step needs only η on the device."""
    lam, mu = weight_decay, momentum
    if mu == 0:
        return ((1.0, 0.0), (0.0, 0.0)), ((-lam, 0.0), (0.0, 0.0))
    v_w, v_v = (1.0 - dampening) * lam, mu
    d_w, d_v = (lam + mu * v_w, mu * v_v) if nesterov else (v_w, v_v)
    return ((1.0, 0.0), (v_w, v_v)), ((-d_w, -d_v), (0.0, 0.0))


def _matmul(a: Matrix, b: Matrix) -> Matrix:
    return ((a[0][0] * b[0][0] + a[0][1] * b[1][0], a[0][0] * b[0][1] + a[0][1] * b[1][1]),
            (a[1][0] * b[0][0] + a[1][1] * b[1][0], a[1][0] * b[0][1] + a[1][1] * b[1][1]))


class _LazyRows:
    """The deferred zero-gradient steps of one parameter: row_step[r] is the step up to which
    row r is current; history[k] is the matrix of step base + k. The heads' handle
    (``param._unitsface_lazy``): ``catch_up(rows)`` before they read rows."""

    def __init__(self, optimizer: "SparseSGD", param: Tensor):
        self.optimizer, self.param = optimizer, param
        self.row_step = torch.zeros(param.shape[0] if param.dim() else 1, dtype=torch.int64,
                                    device=param.device)
        self.history: list[Matrix] = []
        self.base = 0

    @property
    def step(self) -> int:
        return self.base + len(self.history)

    @torch.no_grad()
    def catch_up(self, rows=None) -> None:
        """Bring `rows` (an index tensor; None: every row) to the current step."""
        if not self.history:
            return
        p = self.param
        rows = (torch.arange(p.shape[0], device=p.device) if rows is None
                else rows.to(device=p.device, dtype=torch.int64))
        since = self.row_step[rows]
        behind = since < self.step
        rows, since = rows[behind], since[behind]
        if rows.numel() == 0:
            return
        # suffix products A_{T−1} ··· A_k for every step k of the history (float64)
        products, acc = [], _IDENTITY
        for m in reversed(self.history):
            acc = _matmul(acc, m)
            products.append((acc[0][0], acc[0][1], acc[1][0], acc[1][1]))
        table = torch.tensor(products[::-1], dtype=torch.float64, device=p.device)
        coefs = table[since - self.base].to(p.dtype)
        buf = self.optimizer.state[p].get("momentum_buffer")
        start = 0
        for block in _row_blocks(rows, p):
            coef = coefs[start:start + len(block)]
            start += len(block)
            a, b, c, d = (coef[:, k].reshape((-1,) + (1,) * (p.dim() - 1)) for k in range(4))
            w = p.index_select(0, block)
            if buf is None:
                p.index_copy_(0, block, w.mul_(a))
            else:
                v = buf.index_select(0, block)
                p.index_copy_(0, block, torch.addcmul(a * w, b, v))
                buf.index_copy_(0, block, torch.addcmul(v.mul_(d), c, w))
        self.row_step.index_fill_(0, rows, self.step)


class _DeviceLazyRows:
    """The capturable form of :class:`_LazyRows`: the same deferred steps with every number on
    the device and every shape fixed, so that no call reads a value back.

    ``steps`` counts the steps (a 0-d int64 tensor); row r is current up to ``row_step[r]``
    and lags steps − row_step[r] steps. ``suffix[ℓ]`` is the product of the last ℓ step
    matrices (suffix[0] = I), for ℓ ≤ max_lag: each step shifts it, suffix'[ℓ + 1] =
    A·suffix[ℓ]. A row is brought up to date with suffix[its lag] (rows already current keep
    their values exactly). No row lags more than max_lag steps: besides the rows it reads,
    each step brings a window of ⌈2R / max_lag⌉ rows up to date, round robin over the R rows,
    so every row is visited every max_lag / 2 steps."""

    def __init__(self, optimizer: "SparseSGD", param: Tensor):
        self.optimizer, self.param = optimizer, param
        rows = param.shape[0] if param.dim() else 1
        self.row_step = torch.zeros(rows, dtype=torch.int64, device=param.device)
        self.steps = torch.zeros((), dtype=torch.int64, device=param.device)
        lag = optimizer.max_lag
        self.suffix = torch.eye(2, dtype=torch.float64, device=param.device).repeat(lag + 1, 1, 1)
        window = min(rows, -(-2 * rows // lag))
        self.window = torch.arange(window, device=param.device)
        self.lagging = False  # whether any row may lag (host state: the same at every replay)

    @property
    def step(self) -> int:
        return int(self.steps)

    @torch.no_grad()
    def catch_up(self, rows=None) -> None:
        """Bring `rows` (an index tensor without repeats; None: every row) to the current
        step, without reading anything back."""
        if not self.lagging:
            return
        p = self.param
        rows = (torch.arange(p.shape[0], device=p.device) if rows is None
                else rows.to(device=p.device, dtype=torch.int64))
        # blocks of a fixed size (every row: a few temporaries of 64 MiB, not of the C × D)
        row_bytes = max(1, p[0].numel() * p.element_size())
        for block in rows.split(max(1, _DEVICE_BLOCK_BYTES // row_bytes)):
            self._catch_up_block(block)

    def _catch_up_block(self, rows: Tensor) -> None:
        p = self.param
        lag = (self.steps - self.row_step[rows]).clamp_(0, self.optimizer.max_lag)
        shape = (-1,) + (1,) * (p.dim() - 1)
        coef = self.suffix[lag].to(p.dtype)
        a, b, c, d = (coef[:, i, j].reshape(shape) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        behind = (lag > 0).reshape(shape)
        w = p.index_select(0, rows)
        buf = self.optimizer.state[p].get("momentum_buffer")
        if buf is None:
            p.index_copy_(0, rows, torch.where(behind, w * a, w))
        else:
            v = buf.index_select(0, rows)
            p.index_copy_(0, rows, torch.where(behind, torch.addcmul(a * w, b, v), w))
            buf.index_copy_(0, rows, torch.where(behind, torch.addcmul(v * d, c, w), v))
        self.row_step.index_copy_(0, rows, self.steps.expand(rows.shape[0]))

    def record(self, matrix: Tensor, rows: Tensor) -> None:
        """After a sparse step of matrix `matrix` (2 × 2) that updated `rows`: the suffix
        products shift, the step count grows, the rows are current, and the next window of
        rows is brought up to date."""
        # in place, like every buffer here: a captured graph replays on these addresses
        self.suffix[1:] = matrix @ self.suffix[:-1]
        self.steps += 1
        self.row_step.index_copy_(0, rows, self.steps.expand(rows.shape[0]))
        self.lagging = True
        num_rows = self.row_step.shape[0]
        self.catch_up((self.steps * self.window.shape[0] + self.window) % num_rows)

    def reset(self) -> None:
        """After a dense step: every row is current."""
        self.steps += 1
        self.row_step.copy_(self.steps.expand_as(self.row_step))
        self.lagging = False

    def load(self, steps: int) -> None:
        self.steps.fill_(steps)
        self.row_step.fill_(steps)
        self.lagging = False


class SparseSGD(torch.optim.Optimizer):
    """torch.optim.SGD (lr, momentum, dampening, weight_decay, nesterov, maximize) for heads
    with sparse row gradients: exactly the dense update, the rows without gradient updated
    lazily (see the module docstring). Use it for the head's parameters, and any optimizer for
    the backbone:

        head = UniTSFaceHead(512, 1_000_000, sample_rate=0.1, sparse_grad=True)
        opt_head = SparseSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    ``max_lag``: a row left without gradient that many steps is updated then (bounding the
    history of step matrices).

    ``capturable``: keep the lazy bookkeeping on the device (no host read-back in a step, the
    same kernels at every step), for a step captured in a CUDA graph. ``lr`` may then be a
    one-element tensor on the parameters' device, which a learning-rate scheduler updates in
    place (a float ``lr`` is baked into a captured graph). A sparse gradient must have sorted
    unique rows (one backward of one head per step; asserted on the device), and no row lags
    more than ``max_lag`` / 2 steps (a round-robin window of 2·C / max_lag rows is brought up
    to date at every step: about 2 / max_lag of a dense step's memory traffic, so a large
    ``max_lag`` — 1024, say — costs less there; the step-matrix table has max_lag + 1 rows)."""

    def __init__(self, params, lr, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 max_lag: int = 64, capturable: bool = False):
        if isinstance(lr, Tensor):
            if not capturable:
                raise ValueError("a tensor lr needs capturable=True (else the step reads it)")
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"lr must be a one-element floating tensor, got dtype "
                                 f"{lr.dtype} and shape {tuple(lr.shape)}")
            lr_value = float(lr)
        else:
            lr_value = lr
        for name, value in (("lr", lr_value), ("momentum", momentum), ("dampening", dampening),
                            ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        for name, value in (("maximize", maximize), ("capturable", capturable)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 2:
            raise ValueError(f"max_lag must be an integer ≥ 2, got {max_lag!r}")
        self.max_lag = max_lag
        self.capturable = capturable
        self._matrix_parts: dict[tuple, tuple[Tensor, Tensor]] = {}
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        lazy_rows = _DeviceLazyRows if self.capturable else _LazyRows
        for p in self.param_groups[-1]["params"]:
            p._unitsface_lazy = lazy_rows(self, p)

    def catch_up_all(self) -> None:
        """Bring every row of every parameter to the current step."""
        for group in self.param_groups:
            for p in group["params"]:
                lazy = p._unitsface_lazy
                lazy.catch_up(None)
                if not self.capturable:
                    lazy.base, lazy.history = lazy.step, []

    def state_dict(self):
        self.catch_up_all()
        state = super().state_dict()
        state["unitsface_steps"] = [p._unitsface_lazy.step for g in self.param_groups
                                    for p in g["params"]]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        steps = state_dict.pop("unitsface_steps", None)
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            lazy = p._unitsface_lazy
            step = steps[i] if steps is not None else 0
            if self.capturable:
                lazy.load(step)
            else:
                lazy.history, lazy.base = [], step
                lazy.row_step.fill_(lazy.base)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                     group["nesterov"])
            maximize = group.get("maximize", False)
            for p in group["params"]:
                if p.grad is None:
                    continue  # torch.optim.SGD leaves such a parameter alone: no step
                lazy = p._unitsface_lazy
                state = self.state[p]
                if p.grad.is_sparse and (hyper[1] == 0 or "momentum_buffer" in state):
                    grad = _coalesced(p.grad, self.capturable)
                    rows = grad.indices()[0]
                    lazy.catch_up(rows)
                    values = grad.values()
                    self._update(p, rows, -values if maximize else values, state, *hyper)
                    if self.capturable:
                        lazy.record(self._device_matrix(p, *hyper), rows)
                    else:
                        lazy.history.append(zero_grad_step(*hyper))
                        lazy.row_step.index_fill_(0, rows, lazy.step)
                        self._bound(lazy)
                else:
                    # a dense gradient, or the first momentum step (SGD starts every row's
                    # momentum from that step's gradient): every row, now
                    lazy.catch_up(None)
                    owned = p.grad.is_sparse  # then its dense copy is ours: updated in place
                    grad = p.grad.to_dense() if owned else p.grad
                    if maximize:
                        grad = grad.neg_() if owned else -grad
                    self._update_rows(p, None, grad, state, *hyper, owned=owned or maximize)
                    if self.capturable:
                        lazy.reset()
                        if p.grad.is_sparse:  # its constants reach the device now, before
                            self._device_matrix(p, *hyper)  # a capture of the sparse steps
                    else:
                        lazy.base, lazy.history = lazy.step + 1, []
                        lazy.row_step.fill_(lazy.base)
        return loss

    def _device_matrix(self, p, lr, mu, dampening, lam, nesterov) -> Tensor:
        """:func:`zero_grad_step` as a 2 × 2 float64 tensor on p's device, A = A₀ + η·A₁
        (affine in the learning rate η): A₀ and A₁ are copied to the device once per setting
        (outside any capture: the warm-up steps), η may be a tensor."""
        key = (mu, dampening, lam, nesterov, p.device)
        if key not in self._matrix_parts:
            a0, a1 = _affine_parts(mu, dampening, lam, nesterov)
            self._matrix_parts[key] = (torch.tensor(a0, dtype=torch.float64, device=p.device),
                                       torch.tensor(a1, dtype=torch.float64, device=p.device))
        a0, a1 = self._matrix_parts[key]
        return a0 + a1 * (lr.to(torch.float64) if isinstance(lr, Tensor) else lr)

    @staticmethod
    def _update(p, rows, grad, state, lr, mu, dampening, lam, nesterov) -> None:
        """torch.optim.SGD's update of `rows` of p with their gradient values (row j of `grad`
        for rows[j]), block by block: gathered once, updated in place, written back once."""
        start = 0
        for block in _row_blocks(rows, p):
            SparseSGD._update_rows(p, block, grad[start:start + len(block)], state, lr, mu,
                                   dampening, lam, nesterov)
            start += len(block)

    @staticmethod
    def _update_rows(p, rows, grad, state, lr, mu, dampening, lam, nesterov,
                     owned=False) -> None:
        """torch.optim.SGD's update of `rows` of p (every row when None) with `grad`.
        `owned`: grad is a temporary of this step, so it takes the weight decay in place
        and becomes the momentum buffer on the first step (torch.optim.SGD's values, bit for
        bit, without a second and third C × D tensor at a million classes)."""
        w = p if rows is None else p.index_select(0, rows)
        if lam != 0:
            g = grad.add_(w, alpha=lam) if owned else grad.add(w, alpha=lam)
        else:
            g = grad
        if mu != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                fresh = owned or lam != 0  # g is no caller's tensor: it can be the buffer
                v = state["momentum_buffer"] = g if fresh else g.clone()
            else:
                v = buf if rows is None else buf.index_select(0, rows)
                v.mul_(mu).add_(g, alpha=1 - dampening)
                if rows is not None:
                    buf.index_copy_(0, rows, v)
            g = g.add(v, alpha=mu) if nesterov else v
        if isinstance(lr, Tensor):  # capturable: read on the device
            w.addcmul_(g, lr.reshape(()), value=-1)
        else:
            w.add_(g, alpha=-lr)
        if rows is not None:
            p.index_copy_(0, rows, w)

    def _bound(self, lazy: _LazyRows) -> None:
        """Rows left behind max_lag steps are brought up to date; the history is cut."""
        if len(lazy.history) < self.max_lag:
            return
        cut = lazy.step - self.max_lag // 2
        lazy.catch_up((lazy.row_step < cut).nonzero().reshape(-1))
        del lazy.history[:cut - lazy.base]
        lazy.base = cut
