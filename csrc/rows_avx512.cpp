// The CPU row kernels compiled for x86-64-v4: AVX-512 (F, BW, VL, DQ, CD) (see csrc/cpu_rows.h).
#include "cpu_rows.h"

#if UF_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace unitsface {
namespace cpu {
namespace avx512 {
#include "uss_rows.h"
#include "softmax_rows.h"
#include "row_kernels.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace unitsface
#pragma GCC pop_options
#endif
