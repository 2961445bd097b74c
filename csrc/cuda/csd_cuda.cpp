// CUDA implementations of the csd_ext ops: argument checks (shared with the
// CPU backend), layout, allocation, and the device guard.  The kernels are in
// csd_cuda_forward.cu and csd_cuda_backward.cu.
//
// Layout: the kernels read rows with any row stride (a vocabulary slice such
// as logits[..., :V], or a row broadcast with stride 0) in place; only a
// vocabulary dimension with a stride other than 1 is made contiguous first.
// Nothing else is copied, and nothing is synchronised with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../csd_kernel_api.h"
#include "csd_cuda_launch.h"
#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {
namespace {

at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

void check_vocab_fits(const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.size(1) < kMaxVocab,
                    "csd_ext's CUDA kernels index within a row with 32-bit integers; the "
                    "vocabulary size must be < 2^30, got ", student.size(1));
}

std::tuple<at::Tensor, at::Tensor> csd_forward_cuda(const at::Tensor& student_in,
                                                    const at::Tensor& teacher_in,
                                                    const std::optional<at::Tensor>& row_mask_in,
                                                    c10::string_view weighting, double alpha,
                                                    double temperature) {
  check_logits(student_in, teacher_in);
  check_row_mask(row_mask_in, student_in);
  check_vocab_fits(student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const c10::cuda::CUDAGuard guard(student_in.device());
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
  launch_forward(student, teacher, mask, cfg, loss, stats);
  return {loss, stats};
}

at::Tensor csd_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                             const at::Tensor& teacher_in, const at::Tensor& stats,
                             c10::string_view weighting, double alpha, double temperature) {
  check_logits(student_in, teacher_in);
  check_backward_inputs(grad_loss_in, stats, student_in, teacher_in);
  check_vocab_fits(student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  // Autograd hands a mean/sum's gradient over as an expanded scalar (stride
  // 0); the kernel reads it with its stride, so this is at most an [N] cast.
  const at::Tensor grad_loss = grad_loss_in.to(accumulate_type_of(student, teacher));
  at::Tensor grad = at::empty(student.sizes(), student.options());  // contiguous
  if (student.size(0) == 0) return grad;
  launch_backward(grad_loss, student, teacher, stats, cfg, grad);
  return grad;
}

}  // namespace
}  // namespace gpu
}  // namespace csd

TORCH_LIBRARY_IMPL(csd_ext, CUDA, m) {
  m.impl("csd_forward", &csd::gpu::csd_forward_cuda);
  m.impl("csd_backward", &csd::gpu::csd_backward_cuda);
}
