// Test-only torch ops that run csd_ext's CUDA kernels on the CPU, under
// cuda_emulation.h, for CPU tensors:
//
//   csd_emulated::forward(student, teacher, row_mask?, weighting, alpha, temperature, sm_count)
//       -> (loss, stats)        as csd_ext::csd_forward on a GPU with sm_count SMs
//   csd_emulated::backward(grad_loss, student, teacher, stats, weighting, alpha, temperature)
//       -> grad_student         as csd_ext::csd_backward
//   csd_emulated::forward_grad(student, teacher, row_mask?, weighting, alpha, temperature,
//                              grad_scale, sm_count, scale?) -> (loss, stats, grad_student)
//       as csd_ext::csd_forward_grad on an sm_90 GPU: the fused kernel where
//       it applies (emulated_fused_launch.h), else the two-pass kernels; the
//       environment variable CSD_EXT_CUDA_PATH=two_pass chooses those, as on
//       the GPU
//   csd_emulated::backward_reuse_(grad_loss, student, teacher, stats, grad(a!), weighting,
//                                 alpha, temperature, grad_scale, scale?) -> ()
//       as csd_ext::csd_backward_reuse_; with `scale` (a one-element tensor, read
//       by the kernels) as the *_scaled ops
//   csd_emulated::loss_grad(student, teacher, labels?, ignore_index, weighting, alpha, temperature,
//                           reduction, sm_count) -> (loss, grad_student)
//       as csd_ext::csd_loss_grad on an sm_90 GPU: the fused kernel's single
//       launch (labels, count, gradient, ticket, reduced loss) where it
//       applies, else the composed path (forward_grad above, then the sum)
//   csd_emulated::scale_grad_(grad(a!), grad_output) -> ()
//       as csd_ext::csd_scale_grad_ (its kernel, emulated)
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
#include "emulated_fused_launch.h"

#include <cstdlib>
#include <cstring>

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

// As csd_cuda_fused_ops.cpp.
bool fused_path_requested() {
  const char* env = std::getenv("CSD_EXT_CUDA_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "fused") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(env, "two_pass") == 0, "CSD_EXT_CUDA_PATH must be 'fused' or 'two_pass', got '",
                    env, "'");
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_forward_grad_op(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const std::optional<at::Tensor>& row_mask_in,
    c10::string_view weighting, double alpha, double temperature, double grad_scale, int64_t sm_count,
    const std::optional<at::Tensor>& scale_in) {
  TORCH_CHECK(student_in.dim() == 2 && teacher_in.sizes() == student_in.sizes(),
              "csd_emulated::forward_grad takes [N, V] student and teacher logits of one shape");
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto opts = student.options().dtype(accumulate_type_of(student, teacher));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor stats = at::empty({rows, csd::kNumStats}, opts);
  at::Tensor grad = at::empty(student.sizes(), student.options());
  if (rows == 0) return {loss, stats, grad};
  at::Tensor row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const bool* mask = row_mask.defined() ? row_mask.const_data_ptr<bool>() : nullptr;
  at::Tensor scale;
  if (scale_in.has_value()) scale = scale_in->reshape({1}).to(opts.dtype()).contiguous();
  bool fused = false;
  const auto type = student.scalar_type();
  if (fused_path_requested() && type == teacher.scalar_type() &&
      (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "csd_emulated_forward_grad", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        fused = csd::gpu::emulated_fused_forward_grad(
            student.const_data_ptr<scalar_t>(), student.stride(0), teacher.const_data_ptr<scalar_t>(),
            teacher.stride(0), rows, vocab, mask, cfg.w1, cfg.w2, cfg.inv_temperature, grad_scale,
            loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>(),
            int(sm_count), csd::gpu::EmulatedSmem{}, nullptr,
            scale.defined() ? scale.const_data_ptr<float>() : nullptr);
      }
    });
  }
  if (fused) return {loss, stats, grad};
  // The two-pass kernels, with grad_loss = grad_scale as a broadcast scalar.
  if (!scale.defined()) scale = at::full({1}, grad_scale, opts);
  const EmulatedBackend backend{int(sm_count)};
  backend.launch_forward(student, teacher, mask, cfg, loss, stats);
  at::Tensor grad_loss = scale.expand({rows});
  backend.launch_backward(grad_loss, student, teacher, stats, cfg, grad);
  return {loss, stats, grad};
}

void emulated_backward_reuse_op(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                const at::Tensor& teacher_in, const at::Tensor& stats_in, const at::Tensor& grad,
                                c10::string_view weighting, double alpha, double temperature, double grad_scale,
                                const std::optional<at::Tensor>& scale_in) {
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type_of(student, teacher);
  const at::Tensor grad_loss = grad_loss_in.to(acc);
  const at::Tensor stats = stats_in.to(acc).contiguous();
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == student.sizes() && grad.scalar_type() == student.scalar_type(),
              "csd_emulated::backward_reuse_ takes the contiguous gradient forward_grad returned");
  if (student.size(0) == 0) return;
  at::Tensor scale;
  if (scale_in.has_value()) scale = scale_in->reshape({1}).to(acc).contiguous();
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_backward_reuse", [&] {
    csd::gpu::emulated_backward_reuse(grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(),
                                      student.stride(0), teacher.const_data_ptr<ts_t>(), teacher.stride(0),
                                      student.size(0), student.size(1), grad_loss.const_data_ptr<acc_t>(),
                                      grad_loss.stride(0), stats.const_data_ptr<acc_t>(), cfg.w1, cfg.w2,
                                      cfg.inv_temperature, grad_scale,
                                      scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr);
  });
}

// As csd_cuda_fused_ops.cpp's csd_loss_grad_cuda.
std::tuple<at::Tensor, at::Tensor> emulated_loss_grad_op(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                         const std::optional<at::Tensor>& labels_in,
                                                         int64_t ignore_index, c10::string_view weighting,
                                                         double alpha, double temperature,
                                                         c10::string_view reduction, int64_t sm_count) {
  check_logits(student_in, teacher_in);
  check_labels(labels_in, student_in);
  const bool mean = reduction_is_mean(reduction);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0), vocab = student.size(1);
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->to(at::kLong).contiguous();
  const auto type = student.scalar_type();
  const bool count_in_kernel_ok = !(mean && labels.defined() && rows > csd::gpu::kMaxRowsCountedInKernel);
  if (rows > 0 && count_in_kernel_ok && fused_path_requested() && type == teacher.scalar_type() &&
      (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf)) {
    const auto opts = student.options().dtype(acc);
    at::Tensor per_row = at::empty({rows}, opts);
    at::Tensor stats = at::empty({rows, csd::kNumStats}, opts);
    at::Tensor grad = at::empty(student.sizes(), student.options());
    at::Tensor total = at::empty({}, opts);
    // The launch's counter, zeroed once as on the device; the kernel must
    // leave it zeroed for the next launch.
    static unsigned ticket = 0u;
    TORCH_CHECK(ticket == 0u, "csd_emulated::loss_grad: the previous launch left its ticket at ", ticket);
    bool fused = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "csd_emulated_loss_grad", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        fused = csd::gpu::emulated_fused_loss_grad(
            student.const_data_ptr<scalar_t>(), student.stride(0), teacher.const_data_ptr<scalar_t>(),
            teacher.stride(0), rows, vocab, labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr,
            ignore_index, mean, cfg.w1, cfg.w2, cfg.inv_temperature, per_row.mutable_data_ptr<float>(),
            stats.mutable_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>(), total.mutable_data_ptr<float>(),
            &ticket, int(sm_count));
      }
    });
    TORCH_CHECK(ticket == 0u, "csd_emulated::loss_grad: the kernel left its ticket at ", ticket,
                " (the last CTA must reset it)");
    if (fused) return {total, grad};
  }
  // The composed path.
  return csd::gpu::composed_loss_grad(
      student, labels, ignore_index, mean, acc, [&](const auto& row_mask, const auto& scale) {
        return emulated_forward_grad_op(student, teacher, row_mask, weighting, alpha, temperature, 1.0, sm_count,
                                        scale);
      });
}

// As csd_cuda_fused_ops.cpp's csd_scale_grad_cuda.
void emulated_scale_grad_op(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "grad_output must be a one-element tensor, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad_student must be contiguous (the tensor csd_loss_grad returned)");
  const bool fp64 = grad.scalar_type() == at::kDouble;
  const at::Tensor scale = grad_output.reshape({1}).to(fp64 ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "csd_emulated_scale_grad", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      csd::gpu::emulated_scale_grad(grad.mutable_data_ptr<scalar_t>(), grad.numel(), scale.const_data_ptr<double>(),
                                    132);
    } else {
      csd::gpu::emulated_scale_grad(grad.mutable_data_ptr<scalar_t>(), grad.numel(), scale.const_data_ptr<float>(),
                                    132);
    }
  });
}

}  // namespace

TORCH_LIBRARY(csd_emulated, m) {
  m.def("forward(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, float alpha, "
        "float temperature, int sm_count) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, str weighting, "
        "float alpha, float temperature) -> Tensor");
  m.def("forward_grad(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, float alpha, "
        "float temperature, float grad_scale, int sm_count, Tensor? scale) -> (Tensor, Tensor, Tensor)");
  m.def("backward_reuse_(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, Tensor(a!) grad, "
        "str weighting, float alpha, float temperature, float grad_scale, Tensor? scale) -> ()");
  m.def("loss_grad(Tensor student, Tensor teacher, Tensor? labels, int ignore_index, str weighting, float alpha, "
        "float temperature, str reduction, int sm_count) -> (Tensor, Tensor)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
}

TORCH_LIBRARY_IMPL(csd_emulated, CPU, m) {
  m.impl("forward", &emulated_forward_op);
  m.impl("backward", &emulated_backward_op);
  m.impl("forward_grad", &emulated_forward_grad_op);
  m.impl("backward_reuse_", &emulated_backward_reuse_op);
  m.impl("loss_grad", &emulated_loss_grad_op);
  m.impl("scale_grad_", &emulated_scale_grad_op);
}
