// Entry points of the CPU kernel, one per instruction set (cpu/isa/*.cpp).
#pragma once

#include <ATen/ATen.h>

#include "../csd_kernel_api.h"

namespace csd::cpu {

// forward_*: loss and stats; with `grad` defined, also the gradient for
//   grad_output = grad_scale on every row (fused forward).
// backward_*: the gradient for grad_loss; with only_changed, `grad` already
//   holds it for grad_output = grad_scale and only rows that differ are redone.
#define CSD_DECLARE_CPU_VARIANT(isa)                                                       \
  void forward_##isa(const at::Tensor& student, const at::Tensor& teacher,                 \
                     const bool* row_mask, const LossConfig& cfg, at::Tensor& loss,        \
                     at::Tensor& stats, at::Tensor& grad, double grad_scale);              \
  void backward_##isa(const at::Tensor& grad_loss, const at::Tensor& student,              \
                      const at::Tensor& teacher, const at::Tensor& stats,                  \
                      const LossConfig& cfg, at::Tensor& grad, bool only_changed,          \
                      double grad_scale);

CSD_DECLARE_CPU_VARIANT(default)
#if defined(CSD_HAVE_AVX2)
CSD_DECLARE_CPU_VARIANT(avx2)
#endif
#if defined(CSD_HAVE_AVX512)
CSD_DECLARE_CPU_VARIANT(avx512)
#endif

#undef CSD_DECLARE_CPU_VARIANT

}  // namespace csd::cpu
