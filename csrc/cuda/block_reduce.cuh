// Block-level reductions of the CUDA kernels (csrc/cuda/uss_rows.cuh, csrc/cuda/unitsface_sweep.cu,
// csrc/cuda/bank_update.cu). One thread block handles one row of a chunk: its threads stride
// over the chunk's columns, each keeping running sums / (max, sum-exp) pairs with the
// functions of csrc/epilogue.h, and the block combines them here. Only thread 0's result is
// meaningful (block_sum_all: every thread's). The order of combination depends only on
// threadIdx: results are deterministic.
#pragma once

#include "epilogue.h"

namespace unitsface {
namespace cuda_epi {

constexpr int kThreads = 256;  // a multiple of 32
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ void warp_lse(T& m, T& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
    epi::lse_merge<T>(m, s, m2, s2);
  }
}

// Sums of K values over the block (the result in thread 0).
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  __shared__ T smem[kWarps][K];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum<T>(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp][k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kWarps ? smem[lane][k] : T(0);
      v[k] = warp_sum<T>(v[k]);
    }
  }
  __syncthreads();  // smem may be reused by a following reduction
}

// The sum of v over the block, returned to every thread.
template <typename T>
__device__ __forceinline__ T block_sum_all(T v) {
  __shared__ T total;
  T a[1] = {v};
  block_sum<T, 1>(a);
  if (threadIdx.x == 0) total = a[0];
  __syncthreads();
  const T out = total;
  __syncthreads();  // `total` may be written by a following call
  return out;
}

// (max, Σ e^{z − max}) pairs over the block (the result in thread 0).
template <typename T>
__device__ __forceinline__ void block_lse(T& m, T& s) {
  __shared__ T sm[kWarps], ss[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_lse<T>(m, s);
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? sm[lane] : static_cast<T>(epi::kNegBig);
    s = lane < kWarps ? ss[lane] : T(0);
    warp_lse<T>(m, s);
  }
  __syncthreads();
}

}  // namespace cuda_epi
}  // namespace unitsface
