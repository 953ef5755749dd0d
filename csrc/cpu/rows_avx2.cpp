// The CPU row kernels compiled for x86-64-v3: AVX2 + FMA (see csrc/cpu/row_kernels.h).
#include "cpu/row_kernels.h"

#if UF_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace unitsface {
namespace cpu {
namespace avx2 {
#include "cpu/uss_rows.h"
#include "cpu/softmax_rows.h"
#include "cpu/family_rows.h"
#include "cpu/kernel_table.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace unitsface
#pragma GCC pop_options
#endif
