// A small emulation of the CUDA execution model on the host, enough to run
// csd_ext's own kernels (csrc/cuda/csd_cuda_*_kernel*.cuh) unchanged on a
// machine without a GPU:
//   * a launch runs the grid's blocks one after another; each block runs its
//     threads as real std::threads, so __shared__ (a static here) is shared
//     by the block, and collectives wait for their peers;
//   * cub::WarpReduce and cub::BlockReduce (the only collectives the kernels
//     use) gather every participant's value behind a barrier and reduce them
//     in CUB's order: a shuffle tree within each warp (offsets 1, 2, 4, 8,
//     16), then the warp aggregates in warp order; the result is defined in
//     lane / thread 0 only, as in CUB.
// A warp's or a block's threads that return before a collective are not
// waited for, as on sm_70+ (the kernels only ever return whole groups).
//   * csd::exp_fast, which is ex2.approx.ftz on a GPU, gets that
//     instruction's error bound rather than exp2f's near-exact result: each
//     argument's result is moved by a pseudo-random -2..+2 ulp (a fixed
//     function of its bits, so a run is reproducible and equal inputs give
//     equal outputs), and results below the smallest normal flush to 0.
// What this cannot catch: data races, out-of-order memory effects, and
// anything about the real compiler's code generation; tests/cpp and the GPU
// tests (python_tests/test_cuda.py) cover the rest.
#pragma once

#define CSD_CUDA_EMULATION 1

#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// Which block is running and the barriers its collectives use.
struct BlockContext {
  int threads;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;  // whole warps exit together in csd's kernels
};

inline thread_local Dim3 thread_idx;
inline thread_local Dim3 block_idx;
inline thread_local BlockContext* context = nullptr;

constexpr int kWarpSize = 32;

// Runs kernel(args...) over `blocks` blocks of `threads` threads.  One
// std::thread per GPU thread of a block walks the blocks in turn, meeting at a
// barrier after each block, so __shared__ storage (a static) is never reused
// while another thread of the previous block still reads it.
template <typename Kernel, typename... Args>
void launch(int64_t blocks, int threads, Kernel kernel, const Args&... args) {
  BlockContext ctx;
  ctx.threads = threads;
  ctx.block = std::make_unique<std::barrier<>>(threads);
  for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
    ctx.warps.push_back(std::make_unique<std::barrier<>>(kWarpSize));
  }
  std::barrier<> block_done(threads);
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads));
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = Dim3{unsigned(t), 0, 0};
      context = &ctx;
      for (int64_t b = 0; b < blocks; ++b) {
        block_idx = Dim3{unsigned(b), 0, 0};
        kernel(args...);
        block_done.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
}

// CUB's warp shuffle tree over 32 values: after offsets 1, 2, 4, 8, 16, lane 0
// holds op(...(op(v0, v1), op(v2, v3))...).
template <typename T, typename Op>
T warp_tree(T* v, Op op) {
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    for (int lane = 0; lane + offset < kWarpSize; lane += 2 * offset) v[lane] = op(v[lane], v[lane + offset]);
  }
  return v[0];
}

// 2^a as ex2.approx.ftz.f32 may return it: within 2 ulp (CUDA documents 2
// ulp for exp2f, which is this instruction), subnormal results flushed to 0.
inline float ex2_approx_model(float a) {
  float y = std::exp2(a);
  if (std::isnan(y) || std::isinf(y)) return y;
  if (y < FLT_MIN) return 0.0f;  // ftz
  uint32_t abits, ybits;
  std::memcpy(&abits, &a, sizeof abits);
  std::memcpy(&ybits, &y, sizeof ybits);
  ybits += uint32_t(int(((abits * 2654435761u) >> 16) % 5u) - 2);  // -2..+2 ulp
  std::memcpy(&y, &ybits, sizeof y);
  return y >= FLT_MIN ? y : 0.0f;
}

}  // namespace emu

#define CSD_EX2_APPROX_MODEL ::emu::ex2_approx_model

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)

namespace cub {

template <typename T, int kLogicalWarpThreads>
class WarpReduce {
  static_assert(kLogicalWarpThreads == 32, "the emulation covers full warps only");

 public:
  struct TempStorage {
    T values[32];
  };
  explicit WarpReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    const int tid = int(threadIdx.x);
    const int lane = tid % 32;
    std::barrier<>& sync = *::emu::context->warps[tid / 32];
    storage_.values[lane] = input;
    sync.arrive_and_wait();
    T out = input;
    if (lane == 0) {
      T copy[32];
      for (int i = 0; i < 32; ++i) copy[i] = storage_.values[i];
      out = ::emu::warp_tree(copy, op);
    }
    sync.arrive_and_wait();  // nobody reuses the storage before lane 0 has read it
    return out;
  }

 private:
  TempStorage& storage_;
};

// BLOCK_REDUCE_WARP_REDUCTIONS, CUB's default: each warp reduces its own
// values, then thread 0 folds the warp aggregates in warp order.
template <typename T, int kBlockThreads>
class BlockReduce {
  static_assert(kBlockThreads % 32 == 0, "whole warps");

 public:
  struct TempStorage {
    T values[kBlockThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    const int tid = int(threadIdx.x);
    std::barrier<>& sync = *::emu::context->block;
    storage_.values[tid] = input;
    sync.arrive_and_wait();
    T out = input;
    if (tid == 0) {
      T aggregate{};
      for (int w = 0; w < kBlockThreads / 32; ++w) {
        T copy[32];
        for (int i = 0; i < 32; ++i) copy[i] = storage_.values[w * 32 + i];
        const T warp = ::emu::warp_tree(copy, op);
        aggregate = w == 0 ? warp : op(aggregate, warp);
      }
      out = aggregate;
    }
    sync.arrive_and_wait();
    return out;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
