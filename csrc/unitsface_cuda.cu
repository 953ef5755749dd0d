// unitsface::unitsface_fwd / unitsface_bwd on CUDA tensors: the drivers of csrc/unitsface.cpp
// (cuBLAS GEMMs through at::mm on chunk views / chunk-sized gathers; 16-bit inputs give fp32
// dots through mm's out_dtype) with the epilogue kernels below. One thread block per row of a
// chunk; the per-element maths is csrc/epilogue.h, shared with the CPU loops.
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "epilogue.h"
#include "epilogue_cuda.h"
#include "unitsface.h"

namespace unitsface {
namespace {

using cuda_epi::kThreads;

template <typename T>
struct UfArgs {
  const T* dw;
  const T* db;
  const T* inv_x;
  const T* inv_w;
  const T* inv_b;
  const int64_t* target;
  const bool* valid;
  const T* bias;
  int64_t B, c, col0;
  bool do_w, do_b;
  epi::SoftmaxParams<T> sp;
  epi::UssParams<T> up;
  T lambda;
};

template <typename T>
UfArgs<T> args_of(const UnitsfaceChunk& ck) {
  UfArgs<T> a;
  a.dw = ck.do_w ? ck.dots_w.const_data_ptr<T>() : nullptr;
  a.db = ck.do_b ? ck.dots_b.const_data_ptr<T>() : nullptr;
  a.inv_x = ck.inv_x.const_data_ptr<T>();
  a.inv_w = ck.do_w ? ck.inv_w.const_data_ptr<T>() : nullptr;
  a.inv_b = ck.do_b ? ck.inv_b.const_data_ptr<T>() : nullptr;
  a.target = ck.target.const_data_ptr<int64_t>();
  a.valid = ck.do_b ? ck.valid.const_data_ptr<bool>() : nullptr;
  a.bias = ck.do_b ? ck.bias.const_data_ptr<T>() : nullptr;
  a.B = ck.inv_x.size(0);
  a.c = ck.do_w ? ck.dots_w.size(1) : ck.dots_b.size(1);
  a.col0 = ck.col0;
  a.do_w = ck.do_w;
  a.do_b = ck.do_b;
  a.sp = epi::SoftmaxParams<T>{static_cast<T>(ck.scale),  static_cast<T>(ck.margin_cos),
                               static_cast<T>(ck.cos_m2), static_cast<T>(ck.sin_m2),
                               static_cast<T>(ck.m2_sin_m2), ck.arc};
  a.up = epi::UssParams<T>{static_cast<T>(ck.scale), static_cast<T>(ck.uss_margin), ck.uss_lse,
                           false};
  a.lambda = static_cast<T>(ck.uss_weight);
  return a;
}

template <typename T>
__device__ __forceinline__ int64_t chunk_target(const UfArgs<T>& a, int64_t i) {
  const int64_t t = a.target[i] - a.col0;
  return (t >= 0 && t < a.c) ? t : -1;
}

// state: 7 × B (m, Σe, Σ z_iy, USS: Σ softplus | m⁺, s⁺, m⁻, s⁻)
template <typename T>
__global__ void __launch_bounds__(kThreads) uf_fwd_kernel(UfArgs<T> a, T* __restrict__ st) {
  const int64_t i = blockIdx.x, B = a.B, c = a.c;
  const T ix = a.inv_x[i];
  const int64_t t = chunk_target(a, i);
  const T neg_big = static_cast<T>(epi::kNegBig);
  if (a.do_w) {
    const T* d = a.dw + i * c;
    T m = neg_big, s = 0;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const T z = epi::softmax_z<T>(d[j] * ix * a.inv_w[j], j == t, a.sp);
      epi::lse_push<T>(m, s, z);
      if (j == t) st[2 * B + i] += z;  // a single thread owns the target column
    }
    cuda_epi::block_lse<T>(m, s);
    if (threadIdx.x == 0) epi::lse_merge<T>(st[i], st[B + i], m, s);
  }
  if (a.do_b) {
    const T* d = a.db + i * c;
    if (!a.up.lse) {
      T acc[1] = {T(0)};
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        if (a.valid[j]) {
          const T z = epi::uss_z<T>(d[j] * ix * a.inv_b[j], a.bias[j], j == t, a.up);
          acc[0] += epi::uss_pair_loss<T>(z, a.up);
        }
      }
      cuda_epi::block_sum<T, 1>(acc);
      if (threadIdx.x == 0) st[3 * B + i] += acc[0];
    } else {
      T mn = neg_big, sn = 0;
      for (int64_t j = threadIdx.x; j < c; j += kThreads) {
        if (!a.valid[j]) continue;
        const T z = epi::uss_z<T>(d[j] * ix * a.inv_b[j], a.bias[j], j == t, a.up);
        if (j == t) {
          epi::lse_push<T>(st[3 * B + i], st[4 * B + i], z);  // the one positive
        } else {
          epi::lse_push<T>(mn, sn, z);
        }
      }
      cuda_epi::block_lse<T>(mn, sn);
      if (threadIdx.x == 0) epi::lse_merge<T>(st[5 * B + i], st[6 * B + i], mn, sn);
    }
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    uf_bwd_kernel(UfArgs<T> a, G* gw, G* gb, const T* __restrict__ go_rows,
                  const T* __restrict__ stats, T* __restrict__ hs) {
  const int64_t i = blockIdx.x, B = a.B, c = a.c;
  const T ix = a.inv_x[i];
  const T go = go_rows[i];
  const int64_t t = chunk_target(a, i);
  T v[2] = {T(0), T(0)};  // Σ g·cos (both losses), Σ g' (USS)
  if (a.do_w) {
    const T* d = a.dw + i * c;  // gw may alias dw: each element is read, then written
    G* g_out = gw + i * c;
    const T lse = stats[i];
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const T raw = d[j] * ix * a.inv_w[j];
      const bool target = j == t;
      const T z = epi::softmax_z<T>(raw, target, a.sp);
      const T g = epi::softmax_grad<T>(raw, z, target, lse, a.sp) * go;
      v[0] += g * raw;
      g_out[j] = static_cast<G>(g * a.inv_w[j]);
    }
  }
  if (a.do_b) {
    const T* d = a.db + i * c;
    G* g_out = gb + i * c;
    const T sa = stats[B + i], fa = stats[2 * B + i], sb = stats[3 * B + i], fb = stats[4 * B + i];
    const T gl = go * a.lambda;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const T cos = d[j] * ix * a.inv_b[j];
      T g = T(0);
      if (a.valid[j]) {
        const bool pos = j == t;
        g = epi::uss_grad<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.up), pos, sa, fa, sb, fb,
                             a.up) * gl;
      }
      v[0] += g * cos;
      v[1] += g;
      g_out[j] = static_cast<G>(g * a.inv_b[j]);
    }
  }
  cuda_epi::block_sum<T, 2>(v);
  if (threadIdx.x == 0) {
    hs[i] += v[0];
    hs[B + i] += v[1];
  }
}

template <typename G>
G* grads_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<G>() : nullptr;
}

template <typename T, typename G>
void launch_bwd(const UnitsfaceChunk& ck, const UfArgs<T>& a, cudaStream_t stream) {
  uf_bwd_kernel<T, G><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
      a, grads_ptr<G>(ck.grads_w), grads_ptr<G>(ck.grads_b), ck.go.const_data_ptr<T>(),
      ck.stats.const_data_ptr<T>(), ck.hs.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void epilogue_typed(const UnitsfaceChunk& ck) {
  const UfArgs<T> a = args_of<T>(ck);
  if (a.B == 0 || a.c == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (!ck.go.defined()) {
    uf_fwd_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
        a, ck.state.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor& g = ck.do_w ? ck.grads_w : ck.grads_b;
  switch (g.scalar_type()) {
    case at::kHalf:
      launch_bwd<T, at::Half>(ck, a, stream);
      break;
    case at::kBFloat16:
      launch_bwd<T, at::BFloat16>(ck, a, stream);
      break;
    default:
      launch_bwd<T, T>(ck, a, stream);
  }
}

void unitsface_epilogue_cuda(const UnitsfaceChunk& ck) {
  TORCH_CHECK(!ck.alpha.defined(), "unitsface: the fused forward (unitsface_fwd_g) is CPU-only");
  TORCH_CHECK(ck.inv_x.size(0) <= std::numeric_limits<int32_t>::max(),
              "unitsface (CUDA): at most 2^31 - 1 rows");
  if (ck.inv_x.scalar_type() == at::kDouble) {
    epilogue_typed<double>(ck);
  } else {
    epilogue_typed<float>(ck);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unitsface_fwd_cuda(
    const at::Tensor& x, const at::Tensor& centres, const std::optional<at::Tensor>& bank,
    const at::Tensor& labels, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& bank_valid, const std::optional<at::Tensor>& bias,
    double scale, double margin_arc, double margin_cos, double uss_margin, double uss_weight,
    bool uss_lse) {
  const c10::cuda::CUDAGuard guard(x.device());
  return unitsface_forward(x, centres, bank, labels, index, bank_valid, bias, scale, margin_arc,
                           margin_cos, uss_margin, uss_weight, uss_lse, &unitsface_epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unitsface_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& centres,
    const std::optional<at::Tensor>& bank, const at::Tensor& labels,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& bank_valid,
    const std::optional<at::Tensor>& bias, const at::Tensor& nx, const at::Tensor& nw,
    const at::Tensor& nb, const at::Tensor& stats, double scale, double margin_arc,
    double margin_cos, double uss_margin, double uss_weight, bool uss_lse, bool need_dx,
    bool need_dw, bool need_dbias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return unitsface_backward(grad_rows, x, centres, bank, labels, index, bank_valid, bias, nx, nw,
                            nb, stats, scale, margin_arc, margin_cos, uss_margin, uss_weight,
                            uss_lse, need_dx, need_dw, need_dbias, &unitsface_epilogue_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("unitsface_fwd", &unitsface_fwd_cuda);
  m.impl("unitsface_bwd", &unitsface_bwd_cuda);
}

}  // namespace unitsface
