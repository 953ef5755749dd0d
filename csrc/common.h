// Shared helpers for the unitsface C++ (CPU) and CUDA ops.
//
// Math that both backends use lives here as UF_HOST_DEVICE functions so the CPU and
// CUDA implementations compute the same thing the same way.
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UF_HOST_DEVICE inline
#endif

namespace unitsface {

// F.normalize's eps: x_hat = x / max(||x||, kNormEps).
constexpr double kNormEps = 1e-5;

// The denominator of F.normalize given sum(x^2) (computed in acc_t). Written so that a
// NaN norm stays NaN (like torch.clamp_min): NaN in an embedding is never hidden.
template <typename acc_t>
UF_HOST_DEVICE acc_t norm_denominator(acc_t sum_sq) {
  const acc_t n = std::sqrt(sum_sq);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return n < eps ? eps : n;
}

// --- bank_update_ -------------------------------------------------------------------
// Validates the arguments of unitsface::bank_update_ (shared by the CPU and CUDA
// kernels). Checks everything but the label range, which each backend checks itself
// (the CUDA one needs a device reduction). Defined in bank_update.cpp.
void check_bank_update_args(const at::Tensor& bank, const at::Tensor& bank_valid,
                            const at::Tensor& x, const at::Tensor& labels);

}  // namespace unitsface
