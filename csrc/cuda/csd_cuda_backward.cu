// Launcher of the backward kernel (csd_cuda_backward_kernel.cuh): the launch
// plan, the arguments and the launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>

#include "csd_cuda_backward_kernel.cuh"
#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_launch.h"
#include "csd_cuda_variants.h"

namespace csd {
namespace gpu {

void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const LaunchPlan plan = plan_backward(rows, vocab);
  TORCH_CHECK(plan.blocks > 0 && plan.blocks <= INT_MAX,
              "csd_backward: too many rows for one launch (", plan.blocks, " blocks)");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_backward_cuda", [&] {
    const BackwardArgs<acc_t> a = backward_args<acc_t>(
        rows, vocab, student.stride(0), teacher.stride(0), plan, grad_loss.const_data_ptr<acc_t>(),
        grad_loss.stride(0), stats.const_data_ptr<acc_t>(), cfg.w1, cfg.w2, cfg.inv_temperature);
    with_variant<zs_t, ts_t, acc_t>(a.need, [&](auto variant) {
      csd_backward_kernel<zs_t, ts_t, acc_t, decltype(variant)::value>
          <<<static_cast<unsigned int>(plan.blocks), kThreads, 0, stream>>>(
              grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(),
              teacher.const_data_ptr<ts_t>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace gpu
}  // namespace csd
