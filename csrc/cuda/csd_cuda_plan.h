// Launch configurations of the CUDA kernels, chosen from the row length as
// PyTorch's SoftMax.cu does.  Plain host code (no CUDA headers) so the C++
// unit test can check every choice covers each row exactly.
//
//   V <= 4096         a warp per row, 8 rows per 256-thread block: a block
//                     per row would leave most of its threads idle and pay a
//                     block-wide reduction for a few KB of data.
//   V  > 4096         a 256-thread block per row (cub::BlockReduce).
//   V  > 4096 and     split rows: each row is cut into segments of >= 4096
//   N  < 2 x SMs      elements (at most 64), one block each, so that ~8
//                     blocks per SM are wanted; a second kernel (a warp per
//                     row, cub::WarpReduce) merges the segments' states.
// The backward needs no reduction: it always cuts long rows into 16384-
// element segments (one 256-thread block each: per thread, 8 chunk steps of
// 8 entries, or 4 of 16), and gives short rows a warp each.
#pragma once

#include <algorithm>
#include <cstdint>

namespace csd {
namespace gpu {

constexpr int kThreads = 256;                  // block size of every kernel
constexpr int kWarp = 32;
constexpr int64_t kWarpRowMaxVocab = 4096;     // up to this V, a warp per row
constexpr int64_t kMinSplitSegment = 4096;     // forward: shortest split segment
constexpr int64_t kBackwardSegment = 16384;    // backward: segment per block
constexpr int64_t kSegmentAlign = 64;          // segment starts keep the row's alignment
constexpr int64_t kMaxSegments = 2 * kWarp;    // the merge kernel's warp takes 2 per lane
constexpr int kBlocksPerSmWanted = 8;          // 8 x 256 threads = a full SM (2048)

// Minimum resident blocks per SM the kernels are compiled for
// (__launch_bounds__), which caps registers at 65536 / (256 * B): 128 for
// the forward, 80 for the backward.  They fit without spilling (the CUDA
// build check fails otherwise), except the backward's general variant for
// fp32 student and teacher, which holds two 16-byte vectors per tensor and
// every base's weight: it spilled a few bytes under 80 and gets 2 blocks
// (128).  fp64 (tests only) gets the full 255.  The kernels usually need fewer registers than
// the cap, and then more blocks fit (docs/kernels.md has the counts).
template <typename acc_t, bool kFp32General = false>
struct MinBlocks {
  static constexpr int kForward = sizeof(acc_t) == 8 ? 1 : 2;
  static constexpr int kBackward = sizeof(acc_t) == 8 ? 1 : kFp32General ? 2 : 3;
};

struct LaunchPlan {
  int group;        // threads per row segment: kWarp or kThreads
  int64_t segs;     // segments per row
  int64_t seg_len;  // elements per segment (the last one may be shorter)
  int64_t blocks;   // grid size (x)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Segments of at most `seg_len` (rounded up to kSegmentAlign) and no empty one.
inline void set_segments(LaunchPlan& p, int64_t vocab, int64_t seg_len) {
  p.seg_len = std::max<int64_t>(kSegmentAlign, ceil_div(seg_len, kSegmentAlign) * kSegmentAlign);
  p.segs = ceil_div(vocab, p.seg_len);
  if (p.segs == 1) p.seg_len = vocab;
}

inline LaunchPlan plan_forward(int64_t rows, int64_t vocab, int sm_count) {
  LaunchPlan p{};
  if (vocab <= kWarpRowMaxVocab) {
    p.group = kWarp;
    p.segs = 1;
    p.seg_len = vocab;
    p.blocks = ceil_div(rows, kThreads / kWarp);
    return p;
  }
  p.group = kThreads;
  int64_t segs = 1;
  if (rows < 2 * int64_t(sm_count)) {
    const int64_t wanted = ceil_div(int64_t(kBlocksPerSmWanted) * sm_count, std::max<int64_t>(rows, 1));
    segs = std::max<int64_t>(1, std::min({wanted, vocab / kMinSplitSegment, kMaxSegments}));
  }
  set_segments(p, vocab, ceil_div(vocab, segs));
  p.blocks = rows * p.segs;
  return p;
}

inline LaunchPlan plan_backward(int64_t rows, int64_t vocab) {
  LaunchPlan p{};
  if (vocab <= kWarpRowMaxVocab) {
    p.group = kWarp;
    p.segs = 1;
    p.seg_len = vocab;
    p.blocks = ceil_div(rows, kThreads / kWarp);
    return p;
  }
  p.group = kThreads;
  set_segments(p, vocab, kBackwardSegment);
  p.blocks = rows * p.segs;
  return p;
}

}  // namespace gpu
}  // namespace csd
