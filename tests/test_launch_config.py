"""Tile configurations of the Triton kernels (unitsface_kernels.triton.common): the shapes the
kernels rely on (powers of two, bk | dc | dp) and the environment tuning knobs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from unitsface_kernels.triton.common import LaunchConfig, fused_config, launch_config  # noqa: E402

DEVICES = [torch.device("cuda"), torch.device("cpu")]  # configs only: no GPU is touched
KNOBS = ["UNITSFACE_TRITON_TILES", "UNITSFACE_TRITON_FWD_TILES", "UNITSFACE_TRITON_BWD_TILES"]


@pytest.fixture(autouse=True)
def no_knobs(monkeypatch):
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [1, 40, 70, 128, 130, 512, 1000, 2048])
def test_defaults_fit_the_kernels(device, dtype, d):
    configs = [launch_config(d, device, dtype)] + [
        fused_config(d, device, dtype, backward=b) for b in (False, True)]
    for cfg in configs:
        assert cfg.dp >= d and _power_of_two(cfg.dp)
        assert all(_power_of_two(v) for v in (cfg.block_m, cfg.block_n, cfg.dc, cfg.num_warps))
        assert cfg.dp % cfg.dc == 0
    for cfg in configs[1:]:  # the fused kernels' K loop
        assert _power_of_two(cfg.bk) and cfg.dc % cfg.bk == 0
    fwd, bwd = configs[1:]
    if device.type == "cpu":  # the interpreter recomputes the backward's cosines bit for bit
        assert (fwd.block_m, fwd.block_n, fwd.bk) == (bwd.block_m, bwd.block_n, bwd.bk)


def test_override_parses_and_clips(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setenv("UNITSFACE_TRITON_BWD_TILES", "64,64,1024,8,2")
    assert fused_config(512, cuda, torch.bfloat16, backward=True) == \
        LaunchConfig(64, 64, 512, 512, 8, 2, 64)  # dc clipped to dp; bk = 128 bytes
    monkeypatch.setenv("UNITSFACE_TRITON_FWD_TILES", "128,64,512,8,3,32")
    assert fused_config(512, cuda, torch.bfloat16, backward=False).bk == 32
    monkeypatch.setenv("UNITSFACE_TRITON_TILES", "64,16,256,4,1")
    assert launch_config(512, cuda, torch.bfloat16) == LaunchConfig(64, 16, 512, 256, 4, 1, 0)
    # the knobs are for GPUs: the interpreter keeps its own tiles
    assert fused_config(512, torch.device("cpu"), torch.bfloat16, backward=True).block_n == 32


@pytest.mark.parametrize("value,match", [
    ("64,64", "expected 'block_m,block_n,dc,num_warps,num_stages"),
    ("64,64,256,8,2,32,1", "too many fields"),
    ("64,a,256,8,2", "integers"),
    ("64,48,256,8,2", "block_n=48 is not a power of two"),
    ("64,64,96,8,2", "dc=96 is not a power of two"),
    ("64,64,256,8,0", "num_stages=0"),
])
def test_bad_override_names_the_knob(monkeypatch, value, match):
    monkeypatch.setenv("UNITSFACE_TRITON_BWD_TILES", value)
    with pytest.raises(ValueError, match="UNITSFACE_TRITON_BWD_TILES") as err:
        fused_config(512, torch.device("cuda"), torch.bfloat16, backward=True)
    assert match in str(err.value)
