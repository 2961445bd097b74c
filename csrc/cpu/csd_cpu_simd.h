// SIMD building blocks of the CPU kernel: loads with conversion, lane masks,
// a max that skips NaN, and an exp for the (mostly non-positive) arguments of
// softmax weights.  Everything is written against at::vec::Vectorized, with
// AVX-512 / AVX2 specialisations for float where the generic form costs
// extra instructions (Vectorized's masks are full vectors, which on AVX-512
// means a compare, a mask-to-vector move and a vector-to-mask compare per
// select).  Compiled once per instruction set, inside CPU_CAPABILITY.
//
// None of this is CSD math (that lives in csd_math.h); it is the CPU's way of
// loading, selecting and exponentiating.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// Prefetch for reading into L2 (not L1, which holds the tile's buffers).
#if defined(__GNUC__) || defined(__clang__)
#define CSD_PREFETCH_L2(ptr) __builtin_prefetch((ptr), 0, 2)
#else
#define CSD_PREFETCH_L2(ptr) ((void)0)
#endif

// The kernel's passes are normally inlined into their callers.  Profiling
// builds (benchmarks/cpu_profile.sh; the shipped build defines neither) keep
// them apart so that callgrind can attribute instructions:
//   -DCSD_PROFILE_NOINLINE: every pass its own function (CSD_PASS);
//   -DCSD_PROFILE_ENTRY: only the entry, forward_typed (CSD_PROFILE_ENTRY_POINT),
//     so the passes inline as shipped and the total is the shipped code's.
#if defined(CSD_PROFILE_NOINLINE) && (defined(__GNUC__) || defined(__clang__))
#define CSD_PASS __attribute__((noinline))
#else
#define CSD_PASS
#endif
#if (defined(CSD_PROFILE_NOINLINE) || defined(CSD_PROFILE_ENTRY)) && \
    (defined(__GNUC__) || defined(__clang__))
#define CSD_PROFILE_ENTRY_POINT __attribute__((noinline))
#else
#define CSD_PROFILE_ENTRY_POINT
#endif

namespace csd::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads Vectorized<acc_t>::size() entries of src_t, converted to acc_t in
// registers (no staging buffer).
template <typename acc_t, typename src_t>
inline Vectorized<acc_t> load_as(const src_t* p) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<src_t, acc_t>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<acc_t, float> && at::is_reduced_floating_point_v<src_t>) {
    Vec out;
    at::vec::load_to_float<src_t>(p, out);
    return out;
  } else {
    __at_align__ acc_t tmp[Vec::size()];
    for (const auto k : c10::irange(Vec::size())) tmp[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(tmp);
  }
}

// Stores two vectors (2 * Vectorized<acc_t>::size() entries) as dst_t.  Two at
// a time because one reduced-precision vector holds two float vectors.
template <typename dst_t, typename acc_t>
inline void store_pair_as(dst_t* p, const Vectorized<acc_t>& lo, const Vectorized<acc_t>& hi) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<dst_t, acc_t>) {
    lo.store(p);
    hi.store(p + Vec::size());
  } else if constexpr (std::is_same_v<acc_t, float> && at::is_reduced_floating_point_v<dst_t>) {
    at::vec::convert_from_float<dst_t>(lo, hi).store(p);
  } else {
    __at_align__ acc_t tmp[2 * Vec::size()];
    lo.store(tmp);
    hi.store(tmp + Vec::size());
    for (const auto k : c10::irange(2 * Vec::size())) p[k] = static_cast<dst_t>(tmp[k]);
  }
}

// Pairs of vectors in "even/odd" order.  Where both logit tensors are bf16
// (and the ISA has the shifts), the kernel's fp32 scratch holds each block
// of 2 * Vec::size() entries as two vectors: the even entries, then the odd
// ones.  A bf16 pair widens to fp32 by moving it to the high half of its
// 32-bit slot, so one 32-bit load gives the even entry with a shift and the
// odd one with a mask: one instruction per vector instead of two (a widening
// load and a shift), and the gradient goes back with a 16-bit blend instead
// of a pack and a cross-lane permute.  The sums do not care about the order;
// every pass over the scratch uses load_pair / store_grad_pair, so the
// entries stay matched.  Elsewhere a pair is just two consecutive vectors.
template <typename zs_t, typename ts_t, typename acc_t>
constexpr bool kEvenOddPairs =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<acc_t, float> && std::is_same_v<zs_t, c10::BFloat16> &&
    std::is_same_v<ts_t, c10::BFloat16>;
#else
    false;
#endif

template <bool kEvenOdd, typename acc_t, typename src_t>
inline void load_pair(const src_t* p, Vectorized<acc_t>& first, Vectorized<acc_t>& second) {
  if constexpr (kEvenOdd) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
    first = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    second = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u))));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    first = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    second = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xffff0000u))));
#endif
  } else {
    first = load_as<acc_t>(p);
    second = load_as<acc_t>(p + Vectorized<acc_t>::size());
  }
}

// The gradient of a pair, in the student's dtype.  In even/odd order (both
// inputs bf16) the rounding to bf16 is done here, without ATen's per-lane
// NaN test and select: every NaN in the kernel then is an input's NaN (a bf16
// widened to fp32), a copy of one (x86 arithmetic passes a NaN operand's
// payload on), the default NaN 0xFFC00000, or a bit pattern shifted left by
// 23 (the exp's 2^n) -- all with zero low 16 bits, to which rounding to
// nearest even adds at most 0x8000: they stay NaN.
template <bool kEvenOdd, typename dst_t, typename acc_t>
inline void store_grad_pair(dst_t* p, const Vectorized<acc_t>& first,
                            const Vectorized<acc_t>& second) {
  if constexpr (kEvenOdd) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    auto round = [&](__m512 x) {  // the bf16 rounded to nearest even, in the high half
      const __m512i b = _mm512_castps_si512(x);
      return _mm512_add_epi32(_mm512_add_epi32(b, bias),
                              _mm512_and_si512(_mm512_srli_epi32(b, 16), one));
    };
    const __m512i even = _mm512_srli_epi32(round(first), 16);
    _mm512_storeu_si512(reinterpret_cast<void*>(p),
                        _mm512_mask_blend_epi16(__mmask32(0xAAAAAAAAu), even, round(second)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    auto round = [&](__m256 x) {
      const __m256i b = _mm256_castps_si256(x);
      return _mm256_add_epi32(_mm256_add_epi32(b, bias),
                              _mm256_and_si256(_mm256_srli_epi32(b, 16), one));
    };
    const __m256i even = _mm256_srli_epi32(round(first), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm256_blend_epi16(even, round(second), 0xAA));
#endif
  } else {
    store_pair_as(p, first, second);
  }
}

// Lane operations.  `Mask` marks the unmasked vocabulary entries (both logits
// != -inf); NaN logits count as unmasked so that they reach the sums and make
// the row NaN, as in the reference.
template <typename acc_t>
struct Lanes {
  using Vec = Vectorized<acc_t>;
  using Mask = Vec;  // all-ones lanes where true

  static Mask unmasked(const Vec& z, const Vec& t) {
    const Vec ninf(-std::numeric_limits<acc_t>::infinity());
    return (z != ninf) & (t != ninf);
  }
  // m ? x : 0
  static Vec or_zero(const Mask& m, const Vec& x) { return Vec::blendv(Vec(0), x, m); }
  // m ? x : -inf
  static Vec or_neg_inf(const Mask& m, const Vec& x) {
    return Vec::blendv(Vec(-std::numeric_limits<acc_t>::infinity()), x, m);
  }
  // max(acc, x), ignoring a NaN x.  A NaN still reaches the row through the
  // sums (exp(NaN - max) is NaN); the max only sets the scale.
  static Vec max_skip_nan(const Vec& acc, const Vec& x) { return Vec::blendv(acc, x, x > acc); }
  // min(acc, x), ignoring a NaN x (finds a -inf logit; NaN never reaches acc).
  static Vec min_skip_nan(const Vec& acc, const Vec& x) { return Vec::blendv(acc, x, x < acc); }
  // exp(x), for x <= ~0 (any x in fp64); -inf gives 0 and NaN stays NaN.
  static Vec exp(const Vec& x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return x.exp_u20();
    } else {
      return x.exp();
    }
  }
  // exp(x) for x <= 88 (no overflow), -inf or NaN: a weight logit minus its
  // tile's max or a reference near it.
  static Vec exp_no_overflow(const Vec& x) { return exp(x); }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2],
// exp(r) ~ 1 + r (c1 + r (c2 + r (c3 + r (c4 + r c5)))).  The coefficients are
// a relative-error minimax fit on that interval (max 9e-8; 2.3e-7 for the
// whole float32 evaluation on [-30, 0], measured against float64 exp).
// n comes from the 1.5*2^23 trick: fma(x, log2 e, 1.5*2^23) rounds x log2 e
// to an integer in its low mantissa bits, so n = t - 1.5*2^23 exactly.
namespace exp_consts {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
constexpr float kC1 = 9.999997020e-01f, kC2 = 4.999915063e-01f, kC3 = 1.666763574e-01f;
constexpr float kC4 = 4.189793020e-02f, kC5 = 8.290315047e-03f;
}  // namespace exp_consts
#endif

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Lanes<float> {
  using Vec = Vectorized<float>;
  using Mask = __mmask16;

  static Mask unmasked(const Vec& z, const Vec& t) {
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __mmask16 kz = _mm512_cmp_ps_mask(z, ninf, _CMP_NEQ_UQ);
    return _mm512_mask_cmp_ps_mask(kz, t, ninf, _CMP_NEQ_UQ);
  }
  static Vec or_zero(Mask m, const Vec& x) { return _mm512_maskz_mov_ps(m, x); }
  static Vec or_neg_inf(Mask m, const Vec& x) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, x);
  }
  // MAXPS / MINPS return their second operand when either is NaN.
  static Vec max_skip_nan(const Vec& acc, const Vec& x) { return _mm512_max_ps(x, acc); }
  static Vec min_skip_nan(const Vec& acc, const Vec& x) { return _mm512_min_ps(x, acc); }
  // No upper clamp below, so x <= 88 needs nothing else.
  static Vec exp_no_overflow(const Vec& x) { return exp(x); }
  static Vec exp(const Vec& xv) {
    using namespace exp_consts;
    // exp(-104) rounds to 0, so clamping below there makes -inf give exactly
    // 0 (MAXPS with the constant first passes a NaN x through).  No upper
    // clamp: SCALEF overflows to +inf, which is exp's answer.
    const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), xv);
    const __m512 round = _mm512_set1_ps(kRound);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), round), round);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), x);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kC5), r, _mm512_set1_ps(kC4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  // p * 2^n, gradual underflow to 0
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
template <>
struct Lanes<float> {
  using Vec = Vectorized<float>;
  using Mask = Vec;

  static Mask unmasked(const Vec& z, const Vec& t) {
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    return _mm256_and_ps(_mm256_cmp_ps(z, ninf, _CMP_NEQ_UQ), _mm256_cmp_ps(t, ninf, _CMP_NEQ_UQ));
  }
  static Vec or_zero(const Mask& m, const Vec& x) { return _mm256_and_ps(m, x); }
  static Vec or_neg_inf(const Mask& m, const Vec& x) {
    return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), x, m);
  }
  static Vec max_skip_nan(const Vec& acc, const Vec& x) { return _mm256_max_ps(x, acc); }
  static Vec min_skip_nan(const Vec& acc, const Vec& x) { return _mm256_min_ps(x, acc); }
  static Vec exp(const Vec& xv) { return exp_impl<true>(xv); }
  // For x <= 88 (or -inf, NaN), two instructions less: no clamps.  The lanes
  // with x < -87, where the unclamped arithmetic below gives garbage (2^n out
  // of the exponent's range; NaN for -inf), are exactly the ones the final
  // select sets to 0, and a NaN x still comes out NaN.
  static Vec exp_no_overflow(const Vec& xv) { return exp_impl<false>(xv); }
  template <bool kClamp>
  static Vec exp_impl(const Vec& xv) {
    using namespace exp_consts;
    // 2^n is built in the exponent bits, which needs n in [-126, 127]: clamp
    // x to [-87, 88] and flush x < -87 (exp < 1.7e-38, -inf included) to 0.
    // MAXPS/MINPS with the constant first pass a NaN x through.
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 x = xv;
    if constexpr (kClamp) {
      x = _mm256_max_ps(lo, x);
      x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    }
    const __m256 round = _mm256_set1_ps(kRound);
    const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), round);
    const __m256 n = _mm256_sub_ps(t, round);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), x);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kC5), r, _mm256_set1_ps(kC4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    // t's bits are those of 1.5*2^23 plus n: (bits - bits(1.5*2^23) + 127) << 23 is 2^n.
    const __m256i two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
    return _mm256_andnot_ps(_mm256_cmp_ps(xv, lo, _CMP_LT_OQ), y);  // NaN: compare false, kept
  }
};
#endif

template <typename acc_t>
inline acc_t vec_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Horizontal max; NaN lanes do not occur (max_skip_nan never produces one).
template <typename acc_t>
inline acc_t vec_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// Horizontal min; NaN lanes do not occur (min_skip_nan never produces one).
template <typename acc_t>
inline acc_t vec_min(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::minimum(a, b); }, v);
}

}  // namespace CPU_CAPABILITY
}  // namespace csd::cpu
