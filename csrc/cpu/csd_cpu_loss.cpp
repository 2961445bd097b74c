// CPU implementations of csd_ext::csd_loss_grad and csd_ext::csd_scale_grad_
// (csrc/csd_ops.cpp).  On the CPU the op is a composition: the row mask,
// csd_forward_grad (the CPU kernel, through the dispatcher) with the
// reduction's gradient scale, and the sum of the per-row losses -- the same
// values as csd_loss's op pair + reduce_rows path, since reading the count
// on the host costs nothing here.  The CUDA op does all of it in one launch
// (csrc/cuda/csd_cuda_fused_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "../csd_kernel_api.h"

namespace csd::cpu {
namespace {

using ForwardGradFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, double, double,
    double);

std::tuple<at::Tensor, at::Tensor> csd_loss_grad_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& labels,
                                                     int64_t ignore_index, c10::string_view weighting,
                                                     double alpha, double temperature,
                                                     c10::string_view reduction) {
  check_logits(student, teacher);
  check_labels(labels, student);
  const bool mean = reduction_is_mean(reduction);
  std::optional<at::Tensor> row_mask;
  if (labels.has_value()) row_mask = labels->ne(ignore_index);
  const int64_t count = row_mask.has_value() ? row_mask->sum().item<int64_t>() : student.size(0);
  const bool fp64 = accumulate_type_of(student, teacher) == at::kDouble;
  // The scale in the accumulation type, as the kernels (and mean_scale in
  // csd_ext/_ops.py) compute it: 1/count rounded once, to that type.
  const double grad_scale = fp64 ? reduction_grad_scale(mean, double(count))
                                 : double(reduction_grad_scale(mean, float(count)));
  static const auto forward_grad = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("csd_ext::csd_forward_grad", "")
                                       .typed<ForwardGradFn>();
  auto [per_row, stats, grad] = forward_grad.call(student, teacher, row_mask, weighting, alpha, temperature,
                                                  grad_scale);
  // As csd_ext/_reduce.py's reduce_rows: the sum, divided by max(count, 1) (csd_math.h).
  at::Tensor loss = per_row.sum();
  if (mean) loss = loss.div(reduction_divisor(mean, double(count)));
  return {loss, grad};
}

void csd_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "grad_output must be a one-element tensor, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "grad_output is on ", grad_output.device(),
                    " but grad_student is on ", grad.device());
  // Exactly 1 (a plain backward of the loss): the stored gradient is the answer.
  if (grad_output.item<double>() == 1.0) return;
  at::Tensor out = grad;  // in place
  out.mul_(grad_output.reshape({}));
}

}  // namespace
}  // namespace csd::cpu

TORCH_LIBRARY_IMPL(csd_ext, CPU, m) {
  m.impl("csd_loss_grad", &csd::cpu::csd_loss_grad_cpu);
  m.impl("csd_scale_grad_", &csd::cpu::csd_scale_grad_cpu);
}
