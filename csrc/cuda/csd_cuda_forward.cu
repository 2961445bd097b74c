// Launcher of the forward kernels (csd_cuda_forward_kernels.cuh): the dtype
// dispatch, then the plan, arguments, scratch states and launches of
// csd_cuda_host.h (shared with the emulation) on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>

#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_host.h"
#include "csd_cuda_launch.h"

namespace csd {
namespace gpu {

unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, op, ": too many rows for one launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

void launch_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                    const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;  // split rows' states; the caching allocator keeps it for the stream's work
  auto scratch = [&](int64_t bytes) {
    partial = at::empty({bytes}, loss.options().dtype(at::kByte));
    return partial.mutable_data_ptr();
  };
  auto launch = [&](auto kernel, int64_t blocks, int threads, const auto&... args) {
    kernel<<<grid_size(blocks, "csd_forward"), threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_forward_cuda", [&] {
    run_forward(student.const_data_ptr<zs_t>(), student.stride(0), teacher.const_data_ptr<ts_t>(),
                teacher.stride(0), rows, vocab, row_mask, cfg.w1, cfg.w2, cfg.inv_temperature,
                loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), sms, scratch, launch);
  });
}

}  // namespace gpu
}  // namespace csd
