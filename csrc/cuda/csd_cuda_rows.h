// How one group of GPU threads walks a row segment: the alignment prologue,
// the 16-byte vector body, the tail, and what each thread does per chunk.
//
// Everything here is __host__ __device__ and free of CUDA and torch headers,
// so tests/cpp/test_csd_cuda_rows.cpp replays a thread group lane by lane on
// the CPU and checks that every element is visited exactly once, that every
// vector access is aligned, and that the merged result is right.  The
// kernels (csd_cuda_forward.cu, csd_cuda_backward.cu) only add the launch,
// the CUB reductions and the writes of the results.
//
// A row segment is n contiguous elements (vocabulary stride 1), covered by a
// group of G threads (a warp, or a whole block):
//   * vector mode, when the student, the teacher (and, in the backward, the
//     gradient) all reach W-element-vector alignment after the same number of
//     elements `head` (< W): the body that follows is read as W-element
//     vectors of 16 bytes (of the wider dtype); lane l also takes head
//     element l and tail element l (fewer than W of each, and W <= G);
//   * scalar mode, when their alignments differ: the whole segment is the
//     body, read one element at a time.
// The body is walked in steps of G*E elements; in each step lane l takes the
// E contiguous elements at l*E (K = E/W vectors, at constant offsets from one
// pointer, which keeps address registers down).  It converts them to acc_t
// at once and hands them to the pass as one chunk.  The loads of the next
// step are issued before the current chunk's math, so a thread always has a
// chunk in flight.  One extra step carries the head and tail elements; every
// step runs the same chunk code, so each kernel holds one copy of it.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../csd_math.h"

namespace csd {
namespace gpu {

// Elements per vector load and per chunk, for a student/teacher dtype pair.
// A vector is 16 bytes of the wider of the two dtypes (the narrower one is
// read with 8- or 4-byte loads of the same number of elements).  A chunk is
// 8 elements (4 with an fp64 input): enough to spread the per-chunk cost of
// csd::merge (two exps and a division per distribution), few enough that the
// forward fits in 128 registers without spilling (16 did not; see
// docs/kernels.md and the -Xptxas -v output of the build).
template <typename zs_t, typename ts_t>
struct Shape {
  static constexpr int kWidest = sizeof(zs_t) > sizeof(ts_t) ? int(sizeof(zs_t)) : int(sizeof(ts_t));
  static constexpr int kVec = 16 / kWidest;
  static constexpr int kChunk = kWidest == 8 ? 4 : 8;
  static_assert(kChunk % kVec == 0 && kChunk >= 2,
                "a chunk is a whole number of vectors, with room for a head and a tail element");
};

// The C++ unit test defines this to check that every vector access is aligned
// (x86 would not fault on a misaligned one; a GPU does).
#ifndef CSD_CHECK_VECTOR_ALIGNMENT
#define CSD_CHECK_VECTOR_ALIGNMENT(ptr, bytes)
#endif

// W elements of T, aligned to their size so that one instruction moves them.
template <typename T, int W>
struct alignas(sizeof(T) * W) VecOf {
  T v[W];
};

template <int W, typename T>
CSD_HD VecOf<T, W> load_vec(const T* p) {
  CSD_CHECK_VECTOR_ALIGNMENT(p, sizeof(T) * W);
  return *reinterpret_cast<const VecOf<T, W>*>(p);
}

template <int W, typename T>
CSD_HD void store_vec(T* p, const VecOf<T, W>& x) {
  CSD_CHECK_VECTOR_ALIGNMENT(p, sizeof(T) * W);
  *reinterpret_cast<VecOf<T, W>*>(p) = x;
}

// bfloat16 is the top half of an fp32, so a word of two converts with a
// shift (the low one) and a mask (the high one), with no extraction of the
// 16-bit halves first (Lanes::convert).  The trait is specialised for
// c10::BFloat16 (csd_cuda_dispatch.cuh) and for the C++ tests' stand-in.
template <typename T>
struct IsBFloat16 : std::false_type {};

CSD_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Elements to skip from p before p + k is aligned for W-element vectors.
// (Tensor data is always aligned to its element size.)
template <int W, typename T>
CSD_HD int elements_to_alignment(const T* p) {
  const uintptr_t e = reinterpret_cast<uintptr_t>(p) / sizeof(T);
  return int((W - int(e % W)) % W);
}

// Positions within a row are 32-bit (the op checks V < kMaxVocab); row
// offsets, which exceed 2^31 for large N*V, are 64-bit in the kernels.
constexpr int kMaxVocab = 1 << 30;

struct RowPlan {
  int head;         // scalar elements before the vector body (< W)
  int nvec;         // W-element vectors in the body
  int tail;         // scalar elements after the body (< W)
  bool vectorized;  // false: the pointers' alignments differ; the body is all n elements
};

// skip_* are elements_to_alignment of each pointer the pass reads or writes.
template <int W>
CSD_HD RowPlan plan_row(int n, int skip_a, int skip_b, int skip_c) {
  if (skip_a != skip_b || skip_a != skip_c) return {0, 0, 0, false};
  const int head = skip_a < n ? skip_a : n;
  const int nvec = (n - head) / W;
  return {head, nvec, n - head - nvec * W, true};
}

// A position of a chunk that holds no element of the segment (past its end,
// or the unused positions of the head-and-tail step) is filled with -inf:
// the math treats it exactly as a masked vocabulary entry (left out of every
// sum, gradient 0), so the chunk code needs no separate validity flags.
template <typename T>
CSD_HD T no_element() {
  return T(-std::numeric_limits<float>::infinity());
}

template <typename T, int W>
CSD_HD VecOf<T, W> no_elements() {
  VecOf<T, W> x;
#pragma unroll
  for (int j = 0; j < W; ++j) x.v[j] = no_element<T>();
  return x;
}

// W elements of T in registers, between their load and their conversion to
// acc_t.  2-byte types stay packed two to a 32-bit word, as a vector load
// delivers them: held as separate 16-bit values, the compiler splits each
// word after the load and packs it again before the math (a PRMT per
// element, both ways).  `set` and `clear` serve the cold paths (scalar
// loads, the head-and-tail step); a position that holds no element is
// no_element() (-inf).
template <typename T, int W, bool kPacked = (sizeof(T) == 2 && W % 2 == 0)>
struct Lanes {
  VecOf<T, W> x;

  CSD_HD void load(const T* p) { x = load_vec<W>(p); }
  CSD_HD void clear() { x = no_elements<T, W>(); }
  CSD_HD void set(int j, T v) { x.v[j] = v; }
  template <typename acc_t>
  CSD_HD void convert(acc_t* out) const {
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = static_cast<acc_t>(x.v[j]);
  }
  // The reverse, for the gradient: in[0, W) rounded to T as static_cast does.
  template <typename acc_t>
  CSD_HD void pack(const acc_t* in) {
#pragma unroll
    for (int j = 0; j < W; ++j) x.v[j] = static_cast<T>(in[j]);
  }
  CSD_HD void store(T* p) const { store_vec<W>(p, x); }
};

template <typename T, int W>
struct Lanes<T, W, true> {
  using Words = VecOf<uint32_t, W / 2>;  // 16 (or 8) bytes, aligned as a VecOf<T, W>
  Words w;

  static CSD_HD uint32_t bits_of(T v) {
    uint16_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
  CSD_HD void load(const T* p) {
    CSD_CHECK_VECTOR_ALIGNMENT(p, sizeof(T) * W);
#if defined(__CUDA_ARCH__)
    w = *reinterpret_cast<const Words*>(p);
#else
    std::memcpy(&w, p, sizeof w);  // the host (emulation, tests) reads T storage as words
#endif
  }
  CSD_HD void clear() {
    const uint32_t b = bits_of(no_element<T>());
#pragma unroll
    for (int m = 0; m < W / 2; ++m) w.v[m] = b | (b << 16);
  }
  CSD_HD void set(int j, T v) {  // little-endian: element 2m is the low half of word m
    const int shift = 16 * (j % 2);
    w.v[j / 2] = (w.v[j / 2] & ~(0xffffu << shift)) | (bits_of(v) << shift);
  }
  template <typename acc_t>
  CSD_HD void convert(acc_t* out) const {
#pragma unroll
    for (int m = 0; m < W / 2; ++m) {
      if constexpr (IsBFloat16<T>::value && std::is_same_v<acc_t, float>) {
        out[2 * m] = float_from_bits(w.v[m] << 16);
        out[2 * m + 1] = float_from_bits(w.v[m] & 0xffff0000u);
      } else {
        T pair[2];
        std::memcpy(pair, &w.v[m], sizeof pair);
        out[2 * m] = static_cast<acc_t>(pair[0]);
        out[2 * m + 1] = static_cast<acc_t>(pair[1]);
      }
    }
  }
  // The reverse, for the gradient: in[0, W) rounded to T as static_cast
  // does.  On sm_80+ a bf16 pair is one cvt.rn.bf16x2.f32, the instruction
  // c10::BFloat16's own conversion (cvt.rn.bf16.f32) issues per element
  // before the pair is packed.
  template <typename acc_t>
  CSD_HD void pack(const acc_t* in) {
#pragma unroll
    for (int m = 0; m < W / 2; ++m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      if constexpr (IsBFloat16<T>::value && std::is_same_v<acc_t, float>) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w.v[m]) : "f"(in[2 * m + 1]), "f"(in[2 * m]));
        continue;
      }
#endif
      w.v[m] = bits_of(static_cast<T>(in[2 * m])) | (bits_of(static_cast<T>(in[2 * m + 1])) << 16);
    }
  }
  CSD_HD void store(T* p) const {
    CSD_CHECK_VECTOR_ALIGNMENT(p, sizeof(T) * W);
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<Words*>(p) = w;
#else
    std::memcpy(p, &w, sizeof w);
#endif
  }
};

// Loads the elements at + i, i < min(E, left), of z and t into zr/tr (K
// vectors of W); positions past `left` get no_element().
template <int E, int W, typename zs_t, typename ts_t>
CSD_HD void fetch_body(Lanes<zs_t, W> (&zr)[E / W], Lanes<ts_t, W> (&tr)[E / W], const zs_t* z,
                       const ts_t* t, int at, int left, bool vectorized) {
  constexpr int K = E / W;
  if (vectorized && left >= E) {  // a whole chunk: no fill, no per-vector test
#pragma unroll
    for (int k = 0; k < K; ++k) {
      zr[k].load(z + at + k * W);
      tr[k].load(t + at + k * W);
    }
  } else if (vectorized) {  // `left` is a multiple of W: a vector is wholly in or out
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k * W < left) {
        zr[k].load(z + at + k * W);
        tr[k].load(t + at + k * W);
      } else {
        zr[k].clear();
        tr[k].clear();
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      zr[k].clear();
      tr[k].clear();
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int i = k * W + j;
        if (i < left) {
          zr[k].set(j, z[at + i]);
          tr[k].set(j, t[at + i]);
        }
      }
    }
  }
}

// Walks this lane's share of the segment [0, n) in chunks of E elements.
// f(z, t, out) sees each chunk, converted to acc_t, with -inf at the
// positions that hold no element; with `out` != nullptr, f's out[] is
// stored (as zs_t) to the positions that do.  With read == false nothing is
// loaded (every position holds -inf) but out is still written.
template <int E, typename acc_t, typename zs_t, typename ts_t, typename F>
CSD_HD void walk_segment(const zs_t* z, const ts_t* t, zs_t* out, int n, int lane, int group,
                         bool read, F& f) {
  constexpr int W = Shape<zs_t, ts_t>::kVec;
  constexpr int K = E / W;
  const int skip = elements_to_alignment<W>(z);
  const int skip_out =
      out != nullptr ? elements_to_alignment<W>(static_cast<const zs_t*>(out)) : skip;
  const RowPlan p = plan_row<W>(n, skip, elements_to_alignment<W>(t), skip_out);
  const bool vec = p.vectorized;
  const int head = p.head, tail = p.tail;
  const int body = vec ? p.nvec * W : n;  // elements in the body, from `head` on
  const int step = group * E;
  const int steps = (body + step - 1) / step;  // the same for every lane
  const int first = head + lane * E;           // this lane's chunk in step 0
  const int tail_at = head + body;

  // Raw chunk of step s: the body, or the head and tail elements (flat
  // positions 0 and 1) when s == steps.
  Lanes<zs_t, W> zr[K];
  Lanes<ts_t, W> tr[K];
  auto clear = [&] {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      zr[k].clear();
      tr[k].clear();
    }
  };
  clear();
  auto fetch = [&](int s) {
    if (s < steps) {
      fetch_body<E>(zr, tr, z, t, first + s * step, body - (lane * E + s * step), vec);
      return;
    }
    clear();
    if (lane < head) {
      zr[0].set(0, z[lane]);
      tr[0].set(0, t[lane]);
    }
    if (lane < tail) {
      zr[1 / W].set(1 % W, z[tail_at + lane]);
      tr[1 / W].set(1 % W, t[tail_at + lane]);
    }
  };
  if (read) fetch(0);
#pragma unroll 1
  for (int s = 0; s <= steps; ++s) {
    acc_t zc[E], tc[E], res[E] = {};
    const int left = body - (lane * E + s * step);
    // Converted right after the load: all math is in acc_t.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      zr[k].template convert<acc_t>(zc + k * W);
      tr[k].template convert<acc_t>(tc + k * W);
    }
    // Issue the next step's loads before this chunk's math, so they are in
    // flight while it runs.
    if (read && s < steps) fetch(s + 1);
    f(zc, tc, res);
    if (out == nullptr) continue;
    if (s == steps) {
      if (lane < head) out[lane] = static_cast<zs_t>(res[0]);
      if (lane < tail) out[tail_at + lane] = static_cast<zs_t>(res[1]);
      continue;
    }
    zs_t* o = out + first + s * step;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (vec) {
        Lanes<zs_t, W> ov;
        ov.pack(res + k * W);
        if (k * W < left) ov.store(o + k * W);
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          if (k * W + j < left) o[k * W + j] = static_cast<zs_t>(res[k * W + j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Forward: per-thread moments of d under S, T and U.
// ---------------------------------------------------------------------------
// Which base distributions (S, T, U) a kernel variant is compiled for, as
// a bit set.  Each weighting pair needs only some of them (SS: S; TS, MM: S
// and T; US: S and U), and a variant built for exactly that set carries only
// those moments in its state and skips the others' code, at compile time:
// fewer registers (more resident blocks) and fewer instructions per element.
// kBaseAll is the general variant, for any pair: it tests `Needs` at run time.
enum BaseSet : unsigned { kBaseS = 1u, kBaseT = 2u, kBaseU = 4u, kBaseAll = 7u };

constexpr int base_count(unsigned bases) {
  return int((bases & 1u) + ((bases >> 1) & 1u) + ((bases >> 2) & 1u));
}

// The bases a variant computes: its own set, fixed at compile time in an
// exact variant (so every test of `Needs` folds away), and the weighting's
// `need`, at run time, in the general one.
template <unsigned kBases>
CSD_HD Needs variant_needs(const Needs& need) {
  if constexpr (kBases == kBaseAll) {
    return need;
  } else {
    return {(kBases & kBaseS) != 0u, (kBases & kBaseT) != 0u, (kBases & kBaseU) != 0u};
  }
}

CSD_HD bool has_base(const Needs& need, unsigned b) {
  return b == kBaseS ? need.s : b == kBaseT ? need.t : need.u;
}

// The moments of d under each base distribution of the set, in S, T, U order.
template <typename acc_t, unsigned kBases = kBaseAll>
struct RowState {
  static constexpr int kCount = base_count(kBases);
  Moments<acc_t> m[kCount];

  template <unsigned b>
  CSD_HD Moments<acc_t>& get() {
    static_assert((kBases & b) != 0u, "this variant has no moments for that base");
    return m[base_count(kBases & (b - 1u))];
  }
  // The moments of a base, empty when the variant does not carry it
  // (finalize_row ignores what the weighting does not use).
  template <unsigned b>
  CSD_HD Moments<acc_t> get_or_empty() const {
    if constexpr ((kBases & b) != 0u) {
      return m[base_count(kBases & (b - 1u))];
    } else {
      return empty_moments<acc_t>();
    }
  }
  CSD_HD Moments<acc_t> s() const { return get_or_empty<kBaseS>(); }
  CSD_HD Moments<acc_t> t() const { return get_or_empty<kBaseT>(); }
  CSD_HD Moments<acc_t> u() const { return get_or_empty<kBaseU>(); }
};

template <typename acc_t, unsigned kBases = kBaseAll>
CSD_HD RowState<acc_t, kBases> empty_state() {
  RowState<acc_t, kBases> st;
#pragma unroll
  for (int i = 0; i < RowState<acc_t, kBases>::kCount; ++i) st.m[i] = empty_moments<acc_t>();
  return st;
}

template <typename acc_t, unsigned kBases>
CSD_HD RowState<acc_t, kBases> merge_state(const RowState<acc_t, kBases>& a,
                                           const RowState<acc_t, kBases>& b) {
  RowState<acc_t, kBases> out;
#pragma unroll
  for (int i = 0; i < RowState<acc_t, kBases>::kCount; ++i) out.m[i] = merge(a.m[i], b.m[i]);
  return out;
}

// The reduction operator handed to cub::BlockReduce / cub::WarpReduce.
struct MergeState {
  template <typename acc_t, unsigned kBases>
  CSD_HD RowState<acc_t, kBases> operator()(const RowState<acc_t, kBases>& a,
                                            const RowState<acc_t, kBases>& b) const {
    return merge_state(a, b);
  }
};

template <typename acc_t>
struct ForwardMath {
  Needs need;
  acc_t inv_temp;
};

// Folds one chunk held in registers into the thread's state.
template <typename acc_t, unsigned kBases>
struct Accumulate {
  RowState<acc_t, kBases> st;
  ForwardMath<acc_t> m;

  template <int E>
  CSD_HD void operator()(const acc_t (&z)[E], const acc_t (&t)[E], acc_t (&)[E]) {
    // Each element is masked once, here: d = 0 and every weight logit -inf
    // where z or t is -inf (the neutral chunk of neutral_chunk_moments).
    // d and the weight logits are formed first, so z and t are dead before
    // the exps: fewer registers live at once.
    acc_t d[E], as[E], at[E], au[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const bool ok = is_unmasked(z[i], t[i]);
      d[i] = ok ? z[i] - t[i] : acc_t(0);
      as[i] = ok ? z[i] * m.inv_temp : neg_inf<acc_t>();
      at[i] = ok ? t[i] * m.inv_temp : neg_inf<acc_t>();
      au[i] = ok ? acc_t(0) : neg_inf<acc_t>();
    }
    fold<kBaseS>(as, d);
    fold<kBaseT>(at, d);
    fold<kBaseU>(au, d);
  }

  // Merges one base distribution's chunk moments into the state, if this
  // variant computes it (the unused arrays above are then dead code).
  template <unsigned b, int E>
  CSD_HD void fold(const acc_t (&a)[E], const acc_t (&d)[E]) {
    if constexpr ((kBases & b) != 0u) {
      if (has_base(variant_needs<kBases>(m.need), b)) {
        Moments<acc_t>& x = st.template get<b>();
        x = merge(x, neutral_chunk_moments(a, d));
      }
    }
  }
};

// Elements per forward chunk.  The exact variants with 2-byte inputs, and
// SS with fp32 inputs, take 16 elements per chunk (two or four 16-byte
// vectors per tensor): the per-chunk merge into the running state (two exps,
// two divisions: ~50 instructions) is paid once per 16 entries instead of 8,
// and each thread has twice the bytes in flight.  That costs registers --
// SS 104-118 (bf16, fp16) and 127 (fp32), TS/US 127-128 of the 128 allowed,
// no spills on sm_80-90 (the CI build check watches) -- so fp32 TS/US (which
// spilled), the general variant (three states) and fp64 keep 8 (4).
template <typename zs_t, typename ts_t, unsigned kBases>
struct ForwardChunk {
  static constexpr int kWidest = Shape<zs_t, ts_t>::kWidest;
  static constexpr bool kLong = (kBases != kBaseAll && kWidest == 2) || (kBases == kBaseS && kWidest == 4);
  static constexpr int value = kLong ? 2 * Shape<zs_t, ts_t>::kChunk : Shape<zs_t, ts_t>::kChunk;
};

// This lane's moments of [0, n) of one row segment, merged into `st`.
template <typename acc_t, unsigned kBases, typename zs_t, typename ts_t>
CSD_HD void accumulate_segment(RowState<acc_t, kBases>& st, const zs_t* z, const ts_t* t, int n,
                               int lane, int group, const ForwardMath<acc_t>& m) {
  Accumulate<acc_t, kBases> f{st, m};
  walk_segment<ForwardChunk<zs_t, ts_t, kBases>::value, acc_t>(z, t, static_cast<zs_t*>(nullptr), n,
                                                               lane, group, true, f);
  st = f.st;
}

// ---------------------------------------------------------------------------
// Backward: the gradient of one row segment, from the saved statistics.
// ---------------------------------------------------------------------------
template <typename acc_t>
struct GradMath {
  Needs need;
  acc_t inv_temp;
  acc_t max_s, max_t;      // S_k = exp(z_k/tau - max_s) / sum_s, T_k likewise
  GradCoeffs<acc_t> coeffs;  // grad_coeffs_of_row(): means, 1/sum_s, 1/sum_t, U's 1/count and
                             // 1/2 * grad_loss * row weight folded in
  bool live;               // false for an ignored row: write zeros, read nothing
};

// Gradient of one element, 0 where z or t is -inf, by the shared regrouped
// form (csd_math.h: S_k (s_d e_k + s_k) + T_k (t_d e_k + t_k) + (u_d e_k +
// u_k), e_k = d_k - mean1), as the CPU kernel computes it: per element an
// exp per softmax base and two or three multiply-adds.  A masked entry
// computes garbage (an exp of -inf, an inf d) and is replaced by 0 with one
// select, not branched around (a divergent branch per element costs more).
template <unsigned kBases, typename acc_t>
CSD_HD acc_t grad_of(acc_t z, acc_t t, const GradMath<acc_t>& g) {
  const Needs need = variant_needs<kBases>(g.need);
  const acc_t ws = need.s ? exp_fast(z * g.inv_temp - g.max_s) : acc_t(0);  // times 1/sum_s, in coeffs
  const acc_t wt = need.t ? exp_fast(t * g.inv_temp - g.max_t) : acc_t(0);
  const acc_t grad = element_grad_regrouped(g.coeffs, need, ws, wt, z - t);
  return is_unmasked(z, t) ? grad : acc_t(0);
}

template <typename acc_t, unsigned kBases>
struct Gradient {
  GradMath<acc_t> g;

  template <int E>
  CSD_HD void operator()(const acc_t (&z)[E], const acc_t (&t)[E], acc_t (&out)[E]) const {
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = grad_of<kBases>(z[i], t[i], g);
  }
};

// Elements per backward chunk.  No merge to amortise here, but the loop's
// control, addressing and stores (~60 instructions a step) are paid per
// chunk, and a longer chunk keeps twice the bytes in flight.  The exact
// variants with bf16 take 16 (78-80 registers: 3 blocks per SM instead of
// 4, with 48 KB in flight per SM instead of 32); fp16 spilled under the
// 80-register cap at 16, and the rest keep 8 (4 for fp64).
template <typename zs_t, typename ts_t, unsigned kBases>
struct BackwardChunk {
  static constexpr bool kLong = kBases != kBaseAll && IsBFloat16<zs_t>::value && IsBFloat16<ts_t>::value;
  static constexpr int value = kLong ? 2 * Shape<zs_t, ts_t>::kChunk : Shape<zs_t, ts_t>::kChunk;
};

// Writes this lane's share of the gradient of [0, n) of one row segment.
template <unsigned kBases = kBaseAll, typename acc_t, typename zs_t, typename ts_t>
CSD_HD void grad_segment(zs_t* out, const zs_t* z, const ts_t* t, int n, int lane, int group,
                         const GradMath<acc_t>& g) {
  const Gradient<acc_t, kBases> f{g};
  walk_segment<BackwardChunk<zs_t, ts_t, kBases>::value, acc_t>(z, t, out, n, lane, group, g.live, f);
}

}  // namespace gpu
}  // namespace csd
