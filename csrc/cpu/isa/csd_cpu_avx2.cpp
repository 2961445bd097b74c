// The CPU kernel built for the AVX2 instruction set.  setup.py and
// CMakeLists.txt compile this file with the matching -m flags; the macros
// select ATen's Vectorized implementation and the kernel's namespace.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "../csd_cpu_kernel.h"
#include "../csd_cpu_variants.h"

namespace csd::cpu {

void forward_avx2(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats, at::Tensor& grad,
                double grad_scale) {
  AVX2::forward(student, teacher, row_mask, cfg, loss, stats, grad, grad_scale);
}

void backward_avx2(const at::Tensor& grad_loss, const at::Tensor& student,
                 const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                 at::Tensor& grad, bool only_changed, double grad_scale) {
  AVX2::backward(grad_loss, student, teacher, stats, cfg, grad, only_changed, grad_scale);
}

}  // namespace csd::cpu
