// The fused forward+gradient kernel (csd_ext::csd_forward_grad on CUDA),
// included by csd_cuda_fused.cu and, on the host, by the emulation
// (tests/cpp/emulated_launch.h), which runs this very code on the CPU.
//
// One row per thread-block cluster of C blocks (csd_cuda_fused_plan.h); each
// block holds its segment of the row -- student and teacher logits, as read
// -- in shared memory, so HBM sees z and t read once and g written once:
//
//   fill    every thread issues cp.async 16-byte copies for the vectors it
//           owns (vector v belongs to thread v mod 256), in kFusedStages
//           commit groups, so the whole segment is in flight at once,
//           whatever the register count; a thread only ever reads the
//           vectors it copied itself, so no barrier is needed for them.
//   step 1  the max of z and t over the segment (on packed bf16 pairs:
//           max.bf16x2), stage by stage as the copies land; the min of the
//           same words tells whether the thread's vectors hold a -inf (a
//           masked entry).  Reduction 1 (max) over the block and cluster.
//   step 2  exp and the weighted sums  sum_k e_k, sum_k e_k d_k  per base
//           distribution (S, T; U counts), then reduction 2 (sums): every
//           block now knows each base's max, sum and mean, hence the row's
//           means E_w1 d, E_w2 d and the gradient coefficients.
//   step 3  the gradient, written once (16-byte stores), and the *centred*
//           second moments  sum_k w_k (d_k - mean)^2  from the on-chip data
//           (the exact two-pass form, never E[d^2] - E[d]^2); reduction 3
//           (sums); rank 0 writes the loss and the statistics.
// A thread whose vectors hold no -inf (the usual case) runs steps 2 and 3
// without the per-element masking selects (the fast path).
//
// csd_loss_grad (a reduced loss, FusedArgs::total set) does the whole call
// in this one launch, with nothing before or after it:
//   rows    a row counts where labels[row] != ignore_index, read here (no
//           mask tensor is built);
//   count   for a mean over labels, the gradient scale 1/count is needed in
//           step 3 of every row: each cluster counts the labels itself,
//           rank r of C the r-th slice (issued right after the fill, so the
//           L2 reads overlap the copies), and the C partials meet through
//           distributed shared memory after reduction 1 -- an integer sum,
//           exact in any order;
//   total   each CTA takes a ticket (atomicAdd after __threadfence) when it
//           is done; the last one sums the per-row losses in a fixed order
//           (strided per thread, then CUB's fixed tree: bitwise the same run
//           to run), divides a mean by max(count, 1), writes the scalar and
//           resets the ticket to 0 for the next launch (no memset launch; see
//           csd_cuda_ticket.h for which launches share a counter).
//
// A cluster reduction: cub::BlockReduce in each block, thread 0 writes the
// block's partial to a shared slot, cluster_sync(), then every thread of
// every block folds the C slots in rank order through distributed shared
// memory -- the same order everywhere, so every block derives bit-identical
// coefficients.  Each reduction has its own slot, and a final cluster_sync
// keeps every block's shared memory alive until its peers have read it.
//
// The kernel body exists for sm_90+ (clusters) and the emulation; the
// launcher only chooses it there, and otherwise (older GPUs, fp64 or mixed
// dtypes, rows too long for 8 blocks' shared memory, student and teacher
// rows of different 16-byte alignment, CSD_EXT_CUDA_PATH=two_pass) runs the
// two-pass kernels.
#pragma once

#ifndef CSD_CUDA_EMULATION
#include <cub/block/block_reduce.cuh>
#endif

#include <cstdint>

#include "../csd_math.h"
#include "csd_cuda_async.h"
#include "csd_cuda_backward_kernel.cuh"
#include "csd_cuda_fused_plan.h"
#include "csd_cuda_rows.h"

#if defined(CSD_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define CSD_FUSED_KERNEL_BODY 1
#endif

namespace csd {
namespace gpu {

struct FusedArgs {
  int64_t rows, vocab;
  int64_t zstride, tstride;  // row strides of the inputs; the gradient is contiguous
  int64_t seg_len;           // elements per block (plan)
  int64_t vecs;              // 16-byte vectors per tensor in shared memory (plan)
  const bool* row_mask;      // nullptr: every row counts
  float* loss;               // [rows]
  float* stats;              // [rows, kNumStats]
  Mixture<float> w1, w2;
  Needs need;
  float inv_temp;
  float half_scale;          // 1/2 * grad_scale: the gradient is for grad_loss = grad_scale
  const float* grad_scale;   // or, when not null, grad_scale read on the device (no host sync)
  // csd_loss_grad only (total != nullptr); see the top of the file.
  const int64_t* labels;     // nullptr: every row counts (or row_mask decides)
  int64_t ignore_index;
  bool mean;                 // "mean" (else "sum")
  bool count_on_device;      // a mean over labels: the count, hence the scale, is computed here
  float* total;              // the reduced loss (one float), or nullptr: no reduction
  unsigned* ticket;          // zero before the launch; the last CTA resets it
};

// Whether `row` counts: the row mask of csd_forward_grad, or csd_loss_grad's labels.
CSD_HD bool fused_row_counts(const FusedArgs& a, int64_t row) {
  if (a.row_mask != nullptr) return a.row_mask[row];
  if (a.labels != nullptr) return a.labels[row] != a.ignore_index;
  return true;
}

constexpr int kFusedNV = 6;
struct FusedVals {
  float v[kFusedNV];
};
struct FusedAdd {
  CSD_HD FusedVals operator()(const FusedVals& a, const FusedVals& b) const {
    FusedVals o;
#pragma unroll
    for (int i = 0; i < kFusedNV; ++i) o.v[i] = a.v[i] + b.v[i];
    return o;
  }
};
struct FusedMax {
  CSD_HD FusedVals operator()(const FusedVals& a, const FusedVals& b) const {
    FusedVals o;
#pragma unroll
    for (int i = 0; i < kFusedNV; ++i) o.v[i] = fmax_of(a.v[i], b.v[i]);
    return o;
  }
};
static_assert(3 * sizeof(FusedVals) <= kFusedSlotBytes, "three reduction slots");
// After them, the block's partial label count (csd_loss_grad's mean).
constexpr int kFusedCountSlot = 3 * int(sizeof(FusedVals));
static_assert(kFusedCountSlot + int(sizeof(int)) <= kFusedSlotBytes, "the count slot");
struct FusedIntAdd {
  CSD_HD int operator()(int a, int b) const { return a + b; }
};
using FusedCountReduce = cub::BlockReduce<int, kFusedThreads>;
using FusedBlockReduce = cub::BlockReduce<FusedVals, kFusedThreads>;

// A read of another CTA's result in L2 (ld.global.cg: not a stale L1 line).
CSD_HD float load_from_l2(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// csd_loss_grad's end of every CTA (the top of the file): a ticket, and the
// last CTA's reduction of the per-row losses.  Thread 0 wrote this CTA's row
// loss, if any, so its fence orders that store before its ticket.
__device__ __forceinline__ void fused_reduce_rows(const FusedArgs& a,
                                                  typename FusedBlockReduce::TempStorage& tmp) {
  __shared__ unsigned is_last;
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(a.ticket, 1u) == gridDim.x - 1u ? 1u : 0u;
  }
  __syncthreads();
  if (is_last == 0u) return;
  __threadfence();  // every other CTA's row loss, fenced before its ticket, is visible now
  float sum = 0.f, count = 0.f;  // count: an exact integer (rows < 2^24)
  for (int64_t r = threadIdx.x; r < a.rows; r += kFusedThreads) {
    sum += load_from_l2(a.loss + r);
    count += fused_row_counts(a, r) ? 1.f : 0.f;
  }
  FusedVals v{{sum, count, 0.f, 0.f, 0.f, 0.f}};
  v = FusedBlockReduce(tmp).Reduce(v, FusedAdd{});
  if (threadIdx.x == 0) {
    *a.total = reduce_total(a.mean, v.v[0], v.v[1]);
    *a.ticket = 0u;  // ready for the next launch that uses this counter
  }
}

// Reduction over the block, then over the cluster through distributed
// shared memory (see the top of the file).  Every thread returns the result.
template <typename Op>
__device__ __forceinline__ FusedVals fused_cluster_reduce(FusedVals v, Op op,
                                                          typename FusedBlockReduce::TempStorage& tmp,
                                                          FusedVals* slot, unsigned csize) {
  v = FusedBlockReduce(tmp).Reduce(v, op);
  if (threadIdx.x == 0) *slot = v;
  cluster_sync();  // slots written and visible cluster-wide; tmp free for reuse
  FusedVals out = *cluster_map(slot, 0u);
  unsigned ranks = csize;
#if defined(CSD_PLANTED_BUG_CLUSTER_REDUCE)
  // Test-only planted bug: the last block's partial is dropped.  The
  // emulated suites must fail with it (tests/cpp, test_cuda_emulated.py).
  if (ranks > 1) ranks -= 1;
#endif
  for (unsigned r = 1; r < ranks; ++r) out = op(out, *cluster_map(slot, r));
  return out;
}

// Packed bf16 pair max / min (max.bf16x2, sm_80+); NaN-dropping like fmax.
CSD_HD uint32_t bf16x2_minmax(uint32_t a, uint32_t b, bool want_max) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t d;
  if (want_max) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("min.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
#else
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float x = float_from_bits((a >> (16 * h)) << 16);
    const float y = float_from_bits((b >> (16 * h)) << 16);
    const float r = want_max ? fmax_of(x, y) : ::fminf(x, y);
    uint32_t bits;
    std::memcpy(&bits, &r, sizeof bits);
    out |= (bits >> 16) << (16 * h);
  }
  return out;
#endif
}

CSD_HD float bf16x2_reduce(uint32_t w, bool want_max) {
  const float lo = float_from_bits(w << 16), hi = float_from_bits(w & 0xffff0000u);
  return want_max ? fmax_of(lo, hi) : ::fminf(lo, hi);
}

// One 16-byte global store (st.global.v4: STG.E.128; a plain struct store
// was split into four 32-bit stores by the compiler).
template <typename V>
CSD_HD void store_16(void* p, const V& x) {
  static_assert(sizeof(V) == 16, "a 16-byte vector");
  uint32_t w[4];
  std::memcpy(w, &x, 16);
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
               "r"(w[3])
               : "memory");
#else
  std::memcpy(p, w, 16);
#endif
}

// Waits for the first s + 1 of the thread's kFusedStages copy groups.
__device__ __forceinline__ void fused_wait_stage(int s) {
  static_assert(kFusedStages == 4, "one case per stage");
  switch (kFusedStages - 1 - s) {
    case 3: cp_async_wait<3>(); break;
    case 2: cp_async_wait<2>(); break;
    case 1: cp_async_wait<1>(); break;
    default: cp_async_wait<0>(); break;
  }
}

// Per-thread partial sums of step 2, per base distribution.
struct FusedSums {
  float s, sd;    // S: sum e, sum e d   (e relative to the row's max)
  float t, td;    // T
  float u, ud;    // U: count, sum d
};

// Per-thread centred second moments of step 3 (S, T normalised weights; U unnormalised).
struct FusedM2 {
  float s, t, u;
};

// The row-level constants of steps 2 and 3.
struct FusedRow {
  float inv_temp;
  float shift_s, shift_t;      // the row's max of z/tau, t/tau (0 for an all-masked row)
  float inv_sum_s, inv_sum_t;  // 1 / sum_k exp(a_k - shift)
  float mean_s, mean_t, mean_u;
  GradCoeffs<float> coeffs;
};

template <typename T, unsigned kBases, bool kClean>
__device__ __forceinline__ void fused_sums(FusedSums& acc, const float (&z)[16 / sizeof(T)],
                                           const float (&t)[16 / sizeof(T)], const Needs& need,
                                           const FusedRow& r) {
  constexpr int W = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const bool ok = kClean || is_unmasked(z[i], t[i]);
    const float d = ok ? z[i] - t[i] : 0.f;
    if (need.s) {
      const float e = ok ? exp_fast(::fmaf(z[i], r.inv_temp, -r.shift_s)) : 0.f;
      acc.s += e;
      acc.sd = ::fmaf(e, d, acc.sd);
    }
    if (need.t) {
      const float e = ok ? exp_fast(::fmaf(t[i], r.inv_temp, -r.shift_t)) : 0.f;
      acc.t += e;
      acc.td = ::fmaf(e, d, acc.td);
    }
    if (need.u) {
      acc.u += ok ? 1.f : 0.f;
      acc.ud += d;
    }
  }
}

template <typename T, unsigned kBases, bool kClean>
__device__ __forceinline__ void fused_grad(FusedM2& acc, float (&g)[16 / sizeof(T)],
                                           const float (&z)[16 / sizeof(T)],
                                           const float (&t)[16 / sizeof(T)], const Needs& need,
                                           const FusedRow& r) {
  constexpr int W = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const bool ok = kClean || is_unmasked(z[i], t[i]);
    const float d = z[i] - t[i];
    const float ws = need.s ? exp_fast(::fmaf(z[i], r.inv_temp, -r.shift_s)) * r.inv_sum_s : 0.f;
    const float wt = need.t ? exp_fast(::fmaf(t[i], r.inv_temp, -r.shift_t)) * r.inv_sum_t : 0.f;
    const float gk = element_grad_regrouped(r.coeffs, need, ws, wt, d);
    g[i] = ok ? gk : 0.f;
    if (need.s) {
      const float c = d - r.mean_s;
      acc.s = ok ? ::fmaf(ws * c, c, acc.s) : acc.s;
    }
    if (need.t) {
      const float c = d - r.mean_t;
      acc.t = ok ? ::fmaf(wt * c, c, acc.t) : acc.t;
    }
    if (need.u) {
      const float c = d - r.mean_u;
      acc.u = ok ? ::fmaf(c, c, acc.u) : acc.u;
    }
  }
}

// Moments of one base from the reduced max, sum, mean and m2; empty when
// the base is not computed or has no unmasked entry.
__device__ __forceinline__ Moments<float> fused_moments(bool needed, float max, float sum, float mean,
                                                        float m2) {
  if (!needed || !(sum != 0.f)) return empty_moments<float>();
  return {max, sum, mean, m2};
}

template <typename T, unsigned kBases>
__device__ __forceinline__ void fused_row(const T* __restrict__ student, const T* __restrict__ teacher,
                                          T* __restrict__ grad, const FusedArgs& a) {
  constexpr int W = 16 / sizeof(T);
  constexpr bool kPackedBf16 = IsBFloat16<T>::value;
  using L = Lanes<T, W>;
  __shared__ typename FusedBlockReduce::TempStorage tmp;
  __shared__ typename FusedCountReduce::TempStorage count_tmp;

  unsigned char* smem = dynamic_smem();
  FusedVals* slots = reinterpret_cast<FusedVals*>(smem);
  T* sz = reinterpret_cast<T*>(smem + kFusedSlotBytes);
  T* st = sz + a.vecs * W;

  const unsigned csize = cluster_size();
  const unsigned rank = cluster_rank();
  const int tid = int(threadIdx.x);
  const int64_t row = int64_t(blockIdx.x) / csize;
  const int64_t begin = int64_t(rank) * a.seg_len;
  const int n = begin >= a.vocab ? 0 : int(a.vocab - begin < a.seg_len ? a.vocab - begin : a.seg_len);
  T* g = grad + row * a.vocab + begin;

  if (!fused_row_counts(a, row)) {
    // Ignored token (the whole cluster takes this exit): no reads, zero gradient.
    for (int j = tid; j < n; j += kFusedThreads) g[j] = T(0.f);
    if (rank == 0 && tid == 0) {
      const RowResult<float> none{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      store_row_result(none, false, a.loss + row, a.stats + row * kNumStats);
    }
    if (a.total != nullptr) fused_reduce_rows(a, tmp);
    return;
  }

  const T* z = student + row * a.zstride + begin;
  const T* t = teacher + row * a.tstride + begin;
  // Element j of the segment sits at shared position j + off, so that the
  // 16-byte-aligned part of the row lands on 16-byte-aligned vectors (the
  // launcher checks that z and t share their alignment).  Positions that
  // hold no element are -inf: exactly a masked entry for the math.
  const int skip = elements_to_alignment<W>(z);
  const int off = (W - skip) % W;
  const int nv = n == 0 ? 0 : (off + n + W - 1) / W;
  const bool gvec = elements_to_alignment<W>(static_cast<const T*>(g)) == skip;
  const int per_thread = (nv + kFusedThreads - 1) / kFusedThreads;

  // Fill: issue every copy now, in kFusedStages groups.
#pragma unroll 1
  for (int s = 0; s < kFusedStages; ++s) {
    const int k1 = (s + 1) * per_thread / kFusedStages;
#pragma unroll 1
    for (int k = s * per_thread / kFusedStages; k < k1; ++k) {
      const int v = tid + k * kFusedThreads;
      if (v >= nv) break;
      const int j0 = v * W - off;
      if (j0 >= 0 && j0 + W <= n) {
        cp_async_16(sz + v * W, z + j0);
        cp_async_16(st + v * W, t + j0);
      } else {  // the row's unaligned ends: plain loads, padded with -inf
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int j = j0 + i;
          const bool in = j >= 0 && j < n;
          sz[v * W + i] = in ? z[j] : no_element<T>();
          st[v * W + i] = in ? t[j] : no_element<T>();
        }
      }
    }
    cp_async_commit();
  }

  // A mean over labels: this rank's slice of the count, while the copies fly.
  int* count_slot = reinterpret_cast<int*>(smem + kFusedCountSlot);
  if (a.count_on_device) {
    const int64_t r0 = a.rows * rank / csize, r1 = a.rows * (rank + 1) / csize;
    int mine = 0;
    for (int64_t r = r0 + tid; r < r1; r += kFusedThreads) mine += a.labels[r] != a.ignore_index ? 1 : 0;
    mine = FusedCountReduce(count_tmp).Reduce(mine, FusedIntAdd{});
    if (tid == 0) *count_slot = mine;  // read by the cluster after reduction 1's cluster_sync
  }

  const Needs need = variant_needs<kBases>(a.need);
  const float ninf = neg_inf<float>();
  auto load = [&](int v, float (&zc)[W], float (&tc)[W]) {
    L zl, tl;
    zl.load(sz + v * W);
    tl.load(st + v * W);
    zl.template convert<float>(zc);
    tl.template convert<float>(tc);
  };

  // Step 1: max of z and t, and whether a -inf occurs, as the stages land.
  float max_z = ninf, max_t = ninf;
  bool clean = true;
  if constexpr (kPackedBf16) {
    constexpr uint32_t kNegInf2 = 0xff80ff80u, kPosInf2 = 0x7f807f80u;
    uint32_t mz = kNegInf2, mt = kNegInf2, lz = kPosInf2, lt = kPosInf2;
#pragma unroll 1
    for (int s = 0; s < kFusedStages; ++s) {
      fused_wait_stage(s);
      const int k1 = (s + 1) * per_thread / kFusedStages;
#pragma unroll 1
      for (int k = s * per_thread / kFusedStages; k < k1; ++k) {
        const int v = tid + k * kFusedThreads;
        if (v >= nv) break;
        L zl, tl;
        zl.load(sz + v * W);
        tl.load(st + v * W);
#pragma unroll
        for (int m = 0; m < W / 2; ++m) {
          mz = bf16x2_minmax(mz, zl.w.v[m], true);
          lz = bf16x2_minmax(lz, zl.w.v[m], false);
          mt = bf16x2_minmax(mt, tl.w.v[m], true);
          lt = bf16x2_minmax(lt, tl.w.v[m], false);
        }
      }
    }
    clean = bf16x2_reduce(lz, false) != ninf && bf16x2_reduce(lt, false) != ninf;
    max_z = bf16x2_reduce(mz, true);
    max_t = bf16x2_reduce(mt, true);
  } else {
    cp_async_wait<0>();
  }
  if (!kPackedBf16 || !clean) {
    // The masked max (an entry counts only where both logits are finite).
    if constexpr (!kPackedBf16) clean = true;
    max_z = ninf;
    max_t = ninf;
#pragma unroll 1
    for (int k = 0; k < per_thread; ++k) {
      const int v = tid + k * kFusedThreads;
      if (v >= nv) break;
      float zc[W], tc[W];
      load(v, zc, tc);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const bool ok = is_unmasked(zc[i], tc[i]);
        clean = clean && ok;
        max_z = fmax_of(max_z, ok ? zc[i] : ninf);
        max_t = fmax_of(max_t, ok ? tc[i] : ninf);
      }
    }
  }

  FusedVals red;
#pragma unroll
  for (int i = 0; i < kFusedNV; ++i) red.v[i] = ninf;
  red.v[0] = max_z * a.inv_temp;  // tau > 0: max(z) / tau = max(z / tau)
  red.v[1] = max_t * a.inv_temp;
  red = fused_cluster_reduce(red, FusedMax{}, tmp, slots + 0, csize);
  const float max_s = red.v[0], max_tt = red.v[1];

  FusedRow r{};
  r.inv_temp = a.inv_temp;
  r.shift_s = max_s == ninf ? 0.f : max_s;
  r.shift_t = max_tt == ninf ? 0.f : max_tt;

  // Step 2: exp and the weighted sums; reduction 2.
  FusedSums acc{0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
  for (int k = 0; k < per_thread; ++k) {
    const int v = tid + k * kFusedThreads;
    if (v >= nv) break;
    float zc[W], tc[W];
    load(v, zc, tc);
    if (clean) {
      fused_sums<T, kBases, true>(acc, zc, tc, need, r);
    } else {
      fused_sums<T, kBases, false>(acc, zc, tc, need, r);
    }
  }
  red = FusedVals{{acc.s, acc.sd, acc.t, acc.td, acc.u, acc.ud}};
  red = fused_cluster_reduce(red, FusedAdd{}, tmp, slots + 1, csize);
  const float sum_s = red.v[0], sum_t = red.v[2], count = red.v[4];
  r.mean_s = red.v[1] / sum_s;
  r.mean_t = red.v[3] / sum_t;
  r.mean_u = red.v[5] / count;
  r.inv_sum_s = 1.f / sum_s;
  r.inv_sum_t = 1.f / sum_t;
  const Moments<float> ms = fused_moments(need.s, max_s, sum_s, r.mean_s, 0.f);
  const Moments<float> mt = fused_moments(need.t, max_tt, sum_t, r.mean_t, 0.f);
  const Moments<float> mu = fused_moments(need.u, 0.f, count, r.mean_u, 0.f);
  // The means do not depend on the second moments: E_w1 d, E_w2 d now.
  const RowResult<float> means = finalize_row(ms, mt, mu, a.w1, a.w2);
  float half_scale = a.grad_scale != nullptr ? 0.5f * *a.grad_scale : a.half_scale;
  if (a.count_on_device) {
    int count_rows = 0;
    for (unsigned q = 0; q < csize; ++q) count_rows += *cluster_map(count_slot, q);
    half_scale = 0.5f * reduction_grad_scale(true, float(count_rows));
  }
  r.coeffs = grad_coeffs(a.w1, a.w2, means.mean1, means.mean2, means.inv_count, half_scale);

  // Step 3: the gradient (written once) and the centred second moments.
  FusedM2 m2{0.f, 0.f, 0.f};
#pragma unroll 1
  for (int k = 0; k < per_thread; ++k) {
    const int v = tid + k * kFusedThreads;
    if (v >= nv) break;
    float zc[W], tc[W], gc[W];
    load(v, zc, tc);
    if (clean) {
      fused_grad<T, kBases, true>(m2, gc, zc, tc, need, r);
    } else {
      fused_grad<T, kBases, false>(m2, gc, zc, tc, need, r);
    }
    const int j0 = v * W - off;
    if (gvec && j0 >= 0 && j0 + W <= n) {
      L gl;
      gl.template pack<float>(gc);
      CSD_CHECK_VECTOR_ALIGNMENT(g + j0, 16);
      store_16(g + j0, gl);
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const int j = j0 + i;
        if (j >= 0 && j < n) g[j] = static_cast<T>(gc[i]);
      }
    }
  }
  red = FusedVals{{m2.s, m2.t, m2.u, 0.f, 0.f, 0.f}};
  red = fused_cluster_reduce(red, FusedAdd{}, tmp, slots + 2, csize);
  if (rank == 0 && tid == 0) {
    const Moments<float> fs = fused_moments(need.s, max_s, sum_s, r.mean_s, red.v[0] * sum_s);
    const Moments<float> ft = fused_moments(need.t, max_tt, sum_t, r.mean_t, red.v[1] * sum_t);
    const Moments<float> fu = fused_moments(need.u, 0.f, count, r.mean_u, red.v[2]);
    store_row_result(finalize_row(fs, ft, fu, a.w1, a.w2), true, a.loss + row, a.stats + row * kNumStats);
  }
  // No block leaves while a peer may still read its slots.
  if (csize > 1) cluster_sync();
  if (a.total != nullptr) fused_reduce_rows(a, tmp);
}

// The fused kernel's arguments, from the plan and the op's arguments; with
// `reduce`, csd_loss_grad's (grad_scale is then the reduction's own).
inline FusedArgs fused_args(int64_t rows, int64_t vocab, int64_t zstride, int64_t tstride, const FusedPlan& plan,
                            const bool* row_mask, float* loss, float* stats, const Mixture<double>& w1,
                            const Mixture<double>& w2, double inv_temperature, double grad_scale,
                            const float* grad_scale_on_device = nullptr, const FusedReduction* reduce = nullptr) {
  FusedArgs a{};
  a.rows = rows;
  a.vocab = vocab;
  a.zstride = zstride;
  a.tstride = tstride;
  a.seg_len = plan.seg_len;
  a.vecs = plan.vecs;
  a.row_mask = row_mask;
  a.loss = loss;
  a.stats = stats;
  a.w1 = cast_mixture<float>(w1);
  a.w2 = cast_mixture<float>(w2);
  a.need = needs_of(a.w1, a.w2);
  a.inv_temp = float(inv_temperature);
  a.half_scale = float(0.5 * grad_scale);
  a.grad_scale = grad_scale_on_device;
  if (reduce != nullptr) {
    a.labels = reduce->labels;
    a.ignore_index = reduce->ignore_index;
    a.mean = reduce->mean;
    a.total = reduce->total;
    a.ticket = reduce->ticket;
    a.count_on_device = reduce->mean && reduce->labels != nullptr;
    // Without labels the count is the row count, known here.
    a.half_scale = 0.5f * reduction_grad_scale(reduce->mean, float(rows));
    a.grad_scale = nullptr;
  }
  return a;
}

template <typename T, unsigned kBases>
__global__ void __launch_bounds__(kFusedThreads, 2)
    csd_fused_kernel(const T* __restrict__ student, const T* __restrict__ teacher, T* __restrict__ grad,
                     const FusedArgs a) {
#if defined(CSD_FUSED_KERNEL_BODY)
  fused_row<T, kBases>(student, teacher, grad, a);
#endif
}

// csd_backward_reuse_: the gradient csd_forward_grad wrote is for grad_loss
// = grad_scale on every row; a row whose grad_loss differs is recomputed
// from the saved statistics (the backward kernel's code), the others are
// left alone without reading anything.  grad_scale_on_device, when not
// null, replaces grad_scale_value (csd_backward_reuse_scaled_).
template <typename zs_t, typename ts_t, typename acc_t, unsigned kBases>
__global__ void __launch_bounds__(kThreads)
    csd_backward_reuse_kernel(zs_t* __restrict__ grad, const zs_t* __restrict__ student,
                              const ts_t* __restrict__ teacher, const BackwardArgs<acc_t> a,
                              const acc_t grad_scale_value, const acc_t* grad_scale_on_device) {
  const int lane = int(threadIdx.x) % a.group;
  const int64_t item = int64_t(blockIdx.x) * (kThreads / a.group) + int(threadIdx.x) / a.group;
  if (item >= a.rows * a.segs) return;
  const int64_t row = item / a.segs;
  const acc_t grad_scale = grad_scale_on_device != nullptr ? *grad_scale_on_device : grad_scale_value;
  if (a.grad_loss[row * a.grad_loss_stride] == grad_scale) return;
  const int64_t seg = item - row * a.segs;
  const int64_t begin = seg * a.seg_len;
  const int n = int(a.vocab - begin < a.seg_len ? a.vocab - begin : a.seg_len);
  const acc_t* st = a.stats + row * kNumStats;
  const acc_t weight = st[kRowWeight];
  GradMath<acc_t> gm;
  gm.need = a.need;
  gm.inv_temp = a.inv_temp;
  gm.max_s = st[kMaxS];
  gm.max_t = st[kMaxT];
  gm.live = weight != acc_t(0);
  const acc_t half_scale = gm.live ? acc_t(0.5) * a.grad_loss[row * a.grad_loss_stride] * weight : acc_t(0);
  gm.coeffs = grad_coeffs_of_row(a.w1, a.w2, st, half_scale);  // 1/sum_s, 1/sum_t folded in
  grad_segment<kBases>(grad + row * a.vocab + begin, student + row * a.zstride + begin,
                       teacher + row * a.tstride + begin, n, lane, a.group, gm);
}

// csd_scale_grad_: g *= *scale, unless *scale is exactly 1 (every thread
// reads the scalar and returns: nothing else read).  Grid-stride; the
// product is rounded once to T (S is float, or double for a double T).
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    csd_scale_grad_kernel(T* __restrict__ grad, int64_t n, const S* __restrict__ scale) {
  const S s = *scale;
  if (s == S(1)) return;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    grad[i] = static_cast<T>(static_cast<S>(grad[i]) * s);
  }
}

}  // namespace gpu
}  // namespace csd
