// Launcher of the forward kernels (csd_cuda_forward_kernels.cuh): the launch
// plan, the arguments, the scratch states of split rows, and the launches on
// the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>

#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_forward_kernels.cuh"
#include "csd_cuda_launch.h"
#include "csd_cuda_variants.h"

namespace csd {
namespace gpu {
namespace {

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, "csd_forward: too many rows for one launch (",
              blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

}  // namespace

void launch_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                    const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const LaunchPlan plan = plan_forward(rows, vocab, sms);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_forward_cuda", [&] {
    const ForwardArgs<acc_t> args = forward_args<acc_t>(
        rows, vocab, student.stride(0), teacher.stride(0), plan, row_mask,
        loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), nullptr, cfg.w1, cfg.w2,
        cfg.inv_temperature);
    with_variant<zs_t, ts_t, acc_t>(args.math.need, [&](auto variant) {
      constexpr unsigned kBases = decltype(variant)::value;
      ForwardArgs<acc_t> a = args;
      at::Tensor partial;
      if (plan.segs > 1) {
        // rows * segs states of at most 12 acc_t each: small, since rows < 2 x SMs here.
        constexpr int64_t kWords = sizeof(RowState<acc_t, kBases>) / sizeof(acc_t);
        partial = at::empty({rows * plan.segs * kWords}, loss.options());
        a.partial = partial.mutable_data_ptr();
      }
      const zs_t* z = student.const_data_ptr<zs_t>();
      const ts_t* t = teacher.const_data_ptr<ts_t>();
      csd_forward_kernel<zs_t, ts_t, acc_t, kBases>
          <<<grid_size(plan.blocks), kThreads, 0, stream>>>(z, t, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.segs > 1) {
        csd_merge_segments_kernel<acc_t, kBases>
            <<<grid_size(ceil_div(rows, kThreads / kWarp)), kThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace gpu
}  // namespace csd
