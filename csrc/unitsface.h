// unitsface::unitsface_{fwd,bwd}_native: the partial-FC margin softmax (docs/design.md §1.2)
// plus λ·USS on the memory bank rows of the same classes (§1.3), as chunked ATen GEMMs plus
// one fused epilogue pass per chunk. Schemas, outputs and statistics: the op contract,
// unitsface_kernels/contract.py (rows [B], stats [7, B] = (lse_c z_ic, A, σA, B, σB, z_iy,
// USS loss) (rows named in csrc/stats.h), nx [B], nw [S·K], nb [S] (empty without a bank),
// dx_rows [B, D] and db_rows [B] with row_grads (else empty); exps, exp_rows: empty (the
// triton backend's stored exponentials; docs/design.md §2)). With K sub-centres (the margin
// family, docs/design.md §1.5) the GEMMs run over the S·K centre rows of the classes of S (row
// index[j]·K + r) and the epilogue reduces each class's K columns to their maximum; the bank
// stays per class. A label that matches no column has no target: z_iy = 0, and no USS
// positive.
//
// The CPU drivers (csrc/cpu/unitsface_sweep.cpp) are ATen code around the epilogue of one
// chunk, the CPU row loops (csrc/cpu/unitsface.cpp, which registers the op kernels below with
// the drivers). The bank part is the USS loss with column labels = the chunk's classes, and
// runs the USS family's row code (UssChunk, csrc/uss.h). CUDA tensors go through their own sweep
// (csrc/cuda/unitsface_sweep.cu: a plan sized for L2, split-K ∂x products, one fused ∂W projection,
// row_grads too), which shares the argument checks below and the maths of csrc/epilogue.h.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "options.h"
#include "rows.h"
#include "uss.h"

namespace unitsface {

// The softmax part of one chunk: classes [col0, col0 + c) of S. Fields as in SoftmaxRows
// (csrc/rows.h), as tensors.
struct SoftmaxChunk {
  int64_t col0 = 0;
  at::Tensor dots, grads, inv_x, inv_w, target;
  at::Tensor state;            // forward
  at::Tensor go, lse, h;       // backward
  at::Tensor target_state, alpha;  // fused forward
  at::Tensor margin_rows;          // the family's [4, B], or undefined
  at::Tensor target_arg;           // fused forward, the family
};

template <typename T>
SoftmaxRows<T> rows_of(const SoftmaxChunk& ck, const UnitsfaceOptions& o) {
  SoftmaxRows<T> a;
  a.dots = ck.dots.data_ptr<T>();
  a.grads = ck.grads.defined() && ck.grads.scalar_type() == ck.dots.scalar_type()
                ? ck.grads.data_ptr<T>()
                : nullptr;
  a.inv_x = ck.inv_x.const_data_ptr<T>();
  a.inv_w = ck.inv_w.const_data_ptr<T>();
  a.target = ck.target.const_data_ptr<int64_t>();
  a.B = ck.dots.size(0);
  a.k = o.k();
  a.c = ck.dots.size(1) / a.k;
  a.col0 = ck.col0;
  a.p = epi::softmax_params<T>(o);
  a.margin_rows = ptr_or_null<T>(ck.margin_rows);
  a.target_arg = ptr_or_null<T>(ck.target_arg);
  a.state = ptr_or_null<T>(ck.state);
  a.go = ptr_or_null<T>(ck.go);
  a.lse = ptr_or_null<T>(ck.lse);
  a.h = ptr_or_null<T>(ck.h);
  a.target_state = ptr_or_null<T>(ck.target_state);
  a.alpha = ptr_or_null<T>(ck.alpha);
  return a;
}

// One chunk of the unitsface epilogue: the softmax over its classes (do_w) and USS on the
// bank rows of the same classes (do_b).
struct UnitsfaceChunk {
  Pass pass = Pass::kForward;
  UnitsfaceOptions options{};
  bool do_w = true, do_b = false;
  SoftmaxChunk softmax;
  UssChunk bank;
};

// The op's tensor inputs and the forward outputs its backward receives.
struct UnitsfaceInputs {
  at::Tensor x, centres;
  std::optional<at::Tensor> bank;
  at::Tensor labels;
  std::optional<at::Tensor> index, bank_valid, bias;
  std::optional<at::Tensor> margin_rows;  // [4, B] (csrc/stats.h margin_row), or none
};
struct UnitsfaceSaved {
  at::Tensor stats, nx, nw, nb, dx_rows, db_rows;
  at::Tensor exps, exp_rows;  // empty here: only the triton backend stores exponentials
};

// Shapes, dtypes and devices of the op's inputs (TORCH_CHECK errors naming `op`), and that
// margin_rows is given exactly when the options read it; shared by the CPU driver and the
// CUDA sweep (csrc/cuda/unitsface_sweep.cu), like the next one.
void check_unitsface_args(const char* op, const UnitsfaceInputs& in, const UnitsfaceOptions& o);
// The backward's upstream gradient and saved tensors: shaped as unitsface_fwd_native returns
// them for these inputs (dx_rows / db_rows only when the forward formed them; exps / exp_rows
// always empty).
void check_unitsface_saved(const char* op, const at::Tensor& grad_rows,
                           const UnitsfaceInputs& in, const UnitsfaceSaved& saved,
                           const UnitsfaceOptions& o);

// (rows, stats, nx, nw, nb, dx_rows, db_rows, exps, exp_rows)
using UnitsfaceForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The CPU drivers (csrc/cpu/unitsface_sweep.cpp), around the epilogue of one chunk that runs
// the CPU row kernels (csrc/cpu/unitsface.cpp). CUDA tensors have their own sweep
// (csrc/cuda/unitsface_sweep.cu).
UnitsfaceForward unitsface_forward_cpu(const UnitsfaceInputs& in, const UnitsfaceOptions& o,
                                       bool row_grads);
Grads unitsface_backward_cpu(const at::Tensor& grad_rows, const UnitsfaceInputs& in,
                             const UnitsfaceSaved& saved, const UnitsfaceOptions& o,
                             std::array<bool, 3> needs);
void unitsface_epilogue_cpu(const UnitsfaceChunk& ck);

// A device's two drivers.
using UnitsfaceForwardFn = UnitsfaceForward (*)(const UnitsfaceInputs& in,
                                                const UnitsfaceOptions& o, bool row_grads);
using UnitsfaceBackwardFn = Grads (*)(const at::Tensor& grad_rows, const UnitsfaceInputs& in,
                                      const UnitsfaceSaved& saved, const UnitsfaceOptions& o,
                                      std::array<bool, 3> needs);

// The op kernels with the schemas of unitsface_kernels/contract.py around a device's drivers
// (TORCH_LIBRARY_IMPL in csrc/cpu/unitsface.cpp, csrc/cuda/unitsface_sweep.cu).
template <UnitsfaceForwardFn Forward>
UnitsfaceForward unitsface_fwd_op(const at::Tensor& x, const at::Tensor& centres,
                                  const std::optional<at::Tensor>& bank, const at::Tensor& labels,
                                  const std::optional<at::Tensor>& index,
                                  const std::optional<at::Tensor>& bank_valid,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& margin_rows,
                                  c10::ArrayRef<double> options, bool row_grads,
                                  bool /*sparse_grad: read by the autograd rule only*/) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  return Forward({x, centres, bank, labels, index, bank_valid, bias, margin_rows},
                 UnitsfaceOptions::unpack(options), row_grads);
}

template <UnitsfaceBackwardFn Backward>
Grads unitsface_bwd_op(const at::Tensor& grad_rows, const at::Tensor& x,
                       const at::Tensor& centres, const std::optional<at::Tensor>& bank,
                       const at::Tensor& labels, const std::optional<at::Tensor>& index,
                       const std::optional<at::Tensor>& bank_valid,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& margin_rows, const at::Tensor& stats,
                       const at::Tensor& nx, const at::Tensor& nw, const at::Tensor& nb,
                       const at::Tensor& dx_rows, const at::Tensor& db_rows,
                       const at::Tensor& exps, const at::Tensor& exp_rows,
                       c10::ArrayRef<double> options, std::array<bool, 3> needs) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  return Backward(grad_rows, {x, centres, bank, labels, index, bank_valid, bias, margin_rows},
                  {stats, nx, nw, nb, dx_rows, db_rows, exps, exp_rows},
                  UnitsfaceOptions::unpack(options), needs);
}

}  // namespace unitsface
