// CUDA implementations of csd_ext::csd_forward_grad and
// csd_ext::csd_backward_reuse_, and of their *_scaled forms that take
// grad_scale as a device tensor (the op pair eager autograd uses when the
// student needs a gradient, csd_ext/_ops.py): argument checks (shared with
// the other backends), layout, allocation, and the choice of path:
//
//   fused      one launch of the fused kernel (csd_cuda_fused_kernel.cuh):
//              z and t read once, g written once, loss and stats alongside;
//   two_pass   the forward kernels, then the backward kernel with
//              grad_loss = grad_scale (a broadcast scalar on the device).
// The fused path is taken where it applies (csd_cuda_fused_launch.h), unless
// the environment variable CSD_EXT_CUDA_PATH=two_pass asks for the two-pass
// kernels (for A/B timing on one GPU).  Nothing is synchronised with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../csd_kernel_api.h"
#include "csd_cuda_fused_launch.h"
#include "csd_cuda_launch.h"
#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {
namespace {

at::Tensor contiguous_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

// CSD_EXT_CUDA_PATH: "fused" (default, also when unset or empty) or "two_pass".
bool fused_path_requested() {
  const char* env = std::getenv("CSD_EXT_CUDA_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "fused") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(env, "two_pass") == 0,
                    "CSD_EXT_CUDA_PATH must be 'fused' or 'two_pass', got '", env, "'");
  return false;
}

// grad_scale as a one-element tensor (the *_scaled ops): checked, and cast
// to the loss dtype on the device (no host read).
at::Tensor checked_scale(const at::Tensor& scale, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(scale.numel() == 1, "grad_scale must be a one-element tensor, got shape ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == student.device(), "grad_scale is on ", scale.device(),
                    " but student_logits is on ", student.device());
  return scale.reshape({1}).to(accumulate_type_of(student, teacher)).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad_impl(
    const at::Tensor& student_in, const at::Tensor& teacher_in,
    const std::optional<at::Tensor>& row_mask_in, c10::string_view weighting, double alpha,
    double temperature, double grad_scale, const std::optional<at::Tensor>& scale_in) {
  check_logits(student_in, teacher_in);
  check_row_mask(row_mask_in, student_in);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
  TORCH_CHECK_VALUE(student_in.size(1) < kMaxVocab,
                    "csd_ext's CUDA kernels index within a row with 32-bit integers; the "
                    "vocabulary size must be < 2^30, got ", student_in.size(1));
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = contiguous_rows(student_in);
  const at::Tensor teacher = contiguous_rows(teacher_in);
  const at::Tensor scale = scale_in.has_value() ? checked_scale(*scale_in, student, teacher) : at::Tensor();
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0);
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc));
  at::Tensor stats = at::empty({rows, kNumStats}, student.options().dtype(acc));
  at::Tensor grad = at::empty(student.sizes(), student.options());  // contiguous
  if (rows == 0) return {loss, stats, grad};
  at::Tensor row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const bool* mask = row_mask.defined() ? row_mask.const_data_ptr<bool>() : nullptr;
  if (fused_path_requested() &&
      launch_fused_forward_grad(student, teacher, mask, cfg, grad_scale, scale, loss, stats, grad)) {
    return {loss, stats, grad};
  }
  launch_forward(student, teacher, mask, cfg, loss, stats);
  // grad_loss = grad_scale on every row: a broadcast scalar (stride 0).
  const at::Tensor grad_loss = scale.defined() ? scale.expand({rows})
                                               : at::full({1}, grad_scale, loss.options()).expand({rows});
  launch_backward(grad_loss, student, teacher, stats, cfg, grad);
  return {loss, stats, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csd_forward_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    c10::string_view weighting, double alpha, double temperature, double grad_scale) {
  return forward_grad_impl(student, teacher, row_mask, weighting, alpha, temperature, grad_scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csd_forward_grad_scaled_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    c10::string_view weighting, double alpha, double temperature, const at::Tensor& grad_scale) {
  return forward_grad_impl(student, teacher, row_mask, weighting, alpha, temperature, 1.0, grad_scale);
}

void backward_reuse_impl(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                         const at::Tensor& teacher_in, const at::Tensor& stats, const at::Tensor& grad,
                         c10::string_view weighting, double alpha, double temperature, double grad_scale,
                         const std::optional<at::Tensor>& scale_in) {
  check_logits(student_in, teacher_in);
  check_backward_inputs(grad_loss_in, stats, student_in, teacher_in);
  TORCH_CHECK_VALUE(grad.sizes() == student_in.sizes() && grad.is_contiguous() &&
                        grad.scalar_type() == student_in.scalar_type() &&
                        grad.device() == student_in.device(),
                    "grad_student must be the contiguous ", student_in.scalar_type(),
                    " tensor of shape ", student_in.sizes(), " returned by csd_forward_grad, got ",
                    grad.scalar_type(), " ", grad.sizes());
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = contiguous_rows(student_in);
  const at::Tensor teacher = contiguous_rows(teacher_in);
  const at::Tensor scale = scale_in.has_value() ? checked_scale(*scale_in, student, teacher) : at::Tensor();
  const at::Tensor grad_loss = grad_loss_in.to(accumulate_type_of(student, teacher));
  if (student.size(0) == 0) return;
  at::Tensor out = grad;  // written in place
  launch_backward_reuse(grad_loss, student, teacher, stats, cfg, grad_scale, scale, out);
}

void csd_backward_reuse_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                             const at::Tensor& teacher, const at::Tensor& stats, const at::Tensor& grad,
                             c10::string_view weighting, double alpha, double temperature,
                             double grad_scale) {
  backward_reuse_impl(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, grad_scale,
                      std::nullopt);
}

void csd_backward_reuse_scaled_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                    const at::Tensor& teacher, const at::Tensor& stats,
                                    const at::Tensor& grad, c10::string_view weighting, double alpha,
                                    double temperature, const at::Tensor& grad_scale) {
  backward_reuse_impl(grad_loss, student, teacher, stats, grad, weighting, alpha, temperature, 1.0,
                      grad_scale);
}

}  // namespace
}  // namespace gpu
}  // namespace csd

TORCH_LIBRARY_IMPL(csd_ext, CUDA, m) {
  m.impl("csd_forward_grad", &csd::gpu::csd_forward_grad_cuda);
  m.impl("csd_backward_reuse_", &csd::gpu::csd_backward_reuse_cuda);
  m.impl("csd_forward_grad_scaled", &csd::gpu::csd_forward_grad_scaled_cuda);
  m.impl("csd_backward_reuse_scaled_", &csd::gpu::csd_backward_reuse_scaled_cuda);
}
