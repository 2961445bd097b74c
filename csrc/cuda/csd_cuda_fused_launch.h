// Entry points of the fused forward+gradient path (csd_cuda_fused.cu),
// called by the op layer in csd_cuda_fused_ops.cpp once the arguments are
// checked and the outputs allocated; they run on the current stream.
#pragma once

#include <ATen/ATen.h>

#include "../csd_kernel_api.h"
#include "csd_cuda_fused_plan.h"

namespace csd {
namespace gpu {

// Runs the fused kernel (one launch) when it applies to these inputs on the
// current device -- sm_90+, student and teacher of one dtype among fp32,
// bf16, fp16, rows of the same 16-byte alignment, a row that fits in the
// shared memory of <= 8 blocks -- and returns true; returns false, having
// launched nothing, otherwise.  The gradient is for grad_loss = grad_scale.
// `scale`, when defined, is a one-element float32 tensor on the device that
// replaces grad_scale (read by the kernel: no host sync).
// With `reduce` (csd_loss_grad; row_mask null, scale undefined) the same
// single launch also reads the labels, counts them for a mean's scale and
// writes the reduced loss to reduce->total (csd_cuda_fused_kernel.cuh);
// not taken from 2^24 rows on.
bool launch_fused_forward_grad(const at::Tensor& student, const at::Tensor& teacher,
                               const bool* row_mask, const LossConfig& cfg, double grad_scale,
                               const at::Tensor& scale, at::Tensor& loss, at::Tensor& stats,
                               at::Tensor& grad, const FusedReduction* reduce = nullptr);

// csd_backward_reuse_: recomputes, in place, the rows of `grad` whose
// grad_loss is not grad_scale (one launch; no host sync).
void launch_backward_reuse(const at::Tensor& grad_loss, const at::Tensor& student,
                           const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                           double grad_scale, const at::Tensor& scale, at::Tensor& grad);

// csd_scale_grad_: grad *= scale (a one-element tensor on the device, float64
// for a float64 gradient, else float32), skipped on the device when it is
// exactly 1.  One launch.
void launch_scale_grad(at::Tensor& grad, const at::Tensor& scale);

}  // namespace gpu
}  // namespace csd
