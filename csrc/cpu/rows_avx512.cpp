// The CPU row kernels compiled for x86-64-v4: AVX-512 (F, BW, VL, DQ, CD) (see csrc/cpu/row_kernels.h).
#include "cpu/row_kernels.h"

#if UF_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace unitsface {
namespace cpu {
namespace avx512 {
#include "cpu/uss_rows.h"
#include "cpu/softmax_rows.h"
#include "cpu/family_rows.h"
#include "cpu/kernel_table.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace unitsface
#pragma GCC pop_options
#endif
