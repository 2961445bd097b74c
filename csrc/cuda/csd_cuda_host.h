// The host side of the CUDA kernels' launches, written once: the launch plan
// (csd_cuda_plan.h), the kernel arguments, the variant for the weighting
// (csd_cuda_variants.h), the scratch states of split rows and the merge
// launch.  Shared by the real launchers (csd_cuda_forward.cu,
// csd_cuda_backward.cu, which launch with <<<>>> on the current stream) and
// the emulation (tests/cpp/emulated_launch.h, which launches under
// tests/cpp/cuda_emulation.h), so the emulated kernels run with exactly the
// real plans.  No ATen and no CUDA runtime here: the caller passes
//
//   launch(kernel, blocks, threads, args...)   launches kernel<<<blocks, threads>>>(args...)
//                                              in stream order;
//   scratch(bytes) -> void*                    device memory for split-row states that stays
//                                              valid until the launches have run.
#pragma once

#include <cstdint>

#include "csd_cuda_backward_kernel.cuh"
#include "csd_cuda_forward_kernels.cuh"
#include "csd_cuda_plan.h"
#include "csd_cuda_variants.h"

namespace csd {
namespace gpu {

// Forward over [rows, vocab] rows at the given row strides (vocabulary
// stride 1), for a GPU with `sms` multiprocessors: loss [rows] and stats
// [rows, kNumStats].  With force_general, the general variant whatever the
// weighting (tests compare the two).
template <typename zs_t, typename ts_t, typename acc_t, typename Scratch, typename Launch>
void run_forward(const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride, int64_t rows, int64_t vocab,
                 const bool* row_mask, const Mixture<double>& w1, const Mixture<double>& w2, double inv_temp,
                 acc_t* loss, acc_t* stats, int sms, Scratch&& scratch, Launch&& launch,
                 bool force_general = false) {
  const LaunchPlan plan = plan_forward(rows, vocab, sms);
  const ForwardArgs<acc_t> args = forward_args<acc_t>(rows, vocab, zstride, tstride, plan, row_mask, loss,
                                                      stats, nullptr, w1, w2, inv_temp);
  auto run = [&](auto variant) {
    constexpr unsigned kBases = decltype(variant)::value;
    ForwardArgs<acc_t> a = args;
    if (plan.segs > 1) {
      // rows * segs states of at most 12 acc_t each: small, since rows < 2 x SMs here.
      a.partial = scratch(int64_t(sizeof(RowState<acc_t, kBases>)) * rows * plan.segs);
    }
    launch(csd_forward_kernel<zs_t, ts_t, acc_t, kBases>, plan.blocks, kThreads, z, t, a);
    if (plan.segs > 1) {
      launch(csd_merge_segments_kernel<acc_t, kBases>, ceil_div(rows, kThreads / kWarp), kThreads, a);
    }
  };
  if (force_general) {
    run(BaseTag<kBaseAll>{});
  } else {
    with_variant<zs_t, ts_t, acc_t>(args.math.need, run);
  }
}

// Backward into a contiguous [rows, vocab] gradient; grad_loss is read at
// row * grad_loss_stride (0: an expanded scalar).
template <typename zs_t, typename ts_t, typename acc_t, typename Launch>
void run_backward(zs_t* grad, const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride, int64_t rows,
                  int64_t vocab, const acc_t* grad_loss, int64_t grad_loss_stride, const acc_t* stats,
                  const Mixture<double>& w1, const Mixture<double>& w2, double inv_temp, Launch&& launch,
                  bool force_general = false) {
  const LaunchPlan plan = plan_backward(rows, vocab);
  const BackwardArgs<acc_t> a = backward_args<acc_t>(rows, vocab, zstride, tstride, plan, grad_loss,
                                                     grad_loss_stride, stats, w1, w2, inv_temp);
  auto run = [&](auto variant) {
    launch(csd_backward_kernel<zs_t, ts_t, acc_t, decltype(variant)::value>, plan.blocks, kThreads, grad, z, t, a);
  };
  if (force_general) {
    run(BaseTag<kBaseAll>{});
  } else {
    with_variant<zs_t, ts_t, acc_t>(a.need, run);
  }
}

}  // namespace gpu
}  // namespace csd
