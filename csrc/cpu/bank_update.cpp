// unitsface::bank_update_ on CPU tensors. The rule and the determinism scheme:
// csrc/bank_update.h; the argument checks: csrc/bank_update.cpp.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bank_update.h"

namespace unitsface {

namespace {

template <typename x_t, typename bank_t>
void bank_update_cpu_kernel(bank_t* bank, bool* valid, const x_t* x, const int64_t* sorted,
                            const int64_t* order, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<x_t>;  // float for fp32/bf16/fp16, double for fp64
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = sorted[k];
      if (k + 1 < B && sorted[k + 1] == c) continue;  // a later row has the same label
      const x_t* xi = x + order[k] * D;
      acc_t sum_sq = 0;
      bool finite = true;
      for (int64_t j = 0; j < D; ++j) {
        const acc_t v = static_cast<acc_t>(xi[j]);
        sum_sq += v * v;
        finite = finite && std::isfinite(v);
      }
      const acc_t div = bank_row_divisor<acc_t>(sum_sq);
      bank_t* row = bank + c * D;
      for (int64_t j = 0; j < D; ++j) {
        row[j] = static_cast<bank_t>(static_cast<acc_t>(xi[j]) / div);
      }
      valid[c] = finite;
    }
  });
}

void bank_update_cpu(const at::Tensor& bank, const at::Tensor& bank_valid, const at::Tensor& x,
                     const at::Tensor& labels) {
  check_bank_update_args(bank, bank_valid, x, labels);
  TORCH_CHECK_VALUE(bank.device().is_cpu(), "bank_update_: the CPU kernel got bank on ",
                    bank.device());
  const int64_t B = x.size(0), C = bank.size(0), D = bank.size(1);
  if (B == 0) return;

  const at::Tensor lab = labels.contiguous();
  const int64_t* lp = lab.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {  // free on the CPU: the labels are in host memory
    TORCH_CHECK_VALUE(lp[i] >= 0 && lp[i] < C, "bank_update_: labels must be in [0, C) = [0, ",
                      C, "), got labels[", i, "] = ", lp[i]);
  }
  // (no structured binding: lambdas may not capture one before C++20)
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor xc = x.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bank_update_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "bank_update_cpu", [&] {
      using bank_t = scalar_t;
      bank_update_cpu_kernel<x_t, bank_t>(bank.data_ptr<bank_t>(), bank_valid.data_ptr<bool>(),
                                          xc.const_data_ptr<x_t>(), sorted.const_data_ptr<int64_t>(),
                                          order.const_data_ptr<int64_t>(), B, D);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CPU, m) {
  m.impl("bank_update_", &bank_update_cpu);
}

}  // namespace unitsface
