// unitsface::bank_update_ — CUDA kernel. Semantics and the determinism scheme are those
// of csrc/bank_update.cpp: a stable sort of the labels; the last row of each run of
// equal labels (the last occurrence in the batch) writes its class's bank row. One
// thread block per sorted row; losers exit at once, winners own distinct bank rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace unitsface {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: every warp is full

// Sum over the block, returned to every thread. The order of additions depends only on
// threadIdx, so the result is deterministic. smem holds >= 32 values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? smem[lane] : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // every read of smem is done before thread 0 overwrites smem[0]
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  v = smem[0];
  __syncthreads();  // smem may be reused by the caller's next iteration
  return v;
}

template <typename x_t, typename bank_t>
__global__ void __launch_bounds__(kThreads)
    bank_update_kernel(bank_t* __restrict__ bank, bool* __restrict__ valid,
                       const x_t* __restrict__ x, const int64_t* __restrict__ sorted,
                       const int64_t* __restrict__ order, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<x_t>;  // float for fp32/bf16/fp16, double for fp64
  __shared__ acc_t smem[32];
  for (int64_t k = blockIdx.x; k < B; k += gridDim.x) {
    const int64_t c = sorted[k];
    if (k + 1 < B && sorted[k + 1] == c) continue;  // a later row has the same label
    const x_t* xi = x + order[k] * D;
    acc_t sum_sq = 0;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const acc_t v = static_cast<acc_t>(xi[j]);
      sum_sq += v * v;
    }
    const acc_t den = norm_denominator<acc_t>(block_sum<acc_t>(sum_sq, smem));
    bank_t* row = bank + c * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      row[j] = static_cast<bank_t>(static_cast<acc_t>(xi[j]) / den);
    }
    if (threadIdx.x == 0) valid[c] = true;
  }
}

void bank_update_cuda(const at::Tensor& bank, const at::Tensor& bank_valid, const at::Tensor& x,
                      const at::Tensor& labels) {
  check_bank_update_args(bank, bank_valid, x, labels);
  TORCH_CHECK_VALUE(bank.is_cuda(), "bank_update_: the CUDA kernel got bank on ", bank.device());
  const c10::cuda::CUDAGuard guard(bank.device());
  const int64_t B = x.size(0), C = bank.size(0), D = bank.size(1);
  if (B == 0) return;

  const at::Tensor lab = labels.to(at::kLong).contiguous();
  // The range check needs the labels on the host: one small reduction and a sync. A
  // wrong label would otherwise write outside the bank (or need a device-side assert,
  // which kills the CUDA context).
  const at::Tensor bad = at::logical_or(lab < 0, lab >= C);
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero().select(1, 0).select(0, 0).item<int64_t>();
    TORCH_CHECK_VALUE(false, "bank_update_: labels must be in [0, C) = [0, ", C,
                      "), got labels[", i, "] = ", lab[i].item<int64_t>());
  }
  // (no structured binding: lambdas may not capture one before C++20, and older torch
  // builds extensions as C++17)
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false);
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
          sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), B, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("bank_update_", &bank_update_cuda);
}

}  // namespace unitsface
