"""Smoke tests of the INSTALLED package (the wheel that users get), not of the source tree.

README: `make smoke` (part of `make test`) builds the wheel, installs it into a fresh virtual
environment outside the repository and runs this file from a directory without the sources
(tests_installed/smoke.sh); `make smoke-oldest` does the same against the oldest supported
torch. Not collected by the main `pytest tests` run.

Only the public API (docs/design.md §4) is used here, so that the package's internal modules can
move without touching these tests. CPU only: the triton backend runs under its interpreter.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

# The triton backend runs CPU tensors only under the interpreter, and triton reads the
# switch when the kernels are defined: set it before the package (and triton) is imported.
assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import unitsface_kernels  # noqa: E402
import unitsface_kernels.native  # noqa: E402
import unitsface_kernels.nn  # noqa: E402
from unitsface_kernels import (bank_update_, fused_margin_softmax_loss,  # noqa: E402
                               fused_unitsface_loss, fused_uss_loss, sample_classes)

B, C, D = 8, 10, 16
RTOL = 1e-4  # fp32, relative to the reference's norm (the whole tensor, not each element)
BACKENDS = ["native", "triton"]


def test_imported_from_the_installed_wheel():
    """`import unitsface_kernels` found the wheel in this environment's site-packages, not
    the source tree (smoke.sh passes the tree as UNITSFACE_SOURCE_TREE)."""
    paths = sysconfig.get_paths()
    site = {Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()}
    for entry in [Path(unitsface_kernels.__file__).parent, *map(Path, unitsface_kernels.__path__)]:
        entry = entry.resolve()
        assert entry.parent in site, f"unitsface_kernels imported from {entry}, not {site}"
        source = os.environ.get("UNITSFACE_SOURCE_TREE")
        if source:
            assert not entry.is_relative_to(Path(source).resolve()), (
                f"unitsface_kernels imported from the source tree {source}: {entry}")
    assert not Path.cwd().resolve().joinpath("unitsface_kernels").exists()


def test_compiled_extension_loads():
    assert unitsface_kernels.native.available()


def _leaves(case, grad_names):
    return {k: (v.detach().clone().requires_grad_(k in grad_names)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def _loss_and_grads(fn, case, grad_names, backend):
    leaves = _leaves(case, grad_names)
    loss = fn(leaves, backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    grads = torch.autograd.grad(loss, [leaves[k] for k in grad_names])
    return loss.detach(), dict(zip(grad_names, grads))


def _assert_agree(fn, case, grad_names, backend):
    loss, grads = _loss_and_grads(fn, case, grad_names, backend)
    ref_loss, ref_grads = _loss_and_grads(fn, case, grad_names, "reference")
    assert torch.isfinite(ref_loss)
    assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss)), (
        f"{backend} loss {float(loss)} vs reference {float(ref_loss)}")
    for name in grad_names:
        g, r = grads[name], ref_grads[name]
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.isfinite(r).all(), name
        err = float(torch.linalg.vector_norm(g - r))
        assert err <= RTOL * float(torch.linalg.vector_norm(r)), (
            f"{backend} d/d{name}: |diff| = {err:.3g}, |reference| = "
            f"{float(torch.linalg.vector_norm(r)):.3g}")


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    return dict(
        x=torch.randn(B, D, generator=g),
        labels=labels,
        centres=torch.randn(C, D, generator=g),
        bank=torch.nn.functional.normalize(torch.randn(C, D, generator=g)),
        bank_valid=torch.rand(C, generator=g) < 0.7,
        bias=torch.tensor([6.0]),
        index=sample_classes(labels, C, C // 2, generator=g),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_uss_memory_bank(backend):
    def fn(t, backend):
        return fused_uss_loss(t["x"], t["labels"], t["bias"], t["bank"], None, t["bank_valid"],
                              backend=backend)

    _assert_agree(fn, _case(), ("x", "bias"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uss_in_batch(backend):
    case = _case()
    case["labels"] = torch.arange(B) % 3  # several positives per row

    def fn(t, backend):
        return fused_uss_loss(t["x"], t["labels"], t["bias"], form="lse", backend=backend)

    _assert_agree(fn, case, ("x", "bias"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_softmax(backend):
    def fn(t, backend):
        return fused_margin_softmax_loss(t["x"], t["centres"], t["labels"], index=t["index"],
                                         backend=backend)

    _assert_agree(fn, _case(), ("x", "centres"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unitsface_objective(backend):
    def fn(t, backend):
        return fused_unitsface_loss(t["x"], t["labels"], t["centres"], t["bank"], t["bias"],
                                    bank_valid=t["bank_valid"], index=t["index"],
                                    backend=backend)

    _assert_agree(fn, _case(), ("x", "centres", "bias"), backend)


def test_bank_update():
    case = _case()
    bank, valid = torch.zeros(C, D), torch.zeros(C, dtype=torch.bool)
    bank_update_(bank, valid, case["x"], case["labels"])
    assert torch.equal(valid, torch.isin(torch.arange(C), case["labels"]))
    last = {int(y): i for i, y in enumerate(case["labels"])}
    for y, i in last.items():
        torch.testing.assert_close(bank[y], torch.nn.functional.normalize(case["x"][i], dim=0))


def test_head_forward_backward():
    torch.manual_seed(0)
    head = unitsface_kernels.nn.UniTSFaceHead(16, 10)
    for _ in range(2):  # the second step also reads the bank that the first one wrote
        x = torch.randn(B, 16, requires_grad=True)
        labels = torch.randint(0, 10, (B,))
        head.zero_grad()
        loss = head(x, labels)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [x.grad] + [p.grad for p in head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
