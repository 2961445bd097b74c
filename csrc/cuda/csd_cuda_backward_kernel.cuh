// The backward kernel, included by csd_cuda_backward.cu and, on the host, by
// tests/cpp/test_csd_cuda_emulated.cpp (see csd_cuda_forward_kernels.cuh).
// It re-reads the logits, recomputes the weights from the log-sum-exps saved
// by the forward, and writes the gradient once, with 1/2 * grad_loss[row] *
// row weight folded in.  No reduction, so one kernel covers every row length:
// `group` threads (a warp or the whole block) per row segment, see
// csd_cuda_plan.h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "csd_cuda_forward_kernels.cuh"  // cast_mixture
#include "csd_cuda_plan.h"
#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {

template <typename acc_t>
struct BackwardArgs {
  int64_t rows, vocab;
  int64_t zstride, tstride;  // row strides of the inputs; the gradient is contiguous
  int64_t segs, seg_len;
  int group;                 // threads per row segment; divides blockDim.x
  const acc_t* grad_loss;
  int64_t grad_loss_stride;  // 0 when autograd hands over an expanded scalar
  const acc_t* stats;        // [rows, kNumStats], contiguous
  Mixture<acc_t> w1, w2;
  Needs need;
  acc_t inv_temp;
};

template <typename zs_t, typename ts_t, typename acc_t, unsigned kBases>
__global__ void __launch_bounds__(
    kThreads, (MinBlocks<acc_t, kBases == kBaseAll && std::is_same_v<zs_t, float> &&
                                    std::is_same_v<ts_t, float>>::kBackward))
    csd_backward_kernel(zs_t* __restrict__ grad, const zs_t* __restrict__ student,
                        const ts_t* __restrict__ teacher, const BackwardArgs<acc_t> a) {
  const int lane = int(threadIdx.x) % a.group;
  const int64_t item = int64_t(blockIdx.x) * (kThreads / a.group) + int(threadIdx.x) / a.group;
  if (item >= a.rows * a.segs) return;
  const int64_t row = item / a.segs;
  const int64_t seg = item - row * a.segs;
  const int64_t begin = seg * a.seg_len;
  const int n = int(a.vocab - begin < a.seg_len ? a.vocab - begin : a.seg_len);

  const acc_t* st = a.stats + row * kNumStats;
  const acc_t weight = st[kRowWeight];
  GradMath<acc_t> g;
  g.need = a.need;
  g.inv_temp = a.inv_temp;
  g.max_s = st[kMaxS];
  g.max_t = st[kMaxT];
  g.live = weight != acc_t(0);  // ignored token: exact zeros, whatever its logits hold
  const acc_t half_scale = g.live ? acc_t(0.5) * a.grad_loss[row * a.grad_loss_stride] * weight : acc_t(0);
  g.coeffs = grad_coeffs_of_row(a.w1, a.w2, st, half_scale);
  grad_segment<kBases>(grad + row * a.vocab + begin, student + row * a.zstride + begin,
               teacher + row * a.tstride + begin, n, lane, a.group, g);
}

// The backward kernel's arguments; grad_loss is read at row * grad_loss_stride
// (0 for an expanded scalar).
template <typename acc_t>
BackwardArgs<acc_t> backward_args(int64_t rows, int64_t vocab, int64_t zstride, int64_t tstride,
                                  const LaunchPlan& plan, const acc_t* grad_loss,
                                  int64_t grad_loss_stride, const acc_t* stats,
                                  const Mixture<double>& w1, const Mixture<double>& w2,
                                  double inv_temperature) {
  BackwardArgs<acc_t> a{};
  a.rows = rows;
  a.vocab = vocab;
  a.zstride = zstride;
  a.tstride = tstride;
  a.segs = plan.segs;
  a.seg_len = plan.seg_len;
  a.group = plan.group;
  a.grad_loss = grad_loss;
  a.grad_loss_stride = grad_loss_stride;
  a.stats = stats;
  a.w1 = cast_mixture<acc_t>(w1);
  a.w2 = cast_mixture<acc_t>(w2);
  a.need = needs_of(a.w1, a.w2);
  a.inv_temp = acc_t(inv_temperature);
  return a;
}

}  // namespace gpu
}  // namespace csd
