"""The USS family (docs/design.md §1.1: a memory bank, in-batch pairs, per-reference
thresholds, the class-centre heads) on the fused engine (fused.py): the uss_fwd / uss_bwd ops
of unitsface_kernels.contract. Column j is reference row j with label l_j = ref_labels[j]; the
kernels run bank programs alone (the objective's λ·USS part with λ = 1), so every USS formula
has the one home it has in the objective (uss_terms.py, fused._uss_part).

    forward:  _cos_kernel over all columns: per (column tile, row) partials, merged by
              finish.merge_partials (pairs: Σ softplus; lse: the merged A, B and their terms).
    backward: per chunk of columns, _cos_kernel (g tiles; Σ_j g per row for a scalar ∂b,
              Σ_i go·g per column for ∂b_j, Σ_i go·g·cos per column for ∂ref's projection)
              → _dw_kernel (∂ref = gᵀ·x̂' with its projection) → _dx_kernel (∂x = g·R̂,
              split-K), then ∂x's projection from the product (finish.tangent_grad).

In-batch mode passes the batch as both x and ref (contract): row i is column i and is not
its own positive; ∂x is the row side and ∂ref the column side, and autograd adds them.
"""

from __future__ import annotations

import torch

from ..layouts import UssStat
from ..options import UssOptions
from .config import check_dtype, plan
from .finish import N_FP, go_unit_rows, merge_partials, tangent_grad
from .fused import (CP_GSUM, N_CP, Sweep, cos_launch, dw_launch, dx_launch, kernel_scalars,
                    margin_flags)
from .loads import out_dtype
from .norms import row_norms

__all__ = ["uss_forward", "uss_backward"]


def _uss_sweep(x, ref, labels, ref_labels, ref_valid, bias, o: UssOptions, nx, nr) -> Sweep:
    b = bias.detach().reshape(-1).to(nx.dtype).contiguous()
    return Sweep(
        x=x, nx=nx, labels=labels, w=ref, nw=nr, bank=ref, nb=nr, idx=ref_labels,
        lab=ref_labels, valid=ref_valid if ref_valid is not None else ref_labels, bias=b,
        rt=nx, columns=ref.shape[0], scalars=kernel_scalars(o),
        flags=dict(HAS_INDEX=False, HAS_LABELS=True, IN_BATCH=o.in_batch, USS_LSE=o.lse,
                   USS_CLAMP=o.clamp, HAS_VALID=ref_valid is not None,
                   VECTOR_BIAS=b.numel() > 1, **margin_flags(None), **Sweep.operand_flags(x)))


def uss_forward(x, ref, labels, ref_labels, ref_valid, bias, options):
    """Per-row loss L_i and the statistics the backward needs (the uss_fwd op of
    unitsface_kernels.contract; options: UssOptions.pack()).

    Returns (rows, stats, nx, nr): rows in fp32 (fp64 for fp64 inputs); stats is [4, B] =
    (A, σ(A)·[A unclamped], B, σ(B)·[B unclamped]) for lse and zeros for pairs."""
    o = UssOptions.unpack(options)
    bsz, d = x.shape
    check_dtype(x.dtype, x.device)
    nx = row_norms(x)
    nr = row_norms(ref, None, x.dtype)  # also in-batch: the op's outputs must not alias
    s = _uss_sweep(x, ref, labels, ref_labels, ref_valid, bias, o, nx, nr)
    p = plan(bsz, s.columns, d, x.dtype, x.device, 0)
    fpart = torch.empty(p.class_tiles, N_FP, bsz, dtype=nx.dtype, device=x.device)
    for col0, n_cols in p.chunks():
        cos_launch(p, s, nx, nx, nx, fpart, nx, nx, nx, col0, n_cols, backward=False,
                   w_progs=False, bank_progs=True)
    stats = torch.empty(len(UssStat), bsz, dtype=nx.dtype, device=x.device)
    rows = merge_partials(fpart, p.class_tiles, stats, uss=True, lse_form=o.lse,
                          clamp=o.clamp, scale=o.scale)
    return rows, stats, nx, nr


def uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, stats, nx, nr, options,
                 needs):
    """(∂x, ∂ref, ∂bias) for the per-row upstream gradient ``grad_rows`` (the uss_bwd op of
    unitsface_kernels.contract); empty where not needed. Reference rows marked invalid get a
    zero gradient (they are read as zeros)."""
    o = UssOptions.unpack(options)
    need_dx, need_dr, need_db = (bool(v) for v in needs)
    bsz, d = x.shape
    s = _uss_sweep(x, ref, labels, ref_labels, ref_valid, bias, o, nx, nr)
    n = s.columns
    vector_bias = s.flags["VECTOR_BIAS"]
    acc, dev = nx.dtype, x.device
    go = grad_rows.to(acc).contiguous()
    store_g = need_dx or need_dr
    row_gb = need_db and not vector_bias
    col_gb = need_db and vector_bias
    p = plan(bsz, n, d, x.dtype, dev, int(store_g))
    g = torch.empty(bsz, p.chunk if store_g else 0, dtype=out_dtype(x.dtype), device=dev)
    gsum = torch.empty(p.class_tiles if row_gb else 0, bsz, dtype=acc, device=dev)
    cpart = torch.empty(p.row_blocks if (need_dr or col_gb) else 0, N_CP, n, dtype=acc,
                        device=dev)
    part = torch.empty(p.splits if need_dx else 0, bsz, d, dtype=acc, device=dev)
    dr = torch.empty(n if need_dr else 0, d, dtype=out_dtype(ref.dtype), device=dev)
    xg = go_unit_rows(x, go, nx, o.eps) if need_dr else x
    if store_g or need_db:
        for k, (col0, n_cols) in enumerate(p.chunks()):
            cos_launch(p, s, go, stats, stats, gsum, cpart, g, g, col0, n_cols, backward=True,
                       w_progs=False, bank_progs=True, store_gb=store_g, row_gb=row_gb,
                       col_gb=col_gb, col_hb=need_dr)
            if need_dr:
                dw_launch(p, s, g, xg, ref, nr, ref_valid is not None, cpart, dr, col0, n_cols)
            if need_dx:
                dx_launch(p, s, g, g, part, col0, n_cols, k > 0, has_w=False, has_bank=True)
    dx = dref = dbias = None
    if need_dx:
        dx = tangent_grad(part, x, nx, o.eps, go=go, dtype=x.dtype)
    if need_dr:
        dref = dr.to(ref.dtype)
    if need_db:
        db = (cpart[:, CP_GSUM].sum(dim=0) if vector_bias
              else (go * gsum.sum(dim=0)).sum()) / -o.scale
        dbias = db.reshape(bias.shape).to(bias.dtype)
    # (a new empty tensor each: the outputs of a custom op must not alias each other)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dref, dbias))
