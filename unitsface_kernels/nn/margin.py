"""The margin of a class-centre head (:class:`~unitsface_kernels.nn.PartialFC`,
:class:`~unitsface_kernels.nn.UniTSFaceHead`): a :class:`~unitsface_kernels.margins.Margin`
of the family (docs/design.md §1.5) given as ``margin=``, its moving statistics as buffers,
and its K sub-centres per class in ``weight``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import margin_calls, margins, reference
from ..margin_calls import MarginCall


class MarginHead(nn.Module):
    """A head whose margin may be one of the family (``margin``; None: CosFace/ArcFace from
    the head's own margin_arc, margin_cos, arcface_grad, easy_margin, which must then keep
    their defaults).

    The moving statistics of CurricularFace and AdaFace are persistent buffers (in
    ``state_dict``): ``margin_t`` (t, starting at 0), ``margin_norm_mean`` and
    ``margin_norm_std`` (starting at 20 and 100, the authors' values). A training-mode call
    updates them in place; eval mode reads them frozen — the authors' code updates them in
    eval mode too (its heads have no train/eval switch), which ``train()`` reproduces.
    ElasticFace draws its margins from ``margin_generator`` (a torch.Generator on the batch's
    device, seeded alike on every rank in class-parallel training), or from torch's default
    generator when it is None."""

    margin: Optional[margins.Margin]

    def _init_margin(self, margin, given: dict, generator=None) -> int:
        """Check and hold ``margin`` (the head's CosFace/ArcFace keywords `given` must keep
        their defaults beside it) and its ElasticFace ``generator``, register its statistics;
        returns K, the sub-centres per class."""
        margin_calls.refuse_softmax_settings(margin, **given)
        self.margin = None if margin is None else margins.checked(margin)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError("margin_generator must be a torch.Generator, got "
                                f"{type(generator).__name__}")
            if self.margin is None or self.margin.kind not in margin_calls.DRAWN:
                raise ValueError("margin_generator applies to the ElasticFace kinds "
                                 f"{margin_calls.DRAWN} (their drawn margins), not to "
                                 f"{None if self.margin is None else self.margin.kind!r}")
        self.margin_generator = generator
        if self.margin is not None and self.margin.kind in margin_calls.STATEFUL:
            start = margins.MarginState()
            for name in margins.STATISTICS:
                self.register_buffer(f"margin_{name}", getattr(start, name))
        return 1 if self.margin is None else self.margin.sub_centers

    @property
    def sub_centers(self) -> int:
        """K, the rows of ``weight`` per class (row c·K + k)."""
        return 1 if self.margin is None else self.margin.sub_centers

    def margin_state(self) -> Optional[margins.MarginState]:
        """The moving statistics (the buffers themselves), None for a kind without them."""
        if self.margin is None or self.margin.kind not in margin_calls.STATEFUL:
            return None
        return margins.MarginState(*(self._buffers[f"margin_{name}"]
                                     for name in margins.STATISTICS))

    def margin_call(self) -> Optional[MarginCall]:
        """What a call hands to the margin flow: statistics updated in training mode only."""
        if self.margin is None:
            return None
        return MarginCall(self.margin, self.margin_state(), training=self.training,
                          generator=self.margin_generator)

    def weight_rows(self, index: Optional[Tensor]) -> Optional[Tensor]:
        """The rows of ``weight`` of the classes of a partial-FC index (all K of each)."""
        return None if index is None else reference.class_row_ids(index, self.sub_centers)

    def margin_repr(self) -> str:
        return "" if self.margin is None else f", margin={self.margin!r}"

