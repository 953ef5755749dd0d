// Definitions shared by every C++ (CPU) and CUDA source of the extension.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UF_HOST_DEVICE inline
#endif

namespace unitsface {

// Elements per chunk buffer forced by UNITSFACE_NATIVE_CHUNK_ELEMS (tests force many chunks
// with it), or 0 when it is unset or not a positive number: the CPU sweep (csrc/chunking.h)
// and the CUDA sweep's plan (csrc/cuda_plan.h) both read it here.
inline int64_t forced_chunk_elems() {
  const char* env = std::getenv("UNITSFACE_NATIVE_CHUNK_ELEMS");
  const long long v = env != nullptr ? std::atoll(env) : 0;
  return v > 0 ? static_cast<int64_t>(v) : 0;
}

}  // namespace unitsface
