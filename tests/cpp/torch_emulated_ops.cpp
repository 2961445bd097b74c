// Test-only torch ops that run csd_ext's CUDA kernels on the CPU, under
// cuda_emulation.h, for CPU tensors:
//
//   csd_emulated::forward(student, teacher, row_mask?, weighting, alpha, temperature, sm_count)
//       -> (loss, stats)        as csd_ext::csd_forward on a GPU with sm_count SMs
//   csd_emulated::backward(grad_loss, student, teacher, stats, weighting, alpha, temperature)
//       -> grad_student         as csd_ext::csd_backward
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
