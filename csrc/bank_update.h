// unitsface::bank_update_ (schema: unitsface_kernels/contract.py): the memory bank's update
// (docs/design.md §1.4), the same rule as reference.bank_rows / reference.bank_update_:
//
//   bank[y_i]       = r_i = x_i / ||x_i|| where ||x_i|| ≥ 1e-5, else x_i itself, computed in
//                     float32 (float64 for float64 x) and stored in the bank's dtype: then
//                     F.normalize(r_i) = F.normalize(x_i), which is all the losses read (the
//                     official code's raw-feature bank reads a tiny x_i as x_i / 1e-5 too)
//   bank_valid[y_i] = every entry of x_i is finite (a non-finite feature is stored but takes
//                     no part in any loss)
//
// When a label repeats, its LAST occurrence wins, deterministically: both devices stable-sort
// the labels, after which the last element of each run of equal labels is the winner (it has
// the largest row index); every winner writes a distinct bank row, so the rows are written in
// parallel without races, and nothing depends on thread scheduling.
//
// unitsface_kernels/bank.py checks every argument, the label range included (with one host
// synchronisation), before it calls the op. The kernels check again what costs nothing (shapes,
// dtypes, devices; the label range on the CPU) and, on CUDA, skip a label outside [0, C)
// instead of synchronising to report it (a defensive guard against a direct call).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>

#include "common.h"

namespace unitsface {

// The bank's own threshold (reference.bank_rows): fixed, whatever eps the losses normalise with.
constexpr double kBankNormEps = 1e-5;

// The checks of the arguments that read no tensor data (csrc/bank_update.cpp).
void check_bank_update_args(const at::Tensor& bank, const at::Tensor& bank_valid,
                            const at::Tensor& x, const at::Tensor& labels);

// What the entries of an embedding x are divided by in its bank row, given sum_sq = Σ x_k² in
// the compute dtype acc_t: ||x|| at or above the eps, else 1 (x is stored as it is).
template <typename acc_t>
UF_HOST_DEVICE acc_t bank_row_divisor(acc_t sum_sq) {
  const acc_t norm = std::sqrt(sum_sq);
  // a NaN norm fails the test: x is stored as it is (and marked invalid: not finite)
  return norm >= static_cast<acc_t>(kBankNormEps) ? norm : acc_t(1);
}

}  // namespace unitsface
