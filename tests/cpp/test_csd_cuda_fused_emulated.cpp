// The fused forward+gradient kernel (csrc/cuda/csd_cuda_fused_kernel.cuh) on
// the CPU, under the strict CUDA emulation (cuda_emulation.h: fibers, per-block
// shared memory, cp.async that lands only at the issuing thread's wait,
// clusters with distributed shared memory), launched as the real launcher
// does (emulated_fused_launch.h), against a float64 reference of the loss,
// the statistics and the gradient.  Every path: one block per row and
// clusters of 2-8 blocks (an empty last block included), the packed-bf16 and
// fp32 steps, the fast path and the masked path (-inf entries, a fully
// masked row), ignored rows, rows that start off 16-byte alignment, a
// gradient whose alignment differs from the inputs', each variant (SS; TS,
// MM; US; the general one), temperature, and csd_backward_reuse_.
// And csd_loss_grad's single launch (labels read in the kernel, the mean's
// count per cluster, the ticket and the last CTA's reduction): labels with
// ignored rows, every row ignored, sum against mean, bitwise-identical
// results run to run (blocks start in a different random order each
// launch, so a different CTA is last), the gradient against float64, and
// csd_scale_grad_.
//
// Built a second time with CSD_PLANTED_BUG_CLUSTER_REDUCE (the cluster
// reduction drops the last block's partial): that build passes only if the
// checks here fail (CMakeLists.txt: planted_bug_cluster_reduce_is_caught).
#include "cuda_emulation.h"  // first: the CUDA keywords, cub:: and the emulated device API
#include "emulated_launch.h"
#include "emulated_fused_launch.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bf16.h"

template <>
struct csd::gpu::IsBFloat16<Bf16> : std::true_type {};

#include "check.h"

using namespace csd;
using namespace csd::gpu;

namespace {

constexpr int kSms = 132;
const double kInf = std::numeric_limits<double>::infinity();

struct RefRow {
  double loss;
  std::vector<double> grad;
};

// float64 reference of one row: weights over unmasked entries, the loss
// 1/4 [Var_w1 + Var_w2 + (E_w1 - E_w2)^2] and g = s/2 [w1 (d - E_w2) + w2 (d - E_w1)].
RefRow reference_row(const std::vector<double>& z, const std::vector<double>& t, char l1, char l2, double alpha,
                     double inv_temp, double scale) {
  const size_t n = z.size();
  std::vector<bool> ok(n);
  double mz = -kInf, mt = -kInf, count = 0;
  for (size_t k = 0; k < n; ++k) {
    ok[k] = z[k] != -kInf && t[k] != -kInf;
    if (!ok[k]) continue;
    mz = std::max(mz, z[k] * inv_temp);
    mt = std::max(mt, t[k] * inv_temp);
    count += 1;
  }
  RefRow r{0.0, std::vector<double>(n, 0.0)};
  if (count == 0) return r;
  std::vector<double> s(n, 0.0), tt(n, 0.0), u(n, 0.0);
  double ss = 0, st = 0;
  for (size_t k = 0; k < n; ++k) {
    if (!ok[k]) continue;
    s[k] = std::exp(z[k] * inv_temp - mz);
    tt[k] = std::exp(t[k] * inv_temp - mt);
    u[k] = 1.0 / count;
    ss += s[k];
    st += tt[k];
  }
  auto weight = [&](char l, size_t k) {
    const double sk = s[k] / ss, tk = tt[k] / st;
    switch (l) {
      case 'S': return sk;
      case 'T': return tk;
      case 'U': return u[k];
      default: return alpha * tk + (1 - alpha) * sk;
    }
  };
  double e1 = 0, e2 = 0;
  for (size_t k = 0; k < n; ++k) {
    if (!ok[k]) continue;
    const double d = z[k] - t[k];
    e1 += weight(l1, k) * d;
    e2 += weight(l2, k) * d;
  }
  double v1 = 0, v2 = 0;
  for (size_t k = 0; k < n; ++k) {
    if (!ok[k]) continue;
    const double d = z[k] - t[k];
    v1 += weight(l1, k) * (d - e1) * (d - e1);
    v2 += weight(l2, k) * (d - e2) * (d - e2);
    r.grad[k] = 0.5 * scale * (weight(l1, k) * (d - e2) + weight(l2, k) * (d - e1));
  }
  r.loss = 0.25 * (v1 + v2 + (e1 - e2) * (e1 - e2));
  return r;
}

struct Case {
  int rows;
  int vocab;
  const char* weighting;
  double temperature = 1.0;
  int misalign = 0;      // elements between the row starts and a 16-byte boundary
  int stride_pad = 0;    // row stride = vocab + stride_pad (a vocabulary slice)
  bool masked = false;   // -inf entries, a fully masked row, an ignored row
  int min_cluster = 1;   // forces clusters on short rows
  int want_cluster = 0;  // the cluster size the plan must choose (0: any)
};

std::string describe(const Case& c, const char* type) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s %dx%d %s tau=%g misalign=%d pad=%d masked=%d min_cluster=%d", type, c.rows,
                c.vocab, c.weighting, c.temperature, c.misalign, c.stride_pad, int(c.masked), c.min_cluster);
  return buf;
}

template <typename T>
double eps_of() {
  return sizeof(T) == 2 ? 0.0078125 : 1.1920928955078125e-07;
}

template <typename T>
void run_case(const Case& c, const char* type) {
  const int64_t stride = c.vocab + c.stride_pad;
  // 16-byte aligned buffers with the rows starting `misalign` elements past a boundary.
  const size_t total = size_t(c.rows) * size_t(stride) + 64;
  std::vector<T, std::allocator<T>> zbuf(total + 16), tbuf(total + 16);
  auto aligned = [&](std::vector<T>& v) {
    const auto p = reinterpret_cast<uintptr_t>(v.data());
    const size_t skip = ((16 - p % 16) % 16) / sizeof(T);
    return v.data() + skip + c.misalign;
  };
  T* z = aligned(zbuf);
  T* t = aligned(tbuf);
  std::mt19937 rng(uint32_t(c.rows * 7919 + c.vocab));
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<std::vector<double>> zd(size_t(c.rows)), td(size_t(c.rows));
  std::vector<char> mask(size_t(c.rows), 1);
  for (int r = 0; r < c.rows; ++r) {
    for (int k = 0; k < c.vocab; ++k) {
      float zv = normal(rng) + 1.0f, tv = normal(rng);
      if (c.masked && (k * 7 + r) % 23 == 0) zv = -INFINITY;
      if (c.masked && (k * 5 + r) % 31 == 0) tv = -INFINITY;
      if (c.masked && r == 1) zv = -INFINITY;  // a fully masked row
      z[size_t(r) * stride + k] = T(zv);
      t[size_t(r) * stride + k] = T(tv);
      zd[size_t(r)].push_back(double(float(T(zv))));
      td[size_t(r)].push_back(double(float(T(tv))));
    }
  }
  if (c.masked && c.rows > 2) mask[2] = 0;  // an ignored row
  std::vector<float> loss(size_t(c.rows), -1.f), stats(size_t(c.rows) * kNumStats, -1.f);
  std::vector<T> grad(size_t(c.rows) * size_t(c.vocab), T(-7.f));
  const Mixture<double> w1 = mixture_of<double>(c.weighting[0], 0.3), w2 = mixture_of<double>(c.weighting[1], 0.3);
  const double inv_temp = 1.0 / c.temperature, scale = 0.75;
  const bool* mask_ptr = reinterpret_cast<const bool*>(mask.data());
  EmulatedSmem smem;
  smem.min_cluster = c.min_cluster;
  FusedPlan plan{};
  const bool ran = emulated_fused_forward_grad(z, stride, t, stride, c.rows, c.vocab, c.masked ? mask_ptr : nullptr,
                                               w1, w2, inv_temp, scale, loss.data(), stats.data(), grad.data(),
                                               kSms, smem, &plan);
  const std::string what = describe(c, type);
  if (!ran) {
    check::fail(__FILE__, __LINE__, what + ": the fused kernel did not run");
    return;
  }
  if (c.want_cluster != 0 && plan.cluster != c.want_cluster) {
    check::fail(__FILE__, __LINE__, what + ": cluster " + std::to_string(plan.cluster));
  }
  const double eps = eps_of<T>();
  for (int r = 0; r < c.rows; ++r) {
    const bool counted = !c.masked || mask[size_t(r)];
    RefRow ref = counted ? reference_row(zd[size_t(r)], td[size_t(r)], c.weighting[0], c.weighting[1], 0.3,
                                         inv_temp, scale)
                         : RefRow{0.0, std::vector<double>(size_t(c.vocab), 0.0)};
    double gmax = 0;
    for (double g : ref.grad) gmax = std::max(gmax, std::abs(g));
    // fp32 sums over a row and ex2.approx: a few 1e-5 relative at most here.
    const double loss_tol = 2e-4 * std::abs(ref.loss) + 1e-6;
    if (!(std::abs(double(loss[size_t(r)]) - ref.loss) <= loss_tol)) {
      check::fail(__FILE__, __LINE__, what + ": row " + std::to_string(r) + " " +
                                          check::pair_text("loss", loss[size_t(r)], "reference", ref.loss));
      return;
    }
    CHECK(stats[size_t(r) * kNumStats + kRowWeight] == (counted ? 1.f : 0.f));
    const double grad_tol_abs = 2e-4 * gmax + 1e-7, grad_rel = 2 * eps;  // the stored dtype's rounding
    for (int k = 0; k < c.vocab; ++k) {
      const double got = double(float(grad[size_t(r) * c.vocab + k])), want = ref.grad[size_t(k)];
      if (!(std::abs(got - want) <= grad_tol_abs + grad_rel * std::abs(want))) {
        check::fail(__FILE__, __LINE__, what + ": row " + std::to_string(r) + " entry " + std::to_string(k) + " " +
                                            check::pair_text("grad", got, "reference", want));
        return;
      }
    }
  }
  // csd_backward_reuse_: row 0 keeps its gradient, row 0's scale elsewhere is doubled.
  std::vector<float> grad_loss(size_t(c.rows), float(scale));
  if (c.rows > 1) grad_loss[size_t(c.rows) - 1] = float(2 * scale);
  std::vector<T> before = grad;
  emulated_backward_reuse(grad.data(), z, stride, t, stride, c.rows, c.vocab, grad_loss.data(), 1, stats.data(),
                          w1, w2, inv_temp, scale);
  for (int r = 0; r < c.rows; ++r) {
    const float f = grad_loss[size_t(r)] == float(scale) ? 1.f : 2.f;
    double row_max = 0;  // recomputing cancels differently from scaling: bound it by the row's largest entry
    for (int k = 0; k < c.vocab; ++k) row_max = std::max(row_max, std::abs(double(float(before[size_t(r) * c.vocab + k]))));
    for (int k = 0; k < c.vocab; ++k) {
      const double got = double(float(grad[size_t(r) * c.vocab + k]));
      const double want = double(float(before[size_t(r) * c.vocab + k])) * f;
      if (f == 1.f ? got != want : !(std::abs(got - want) <= 4 * eps * std::abs(want) + 2e-4 * f * row_max)) {
        check::fail(__FILE__, __LINE__, what + ": reuse row " + std::to_string(r) + " " +
                                            check::pair_text("grad", got, "want", want));
        return;
      }
    }
  }
}

template <typename T>
void run_all(const Case& c, const char* type) {
  run_case<T>(c, type);
}

TEST_CASE(block_per_row_every_variant) {
  for (const char* w : {"SS", "TS", "MM", "US", "TT", "UU", "ST"}) {
    run_all<float>({3, 1000, w, 1.0, 0, 0, false, 1, 1}, "fp32");
    run_all<Bf16>({3, 1000, w, 1.5, 0, 0, false, 1, 1}, "bf16");
  }
}

TEST_CASE(masked_entries_rows_and_ignored_rows) {
  for (const char* w : {"SS", "TS", "US", "UU"}) {
    run_all<float>({4, 777, w, 1.0, 0, 0, true, 1, 0}, "fp32");
    run_all<Bf16>({4, 777, w, 0.7, 0, 0, true, 1, 0}, "bf16");
  }
}

TEST_CASE(misaligned_and_strided_rows) {
  run_all<Bf16>({3, 1001, "SS", 1.0, 3, 5, false, 1, 0}, "bf16");
  run_all<float>({3, 1001, "TS", 1.0, 1, 3, true, 1, 0}, "fp32");
  run_all<Bf16>({3, 515, "MM", 1.0, 5, 0, true, 4, 4}, "bf16");
}

TEST_CASE(clusters_of_two_to_eight_blocks) {
  run_all<Bf16>({2, 2000, "SS", 1.0, 0, 0, false, 2, 2}, "bf16");
  run_all<float>({2, 2003, "TS", 1.0, 1, 1, true, 4, 4}, "fp32");
  run_all<Bf16>({3, 3001, "MM", 1.0, 2, 0, true, 8, 8}, "bf16");
  run_all<float>({2, 9, "US", 1.0, 0, 0, false, 8, 8}, "fp32");  // ranks 3-7 hold no element
  // Few rows with long rows: the plan itself splits them (5000 per block).
  run_all<Bf16>({2, 40000, "SS", 1.0, 0, 0, false, 1, 8}, "bf16");
}

// grad_scale read on the device (the *_scaled ops) gives exactly the
// gradient of the same grad_scale passed by value, and so does the reuse.
TEST_CASE(grad_scale_read_on_the_device) {
  const int rows = 3, vocab = 3000;
  std::vector<Bf16> z(size_t(rows) * vocab), t(size_t(rows) * vocab);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 2.f);
  for (size_t i = 0; i < z.size(); ++i) {
    z[i] = Bf16(normal(rng));
    t[i] = Bf16(normal(rng));
  }
  const Mixture<double> s = mixture_of<double>('S', 0.5), tm = mixture_of<double>('T', 0.5);
  std::vector<float> loss_a(rows), loss_b(rows), stats_a(rows * kNumStats), stats_b(rows * kNumStats);
  std::vector<Bf16> ga(z.size()), gb(z.size());
  const float on_device = 0.3f;
  EmulatedSmem smem;
  smem.min_cluster = 2;
  REQUIRE(emulated_fused_forward_grad(z.data(), vocab, t.data(), vocab, rows, vocab, nullptr, tm, s, 1.0,
                                      double(on_device), loss_a.data(), stats_a.data(), ga.data(), kSms, smem));
  REQUIRE(emulated_fused_forward_grad(z.data(), vocab, t.data(), vocab, rows, vocab, nullptr, tm, s, 1.0, 99.0,
                                      loss_b.data(), stats_b.data(), gb.data(), kSms, smem, nullptr, &on_device));
  for (size_t i = 0; i < ga.size(); ++i) REQUIRE(ga[i].bits == gb[i].bits);
  for (int r = 0; r < rows; ++r) REQUIRE(loss_a[size_t(r)] == loss_b[size_t(r)]);
  const std::vector<float> grad_loss{on_device, 2 * on_device, on_device};
  emulated_backward_reuse(ga.data(), z.data(), vocab, t.data(), vocab, rows, vocab, grad_loss.data(), 1,
                          stats_a.data(), tm, s, 1.0, double(on_device));
  emulated_backward_reuse(gb.data(), z.data(), vocab, t.data(), vocab, rows, vocab, grad_loss.data(), 1,
                          stats_b.data(), tm, s, 1.0, 99.0, &on_device);
  for (size_t i = 0; i < ga.size(); ++i) REQUIRE(ga[i].bits == gb[i].bits);
}

// One csd_loss_grad launch as the real launcher makes it; the ticket must
// be back at 0 afterwards.
template <typename T>
struct LossRun {
  float total = -1.f;
  std::vector<T> grad;
};

template <typename T>
LossRun<T> loss_launch(const std::vector<T>& z, const std::vector<T>& t, int rows, int vocab,
                       const std::vector<int64_t>* labels, bool mean, const Mixture<double>& w1,
                       const Mixture<double>& w2, double inv_temp, int min_cluster, const std::string& what) {
  LossRun<T> out;
  out.grad.assign(z.size(), T(-7.f));
  std::vector<float> loss(size_t(rows), -1.f), stats(size_t(rows) * kNumStats, -1.f);
  unsigned ticket = 0u;
  EmulatedSmem smem;
  smem.min_cluster = min_cluster;
  const bool ran = emulated_fused_loss_grad(z.data(), vocab, t.data(), vocab, rows, vocab,
                                            labels != nullptr ? labels->data() : nullptr, -100, mean, w1, w2,
                                            inv_temp, loss.data(), stats.data(), out.grad.data(), &out.total,
                                            &ticket, kSms, smem);
  if (!ran) check::fail(__FILE__, __LINE__, what + ": the fused kernel did not run");
  if (ticket != 0u) check::fail(__FILE__, __LINE__, what + ": ticket left at " + std::to_string(ticket));
  return out;
}

// ignore: 0 no row ignored, 1 every third row, 2 every row.
template <typename T>
void run_loss_case(int rows, int vocab, const char* w, int min_cluster, bool with_labels, int ignore,
                   const char* type) {
  std::vector<T> z(size_t(rows) * vocab), t(size_t(rows) * vocab);
  std::mt19937 rng(uint32_t(rows * 31 + vocab));
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<std::vector<double>> zd(static_cast<size_t>(rows)), td(static_cast<size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < vocab; ++k) {
      const T zv = T(normal(rng) + 0.5f), tv = T(normal(rng));
      z[size_t(r) * vocab + k] = zv;
      t[size_t(r) * vocab + k] = tv;
      zd[size_t(r)].push_back(double(float(zv)));
      td[size_t(r)].push_back(double(float(tv)));
    }
  }
  std::vector<int64_t> labels(static_cast<size_t>(rows));
  int count = 0;
  for (int r = 0; r < rows; ++r) {
    const bool ignored = with_labels && (ignore == 2 || (ignore == 1 && r % 3 == 1));
    labels[size_t(r)] = ignored ? -100 : int64_t(r % 5);  // label values other than ignore_index do not matter
    count += ignored ? 0 : 1;
  }
  const Mixture<double> w1 = mixture_of<double>(w[0], 0.3), w2 = mixture_of<double>(w[1], 0.3);
  const double inv_temp = 1.0 / 1.3;
  const std::vector<int64_t>* lp = with_labels ? &labels : nullptr;
  char buf[160];
  std::snprintf(buf, sizeof buf, "loss_grad %s %dx%d %s min_cluster=%d labels=%d ignore=%d", type, rows, vocab, w,
                min_cluster, int(with_labels), ignore);
  const std::string what = buf;
  const double eps = eps_of<T>();
  for (const bool mean : {true, false}) {
    const std::string wm = what + (mean ? " mean" : " sum");
    const LossRun<T> a = loss_launch(z, t, rows, vocab, lp, mean, w1, w2, inv_temp, min_cluster, wm);
    const LossRun<T> b = loss_launch(z, t, rows, vocab, lp, mean, w1, w2, inv_temp, min_cluster, wm);
    // Bitwise the same run to run, whichever CTA finished last.
    uint32_t ta, tb;
    std::memcpy(&ta, &a.total, 4);
    std::memcpy(&tb, &b.total, 4);
    if (ta != tb) check::fail(__FILE__, __LINE__, wm + ": " + check::pair_text("total", a.total, "rerun", b.total));
    for (size_t i = 0; i < a.grad.size(); ++i) {
      if (std::memcmp(&a.grad[i], &b.grad[i], sizeof(T)) != 0) {
        check::fail(__FILE__, __LINE__, wm + ": the gradient differs between two runs at " + std::to_string(i));
        break;
      }
    }
    // Against float64: each counted row's loss and its gradient for a
    // backward of 1.0 through the reduction (1/max(count, 1) or 1).
    const double scale = mean ? 1.0 / std::max(count, 1) : 1.0;
    double ref_total = 0;
    for (int r = 0; r < rows; ++r) {
      const bool counted = labels[size_t(r)] != -100;
      RefRow ref = counted ? reference_row(zd[size_t(r)], td[size_t(r)], w[0], w[1], 0.3, inv_temp, scale)
                           : RefRow{0.0, std::vector<double>(size_t(vocab), 0.0)};
      ref_total += ref.loss;
      double gmax = 0;
      for (double g : ref.grad) gmax = std::max(gmax, std::abs(g));
      for (int k = 0; k < vocab; ++k) {
        const double got = double(float(a.grad[size_t(r) * vocab + k])), want = ref.grad[size_t(k)];
        const bool ok = counted ? std::abs(got - want) <= 2e-4 * gmax + 1e-9 + 2 * eps * std::abs(want)
                                : got == 0.0 && !std::signbit(got);
        if (!ok) {
          check::fail(__FILE__, __LINE__, wm + ": row " + std::to_string(r) + " entry " + std::to_string(k) + " " +
                                              check::pair_text("grad", got, "reference", want));
          return;
        }
      }
    }
    if (mean) ref_total /= std::max(count, 1);
    if (count == 0) {
      CHECK(a.total == 0.f);  // no counted row: exactly 0, as is the gradient (checked above)
    } else if (!(std::abs(double(a.total) - ref_total) <= 2e-4 * std::abs(ref_total) + 1e-7)) {
      check::fail(__FILE__, __LINE__, wm + ": " + check::pair_text("total", a.total, "reference", ref_total));
    }
  }
  // Sum against mean: the same per-row losses summed in the same order, so
  // the mean is the sum divided by max(count, 1), to the bit; and the mean's
  // gradient is the sum's scaled by 1/count (one rounding each).
  const LossRun<T> m = loss_launch(z, t, rows, vocab, lp, true, w1, w2, inv_temp, min_cluster, what);
  const LossRun<T> s = loss_launch(z, t, rows, vocab, lp, false, w1, w2, inv_temp, min_cluster, what);
  CHECK(m.total == s.total / float(std::max(count, 1)));
  double smax = 0;  // entries that cancel round differently: bound those by the largest
  for (const T& x : s.grad) smax = std::max(smax, std::abs(double(float(x))) / std::max(count, 1));
  for (size_t i = 0; i < m.grad.size(); ++i) {
    const double gm = double(float(m.grad[i])), gs = double(float(s.grad[i])) / std::max(count, 1);
    if (!(std::abs(gm - gs) <= 4 * eps * std::abs(gs) + 1e-4 * smax)) {
      check::fail(__FILE__, __LINE__, what + ": " + check::pair_text("mean grad", gm, "sum grad / count", gs));
      break;
    }
  }
  // csd_scale_grad_: a grad_output of 1 leaves every bit; 2.5 scales each
  // entry with one rounding.
  std::vector<T> g = s.grad;
  const float one = 1.f, two_and_half = 2.5f;
  emulated_scale_grad(g.data(), int64_t(g.size()), &one, kSms);
  CHECK(std::memcmp(g.data(), s.grad.data(), g.size() * sizeof(T)) == 0);
  emulated_scale_grad(g.data(), int64_t(g.size()), &two_and_half, kSms);
  for (size_t i = 0; i < g.size(); ++i) {
    const T want = T(float(s.grad[i]) * 2.5f);
    if (std::memcmp(&g[i], &want, sizeof(T)) != 0) {
      check::fail(__FILE__, __LINE__, what + ": scale_grad entry " + std::to_string(i));
      break;
    }
  }
}

TEST_CASE(one_launch_loss_with_labels) {
  run_loss_case<Bf16>(7, 1000, "SS", 1, true, 1, "bf16");
  run_loss_case<float>(7, 999, "TS", 1, true, 1, "fp32");
  run_loss_case<Bf16>(5, 2000, "MM", 4, true, 1, "bf16");  // clusters of 4: the count in 4 slices
  run_loss_case<float>(3, 700, "US", 8, true, 0, "fp32");  // clusters of 8 over 3 rows: empty slices
}

TEST_CASE(one_launch_loss_without_labels) {
  run_loss_case<Bf16>(6, 1500, "SS", 1, false, 0, "bf16");
  run_loss_case<float>(4, 800, "TS", 2, false, 0, "fp32");
}

TEST_CASE(one_launch_loss_every_row_ignored) {
  run_loss_case<Bf16>(4, 1000, "SS", 1, true, 2, "bf16");
  run_loss_case<float>(3, 500, "TS", 4, true, 2, "fp32");
}

}  // namespace

int main() {
  const int rc = check::run_all();
#if defined(CSD_PLANTED_BUG_CLUSTER_REDUCE)
  std::printf("planted bug in the cluster reduction: %s\n", rc != 0 ? "caught" : "NOT caught");
  return rc != 0 ? 0 : 1;
#else
  return rc;
#endif
}
