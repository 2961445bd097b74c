// The forward kernels, included by csd_cuda_forward.cu and, on the host, by
// tests/cpp/test_csd_cuda_emulated.cpp, which runs them under an emulation of
// the CUDA execution model (a std::thread per GPU thread, CUB's reductions
// replayed in CUB's order) so that CI without a GPU runs the kernels' own
// indexing, masking and reduction code, not a copy of it.
//
//   csd_forward_kernel          a warp per row, 8 rows per block (cub::WarpReduce),
//                               or a block per row or row segment (cub::BlockReduce)
//   csd_merge_segments_kernel   split rows: merges the segments' states
// See csd_cuda_plan.h for when each is used, csd_cuda_rows.h for the
// per-thread walk over a row, and docs/kernels.md for the design.
#pragma once

#ifndef CSD_CUDA_EMULATION
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#endif

#include <cstdint>

#include "csd_cuda_plan.h"
#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {

template <typename acc_t>
struct ForwardArgs {
  int64_t rows, vocab;
  int64_t zstride, tstride;  // row strides, in elements
  int64_t segs, seg_len;
  int group;                 // threads per row segment: kWarp or kThreads
  const bool* row_mask;      // nullptr: every row counts
  acc_t* loss;               // [rows]
  acc_t* stats;              // [rows, kNumStats], contiguous
  void* partial;             // [rows, segs] RowState<acc_t, kBases> of the launched variant, when segs > 1
  Mixture<acc_t> w1, w2;
  ForwardMath<acc_t> math;
};

template <typename acc_t>
__device__ __forceinline__ void write_row(const ForwardArgs<acc_t>& a, int64_t row,
                                          const RowResult<acc_t>& r, bool counted) {
  store_row_result(r, counted, a.loss + row, a.stats + row * kNumStats);
}

template <typename acc_t>
__device__ __forceinline__ RowResult<acc_t> ignored_row() {
  return {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// `group` threads per row segment: a warp (kThreads / kWarp segments per
// block, cub::WarpReduce) or the whole block (cub::BlockReduce).  Every exit
// before the reduction is taken by a whole group, so the CUB collectives
// always see all their threads; `group` is the same for the whole grid.
template <typename zs_t, typename ts_t, typename acc_t, unsigned kBases>
__global__ void __launch_bounds__(kThreads, MinBlocks<acc_t>::kForward)
    csd_forward_kernel(const zs_t* __restrict__ student, const ts_t* __restrict__ teacher,
                       const ForwardArgs<acc_t> a) {
  using State = RowState<acc_t, kBases>;
  using BlockReduce = cub::BlockReduce<State, kThreads>;
  using WarpReduce = cub::WarpReduce<State, kWarp>;
  // Each TempStorage is used once per block, so none needs a __syncthreads
  // before reuse.
  __shared__ union {
    typename BlockReduce::TempStorage block;
    typename WarpReduce::TempStorage warp[kThreads / kWarp];
  } tmp;

  const int lane = int(threadIdx.x) % a.group;
  const int slot = int(threadIdx.x) / a.group;
  const int64_t item = int64_t(blockIdx.x) * (kThreads / a.group) + slot;
  if (item >= a.rows * a.segs) return;  // the last block of a warp-per-row launch
  const int64_t row = item / a.segs;
  const int64_t seg = item - row * a.segs;
  if (a.row_mask != nullptr && !a.row_mask[row]) {
    // Ignored token: no reads.  A split row is written by the merge kernel.
    if (a.segs == 1 && lane == 0) write_row(a, row, ignored_row<acc_t>(), false);
    return;
  }
  const int64_t begin = seg * a.seg_len;
  const int n = int(a.vocab - begin < a.seg_len ? a.vocab - begin : a.seg_len);

  State st = empty_state<acc_t, kBases>();
  accumulate_segment(st, student + row * a.zstride + begin, teacher + row * a.tstride + begin, n,
                     lane, a.group, a.math);
  // The aggregate is valid in lane 0 of the group only.
  if (a.group == kThreads) {
    st = BlockReduce(tmp.block).Reduce(st, MergeState{});
  } else {
    st = WarpReduce(tmp.warp[slot]).Reduce(st, MergeState{});
  }
  if (lane != 0) return;
  if (a.segs == 1) {
    write_row(a, row, finalize_row(st.s(), st.t(), st.u(), a.w1, a.w2), true);
  } else {
    static_cast<State*>(a.partial)[item] = st;
  }
}

// blockIdx.x read anew (volatile), so that the compiler cannot keep an earlier copy live.
__device__ __forceinline__ unsigned fresh_block_index() {
#if defined(__CUDA_ARCH__)
  unsigned b;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(b));
  return b;
#else
  return blockIdx.x;
#endif
}

// A warp per row: lane l merges the states of segments l and l + 32, then
// cub::WarpReduce merges the lanes (segs <= kMaxSegments).
template <typename acc_t, unsigned kBases>
__global__ void __launch_bounds__(kThreads) csd_merge_segments_kernel(const ForwardArgs<acc_t> a) {
  using State = RowState<acc_t, kBases>;
  using WarpReduce = cub::WarpReduce<State, kWarp>;
  __shared__ typename WarpReduce::TempStorage tmp[kThreads / kWarp];
  const int lane = int(threadIdx.x) % kWarp;
  const int slot = int(threadIdx.x) / kWarp;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / kWarp) + slot;
  if (row >= a.rows) return;  // whole warps leave together
  if (a.row_mask != nullptr && !a.row_mask[row]) {
    if (lane == 0) write_row(a, row, ignored_row<acc_t>(), false);
    return;
  }
  const State* part = static_cast<const State*>(a.partial) + row * a.segs;
  State st = lane < a.segs ? part[lane] : empty_state<acc_t, kBases>();
  if (lane + kWarp < a.segs) st = merge_state(st, part[lane + kWarp]);
  st = WarpReduce(tmp[slot]).Reduce(st, MergeState{});
  // The row index is re-derived here rather than kept live: merge_state's fp32 divisions call a
  // subroutine, and holding `row` across those calls made ptxas spill it on sm_100.
  const int64_t out_row = int64_t(fresh_block_index()) * (kThreads / kWarp) + int(threadIdx.x) / kWarp;
  if (lane == 0) write_row(a, out_row, finalize_row(st.s(), st.t(), st.u(), a.w1, a.w2), true);
}

template <typename acc_t>
Mixture<acc_t> cast_mixture(const Mixture<double>& m) {
  return {acc_t(m.s), acc_t(m.t), acc_t(m.u)};
}

// The forward kernels' arguments for [rows, vocab] inputs with the given row
// strides; `partial` holds rows * plan.segs states of the variant that will
// be launched when plan.segs > 1.
template <typename acc_t>
ForwardArgs<acc_t> forward_args(int64_t rows, int64_t vocab, int64_t zstride, int64_t tstride,
                                const LaunchPlan& plan, const bool* row_mask, acc_t* loss,
                                acc_t* stats, void* partial, const Mixture<double>& w1,
                                const Mixture<double>& w2, double inv_temperature) {
  ForwardArgs<acc_t> a{};
  a.rows = rows;
  a.vocab = vocab;
  a.zstride = zstride;
  a.tstride = tstride;
  a.segs = plan.segs;
  a.seg_len = plan.seg_len;
  a.group = plan.group;
  a.row_mask = row_mask;
  a.loss = loss;
  a.stats = stats;
  a.partial = partial;
  a.w1 = cast_mixture<acc_t>(w1);
  a.w2 = cast_mixture<acc_t>(w2);
  a.math = {needs_of(a.w1, a.w2), acc_t(inv_temperature)};
  return a;
}

}  // namespace gpu
}  // namespace csd
