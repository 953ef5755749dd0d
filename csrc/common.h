// Definitions shared by every C++ (CPU) and CUDA source of the extension.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UF_HOST_DEVICE inline
#endif

