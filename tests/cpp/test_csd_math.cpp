// Unit tests of csrc/csd_math.h, the math shared by the CPU and CUDA kernels,
// against direct double-precision formulas.  Needs only a C++17 compiler.
#include "../../csrc/csd_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "check.h"

using csd::Moments;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
const char kLetters[] = {'S', 'T', 'U', 'M'};

// Direct two-pass moments of d under w_i ∝ exp(a_i), over unmasked entries.
struct RefMoments {
  double max, sum, mean, m2;
};

RefMoments reference_moments(const std::vector<double>& a, const std::vector<double>& d,
                             const std::vector<bool>& unmasked) {
  double mx = -kInf;
  for (size_t i = 0; i < a.size(); ++i)
    if (unmasked[i]) mx = std::max(mx, a[i]);
  double s = 0, sd = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (unmasked[i]) {
      s += std::exp(a[i] - mx);
      sd += std::exp(a[i] - mx) * d[i];
    }
  const double mean = sd / s;
  double m2 = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (unmasked[i]) m2 += std::exp(a[i] - mx) * (d[i] - mean) * (d[i] - mean);
  return {mx, s, mean, m2};
}

// Moments of entries [begin, begin + n) as one chunk of up to 8 (as the kernels do).
template <typename acc_t>
Moments<acc_t> chunk_of(const std::vector<double>& a, const std::vector<double>& d,
                        const std::vector<bool>& unmasked, size_t begin, int n) {
  acc_t ca[8] = {}, cd[8] = {};
  bool cu[8] = {};
  for (int i = 0; i < n; ++i) {
    ca[i] = acc_t(a[begin + i]);
    cd[i] = acc_t(d[begin + i]);
    cu[i] = unmasked[begin + i];
  }
  return csd::chunk_moments<acc_t, 8>(ca, cd, cu, n);
}

// The chunks of a row, cut at random sizes 1..8.
template <typename acc_t>
std::vector<Moments<acc_t>> random_chunks(const std::vector<double>& a, const std::vector<double>& d,
                                          const std::vector<bool>& unmasked, std::mt19937& rng) {
  std::vector<Moments<acc_t>> out;
  std::uniform_int_distribution<int> len(1, 8);
  for (size_t i = 0; i < a.size();) {
    const int n = std::min<int>(len(rng), int(a.size() - i));
    out.push_back(chunk_of<acc_t>(a, d, unmasked, i, n));
    i += n;
  }
  return out;
}

template <typename acc_t>
Moments<acc_t> merge_in_order(const std::vector<Moments<acc_t>>& parts) {
  Moments<acc_t> m = csd::empty_moments<acc_t>();
  for (const auto& p : parts) m = csd::merge(m, p);
  return m;
}

template <typename acc_t>
Moments<acc_t> merge_tree(std::vector<Moments<acc_t>> parts) {
  while (parts.size() > 1) {
    std::vector<Moments<acc_t>> next;
    for (size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(csd::merge(parts[i], parts[i + 1]));
    if (parts.size() % 2) next.push_back(parts.back());
    parts = std::move(next);
  }
  return parts.empty() ? csd::empty_moments<acc_t>() : parts[0];
}

// The moments of a merged state are compared in the reference's scale
// (sum and m2 are relative to exp(max)).
template <typename acc_t>
void check_against(const Moments<acc_t>& m, const RefMoments& r, double rtol, double dscale) {
  CHECK_CLOSE(m.max, r.max, rtol, 0);  // fp32 holds max rounded to float
  const double scale = std::exp(double(m.max) - r.max);
  CHECK_CLOSE(m.sum * scale, r.sum, rtol, 0);
  CHECK_CLOSE(m.mean, r.mean, rtol, rtol * dscale);
  CHECK_CLOSE(m.m2 * scale, r.m2, rtol * 10, rtol * r.sum * dscale * dscale);
}

struct Row {
  std::vector<double> a, d;
  std::vector<bool> unmasked;
};

Row random_row(std::mt19937& rng, int n, double offset, double spread, double masked_frac) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  Row r;
  for (int i = 0; i < n; ++i) {
    r.a.push_back(2.5 * normal(rng));
    r.d.push_back(offset + spread * normal(rng));
    r.unmasked.push_back(unif(rng) >= masked_frac);
  }
  return r;
}

template <typename acc_t>
void merge_is_order_independent(double rtol) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 20; ++trial) {
    const double offset = trial % 2 ? 0.0 : 30.0;
    const Row row = random_row(rng, 1 + trial * 53, offset, 3.0, trial % 3 == 0 ? 0.2 : 0.0);
    if (std::none_of(row.unmasked.begin(), row.unmasked.end(), [](bool b) { return b; })) continue;
    const RefMoments ref = reference_moments(row.a, row.d, row.unmasked);
    auto parts = random_chunks<acc_t>(row.a, row.d, row.unmasked, rng);
    check_against(merge_in_order(parts), ref, rtol, 3.0 + offset);
    check_against(merge_tree(parts), ref, rtol, 3.0 + offset);
    std::reverse(parts.begin(), parts.end());
    check_against(merge_in_order(parts), ref, rtol, 3.0 + offset);
    std::shuffle(parts.begin(), parts.end(), rng);
    check_against(merge_in_order(parts), ref, rtol, 3.0 + offset);
  }
}

template <typename acc_t>
void expect_same(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  CHECK(a.max == b.max && a.sum == b.sum && a.mean == b.mean && a.m2 == b.m2);
}

// ---------------------------------------------------------------------------
// A whole row through the shared functions, and the direct formulas.
// ---------------------------------------------------------------------------
struct Logits {
  std::vector<double> z, t;
};

Logits random_logits(std::mt19937& rng, int n, double masked_frac) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  Logits l;
  for (int i = 0; i < n; ++i) {
    const double t = 3.0 * normal(rng);
    l.t.push_back(t);
    l.z.push_back(0.7 * t + 2.0 * normal(rng) + 5.0);  // an arbitrary shift: L is invariant
    if (unif(rng) < masked_frac) (i % 2 ? l.z : l.t).back() = -kInf;
  }
  return l;
}

template <typename acc_t>
struct RowMoments {
  Moments<acc_t> s, t, u;
};

template <typename acc_t>
RowMoments<acc_t> row_moments(const Logits& l, double tau) {
  const size_t n = l.z.size();
  std::vector<double> as(n), at(n), au(n, 0.0), d(n);
  std::vector<bool> ok(n);
  for (size_t i = 0; i < n; ++i) {
    ok[i] = csd::is_unmasked(l.z[i], l.t[i]);
    d[i] = ok[i] ? l.z[i] - l.t[i] : 0.0;
    as[i] = l.z[i] / tau;
    at[i] = l.t[i] / tau;
  }
  RowMoments<acc_t> m{csd::empty_moments<acc_t>(), csd::empty_moments<acc_t>(),
                      csd::empty_moments<acc_t>()};
  for (size_t i = 0; i < n; i += 8) {
    const int len = int(std::min<size_t>(8, n - i));
    m.s = csd::merge(m.s, chunk_of<acc_t>(as, d, ok, i, len));
    m.t = csd::merge(m.t, chunk_of<acc_t>(at, d, ok, i, len));
    m.u = csd::merge(m.u, chunk_of<acc_t>(au, d, ok, i, len));
  }
  return m;
}

struct Direct {
  std::vector<double> w1, w2, d;
  double lse_s, lse_t, inv_count, mean1, mean2, loss;
};

std::vector<double> softmax(const std::vector<double>& x, const std::vector<bool>& ok, double tau,
                            double* lse) {
  double mx = -kInf;
  for (size_t i = 0; i < x.size(); ++i)
    if (ok[i]) mx = std::max(mx, x[i] / tau);
  double s = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (ok[i]) s += std::exp(x[i] / tau - mx);
  *lse = mx + std::log(s);
  std::vector<double> w(x.size(), 0.0);
  for (size_t i = 0; i < x.size(); ++i)
    if (ok[i]) w[i] = std::exp(x[i] / tau - *lse);
  return w;
}

Direct direct(const Logits& l, char c1, char c2, double alpha, double tau) {
  const size_t n = l.z.size();
  std::vector<bool> ok(n);
  Direct r;
  r.d.resize(n);
  double count = 0;
  for (size_t i = 0; i < n; ++i) {
    ok[i] = l.z[i] != -kInf && l.t[i] != -kInf;
    r.d[i] = ok[i] ? l.z[i] - l.t[i] : 0.0;
    count += ok[i];
  }
  const auto s = softmax(l.z, ok, tau, &r.lse_s);
  const auto t = softmax(l.t, ok, tau, &r.lse_t);
  r.inv_count = 1.0 / count;
  auto weights = [&](char c) {
    std::vector<double> w(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      const double u = ok[i] ? r.inv_count : 0.0;
      w[i] = c == 'S' ? s[i] : c == 'T' ? t[i] : c == 'U' ? u : alpha * t[i] + (1 - alpha) * s[i];
    }
    return w;
  };
  r.w1 = weights(c1);
  r.w2 = weights(c2);
  r.mean1 = r.mean2 = 0;
  for (size_t i = 0; i < n; ++i) {
    r.mean1 += r.w1[i] * r.d[i];
    r.mean2 += r.w2[i] * r.d[i];
  }
  // The pairwise definition: 1/4 sum_y sum_x w1(y) w2(x) (d_x - d_y)^2.
  r.loss = 0;
  for (size_t y = 0; y < n; ++y)
    for (size_t x = 0; x < n; ++x) r.loss += 0.25 * r.w1[y] * r.w2[x] * (r.d[x] - r.d[y]) * (r.d[x] - r.d[y]);
  return r;
}

template <typename acc_t>
csd::Mixture<acc_t> mix(char c, double alpha) {
  return csd::mixture_of<acc_t>(c, acc_t(alpha));
}

template <typename acc_t>
void finalize_matches_direct(double rtol) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 6; ++trial) {
    const Logits l = random_logits(rng, 37 + 11 * trial, trial % 2 ? 0.15 : 0.0);
    for (double tau : {1.0, 1.5}) {
      for (double alpha : {0.15, 0.5}) {
        const RowMoments<acc_t> m = row_moments<acc_t>(l, tau);
        for (char c1 : kLetters) {
          for (char c2 : kLetters) {
            const auto w1 = mix<acc_t>(c1, alpha), w2 = mix<acc_t>(c2, alpha);
            const csd::Needs need = csd::needs_of(w1, w2);
            const auto res = csd::finalize_row(m.s, m.t, m.u, w1, w2);
            const Direct ref = direct(l, c1, c2, alpha, tau);
            CHECK_CLOSE(res.loss, ref.loss, rtol, rtol);
            CHECK_CLOSE(res.mean1, ref.mean1, rtol, rtol);
            CHECK_CLOSE(res.mean2, ref.mean2, rtol, rtol);
            // The normalisers come as max and log-sum, kept apart (StatsColumn).
            CHECK_CLOSE(double(res.max_s) + double(res.log_sum_s), need.s ? ref.lse_s : 0.0, rtol, rtol);
            CHECK_CLOSE(double(res.max_t) + double(res.log_sum_t), need.t ? ref.lse_t : 0.0, rtol, rtol);
            CHECK_CLOSE(res.inv_count, need.u ? ref.inv_count : 0.0, rtol, 0);
          }
        }
      }
    }
  }
}

// The per-element gradient as the kernels compute it: weights recomputed
// from the finalised statistics, then mixture_weight and element_grad.
template <typename acc_t>
std::vector<double> kernel_grad(const Logits& l, char c1, char c2, double alpha, double tau,
                                double grad_output) {
  const RowMoments<acc_t> m = row_moments<acc_t>(l, tau);
  const auto w1 = mix<acc_t>(c1, alpha), w2 = mix<acc_t>(c2, alpha);
  const csd::Needs need = csd::needs_of(w1, w2);
  const auto r = csd::finalize_row(m.s, m.t, m.u, w1, w2);
  std::vector<double> g(l.z.size());
  for (size_t k = 0; k < g.size(); ++k) {
    const acc_t z = acc_t(l.z[k]), t = acc_t(l.t[k]);
    if (!csd::is_unmasked(z, t)) {
      g[k] = 0;
      continue;
    }
    const acc_t ws = need.s ? csd::exp_of(z / acc_t(tau) - r.max_s) * csd::exp_of(-r.log_sum_s) : acc_t(0);
    const acc_t wt = need.t ? csd::exp_of(t / acc_t(tau) - r.max_t) * csd::exp_of(-r.log_sum_t) : acc_t(0);
    const acc_t gw1 = csd::mixture_weight(w1, ws, wt, r.inv_count);
    const acc_t gw2 = csd::mixture_weight(w2, ws, wt, r.inv_count);
    g[k] = double(csd::element_grad(gw1, gw2, z - t, r.mean1, r.mean2, acc_t(0.5 * grad_output)));
  }
  return g;
}

}  // namespace

TEST_CASE(chunk_moments_match_two_pass) {
  std::mt19937 rng(7);
  for (int n = 1; n <= 8; ++n) {
    for (double masked : {0.0, 0.4}) {
      const Row row = random_row(rng, n, 1.0, 2.0, masked);
      const Moments<double> m = chunk_of<double>(row.a, row.d, row.unmasked, 0, n);
      if (std::none_of(row.unmasked.begin(), row.unmasked.end(), [](bool b) { return b; })) {
        CHECK(csd::is_empty(m));
        continue;
      }
      check_against(m, reference_moments(row.a, row.d, row.unmasked), 1e-13, 3.0);
      const Moments<float> mf = chunk_of<float>(row.a, row.d, row.unmasked, 0, n);
      check_against(mf, reference_moments(row.a, row.d, row.unmasked), 2e-5, 3.0);
    }
  }
}

// exp_fast's formula, 2^(x log2 e), loses only the rounding of x log2 e:
// |x| * 2^-24 relative, so the weights near the max (x near 0) are as good
// as expf's and the far tail's error grows slowly; -inf gives 0, NaN stays
// NaN.  (On the GPU ex2.approx adds its own <= 2 ulp; off it, exp2f ~0.5.)
TEST_CASE(exp_fast_error_is_the_argument_rounding) {
  const double eps = std::ldexp(1.0, -24);
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = float(-87.0 * i / 200000.0);  // down to the normal range's end
    const double got = csd::exp_fast(x), want = std::exp(double(x));
    const double allowed = (2.0 + std::fabs(double(x)) * 1.5) * eps;
    worst = std::max(worst, std::fabs(got - want) / want / allowed);
  }
  CHECK(worst <= 1.0);
  CHECK(csd::exp_fast(0.0f) == 1.0f);
  CHECK(csd::exp_fast(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(std::isnan(csd::exp_fast(std::numeric_limits<float>::quiet_NaN())));
  CHECK(csd::exp_fast(-1.5) == std::exp(-1.5));  // fp64 keeps the exact exp
}

TEST_CASE(merge_order_independent_fp64) { merge_is_order_independent<double>(1e-11); }
TEST_CASE(merge_order_independent_fp32) { merge_is_order_independent<float>(3e-4); }

TEST_CASE(merge_associative) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    const Row row = random_row(rng, 24, 4.0, 2.0, 0.0);
    const auto a = chunk_of<double>(row.a, row.d, row.unmasked, 0, 8);
    const auto b = chunk_of<double>(row.a, row.d, row.unmasked, 8, 8);
    const auto c = chunk_of<double>(row.a, row.d, row.unmasked, 16, 8);
    const auto left = csd::merge(csd::merge(a, b), c), right = csd::merge(a, csd::merge(b, c));
    CHECK_CLOSE(left.max, right.max, 0, 0);
    CHECK_CLOSE(left.sum, right.sum, 1e-14, 0);
    CHECK_CLOSE(left.mean, right.mean, 1e-13, 1e-13);
    CHECK_CLOSE(left.m2, right.m2, 1e-12, 1e-12);
  }
}

TEST_CASE(empty_states_are_identities) {
  std::mt19937 rng(11);
  const Row row = random_row(rng, 8, 0.0, 1.0, 0.0);
  const auto x = chunk_of<float>(row.a, row.d, row.unmasked, 0, 8);
  const auto e = csd::empty_moments<float>();
  CHECK(csd::is_empty(e));
  expect_same(csd::merge(e, x), x);
  expect_same(csd::merge(x, e), x);
  CHECK(csd::is_empty(csd::merge(e, e)));
  // An all-masked chunk is empty, whatever its values (NaN included).
  float a[4] = {1.f, float(kNaN), 3.f, 4.f}, d[4] = {float(kNaN), 2.f, 3.f, 4.f};
  bool none[4] = {false, false, false, false};
  CHECK(csd::is_empty(csd::chunk_moments<float, 4>(a, d, none)));
  // push onto an empty state is a one-element state.
  const auto p = csd::push(e, 2.0f, 3.0f);
  CHECK(p.max == 2.0f && p.sum == 1.0f && p.mean == 3.0f && p.m2 == 0.0f);
  // An empty row (every entry masked) finalises to a zero loss and zero stats.
  const auto w = csd::mixture_of<float>('S', 0.5f);
  const auto r = csd::finalize_row(e, e, e, w, w);
  CHECK(r.loss == 0 && r.max_s == 0 && r.log_sum_s == 0 && r.max_t == 0 && r.log_sum_t == 0 &&
        r.inv_count == 0 && r.mean1 == 0 && r.mean2 == 0);
}

TEST_CASE(nan_propagates) {
  float a[4] = {0.f, 1.f, 2.f, 3.f}, d[4] = {1.f, float(kNaN), 0.f, 2.f};
  bool all[4] = {true, true, true, true};
  const auto m = csd::chunk_moments<float, 4>(a, d, all);
  CHECK(std::isnan(m.mean) && std::isnan(m.m2));
  CHECK(!csd::is_empty(m));
  // A NaN weight logit poisons the sum (its weight is NaN), and the state
  // is not mistaken for empty.
  float a2[4] = {0.f, float(kNaN), 2.f, 3.f}, d2[4] = {1.f, 2.f, 0.f, 2.f};
  const auto m2 = csd::chunk_moments<float, 4>(a2, d2, all);
  CHECK(std::isnan(m2.sum) && std::isnan(m2.mean) && !csd::is_empty(m2));
  // Also when it is the chunk's only entry.
  bool first_only[4] = {false, true, false, false};
  const auto m3 = csd::chunk_moments<float, 4>(a2, d2, first_only);
  CHECK(std::isnan(m3.sum) && !csd::is_empty(m3));
  CHECK(std::isnan(csd::merge(csd::push(csd::empty_moments<float>(), 0.5f, 1.0f), m3).sum));
  CHECK(std::isnan(csd::merge(m3, csd::push(csd::empty_moments<float>(), 0.5f, 1.0f)).sum));
  const auto ok = csd::push(csd::empty_moments<float>(), 0.5f, 1.0f);
  for (const auto& bad : {m, m2}) {
    CHECK(std::isnan(csd::merge(ok, bad).mean) || std::isnan(csd::merge(ok, bad).sum));
    CHECK(std::isnan(csd::merge(bad, ok).mean) || std::isnan(csd::merge(bad, ok).sum));
    const auto w = csd::mixture_of<float>('S', 0.5f);
    CHECK(std::isnan(csd::finalize_row(csd::merge(ok, bad), ok, ok, w, w).loss));
  }
  // A base distribution the weighting does not use cannot inject its NaN.
  const auto tt = csd::mixture_of<float>('T', 0.5f);
  const auto good = csd::chunk_moments<float, 4>(a, a, all);
  CHECK(!std::isnan(csd::finalize_row(m2, good, good, tt, tt).loss));
}

TEST_CASE(merge_is_stable_for_large_offsets) {
  // d = 1e4 + N(0, 0.1^2).  fp32 resolves 1e-3 at 1e4, so any fp32 method
  // is limited to a relative variance error of about (1e-3 / 0.1)^2 ~ 1e-4
  // per term; E[d^2] - E[d]^2 instead cancels 1e8 against 1e8 and returns
  // rounding noise.  The reference sees the same fp32-rounded inputs.
  std::mt19937 rng(3);
  Row row = random_row(rng, 4096, 1e4, 0.1, 0.0);
  for (auto& x : row.d) x = double(float(x));
  for (auto& x : row.a) x = double(float(x));
  const RefMoments ref = reference_moments(row.a, row.d, row.unmasked);
  Moments<float> m = csd::empty_moments<float>();
  for (size_t i = 0; i < row.a.size(); i += 8) m = csd::merge(m, chunk_of<float>(row.a, row.d, row.unmasked, i, 8));
  const double var = double(m.m2) / double(m.sum), ref_var = ref.m2 / ref.sum;
  CHECK_CLOSE(var, ref_var, 0.02, 0);
  // The naive one-pass formula in fp32 is far off on the same data: the
  // test can tell a stable merge from an unstable one.
  float s = 0, sd = 0, sdd = 0;
  for (size_t i = 0; i < row.a.size(); ++i) {
    const float e = std::exp(float(row.a[i] - ref.max)), d = float(row.d[i]);
    s += e;
    sd += e * d;
    sdd += e * d * d;
  }
  const double naive = double(sdd / s - (sd / s) * (sd / s));
  CHECK(!check::close(naive, ref_var, 0.5, 0));
}

TEST_CASE(finalize_matches_pairwise_definition_fp64) { finalize_matches_direct<double>(1e-10); }
TEST_CASE(finalize_matches_pairwise_definition_fp32) { finalize_matches_direct<float>(5e-4); }

TEST_CASE(element_grad_matches_direct_formula) {
  std::mt19937 rng(21);
  const Logits l = random_logits(rng, 45, 0.1);
  for (char c1 : kLetters) {
    for (char c2 : kLetters) {
      for (double tau : {1.0, 1.5}) {
        const Direct ref = direct(l, c1, c2, 0.15, tau);
        const auto g = kernel_grad<double>(l, c1, c2, 0.15, tau, 2.0);
        const auto gf = kernel_grad<float>(l, c1, c2, 0.15, tau, 2.0);
        for (size_t k = 0; k < g.size(); ++k) {
          // 2.0 * 1/2 [w1_k (d_k - E_w2 d) + w2_k (d_k - E_w1 d)]
          const double want =
              ref.w1[k] * (ref.d[k] - ref.mean2) + ref.w2[k] * (ref.d[k] - ref.mean1);
          CHECK_CLOSE(g[k], want, 1e-10, 1e-12);
          CHECK_CLOSE(gf[k], want, 1e-4, 1e-6);
        }
      }
    }
  }
}

TEST_CASE(element_grad_is_the_derivative_when_weights_ignore_z) {
  // T and U do not depend on z, so the stop-gradient gradient is the true
  // derivative of L: compare with central finite differences (fp64).
  std::mt19937 rng(8);
  const Logits l = random_logits(rng, 23, 0.0);
  for (char c1 : {'T', 'U'}) {
    for (char c2 : {'T', 'U'}) {
      const auto g = kernel_grad<double>(l, c1, c2, 0.5, 1.3, 1.0);
      for (size_t k = 0; k < g.size(); ++k) {
        Logits hi = l, lo = l;
        const double h = 1e-5;
        hi.z[k] += h;
        lo.z[k] -= h;
        const double fd = (direct(hi, c1, c2, 0.5, 1.3).loss - direct(lo, c1, c2, 0.5, 1.3).loss) / (2 * h);
        CHECK_CLOSE(g[k], fd, 1e-6, 1e-9);
      }
    }
  }
}

TEST_CASE(ss_gradient_is_reverse_kl_gradient) {
  // At tau = 1, s_k (d_k - E_s d) is the gradient of KL(softmax z || softmax t).
  std::mt19937 rng(13);
  const Logits l = random_logits(rng, 19, 0.0);
  const auto g = kernel_grad<double>(l, 'S', 'S', 0.5, 1.0, 1.0);
  auto rkl = [&](const Logits& x) {
    std::vector<bool> ok(x.z.size(), true);
    double lz, lt;
    const auto s = softmax(x.z, ok, 1.0, &lz);
    softmax(x.t, ok, 1.0, &lt);
    double kl = 0;
    for (size_t i = 0; i < s.size(); ++i) kl += s[i] * ((x.z[i] - lz) - (x.t[i] - lt));
    return kl;
  };
  for (size_t k = 0; k < g.size(); ++k) {
    Logits hi = l, lo = l;
    const double h = 1e-5;
    hi.z[k] += h;
    lo.z[k] -= h;
    CHECK_CLOSE(g[k], (rkl(hi) - rkl(lo)) / (2 * h), 1e-6, 1e-9);
  }
}

// csd_loss_grad's reduction (the CPU op and the fused CUDA kernel share it):
// a mean divides by max(count, 1), so no counted row gives 0, not NaN; its
// gradient scale is 1/max(count, 1) rounded once; a sum is untouched.
TEST_CASE(reduction_divisor_scale_and_total) {
  CHECK(csd::reduction_divisor(true, 0.f) == 1.f);
  CHECK(csd::reduction_divisor(true, 7.f) == 7.f);
  CHECK(csd::reduction_divisor(false, 7.f) == 1.f);
  CHECK(csd::reduction_grad_scale(true, 0.f) == 1.f);
  CHECK(csd::reduction_grad_scale(true, 3.f) == 1.f / 3.f);
  CHECK(csd::reduction_grad_scale(true, 3.0) == 1.0 / 3.0);
  CHECK(csd::reduction_grad_scale(false, 3.f) == 1.f);
  CHECK(csd::reduce_total(true, 0.f, 0.f) == 0.f);
  CHECK(csd::reduce_total(true, 5.f, 3.f) == 5.f / 3.f);
  CHECK(csd::reduce_total(false, 5.f, 3.f) == 5.f);
}

int main() { return check::run_all(); }
