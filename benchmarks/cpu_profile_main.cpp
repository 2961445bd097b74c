// Driver for benchmarks/cpu_profile.sh: one single-thread fused forward+grad
// (csd_forward_grad's kernel, SS, bf16) through the AVX2 variant of the CPU
// kernel, built with -DCSD_PROFILE_NOINLINE so that callgrind can attribute
// instructions to each pass.  Not part of the extension.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include <cstdio>
#include <cstdlib>

#include "../csrc/cpu/csd_cpu_kernel.h"

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 32;
  const int64_t vocab = argc > 2 ? std::atoll(argv[2]) : 50257;
  at::set_num_threads(1);
  at::manual_seed(0);
  const at::Tensor z = (at::randn({rows, vocab}) * 3.0).to(at::kBFloat16);
  const at::Tensor t = (at::randn({rows, vocab}) * 3.0).to(at::kBFloat16);
  const csd::LossConfig cfg{{1, 0, 0}, {1, 0, 0}, 1.0};  // SS, tau = 1
  at::Tensor loss = at::empty({rows}, at::kFloat);
  at::Tensor stats = at::empty({rows, csd::kNumStats}, at::kFloat);
  at::Tensor grad = at::empty({rows, vocab}, at::kBFloat16);
  csd::cpu::AVX2::forward_typed<c10::BFloat16, c10::BFloat16, float>(
      z, t, nullptr, cfg, loss, stats, grad.mutable_data_ptr<c10::BFloat16>(), 1.0f / rows);
  // A sanity check against fp64 (SS: g = grad_scale * S (d - E_S d), loss =
  // Var_S(d) / 2), so that a profile of a broken kernel does not go unnoticed.
  const at::Tensor z64 = z.to(at::kDouble), d64 = z64 - t.to(at::kDouble);
  const at::Tensor s64 = at::softmax(z64, 1);
  const at::Tensor mean = (s64 * d64).sum(1, true);
  const at::Tensor g64 = s64 * (d64 - mean) / double(rows);
  const at::Tensor l64 = 0.5 * (s64 * (d64 - mean).pow(2)).sum(1);
  const double gerr = ((grad.to(at::kDouble) - g64).abs().max() / g64.abs().max()).item<double>();
  const double lerr = ((loss.to(at::kDouble) - l64).abs().max() / l64.abs().max()).item<double>();
  std::printf("loss sum %.9g  grad abs sum %.9g  max rel err vs fp64: loss %.3g grad %.3g\n",
              loss.sum().item<double>(), grad.abs().to(at::kDouble).sum().item<double>(), lerr,
              gerr);
  return 0;
}
