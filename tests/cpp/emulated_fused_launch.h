// The host side of csd_cuda_fused.cu -- the plan, the alignment test, the
// arguments, the variant and the cluster launch -- with the fused kernel
// (csd_cuda_fused_kernel.cuh) run under cuda_emulation.h instead of on a
// GPU; and csd_backward_reuse_'s kernel likewise.  Shared by the C++ test
// (test_csd_cuda_fused_emulated.cpp) and the emulated torch ops
// (torch_emulated_ops.cpp), so both launch exactly as the real launcher.
//
// Include cuda_emulation.h before this header.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../csrc/cuda/csd_cuda_fused_kernel.cuh"
#include "../../csrc/cuda/csd_cuda_fused_plan.h"
#include "../../csrc/cuda/csd_cuda_variants.h"

namespace csd {
namespace gpu {

// Shared memory of the emulated GPU: an H100/H200 (sm_90) by default.
struct EmulatedSmem {
  size_t per_block = 232448;  // cudaDeviceProp::sharedMemPerBlockOptin
  size_t per_sm = 233472;     // cudaDeviceProp::sharedMemPerMultiprocessor
  int min_cluster = 1;        // tests: force clusters on short rows
};

// As launch_fused_forward_grad: runs the fused kernel and returns true, or
// returns false (nothing run) where the real launcher takes the two-pass
// kernels.  `used` (optional) receives the plan.
template <typename T>
bool emulated_fused_forward_grad(const T* z, int64_t zstride, const T* t, int64_t tstride, int64_t rows,
                                 int64_t vocab, const bool* row_mask, const Mixture<double>& w1,
                                 const Mixture<double>& w2, double inv_temp, double grad_scale, float* loss,
                                 float* stats, T* grad, int sms, const EmulatedSmem& smem = {},
                                 FusedPlan* used = nullptr, const float* grad_scale_on_device = nullptr) {
  if (!fused_alignment_ok(z, t, zstride, tstride, int(sizeof(T)))) return false;
  const FusedPlan plan =
      plan_fused(rows, vocab, int(sizeof(T)), sms, smem.per_block, smem.per_sm, smem.min_cluster);
  if (!plan.fits) return false;
  if (used != nullptr) *used = plan;
  const FusedArgs a = fused_args(rows, vocab, zstride, tstride, plan, row_mask, loss, stats, w1, w2, inv_temp,
                                 grad_scale, grad_scale_on_device);
  with_variant<T, T, float>(a.need, [&](auto variant) {
    emu::launch_cluster(plan.blocks, kFusedThreads, plan.cluster, plan.smem_bytes,
                        csd_fused_kernel<T, decltype(variant)::value>, z, t, grad, a);
  });
  return true;
}

// As launch_fused_forward_grad with a FusedReduction (csd_loss_grad's one
// launch): labels (or nullptr), the mean's count, the gradient, the per-row
// losses and the reduced loss in `total`, with `ticket` as the launch's
// counter (zero before; the kernel's last CTA resets it).
template <typename T>
bool emulated_fused_loss_grad(const T* z, int64_t zstride, const T* t, int64_t tstride, int64_t rows,
                              int64_t vocab, const int64_t* labels, int64_t ignore_index, bool mean,
                              const Mixture<double>& w1, const Mixture<double>& w2, double inv_temp, float* loss,
                              float* stats, T* grad, float* total, unsigned* ticket, int sms,
                              const EmulatedSmem& smem = {}, FusedPlan* used = nullptr) {
  if (!fused_alignment_ok(z, t, zstride, tstride, int(sizeof(T)))) return false;
  const FusedPlan plan =
      plan_fused(rows, vocab, int(sizeof(T)), sms, smem.per_block, smem.per_sm, smem.min_cluster);
  if (!plan.fits || rows >= (int64_t(1) << 24)) return false;
  if (used != nullptr) *used = plan;
  FusedReduction reduce;
  reduce.labels = labels;
  reduce.ignore_index = ignore_index;
  reduce.mean = mean;
  reduce.total = total;
  reduce.ticket = ticket;
  const FusedArgs a =
      fused_args(rows, vocab, zstride, tstride, plan, nullptr, loss, stats, w1, w2, inv_temp, 1.0, nullptr, &reduce);
  with_variant<T, T, float>(a.need, [&](auto variant) {
    emu::launch_cluster(plan.blocks, kFusedThreads, plan.cluster, plan.smem_bytes,
                        csd_fused_kernel<T, decltype(variant)::value>, z, t, grad, a);
  });
  return true;
}

// As launch_scale_grad (csd_scale_grad_).
template <typename T, typename S>
void emulated_scale_grad(T* grad, int64_t n, const S* scale, int sms) {
  if (n == 0) return;
  const int64_t want = (n + kThreads - 1) / kThreads;
  emu::launch(want < int64_t(sms) * 8 ? want : int64_t(sms) * 8, kThreads, csd_scale_grad_kernel<T, S>, grad, n,
              scale);
}

// As launch_backward_reuse: rows whose grad_loss is not grad_scale are
// recomputed in place.
template <typename zs_t, typename ts_t, typename acc_t>
void emulated_backward_reuse(zs_t* grad, const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride,
                             int64_t rows, int64_t vocab, const acc_t* grad_loss, int64_t grad_loss_stride,
                             const acc_t* stats, const Mixture<double>& w1, const Mixture<double>& w2,
                             double inv_temp, double grad_scale, const acc_t* grad_scale_on_device = nullptr) {
  const LaunchPlan plan = plan_backward(rows, vocab);
  const BackwardArgs<acc_t> a = backward_args<acc_t>(rows, vocab, zstride, tstride, plan, grad_loss,
                                                     grad_loss_stride, stats, w1, w2, inv_temp);
  with_variant<zs_t, ts_t, acc_t>(a.need, [&](auto variant) {
    emu::launch(plan.blocks, kThreads, csd_backward_reuse_kernel<zs_t, ts_t, acc_t, decltype(variant)::value>,
                grad, z, t, a, acc_t(grad_scale), grad_scale_on_device);
  });
}

}  // namespace gpu
}  // namespace csd
