// CPU implementations of the csd_ext ops: allocation, layout, and the choice
// of instruction-set variant.  The math is in csd_cpu_kernel.h / csd_math.h.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../csd_kernel_api.h"
#include "csd_cpu_variants.h"

namespace csd::cpu {
namespace {

// Same choice as ATen's own kernels, so ATEN_CPU_CAPABILITY=default|avx2|avx512
// forces a variant (the tests use it to run every variant on one machine).
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
  const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
#if defined(CSD_HAVE_AVX512)
  if (cap == "AVX512") return Isa::kAvx512;
#endif
#if defined(CSD_HAVE_AVX2)
  if (cap == "AVX2" || cap == "AVX512") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa chosen_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// A fresh [N, V] gradient is usually a new mmap (glibc serves large blocks
// that way), and first-touching it 4 KB at a time costs one page fault per
// page -- on a VM that rivals the kernel itself (~50 ms for 50 MB).  Asking
// for transparent huge pages on the 2 MB-aligned interior cuts the faults
// 512-fold.  It is only a hint (no effect where THP is off), and it covers
// only memory this tensor owns; torch does the same for every allocation
// when THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (nbytes < 2 * kHuge) return;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// The vocabulary dimension must be contiguous; rows may have any stride
// (a vocabulary slice such as logits[..., :V], or a teacher row broadcast
// with stride 0, is read in place).
at::Tensor with_contiguous_rows(const at::Tensor& x) {
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

void run_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* mask,
                 const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats, at::Tensor& grad,
                 double grad_scale) {
  switch (chosen_isa()) {
#if defined(CSD_HAVE_AVX512)
    case Isa::kAvx512: forward_avx512(student, teacher, mask, cfg, loss, stats, grad, grad_scale); break;
#endif
#if defined(CSD_HAVE_AVX2)
    case Isa::kAvx2: forward_avx2(student, teacher, mask, cfg, loss, stats, grad, grad_scale); break;
#endif
    default: forward_default(student, teacher, mask, cfg, loss, stats, grad, grad_scale); break;
  }
}

void run_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                  const at::Tensor& stats, const LossConfig& cfg, at::Tensor& grad,
                  bool only_changed, double grad_scale) {
  switch (chosen_isa()) {
#if defined(CSD_HAVE_AVX512)
    case Isa::kAvx512:
      backward_avx512(grad_loss, student, teacher, stats, cfg, grad, only_changed, grad_scale);
      break;
#endif
#if defined(CSD_HAVE_AVX2)
    case Isa::kAvx2:
      backward_avx2(grad_loss, student, teacher, stats, cfg, grad, only_changed, grad_scale);
      break;
#endif
    default:
      backward_default(grad_loss, student, teacher, stats, cfg, grad, only_changed, grad_scale);
      break;
  }
}

// Shared by csd_forward and csd_forward_grad; `with_grad` also allocates and
// fills the gradient for grad_output = grad_scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& student_in, const at::Tensor& teacher_in,
    const std::optional<at::Tensor>& row_mask_in, c10::string_view weighting, double alpha,
    double temperature, bool with_grad, double grad_scale) {
  check_logits(student_in, teacher_in);
  check_row_mask(row_mask_in, student_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0);
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc));
  at::Tensor stats = at::empty({rows, kNumStats}, student.options().dtype(acc));
  at::Tensor grad;
  if (with_grad) {
    grad = at::empty(student.sizes(), student.options());
    advise_huge_pages(grad.data_ptr(), grad.nbytes());
  }
  at::Tensor row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const bool* mask = row_mask.defined() ? row_mask.const_data_ptr<bool>() : nullptr;
  if (rows > 0) run_forward(student, teacher, mask, cfg, loss, stats, grad, grad_scale);
  return {loss, stats, grad};
}

std::tuple<at::Tensor, at::Tensor> csd_forward_cpu(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& row_mask,
                                                   c10::string_view weighting, double alpha,
                                                   double temperature) {
  auto [loss, stats, grad] =
      forward_impl(student, teacher, row_mask, weighting, alpha, temperature, false, 0.0);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csd_forward_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_mask, c10::string_view weighting, double alpha,
    double temperature, double grad_scale) {
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
  return forward_impl(student, teacher, row_mask, weighting, alpha, temperature, true,
                      grad_scale);
}

at::Tensor checked_grad_loss(const at::Tensor& grad_loss_in, const at::Tensor& student,
                             const at::Tensor& teacher, const at::Tensor& stats) {
  const auto acc = accumulate_type_of(student, teacher);
  const int64_t rows = student.size(0);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                        stats.scalar_type() == acc && stats.is_contiguous(),
                    "stats must be the contiguous [", rows, ", ", int(kNumStats), "] ", acc,
                    " tensor returned by csd_forward");
  TORCH_CHECK_VALUE(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == rows,
                    "grad_loss must have shape [", rows, "], got ", grad_loss_in.sizes());
  // Autograd hands a mean/sum's gradient over as an expanded scalar (stride 0);
  // the kernel reads it with its stride, so this is no copy.
  return grad_loss_in.to(acc);
}

at::Tensor csd_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                            const at::Tensor& teacher_in, const at::Tensor& stats,
                            c10::string_view weighting, double alpha, double temperature) {
  check_logits(student_in, teacher_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const at::Tensor grad_loss = checked_grad_loss(grad_loss_in, student, teacher, stats);
  at::Tensor grad = at::empty(student.sizes(), student.options());
  if (student.size(0) == 0) return grad;
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  run_backward(grad_loss, student, teacher, stats, cfg, grad, false, 0.0);
  return grad;
}

void csd_backward_reuse_cpu(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                            const at::Tensor& teacher_in, const at::Tensor& stats,
                            const at::Tensor& grad, c10::string_view weighting, double alpha,
                            double temperature, double grad_scale) {
  check_logits(student_in, teacher_in);
  const LossConfig cfg = make_config(std::string(weighting), alpha, temperature);
  const at::Tensor student = with_contiguous_rows(student_in);
  const at::Tensor teacher = with_contiguous_rows(teacher_in);
  const at::Tensor grad_loss = checked_grad_loss(grad_loss_in, student, teacher, stats);
  TORCH_CHECK_VALUE(grad.sizes() == student.sizes() && grad.is_contiguous() &&
                        grad.scalar_type() == student.scalar_type(),
                    "grad_student must be the contiguous ", student.scalar_type(), " tensor of shape ",
                    student.sizes(), " returned by csd_forward_grad, got ", grad.scalar_type(), " ",
                    grad.sizes());
  if (student.size(0) == 0) return;
  at::Tensor out = grad;  // written in place
  run_backward(grad_loss, student, teacher, stats, cfg, out, true, grad_scale);
}

}  // namespace
}  // namespace csd::cpu

// Which CPU kernel variant runs here, for tests and benchmark reports.
TORCH_LIBRARY_FRAGMENT(csd_ext, m) {
  m.def("cpu_kernel_isa() -> str", [] {
    switch (csd::cpu::chosen_isa()) {
      case csd::cpu::Isa::kAvx512: return std::string("avx512");
      case csd::cpu::Isa::kAvx2: return std::string("avx2");
      default: return std::string("default");
    }
  });
}

TORCH_LIBRARY_IMPL(csd_ext, CPU, m) {
  m.impl("csd_forward", &csd::cpu::csd_forward_cpu);
  m.impl("csd_backward", &csd::cpu::csd_backward_cpu);
  m.impl("csd_forward_grad", &csd::cpu::csd_forward_grad_cpu);
  m.impl("csd_backward_reuse_", &csd::cpu::csd_backward_reuse_cpu);
}
