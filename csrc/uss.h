// unitsface::uss_{fwd,bwd}_native: the USS loss (docs/design.md §1.1) as chunked ATen GEMMs
// plus one fused epilogue pass per chunk. Schemas, outputs and statistics: the op contract,
// unitsface_kernels/contract.py (rows [B], stats [4, B] = (A, σ(A)·[A unclamped], B,
// σ(B)·[B unclamped]) of the lse form and zeros for pairs, nx [B] = ||x_i||, nr [N]).
//
// The drivers (csrc/uss_sweep.cpp) are device-agnostic; each device supplies the epilogue that runs
// one chunk (the CPU row loops of csrc/cpu/uss.cpp, the CUDA kernels of csrc/cuda/uss.cu) and
// registers the op kernels below with it.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "options.h"
#include "rows.h"

namespace unitsface {

// One chunk of a USS epilogue: reference rows (columns) [col0, col0 + c). Fields as in
// UssRows (csrc/rows.h), as tensors.
struct UssChunk {
  Pass pass = Pass::kForward;
  UssOptions options{};
  int64_t col0 = 0;
  at::Tensor dots, grads, inv_x, inv_r, labels, col_labels, valid, bias;
  at::Tensor state;                // forward
  at::Tensor go, stats, hs;        // backward
  at::Tensor sums, alpha;          // fused forward
  double weight = 1.0;             // fused forward
};

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
UssRows<T> rows_of(const UssChunk& ck) {
  UssRows<T> a;
  a.dots = ck.dots.data_ptr<T>();
  a.grads = ck.grads.defined() && ck.grads.scalar_type() == ck.dots.scalar_type()
                ? ck.grads.data_ptr<T>()
                : nullptr;
  a.inv_x = ck.inv_x.const_data_ptr<T>();
  a.inv_r = ck.inv_r.const_data_ptr<T>();
  a.y = ck.labels.const_data_ptr<int64_t>();
  a.l = ck.col_labels.const_data_ptr<int64_t>();
  a.valid = ck.valid.const_data_ptr<T>();
  a.bias = ck.bias.const_data_ptr<T>();
  a.B = ck.dots.size(0);
  a.c = ck.dots.size(1);
  a.col0 = ck.col0;
  a.in_batch = ck.options.in_batch;
  a.p = epi::uss_params<T>(ck.options);
  a.state = ptr_or_null<T>(ck.state);
  a.go = ptr_or_null<T>(ck.go);
  a.stats = ptr_or_null<T>(ck.stats);
  a.hs = ptr_or_null<T>(ck.hs);
  a.sums = ptr_or_null<T>(ck.sums);
  a.alpha = ptr_or_null<T>(ck.alpha);
  a.weight = static_cast<T>(ck.weight);
  return a;
}

// The per-column inputs of a USS sweep over all its columns (the reference rows, or the
// classes S of the unitsface family), sliced into each chunk by set().
struct UssColumns {
  at::Tensor labels;      // B    int64 y_i
  at::Tensor col_labels;  // N    int64 l_j
  at::Tensor valid;       // N    bool v_j; undefined when every column is valid
  at::Tensor valid_t;     // N    v_j as 0 / 1 in the accumulation dtype
  at::Tensor bias;        // N    b_j, or c copies of a scalar b (accumulation dtype)
  bool vector_bias = false;

  // the chunk's bool mask for chunking::chunk_rows (undefined: all valid)
  at::Tensor valid_chunk(int64_t j0, int64_t n) const {
    return valid.defined() ? valid.narrow(0, j0, n) : at::Tensor();
  }
  void set(UssChunk& ck, int64_t j0, int64_t n) const {
    ck.col0 = j0;
    ck.labels = labels;
    ck.col_labels = col_labels.narrow(0, j0, n);
    ck.valid = valid_t.narrow(0, j0, n);
    ck.bias = bias.narrow(0, vector_bias ? j0 : 0, n);
  }
};

// labels [B], col_labels [N] (any integer dtype), valid [N] bool or undefined, bias 1 or N
// values; c = the sweep's chunk width.
UssColumns uss_columns(const at::Tensor& labels, const at::Tensor& col_labels,
                       const at::Tensor& valid, const at::Tensor& bias, int64_t c,
                       at::ScalarType acc);

using UssEpilogue = void (*)(const UssChunk&);

// The op's tensor inputs and the forward outputs its backward receives.
struct UssInputs {
  at::Tensor x, ref, labels, ref_labels;
  std::optional<at::Tensor> ref_valid;
  at::Tensor bias;
};
struct UssSaved {
  at::Tensor stats, nx, nr;
};

using UssForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

UssForward uss_forward(const UssInputs& in, const UssOptions& o, UssEpilogue epilogue);
Grads uss_backward(const at::Tensor& grad_rows, const UssInputs& in, const UssSaved& saved,
                   const UssOptions& o, std::array<bool, 3> needs, UssEpilogue epilogue);

// The op kernels with the schemas of unitsface_kernels/contract.py; each device registers
// them with its epilogue (TORCH_LIBRARY_IMPL in csrc/cpu/uss.cpp, csrc/cuda/uss.cu).
template <UssEpilogue Epilogue>
UssForward uss_fwd_op(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& labels,
                      const at::Tensor& ref_labels, const std::optional<at::Tensor>& ref_valid,
                      const at::Tensor& bias, c10::ArrayRef<double> options) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  return uss_forward({x, ref, labels, ref_labels, ref_valid, bias}, UssOptions::unpack(options),
                     Epilogue);
}

template <UssEpilogue Epilogue>
Grads uss_bwd_op(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& ref,
                 const at::Tensor& labels, const at::Tensor& ref_labels,
                 const std::optional<at::Tensor>& ref_valid, const at::Tensor& bias,
                 const at::Tensor& stats, const at::Tensor& nx, const at::Tensor& nr,
                 c10::ArrayRef<double> options, std::array<bool, 3> needs) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  return uss_backward(grad_rows, {x, ref, labels, ref_labels, ref_valid, bias}, {stats, nx, nr},
                      UssOptions::unpack(options), needs, Epilogue);
}

}  // namespace unitsface
