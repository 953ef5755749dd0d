// The chunk and split-K plan of the unitsface family's CUDA sweep (csrc/cuda/unitsface_sweep.cu),
// host-only C++ with no CUDA dependency: the CPU build compiles it too, and exposes it as
// unitsface_kernels._C.cuda_plan (csrc/ops.cpp) for the CPU tests and the cost model
// (benchmarks/native_cost.py).
//
// The classes of S are swept in chunks of c columns. Per chunk, cuBLAS writes the B × c raw
// dots of each part (W; the bank) into fp32 buffers, one epilogue kernel reads them and writes
// B × c gradient tiles in the GEMM dtype, and cuBLAS consumes the tiles: the chunk is sized so
// that these buffers (bytes_per_elem bytes per (row, column), all parts together) fit in L2
// (docs/design.md §2).
//
// Each chunk is cut into ns slices of kw columns. The epilogue gives one warp to each (row,
// slice) — a warp holds kw ≤ kSliceMax columns in registers, so it knows the slice's maximum
// before it writes the slice's tile — and slice k of every chunk forms its own sweep ("split"
// k), with its own running maxima and its own ∂x accumulator [k]: the ∂x products of a chunk
// are one split-K batched GEMM (ns × ⌈B/128⌉·⌈D/128⌉ output tiles instead of ⌈B/128⌉·⌈D/128⌉),
// and the splits are merged once, after the sweep, in a fixed order (deterministic).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"  // forced_chunk_elems

namespace unitsface {
namespace cuda_plan {

constexpr int64_t kSliceMin = 128;   // one 4-wide vector per lane of a warp
constexpr int64_t kSliceMax = 1024;  // eight vectors per lane (csrc/cuda/unitsface_sweep.cu's kVecs)
constexpr int64_t kTargetSplits = 8; // ∂x split-K: 8 × 16 output tiles at B = D = 512
// The L2 size assumed when the device does not say (an H100 / H200 has 50 MiB).
constexpr int64_t kDefaultL2Bytes = int64_t(50) << 20;
// Never plan chunks narrower than this many elements per buffer (tiny L2 reports, tests).
constexpr int64_t kMinBudgetElems = int64_t(1) << 16;

struct SweepPlan {
  int64_t c = 0;         // columns per chunk: a multiple of kw (the last chunk may hold fewer)
  int64_t kw = 0;        // columns per slice: kSliceMin·2^p ≤ kSliceMax
  int64_t ns = 0;        // slices per (full) chunk: c / kw
  int64_t n_chunks = 0;  // ⌈S / c⌉
  int64_t ns_used = 0;   // splits that hold columns: min(ns, ⌈S / kw⌉)
  int64_t budget = 0;    // the elements per chunk buffer it was planned for (plan_chunks)
};

// Bytes per (row, column) element of a chunk: each part's fp32 (acc_bytes) dots and its
// gradient tile in x's dtype (x_bytes), and with ∂W (the backward) the column's row of
// Q = tileᵀ·x̂ (D values of acc_bytes) spread over the B rows.
inline int64_t bytes_per_elem(int64_t B, int64_t D, int64_t parts, int64_t acc_bytes,
                              int64_t x_bytes, bool with_q) {
  const int64_t rows = std::max<int64_t>(B, 1);
  const int64_t q = with_q ? (D * acc_bytes + rows - 1) / rows : 0;
  return parts * (acc_bytes + x_bytes) + q;
}

// Elements (rows × columns) per chunk: UNITSFACE_NATIVE_CHUNK_ELEMS when set (tests force many
// chunks with it), else what fits in L2 at bytes_per_elem bytes per (row, column).
inline int64_t budget_elems(int64_t l2_bytes, int64_t bytes_per_elem) {
  if (const int64_t forced = forced_chunk_elems(); forced > 0) return forced;
  if (l2_bytes <= 0) l2_bytes = kDefaultL2Bytes;
  return std::max<int64_t>(kMinBudgetElems, l2_bytes / std::max<int64_t>(bytes_per_elem, 1));
}

// The plan for B rows and S columns with `budget` elements per chunk buffer: c ≈ budget / B
// columns (at least one slice, at most S rounded up to a slice), cut into about
// kTargetSplits slices of a power-of-two width in [kSliceMin, kSliceMax].
inline SweepPlan plan_sweep(int64_t B, int64_t S, int64_t budget) {
  SweepPlan p;
  if (B <= 0 || S <= 0) {
    p.kw = kSliceMin;
    p.c = kSliceMin;
    p.ns = 1;
    return p;  // no chunk
  }
  const int64_t want = std::max<int64_t>(1, std::min(budget / B, S));
  const int64_t per_slice = (want + kTargetSplits - 1) / kTargetSplits;
  p.kw = kSliceMin;
  while (p.kw < kSliceMax && p.kw < per_slice) p.kw *= 2;
  p.ns = std::max<int64_t>(1, want / p.kw);
  p.c = p.ns * p.kw;
  p.n_chunks = (S + p.c - 1) / p.c;
  p.ns_used = std::min(p.ns, (S + p.kw - 1) / p.kw);
  return p;
}

// The sweep's plan for B rows, S columns and D features: `parts` parts of acc_bytes dots and
// x_bytes tiles per (row, column) (with_q: and the backward's Q rows), sized for an L2 of
// l2_bytes (the driver, csrc/cuda/unitsface_sweep.cu, and _C.cuda_plan for the cost model).
inline SweepPlan plan_chunks(int64_t B, int64_t S, int64_t D, int64_t parts, int64_t acc_bytes,
                             int64_t x_bytes, bool with_q, int64_t l2_bytes) {
  const int64_t budget =
      budget_elems(l2_bytes, bytes_per_elem(B, D, parts, acc_bytes, x_bytes, with_q));
  SweepPlan p = plan_sweep(B, S, budget);
  p.budget = budget;
  return p;
}

}  // namespace cuda_plan
}  // namespace unitsface
