// The math of Concrete Score Distillation, shared by the CPU and CUDA kernels.
//
// Every function here is __host__ __device__ (or a template that the CPU
// kernel instantiates with at::vec::Vectorized), so the CPU test suite runs
// exactly the per-element and merge math that the GPU runs.  Kernels in
// cpu/ and cuda/ only do indexing, loads/stores, reductions and launches.
//
// For one row (one token): z = student logits, t = teacher logits, d = z - t.
// A vocabulary entry is *masked* when z or t is -inf; it is left out of every
// sum, and U counts only unmasked entries.
//
// The loss for weights w1, w2 is
//   L = 1/4 * sum_y sum_x w1(y) w2(x) (d_x - d_y)^2
//     = 1/4 * [Var_w1(d) + Var_w2(d) + (E_w1 d - E_w2 d)^2]
// and its (stop-gradient) gradient with respect to z is
//   g_k = 1/2 * [w1_k (d_k - E_w2 d) + w2_k (d_k - E_w1 d)].
//
// Each weighting is a mixture  w = cs*S + ct*T + cu*U  of three base
// distributions S = softmax(z/tau), T = softmax(t/tau), U = uniform, so a
// row needs the weighted moments of d under S, T and U only (whichever the
// mixtures use).  Those come from `Moments`: an online max / sum-exp with the
// weighted mean and *centred* second moment of d, merged with Chan's parallel
// formula -- never E[d^2] - E[d]^2, which cancels catastrophically when the
// student and teacher logits differ by a large constant.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CSD_HD __host__ __device__ __forceinline__
#else
#define CSD_HD inline
#endif

// The CPU kernel is compiled once per instruction set (cpu/isa/).  Functions
// get an ISA-specific inline namespace there, so the linker can never pick an
// AVX-512 copy of an inline function for a caller built for plain x86-64.
// Types stay in csd::, shared by every translation unit.
#if defined(CPU_CAPABILITY)
#define CSD_FUNCTIONS_BEGIN inline namespace CPU_CAPABILITY {
#define CSD_FUNCTIONS_END }
#else
#define CSD_FUNCTIONS_BEGIN
#define CSD_FUNCTIONS_END
#endif

namespace csd {

// ---------------------------------------------------------------------------
// Layout of the per-row statistics the forward saves for the backward.
// ---------------------------------------------------------------------------
// S's normaliser is kept as its two parts, the max of z/tau and the log of
// sum exp(z/tau - max), never as their sum: in fp32 one log-sum-exp of logits
// ~1e4 rounds to 2^-10, and S_k = exp(z_k/tau - lse) then carries that error
// into every weight of the row (a gradient scale error of up to 4.9e-4 when
// student and teacher share an offset of 1e4).  z_k/tau - max is exact there
// (Sterbenz), and the log-sum is a few units in size.  T likewise.
enum StatsColumn : int {
  kMaxS = 0,     // max of z/tau over unmasked entries (S's shift)
  kLogSumS = 1,  // log sum exp(z/tau - max) over unmasked entries
  kMaxT = 2,     // max of t/tau over unmasked entries (T's shift)
  kLogSumT = 3,  // log sum exp(t/tau - max) over unmasked entries
  kInvCount = 4, // 1 / (number of unmasked entries)  (U's weight)
  kMean1 = 5,    // E_w1[d]
  kMean2 = 6,    // E_w2[d]
  kRowWeight = 7,// 1 if the row counts (label != ignore_index), else 0
  kNumStats = 8,
};

// ---------------------------------------------------------------------------
// Weightings.  A weighting letter is one of S, T, U, M; M = a*T + (1-a)*S.
// ---------------------------------------------------------------------------
template <typename acc_t>
struct Mixture {
  acc_t s;  // coefficient of S = softmax(z/tau)
  acc_t t;  // coefficient of T = softmax(t/tau)
  acc_t u;  // coefficient of U = uniform over unmasked entries
};

// Which base distributions (S, T, U) a pair of weightings needs.
struct Needs {
  bool s, t, u;
};

template <typename acc_t>
struct Moments {
  acc_t max;
  acc_t sum;
  acc_t mean;
  acc_t m2;
};

// One finished row: its loss and what the backward needs.
// S's and T's normalisers are each a max and a log-sum (see StatsColumn).
template <typename acc_t>
struct RowResult {
  acc_t loss;
  acc_t max_s, log_sum_s, max_t, log_sum_t, inv_count;
  acc_t mean1, mean2;
};

// Mean and variance of d under some weighting.
template <typename acc_t>
struct MeanVar {
  acc_t mean, var;
};

CSD_FUNCTIONS_BEGIN

CSD_HD bool is_weight_letter(char c) {
  return c == 'S' || c == 'T' || c == 'U' || c == 'M';
}

template <typename acc_t>
CSD_HD Mixture<acc_t> mixture_of(char letter, acc_t alpha) {
  switch (letter) {
    case 'S': return {acc_t(1), acc_t(0), acc_t(0)};
    case 'T': return {acc_t(0), acc_t(1), acc_t(0)};
    case 'U': return {acc_t(0), acc_t(0), acc_t(1)};
    default:  return {acc_t(1) - alpha, alpha, acc_t(0)};  // 'M'
  }
}

template <typename acc_t>
CSD_HD Needs needs_of(const Mixture<acc_t>& w1, const Mixture<acc_t>& w2) {
  return {w1.s != acc_t(0) || w2.s != acc_t(0),
          w1.t != acc_t(0) || w2.t != acc_t(0),
          w1.u != acc_t(0) || w2.u != acc_t(0)};
}

// ---------------------------------------------------------------------------
// Scalar primitives, for float (fp32 accumulation) and double (fp64 inputs).
// ---------------------------------------------------------------------------
CSD_HD float exp_of(float x) { return ::expf(x); }
CSD_HD double exp_of(double x) { return ::exp(x); }
CSD_HD float log_of(float x) { return ::logf(x); }
CSD_HD float fmax_of(float a, float b) { return ::fmaxf(a, b); }
CSD_HD double fmax_of(double a, double b) { return ::fmax(a, b); }
CSD_HD double log_of(double x) { return ::log(x); }

// exp on the CUDA kernels' per-element paths: 2^(x log2 e) by the GPU's
// special-function unit (ex2.approx.ftz, within 2 ulp), two instructions
// where expf's range reduction takes eight for ~1 ulp.  Rounding x log2 e
// adds |x| * 2^-24 relative to the result, so the weights that matter
// (x = logit - max near 0) stay within ~3 ulp, and the loss and gradient
// within a few ulp -- far inside what fp32 sums over a row lose anyway.
// Results below 2^-126 flush to 0; such a weight, relative to the row's
// largest (1), cannot change a sum in fp32.  Off the GPU (the CPU emulation
// of the kernels in tests/cpp) it is the same formula, with a model of
// ex2.approx.ftz's error (CSD_EX2_APPROX_MODEL, cuda_emulation.h), or with
// exp2f elsewhere.  fp64 (tests only) keeps the exact exp.
CSD_HD float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#elif defined(CSD_EX2_APPROX_MODEL)
  return CSD_EX2_APPROX_MODEL(x * 1.4426950408889634f);
#else
  return ::exp2f(x * 1.4426950408889634f);
#endif
}
CSD_HD double exp_fast(double x) { return ::exp(x); }

template <typename acc_t>
CSD_HD acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

// max that propagates NaN (fmax would drop it), so a NaN logit makes the
// whole row NaN instead of silently disappearing.
template <typename acc_t>
CSD_HD acc_t max_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
CSD_HD bool is_unmasked(acc_t z, acc_t t) {
  return z != neg_inf<acc_t>() && t != neg_inf<acc_t>();
}

// ---------------------------------------------------------------------------
// Moments of d under w_i ∝ exp(a_i) over a set of entries.
//   max  = max_i a_i                    (-inf for the empty set)
//   sum  = sum_i exp(a_i - max)
//   mean = sum_i exp(a_i - max) d_i / sum
//   m2   = sum_i exp(a_i - max) (d_i - mean)^2     (centred, same scale as sum)
// For U every a_i is 0, so max = 0 and sum is the count.
// ---------------------------------------------------------------------------
template <typename acc_t>
CSD_HD Moments<acc_t> empty_moments() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

// `sum == 0` is false for NaN, so a NaN state is never mistaken for empty.
template <typename acc_t>
CSD_HD bool is_empty(const Moments<acc_t>& m) {
  return m.sum == acc_t(0);
}

// Chan et al.'s parallel update, with both sides rescaled to the joint max.
template <typename acc_t>
CSD_HD Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (is_empty(b)) return a;
  if (is_empty(a)) return b;
  const acc_t mx = max_nan(a.max, b.max);
  const acc_t ca = exp_of(a.max - mx);
  const acc_t cb = exp_of(b.max - mx);
  const acc_t sa = a.sum * ca;
  const acc_t sb = b.sum * cb;
  const acc_t s = sa + sb;
  const acc_t frac_b = sb / s;
  const acc_t delta = b.mean - a.mean;
  Moments<acc_t> out;
  out.max = mx;
  out.sum = s;
  out.mean = a.mean + delta * frac_b;
  out.m2 = a.m2 * ca + b.m2 * cb + delta * delta * sa * frac_b;
  return out;
}

// Moments of a small chunk, by the exact two-pass formula: max, then the
// weights and the mean, then the centred second moment.  Kernels call it on a
// chunk held in registers (CUDA: one or two vector loads per thread) and
// merge the result into their running state.
//
// The chunk comes *neutral*: a masked position (and a position that holds no
// element) has weight logit a = -inf and d = 0, so it enters the max as
// -inf, the exp as exp(-inf) = 0 and the sums as 0 * 0 -- exactly the values
// of skipping it, with no test or branch per element.  (An `if` around each
// element compiles on a GPU to a divergent branch per element, BSSY/BSYNC
// pairs that cost more than the exp; a select per element and distribution
// still costs one instruction, so the kernels mask each element once, when
// they form a and d.)  The max is a plain fmax (one instruction): a NaN
// weight logit is dropped from the max but makes its exp, hence the chunk's
// sum, NaN, so the state is still poisoned (and never empty).  When every
// position is masked the max is -inf; the exps are then taken relative to 0,
// all of them 0 (a NaN logit's NaN), and a chunk whose sum is 0 comes back
// as the empty state, chosen by a select.
template <typename acc_t, int N>
CSD_HD Moments<acc_t> neutral_chunk_moments(const acc_t (&a)[N], const acc_t (&d)[N]) {
  acc_t mx = neg_inf<acc_t>();
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmax_of(mx, a[i]);
  const acc_t shift = mx == neg_inf<acc_t>() ? acc_t(0) : mx;
  acc_t e[N];
  acc_t s = 0, sd = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    e[i] = exp_fast(a[i] - shift);
    s += e[i];
    sd += e[i] * d[i];
  }
  const acc_t mean = sd / s;
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const acc_t c = d[i] - mean;
    m2 += e[i] * c * c;
  }
  const Moments<acc_t> m{mx, s, mean, m2};
  return s == acc_t(0) ? empty_moments<acc_t>() : m;
}

// The same for a chunk with a mask: entries i >= n or with !unmasked[i] are
// left out (whatever their values, NaN included).
template <typename acc_t, int N>
CSD_HD Moments<acc_t> chunk_moments(const acc_t (&a)[N], const acc_t (&d)[N],
                                    const bool (&unmasked)[N], int n = N) {
  acc_t an[N], dn[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool in = i < n && unmasked[i];
    an[i] = in ? a[i] : neg_inf<acc_t>();
    dn[i] = in ? d[i] : acc_t(0);
  }
  return neutral_chunk_moments(an, dn);
}

// One element: the running-state form used where there is no chunk to batch.
template <typename acc_t>
CSD_HD Moments<acc_t> push(const Moments<acc_t>& m, acc_t a, acc_t d) {
  return merge(m, Moments<acc_t>{a, acc_t(1), d, acc_t(0)});
}

template <typename acc_t>
CSD_HD acc_t variance_of(const Moments<acc_t>& m) {
  return m.m2 / m.sum;
}

// log sum exp(a_i - max): the normaliser without its max (see StatsColumn).
template <typename acc_t>
CSD_HD acc_t log_sum_of(const Moments<acc_t>& m) {
  return log_of(m.sum);
}

// ---------------------------------------------------------------------------
// Finalise one row: loss and the statistics the backward needs.
// ---------------------------------------------------------------------------
// Mean and variance of d under a mixture  cs*S + ct*T + cu*U.  The variance
// uses the stable decomposition  sum_i c_i Var_i + sum_i c_i (E_i - E)^2.
template <typename acc_t>
CSD_HD MeanVar<acc_t> mixture_mean_var(const Mixture<acc_t>& w,
                                       const MeanVar<acc_t>& s,
                                       const MeanVar<acc_t>& t,
                                       const MeanVar<acc_t>& u) {
  // Terms with a zero coefficient are skipped rather than multiplied by 0,
  // so a base distribution that was never computed cannot inject a NaN.
  acc_t mean = 0;
  if (w.s != acc_t(0)) mean += w.s * s.mean;
  if (w.t != acc_t(0)) mean += w.t * t.mean;
  if (w.u != acc_t(0)) mean += w.u * u.mean;
  acc_t var = 0;
  if (w.s != acc_t(0)) { const acc_t c = s.mean - mean; var += w.s * (s.var + c * c); }
  if (w.t != acc_t(0)) { const acc_t c = t.mean - mean; var += w.t * (t.var + c * c); }
  if (w.u != acc_t(0)) { const acc_t c = u.mean - mean; var += w.u * (u.var + c * c); }
  return {mean, var};
}

// `s`, `t`, `u` are the row's moments under S, T and U; the ones the
// weighting does not need may be left empty.  A row with no unmasked entry
// gets loss 0 and zero means, hence a zero gradient.
template <typename acc_t>
CSD_HD RowResult<acc_t> finalize_row(const Moments<acc_t>& s,
                                     const Moments<acc_t>& t,
                                     const Moments<acc_t>& u,
                                     const Mixture<acc_t>& w1,
                                     const Mixture<acc_t>& w2) {
  RowResult<acc_t> r{};  // all zero
  const Needs need = needs_of(w1, w2);
  const bool empty = (need.s && is_empty(s)) || (need.t && is_empty(t)) ||
                     (need.u && is_empty(u));
  if (empty) return r;
  const MeanVar<acc_t> ms{need.s ? s.mean : acc_t(0), need.s ? variance_of(s) : acc_t(0)};
  const MeanVar<acc_t> mt{need.t ? t.mean : acc_t(0), need.t ? variance_of(t) : acc_t(0)};
  const MeanVar<acc_t> mu{need.u ? u.mean : acc_t(0), need.u ? variance_of(u) : acc_t(0)};
  const MeanVar<acc_t> a = mixture_mean_var(w1, ms, mt, mu);
  const MeanVar<acc_t> b = mixture_mean_var(w2, ms, mt, mu);
  const acc_t gap = a.mean - b.mean;
  r.loss = acc_t(0.25) * (a.var + b.var + gap * gap);
  r.max_s = need.s ? s.max : acc_t(0);
  r.log_sum_s = need.s ? log_sum_of(s) : acc_t(0);
  r.max_t = need.t ? t.max : acc_t(0);
  r.log_sum_t = need.t ? log_sum_of(t) : acc_t(0);
  r.inv_count = need.u ? acc_t(1) / u.sum : acc_t(0);
  r.mean1 = a.mean;
  r.mean2 = b.mean;
  return r;
}

// Writes one row's loss and the statistics the backward reads (StatsColumn
// layout); the row weight records whether the row counts.
template <typename acc_t>
CSD_HD void store_row_result(const RowResult<acc_t>& r, bool counted, acc_t* loss, acc_t* stats_row) {
  *loss = r.loss;
  stats_row[kMaxS] = r.max_s;
  stats_row[kLogSumS] = r.log_sum_s;
  stats_row[kMaxT] = r.max_t;
  stats_row[kLogSumT] = r.log_sum_t;
  stats_row[kInvCount] = r.inv_count;
  stats_row[kMean1] = r.mean1;
  stats_row[kMean2] = r.mean2;
  stats_row[kRowWeight] = counted ? acc_t(1) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Per-element gradient.  Templated on T so it compiles for scalars (CUDA, CPU
// tails, tests) and for at::vec::Vectorized (the CPU SIMD body).  The caller
// zeroes masked entries.
//   ws, wt : S_k and T_k (exp(z_k/tau - max_s - log_sum_s), likewise), or 0
//            when the weighting does not use them;
//   wu     : 1/count (U_k) or 0.
//   scale  : grad_output of the row (times 1/n_valid for a mean, folded in
//            by autograd) -- multiplied in here so the gradient is written once.
// ---------------------------------------------------------------------------
template <typename T, typename acc_t>
CSD_HD T mixture_weight(const Mixture<acc_t>& w, const T& ws, const T& wt, const T& wu) {
  return T(w.s) * ws + T(w.t) * wt + T(w.u) * wu;
}

template <typename T>
CSD_HD T element_grad(const T& w1, const T& w2, const T& d, const T& mean1,
                      const T& mean2, const T& half_scale) {
  return half_scale * (w1 * (d - mean2) + w2 * (d - mean1));
}

// The same gradient regrouped by base distribution, for kernels that want
// the fewest operations per element.  With e_k = d_k - mean1 and
// dm = mean1 - mean2 (so d_k - mean2 = e_k + dm),
//   g_k = half_scale * [(w1_k + w2_k) e_k + w1_k dm]
//       = S_k (s_d e_k + s_k) + T_k (t_d e_k + t_k) + (u_d e_k + u_k),
// every coefficient a per-row constant (U_k = 1/count folded into u_d, u_k).
// Centring on mean1 first keeps the rounding of the original form: e_k is
// one subtraction, and for w1 = w2 (SS, TT, UU, MM) dm is exactly 0, so the
// gradient is exactly 0 wherever d_k = mean1.
template <typename acc_t>
struct GradCoeffs {
  acc_t pivot;     // mean1
  acc_t s_d, s_k;  // multiply S_k
  acc_t t_d, t_k;  // multiply T_k
  acc_t u_d, u_k;  // the part without a softmax weight
};

template <typename acc_t>
CSD_HD GradCoeffs<acc_t> grad_coeffs(const Mixture<acc_t>& w1, const Mixture<acc_t>& w2,
                                     acc_t mean1, acc_t mean2, acc_t inv_count,
                                     acc_t half_scale) {
  const acc_t dm = mean1 - mean2;
  GradCoeffs<acc_t> c;
  c.pivot = mean1;
  c.s_d = half_scale * (w1.s + w2.s);
  c.s_k = half_scale * w1.s * dm;
  c.t_d = half_scale * (w1.t + w2.t);
  c.t_k = half_scale * w1.t * dm;
  c.u_d = half_scale * (w1.u + w2.u) * inv_count;
  c.u_k = half_scale * w1.u * dm * inv_count;
  return c;
}

// One element from the regrouped coefficients; T is a scalar or a
// Vectorized.  ws / wt are S_k / T_k; a term whose base distribution is not
// in `need` is skipped, so its weight may be anything (e.g. 0).
template <typename T, typename acc_t>
CSD_HD T element_grad_regrouped(const GradCoeffs<acc_t>& c, const Needs& need, const T& ws,
                                const T& wt, const T& d) {
  const T e = d - T(c.pivot);
  T g = need.u ? T(c.u_d) * e + T(c.u_k) : T(0);
  if (need.s) g = g + ws * (T(c.s_d) * e + T(c.s_k));
  if (need.t) g = g + wt * (T(c.t_d) * e + T(c.t_k));
  return g;
}

// The backward's coefficients for one row, from its saved statistics, with
// S's and T's normalisers exp(-log_sum) folded into the S and T terms: the
// kernels then take S_k's unnormalised part exp(z_k/tau - stats[kMaxS]) per
// element (the same one exp as before) and the log-sum, kept apart from the
// max, never meets the ~1e4-sized max in one fp32 number.  `half_scale` is
// 1/2 * grad_output * row weight.  Unused bases have max = log-sum = 0.
template <typename acc_t>
CSD_HD GradCoeffs<acc_t> grad_coeffs_of_row(const Mixture<acc_t>& w1, const Mixture<acc_t>& w2,
                                            const acc_t* stats_row, acc_t half_scale) {
  GradCoeffs<acc_t> c = grad_coeffs(w1, w2, stats_row[kMean1], stats_row[kMean2],
                                    stats_row[kInvCount], half_scale);
  const acc_t ns = exp_of(-stats_row[kLogSumS]);
  const acc_t nt = exp_of(-stats_row[kLogSumT]);
  c.s_d *= ns;
  c.s_k *= ns;
  c.t_d *= nt;
  c.t_k *= nt;
  return c;
}

// ---------------------------------------------------------------------------
// Reductions over rows (csd_loss_grad): "mean" divides by the number of
// counted rows, at least 1 (no counted row: loss 0, gradient 0), "sum" by
// nothing.  The gradient each row gets from a backward of 1.0 through the
// reduction is 1/max(count, 1) or 1, in the accumulation type, the same
// expression on the host (CPU op) and in the fused CUDA kernel.  `count` is
// an exact integer in acc_t (the CUDA launcher keeps rows < 2^24 for fp32).
// ---------------------------------------------------------------------------
template <typename acc_t>
CSD_HD acc_t reduction_divisor(bool mean, acc_t count) {
  return mean ? (count > acc_t(1) ? count : acc_t(1)) : acc_t(1);
}

template <typename acc_t>
CSD_HD acc_t reduction_grad_scale(bool mean, acc_t count) {
  return acc_t(1) / reduction_divisor(mean, count);
}

template <typename acc_t>
CSD_HD acc_t reduce_total(bool mean, acc_t total, acc_t count) {
  return mean ? total / reduction_divisor(mean, count) : total;
}

CSD_FUNCTIONS_END
}  // namespace csd
