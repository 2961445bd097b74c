// Op schemas, argument checks, and the Python module stub.
//
// Ops (see csd_ext/_ops.py for fake and autograd registrations):
//   csd_forward(student [N,V], teacher [N,V], row_mask [N] bool?, weighting,
//               alpha, temperature) -> (loss [N], stats [N, kNumStats])
//   csd_backward(grad_loss [N], student, teacher, stats, weighting, alpha,
//                temperature) -> grad_student [N,V]
//   csd_forward_grad(student, teacher, row_mask?, weighting, alpha, temperature,
//                    grad_scale) -> (loss, stats, grad_student)
//       the forward plus the gradient for grad_loss = grad_scale on every row,
//       computed while each row is in cache (eager autograd uses it when the
//       student requires grad; optional per backend);
//   csd_backward_reuse_(grad_loss, student, teacher, stats, grad_student(a!),
//                       weighting, alpha, temperature, grad_scale) -> ()
//       turns that gradient into the one for grad_loss, in place: rows whose
//       grad_loss is not grad_scale are recomputed.
//   csd_forward_grad_scaled(..., Tensor grad_scale) / csd_backward_reuse_scaled_(..., Tensor grad_scale)
//       the same with grad_scale a one-element tensor of the loss dtype on the
//       logits' device (e.g. 1 / the valid-token count, computed there), so
//       the host never reads it (no sync).
//   csd_loss_grad(student, teacher, labels [N] int?, ignore_index, weighting, alpha,
//                 temperature, reduction) -> (loss [], grad_student [N,V])
//       the whole reduced loss ("mean" or "sum") and its gradient for a
//       backward of 1.0: the row mask (labels != ignore_index), the mean's
//       count and the reduction are the op's own, so on CUDA it is one launch
//       of the fused kernel (docs/kernels.md) and the count never leaves the
//       device;
//   csd_scale_grad_(grad_student(a!), grad_output []) -> ()
//       its backward: grad_student *= grad_output, read on the device; a
//       grad_output of exactly 1 leaves it untouched (nothing read).
// loss and stats are float32, or float64 when either input is float64.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "csd_kernel_api.h"

// CSD_OPS_CHECKS_ONLY: only the checks below, without the module and the
// op schemas (the emulated CUDA ops of the test suite share the checks,
// tests/cpp/torch_emulated_ops.cpp).
#ifndef CSD_OPS_CHECKS_ONLY
// An importable, empty `csd_ext._C` module: loading it runs the static
// TORCH_LIBRARY registrations below (as in pytorch/extension-cpp).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace csd {

LossConfig make_config(const std::string& weighting, double alpha, double temperature) {
  TORCH_CHECK_VALUE(weighting.size() == 2 && is_weight_letter(weighting[0]) &&
                        is_weight_letter(weighting[1]),
                    "weighting must be two letters from S, T, U, M (e.g. 'SS', 'TS'), got '",
                    weighting, "'");
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a finite number > 0, got ", temperature);
  return {mixture_of<double>(weighting[0], alpha), mixture_of<double>(weighting[1], alpha),
          1.0 / temperature};
}

static bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_TYPE(is_supported_float(student.scalar_type()),
                   "student_logits must be float32, bfloat16, float16 or float64, got ",
                   student.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(teacher.scalar_type()),
                   "teacher_logits must be float32, bfloat16, float16 or float64, got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2,
                    "csd_ext ops take 2-D [N, V] logits; got student_logits of shape ",
                    student.sizes(), " and teacher_logits of shape ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(1) == teacher.size(1),
                    "student_logits has vocabulary size ", student.size(1),
                    " but teacher_logits has ", teacher.size(1),
                    "; slice both to the shared vocabulary, e.g. logits[..., :V]");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0), "student_logits has ", student.size(0),
                    " rows but teacher_logits has ", teacher.size(0));
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "student_logits is on ", student.device(), " but teacher_logits is on ",
                    teacher.device());
  TORCH_CHECK_VALUE(student.size(1) > 0, "student_logits has an empty vocabulary dimension");
}

void check_row_mask(const std::optional<at::Tensor>& row_mask, const at::Tensor& student) {
  if (!row_mask.has_value()) return;
  const at::Tensor& m = *row_mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "row_mask must be a bool tensor, got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == student.size(0), "row_mask must have shape [",
                    student.size(0), "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == student.device(), "row_mask is on ", m.device(),
                    " but student_logits is on ", student.device());
}

void check_labels(const std::optional<at::Tensor>& labels, const at::Tensor& student) {
  if (!labels.has_value()) return;
  const at::Tensor& l = *labels;
  TORCH_CHECK_TYPE(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
                   "labels must be an integer tensor, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == student.size(0), "labels must have shape [",
                    student.size(0), "] (flattened like the logits' rows), got ", l.sizes());
  TORCH_CHECK_VALUE(l.device() == student.device(), "labels is on ", l.device(),
                    " but student_logits is on ", student.device());
}

bool reduction_is_mean(c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "reduction must be 'mean' or 'sum' for csd_loss_grad, got '", std::string(reduction),
                    "'");
  return reduction == "mean";
}

at::ScalarType accumulate_type_of(const at::Tensor& student, const at::Tensor& teacher) {
  return (student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
}

void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& stats,
                           const at::Tensor& student, const at::Tensor& teacher) {
  const int64_t rows = student.size(0);
  const auto acc = accumulate_type_of(student, teacher);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                        stats.scalar_type() == acc && stats.is_contiguous(),
                    "stats must be the contiguous [", rows, ", ", int(kNumStats), "] ", acc,
                    " tensor returned by csd_forward");
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == rows,
                    "grad_loss must have shape [", rows, "], got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(stats.device() == student.device(), "stats is on ", stats.device(),
                    " but student_logits is on ", student.device());
  TORCH_CHECK_VALUE(grad_loss.device() == student.device(), "grad_loss is on ",
                    grad_loss.device(), " but student_logits is on ", student.device());
}

}  // namespace csd

#ifndef CSD_OPS_CHECKS_ONLY
TORCH_LIBRARY(csd_ext, m) {
  m.def(
      "csd_forward(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, "
      "float alpha, float temperature) -> (Tensor, Tensor)");
  m.def(
      "csd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, "
      "str weighting, float alpha, float temperature) -> Tensor");
  m.def(
      "csd_forward_grad(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, "
      "float alpha, float temperature, float grad_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "csd_backward_reuse_(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, "
      "Tensor(a!) grad_student, str weighting, float alpha, float temperature, "
      "float grad_scale) -> ()");
  m.def(
      "csd_forward_grad_scaled(Tensor student, Tensor teacher, Tensor? row_mask, str weighting, "
      "float alpha, float temperature, Tensor grad_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "csd_backward_reuse_scaled_(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, "
      "Tensor(a!) grad_student, str weighting, float alpha, float temperature, "
      "Tensor grad_scale) -> ()");
  m.def(
      "csd_loss_grad(Tensor student, Tensor teacher, Tensor? labels, int ignore_index, str weighting, "
      "float alpha, float temperature, str reduction) -> (Tensor, Tensor)");
  m.def("csd_scale_grad_(Tensor(a!) grad_student, Tensor grad_output) -> ()");
}
#endif
