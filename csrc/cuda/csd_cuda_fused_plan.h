// Launch plan of the fused forward+gradient kernel (csd_cuda_fused_kernel.cuh):
// how many blocks of a thread-block cluster share one row, and how much
// dynamic shared memory each needs.  Plain host C++ (no CUDA headers), shared
// by the real launcher (csd_cuda_fused.cu) and the emulation
// (tests/cpp/emulated_launch.h), so both plan exactly alike.
//
// Each block holds its segment of the row -- student and teacher logits --
// in shared memory, as 16-byte vectors: seg_len elements take
// seg_len / W + 1 vectors per tensor (W elements per 16 bytes; the extra
// vector absorbs a row start that is not 16-byte aligned).
//
//   cluster C      the smallest of 1, 2, 4, 8 (portable cluster sizes) whose
//                  segment fits twice in an SM's shared memory (two resident
//                  blocks, so one block's copies overlap the other's math);
//                  else the smallest whose segment fits once; else the row
//                  does not fit and the caller takes the two-pass kernels.
//   small batches  C doubles (up to 8) while rows * C blocks would not fill
//                  one wave and the segments keep >= kFusedMinSegment
//                  elements, so a short batch still spreads over the GPU.
//
// H100/H200 (228 KB shared memory per SM, 227 KB per block): bf16 V = 32000
// -> C = 1, 125 KB ... see docs/kernels.md for the table.
#pragma once

#include <cstddef>
#include <cstdint>

namespace csd {
namespace gpu {

constexpr int kFusedThreads = 256;         // threads per block (8 warps)
constexpr int kFusedMaxCluster = 8;        // largest portable cluster size
constexpr int kFusedStages = 4;            // cp.async groups per thread (pipeline depth)
constexpr int64_t kFusedMinSegment = 4096; // small batches: shortest segment worth a block
constexpr size_t kFusedSmemReserve = 1024; // per-block shared memory the driver reserves (sm_80+)
constexpr int kFusedSlotBytes = 128;       // dynamic shared memory ahead of the rows: reduction slots

struct FusedPlan {
  bool fits;          // false: the row does not fit in C <= 8 blocks' shared memory
  int cluster;        // blocks per row (cluster size)
  int64_t seg_len;    // elements per block, a multiple of W (the last block's may be shorter)
  int64_t vecs;       // 16-byte vectors per tensor in shared memory
  int64_t blocks;     // grid size: rows * cluster
  size_t smem_bytes;  // dynamic shared memory per block (slots + both tensors' vectors)
  int blocks_per_sm;  // resident blocks per SM by shared memory and threads
};

// Whether every row of z and t reaches 16-byte alignment after the same
// number of elements (the kernel keeps one shared-memory offset per row):
// the base addresses agree mod 16, and so do the row strides in bytes.
inline bool fused_alignment_ok(const void* z, const void* t, int64_t zstride, int64_t tstride,
                               int elem_bytes) {
  const auto zp = reinterpret_cast<uintptr_t>(z), tp = reinterpret_cast<uintptr_t>(t);
  return zp % 16 == tp % 16 && ((zstride - tstride) * elem_bytes) % 16 == 0;
}

// csd_loss_grad's part of the fused kernel's arguments (FusedArgs::total and
// what goes with it; csd_cuda_fused_kernel.cuh).
struct FusedReduction {
  const int64_t* labels = nullptr;  // [rows] or nullptr: every row counts
  int64_t ignore_index = -100;
  bool mean = true;                 // "mean", else "sum"
  float* total = nullptr;           // the reduced loss: one float
  unsigned* ticket = nullptr;       // a zeroed counter (csd_cuda_ticket.h)
};

// csd_loss_grad: a mean over labels of more rows than this is not counted in
// the kernel (each row's cluster would read all the labels: 8 rows^2 bytes)
// but takes the composed path (csd_cuda_fused_ops.cpp explains the bound).
constexpr int64_t kMaxRowsCountedInKernel = 4096;

inline int64_t fused_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// elem_bytes: bytes per logit (2 for bf16/fp16, 4 for fp32), the same for
// student and teacher.  smem_per_block: the opt-in maximum per block;
// smem_per_sm: per multiprocessor (cudaDeviceProp).
// min_cluster (a power of two <= 8; tests) raises the smallest cluster tried.
inline FusedPlan plan_fused(int64_t rows, int64_t vocab, int elem_bytes, int sm_count,
                            size_t smem_per_block, size_t smem_per_sm, int min_cluster = 1) {
  const int64_t W = 16 / elem_bytes;
  auto make = [&](int c) {
    FusedPlan p{};
    p.cluster = c;
    p.seg_len = fused_ceil_div(fused_ceil_div(vocab, c), W) * W;
    p.vecs = p.seg_len / W + 1;
    p.smem_bytes = size_t(kFusedSlotBytes) + size_t(2 * p.vecs * 16);
    p.blocks = rows * c;
    const size_t per_block = p.smem_bytes + kFusedSmemReserve;
    const int by_threads = 2048 / kFusedThreads;
    const int by_smem = int(smem_per_sm / per_block);
    p.blocks_per_sm = by_smem < by_threads ? by_smem : by_threads;
    p.fits = p.smem_bytes <= smem_per_block && p.blocks_per_sm >= 1;
    return p;
  };
  FusedPlan best{};
  best.fits = false;
  for (int c = min_cluster; c <= kFusedMaxCluster && !best.fits; c *= 2) {
    const FusedPlan p = make(c);
    if (p.fits && p.blocks_per_sm >= 2) best = p;
  }
  for (int c = min_cluster; c <= kFusedMaxCluster && !best.fits; c *= 2) {
    const FusedPlan p = make(c);
    if (p.fits) best = p;
  }
  if (!best.fits) return best;
  while (best.cluster < kFusedMaxCluster &&
         rows * best.cluster < int64_t(sm_count) * best.blocks_per_sm &&
         fused_ceil_div(vocab, 2 * best.cluster) >= kFusedMinSegment) {
    best = make(2 * best.cluster);
  }
  return best;
}

}  // namespace gpu
}  // namespace csd
