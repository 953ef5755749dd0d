// unitsface::bank_update_ on CUDA tensors. The rule and the determinism scheme:
// csrc/bank_update.h. One thread block per sorted row; losers exit at once, winners own
// distinct bank rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bank_update.h"
#include "cuda/block_reduce.cuh"

namespace unitsface {
namespace {

using cuda_epi::kThreads;

template <typename x_t, typename bank_t>
__global__ void __launch_bounds__(kThreads)
    bank_update_kernel(bank_t* __restrict__ bank, bool* __restrict__ valid,
                       const x_t* __restrict__ x, const int64_t* __restrict__ sorted,
                       const int64_t* __restrict__ order, int64_t B, int64_t C, int64_t D) {
  using acc_t = at::opmath_type<x_t>;  // float for fp32/bf16/fp16, double for fp64
  for (int64_t k = blockIdx.x; k < B; k += gridDim.x) {
    const int64_t c = sorted[k];
    // (both conditions are the same for every thread of the block: no divergent barrier)
    if (k + 1 < B && sorted[k + 1] == c) continue;  // a later row has the same label
    if (c < 0 || c >= C) continue;  // bank.py checked the range: a guard, not a report
    const x_t* xi = x + order[k] * D;
    acc_t sum_sq = 0;
    bool finite = true;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const acc_t v = static_cast<acc_t>(xi[j]);
      sum_sq += v * v;
      finite = finite && ::isfinite(v);
    }
    const acc_t div = bank_row_divisor<acc_t>(cuda_epi::block_sum_all<acc_t>(sum_sq));
    finite = __syncthreads_and(finite) != 0;
    bank_t* row = bank + c * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      row[j] = static_cast<bank_t>(static_cast<acc_t>(xi[j]) / div);
    }
    if (threadIdx.x == 0) valid[c] = finite;
  }
}

void bank_update_cuda(const at::Tensor& bank, const at::Tensor& bank_valid, const at::Tensor& x,
                      const at::Tensor& labels) {
  check_bank_update_args(bank, bank_valid, x, labels);
  TORCH_CHECK_VALUE(bank.is_cuda(), "bank_update_: the CUDA kernel got bank on ", bank.device());
  const c10::cuda::CUDAGuard guard(bank.device());
  const int64_t B = x.size(0), C = bank.size(0), D = bank.size(1);
  if (B == 0) return;

  // No check of the label range here: it would need a host synchronisation, and bank.py has
  // made it (the kernel skips a label outside [0, C)).
  // (no structured binding: lambdas may not capture one before C++20)
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(labels.contiguous(), /*stable=*/true, /*dim=*/0,
                                     /*descending=*/false);
  const at::Tensor xc = x.contiguous();

  const int64_t max_blocks = 65535;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(B, max_blocks)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bank_update_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "bank_update_cuda", [&] {
      using bank_t = scalar_t;
      bank_update_kernel<x_t, bank_t><<<grid, kThreads, 0, stream>>>(
          bank.data_ptr<bank_t>(), bank_valid.data_ptr<bool>(), xc.const_data_ptr<x_t>(),
          sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), B, C, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("bank_update_", &bank_update_cuda);
}

}  // namespace unitsface
