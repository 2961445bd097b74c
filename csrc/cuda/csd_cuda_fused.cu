// Launchers of the fused forward+gradient kernel and of the in-place reuse
// backward (csd_cuda_fused_kernel.cuh): plan, arguments, cluster launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cstdint>

#include "csd_cuda_dispatch.cuh"
#include "csd_cuda_fused_kernel.cuh"
#include "csd_cuda_fused_launch.h"
#include "csd_cuda_variants.h"

namespace csd {
namespace gpu {
namespace {

// Launches the kernel; false (nothing launched) when the plan's dynamic
// shared memory plus the kernel's static shared memory exceed the opt-in
// per-block limit -- plan_fused counts only the dynamic part, so a row within
// a few hundred bytes of the limit (bf16 V ~ 464k, fp32 V ~ 232k) would
// otherwise fail to launch instead of taking the two-pass kernels.
template <typename T, unsigned kBases>
bool launch_one(const T* z, const T* t, T* g, const FusedArgs& args, const FusedPlan& plan,
                cudaStream_t stream, size_t smem_per_block) {
  auto kernel = csd_fused_kernel<T, kBases>;
  const size_t smem = plan.smem_bytes;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (smem + attributes.sharedSizeBytes > smem_per_block) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(plan.blocks), 1, 1);
  config.blockDim = dim3(kFusedThreads, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, z, t, g, args));
  return true;
}

}  // namespace

bool launch_fused_forward_grad(const at::Tensor& student, const at::Tensor& teacher,
                               const bool* row_mask, const LossConfig& cfg, double grad_scale,
                               const at::Tensor& scale, at::Tensor& loss, at::Tensor& stats,
                               at::Tensor& grad, const FusedReduction* reduce) {
  const auto type = student.scalar_type();
  if (type != teacher.scalar_type() || !(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf)) {
    return false;
  }
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 9 || !fused_alignment_ok(student.const_data_ptr(), teacher.const_data_ptr(), student.stride(0),
                                             teacher.stride(0), int(student.element_size()))) {
    return false;
  }
  const int64_t rows = student.size(0), vocab = student.size(1);
  const FusedPlan plan =
      plan_fused(rows, vocab, int(student.element_size()), prop->multiProcessorCount,
                 size_t(prop->sharedMemPerBlockOptin), size_t(prop->sharedMemPerMultiprocessor));
  if (!plan.fits || plan.blocks > INT_MAX) return false;
  // The in-kernel count is a float sum of ones: exact below 2^24 rows.
  if (reduce != nullptr && rows >= (int64_t(1) << 24)) return false;

  const FusedArgs a = fused_args(rows, vocab, student.stride(0), teacher.stride(0), plan, row_mask,
                                 loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), cfg.w1, cfg.w2,
                                 cfg.inv_temperature, grad_scale,
                                 scale.defined() ? scale.const_data_ptr<float>() : nullptr, reduce);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "csd_forward_grad_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* z = student.const_data_ptr<scalar_t>();
      const scalar_t* t = teacher.const_data_ptr<scalar_t>();
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      with_variant<scalar_t, scalar_t, float>(a.need, [&](auto variant) {
        launched = launch_one<scalar_t, decltype(variant)::value>(z, t, g, a, plan, stream,
                                                                  size_t(prop->sharedMemPerBlockOptin));
      });
    }
  });
  return launched;
}

void launch_backward_reuse(const at::Tensor& grad_loss, const at::Tensor& student,
                           const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                           double grad_scale, const at::Tensor& scale, at::Tensor& grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const LaunchPlan plan = plan_backward(rows, vocab);
  TORCH_CHECK(plan.blocks > 0 && plan.blocks <= INT_MAX,
              "csd_backward_reuse_: too many rows for one launch (", plan.blocks, " blocks)");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_backward_reuse_cuda", [&] {
    const BackwardArgs<acc_t> a = backward_args<acc_t>(
        rows, vocab, student.stride(0), teacher.stride(0), plan, grad_loss.const_data_ptr<acc_t>(),
        grad_loss.stride(0), stats.const_data_ptr<acc_t>(), cfg.w1, cfg.w2, cfg.inv_temperature);
    with_variant<zs_t, ts_t, acc_t>(a.need, [&](auto variant) {
      csd_backward_reuse_kernel<zs_t, ts_t, acc_t, decltype(variant)::value>
          <<<static_cast<unsigned int>(plan.blocks), kThreads, 0, stream>>>(
              grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(),
              teacher.const_data_ptr<ts_t>(), a, acc_t(grad_scale),
              scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_scale_grad(at::Tensor& grad, const at::Tensor& scale) {
  const int64_t n = grad.numel();
  if (n == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < sms * 8 ? want : sms * 8);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "csd_scale_grad_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      csd_scale_grad_kernel<scalar_t, double><<<blocks, kThreads, 0, stream>>>(
          grad.mutable_data_ptr<scalar_t>(), n, scale.const_data_ptr<double>());
    } else {
      csd_scale_grad_kernel<scalar_t, float><<<blocks, kThreads, 0, stream>>>(
          grad.mutable_data_ptr<scalar_t>(), n, scale.const_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace csd
