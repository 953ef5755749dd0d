// The CPU row kernels compiled for the baseline of the build (x86-64: SSE2), the fallback on
// every CPU (see csrc/cpu/row_kernels.h).
#include "cpu/row_kernels.h"

namespace unitsface {
namespace cpu {
namespace base {
#include "cpu/uss_rows.h"
#include "cpu/softmax_rows.h"
#include "cpu/family_rows.h"
#include "cpu/kernel_table.h"
}  // namespace base
}  // namespace cpu
}  // namespace unitsface
