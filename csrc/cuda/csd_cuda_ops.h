// The CUDA ops' host logic above the launches, written once for the real
// ops (csd_cuda.cpp) and the emulated ones (tests/cpp/torch_emulated_ops.cpp):
// argument checks (shared with the CPU backend, csd_ops.cpp), layout,
// allocation, then the backend's launches.
//
// Layout: the kernels read rows with any row stride (a vocabulary slice such
// as logits[..., :V], or a row broadcast with stride 0) in place; only a
// vocabulary dimension with a stride other than 1 is made contiguous first.
// Nothing else is copied, and nothing is synchronised with the host.
//
// A Backend provides
//   guard(const at::Tensor&)   an object that keeps the tensor's device current while alive;
//   launch_forward(student, teacher, row_mask, cfg, loss, stats) and
//   launch_backward(grad_loss, student, teacher, stats, cfg, grad), as csd_cuda_launch.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "../csd_kernel_api.h"
#include "csd_cuda_rows.h"  // kMaxVocab

namespace csd {
namespace gpu {

inline at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

inline void check_vocab_fits(const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.size(1) < kMaxVocab,
                    "csd_ext's CUDA kernels index within a row with 32-bit integers; the "
                    "vocabulary size must be < 2^30, got ", student.size(1));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> forward_op(Backend& backend, const at::Tensor& student_in,
                                              const at::Tensor& teacher_in,
                                              const std::optional<at::Tensor>& row_mask_in,
                                              c10::string_view weighting, double alpha, double temperature) {
  check_logits(student_in, teacher_in);
  check_row_mask(row_mask_in, student_in);
  check_vocab_fits(student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const auto guard = backend.guard(student_in);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0);
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc));
  at::Tensor stats = at::empty({rows, kNumStats}, student.options().dtype(acc));
  if (rows == 0) return {loss, stats};
  at::Tensor row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const bool* mask = row_mask.defined() ? row_mask.const_data_ptr<bool>() : nullptr;
  backend.launch_forward(student, teacher, mask, cfg, loss, stats);
  return {loss, stats};
}

template <typename Backend>
at::Tensor backward_op(Backend& backend, const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                       const at::Tensor& teacher_in, const at::Tensor& stats, c10::string_view weighting,
                       double alpha, double temperature) {
  check_logits(student_in, teacher_in);
  check_backward_inputs(grad_loss_in, stats, student_in, teacher_in);
  check_vocab_fits(student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const auto guard = backend.guard(student_in);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  // Autograd hands a mean/sum's gradient over as an expanded scalar (stride
  // 0); the kernel reads it with its stride, so this is at most an [N] cast.
  const at::Tensor grad_loss = grad_loss_in.to(accumulate_type_of(student, teacher));
  at::Tensor grad = at::empty(student.sizes(), student.options());  // contiguous
  if (student.size(0) == 0) return grad;
  backend.launch_backward(grad_loss, student, teacher, stats, cfg, grad);
  return grad;
}

// csd_loss_grad's composed path, where the one-launch fused kernel does not
// apply, written once for the real op (csd_cuda_fused_ops.cpp) and the
// emulated one: labels != ignore_index, a mean's 1/count on the device,
// forward_grad(row_mask, scale) (the backend's csd_forward_grad with a
// device-tensor grad_scale), the sum and the division.  Several launches,
// no host sync.  labels: int64 or undefined; acc: the accumulation dtype.
template <typename ForwardGrad>
std::tuple<at::Tensor, at::Tensor> composed_loss_grad(const at::Tensor& student, const at::Tensor& labels,
                                                      int64_t ignore_index, bool mean, at::ScalarType acc,
                                                      ForwardGrad&& forward_grad) {
  const int64_t rows = student.size(0);
  std::optional<at::Tensor> row_mask;
  if (labels.defined()) row_mask = labels.ne(ignore_index);
  std::optional<at::Tensor> scale;
  at::Tensor divisor;
  if (mean) {
    divisor = row_mask.has_value() ? row_mask->sum().clamp_min(1)
                                   : at::full({}, rows > 1 ? rows : 1, student.options().dtype(at::kLong));
    scale = at::ones({}, student.options().dtype(acc)).div(divisor).to(acc);
  }
  auto [per_row, stats, grad] = forward_grad(row_mask, scale);
  at::Tensor loss = per_row.sum();
  if (mean) loss = loss.div(divisor);
  return {loss, grad};
}

}  // namespace gpu
}  // namespace csd
