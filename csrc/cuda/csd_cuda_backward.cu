// Launcher of the backward kernel (csd_cuda_backward_kernel.cuh): the dtype
// dispatch, then the plan, arguments and launch of csd_cuda_host.h (shared
// with the emulation) on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_host.h"
#include "csd_cuda_launch.h"

namespace csd {
namespace gpu {

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel, int64_t blocks, int threads, const auto&... args) {
    kernel<<<grid_size(blocks, "csd_backward"), threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_backward_cuda", [&] {
    run_backward(grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(), student.stride(0),
                 teacher.const_data_ptr<ts_t>(), teacher.stride(0), rows, vocab,
                 grad_loss.const_data_ptr<acc_t>(), grad_loss.stride(0), stats.const_data_ptr<acc_t>(), cfg.w1,
                 cfg.w2, cfg.inv_temperature, launch);
  });
}

}  // namespace gpu
}  // namespace csd
