// The argument checks of the unitsface family's ops (csrc/unitsface.h), inputs and saved
// tensors, shared by the CPU driver (csrc/cpu/unitsface_sweep.cpp) and the CUDA sweep (csrc/cuda/unitsface_sweep.cu). In a file of their
// own so that the host build of the CUDA sweep (csrc/emu/) links them without the CPU driver.
#include "chunking.h"
#include "stats.h"
#include "unitsface.h"

namespace unitsface {

void check_unitsface_args(const char* op, const UnitsfaceInputs& in, const UnitsfaceOptions& o) {
  const at::Tensor &x = in.x, &centres = in.centres;
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(centres.dim() == 2 && centres.size(1) == x.size(1), op,
                    ": centres must be (C, D) with D = ", x.size(1), ", got shape ",
                    centres.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(chunking::reads_as(centres.scalar_type(), x.scalar_type()), op,
                   ": centres has dtype ",
                   centres.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(in.labels.dim() == 1 && in.labels.size(0) == x.size(0), op,
                    ": labels must have shape (", x.size(0), ",), got ", in.labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(in.labels.scalar_type()), op,
                   ": labels must be an integer tensor");
  const auto dev = x.device();
  TORCH_CHECK_VALUE(centres.device() == dev && in.labels.device() == dev, op,
                    ": every tensor must be on ", dev);
  const int64_t K = o.k();
  TORCH_CHECK_VALUE(K >= 1 && static_cast<double>(K) == o.sub_centers, op,
                    ": sub_centers must be an integer >= 1, got ", o.sub_centers);
  TORCH_CHECK_VALUE(centres.size(0) % K == 0, op, ": centres must hold K = ", K,
                    " rows per class, got ", centres.size(0), " rows");
  const int64_t C = centres.size(0) / K;  // classes
  TORCH_CHECK_VALUE(in.margin_rows.has_value() == o.needs_margin_rows(), op,
                    o.needs_margin_rows() ? ": these options read margin_rows [4, B], none given"
                                          : ": margin_rows given but the options do not read it");
  if (in.margin_rows.has_value()) {
    const at::Tensor& m = *in.margin_rows;
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == margin_row::kRows && m.size(1) == x.size(0),
                      op, ": margin_rows must have shape (", margin_row::kRows, ", ", x.size(0),
                      "), got ", m.sizes());
    TORCH_CHECK_TYPE(m.scalar_type() == chunking::acc_type(x.scalar_type()), op,
                     ": margin_rows must be in the accumulation dtype of x, got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == dev, op, ": margin_rows must be on ", dev);
  }
  if (in.index.has_value()) {
    TORCH_CHECK_TYPE(!at::isFloatingType(in.index->scalar_type()), op,
                     ": index must be an integer tensor");
    TORCH_CHECK_VALUE(in.index->dim() == 1 && in.index->device() == dev, op,
                      ": index must be 1-D on ", dev);
  }
  if (in.bank.has_value()) {
    const at::Tensor& bank = *in.bank;
    TORCH_CHECK_VALUE(bank.dim() == 2 && bank.size(0) == C && bank.size(1) == x.size(1), op,
                      ": bank must have one row per class (", C, ", ", x.size(1),
                      "), got ", bank.sizes());
    TORCH_CHECK_TYPE(chunking::reads_as(bank.scalar_type(), x.scalar_type()), op,
                     ": bank has dtype ", bank.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(bank.device() == dev, op, ": bank must be on ", dev);
    TORCH_CHECK_VALUE(in.bias.has_value(), op, ": the USS part (a bank) needs a bias");
  }
  if (in.bank_valid.has_value()) {
    const at::Tensor& v = *in.bank_valid;
    TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, op, ": bank_valid must be a bool tensor");
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == C && v.device() == dev, op,
                      ": bank_valid must have shape (", C, ",) on ", dev);
  }
  if (in.bias.has_value()) {
    const at::Tensor& b = *in.bias;
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), op, ": bias must be a floating tensor");
    TORCH_CHECK_VALUE(b.numel() == 1 || b.numel() == C, op,
                      ": bias must hold 1 value or one per class (", C, "), got shape ",
                      b.sizes());
    TORCH_CHECK_VALUE(b.device() == dev, op, ": bias must be on ", dev);
  }
}

void check_unitsface_saved(const char* op, const at::Tensor& grad_rows,
                           const UnitsfaceInputs& in, const UnitsfaceSaved& saved,
                           const UnitsfaceOptions& o) {
  const int64_t B = in.x.size(0), D = in.x.size(1), K = o.k();
  const int64_t S = in.index.has_value() ? in.index->numel() : in.centres.size(0) / K;
  TORCH_CHECK_VALUE(grad_rows.numel() == B && saved.nx.numel() == B && saved.stats.dim() == 2 &&
                        saved.stats.size(0) == stats::kUnitsfaceRows && saved.stats.size(1) == B,
                    op, ": grad_rows, stats and nx must come from unitsface_fwd_native on these "
                    "inputs");
  // nw: the S·K centre rows; nb: the S bank rows
  TORCH_CHECK_VALUE(saved.nw.numel() == S * K && (!in.bank.has_value() || saved.nb.numel() == S),
                    op, ": nw and nb must come from unitsface_fwd_native on these inputs");
  if (saved.dx_rows.numel() > 0) {  // the forward formed the per-row gradients (row_grads)
    TORCH_CHECK_VALUE(saved.dx_rows.dim() == 2 && saved.dx_rows.size(0) == B &&
                          saved.dx_rows.size(1) == D && saved.db_rows.numel() == B,
                      op, ": dx_rows and db_rows must come from "
                      "unitsface_fwd_native(row_grads=True) on these inputs");
  }
  // only unitsface_fwd_triton fills them, and its backward is its own
  TORCH_CHECK_VALUE(saved.exps.numel() == 0 && saved.exp_rows.numel() == 0, op,
                    ": exps and exp_rows must be empty: the native backend keeps no stored "
                    "exponentials");
}

}  // namespace unitsface
