// The CPU row kernels compiled for the baseline of the build (x86-64: SSE2), the fallback on
// every CPU (see csrc/cpu_rows.h).
#include "cpu_rows.h"

namespace unitsface {
namespace cpu {
namespace base {
#include "uss_rows.h"
#include "softmax_rows.h"
#include "row_kernels.h"
}  // namespace base
}  // namespace cpu
}  // namespace unitsface
