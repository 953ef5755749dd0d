// unitsface::bank_update_: the argument checks, shared by the CPU kernel
// (csrc/cpu/bank_update.cpp) and the CUDA kernel (csrc/cuda/bank_update.cu). The rule and the
// determinism scheme: csrc/bank_update.h.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "bank_update.h"

namespace unitsface {

void check_bank_update_args(const at::Tensor& bank, const at::Tensor& bank_valid,
                            const at::Tensor& x, const at::Tensor& labels) {
  // Ranks and shapes.
  TORCH_CHECK_VALUE(bank.dim() == 2, "bank_update_: bank must be 2-D (C, D), got shape ",
                    bank.sizes());
  TORCH_CHECK_VALUE(bank_valid.dim() == 1 && bank_valid.size(0) == bank.size(0),
                    "bank_update_: bank_valid must have shape (C,) = (", bank.size(0),
                    ",) like bank's rows, got shape ", bank_valid.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2, "bank_update_: x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1, "bank_update_: labels must be 1-D (B,), got shape ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.size(0) == x.size(0), "bank_update_: labels has ", labels.size(0),
                    " entries but x has ", x.size(0), " rows");
  TORCH_CHECK_VALUE(x.size(1) == bank.size(1), "bank_update_: D mismatch: x has D = ",
                    x.size(1), " but bank has D = ", bank.size(1));

  // Devices.
  TORCH_CHECK_VALUE(bank_valid.device() == bank.device(),
                    "bank_update_: bank_valid is on ", bank_valid.device(),
                    " but bank is on ", bank.device());
  TORCH_CHECK_VALUE(x.device() == bank.device(), "bank_update_: x is on ", x.device(),
                    " but bank is on ", bank.device());
  TORCH_CHECK_VALUE(labels.device() == bank.device(), "bank_update_: labels is on ",
                    labels.device(), " but bank is on ", bank.device());

  // Dtypes.
  const auto bt = bank.scalar_type();
  TORCH_CHECK_TYPE(bt == at::kFloat || bt == at::kBFloat16 || bt == at::kHalf ||
                       bt == at::kDouble,
                   "bank_update_: bank must be float32, bfloat16, float16 or float64, got ", bt);
  TORCH_CHECK_TYPE(bank_valid.scalar_type() == at::kBool,
                   "bank_update_: bank_valid must be a bool tensor, got ",
                   bank_valid.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "bank_update_: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong,
                   "bank_update_: labels must be an int64 tensor, got ", labels.scalar_type());

  // Layout: the bank and the mask are written in place, so they cannot be copied to make
  // them contiguous; x and labels are read only and are made contiguous by the kernels.
  TORCH_CHECK_VALUE(bank.is_contiguous(),
                    "bank_update_: bank must be contiguous (it is updated in place)");
  TORCH_CHECK_VALUE(bank_valid.is_contiguous(),
                    "bank_update_: bank_valid must be contiguous (it is updated in place)");
  const auto overlap = at::get_overlap_status(bank, x);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full &&
                        overlap != at::MemOverlapStatus::Partial,
                    "bank_update_: x must not share memory with bank (pass x.clone())");
}

}  // namespace unitsface
