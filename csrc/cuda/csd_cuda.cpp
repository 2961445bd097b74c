// CUDA implementations of the csd_ext ops: the checks, layout and allocation
// of csd_cuda_ops.h (shared with the emulated ops of the CPU test suite) with
// the device guard and the launchers of csd_cuda_forward.cu and
// csd_cuda_backward.cu.  See csd_cuda_ops.h for the layout rules.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csd_cuda_launch.h"
#include "csd_cuda_ops.h"

namespace csd {
namespace gpu {
namespace {

struct CudaBackend {
  c10::cuda::CUDAGuard guard(const at::Tensor& t) const { return c10::cuda::CUDAGuard(t.device()); }
  void launch_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                      const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) const {
    gpu::launch_forward(student, teacher, row_mask, cfg, loss, stats);
  }
  void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& stats, const LossConfig& cfg, at::Tensor& grad) const {
    gpu::launch_backward(grad_loss, student, teacher, stats, cfg, grad);
  }
};

std::tuple<at::Tensor, at::Tensor> csd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& row_mask,
                                                    c10::string_view weighting, double alpha,
                                                    double temperature) {
  CudaBackend backend;
  return forward_op(backend, student, teacher, row_mask, weighting, alpha, temperature);
}

at::Tensor csd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                             const at::Tensor& teacher, const at::Tensor& stats,
                             c10::string_view weighting, double alpha, double temperature) {
  CudaBackend backend;
  return backward_op(backend, grad_loss, student, teacher, stats, weighting, alpha, temperature);
}

}  // namespace
}  // namespace gpu
}  // namespace csd

TORCH_LIBRARY_IMPL(csd_ext, CUDA, m) {
  m.impl("csd_forward", &csd::gpu::csd_forward_cuda);
  m.impl("csd_backward", &csd::gpu::csd_backward_cuda);
}
