// unitsface::unitsface_{fwd,bwd}_native on CUDA tensors: the drivers of csrc/unitsface.cpp
// (cuBLAS GEMMs through at::mm on chunk views / chunk-sized gathers; 16-bit inputs give fp32
// dots through mm's out_dtype) with the epilogue kernels below: one thread block per row of a
// chunk, the softmax part's row code here, then the bank part with the USS family's row code
// (csrc/uss_rows_cuda.cuh; column labels = the chunk's classes). The per-element maths is
// csrc/epilogue.h, shared with the CPU loops.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "unitsface.h"
#include "uss_rows_cuda.cuh"

namespace unitsface {
namespace {

using cuda_epi::kThreads;

// Forward of row i of the softmax part: the logits folded into the running (max, sum-exp)
// and the target logit (SoftmaxRows::state).
template <typename T>
__device__ __forceinline__ void softmax_fwd_row(const SoftmaxRows<T>& a, int64_t i) {
  const int64_t B = a.B, c = a.c;
  const T* d = a.dots + i * c;
  const T ix = a.inv_x[i];
  const int64_t t = chunk_target(a, i);
  T* st = a.state;
  T m = static_cast<T>(epi::kNegBig), s = 0;
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const T z = epi::softmax_z<T>(d[j] * ix * a.inv_w[j], j == t, a.p);
    epi::lse_push<T>(m, s, z);
    if (j == t) st[2 * B + i] += z;  // a single thread owns the target column
  }
  cuda_epi::block_lse<T>(m, s);
  if (threadIdx.x == 0) epi::lse_merge<T>(st[i], st[B + i], m, s);
}

// Backward of row i of the softmax part: g'_ic = g_ic·inv_w_c written to `grads` (the GEMM
// dtype G; may alias the dots), this thread's Σ g·cos added to h.
template <typename T, typename G>
__device__ __forceinline__ void softmax_bwd_row(const SoftmaxRows<T>& a, G* grads, int64_t i,
                                                T& h) {
  const int64_t c = a.c;
  const T* d = a.dots + i * c;
  G* g_out = grads + i * c;
  const T ix = a.inv_x[i], go = a.go[i], lse = a.lse[i];
  const int64_t t = chunk_target(a, i);
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const T raw = d[j] * ix * a.inv_w[j];
    const bool target = j == t;
    const T z = epi::softmax_z<T>(raw, target, a.p);
    const T g = epi::softmax_grad<T>(raw, z, target, lse, a.p) * go;
    h += g * raw;
    g_out[j] = static_cast<G>(g * a.inv_w[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    uf_fwd_kernel(SoftmaxRows<T> w, UssRows<T> b, bool do_b) {
  softmax_fwd_row<T>(w, blockIdx.x);
  if (do_b) cuda_rows::uss_fwd_row<T>(b, blockIdx.x);
}

// hs: Σ g·cos over both parts, then (do_b) a row of Σ g' of USS: the bank part's hs, whose
// first row is the softmax part's h.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    uf_bwd_kernel(SoftmaxRows<T> w, G* gw, UssRows<T> b, G* gb, bool do_w, bool do_b,
                  T* __restrict__ hs) {
  const int64_t i = blockIdx.x;
  T v[2] = {T(0), T(0)};
  if (do_w) softmax_bwd_row<T, G>(w, gw, i, v[0]);
  if (do_b) cuda_rows::uss_bwd_row<T, G>(b, gb, i, v);
  cuda_epi::block_sum<T, 2>(v);
  if (threadIdx.x == 0) {
    hs[i] += v[0];
    if (do_b) hs[b.B + i] += v[1];
  }
}

template <typename G>
G* ptr_of(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<G>() : nullptr;
}

template <typename T, typename G>
void launch_bwd(const UnitsfaceChunk& ck, const SoftmaxRows<T>& w, const UssRows<T>& b,
                int64_t rows, cudaStream_t stream) {
  const at::Tensor& hs = ck.do_b ? ck.bank.hs : ck.softmax.h;
  uf_bwd_kernel<T, G><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      w, ck.do_w ? ptr_of<G>(ck.softmax.grads) : nullptr, b,
      ck.do_b ? ptr_of<G>(ck.bank.grads) : nullptr, ck.do_w, ck.do_b, hs.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void epilogue_typed(const UnitsfaceChunk& ck) {
  SoftmaxRows<T> w{};
  UssRows<T> b{};
  if (ck.do_w) w = rows_of<T>(ck.softmax, ck.options);
  if (ck.do_b) b = rows_of<T>(ck.bank);
  const int64_t rows = ck.softmax.inv_x.size(0);
  const int64_t cols = ck.do_w ? w.c : b.c;
  if (rows == 0 || cols == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (ck.pass == Pass::kForward) {
    uf_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(w, b, ck.do_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor& g = ck.do_w ? ck.softmax.grads : ck.bank.grads;
  switch (g.scalar_type()) {
    case at::kHalf:
      return launch_bwd<T, at::Half>(ck, w, b, rows, stream);
    case at::kBFloat16:
      return launch_bwd<T, at::BFloat16>(ck, w, b, rows, stream);
    default:
      return launch_bwd<T, T>(ck, w, b, rows, stream);
  }
}

void unitsface_epilogue_cuda(const UnitsfaceChunk& ck) {
  TORCH_CHECK(ck.pass != Pass::kForwardGrads,
              "unitsface (CUDA): the fused forward (row_grads) is CPU-only");
  TORCH_CHECK(ck.softmax.inv_x.size(0) <= std::numeric_limits<int32_t>::max(),
              "unitsface (CUDA): at most 2^31 - 1 rows");
  if (ck.softmax.inv_x.scalar_type() == at::kDouble) {
    epilogue_typed<double>(ck);
  } else {
    epilogue_typed<float>(ck);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("unitsface_fwd_native", &unitsface_fwd_op<&unitsface_epilogue_cuda>);
  m.impl("unitsface_bwd_native", &unitsface_bwd_op<&unitsface_epilogue_cuda>);
}

}  // namespace unitsface
