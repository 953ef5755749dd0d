"""Shared pytest setup.

* Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET=1 must be set
  before triton is imported (importing torch does not import triton).
* Tests marked ``cuda`` need a GPU and are skipped without one.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Devices to parametrise tests over: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Parametrises a test over "cpu" and "cuda" (the latter marked `cuda`)."""
    return request.param


@pytest.fixture
def budget(request, monkeypatch):
    """Elements per chunk buffer of the native backend (UNITSFACE_NATIVE_CHUNK_ELEMS, read by
    csrc/chunking.h and csrc/cuda_plan.h), an indirect parameter: a string forces small chunks,
    None leaves the default (the CPU's budget, the CUDA sweep's L2-sized plan)."""
    if request.param is None:
        monkeypatch.delenv("UNITSFACE_NATIVE_CHUNK_ELEMS", raising=False)
    else:
        monkeypatch.setenv("UNITSFACE_NATIVE_CHUNK_ELEMS", request.param)
    return request.param


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
