// The per-row statistics that the forward ops return and the backward ops read back (the op
// contract, unitsface_kernels/contract.py): the rows of a [rows, B] tensor in the accumulation
// dtype. Named here once for every C++ and CUDA source.
#pragma once

#include <cstdint>

namespace unitsface {
namespace stats {

// The USS family's stats[4, B], and the USS block of the unitsface family's (its rows kUss +
// these): the lse form's statistics (docs/design.md §1.1); zeros for "pairs".
constexpr int64_t kA = 0;       // A = lse over P of z⁺ (−inf for an empty P)
constexpr int64_t kSigmaA = 1;  // σ(A)·[A not clamped by the official clamp] (0 for an empty P)
constexpr int64_t kB = 2;       // B = lse over N of z⁻
constexpr int64_t kSigmaB = 3;  // σ(B)·[B not clamped]
constexpr int64_t kUssRows = 4;

// The unitsface family's stats[7, B].
constexpr int64_t kLse = 0;           // lse_c z_ic over the classes of S
constexpr int64_t kUss = 1;           // the USS block: rows kUss + kA .. kUss + kSigmaB
constexpr int64_t kTargetLogit = 5;   // z_iy (0 when y_i has no column)
constexpr int64_t kUssLoss = 6;       // the row's USS loss (0 without a bank)
constexpr int64_t kUnitsfaceRows = 7;
static_assert(kUss + kUssRows == kTargetLogit, "the USS block sits between lse and z_iy");

}  // namespace stats

// The unitsface family's margin_rows[4, B] (the margin family's per-row inputs,
// docs/design.md §1.5; unitsface_kernels/layouts.py MarginRow).
namespace margin_row {
constexpr int64_t kA = 0;     // angular margin a_i (row_margins)
constexpr int64_t kD = 1;     // additive margin d_i (row_margins)
constexpr int64_t kHard = 2;  // curricular: the hard-negative threshold cos(θ_iy + a_i)
constexpr int64_t kT = 3;     // curricular: t, the moving average of the target cosine
constexpr int64_t kRows = 4;
}  // namespace margin_row
}  // namespace unitsface
