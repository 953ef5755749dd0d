// unitsface::uss_fwd / uss_bwd on CUDA tensors: the drivers of csrc/uss.cpp (cuBLAS GEMMs
// through at::mm on chunk views; 16-bit inputs give fp32 dots through mm's out_dtype) with
// the epilogue kernels below. One thread block per row of a chunk; the per-element maths is
// csrc/epilogue.h, shared with the CPU loops of csrc/uss.cpp.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "epilogue.h"
#include "epilogue_cuda.h"
#include "uss.h"

namespace unitsface {
namespace {

using cuda_epi::kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    uss_fwd_kernel(const T* __restrict__ dots, const T* __restrict__ inv_x,
                   const T* __restrict__ inv_r, const int64_t* __restrict__ y,
                   const int64_t* __restrict__ l, const bool* __restrict__ valid,
                   const T* __restrict__ bias, int64_t B, int64_t c, int64_t col0, bool in_batch,
                   epi::UssParams<T> p, T* __restrict__ state) {
  const int64_t i = blockIdx.x;
  const T* d = dots + i * c;
  const T ix = inv_x[i];
  const int64_t yi = y[i];
  const int64_t self = in_batch ? i - col0 : -1;
  if (!p.lse) {
    T acc[1] = {T(0)};
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const bool same = l[j] == yi;
      const bool pos = valid[j] && same && j != self;
      const bool neg = valid[j] && !same;
      if (pos || neg) {
        const T cos = d[j] * ix * inv_r[j];
        acc[0] += epi::uss_pair_loss<T>(epi::uss_z<T>(cos, bias[j], pos, p), p);
      }
    }
    cuda_epi::block_sum<T, 1>(acc);
    if (threadIdx.x == 0) state[i] += acc[0];
    return;
  }
  const T neg_big = static_cast<T>(epi::kNegBig);
  T mp = neg_big, sp = 0, mn = neg_big, sn = 0;
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const bool same = l[j] == yi;
    const bool pos = valid[j] && same && j != self;
    const bool neg = valid[j] && !same;
    const T z = epi::uss_z<T>(d[j] * ix * inv_r[j], bias[j], pos, p);
    if (pos) epi::lse_push<T>(mp, sp, z);
    if (neg) epi::lse_push<T>(mn, sn, z);
  }
  cuda_epi::block_lse<T>(mp, sp);
  cuda_epi::block_lse<T>(mn, sn);
  if (threadIdx.x == 0) {
    epi::lse_merge<T>(state[i], state[B + i], mp, sp);
    epi::lse_merge<T>(state[2 * B + i], state[3 * B + i], mn, sn);
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    uss_bwd_kernel(const T* dots, G* grads, const T* __restrict__ inv_x,
                   const T* __restrict__ inv_r, const int64_t* __restrict__ y,
                   const int64_t* __restrict__ l, const bool* __restrict__ valid,
                   const T* __restrict__ bias, int64_t B, int64_t c, int64_t col0, bool in_batch,
                   epi::UssParams<T> p, const T* __restrict__ go_rows,
                   const T* __restrict__ stats, T* __restrict__ hs) {
  const int64_t i = blockIdx.x;
  const T* d = dots + i * c;  // grads may alias dots: each element is read, then written
  G* g_out = grads + i * c;
  const T ix = inv_x[i];
  const T go = go_rows[i];
  const int64_t yi = y[i];
  const int64_t self = in_batch ? i - col0 : -1;
  const T sa = stats[i], fa = stats[B + i], sb = stats[2 * B + i], fb = stats[3 * B + i];
  T v[2] = {T(0), T(0)};  // Σ g·cos, Σ g
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const bool same = l[j] == yi;
    const bool pos = valid[j] && same && j != self;
    const bool neg = valid[j] && !same;
    const T cos = d[j] * ix * inv_r[j];
    T g = T(0);
    if (pos || neg) {
      g = epi::uss_grad<T>(epi::uss_z<T>(cos, bias[j], pos, p), pos, sa, fa, sb, fb, p) * go;
    }
    v[0] += g * cos;
    v[1] += g;
    g_out[j] = static_cast<G>(g * inv_r[j]);
  }
  cuda_epi::block_sum<T, 2>(v);
  if (threadIdx.x == 0) {
    hs[i] += v[0];
    hs[B + i] += v[1];
  }
}

template <typename T>
epi::UssParams<T> params_of(const UssChunk& ck) {
  return epi::UssParams<T>{static_cast<T>(ck.scale), static_cast<T>(ck.margin), ck.lse,
                           ck.clamp};
}

template <typename T, typename G>
void launch_bwd(const UssChunk& ck, int64_t B, int64_t c, cudaStream_t stream) {
  uss_bwd_kernel<T, G><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      ck.dots.const_data_ptr<T>(), ck.grads.data_ptr<G>(), ck.inv_x.const_data_ptr<T>(),
      ck.inv_r.const_data_ptr<T>(), ck.labels.const_data_ptr<int64_t>(),
      ck.col_labels.const_data_ptr<int64_t>(), ck.valid.const_data_ptr<bool>(),
      ck.bias.const_data_ptr<T>(), B, c, ck.col0, ck.in_batch, params_of<T>(ck),
      ck.go.const_data_ptr<T>(), ck.stats.const_data_ptr<T>(), ck.hs.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void epilogue_typed(const UssChunk& ck) {
  const int64_t B = ck.dots.size(0), c = ck.dots.size(1);
  if (B == 0 || c == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (!ck.grads.defined()) {
    uss_fwd_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        ck.dots.const_data_ptr<T>(), ck.inv_x.const_data_ptr<T>(), ck.inv_r.const_data_ptr<T>(),
        ck.labels.const_data_ptr<int64_t>(), ck.col_labels.const_data_ptr<int64_t>(),
        ck.valid.const_data_ptr<bool>(), ck.bias.const_data_ptr<T>(), B, c, ck.col0,
        ck.in_batch, params_of<T>(ck), ck.state.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  switch (ck.grads.scalar_type()) {
    case at::kHalf:
      launch_bwd<T, at::Half>(ck, B, c, stream);
      break;
    case at::kBFloat16:
      launch_bwd<T, at::BFloat16>(ck, B, c, stream);
      break;
    default:
      launch_bwd<T, T>(ck, B, c, stream);
  }
}

void uss_epilogue_cuda(const UssChunk& ck) {
  TORCH_CHECK(ck.dots.size(0) <= std::numeric_limits<int32_t>::max(),
              "uss (CUDA): at most 2^31 - 1 rows");
  if (ck.dots.scalar_type() == at::kDouble) {
    epilogue_typed<double>(ck);
  } else {
    epilogue_typed<float>(ck);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> uss_fwd_cuda(
    const at::Tensor& x, const at::Tensor& ref, const at::Tensor& labels,
    const at::Tensor& ref_labels, const std::optional<at::Tensor>& ref_valid,
    const at::Tensor& bias, double scale, double margin, bool lse, bool clamp, bool in_batch) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uss_forward(x, ref, labels, ref_labels, ref_valid, bias, scale, margin, lse, clamp,
                     in_batch, &uss_epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> uss_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& ref,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias, const at::Tensor& nx,
    const at::Tensor& nr, const at::Tensor& stats, double scale, double margin, bool lse,
    bool clamp, bool in_batch, bool need_dx, bool need_dref, bool need_dbias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return uss_backward(grad_rows, x, ref, labels, ref_labels, ref_valid, bias, nx, nr, stats,
                      scale, margin, lse, clamp, in_batch, need_dx, need_dref, need_dbias,
                      &uss_epilogue_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("uss_fwd", &uss_fwd_cuda);
  m.impl("uss_bwd", &uss_bwd_cuda);
}

}  // namespace unitsface
