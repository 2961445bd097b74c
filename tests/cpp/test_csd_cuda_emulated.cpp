// Runs the CUDA kernels themselves (csrc/cuda/csd_cuda_forward_kernels.cuh,
// csd_cuda_backward_kernel.cuh) on the CPU under cuda_emulation.h, with the
// launch plans the GPU launcher uses (H200: 132 SMs), and checks loss and
// gradient against a float64 evaluation of the definition:
//   L = 1/4 [Var_w1(d) + Var_w2(d) + (E_w1 d - E_w2 d)^2],
//   dL/dz_k = 1/2 [w1_k (d_k - E_w2 d) + w2_k (d_k - E_w1 d)]   (weights held constant),
// for every weighting, fp32 / bf16 / fp16 / fp64 in any pair, masked entries,
// ignored rows, per-row and broadcast grad_output, rows at any element offset
// and row stride, and each launch path: a warp per row, a block per row, and
// split rows with the merge kernel.  This is the CPU stand-in for the GPU
// suite (python_tests/test_cuda.py): it exercises the kernels' indexing,
// masking and CUB reductions, but not the real compiler or memory model.
#include "cuda_emulation.h"  // first: defines the CUDA keywords and cub:: for the kernels

#include "emulated_launch.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bf16.h"

// As c10::BFloat16 in the kernels: vectors convert two elements per word.
template <>
struct csd::gpu::IsBFloat16<Bf16> : std::true_type {};
#include "check.h"

using namespace csd;
using namespace csd::gpu;

namespace {

using Half = _Float16;
constexpr int kSms = 132;  // an H200's multiprocessor count: decides when rows are split
constexpr double kEps32 = 1.1920928955078125e-07;
const double kInf = std::numeric_limits<double>::infinity();
const float kInf32 = std::numeric_limits<float>::infinity();

template <typename T> const char* name_of();
template <> const char* name_of<float>() { return "fp32"; }
template <> const char* name_of<double>() { return "fp64"; }
template <> const char* name_of<Bf16>() { return "bf16"; }
template <> const char* name_of<Half>() { return "fp16"; }

template <typename T> double eps_of() { return kEps32; }
template <> double eps_of<double>() { return 2.220446049250313e-16; }
template <> double eps_of<Bf16>() { return 0.0078125; }
template <> double eps_of<Half>() { return 0.0009765625; }

// The smallest normal number times eps: the spacing of the subnormals, which
// bounds the rounding of a tiny gradient stored in that dtype.
template <typename T> double subnormal_step() { return 1.401298464324817e-45; }
template <> double subnormal_step<double>() { return 4.9406564584124654e-324; }
template <> double subnormal_step<Bf16>() { return 9.183549615799121e-41; }
template <> double subnormal_step<Half>() { return 5.960464477539063e-08; }

template <typename T> double to_double(T x) { return double(float(x)); }
template <> double to_double<double>(double x) { return x; }

template <typename zs_t, typename ts_t>
using acc_of = std::conditional_t<std::is_same_v<zs_t, double> || std::is_same_v<ts_t, double>, double, float>;

// 256-byte aligned storage (as torch's allocators give) for rows of `stride`
// elements whose first element sits `offset` elements past the alignment.
template <typename T>
struct Rows {
  std::vector<T> mem;
  T* data;
  int64_t rows, vocab, stride;
  Rows(int64_t rows_, int64_t vocab_, int64_t stride_, int64_t offset)
      : mem(size_t(rows_ * stride_ + offset + 256)), rows(rows_), vocab(vocab_), stride(stride_) {
    T* base = mem.data();
    while (reinterpret_cast<uintptr_t>(base) % 256 != 0) ++base;
    data = base + offset;
  }
  T& at(int64_t r, int64_t i) { return data[r * stride + i]; }
};

struct Case {
  int64_t rows = 4, vocab = 1000;
  std::string weighting = "SS";
  double alpha = 0.5, temperature = 1.0;
  double mask_frac = 0.0, ignore_frac = 0.0, scale = 5.0, offset_t = 0.0;
  int64_t z_offset = 0, t_offset = 0, pad = 0;  // element offsets and extra row stride
  bool per_row_grad = true;                    // else a broadcast scalar (stride 0)
  uint32_t seed = 0;
};

std::string describe(const Case& c, const char* zname, const char* tname) {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "%s/%s %lldx%lld %s alpha=%.2f tau=%.2f mask=%.2f ignore=%.2f offsets=%lld,%lld pad=%lld "
                "%s seed=%u",
                zname, tname, (long long)c.rows, (long long)c.vocab, c.weighting.c_str(), c.alpha,
                c.temperature, c.mask_frac, c.ignore_frac, (long long)c.z_offset, (long long)c.t_offset,
                (long long)c.pad, c.per_row_grad ? "per-row grad" : "scalar grad", c.seed);
  return buf;
}

struct RowRef {
  double loss;
  std::vector<double> w1, w2, unit_grad;  // unit_grad: dL/dz with grad_output 1
  double mag;                             // max |z|, |t| over unmasked entries
};

// The definition in float64 on the stored values.
RowRef reference_row(const std::vector<double>& z, const std::vector<double>& t, const Mixture<double>& m1,
                     const Mixture<double>& m2, double inv_temp) {
  const size_t n = z.size();
  RowRef r{0.0, std::vector<double>(n, 0.0), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0), 0.0};
  std::vector<char> ok(n);
  double ms = -kInf, mt = -kInf;
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    ok[i] = z[i] != -kInf && t[i] != -kInf;
    if (!ok[i]) continue;
    ++count;
    ms = std::max(ms, z[i] * inv_temp);
    mt = std::max(mt, t[i] * inv_temp);
    r.mag = std::max({r.mag, std::fabs(z[i]), std::fabs(t[i])});
  }
  if (count == 0) return r;
  std::vector<double> s(n, 0.0), tt(n, 0.0);
  double ss = 0, st = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!ok[i]) continue;
    s[i] = std::exp(z[i] * inv_temp - ms);
    tt[i] = std::exp(t[i] * inv_temp - mt);
    ss += s[i];
    st += tt[i];
  }
  double e1 = 0, e2 = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!ok[i]) continue;
    const double u = 1.0 / double(count);
    r.w1[i] = m1.s * s[i] / ss + m1.t * tt[i] / st + m1.u * u;
    r.w2[i] = m2.s * s[i] / ss + m2.t * tt[i] / st + m2.u * u;
    e1 += r.w1[i] * (z[i] - t[i]);
    e2 += r.w2[i] * (z[i] - t[i]);
  }
  double v1 = 0, v2 = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!ok[i]) continue;
    const double d = z[i] - t[i];
    v1 += r.w1[i] * (d - e1) * (d - e1);
    v2 += r.w2[i] * (d - e2) * (d - e2);
    r.unit_grad[i] = 0.5 * (r.w1[i] * (d - e2) + r.w2[i] * (d - e1));
  }
  r.loss = 0.25 * (v1 + v2 + (e1 - e2) * (e1 - e2));
  return r;
}

// The emulated launchers (emulated_launch.h) on Rows storage, an H200's SM count.
template <typename zs_t, typename ts_t, typename acc_t = acc_of<zs_t, ts_t>>
void emulated_forward(const Rows<zs_t>& z, const Rows<ts_t>& t, const bool* mask_ptr,
                      const Mixture<double>& m1, const Mixture<double>& m2, double inv_temp,
                      std::vector<acc_t>& loss, std::vector<acc_t>& stats, bool force_general) {
  loss.assign(size_t(z.rows), acc_t(-999));
  stats.assign(size_t(z.rows * kNumStats), acc_t(-999));
  csd::gpu::emulated_forward(static_cast<const zs_t*>(z.data), z.stride, static_cast<const ts_t*>(t.data),
                             t.stride, z.rows, z.vocab, mask_ptr, m1, m2, inv_temp, loss.data(), stats.data(),
                             kSms, force_general);
}

template <typename zs_t, typename ts_t, typename acc_t = acc_of<zs_t, ts_t>>
void emulated_backward(const Rows<zs_t>& z, const Rows<ts_t>& t, const std::vector<acc_t>& grad_out, bool per_row,
                       const std::vector<acc_t>& stats, const Mixture<double>& m1, const Mixture<double>& m2,
                       double inv_temp, std::vector<zs_t>& grad, bool force_general) {
  grad.assign(size_t(z.rows * z.vocab), zs_t(12345.0f));
  csd::gpu::emulated_backward(grad.data(), static_cast<const zs_t*>(z.data), z.stride,
                              static_cast<const ts_t*>(t.data), t.stride, z.rows, z.vocab, grad_out.data(),
                              per_row ? 1 : 0, stats.data(), m1, m2, inv_temp, force_general);
}

template <typename zs_t, typename ts_t>
void run_case(const Case& c) {
  using acc_t = acc_of<zs_t, ts_t>;
  const std::string where = describe(c, name_of<zs_t>(), name_of<ts_t>());
  std::mt19937 rng(c.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const int64_t rows = c.rows, vocab = c.vocab;
  Rows<zs_t> z(rows, vocab, vocab + c.pad, c.z_offset);
  Rows<ts_t> t(rows, vocab, vocab + c.pad, c.t_offset);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < vocab; ++i) {
      const double base = c.scale * normal(rng);
      double zv = base + 0.5 * c.scale * normal(rng), tv = base + c.offset_t;
      if (unif(rng) < c.mask_frac) (unif(rng) < 0.5 ? zv : tv) = -kInf;
      z.at(r, i) = zs_t(zv);
      t.at(r, i) = ts_t(tv);
    }
  }
  std::vector<char> mask_bytes(size_t(rows), 1);
  bool any_ignored = false;
  for (auto& m : mask_bytes) {
    m = unif(rng) >= c.ignore_frac;
    any_ignored |= !m;
  }
  std::vector<bool> keep(mask_bytes.begin(), mask_bytes.end());
  std::unique_ptr<bool[]> row_mask(new bool[size_t(rows)]);
  for (int64_t r = 0; r < rows; ++r) row_mask[r] = keep[r];
  const bool* mask_ptr = c.ignore_frac > 0 ? row_mask.get() : nullptr;
  (void)any_ignored;

  const Mixture<double> m1 = mixture_of<double>(c.weighting[0], c.alpha);
  const Mixture<double> m2 = mixture_of<double>(c.weighting[1], c.alpha);
  const double inv_temp = 1.0 / c.temperature;

  // Forward, as launch_forward does it (the same variant for the weighting).
  std::vector<acc_t> loss, stats;
  emulated_forward<zs_t, ts_t>(z, t, mask_ptr, m1, m2, inv_temp, loss, stats, /*force_general=*/false);

  // Backward, as launch_backward does it.
  std::vector<acc_t> grad_out(static_cast<size_t>(rows));
  for (auto& g : grad_out) g = acc_t(c.per_row_grad ? normal(rng) : 0.37);
  std::vector<zs_t> grad;
  emulated_backward<zs_t, ts_t>(z, t, grad_out, c.per_row_grad, stats, m1, m2, inv_temp, grad, false);

  const bool fp64 = std::is_same_v<acc_t, double>;
  const double acc_eps = fp64 ? eps_of<double>() : kEps32;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> zr(static_cast<size_t>(vocab)), tr(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) {
      zr[size_t(i)] = to_double(z.at(r, i));
      tr[size_t(i)] = to_double(t.at(r, i));
    }
    const RowRef ref = reference_row(zr, tr, m1, m2, inv_temp);
    const bool counted = mask_ptr == nullptr || keep[size_t(r)];
    const double want_loss = counted ? ref.loss : 0.0;
    // Rounding d = z - t to the accumulation dtype moves L by <= sum |dL/dd| * eps * mag;
    // the exps and sums add tens of eps relative to L.
    double sens = 0;
    for (double g : ref.unit_grad) sens += std::fabs(g);
    const double ltol = 4 * acc_eps * sens * ref.mag + 64 * acc_eps * std::fabs(want_loss) + 1e-14 * (1 + ref.mag * ref.mag);
    if (!(std::fabs(double(loss[size_t(r)]) - want_loss) <= ltol)) {
      char buf[160];
      std::snprintf(buf, sizeof(buf), ": row %lld loss %.9g, expected %.9g (tol %.3g)", (long long)r,
                    double(loss[size_t(r)]), want_loss, ltol);
      check::fail(__FILE__, __LINE__, where + buf);
      return;
    }
    if (double(stats[size_t(r * kNumStats + kRowWeight)]) != (counted ? 1.0 : 0.0)) {
      check::fail(__FILE__, __LINE__, where + ": row weight of row " + std::to_string(r));
      return;
    }
    const double g_row = double(grad_out[size_t(r)]);
    for (int64_t i = 0; i < vocab; ++i) {
      const double got = to_double(grad[size_t(r * vocab + i)]);
      const double want = counted ? g_row * ref.unit_grad[size_t(i)] : 0.0;
      const bool masked = zr[size_t(i)] == -kInf || tr[size_t(i)] == -kInf;
      const double tol = 8 * acc_eps * (ref.w1[size_t(i)] + ref.w2[size_t(i)]) * std::fabs(g_row) * ref.mag +
                         64 * acc_eps * std::fabs(want) + eps_of<zs_t>() * std::fabs(want) +
                         subnormal_step<zs_t>() + 1e-30;
      if ((masked || !counted) ? got != 0.0 : !(std::fabs(got - want) <= tol)) {
        char buf[200];
        std::snprintf(buf, sizeof(buf), ": row %lld element %lld gradient %.9g, expected %.9g (tol %.3g)%s",
                      (long long)r, (long long)i, got, want, tol, masked ? " [masked]" : "");
        check::fail(__FILE__, __LINE__, where + buf);
        return;
      }
    }
  }
}

const char* const kWeightings[] = {"SS", "ST", "SU", "SM", "TS", "TT", "TU", "TM",
                                   "US", "UT", "UU", "UM", "MS", "MT", "MU", "MM"};

template <typename zs_t>
void dtype_pairs_with(const Case& c) {
  run_case<zs_t, float>(c);
  run_case<zs_t, Bf16>(c);
  run_case<zs_t, Half>(c);
  run_case<zs_t, double>(c);
}

}  // namespace

// test_cuda.py::test_every_dtype_pair_against_cpu_and_reference
TEST_CASE(every_dtype_pair_block_per_row) {
  Case c;
  c.rows = 6, c.vocab = 5003, c.weighting = "MM", c.alpha = 0.3, c.temperature = 1.5;
  c.scale = 8.0, c.mask_frac = 0.05, c.ignore_frac = 0.3, c.seed = 1;
  dtype_pairs_with<float>(c);
  dtype_pairs_with<Bf16>(c);
  dtype_pairs_with<Half>(c);
  dtype_pairs_with<double>(c);
}

// test_cuda.py::test_all_weightings: a warp per row, and split rows.
TEST_CASE(all_weightings_warp_rows_and_split_rows) {
  for (const char* w : kWeightings) {
    for (double tau : {1.0, 1.5}) {
      Case c;
      c.weighting = w, c.alpha = 0.15, c.temperature = tau, c.mask_frac = 0.02, c.seed = 3;
      c.rows = 33, c.vocab = 1000;
      run_case<float, float>(c);
      c.rows = 5, c.vocab = 32000;
      run_case<float, float>(c);
    }
  }
}

// test_cuda.py::test_vocab_sizes_and_paths
TEST_CASE(vocab_sizes_and_launch_paths) {
  for (int64_t vocab : {1, 2, 7, 31, 33, 4095, 4096, 4097, 8192, 50257}) {
    for (const char* w : {"SS", "TS", "US", "MM"}) {
      Case c;
      c.rows = vocab > 10000 ? 3 : 19, c.vocab = vocab, c.weighting = w, c.temperature = 1.5;
      c.scale = 10.0, c.mask_frac = 0.05, c.ignore_frac = 0.3, c.seed = uint32_t(vocab);
      run_case<float, float>(c);
      run_case<Bf16, Bf16>(c);
    }
  }
}

// One row split across 32 and 64 blocks (test_single_row_huge_vocab: the
// merge kernel's lanes take two segments each past 32), and the
// row counts either side of the split threshold, 2 x SMs (test_split_row_threshold).
TEST_CASE(split_rows_and_threshold) {
  Case c;
  c.rows = 1, c.vocab = 131072, c.weighting = "SS", c.scale = 6.0;
  run_case<Bf16, Bf16>(c);
  c.vocab = 262144, c.weighting = "TS", c.temperature = 1.5;
  run_case<Bf16, Bf16>(c);
  for (int64_t rows : {2 * kSms - 1, 2 * kSms}) {
    Case s;
    s.rows = rows, s.vocab = 8192, s.weighting = "MM", s.scale = 4.0, s.mask_frac = 0.01, s.ignore_frac = 0.2;
    s.seed = uint32_t(rows);
    run_case<Bf16, Bf16>(s);
  }
}

// test_cuda.py::test_misaligned_and_sliced_rows: rows at any element offset
// and a row stride of V + 13, equal or different offsets.
TEST_CASE(misaligned_and_sliced_rows) {
  const int64_t offsets[][2] = {{0, 0}, {1, 1}, {3, 3}, {7, 7}, {1, 0}, {0, 5}, {2, 6}};
  for (int64_t vocab : {5, 1000, 5001}) {
    for (const auto& o : offsets) {
      Case c;
      c.rows = 4, c.vocab = vocab, c.pad = 13, c.z_offset = o[0], c.t_offset = o[1];
      c.mask_frac = 0.02, c.seed = uint32_t(vocab);
      c.weighting = "TS", c.temperature = 1.5;
      run_case<Bf16, Bf16>(c);
      run_case<float, float>(c);
      run_case<Bf16, float>(c);
      run_case<Half, double>(c);
      c.weighting = "MM", c.alpha = 0.5, c.temperature = 1.0;
      run_case<Bf16, Bf16>(c);
      run_case<float, float>(c);
    }
  }
}

// A mean or sum hands the backward an expanded scalar (stride 0); large
// offsets between student and teacher stress the centred moments.
TEST_CASE(broadcast_grad_output_and_offset_logits) {
  for (const char* w : {"SS", "TU", "MM"}) {
    Case c;
    c.rows = 7, c.vocab = 6000, c.weighting = w, c.per_row_grad = false, c.ignore_frac = 0.3, c.seed = 11;
    run_case<float, float>(c);
    c.offset_t = 1e4, c.scale = 3.0;
    run_case<float, float>(c);
    c.rows = 40, c.vocab = 300;
    run_case<float, Bf16>(c);
  }
}

// The variant chosen for each weighting: exact ones for SS (S), TS/MM
// (S and T) and US (S and U) with equal fp32/bf16/fp16 dtypes; the general
// one otherwise.
TEST_CASE(variant_selection) {
  auto pick = [](const char* w, auto zs, auto ts) {
    using zs_t = decltype(zs);
    using ts_t = decltype(ts);
    const Mixture<float> m1 = mixture_of<float>(w[0], 0.15f), m2 = mixture_of<float>(w[1], 0.15f);
    return variant_for<zs_t, ts_t, acc_of<zs_t, ts_t>>(needs_of(m1, m2));
  };
  CHECK(pick("SS", Bf16{}, Bf16{}) == kBaseS);
  CHECK(pick("SS", float{}, float{}) == kBaseS);
  CHECK(pick("SS", Half{}, Half{}) == kBaseS);
  CHECK(pick("TS", Bf16{}, Bf16{}) == (kBaseS | kBaseT));
  CHECK(pick("ST", Bf16{}, Bf16{}) == (kBaseS | kBaseT));
  CHECK(pick("MM", Bf16{}, Bf16{}) == (kBaseS | kBaseT));
  CHECK(pick("US", Bf16{}, Bf16{}) == (kBaseS | kBaseU));
  CHECK(pick("TT", Bf16{}, Bf16{}) == kBaseAll);
  CHECK(pick("UU", Bf16{}, Bf16{}) == kBaseAll);
  CHECK(pick("TU", Bf16{}, Bf16{}) == kBaseAll);
  CHECK(pick("MU", Bf16{}, Bf16{}) == kBaseAll);
  CHECK(pick("SS", Bf16{}, float{}) == kBaseAll);
  CHECK(pick("SS", double{}, double{}) == kBaseAll);
  // M with alpha = 0 is S alone, and needs only S's moments.
  CHECK((variant_for<Bf16, Bf16, float>(needs_of(mixture_of<float>('M', 0.0f), mixture_of<float>('S', 0.0f)))) == kBaseS);
}

// An exact variant computes the same operations as the general variant on
// the bases it carries (the general one only adds exact zeros), so with the
// same chunk length loss, statistics and gradient must be bit-identical; the
// exact forward with 2-byte dtypes walks longer chunks (ForwardChunk), and
// there it must agree to a few ulp.

// The forward chunk length of the variant `v` serves for T/T inputs.
template <typename T>
int forward_chunk_of(unsigned v) {
  switch (v) {
    case kBaseS: return ForwardChunk<T, T, kBaseS>::value;
    case kBaseS | kBaseT: return ForwardChunk<T, T, kBaseS | kBaseT>::value;
    case kBaseS | kBaseU: return ForwardChunk<T, T, kBaseS | kBaseU>::value;
    default: return ForwardChunk<T, T, kBaseAll>::value;
  }
}

template <typename T>
void exact_variant_matches_general(const Case& c) {
  std::mt19937 rng(c.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  Rows<T> z(c.rows, c.vocab, c.vocab + c.pad, c.z_offset), t(c.rows, c.vocab, c.vocab + c.pad, c.t_offset);
  for (int64_t r = 0; r < c.rows; ++r) {
    for (int64_t i = 0; i < c.vocab; ++i) {
      const double base = c.scale * normal(rng);
      double zv = base + 0.5 * c.scale * normal(rng), tv = base;
      if (unif(rng) < c.mask_frac) (unif(rng) < 0.5 ? zv : tv) = -kInf;
      z.at(r, i) = T(zv);
      t.at(r, i) = T(tv);
    }
  }
  std::unique_ptr<bool[]> keep(new bool[size_t(c.rows)]);
  for (int64_t r = 0; r < c.rows; ++r) keep[r] = unif(rng) >= c.ignore_frac;
  const Mixture<double> m1 = mixture_of<double>(c.weighting[0], c.alpha), m2 = mixture_of<double>(c.weighting[1], c.alpha);
  std::vector<float> loss_x, stats_x, loss_g, stats_g;
  emulated_forward<T, T>(z, t, keep.get(), m1, m2, 1.0 / c.temperature, loss_x, stats_x, false);
  emulated_forward<T, T>(z, t, keep.get(), m1, m2, 1.0 / c.temperature, loss_g, stats_g, true);
  const std::string where = describe(c, name_of<T>(), name_of<T>());
  // With 2-byte dtypes the exact forward walks 16-element chunks and the
  // general one 8 (ForwardChunk), so they merge in different orders: there
  // the forward must agree to a few ulp of its values; elsewhere, bit for bit.
  const Mixture<float> f1 = mixture_of<float>(c.weighting[0], float(c.alpha));
  const Mixture<float> f2 = mixture_of<float>(c.weighting[1], float(c.alpha));
  const bool same_chunks = forward_chunk_of<T>(variant_for<T, T, float>(needs_of(f1, f2))) ==
                           ForwardChunk<T, T, kBaseAll>::value;
  auto same = [&](float a, float b, float scale) {
    if (same_chunks) return std::memcmp(&a, &b, sizeof(float)) == 0;
    return std::fabs(double(a) - double(b)) <= 16 * 1.2e-7 * double(scale);
  };
  for (size_t i = 0; i < loss_x.size(); ++i) {
    if (!same(loss_x[i], loss_g[i], std::fabs(loss_g[i]))) {
      check::fail(__FILE__, __LINE__, where + ": loss of row " + std::to_string(i) + " differs: " +
                                          std::to_string(loss_x[i]) + " vs " + std::to_string(loss_g[i]));
      return;
    }
  }
  for (size_t i = 0; i < stats_x.size(); ++i) {
    // The means are differences of logits: their scale is the logits' (c.scale).
    const float scale = std::max(std::fabs(stats_g[i]), float(c.scale));
    if (!same(stats_x[i], stats_g[i], scale)) {
      check::fail(__FILE__, __LINE__, where + ": stats entry " + std::to_string(i) + " differs: " +
                                          std::to_string(stats_x[i]) + " vs " + std::to_string(stats_g[i]));
      return;
    }
  }
  std::vector<float> grad_out(size_t(c.rows));
  for (auto& g : grad_out) g = float(normal(rng));
  std::vector<T> grad_x, grad_g;
  emulated_backward<T, T>(z, t, grad_out, true, stats_x, m1, m2, 1.0 / c.temperature, grad_x, false);
  emulated_backward<T, T>(z, t, grad_out, true, stats_x, m1, m2, 1.0 / c.temperature, grad_g, true);
  for (size_t i = 0; i < grad_x.size(); ++i) {
    if (std::memcmp(&grad_x[i], &grad_g[i], sizeof(T)) != 0) {
      check::fail(__FILE__, __LINE__, where + ": gradient entry " + std::to_string(i) + " differs: " +
                                          std::to_string(float(grad_x[i])) + " vs " + std::to_string(float(grad_g[i])));
      return;
    }
  }
}

TEST_CASE(exact_variants_match_the_general_variant) {
  for (const char* w : {"SS", "TS", "ST", "US", "SU", "MM", "MS", "SM"}) {
    for (int64_t vocab : {1000, 32000}) {
      for (int64_t rows : {3, 300}) {  // split rows, then a block (or a warp) per row
        if (rows == 300 && vocab == 32000) continue;
        Case c;
        c.rows = rows, c.vocab = vocab, c.weighting = w, c.alpha = 0.15, c.temperature = 1.5;
        c.mask_frac = 0.03, c.ignore_frac = 0.2, c.z_offset = 3, c.t_offset = 3, c.pad = 5, c.seed = uint32_t(vocab + rows);
        exact_variant_matches_general<float>(c);
        exact_variant_matches_general<Bf16>(c);
        exact_variant_matches_general<Half>(c);
      }
    }
  }
}

// Under the emulation, exp_fast is ex2.approx.ftz's worst case rather than
// exp2f: within 2 ulp of exp2f of the same argument (and not equal to it
// everywhere), subnormal results flushed to 0, infinities and NaN kept.
TEST_CASE(exp_fast_models_ex2_approx) {
  int moved = 0, count = 0;
  for (float x = -80.0f; x < 80.0f; x += 0.01337f, ++count) {
    const float got = csd::exp_fast(x), want = std::exp2(x * 1.4426950408889634f);
    uint32_t g, w;
    std::memcpy(&g, &got, sizeof g);
    std::memcpy(&w, &want, sizeof w);
    const int64_t ulps = int64_t(g) - int64_t(w);
    if (!(ulps >= -2 && ulps <= 2)) {
      check::fail(__FILE__, __LINE__, "exp_fast(" + std::to_string(x) + ") is " + std::to_string(ulps) + " ulp off");
      return;
    }
    moved += got != want;
  }
  CHECK(moved > count / 2);
  CHECK(csd::exp_fast(-100.0f) == 0.0f);  // 2^-144.3: subnormal, flushed as ex2.approx.ftz does
  CHECK(csd::exp_fast(-kInf32) == 0.0f);
  CHECK(std::isinf(csd::exp_fast(kInf32)));
  CHECK(std::isnan(csd::exp_fast(std::numeric_limits<float>::quiet_NaN())));
}

int main() { return check::run_all(); }
