// unitsface::uss_{fwd,bwd}_native on CUDA tensors: the drivers of csrc/uss_sweep.cpp (cuBLAS GEMMs
// through at::mm on chunk views; 16-bit inputs give fp32 dots through mm's out_dtype) with the
// epilogue kernels below, one thread block per row of a chunk running the row code of
// csrc/cuda/uss_rows.cuh.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "uss.h"
#include "cuda/uss_rows.cuh"

namespace unitsface {
namespace {

using cuda_epi::kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads) uss_fwd_kernel(UssRows<T> a) {
  cuda_rows::uss_fwd_row<T>(a, blockIdx.x);
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) uss_bwd_kernel(UssRows<T> a, G* grads) {
  const int64_t i = blockIdx.x;
  T v[2] = {T(0), T(0)};  // Σ g·cos, Σ g
  cuda_rows::uss_bwd_row<T, G>(a, grads, i, v);
  cuda_epi::block_sum<T, 2>(v);
  if (threadIdx.x == 0) {
    a.hs[i] += v[0];
    a.hs[a.B + i] += v[1];
  }
}

template <typename T, typename G>
void launch_bwd(const UssRows<T>& a, const at::Tensor& grads, cudaStream_t stream) {
  uss_bwd_kernel<T, G><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
      a, grads.data_ptr<G>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void epilogue_typed(const UssChunk& ck) {
  const UssRows<T> a = rows_of<T>(ck);
  if (a.B == 0 || a.c == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (ck.pass == Pass::kForward) {
    uss_fwd_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  switch (ck.grads.scalar_type()) {
    case at::kHalf:
      return launch_bwd<T, at::Half>(a, ck.grads, stream);
    case at::kBFloat16:
      return launch_bwd<T, at::BFloat16>(a, ck.grads, stream);
    default:
      return launch_bwd<T, T>(a, ck.grads, stream);
  }
}

void uss_epilogue_cuda(const UssChunk& ck) {
  TORCH_CHECK(ck.pass != Pass::kForwardGrads, "uss (CUDA): no fused forward on CUDA");
  TORCH_CHECK(ck.dots.size(0) <= std::numeric_limits<int32_t>::max(),
              "uss (CUDA): at most 2^31 - 1 rows");
  if (ck.dots.scalar_type() == at::kDouble) {
    epilogue_typed<double>(ck);
  } else {
    epilogue_typed<float>(ck);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("uss_fwd_native", &uss_fwd_op<&uss_epilogue_cuda>);
  m.impl("uss_bwd_native", &uss_bwd_op<&uss_epilogue_cuda>);
}

}  // namespace unitsface
