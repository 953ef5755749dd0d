// The CPU row kernels of the epilogues and the choice of instruction set.
//
// The row kernels (csrc/cpu/uss_rows.h, csrc/cpu/softmax_rows.h, csrc/cpu/family_rows.h) are plain
// loops over a row's chunk of columns, written so that the compiler vectorises them. The extension
// is built without -march flags, so they are compiled three times: csrc/cpu/rows_avx512.cpp
// (x86-64-v4), csrc/cpu/rows_avx2.cpp (x86-64-v3: AVX2 + FMA) and csrc/cpu/rows_base.cpp (the
// baseline), each including the row headers inside its own namespace under `#pragma GCC target`,
// and row_kernels() picks one table of them at run time. (GCC's target_clones does not do: it
// lowers the omp simd loops for the baseline before cloning, and the AVX-512 clone then stays
// scalar.) setup.py compiles with -fno-trapping-math: with trapping maths GCC keeps a float
// comparison out of the selects that if-conversion needs, and only AVX-512's mask registers
// vectorise the loops anyway — the AVX2 copies stayed scalar.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>  // csrc/cpu/family_rows.h

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "rows.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UF_CPU_DISPATCH 1
#else
#define UF_CPU_DISPATCH 0
#endif

#if defined(__GNUC__)
#define UF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define UF_ALWAYS_INLINE inline
#endif

namespace unitsface {
namespace cpu {

enum IsaLevel { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(IsaLevel level) {
  return level == kAvx512 ? "avx512" : level == kAvx2 ? "avx2" : "base";
}

// The widest of the compiled instruction sets that this CPU runs.
inline IsaLevel detected_isa() {
#if UF_CPU_DISPATCH
  static const IsaLevel detected = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd")) {
      return kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2")) {
      return kAvx2;
    }
    return kBase;
  }();
  return detected;
#else
  return kBase;
#endif
}

// The instruction set whose row kernels run: detected_isa(), capped by
// UNITSFACE_NATIVE_ISA=base|avx2|avx512 when set (tests run every variant that way). Read at
// every call, so that a test can change it; _C.selected_isa() reports it.
inline IsaLevel isa_level() {
  const IsaLevel level = detected_isa();
  const char* env = std::getenv("UNITSFACE_NATIVE_ISA");
  if (env == nullptr || *env == '\0') return level;
  const std::string cap(env);
  TORCH_CHECK_VALUE(cap == "base" || cap == "avx2" || cap == "avx512",
                    "UNITSFACE_NATIVE_ISA must be base, avx2 or avx512, got '", cap, "'");
  const IsaLevel want = cap == "base" ? kBase : cap == "avx2" ? kAvx2 : kAvx512;
  return std::min(want, level);
}

template <typename T>
using UssRowFn = void (*)(const UssRows<T>&, int64_t, int64_t);
template <typename T>
using SoftmaxRowFn = void (*)(const SoftmaxRows<T>&, int64_t, int64_t);

// One instruction set's row kernels; each runs rows [r0, r1) of one chunk.
template <typename T>
struct RowKernels {
  UssRowFn<T> uss_fwd, uss_bwd, uss_fwd_grads;
  SoftmaxRowFn<T> softmax_fwd, softmax_bwd, softmax_fwd_grads;
  SoftmaxRowFn<T> family_fwd, family_bwd, family_fwd_grads;  // the margin family

  UssRowFn<T> uss(Pass pass) const {
    return pass == Pass::kForward ? uss_fwd : pass == Pass::kBackward ? uss_bwd : uss_fwd_grads;
  }
  // the margin softmax's kernels: the family's when any of its settings is on
  SoftmaxRowFn<T> softmax(Pass pass, bool family) const {
    if (family) {
      return pass == Pass::kForward    ? family_fwd
             : pass == Pass::kBackward ? family_bwd
                                       : family_fwd_grads;
    }
    return pass == Pass::kForward    ? softmax_fwd
           : pass == Pass::kBackward ? softmax_bwd
                                     : softmax_fwd_grads;
  }
};

// Defined by csrc/cpu/kernel_table.h inside each csrc/cpu/rows_<isa>.cpp.
namespace base {
template <typename T>
RowKernels<T> kernels();
}
#if UF_CPU_DISPATCH
namespace avx2 {
template <typename T>
RowKernels<T> kernels();
}
namespace avx512 {
template <typename T>
RowKernels<T> kernels();
}
#endif

// The row kernels of isa_level().
template <typename T>
const RowKernels<T>& row_kernels() {
#if UF_CPU_DISPATCH
  static const RowKernels<T> table[] = {base::kernels<T>(), avx2::kernels<T>(),
                                        avx512::kernels<T>()};
#else
  static const RowKernels<T> table[] = {base::kernels<T>()};
#endif
  return table[isa_level()];
}

// at::parallel_for over rows (torch's intra-op thread count), with a grain that gives each
// task at least ~16K elements of a chunk with `cols` columns.
template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, f);
}

}  // namespace cpu
}  // namespace unitsface
