// Test-only torch ops that run csd_ext's CUDA kernels on the CPU, under
// cuda_emulation.h, for CPU tensors:
//
//   csd_emulated::forward(student, teacher, row_mask?, weighting, alpha, temperature, sm_count)
//       -> (loss, stats)        as csd_ext::csd_forward on a GPU with sm_count SMs
//   csd_emulated::backward(grad_loss, student, teacher, stats, weighting, alpha, temperature)
//       -> grad_student         as csd_ext::csd_backward
//
// python_tests/emulated_gpu.py builds this file (with csrc/csd_ops.cpp, for
// the argument checks, under CSD_OPS_CHECKS_ONLY) with
// torch.utils.cpp_extension and routes csd_ext's ops to it, so the GPU suite
// (python_tests/gpu_suite.py) runs its own assertions against the kernels'
// own code in CI, where there is no GPU.  The op layer is the real one
// (csrc/cuda/csd_cuda_ops.h: checks, layout, allocation), and so are the
// launches (csrc/cuda/csd_cuda_host.h via emulated_launch.h); only the
// backend below, which launches under the emulation instead of on a stream,
// is the emulation's own.  So the emulated ops reject what the real ones
// reject (non-contiguous or wrong-dtype stats, a misplaced row mask, ...).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda_emulation.h"  // before the kernels: the CUDA keywords and cub::

#include "../../csrc/cuda/csd_cuda_dispatch.cuh"  // dtype pairs; c10::BFloat16 converts as on the GPU
#include "../../csrc/cuda/csd_cuda_ops.h"
#include "emulated_launch.h"

namespace {

using namespace csd;
using namespace csd::gpu;

struct EmulatedBackend {
  int sms;
  int guard(const at::Tensor&) const { return 0; }  // one "device"
  void launch_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                      const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) const {
    // As csd_cuda_forward.cu, with the emulation's launch and scratch.
    CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_forward", [&] {
      EmulatedScratch scratch;
      run_forward(student.const_data_ptr<zs_t>(), student.stride(0), teacher.const_data_ptr<ts_t>(),
                  teacher.stride(0), student.size(0), student.size(1), row_mask, cfg.w1, cfg.w2,
                  cfg.inv_temperature, loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), sms,
                  scratch, EmulatedLaunch{});
    });
  }
  void launch_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& stats, const LossConfig& cfg, at::Tensor& grad) const {
    // As csd_cuda_backward.cu.
    CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_backward", [&] {
      run_backward(grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(), student.stride(0),
                   teacher.const_data_ptr<ts_t>(), teacher.stride(0), student.size(0), student.size(1),
                   grad_loss.const_data_ptr<acc_t>(), grad_loss.stride(0), stats.const_data_ptr<acc_t>(), cfg.w1,
                   cfg.w2, cfg.inv_temperature, EmulatedLaunch{});
    });
  }
};

std::tuple<at::Tensor, at::Tensor> emulated_forward_op(const at::Tensor& student, const at::Tensor& teacher,
                                                       const std::optional<at::Tensor>& row_mask,
                                                       c10::string_view weighting, double alpha,
                                                       double temperature, int64_t sm_count) {
  EmulatedBackend backend{int(sm_count)};
  return forward_op(backend, student, teacher, row_mask, weighting, alpha, temperature);
}

at::Tensor emulated_backward_op(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& stats, c10::string_view weighting, double alpha,
                                double temperature) {
  EmulatedBackend backend{0};
  return backward_op(backend, grad_loss, student, teacher, stats, weighting, alpha, temperature);
}

}  // namespace

TORCH_LIBRARY(csd_emulated, m) {
  m.def("forward(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, float alpha, "
        "float temperature, int sm_count) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, str weighting, "
        "float alpha, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(csd_emulated, CPU, m) {
  m.impl("forward", &emulated_forward_op);
  m.impl("backward", &emulated_backward_op);
}
