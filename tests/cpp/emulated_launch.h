// The host side of csd_cuda_forward.cu / csd_cuda_backward.cu -- the launch
// plan, the kernel arguments, the variant for the weighting, the split-row
// scratch states and the merge kernel -- with the kernels run under
// cuda_emulation.h instead of on a GPU.  Shared by the C++ emulation test
// (test_csd_cuda_emulated.cpp) and the emulated torch ops that run the GPU
// suite on the CPU (torch_emulated_ops.cpp), so both launch the kernels
// exactly as the real launchers do.
//
// Include cuda_emulation.h before this header.
#pragma once

#include <cstdint>
#include <vector>

#include "../../csrc/cuda/csd_cuda_backward_kernel.cuh"
#include "../../csrc/cuda/csd_cuda_forward_kernels.cuh"
#include "../../csrc/cuda/csd_cuda_variants.h"

namespace csd {
namespace gpu {

// Forward over [rows, vocab] rows at the given row strides (vocabulary stride
// 1), as launch_forward does for a GPU with `sms` multiprocessors; with
// force_general, the general variant whatever the weighting (to compare).
template <typename zs_t, typename ts_t, typename acc_t>
void emulated_forward(const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride, int64_t rows,
                      int64_t vocab, const bool* row_mask, const Mixture<double>& w1,
                      const Mixture<double>& w2, double inv_temp, acc_t* loss, acc_t* stats, int sms,
                      bool force_general = false) {
  const LaunchPlan plan = plan_forward(rows, vocab, sms);
  const ForwardArgs<acc_t> args = forward_args<acc_t>(rows, vocab, zstride, tstride, plan, row_mask, loss,
                                                      stats, nullptr, w1, w2, inv_temp);
  auto launch = [&](auto variant) {
    constexpr unsigned kBases = decltype(variant)::value;
    ForwardArgs<acc_t> a = args;
    std::vector<RowState<acc_t, kBases>> partial(size_t(plan.segs > 1 ? rows * plan.segs : 0));
    if (!partial.empty()) a.partial = partial.data();
    emu::launch(plan.blocks, kThreads, csd_forward_kernel<zs_t, ts_t, acc_t, kBases>, z, t, a);
    if (plan.segs > 1) {
      emu::launch(ceil_div(rows, kThreads / kWarp), kThreads, csd_merge_segments_kernel<acc_t, kBases>, a);
    }
  };
  if (force_general) {
    launch(BaseTag<kBaseAll>{});
  } else {
    with_variant<zs_t, ts_t, acc_t>(args.math.need, launch);
  }
}

// Backward into a contiguous [rows, vocab] gradient, as launch_backward does;
// grad_loss is read at row * grad_loss_stride (0: a broadcast scalar).
template <typename zs_t, typename ts_t, typename acc_t>
void emulated_backward(zs_t* grad, const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride,
                       int64_t rows, int64_t vocab, const acc_t* grad_loss, int64_t grad_loss_stride,
                       const acc_t* stats, const Mixture<double>& w1, const Mixture<double>& w2,
                       double inv_temp, bool force_general = false) {
  const LaunchPlan plan = plan_backward(rows, vocab);
  const BackwardArgs<acc_t> a = backward_args<acc_t>(rows, vocab, zstride, tstride, plan, grad_loss,
                                                     grad_loss_stride, stats, w1, w2, inv_temp);
  auto launch = [&](auto variant) {
    emu::launch(plan.blocks, kThreads, csd_backward_kernel<zs_t, ts_t, acc_t, decltype(variant)::value>, grad,
                z, t, a);
  };
  if (force_general) {
    launch(BaseTag<kBaseAll>{});
  } else {
    with_variant<zs_t, ts_t, acc_t>(a.need, launch);
  }
}

}  // namespace gpu
}  // namespace csd
