// Definitions shared by every C++ (CPU) and CUDA source of the extension.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UF_HOST_DEVICE inline
#endif

namespace unitsface {

// F.normalize's eps: x̂ = x / max(||x||, kNormEps) (docs/design.md §1).
constexpr double kNormEps = 1e-5;

}  // namespace unitsface
