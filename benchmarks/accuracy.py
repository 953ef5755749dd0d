"""Worst accuracy of each fused backend against the float64 reference, per dtype (docs/design.md §7:
fp32 loss rel. err ≤ 1e-5 and gradient cosine ≥ 0.9999; bf16 ≤ 1e-2 and ≥ 0.999).

    python -m benchmarks.accuracy            # GPU: B=512, N=20011, D=512; CPU: small shapes

Every loss family and variant (USS pairs/lse × memory bank/in-batch/class centres, CosFace
and ArcFace with and without partial FC, the UniTSFace objective in both USS forms) is run on
fresh random inputs; the table gives, per backend and dtype, the worst loss relative error and
the lowest gradient cosine over all of them (gradients of x, the centres and b).
"""

from __future__ import annotations

import argparse

import torch

from unitsface_kernels import (fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss,
                               native, sample_classes)


def _cases(b, n, d, device, dtype):
    """(name, loss function of the leaf tensors, leaves) for every variant."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    labels = torch.randint(0, n, (b,), generator=g).to(device)
    bank_valid = (torch.rand(n, generator=g) < 0.8).to(device)
    index = sample_classes(labels, n, max(1, n // 3))
    out = []
    for form in ("pairs", "lse"):
        out.append((f"uss-{form}-bank", lambda L, f=form: fused_uss_loss(
            L["x"], labels, L["b"], L["bank"], ref_valid=bank_valid, form=f, backend=L["be"]),
            dict(x=t(b, d), b=torch.tensor([12.0], device=device), bank=t(n, d)), ("x", "b")))
        out.append((f"uss-{form}-inbatch", lambda L, f=form: fused_uss_loss(
            L["x"], labels % 7, L["b"], form=f, backend=L["be"]),
            dict(x=t(b, d), b=torch.tensor([12.0], device=device)), ("x", "b")))
        out.append((f"uss-{form}-centres", lambda L, f=form: fused_uss_loss(
            L["x"], labels, L["b"], L["w"], form=f, backend=L["be"]),
            dict(x=t(b, d), b=torch.full((n,), 12.0, device=device), w=t(n, d)),
            ("x", "b", "w")))
        out.append((f"unitsface-{form}", lambda L, f=form: fused_unitsface_loss(
            L["x"], labels, L["w"], L["bank"], L["b"], bank_valid=bank_valid, index=index,
            uss_form=f, backend=L["be"]),
            dict(x=t(b, d), w=t(n, d), bank=t(n, d), b=torch.tensor([12.0], device=device)),
            ("x", "w", "b")))
    for name, m2, m3 in (("cosface", 0.0, 0.4), ("arcface", 0.5, 0.0)):
        for idx in (None, index):
            out.append((f"{name}{'-pfc' if idx is not None else ''}",
                        lambda L, m2=m2, m3=m3, idx=idx: fused_margin_softmax_loss(
                            L["x"], L["w"], labels, margin_arc=m2, margin_cos=m3, index=idx,
                            backend=L["be"]),
                        dict(x=t(b, d), w=t(n, d)), ("x", "w")))
    return out


def _run(fn, leaves, grads, backend, cast=None):
    leaves = {k: (v.to(cast) if cast is not None else v).detach().clone()
              .requires_grad_(k in grads) for k, v in leaves.items()}
    loss = fn(dict(leaves, be=backend))
    return loss.detach(), torch.autograd.grad(loss, [leaves[k] for k in grads])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    b, n, d = (512, 20011, 512) if gpu else (37, 301, 70)
    backends = (["triton"] if gpu else []) + (["native"] if native.has_family("unitsface") else [])
    if not gpu:
        import os

        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            backends.insert(0, "triton")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] + ([] if gpu else [torch.float64])
    print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'}, B={b} N={n} D={d}")
    print(f"{'backend':>8} {'dtype':>9} {'worst loss rel err':>19} {'min grad cosine':>16}  worst")
    for backend in backends:
        for dtype in dtypes:
            if backend == "native" and not gpu and dtype in (torch.float16, torch.bfloat16):
                continue
            worst_err, worst_cos, where = 0.0, 1.0, ""
            for name, fn, leaves, grads in _cases(b, n, d, device, dtype):
                loss, g = _run(fn, leaves, grads, backend)
                ref_loss, ref_g = _run(fn, leaves, grads, "reference", torch.float64)
                err = float((loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30))
                for a, r in zip(g, ref_g):
                    a, r = a.double().flatten(), r.double().flatten()
                    if r.norm() > 0:
                        cos = float(a @ r / (a.norm() * r.norm()))
                        if cos < worst_cos:
                            worst_cos, where = cos, name
                worst_err = max(worst_err, err)
            print(f"{backend:>8} {str(dtype).replace('torch.', ''):>9} {worst_err:19.3e} "
                  f"{worst_cos:16.8f}  {where}", flush=True)


if __name__ == "__main__":
    main()
