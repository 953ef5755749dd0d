// A host emulation of the little of CUDA that the unitsface sweep's kernels use
// (csrc/cuda/sweep_*.cuh), for tests without a GPU. A launch runs its blocks one
// after another; the threads of a block are fibers (ucontext) on the calling thread, switched
// at the points where CUDA threads synchronise: __shfl_xor_sync is a barrier of the warp
// (each lane's value goes through a per-warp slot array, double-buffered so that a lane that
// runs ahead into the next shuffle cannot overwrite a value that another lane has still to
// read), __syncthreads a barrier of the block. (OS threads instead of fibers cost a futex
// wake-up per lane and barrier: minutes per test file on two cores.) __shared__ variables are
// function statics: one block runs at a time. A kernel whose lanes do not take part in a
// warp-wide shuffle together never leaves the barrier here, as it would misbehave on a GPU.
//
// Include after the ATen / torch headers (the macros below must not reach them), then the
// kernels and their driver (csrc/emu/unitsface_cuda_emu.cpp).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

namespace cuda_emu {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = size_t(128) << 10;  // per fiber; the kernels' frames are small

struct Barrier {
  unsigned count = 0, generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  dim3 thread;
  unsigned flat = 0;    // the thread's index in its block
  unsigned parity = 0;  // which half of the warp's slots its next shuffle uses
  bool done = false;
};

// One block in flight: its fibers, its barriers and the warps' shuffle slots.
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_bars;
  Barrier block_bar;
  std::vector<unsigned char> slots;  // per warp: 2 halves × 32 lanes × 8 bytes
};

inline thread_local Block* tl_block = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;
inline thread_local const std::function<void()>* tl_kernel = nullptr;
inline thread_local dim3 tl_blockidx;
inline thread_local dim3 g_grid, g_block;
// kernel launches so far (tests/test_cuda_emu.py counts a step's with it)
inline int64_t g_launches = 0;

inline void yield() { swapcontext(&tl_fiber->ctx, &tl_block->scheduler); }

// Wait until n threads have arrived (a generation counter: the barrier is reusable at once).
inline void arrive_and_wait(Barrier& b, unsigned n) {
  const unsigned gen = b.generation;
  if (++b.count == n) {
    b.count = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void fiber_entry() {
  (*tl_kernel)();
  tl_fiber->done = true;  // returning resumes the scheduler (uc_link)
}

// runs fn() as the threads of every block of the grid
inline void run(dim3 grid, dim3 block, const std::function<void()>& fn) {
  g_grid = grid;
  g_block = block;
  ++g_launches;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned warps = (threads + kWarp - 1) / kWarp;
  static thread_local std::vector<std::vector<char>> stacks;
  if (stacks.size() < threads) stacks.resize(threads, std::vector<char>(kStackBytes));
  Block b;
  b.fibers.resize(threads);
  tl_block = &b;
  tl_kernel = &fn;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        tl_blockidx = dim3(bx, by, bz);
        b.warp_bars.assign(warps, Barrier{});
        b.block_bar = Barrier{};
        b.slots.assign(size_t(warps) * 2 * kWarp * 8, 0);
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.flat = t;
          f.parity = 0;
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks[t].data();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, &fiber_entry, 0);
        }
        // round robin until every thread has returned; each runs to its next barrier
        for (unsigned live = threads; live > 0;) {
          for (Fiber& f : b.fibers) {
            if (f.done) continue;
            tl_fiber = &f;
            swapcontext(&b.scheduler, &f.ctx);
            if (f.done) --live;
          }
        }
      }
  tl_block = nullptr;
  tl_fiber = nullptr;
}

}  // namespace cuda_emu

#define threadIdx (cuda_emu::tl_fiber->thread)
#define blockIdx (cuda_emu::tl_blockidx)
#define gridDim (cuda_emu::g_grid)
#define blockDim (cuda_emu::g_block)

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int offset) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  cuda_emu::Block* b = cuda_emu::tl_block;
  cuda_emu::Fiber* f = cuda_emu::tl_fiber;
  const unsigned lane = f->flat % cuda_emu::kWarp, warp = f->flat / cuda_emu::kWarp;
  unsigned char* slots = b->slots.data() + (size_t(warp) * 2 + f->parity) * cuda_emu::kWarp * 8;
  f->parity ^= 1u;
  std::memcpy(slots + lane * 8, &v, sizeof(T));
  cuda_emu::arrive_and_wait(b->warp_bars[warp], cuda_emu::kWarp);
  T out;
  std::memcpy(&out, slots + (lane ^ unsigned(offset)) * 8, sizeof(T));
  return out;
}

inline void __syncthreads() {
  cuda_emu::arrive_and_wait(cuda_emu::tl_block->block_bar,
                            cuda_emu::g_block.x * cuda_emu::g_block.y * cuda_emu::g_block.z);
}
