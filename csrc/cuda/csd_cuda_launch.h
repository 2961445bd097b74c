// Entry points of the CUDA kernels (csd_cuda_forward.cu, csd_cuda_backward.cu),
// called by the op layer in csd_cuda.cpp once the arguments are checked and
// the outputs allocated.  Inputs: [N, V] CUDA tensors with vocabulary stride 1
// (any row stride), N > 0; they run on the current stream of the current
// device, which the caller sets with a CUDAGuard.
#pragma once

#include <ATen/ATen.h>

#include "../csd_kernel_api.h"

namespace csd {
namespace gpu {

void launch_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                    const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats);

// blocks as a grid size, after checking it fits one launch (op names the op in the error).
unsigned int grid_size(int64_t blocks, const char* op);

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad);

}  // namespace gpu
}  // namespace csd
