// Compiles the row kernels of UF_ROWS_HEADER once per instruction set (see cpu_loops.h):
// into namespaces unitsface::UF_ROWS_NS(avx512) and UF_ROWS_NS(avx2), each inside its own
// `#pragma GCC target` region, and unitsface::UF_ROWS_NS(base) for the baseline. Define both
// macros, include this file (NO include guard: one use per row-kernel family), and it
// undefines them. Used by csrc/uss.cpp and csrc/unitsface.cpp.
#if UF_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace unitsface {
namespace UF_ROWS_NS(avx512) {
#include UF_ROWS_HEADER
}  // namespace UF_ROWS_NS(avx512)
}  // namespace unitsface
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace unitsface {
namespace UF_ROWS_NS(avx2) {
#include UF_ROWS_HEADER
}  // namespace UF_ROWS_NS(avx2)
}  // namespace unitsface
#pragma GCC pop_options
#endif
namespace unitsface {
namespace UF_ROWS_NS(base) {
#include UF_ROWS_HEADER
}  // namespace UF_ROWS_NS(base)
}  // namespace unitsface
#undef UF_ROWS_HEADER
#undef UF_ROWS_NS
