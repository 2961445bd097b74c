// Backward kernel: re-reads the logits, recomputes the weights from the
// log-sum-exps saved by the forward, and writes the gradient once, with
// 1/2 * grad_loss[row] * row weight folded in.  No reduction, so one kernel
// covers every row length: `group` threads (a warp or the whole block) per
// row segment, see csd_cuda_plan.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>

#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_launch.h"
#include "csd_cuda_plan.h"
#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {
namespace {

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

template <typename zs_t, typename ts_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, MinBlocks<acc_t>::kBackward)
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
  g.w1 = a.w1;
  g.w2 = a.w2;
  g.need = a.need;
  g.inv_temp = a.inv_temp;
  g.lse_s = st[kLseS];
  g.lse_t = st[kLseT];
  g.inv_count = st[kInvCount];
  g.mean1 = st[kMean1];
  g.mean2 = st[kMean2];
  g.live = weight != acc_t(0);  // ignored token: exact zeros, whatever its logits hold
  g.half_scale = g.live ? acc_t(0.5) * a.grad_loss[row * a.grad_loss_stride] * weight : acc_t(0);
  grad_segment(grad + row * a.vocab + begin, student + row * a.zstride + begin,
               teacher + row * a.tstride + begin, n, lane, a.group, g);
}

template <typename acc_t>
Mixture<acc_t> cast_mixture(const Mixture<double>& m) {
  return {acc_t(m.s), acc_t(m.t), acc_t(m.u)};
}

}  // namespace

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const LaunchPlan plan = plan_backward(rows, vocab);
  TORCH_CHECK(plan.blocks > 0 && plan.blocks <= INT_MAX,
              "csd_backward: too many rows for one launch (", plan.blocks, " blocks)");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_backward_cuda", [&] {
    BackwardArgs<acc_t> a{};
    a.rows = rows;
    a.vocab = vocab;
    a.zstride = student.stride(0);
    a.tstride = teacher.stride(0);
    a.segs = plan.segs;
    a.seg_len = plan.seg_len;
    a.group = plan.group;
    a.grad_loss = grad_loss.const_data_ptr<acc_t>();
    a.grad_loss_stride = grad_loss.stride(0);
    a.stats = stats.const_data_ptr<acc_t>();
    a.w1 = cast_mixture<acc_t>(cfg.w1);
    a.w2 = cast_mixture<acc_t>(cfg.w2);
    a.need = needs_of(a.w1, a.w2);
    a.inv_temp = acc_t(cfg.inv_temperature);
    csd_backward_kernel<zs_t, ts_t, acc_t>
        <<<static_cast<unsigned int>(plan.blocks), kThreads, 0, stream>>>(
            grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(),
            teacher.const_data_ptr<ts_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace csd
