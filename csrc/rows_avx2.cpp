// The CPU row kernels compiled for x86-64-v3: AVX2 + FMA (see csrc/cpu_rows.h).
#include "cpu_rows.h"

#if UF_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace unitsface {
namespace cpu {
namespace avx2 {
#include "uss_rows.h"
#include "softmax_rows.h"
#include "row_kernels.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace unitsface
#pragma GCC pop_options
#endif
