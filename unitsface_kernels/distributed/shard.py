"""Shard geometry: which classes a rank owns (insightface's split)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..sampling import sample_classes


def split_classes(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """insightface's split of C classes over w ranks: (start, stop) of rank r, where
    num_local = C // w + (r < C % w) and start = C // w · r + min(r, C % w)."""
    if num_classes < world_size:
        raise ValueError(f"cannot shard {num_classes} classes over {world_size} ranks: every "
                         "rank needs at least one class")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    base, rem = divmod(num_classes, world_size)
    start = base * rank + min(rank, rem)
    return start, start + base + (rank < rem)


@dataclass(frozen=True)
class ClassShard:
    """This rank's slice [start, stop) of num_classes classes, in process group ``group``
    (None: the default group). The shards of the group's ranks must tile [0, num_classes) in
    rank order (checked at every call); :meth:`from_group` builds insightface's split."""

    start: int
    stop: int
    num_classes: int
    group: Any = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("start", "stop", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ClassShard.{name} must be an int, got {type(v).__name__}")
        if not 0 <= self.start < self.stop <= self.num_classes:
            raise ValueError(f"ClassShard needs 0 ≤ start < stop ≤ num_classes, got "
                             f"[{self.start}, {self.stop}) of {self.num_classes}")

    @classmethod
    def from_group(cls, num_classes: int, group=None) -> "ClassShard":
        """The shard of the calling rank under insightface's split of ``group``."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ClassShard.from_group needs an initialised torch.distributed "
                               "process group (torch.distributed.init_process_group)")
        start, stop = split_classes(int(num_classes), dist.get_world_size(group),
                                    dist.get_rank(group))
        return cls(start, stop, int(num_classes), group)

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def local_labels(self, labels: Tensor) -> Tensor:
        """Global class ids → rows of this shard (y − start), −1 for classes of other shards."""
        inside = (labels >= self.start) & (labels < self.stop)
        return torch.where(inside, labels - self.start, torch.full_like(labels, -1))

    def sample(self, labels: Tensor, num_sample: int, generator=None) -> Tensor:
        """Partial FC on this shard: a sorted int64 index of LOCAL class ids holding every
        class of ``labels`` (the gathered, global batch) that falls in the shard, plus uniformly
        random others, max(num_sample, #positives) in all (capped at num_local)."""
        local = self.local_labels(labels.reshape(-1).to(torch.int64))
        return sample_classes(local[local >= 0], self.num_local, max(1, int(num_sample)),
                              generator)


def require(shard) -> ClassShard:
    """`shard` as given to a class-parallel function: a ClassShard, with torch.distributed up."""
    if not isinstance(shard, ClassShard):
        raise TypeError(f"shard must be a unitsface_kernels.distributed.ClassShard, got "
                        f"{type(shard).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard= needs an initialised torch.distributed process group")
    return shard
