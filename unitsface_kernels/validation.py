"""Input checks of DESIGN.md §5: every bad input is a ValueError/TypeError naming the argument,
raised before any kernel runs. Checks that read tensor values (label ranges, index order) are
skipped while torch.compile traces, where they would force a graph break."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def choice(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def real_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def embeddings(x, name: str = "x") -> torch.Tensor:
    """A (B × D) floating matrix with B ≥ 1 and D ≥ 1, made contiguous."""
    x = _tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows × embedding size), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch needs at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0")
    return x.contiguous()


def reference_rows(ref, x: torch.Tensor, name: str) -> torch.Tensor:
    """A (N × D) matrix matching x in D, dtype and device, with N ≥ 1, made contiguous."""
    ref = _tensor(ref, name)
    if ref.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows × embedding size), got shape {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if ref.shape[1] != x.shape[1]:
        raise ValueError(f"{name} has embedding size {ref.shape[1]} but x has {x.shape[1]}")
    if ref.device != x.device:
        raise ValueError(f"{name} is on {ref.device} but x is on {x.device}")
    if ref.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {ref.dtype} but x has {x.dtype}; cast one of them")
    return ref.contiguous()


def labels(lab, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """A length-n integer vector on `device`, returned as contiguous int64."""
    lab = _tensor(lab, name)
    if lab.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {lab.dtype}")
    if lab.dim() != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(lab.shape)}")
    if lab.device != device:
        raise ValueError(f"{name} is on {lab.device} but x is on {device}")
    return lab.to(torch.int64).contiguous()


def label_range(lab: torch.Tensor, num: int, name: str, what: str) -> None:
    """Every label in [0, num): `what` says what num counts."""
    if _tracing() or lab.numel() == 0:
        return
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num:
        raise ValueError(f"{name} must lie in [0, {num}) ({what}); found values in [{lo}, {hi}]")


def mask(valid, n: int, device: torch.device, name: str) -> torch.Tensor:
    valid = _tensor(valid, name)
    if valid.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {valid.dtype}")
    if valid.dim() != 1 or valid.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"{name} is on {valid.device} but x is on {device}")
    return valid.contiguous()


def bias(b, n: int, x: torch.Tensor, name: str = "bias") -> torch.Tensor:
    """The unified threshold: a number, a one-element tensor, or one value per reference row."""
    if isinstance(b, numbers.Real) and not isinstance(b, bool):
        return torch.tensor(float(b), dtype=torch.float32, device=x.device)
    b = _tensor(b, name)
    if b.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {b.dtype}")
    if b.numel() not in (1, n):
        raise ValueError(f"{name} must hold 1 value (a unified threshold) or {n} (one per "
                         f"reference row), got shape {tuple(b.shape)}")
    if b.device != x.device:
        raise ValueError(f"{name} is on {b.device} but x is on {x.device}")
    return b


def class_index(index, num_classes: int, lab: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A partial-FC index: sorted, unique classes in [0, num_classes) holding every label."""
    index = _tensor(index, "index")
    if index.dtype not in INT_DTYPES:
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] == 0:
        raise ValueError(f"index must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but x is on {device}")
    index = index.to(torch.int64).contiguous()
    if _tracing():
        return index
    steps = index[1:] - index[:-1]
    if bool((steps == 0).any()):
        raise ValueError("index has duplicated classes: it must be sorted and unique")
    if bool((steps < 0).any()):
        raise ValueError("index is not sorted: it must be sorted (ascending) and unique")
    label_range(index, num_classes, "index", "class ids of the centres")
    at = torch.searchsorted(index, lab).clamp_max(index.shape[0] - 1)
    missing = lab[index[at] != lab]
    if missing.numel():
        raise ValueError(f"labels {missing.unique()[:8].tolist()} are missing from index: "
                         "partial FC must sample every class present in the batch")
    return index
