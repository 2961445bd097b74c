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
//
// csd_loss_grad (csd_loss's eager training path for "mean" and "sum"): on the
// fused path ONE launch and nothing else -- the kernel reads the labels,
// counts them for a mean, writes the gradient and reduces the per-row losses
// to the scalar (its outputs are at::empty: allocations, no launches).
// Elsewhere (two_pass, fp64, mixed dtypes, rows the fused kernel does not
// take, a mean over labels of more than 4096 rows) it composes the other launches: labels != ignore_index, the mean's
// scale, csd_forward_grad's kernels, the sum and the division.
// csd_scale_grad_, its backward, is one launch (skipped on the device for a
// grad_output of 1).
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
#include "csd_cuda_ops.h"
#include "csd_cuda_rows.h"
#include "csd_cuda_ticket.h"
#include "csd_cuda_fused_plan.h"

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

// The kernels index within a row with 32-bit integers.
void check_vocab_fits(const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.size(1) < kMaxVocab,
                    "csd_ext's CUDA kernels index within a row with 32-bit integers; the "
                    "vocabulary size must be < 2^30, got ", student.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad_impl(
    const at::Tensor& student_in, const at::Tensor& teacher_in,
    const std::optional<at::Tensor>& row_mask_in, c10::string_view weighting, double alpha,
    double temperature, double grad_scale, const std::optional<at::Tensor>& scale_in) {
  check_logits(student_in, teacher_in);
  check_row_mask(row_mask_in, student_in);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
  check_vocab_fits(student_in);
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

std::tuple<at::Tensor, at::Tensor> csd_loss_grad_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                      const std::optional<at::Tensor>& labels_in,
                                                      int64_t ignore_index, c10::string_view weighting,
                                                      double alpha, double temperature,
                                                      c10::string_view reduction) {
  check_logits(student_in, teacher_in);
  check_labels(labels_in, student_in);
  const bool mean = reduction_is_mean(reduction);
  check_vocab_fits(student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = contiguous_rows(student_in);
  const at::Tensor teacher = contiguous_rows(teacher_in);
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0);
  // int64 labels, contiguous: no copy for the usual tensor.
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->to(at::kLong).contiguous();
  // A mean over labels is counted inside the kernel by every row's cluster:
  // 8 B x rows read per row from L2, 8 rows^2 B in all.  Up to
  // kMaxRowsCountedInKernel rows that is <= 134 MB of L2 reads (~13 us at
  // ~10 TB/s), no more than the ~8 extra launches of the composed path cost;
  // beyond it the quadratic count would grow past them (2.1 GB at 16384
  // rows), so larger batches take the composed path, whose count is one
  // linear pass.  (An analytic bound, not a GPU measurement.)
  const bool count_in_kernel_ok = !(mean && labels.defined() && rows > kMaxRowsCountedInKernel);
  if (rows > 0 && count_in_kernel_ok && fused_path_requested()) {
    at::Tensor per_row = at::empty({rows}, student.options().dtype(acc));
    at::Tensor stats = at::empty({rows, kNumStats}, student.options().dtype(acc));
    at::Tensor grad = at::empty(student.sizes(), student.options());
    at::Tensor total = at::empty({}, student.options().dtype(acc));
    FusedReduction reduce;
    reduce.labels = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
    reduce.ignore_index = ignore_index;
    reduce.mean = mean;
    if (acc == at::kFloat) {
      reduce.total = total.mutable_data_ptr<float>();
      reduce.ticket = launch_ticket(at::cuda::getCurrentCUDAStream());
      if (launch_fused_forward_grad(student, teacher, nullptr, cfg, 1.0, at::Tensor(), per_row, stats, grad,
                                    &reduce)) {
        return {total, grad};
      }
    }
  }
  // The composed path: several launches (see the top of the file).
  return composed_loss_grad(student, labels, ignore_index, mean, acc, [&](const auto& row_mask, const auto& scale) {
    return forward_grad_impl(student, teacher, row_mask, weighting, alpha, temperature, 1.0, scale);
  });
}

void csd_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "grad_output must be a one-element tensor, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "grad_output is on ", grad_output.device(),
                    " but grad_student is on ", grad.device());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad_student must be contiguous (the tensor csd_loss_grad returned)");
  const c10::cuda::CUDAGuard guard(grad.device());
  // The scalar in the kernel's arithmetic type: no copy when autograd hands
  // over the float32 (float64) loss's gradient.
  const auto s_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scale = grad_output.reshape({1}).to(s_type).contiguous();
  at::Tensor out = grad;  // in place
  launch_scale_grad(out, scale);
}

}  // namespace
}  // namespace gpu
}  // namespace csd

TORCH_LIBRARY_IMPL(csd_ext, CUDA, m) {
  m.impl("csd_loss_grad", &csd::gpu::csd_loss_grad_cuda);
  m.impl("csd_scale_grad_", &csd::gpu::csd_scale_grad_cuda);
  m.impl("csd_forward_grad", &csd::gpu::csd_forward_grad_cuda);
  m.impl("csd_backward_reuse_", &csd::gpu::csd_backward_reuse_cuda);
  m.impl("csd_forward_grad_scaled", &csd::gpu::csd_forward_grad_scaled_cuda);
  m.impl("csd_backward_reuse_scaled_", &csd::gpu::csd_backward_reuse_scaled_cuda);
}
