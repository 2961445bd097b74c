// The vectorised CPU kernel.  This header is compiled once per instruction
// set (isa/*.cpp define CPU_CAPABILITY as DEFAULT, AVX2 or AVX512 and the
// matching compiler flags), the way ATen builds its own CPU kernels; the
// op layer picks the variant with at::native::get_cpu_capability().
//
// Algorithm, per row, in tiles of kTile entries whose fp32 buffers stay in
// L1/L2 between passes:
//   forward  tile pass A: load the logits and upcast them in registers, mask,
//            d = z - t, weight logits a = z/tau (and/or t/tau), running max;
//            it also prefetches the next tile, so the DRAM reads overlap the
//            exp-heavy passes that follow;
//            tile pass B: e = exp(a - max), sum(e), sum(e*d)  -> tile mean;
//            tile pass C: sum(e * (d - mean)^2)               -> centred m2;
//            then csd::merge folds the tile into the row state (stable).
//   backward one pass straight from the logits to the gradient: upcast in
//            registers, recompute the weights from the saved log-sum-exps,
//            g = S (s_d d - s_0) + T (t_d d - t_0) + (u_d d - u_0) with
//            per-row coefficients (csd::grad_coeffs, grad_output folded in),
//            written once in the student's dtype.
// Rows are split across threads when there are fewer rows than threads, and
// the per-segment states are merged with the same csd::merge.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "../csd_kernel_api.h"
#include "../csd_math.h"
#include "csd_cpu_simd.h"

namespace csd::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Entries per tile.  Three fp32 buffers (d and up to two weight logits) of
// 4096 entries are 48 KB: L1-sized on current x86 cores, and the per-tile
// reductions and merge are amortised over enough entries.
constexpr int64_t kTile = 4096;
// A task should cover at least this many entries, so that thread start-up
// does not dominate small problems.
constexpr int64_t kMinEntriesPerTask = 1 << 15;
// Smallest piece of a row worth giving its own thread.
constexpr int64_t kMinSplitEntries = 1 << 14;

template <typename acc_t>
struct RowMoments {
  Moments<acc_t> s = empty_moments<acc_t>();
  Moments<acc_t> t = empty_moments<acc_t>();
  Moments<acc_t> u = empty_moments<acc_t>();
};

template <typename acc_t>
inline RowMoments<acc_t> merge(const RowMoments<acc_t>& a, const RowMoments<acc_t>& b) {
  return {csd::merge(a.s, b.s), csd::merge(a.t, b.t), csd::merge(a.u, b.u)};
}

// Which base distributions a row needs, either fixed at compile time (the
// branches on it vanish from the inner loops) or read at run time.  Only
// same-dtype inputs with fp32 accumulation -- the cases that matter for
// speed -- get the 7 compile-time variants; the rest share one runtime
// version, which keeps the number of instantiations (and build time) down.
template <bool S, bool T, bool U>
struct StaticNeeds {
  static constexpr Needs get() { return {S, T, U}; }
};
struct RuntimeNeeds {
  Needs need;
  Needs get() const { return need; }
};

template <bool kStatic, typename F>
inline void with_needs(Needs need, const F& fn) {
  if constexpr (!kStatic) {
    fn(RuntimeNeeds{need});
  } else {
    switch ((need.s ? 1 : 0) | (need.t ? 2 : 0) | (need.u ? 4 : 0)) {
      case 1: fn(StaticNeeds<true, false, false>{}); break;
      case 2: fn(StaticNeeds<false, true, false>{}); break;
      case 3: fn(StaticNeeds<true, true, false>{}); break;
      case 4: fn(StaticNeeds<false, false, true>{}); break;
      case 5: fn(StaticNeeds<true, false, true>{}); break;
      case 6: fn(StaticNeeds<false, true, true>{}); break;
      default: fn(StaticNeeds<true, true, true>{}); break;
    }
  }
}

template <typename zs_t, typename ts_t, typename acc_t>
constexpr bool kStaticNeeds = std::is_same_v<zs_t, ts_t> && std::is_same_v<acc_t, float>;

// Scratch for one tile.  Buffers are padded to a whole number of vectors;
// padding lanes are written as masked entries (a = -inf, d = 0, um = 0).
template <typename acc_t>
struct TileScratch {
  alignas(64) acc_t d[kTile];
  alignas(64) acc_t as[kTile];  // z/tau, then exp(z/tau - max)
  alignas(64) acc_t at[kTile];  // t/tau, then exp(t/tau - max)
  alignas(64) acc_t um[kTile];  // 1 for unmasked entries, else 0 (U's weight)
};

// A tile whose max is -inf has no finite weight logit: either every entry is
// masked (empty moments) or the unmasked ones are NaN, which must reach the
// row as NaN (max_skip_nan left them out of the max).
template <typename acc_t>
inline Moments<acc_t> moments_without_max(const acc_t* a, int64_t n_pad) {
  for (int64_t i = 0; i < n_pad; ++i) {
    if (std::isnan(a[i])) {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      return {nan, nan, nan, nan};
    }
  }
  return empty_moments<acc_t>();
}

// Passes B and C for one base distribution whose (padded) weight logits are
// in `a`.  Turns them into weights in place and returns the tile's moments.
template <typename acc_t>
inline Moments<acc_t> weighted_tile_moments(acc_t* a, const acc_t* d, int64_t n_pad, acc_t mx) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  if (mx == neg_inf<acc_t>()) return moments_without_max(a, n_pad);
  const Vec vmax(mx);
  // Two accumulator sets halve the add-latency chains.
  Vec vs0(0), vs1(0), vsd0(0), vsd1(0);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n_pad; i += 2 * Vec::size()) {
    const Vec e0 = L::exp(Vec::loadu(a + i) - vmax);
    const Vec e1 = L::exp(Vec::loadu(a + i + Vec::size()) - vmax);
    e0.store(a + i);
    e1.store(a + i + Vec::size());
    vs0 += e0;
    vs1 += e1;
    vsd0 = at::vec::fmadd(e0, Vec::loadu(d + i), vsd0);
    vsd1 = at::vec::fmadd(e1, Vec::loadu(d + i + Vec::size()), vsd1);
  }
  for (; i < n_pad; i += Vec::size()) {
    const Vec e = L::exp(Vec::loadu(a + i) - vmax);
    e.store(a + i);
    vs0 += e;
    vsd0 = at::vec::fmadd(e, Vec::loadu(d + i), vsd0);
  }
  const acc_t s = vec_sum(vs0 + vs1);
  const acc_t mean = vec_sum(vsd0 + vsd1) / s;
  const Vec vmean(mean);
  Vec vm0(0), vm1(0);
  i = 0;
  for (; i + 2 * Vec::size() <= n_pad; i += 2 * Vec::size()) {
    const Vec c0 = Vec::loadu(d + i) - vmean;
    const Vec c1 = Vec::loadu(d + i + Vec::size()) - vmean;
    vm0 = at::vec::fmadd(Vec::loadu(a + i) * c0, c0, vm0);
    vm1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()) * c1, c1, vm1);
  }
  for (; i < n_pad; i += Vec::size()) {
    const Vec c = Vec::loadu(d + i) - vmean;
    vm0 = at::vec::fmadd(Vec::loadu(a + i) * c, c, vm0);
  }
  return {mx, s, mean, vec_sum(vm0 + vm1)};
}

// Moments of d under the uniform weights `um` (1 per unmasked entry).
template <typename acc_t>
inline Moments<acc_t> uniform_tile_moments(const acc_t* um, const acc_t* d, int64_t n_pad) {
  using Vec = Vectorized<acc_t>;
  Vec vs(0), vsd(0);
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    vs += Vec::loadu(um + i);
    vsd += Vec::loadu(d + i);  // d is 0 at masked entries
  }
  const acc_t s = vec_sum(vs);
  if (s == acc_t(0)) return empty_moments<acc_t>();
  const acc_t mean = vec_sum(vsd) / s;
  const Vec vmean(mean);
  Vec vm2(0);
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    const Vec c = Vec::loadu(d + i) - vmean;
    vm2 = at::vec::fmadd(Vec::loadu(um + i) * c, c, vm2);
  }
  return {acc_t(0), s, mean, vec_sum(vm2)};
}

// Pass A over the whole vectors of one tile: logits straight from the
// inputs (upcast in registers) to d and the weight logits in `buf`.  Entry i
// of the *next* tile (zpf/tpf, or null for the last tile) is prefetched
// alongside entry i of this one.
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
inline void tile_pass_a(const zs_t* z, const ts_t* t, const zs_t* zpf, const ts_t* tpf,
                        int64_t n_vec, NeedsT nt, acc_t inv_temp, acc_t pivot,
                        TileScratch<acc_t>& buf, Vectorized<acc_t>& max_s,
                        Vectorized<acc_t>& max_t) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Needs need = nt.get();
  const Vec vinv(inv_temp), vone(1), vpivot(pivot);
  for (int64_t i = 0; i < n_vec; i += Vec::size()) {
    if (zpf != nullptr) {
      CSD_PREFETCH(zpf + i);
      CSD_PREFETCH(tpf + i);
    }
    const Vec vz = load_as<acc_t>(z + i), vt = load_as<acc_t>(t + i);
    const auto ok = L::unmasked(vz, vt);
    L::or_zero(ok, (vz - vt) - vpivot).store(buf.d + i);
    if (need.s) {
      const Vec a = L::or_neg_inf(ok, vz * vinv);
      a.store(buf.as + i);
      max_s = L::max_skip_nan(max_s, a);
    }
    if (need.t) {
      const Vec a = L::or_neg_inf(ok, vt * vinv);
      a.store(buf.at + i);
      max_t = L::max_skip_nan(max_t, a);
    }
    if (need.u) L::or_zero(ok, vone).store(buf.um + i);
  }
}

// d at the segment's first unmasked entry (0 if there is none).  The tiles
// accumulate d - pivot, so a row whose d is one constant c gives sums of
// exact zeros: mean exactly c and m2 exactly 0, hence loss and gradient
// exactly 0 at the optimum z = t + c.  It also keeps the sums small when d
// carries a large common offset.
template <typename zs_t, typename ts_t, typename acc_t>
acc_t segment_pivot(const zs_t* zrow, const ts_t* trow, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const acc_t z = static_cast<acc_t>(zrow[j]), t = static_cast<acc_t>(trow[j]);
    if (is_unmasked(z, t)) return z - t;
  }
  return acc_t(0);
}

// Moments of entries [begin, end) of one row under the base distributions
// in `need`.
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
RowMoments<acc_t> segment_moments(const zs_t* zrow, const ts_t* trow, int64_t begin,
                                  int64_t end, NeedsT nt, acc_t inv_temp,
                                  TileScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  const Needs need = nt.get();
  RowMoments<acc_t> row;
  const acc_t pivot = segment_pivot<zs_t, ts_t, acc_t>(zrow, trow, begin, end);
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    const int64_t n_vec = n - n % Vec::size();
    const int64_t n_pad = n_vec == n ? n : n_vec + Vec::size();
    // Prefetch the next tile of the segment (prefetches never fault, so
    // running past its end is harmless).
    const bool more = j + kTile < end;
    Vec max_s(neg_inf<acc_t>()), max_t(neg_inf<acc_t>());
    tile_pass_a(zrow + j, trow + j, more ? zrow + j + kTile : nullptr,
                more ? trow + j + kTile : nullptr, n_vec, nt, inv_temp, pivot, buf, max_s,
                max_t);
    acc_t mx_s = vec_max(max_s), mx_t = vec_max(max_t);
    for (int64_t i = n_vec; i < n_pad; ++i) {  // scalar tail, then masked padding
      const acc_t zi = i < n ? static_cast<acc_t>(zrow[j + i]) : neg_inf<acc_t>();
      const acc_t ti = i < n ? static_cast<acc_t>(trow[j + i]) : neg_inf<acc_t>();
      const bool ok = is_unmasked(zi, ti);
      buf.d[i] = ok ? (zi - ti) - pivot : acc_t(0);
      buf.as[i] = ok ? zi * inv_temp : neg_inf<acc_t>();
      buf.at[i] = ok ? ti * inv_temp : neg_inf<acc_t>();
      buf.um[i] = ok ? acc_t(1) : acc_t(0);
      if (ok && buf.as[i] > mx_s) mx_s = buf.as[i];  // NaN skipped, as in pass A
      if (ok && buf.at[i] > mx_t) mx_t = buf.at[i];
    }
    // Passes B and C, then the stable merge into the row state.
    if (need.s) row.s = csd::merge(row.s, weighted_tile_moments(buf.as, buf.d, n_pad, mx_s));
    if (need.t) row.t = csd::merge(row.t, weighted_tile_moments(buf.at, buf.d, n_pad, mx_t));
    if (need.u) row.u = csd::merge(row.u, uniform_tile_moments(buf.um, buf.d, n_pad));
  }
  // Back from d - pivot to d (m2 does not depend on the shift).
  if (!is_empty(row.s)) row.s.mean += pivot;
  if (!is_empty(row.t)) row.t.mean += pivot;
  if (!is_empty(row.u)) row.u.mean += pivot;
  return row;
}

// Splits each row into `segments` pieces when there are too few rows to
// keep every thread busy.
inline int64_t segments_per_row(int64_t rows, int64_t vocab) {
  const int64_t threads = at::get_num_threads();
  if (rows >= threads) return 1;
  const int64_t wanted = (threads + rows - 1) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min(wanted, vocab / kMinSplitEntries));
}

inline int64_t grain_for(int64_t vocab) {
  return std::max<int64_t>(1, kMinEntriesPerTask / std::max<int64_t>(vocab, 1));
}

template <typename zs_t, typename ts_t, typename acc_t>
void forward_typed(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                   const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const int64_t zstride = student.stride(0), tstride = teacher.stride(0);
  const zs_t* zdata = student.const_data_ptr<zs_t>();
  const ts_t* tdata = teacher.const_data_ptr<ts_t>();
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  acc_t* stats_out = stats.mutable_data_ptr<acc_t>();
  const Mixture<acc_t> w1{acc_t(cfg.w1.s), acc_t(cfg.w1.t), acc_t(cfg.w1.u)};
  const Mixture<acc_t> w2{acc_t(cfg.w2.s), acc_t(cfg.w2.t), acc_t(cfg.w2.u)};
  const Needs need = needs_of(w1, w2);
  const acc_t inv_temp = acc_t(cfg.inv_temperature);

  const int64_t segs = segments_per_row(rows, vocab);
  const int64_t seg_len = (vocab + segs - 1) / segs;
  std::vector<RowMoments<acc_t>> partial(rows * segs);
  with_needs<kStaticNeeds<zs_t, ts_t, acc_t>>(need, [&](auto nt) {
    at::parallel_for(0, rows * segs, grain_for(seg_len), [&](int64_t first, int64_t last) {
      auto buf = std::make_unique<TileScratch<acc_t>>();
      for (int64_t item = first; item < last; ++item) {
        const int64_t r = item / segs, seg = item % segs;
        if (row_mask != nullptr && !row_mask[r]) continue;  // ignored token: no work
        const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
        partial[item] = segment_moments(zdata + r * zstride, tdata + r * tstride, begin, end, nt,
                                        inv_temp, *buf);
      }
    });
  });
  at::parallel_for(0, rows, 4096, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      acc_t* st = stats_out + r * kNumStats;
      const bool counted = row_mask == nullptr || row_mask[r];
      RowMoments<acc_t> m = partial[r * segs];
      for (int64_t seg = 1; seg < segs; ++seg) m = merge(m, partial[r * segs + seg]);
      const RowResult<acc_t> res = counted ? finalize_row(m.s, m.t, m.u, w1, w2)
                                           : RowResult<acc_t>{0, 0, 0, 0, 0, 0};
      loss_out[r] = res.loss;
      st[kLseS] = res.lse_s;
      st[kLseT] = res.lse_t;
      st[kInvCount] = res.inv_count;
      st[kMean1] = res.mean1;
      st[kMean2] = res.mean2;
      st[kRowWeight] = counted ? acc_t(1) : acc_t(0);
    }
  });
}

// Gradient of entries [begin, end) of one row, straight from the logits to
// the output: two vectors per step (one reduced-precision vector holds two
// float vectors), a scalar tail.  Masked entries get exactly 0.
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
void segment_grad(const zs_t* zrow, const ts_t* trow, zs_t* grow, int64_t begin, int64_t end,
                  const acc_t* st, const GradCoeffs<acc_t>& c, NeedsT nt, acc_t inv_temp) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Needs need = nt.get();
  const Vec vinv(inv_temp), neg_lse_s(-st[kLseS]), neg_lse_t(-st[kLseT]);
  auto grad_of = [&](const Vec& vz, const Vec& vt) {
    const Vec ws = need.s ? L::exp(at::vec::fmadd(vz, vinv, neg_lse_s)) : Vec(0);
    const Vec wt = need.t ? L::exp(at::vec::fmadd(vt, vinv, neg_lse_t)) : Vec(0);
    return L::or_zero(L::unmasked(vz, vt), element_grad_regrouped(c, need, ws, wt, vz - vt));
  };
  constexpr int64_t kStep = 2 * Vec::size();
  int64_t j = begin;
  for (; j + kStep <= end; j += kStep) {
    const Vec g0 = grad_of(load_as<acc_t>(zrow + j), load_as<acc_t>(trow + j));
    const Vec g1 = grad_of(load_as<acc_t>(zrow + j + Vec::size()),
                           load_as<acc_t>(trow + j + Vec::size()));
    store_pair_as(grow + j, g0, g1);
  }
  for (; j < end; ++j) {
    const acc_t z = static_cast<acc_t>(zrow[j]), t = static_cast<acc_t>(trow[j]);
    if (!is_unmasked(z, t)) {
      grow[j] = zs_t(0);
      continue;
    }
    const acc_t ws = need.s ? exp_of(z * inv_temp - st[kLseS]) : acc_t(0);
    const acc_t wt = need.t ? exp_of(t * inv_temp - st[kLseT]) : acc_t(0);
    grow[j] = static_cast<zs_t>(element_grad_regrouped(c, need, ws, wt, z - t));
  }
}

template <typename zs_t, typename ts_t, typename acc_t>
void backward_typed(const at::Tensor& grad_loss, const at::Tensor& student,
                    const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                    at::Tensor& grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const int64_t zstride = student.stride(0), tstride = teacher.stride(0);
  const zs_t* zdata = student.const_data_ptr<zs_t>();
  const ts_t* tdata = teacher.const_data_ptr<ts_t>();
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const int64_t gl_stride = grad_loss.stride(0);  // 0 when autograd expands a scalar
  const acc_t* st_all = stats.const_data_ptr<acc_t>();
  zs_t* gdata = grad.mutable_data_ptr<zs_t>();
  const Mixture<acc_t> w1{acc_t(cfg.w1.s), acc_t(cfg.w1.t), acc_t(cfg.w1.u)};
  const Mixture<acc_t> w2{acc_t(cfg.w2.s), acc_t(cfg.w2.t), acc_t(cfg.w2.u)};
  const Needs need = needs_of(w1, w2);
  const acc_t inv_temp = acc_t(cfg.inv_temperature);

  const int64_t segs = segments_per_row(rows, vocab);
  const int64_t seg_len = (vocab + segs - 1) / segs;
  with_needs<kStaticNeeds<zs_t, ts_t, acc_t>>(need, [&](auto nt) {
    at::parallel_for(0, rows * segs, grain_for(seg_len), [&](int64_t first, int64_t last) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t r = item / segs, seg = item % segs;
        const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
        zs_t* grow = gdata + r * vocab;
        const acc_t* st = st_all + r * kNumStats;
        if (st[kRowWeight] == acc_t(0)) {  // ignored token: its gradient is exactly 0
          std::fill(grow + begin, grow + end, zs_t(0));
          continue;
        }
        const acc_t half_scale = acc_t(0.5) * gl[r * gl_stride] * st[kRowWeight];
        const GradCoeffs<acc_t> c =
            grad_coeffs(w1, w2, st[kMean1], st[kMean2], st[kInvCount], half_scale);
        segment_grad(zdata + r * zstride, tdata + r * tstride, grow, begin, end, st, c, nt,
                     inv_temp);
      }
    });
  });
}

#define CSD_DISPATCH_FLOATS(TYPE, NAME, ...)                                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline void forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                    const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats) {
  CSD_DISPATCH_FLOATS(student.scalar_type(), "csd_forward_cpu", [&] {
    using zs_t = scalar_t;
    CSD_DISPATCH_FLOATS(teacher.scalar_type(), "csd_forward_cpu", [&] {
      using ts_t = scalar_t;
      if (loss.scalar_type() == at::kDouble) {
        forward_typed<zs_t, ts_t, double>(student, teacher, row_mask, cfg, loss, stats);
      } else {
        forward_typed<zs_t, ts_t, float>(student, teacher, row_mask, cfg, loss, stats);
      }
    });
  });
}

inline void backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad) {
  CSD_DISPATCH_FLOATS(student.scalar_type(), "csd_backward_cpu", [&] {
    using zs_t = scalar_t;
    CSD_DISPATCH_FLOATS(teacher.scalar_type(), "csd_backward_cpu", [&] {
      using ts_t = scalar_t;
      if (stats.scalar_type() == at::kDouble) {
        backward_typed<zs_t, ts_t, double>(grad_loss, student, teacher, stats, cfg, grad);
      } else {
        backward_typed<zs_t, ts_t, float>(grad_loss, student, teacher, stats, cfg, grad);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace csd::cpu
