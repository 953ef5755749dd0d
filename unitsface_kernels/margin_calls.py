"""A call of the ``unitsface`` ops with a margin of the family (docs/design.md §1.5): what a
public function, a module and the class-parallel code do around the op when they are given a
:class:`~unitsface_kernels.margins.Margin`.

One step, in order:

1. the target cosines c_iy from a gather of the B·K target rows (:func:`margins.target_cosines`;
   summed over the ranks in class-parallel training);
2. the per-row inputs and the moving statistics after this step (:func:`margins.row_inputs`),
   handed to the op as ``margin_rows`` (:func:`margins.margin_rows`);
3. the op's forward: per-row losses and statistics;
4. what the op does not form: MagFace's gradient into the norm through a_i,
   ∂L_i/∂a_i = s·(p_iy − 1)·∂f/∂a with p_iy = exp(z_iy − lse_i) from the op's statistics, added
   as s·(p_iy − 1)·(f(c_y; a) − f(c_y; a).detach()) (value 0, that gradient; p and c_y
   detached), and its regulariser λ_g·g(‖x_i‖);
5. the caller's :class:`~unitsface_kernels.margins.MarginState` updated in place (training
   only), once the op has run: a call that raises changes no state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import contract, margins, reference
from . import validation as check
from .layouts import UnitsfaceStat
from .margins import Margin, MarginState, RowInputs
from .options import UnitsfaceOptions

STATEFUL = ("curricular", "adaface")
"""The kinds with moving statistics: they need a :class:`MarginState`."""
DRAWN = ("elastic_arc", "elastic_cos")
"""The kinds whose margins are drawn per row (``margin_drawn``, ``generator``)."""
SOFTMAX_DEFAULTS = dict(margin_arc=0.0, margin_cos=0.4, arcface_grad="exact", easy_margin=False)
"""The public functions' CosFace/ArcFace keywords, which a ``margin=`` replaces."""


@dataclass
class MarginCall:
    """The checked margin arguments of one call (:func:`checked_call`)."""

    margin: Margin
    state: Optional[MarginState]
    training: bool = True
    drawn: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None


def refuse_softmax_settings(margin, **given) -> None:
    """With ``margin=`` the CosFace/ArcFace keywords must keep their defaults (the margin
    carries its own m2, m3, conventions): a ValueError names those that do not."""
    if margin is None:
        return
    changed = [name for name, value in given.items() if value != SOFTMAX_DEFAULTS[name]]
    if changed:
        raise ValueError(f"{', '.join(changed)} cannot be combined with margin=: the Margin "
                         f"carries the margin's settings (leave {', '.join(changed)} at the "
                         "default)")


def checked_call(margin, state, training, drawn, generator, x: Tensor,
                 state_name: str = "margin_state",
                 drawn_name: str = "margin_drawn") -> Optional[MarginCall]:
    """The margin arguments of a call for embeddings x [B, D], checked (docs/design.md §5);
    None without a margin."""
    if margin is None:
        if state is not None or drawn is not None:
            raise ValueError(f"{state_name} and {drawn_name} need margin= (a "
                             "unitsface_kernels.margins.Margin)")
        return None
    margin = margins.checked(margin)
    training = check.flag(training, "margin_training")
    if state is None and margin.kind in STATEFUL:
        raise ValueError(f"{state_name} is required with margin kind {margin.kind!r} (its moving "
                         "statistics): pass a unitsface_kernels.margins.MarginState()")
    if state is not None:
        check_state(state, x.device, state_name)
    if drawn is not None:
        if margin.kind not in DRAWN:
            raise ValueError(f"{drawn_name} applies to the ElasticFace kinds {DRAWN}, not "
                             f"{margin.kind!r}")
        drawn = check.tensor(drawn, drawn_name)
        if drawn.dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"{drawn_name} must be a floating tensor, got {drawn.dtype}")
        if tuple(drawn.shape) != (x.shape[0],):
            raise ValueError(f"{drawn_name} must have shape ({x.shape[0]},) (one margin per row "
                             f"of the batch), got {tuple(drawn.shape)}")
        if drawn.device != x.device:
            raise ValueError(f"{drawn_name} is on {drawn.device} but x is on {x.device}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return MarginCall(margin, state, training, drawn, generator)


def check_state(state, device: torch.device, name: str = "margin_state") -> None:
    """A MarginState of one-element floating tensors on `device` (updated in place)."""
    if not isinstance(state, MarginState):
        raise TypeError(f"{name} must be a unitsface_kernels.margins.MarginState, got "
                        f"{type(state).__name__}")
    for stat in margins.STATISTICS:
        t = check.tensor(getattr(state, stat), f"{name}.{stat}")
        if t.dtype not in check.FLOAT_DTYPES or t.numel() != 1:
            raise ValueError(f"{name}.{stat} must be a one-element floating tensor, got "
                             f"dtype {t.dtype} and shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}.{stat} is on {t.device} but x is on {device}: the moving "
                             "statistics live on the batch's device")


def sub_centres_of(margin) -> int:
    """K of a call's ``margin=`` (1 without one), the margin checked."""
    return 1 if margin is None else margins.checked(margin).sub_centers


def check_sub_centres(centres: Tensor, k: int, name: str = "centres") -> int:
    """The number of classes C of `centres` holding K = k rows per class."""
    if centres.shape[0] % k:
        raise ValueError(f"{name} has {centres.shape[0]} rows, not a multiple of "
                         f"sub_centers={k} (K rows per class: row c·K + k)")
    return centres.shape[0] // k


# ----------------------------------------------------------------------------- the steps

_NO_STATE = MarginState()  # read by no kind without moving statistics


def per_row_inputs(o: UnitsfaceOptions, call: MarginCall, x: Tensor,
                   c_target: Tensor) -> tuple[RowInputs, Optional[Tensor]]:
    """(the per-row inputs with the state after this step, ``margin_rows`` for the op), from
    the whole batch x (class-parallel: the gathered one, so every rank gets the same)."""
    rows = margins.row_inputs(call.margin, x, c_target,
                              call.state if call.state is not None else _NO_STATE,
                              training=call.training, drawn=call.drawn,
                              generator=call.generator)
    return rows, margins.margin_rows(o, rows, c_target)


def finish_rows(o: UnitsfaceOptions, loss_rows: Tensor, stats: Tensor, c_target: Tensor,
                rows: RowInputs, share: int = 1) -> Tensor:
    """The op's per-row losses with what it does not form (step 4 of the module docstring):
    MagFace's ∂L_i/∂a_i and its regulariser. `stats`: the op's (global) statistics.
    ``share``: the number of ranks that add these same terms to the same gathered rows
    (class-parallel): each adds their whole value and 1/share of their gradient, so that the
    gathered rows' gradients, summed over the ranks, count them once."""
    extra = rows.extra.to(loss_rows.dtype)  # zeros but for MagFace
    if rows.a.requires_grad or rows.d.requires_grad:
        p = torch.exp(stats[UnitsfaceStat.TARGET] - stats[UnitsfaceStat.LSE]).detach()
        f = margins.target_of(o, c_target.detach().to(rows.a.dtype), rows.a, rows.d)
        extra = extra + o.scale * (p.to(f.dtype) - 1.0) * (f - f.detach())
    if share > 1:
        extra = extra.detach() + (extra - extra.detach()) / share
    return loss_rows + extra


@torch.no_grad()
def commit_state(call: MarginCall, after: MarginState) -> None:
    """The caller's moving statistics ← `after` in place (training, stateful kinds only)."""
    if not call.training or call.state is None or call.margin.kind not in STATEFUL:
        return
    for stat in margins.STATISTICS:
        target = getattr(call.state, stat)
        target.copy_(getattr(after, stat).reshape(target.shape))


def no_autocast(device: torch.device):
    """Autocast off on `device` (the per-row inputs and the reference's GEMMs stay in the
    accumulation dtype); nothing to switch on a device without autocast (meta)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def op_rows(o: UnitsfaceOptions, x, labels, centres, bank, bias, *, bank_valid, index,
            sparse_grad: bool, backend: str, margin_rows=None) -> tuple[Tensor, Tensor]:
    """(per-row losses, statistics) of the ``unitsface`` op on a resolved backend."""
    row_grads = contract.wants_row_grads("unitsface", backend, x,
                                         uss_pairs=bank is not None and not o.uss_lse)
    out = contract.forward_op("unitsface", backend)(x, centres, bank, labels, index, bank_valid,
                                                    bias, margin_rows, o.pack(), row_grads,
                                                    sparse_grad)
    return out[0], out[1]


def run_margin_unitsface(o: UnitsfaceOptions, call: MarginCall, x, labels, centres, bank, bias,
                         *, bank_valid, index, sparse_grad: bool, backend: str,
                         reduction: str = "mean") -> Tensor:
    """The unitsface family with a margin of the family, from checked inputs and the settings
    `o` that already carry the margin's fields (:func:`margins.margin_options`)."""
    with no_autocast(x.device):
        c_target = margins.target_cosines(o, x, centres, labels)
        rows, margin_rows = per_row_inputs(o, call, x, c_target)
        loss_rows, stats = op_rows(o, x, labels, centres, bank, bias, bank_valid=bank_valid,
                                   index=index, sparse_grad=sparse_grad, backend=backend,
                                   margin_rows=margin_rows)
        loss_rows = finish_rows(o, loss_rows.to(reference.compute_dtype(x.dtype)), stats,
                                c_target, rows)
    commit_state(call, rows.state)
    return reference.reduce_rows(loss_rows, reduction)
