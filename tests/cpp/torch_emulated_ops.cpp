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
//
// python_tests/emulated_gpu.py builds this file with torch.utils.cpp_extension
// and routes csd_ext's ops to it, so the GPU suite (python_tests/gpu_suite.py)
// runs its own assertions against the kernels' own code in CI, where there
// is no GPU.  The layout handling mirrors csd_cuda.cpp (rows read in place
// at their stride, a contiguous gradient) and the launches are the real
// launchers' (emulated_launch.h).  Argument checking is not repeated: the
// Python wrapper and the CPU suite cover it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda_emulation.h"  // before the kernels: the CUDA keywords and cub::

#include "../../csrc/cuda/csd_cuda_dispatch.cuh"  // dtype pairs; c10::BFloat16 converts as on the GPU
#include "emulated_launch.h"
#include "emulated_fused_launch.h"

#include <cstdlib>
#include <cstring>

namespace {

using csd::Mixture;

struct Config {
  Mixture<double> w1, w2;
  double inv_temp;
};

Config config_of(c10::string_view weighting, double alpha, double temperature) {
  TORCH_CHECK(weighting.size() == 2, "weighting must be two letters of S, T, U, M, got '",
              std::string(weighting), "'");
  return {csd::mixture_of<double>(weighting[0], alpha), csd::mixture_of<double>(weighting[1], alpha),
          1.0 / temperature};
}

// As csd_cuda.cpp: rows are read in place at any row stride; only a
// vocabulary stride other than 1 is copied.
at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

at::ScalarType accumulate_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> emulated_forward_op(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                       const std::optional<at::Tensor>& row_mask_in,
                                                       c10::string_view weighting, double alpha,
                                                       double temperature, int64_t sm_count) {
  TORCH_CHECK(student_in.dim() == 2 && teacher_in.sizes() == student_in.sizes(),
              "csd_emulated::forward takes [N, V] student and teacher logits of one shape");
  const Config cfg = config_of(weighting, alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto opts = student.options().dtype(accumulate_type(student, teacher));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor stats = at::empty({rows, csd::kNumStats}, opts);
  if (rows == 0) return {loss, stats};
  at::Tensor row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const bool* mask = row_mask.defined() ? row_mask.const_data_ptr<bool>() : nullptr;
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_forward", [&] {
    csd::gpu::emulated_forward(student.const_data_ptr<zs_t>(), student.stride(0), teacher.const_data_ptr<ts_t>(),
                               teacher.stride(0), rows, vocab, mask, cfg.w1, cfg.w2, cfg.inv_temp,
                               loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(),
                               int(sm_count));
  });
  return {loss, stats};
}

at::Tensor emulated_backward_op(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                const at::Tensor& teacher_in, const at::Tensor& stats_in,
                                c10::string_view weighting, double alpha, double temperature) {
  TORCH_CHECK(student_in.dim() == 2 && teacher_in.sizes() == student_in.sizes(),
              "csd_emulated::backward takes [N, V] student and teacher logits of one shape");
  const Config cfg = config_of(weighting, alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type(student, teacher);
  // As csd_cuda.cpp: an expanded scalar grad_loss keeps its stride 0.
  const at::Tensor grad_loss = grad_loss_in.to(acc);
  const at::Tensor stats = stats_in.to(acc).contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options());
  if (student.size(0) == 0) return grad;
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_backward", [&] {
    csd::gpu::emulated_backward(grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(), student.stride(0),
                                teacher.const_data_ptr<ts_t>(), teacher.stride(0), student.size(0),
                                student.size(1), grad_loss.const_data_ptr<acc_t>(), grad_loss.stride(0),
                                stats.const_data_ptr<acc_t>(), cfg.w1, cfg.w2, cfg.inv_temp);
  });
  return grad;
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
  const Config cfg = config_of(weighting, alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto opts = student.options().dtype(accumulate_type(student, teacher));
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
            teacher.stride(0), rows, vocab, mask, cfg.w1, cfg.w2, cfg.inv_temp, grad_scale,
            loss.mutable_data_ptr<float>(), stats.mutable_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>(),
            int(sm_count), csd::gpu::EmulatedSmem{}, nullptr,
            scale.defined() ? scale.const_data_ptr<float>() : nullptr);
      }
    });
  }
  if (fused) return {loss, stats, grad};
  // The two-pass kernels, with grad_loss = grad_scale as a broadcast scalar.
  if (!scale.defined()) scale = at::full({1}, grad_scale, opts);
  CSD_CUDA_DISPATCH_PAIR(student.scalar_type(), teacher.scalar_type(), "csd_emulated_forward_grad", [&] {
    csd::gpu::emulated_forward(student.const_data_ptr<zs_t>(), student.stride(0), teacher.const_data_ptr<ts_t>(),
                               teacher.stride(0), rows, vocab, mask, cfg.w1, cfg.w2, cfg.inv_temp,
                               loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), int(sm_count));
    csd::gpu::emulated_backward(grad.mutable_data_ptr<zs_t>(), student.const_data_ptr<zs_t>(), student.stride(0),
                                teacher.const_data_ptr<ts_t>(), teacher.stride(0), rows, vocab,
                                scale.const_data_ptr<acc_t>(), 0, stats.const_data_ptr<acc_t>(), cfg.w1, cfg.w2,
                                cfg.inv_temp);
  });
  return {loss, stats, grad};
}

void emulated_backward_reuse_op(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                const at::Tensor& teacher_in, const at::Tensor& stats_in, const at::Tensor& grad,
                                c10::string_view weighting, double alpha, double temperature, double grad_scale,
                                const std::optional<at::Tensor>& scale_in) {
  const Config cfg = config_of(weighting, alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type(student, teacher);
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
                                      cfg.inv_temp, grad_scale,
                                      scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr);
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
}

TORCH_LIBRARY_IMPL(csd_emulated, CPU, m) {
  m.impl("forward", &emulated_forward_op);
  m.impl("backward", &emulated_backward_op);
  m.impl("forward_grad", &emulated_forward_grad_op);
  m.impl("backward_reuse_", &emulated_backward_reuse_op);
}
