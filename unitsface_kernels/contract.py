"""The op contract (docs/design.md §3): every custom op of the package is declared here, once
per op family, and its torch.library schema, fake kernel and autograd rule are built from that
declaration. The backends only provide kernels:

* ``triton``: the functions of :mod:`unitsface_kernels.triton`, registered below;
* ``native``: C++/CUDA kernels registered by the extension (``csrc/``, TORCH_LIBRARY_IMPL) for
  the schemas defined here;
* ``reference``: the eager per-op functions of :mod:`unitsface_kernels.reference` (plain
  functions with the same arguments; used by the class-parallel code).

Op family ``uss`` (docs/design.md §1.1), ``unitsface::uss_{fwd,bwd}_{triton,native}``::

    fwd(x, ref, labels, ref_labels, ref_valid?, bias, float[] options)
        -> (rows [B], stats [4, B], nx [B], nr [N])
    bwd(grad_rows, x, ref, labels, ref_labels, ref_valid?, bias, stats, nx, nr,
        float[] options, bool[3] needs) -> (dx, dref, dbias)

  stats = (A, σ(A)·[A unclamped], B, σ(B)·[B unclamped]) of the lse form (zeros for pairs),
  the rows named by :class:`~unitsface_kernels.layouts.UssStat`.
  In in-batch mode the same tensor is passed as x and ref: autograd adds ∂x and ∂ref.

Op family ``unitsface`` (§1.2–§1.3), ``unitsface::unitsface_{fwd,bwd}_{triton,native}``::

    fwd(x, centres, bank?, labels, index?, bank_valid?, bias?, margin_rows?, float[] options,
        bool row_grads=False, bool sparse_grad=False)
        -> (rows [B], stats [7, B], nx [B], nw [S·K], nb [S | 0], dx_rows [B, D | 0],
            db_rows [B | 0], exps [B, S | 0], exp_rows [G + 1, B | 0])
    bwd(grad_rows, x, centres, bank?, labels, index?, bank_valid?, bias?, margin_rows?, stats,
        nx, nw, nb, dx_rows, db_rows, exps, exp_rows, float[] options, bool[3] needs)
        -> (dx, dcentres [S·K, D], dbias)

  The margin softmax over the classes S (the partial-FC index, or all), plus λ·USS on the bank
  rows of the same classes when a bank is given. stats = (lse_c z_ic, A, σA, B, σB, z_iy,
  USS loss), the rows named by :class:`~unitsface_kernels.layouts.UnitsfaceStat`. A label
  that matches no column (−1, or a class of another shard) has no target there: z_iy = 0.
  The margin family (docs/design.md §1.5) is carried by the options' margin fields and, when
  they read it (``options.needs_margin_rows``), by ``margin_rows [4, B]`` in the accumulation
  dtype, the per-row inputs named by :class:`~unitsface_kernels.layouts.MarginRow` (no
  gradient flows into it through the op). With K = ``options.sub_centers`` > 1, centres holds
  K rows per class (row c·K + k; the bank, bank_valid and a per-class bias keep one per
  class), nw and dcentres hold the K rows of each class of S (row j·K + k for class S_j), and
  the class cosine is the maximum over its K rows, its gradient reaching the first arg-max row.
  With an index the backward's dcentres holds the rows of the classes of S only; the autograd
  rule scatters it into a dense gradient, or passes it on as a sparse COO gradient of those
  rows when ``sparse_grad`` is set (it is read by the autograd rule only).
  ``row_grads`` (see :data:`ROW_GRADS`): the forward also forms per-row gradients
  dx_rows [B, D] and db_rows [B] in its sweep, and the backward then uses them instead of
  recomputing. The native backend (CPU and CUDA tensors) forms the whole
  ∂L_i/∂x_i and ∂L_i/∂b (scalar b), valid for the statistics of this very call only (never
  class-parallel, whose statistics are global); the triton backend forms those of the USS
  part in the pairs form, λ·∂USS_i/∂x_i and λ·∂USS_i/∂b, which need no statistic (zeros
  where the call has no such part), so that its backward never reads the bank again.
  ``exps``, ``exp_rows`` (see :data:`SAVED_EXPS`): where the options' budget allows it
  (``UnitsfaceOptions.keeps_exps``) the forward keeps the W tiles' exponentials
  e'_ij = exp(z_ij − m_ig) in x's dtype, m_ig the maximum of z over row i of the g-th group
  of columns (G groups of equal width, a power of two, the backend's), with exp_rows =
  (m_i0 … m_i,G−1, the row's raw target cosine (0 where its target is not among the
  columns)); its backward takes the W cosines from them instead of recomputing the
  products. Empty otherwise.

Reference rows (ref, centres, bank) may come in another 16/32-bit float dtype than x (fp32
master weights with half embeddings): the kernels read them rounded to x's dtype, and their
gradients come in their own dtype.

``options`` is the family's settings object, :meth:`~unitsface_kernels.options.UssOptions.pack`
/ :meth:`~unitsface_kernels.options.UnitsfaceOptions.pack`, built once by the caller;
``needs`` says which of the three differentiable inputs want a gradient. Every output is in the
accumulation dtype (float64 for
float64 inputs, else float32) except the gradients, which come in their inputs' dtypes; a
gradient that is not needed (or a missing bias) comes back as an empty tensor (custom ops
return no None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .layouts import UnitsfaceStat, UssStat
from .options import UnitsfaceOptions

_LIB = torch.library.Library("unitsface", "DEF")

FUSED_BACKENDS = ("triton", "native")

ROW_GRADS = {("unitsface", "native", "cpu"), ("unitsface", "native", "cuda")}
"""(family, backend, device type) whose forward forms the per-row gradients (row_grads): the
native backend's objective on CPU and CUDA tensors (6 GEMM-equivalents per step instead of 7:
the backward recomputes only the W dots, for ∂W)."""

SAVED_EXPS = {"triton"}
"""The backends whose unitsface forward keeps the W tiles' exponentials where the options'
budget allows (``exps``, ``exp_rows``; the others return them empty)."""

USS_PAIRS_ROW_GRADS = {("unitsface", "triton")}
"""(family, backend) whose forward forms the per-row gradients of the pairs-form USS part
(row_grads), asked for when the call has a bank and that form."""


@dataclass(frozen=True)
class Family:
    """One op family: its tensor inputs, the three differentiable ones among them, its
    forward outputs after ``rows`` (all saved for the backward), and the output sizes.
    ``indexed``: the name of the input that selects the reference rows (partial FC's index):
    the backward returns the gradient of those rows only, row j for the row index[j], and the
    autograd rule scatters it into a dense gradient, or hands it on as a sparse one when the
    forward's ``sparse_grad`` asks for it."""

    name: str
    inputs: tuple[tuple[str, str], ...]      # (schema type, name)
    grads: tuple[str, str, str]              # x, the reference rows with a gradient, bias
    saved: tuple[str, ...]                   # forward outputs after rows
    fwd_extra: tuple[str, ...]               # schema of the arguments after `options`
    sizes: Callable[..., tuple]              # (backend, inputs..., *extra) -> sizes of `saved`
    indexed: str | None = None
    in_x_dtype: tuple[str, ...] = ()         # the saved outputs in x's dtype (else the
    #                                          accumulation dtype)

    @property
    def grad_positions(self) -> tuple[int, ...]:
        names = [n for _, n in self.inputs]
        return tuple(names.index(g) for g in self.grads)

    def schemas(self, backend: str) -> tuple[str, str]:
        args = ", ".join(f"{t} {n}" for t, n in self.inputs)
        saved = ", ".join(f"Tensor {n}" for n in self.saved)
        extra = "".join(f", {e}" for e in self.fwd_extra)
        fwd = (f"{self.name}_fwd_{backend}({args}, float[] options{extra}) -> "
               f"(Tensor rows, {saved})")
        bwd = (f"{self.name}_bwd_{backend}(Tensor grad_rows, {args}, {saved}, float[] options, "
               f"bool[3] needs) -> (Tensor, Tensor, Tensor)")
        return fwd, bwd


def _uss_sizes(backend, x, ref, *_):
    b = x.shape[0]
    return (len(UssStat), b), (b,), (ref.shape[0],)


def sub_centers(options) -> int:
    """K of a packed unitsface settings object."""
    return UnitsfaceOptions.unpack(options).k


def _unitsface_sizes(backend, x, centres, bank, labels, index, bank_valid, bias, margin_rows,
                     options, row_grads=False, sparse_grad=False):
    b = x.shape[0]
    o = UnitsfaceOptions.unpack(options)
    s = centres.shape[0] // o.k if index is None else index.shape[0]
    exps = ((0,), (0,))
    if backend in SAVED_EXPS and o.keeps_exps(b, s, x.element_size()):
        from .triton.fused import exp_groups  # (importing triton is slow: on first use)
        exps = ((b, s), (exp_groups(o, x, s) + 1, b))
    return ((len(UnitsfaceStat), b), (b,), (s * o.k,), (s if bank is not None else 0,),
            (b, x.shape[1]) if row_grads else (0,), (b,) if row_grads else (0,)) + exps


FAMILIES = {
    "uss": Family(
        "uss",
        (("Tensor", "x"), ("Tensor", "ref"), ("Tensor", "labels"), ("Tensor", "ref_labels"),
         ("Tensor?", "ref_valid"), ("Tensor", "bias")),
        ("x", "ref", "bias"), ("stats", "nx", "nr"), (), _uss_sizes),
    "unitsface": Family(
        "unitsface",
        (("Tensor", "x"), ("Tensor", "centres"), ("Tensor?", "bank"), ("Tensor", "labels"),
         ("Tensor?", "index"), ("Tensor?", "bank_valid"), ("Tensor?", "bias"),
         ("Tensor?", "margin_rows")),
        ("x", "centres", "bias"),
        ("stats", "nx", "nw", "nb", "dx_rows", "db_rows", "exps", "exp_rows"),
        ("bool row_grads=False", "bool sparse_grad=False"), _unitsface_sizes,
        indexed="index", in_x_dtype=("exps",)),
}


def op_name(family: str, backend: str, direction: str) -> str:
    return f"{family}_{direction}_{backend}"


def forward_op(family: str, backend: str):
    """The forward of `family` on `backend`: a custom op (fused backends) or the eager
    per-op function of the reference (same arguments, same outputs)."""
    if backend == "reference":
        return getattr(reference, f"{family}_fwd")
    return getattr(torch.ops.unitsface, op_name(family, backend, "fwd"))


def backward_op(family: str, backend: str):
    if backend == "reference":
        return getattr(reference, f"{family}_bwd")
    return getattr(torch.ops.unitsface, op_name(family, backend, "bwd"))


def wants_row_grads(family: str, backend: str, x: torch.Tensor,
                    uss_pairs: bool = False) -> bool:
    """Whether a call should ask the forward for the per-row gradients: the backend forms
    them (`uss_pairs`: the call has a USS part in the pairs form), and x will take a
    gradient."""
    forms = ((family, backend, x.device.type) in ROW_GRADS
             or (uss_pairs and (family, backend) in USS_PAIRS_ROW_GRADS))
    return forms and torch.is_grad_enabled() and x.requires_grad


# ----------------------------------------------------------------------------- fakes

def _fake_forward(family: Family, backend: str):
    def fake(*args):
        x = args[0]
        acc = reference.compute_dtype(x.dtype)
        sizes = family.sizes(backend, *args)
        return (x.new_empty(x.shape[0], dtype=acc),) + tuple(
            x.new_empty(size, dtype=x.dtype if name in family.in_x_dtype else acc)
            for name, size in zip(family.saved, sizes))
    return fake


def _fake_backward(family: Family):
    positions = family.grad_positions
    names = [n for _, n in family.inputs]

    def fake(grad_rows, *args):
        needs = args[-1]
        index = args[names.index(family.indexed)] if family.indexed else None
        out = []
        for k, (pos, need) in enumerate(zip(positions, needs)):
            t = args[pos]
            if not need or t is None:
                out.append(args[0].new_empty(0))
            elif k == 1 and index is not None:  # the rows of the index (K per class)
                out.append(t.new_empty(index.shape[0] * sub_centers(args[-2]), *t.shape[1:]))
            else:
                out.append(torch.empty_like(t))
        return tuple(out)
    return fake


def expand_rows(grad: torch.Tensor, index, shape, sparse: bool, k: int = 1) -> torch.Tensor:
    """The gradient of the rows of the classes index[j] (rows j·k … j·k + k − 1 of `grad`) as
    the gradient of the whole tensor of `shape`: a sparse COO tensor of those rows
    (``sparse``), else dense with zero rows elsewhere."""
    if index is None:
        return grad
    index = reference.class_row_ids(index, k)
    if sparse:
        return torch.sparse_coo_tensor(index[None], grad, tuple(shape), is_coalesced=True)
    return grad.new_zeros(tuple(shape)).index_copy_(0, index, grad)


# ----------------------------------------------------------------------------- autograd

def _autograd(family: Family, bwd_op):
    n_in = len(family.inputs)
    positions = family.grad_positions
    names = [n for _, n in family.inputs]
    indexed = names.index(family.indexed) if family.indexed else None
    bias = names.index("bias")

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        saved = list(inputs[:n_in])
        if saved[bias] is not None:
            # b by value (1 or N numbers): a module's data-dependent threshold start may write
            # b in place before this call's backward (two forwards, then one backward)
            saved[bias] = saved[bias].detach().clone()
        ctx.save_for_backward(*saved, *output[1:])
        ctx.options = inputs[n_in]
        ctx.sparse_grad = bool(inputs[-1]) if family.indexed else False
        ctx.k = sub_centers(ctx.options) if family.indexed else 1

    def backward(ctx, grad_rows, *_):
        saved = ctx.saved_tensors
        needs = [ctx.needs_input_grad[p] and saved[p] is not None for p in positions]
        grads = list(bwd_op(grad_rows.contiguous(), *saved, ctx.options, needs))
        if indexed is not None and needs[1]:
            grads[1] = expand_rows(grads[1], saved[indexed], saved[positions[1]].shape,
                                   ctx.sparse_grad, ctx.k)
        out = [None] * len(ctx.needs_input_grad)
        for p, g, need in zip(positions, grads, needs):
            out[p] = g if need else None
        return tuple(out)

    return backward, setup_context


# ----------------------------------------------------------------------------- registration

def _triton_kernels(family: str):
    """The Triton host functions of a family (imported on first use: importing triton is
    slow, and it must not happen before conftest sets TRITON_INTERPRET)."""
    if family == "uss":
        from .triton import uss_loss as module
        return module.uss_forward, module.uss_backward
    from .triton import fused as module
    return module.fused_forward, module.fused_backward


def _triton_impls(family: str):
    def fwd(*args):
        return _triton_kernels(family)[0](*args)

    def bwd(*args):
        return _triton_kernels(family)[1](*args)
    return fwd, bwd


def _register() -> None:
    for family in FAMILIES.values():
        for backend in FUSED_BACKENDS:
            fwd_schema, bwd_schema = family.schemas(backend)
            _LIB.define(fwd_schema)
            _LIB.define(bwd_schema)
            fwd_name = f"unitsface::{op_name(family.name, backend, 'fwd')}"
            bwd_name = f"unitsface::{op_name(family.name, backend, 'bwd')}"
            if backend == "triton":  # native kernels come from the extension (csrc/)
                fwd_impl, bwd_impl = _triton_impls(family.name)
                _LIB.impl(op_name(family.name, backend, "fwd"), fwd_impl,
                          "CompositeExplicitAutograd")
                _LIB.impl(op_name(family.name, backend, "bwd"), bwd_impl,
                          "CompositeExplicitAutograd")
            torch.library.register_fake(fwd_name, _fake_forward(family, backend), lib=_LIB)
            torch.library.register_fake(bwd_name, _fake_backward(family), lib=_LIB)
            backward, setup = _autograd(family, backward_op(family.name, backend))
            torch.library.register_autograd(fwd_name, backward, setup_context=setup, lib=_LIB)

    # The memory bank (native only; ops.bank_update_ falls back to the reference):
    # bank[labels[i]] ← the stored row of x[i] (docs/design.md §1.1), bank_valid ← x[i] finite.
    _LIB.define("bank_update_(Tensor(a!) bank, Tensor(b!) bank_valid, Tensor x, Tensor labels) "
                "-> ()")
    torch.library.register_fake("unitsface::bank_update_", lambda *args: None, lib=_LIB)


_register()
