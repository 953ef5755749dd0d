"""The per-row statistics layouts of the op families' forward outputs (docs/design.md §3),
named once for Python: the eager per-op forms (:mod:`.reference`), the class-parallel
combination (:mod:`.distributed.statistics`) and the Triton host code index ``stats`` by
these names (``csrc/`` names the same rows in C++)."""

from __future__ import annotations

from enum import IntEnum


class UssStat(IntEnum):
    """Rows of the ``uss`` family's ``stats [4, B]``: the lse form's statistics (zeros for
    pairs). A_i = lse_{P_i} z⁺, B_i = lse_{N_i} z⁻, and the backward's factors σ(·) of each,
    zero where the official clamp is active or the set is empty."""

    A = 0
    SIGMA_A = 1
    B = 2
    SIGMA_B = 3


class UnitsfaceStat(IntEnum):
    """Rows of the ``unitsface`` family's ``stats [7, B]``: the softmax's lse_c z_ic, the USS
    part's four statistics (as :class:`UssStat`, zeros without a bank or in the pairs form),
    the target logit z_iy, and the USS part's per-row loss (before λ)."""

    LSE = 0
    USS_A = 1
    USS_SIGMA_A = 2
    USS_B = 3
    USS_SIGMA_B = 4
    TARGET = 5
    USS_LOSS = 6


USS_STATS = slice(UnitsfaceStat.USS_A, UnitsfaceStat.USS_SIGMA_B + 1)
"""The USS part's rows of the unitsface layout, in :class:`UssStat` order."""


class MarginRow(IntEnum):
    """Rows of the ``unitsface`` family's ``margin_rows [4, B]`` (accumulation dtype), the
    per-row inputs of the margin family (docs/design.md §1.5), given when the options ask for
    them (:attr:`~unitsface_kernels.options.UnitsfaceOptions.needs_margin_rows`): the angular
    margin a_i and the additive one d_i (``row_margins``: they replace m2, m3), and for
    ``curricular`` the hard-negative threshold cos(θ_iy + a_i) (no fallback) and t, the moving
    average of the target cosine (the same value in every row). The ops take no gradient
    through them (MagFace's ∂L/∂a_i is formed by the caller from the statistics)."""

    A = 0
    D = 1
    HARD = 2
    T = 3
