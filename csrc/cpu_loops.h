// Helpers of the CPU epilogue loops (csrc/uss.cpp, csrc/unitsface.cpp).
//
// The epilogues are plain loops over a row's chunk of columns, written so that the compiler
// vectorises them: `#pragma omp simd` reductions, selects instead of branches, masks read as
// bytes, the polynomial exp/log1p of epilogue.h. The extension is built without -march flags,
// so the row kernels (csrc/uss_rows.h, csrc/unitsface_rows.h) are compiled three times, for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, each inside a
// `#pragma GCC target` region, and isa_level() picks one at run time. (GCC's target_clones
// does not do: it lowers the omp simd loops for the baseline before cloning, and the AVX-512
// clone then stays scalar.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

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

enum IsaLevel { kBase = 0, kAvx2 = 3, kAvx512 = 4 };

// The widest of the compiled instruction sets that this CPU runs, capped by
// UNITSFACE_NATIVE_ISA=base|avx2|avx512 when set (tests run every variant that way).
inline IsaLevel isa_level() {
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
  IsaLevel level = detected;
  if (const char* env = std::getenv("UNITSFACE_NATIVE_ISA")) {
    const std::string cap(env);
    const IsaLevel want = cap == "base" ? kBase : cap == "avx2" ? kAvx2 : kAvx512;
    level = want < level ? want : level;
  }
  return level;
#else
  return kBase;
#endif
}

// The data of an optional tensor (an undefined one: nullptr), for the row kernels' argument
// structs.
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
const T* const_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
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
