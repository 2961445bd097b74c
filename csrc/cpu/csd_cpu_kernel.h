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
#include <atomic>
#include <cmath>
#include <memory>
#include <new>
#include <optional>
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

// The forward's working buffers.  A tile's buffers are padded to a whole
// number of vectors; padding lanes are written as masked entries (a = -inf,
// d = 0, um = 0).
//   tile mode: one tile's worth, reused by every tile;
//   row mode (fused forward): a whole row, tile j at offset j, so that the
//     weights and d are still there for the gradient pass; each tile's
//     weights are exp(a - that tile's max), which is kept per tile.
template <typename acc_t>
struct Scratch {
  using Vec = Vectorized<acc_t>;
  // 64-byte aligned: a vector load that straddles two cache lines costs two.
  struct AlignedDelete {
    void operator()(acc_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<acc_t[], AlignedDelete> storage;
  acc_t* d = nullptr;   // d - pivot (0 at masked entries)
  acc_t* as = nullptr;  // z/tau, then exp(z/tau - tile max)
  acc_t* at = nullptr;  // t/tau, then exp(t/tau - tile max)
  acc_t* um = nullptr;  // 1 for unmasked entries, else 0 (U's weight)
  bool whole_row;
  acc_t pivot = 0;                       // row mode: the segment's pivot
  std::vector<acc_t> max_s, max_t;       // row mode: each tile's max

  Scratch(Needs need, bool row_mode, int64_t vocab) : whole_row(row_mode) {
    constexpr int64_t kLine = 64 / sizeof(acc_t);
    const int64_t len = row_mode ? (vocab + Vec::size() + kLine - 1) / kLine * kLine : kTile;
    const int64_t arrays = 1 + int64_t(need.s) + int64_t(need.t) + int64_t(need.u);
    storage.reset(static_cast<acc_t*>(
        ::operator new[](arrays * len * sizeof(acc_t), std::align_val_t(64))));
    acc_t* next = storage.get();
    d = next, next += len;
    if (need.s) as = next, next += len;
    if (need.t) at = next, next += len;
    if (need.u) um = next, next += len;
    if (row_mode) {
      max_s.resize((vocab + kTile - 1) / kTile);
      max_t.resize(max_s.size());
    }
  }
};

// The buffers of one tile.
template <typename acc_t>
struct TileView {
  acc_t *d, *as, *at, *um;
};

template <typename acc_t>
inline TileView<acc_t> tile_view(Scratch<acc_t>& sc, int64_t offset) {
  const int64_t o = sc.whole_row ? offset : 0;
  auto at_offset = [o](acc_t* p) { return p == nullptr ? p : p + o; };
  return {sc.d + o, at_offset(sc.as), at_offset(sc.at), at_offset(sc.um)};
}

// A tile whose max is -inf has no finite weight logit: either every entry is
// masked (empty moments) or the unmasked ones are NaN, which must reach the
// row as NaN (max_skip_nan left them out of the max).  The buffer becomes
// the weights, as on the normal path: 0, or NaN where the logit was NaN.
template <typename acc_t>
inline Moments<acc_t> moments_without_max(acc_t* a, int64_t n_pad) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  bool any_nan = false;
  for (int64_t i = 0; i < n_pad; ++i) {
    any_nan = any_nan || std::isnan(a[i]);
    a[i] = std::isnan(a[i]) ? nan : acc_t(0);
  }
  return any_nan ? Moments<acc_t>{nan, nan, nan, nan} : empty_moments<acc_t>();
}

// The next tile's logits, fetched into L2 a few cache lines at a time from
// inside the exp-bound pass B, so that reading them from DRAM overlaps
// compute instead of stalling the next pass A (the hardware prefetcher alone
// leaves pass A waiting: it is a short burst of loads between long compute
// passes).
struct NextTile {
  const char* z = nullptr;
  const char* t = nullptr;
  int64_t zbytes = 0, tbytes = 0;  // per entry
  int64_t n = 0;                   // entries (0: nothing to fetch)

  // Lines of entries [i, i + count) of both inputs.
  void fetch(int64_t i, int64_t count) const {
    if (i >= n) return;
    for (int64_t off = i * zbytes; off < (i + count) * zbytes; off += 64) CSD_PREFETCH_L2(z + off);
    for (int64_t off = i * tbytes; off < (i + count) * tbytes; off += 64) CSD_PREFETCH_L2(t + off);
  }
};

// Passes B and C for one base distribution whose (padded) weight logits are
// in `a`.  Turns them into weights in place and returns the tile's moments.
template <typename acc_t>
inline Moments<acc_t> weighted_tile_moments(acc_t* a, const acc_t* d, int64_t n_pad, acc_t mx,
                                            const NextTile& next) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  if (mx == neg_inf<acc_t>()) return moments_without_max(a, n_pad);
  const Vec vmax(mx);
  // Two accumulator sets halve the add-latency chains.
  Vec vs0(0), vs1(0), vsd0(0), vsd1(0);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n_pad; i += 2 * Vec::size()) {
    next.fetch(i, 2 * Vec::size());
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
// inputs (upcast in registers) to d and the weight logits in `buf`.  It
// prefetches the next tile itself only when there is no pass B (U only).
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
inline void tile_pass_a(const zs_t* z, const ts_t* t, const NextTile& next,
                        int64_t n_vec, NeedsT nt, acc_t inv_temp, acc_t pivot,
                        const TileView<acc_t>& buf, Vectorized<acc_t>& max_s,
                        Vectorized<acc_t>& max_t) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Needs need = nt.get();
  const Vec vinv(inv_temp), vone(1), vpivot(pivot);
  for (int64_t i = 0; i < n_vec; i += Vec::size()) {
    if (!need.s && !need.t) next.fetch(i, Vec::size());
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
// in `need`.  In row mode the scratch keeps d, the weights and the tile
// maxima for the gradient pass.
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
RowMoments<acc_t> segment_moments(const zs_t* zrow, const ts_t* trow, int64_t begin,
                                  int64_t end, NeedsT nt, acc_t inv_temp, Scratch<acc_t>& sc) {
  using Vec = Vectorized<acc_t>;
  const Needs need = nt.get();
  RowMoments<acc_t> row;
  const acc_t pivot = segment_pivot<zs_t, ts_t, acc_t>(zrow, trow, begin, end);
  sc.pivot = pivot;
  for (int64_t j = begin; j < end; j += kTile) {
    const TileView<acc_t> buf = tile_view(sc, j - begin);
    const int64_t n = std::min(kTile, end - j);
    const int64_t n_vec = n - n % Vec::size();
    const int64_t n_pad = n_vec == n ? n : n_vec + Vec::size();
    NextTile next;  // the segment's next tile, if any
    if (j + kTile < end) {
      next = {reinterpret_cast<const char*>(zrow + j + kTile),
              reinterpret_cast<const char*>(trow + j + kTile), int64_t(sizeof(zs_t)),
              int64_t(sizeof(ts_t)), std::min(kTile, end - j - kTile)};
    }
    Vec max_s(neg_inf<acc_t>()), max_t(neg_inf<acc_t>());
    tile_pass_a(zrow + j, trow + j, next, n_vec, nt, inv_temp, pivot, buf, max_s, max_t);
    acc_t mx_s = vec_max(max_s), mx_t = vec_max(max_t);
    for (int64_t i = n_vec; i < n_pad; ++i) {  // scalar tail, then masked padding
      const acc_t zi = i < n ? static_cast<acc_t>(zrow[j + i]) : neg_inf<acc_t>();
      const acc_t ti = i < n ? static_cast<acc_t>(trow[j + i]) : neg_inf<acc_t>();
      const bool ok = is_unmasked(zi, ti);
      buf.d[i] = ok ? (zi - ti) - pivot : acc_t(0);
      if (need.s) {
        buf.as[i] = ok ? zi * inv_temp : neg_inf<acc_t>();
        if (ok && buf.as[i] > mx_s) mx_s = buf.as[i];  // NaN skipped, as in pass A
      }
      if (need.t) {
        buf.at[i] = ok ? ti * inv_temp : neg_inf<acc_t>();
        if (ok && buf.at[i] > mx_t) mx_t = buf.at[i];
      }
      if (need.u) buf.um[i] = ok ? acc_t(1) : acc_t(0);
    }
    if (sc.whole_row) {
      sc.max_s[(j - begin) / kTile] = mx_s;
      sc.max_t[(j - begin) / kTile] = mx_t;
    }
    // Passes B and C, then the stable merge into the row state.
    if (need.s) row.s = csd::merge(row.s, weighted_tile_moments(buf.as, buf.d, n_pad, mx_s, next));
    if (need.t) {
      row.t = csd::merge(row.t, weighted_tile_moments(buf.at, buf.d, n_pad, mx_t,
                                                      need.s ? NextTile{} : next));
    }
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

// Runs body(state, first, last) over [0, items) in chunks of `grain` items
// handed out dynamically, with one make_state() (scratch) per thread.  Unlike
// at::parallel_for's equal static split, a thread whose core is shared with
// another process, or is slower, just takes fewer chunks instead of making
// the others wait for it at the end.  Each item is computed the same way
// whichever thread takes it, so results stay deterministic.
template <typename MakeState, typename Body>
void parallel_chunks(int64_t items, int64_t grain, const MakeState& make_state, const Body& body) {
  if (items <= 0) return;
  const int64_t threads =
      std::min<int64_t>(at::get_num_threads(), (items + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    auto state = make_state();
    body(state, int64_t(0), items);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t first = next.fetch_add(grain, std::memory_order_relaxed); first < items;
         first = next.fetch_add(grain, std::memory_order_relaxed)) {
      body(state, first, std::min(items, first + grain));
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
  // c has the normalisers folded in (grad_coeffs_of_row): S_k's exp here is
  // relative to the row's max only.
  const Vec vinv(inv_temp), neg_max_s(-st[kMaxS]), neg_max_t(-st[kMaxT]);
  // The coefficients as vectors up front: read through the reference, the
  // compiler would reload them every step (the output might alias them).
  const GradCoeffs<Vec> vc{Vec(c.pivot), Vec(c.s_d), Vec(c.s_k), Vec(c.t_d),
                           Vec(c.t_k),   Vec(c.u_d), Vec(c.u_k)};
  auto grad_of = [&](const Vec& vz, const Vec& vt) {
    const Vec ws = need.s ? L::exp(at::vec::fmadd(vz, vinv, neg_max_s)) : Vec(0);
    const Vec wt = need.t ? L::exp(at::vec::fmadd(vt, vinv, neg_max_t)) : Vec(0);
    return L::or_zero(L::unmasked(vz, vt), element_grad_regrouped(vc, need, ws, wt, vz - vt));
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
    const acc_t ws = need.s ? exp_of(z * inv_temp - st[kMaxS]) : acc_t(0);
    const acc_t wt = need.t ? exp_of(t * inv_temp - st[kMaxT]) : acc_t(0);
    grow[j] = static_cast<zs_t>(element_grad_regrouped(c, need, ws, wt, z - t));
  }
}

// Writes one row's loss and statistics.
template <typename acc_t>
inline void store_row(const RowMoments<acc_t>& m, bool counted, const Mixture<acc_t>& w1,
                      const Mixture<acc_t>& w2, acc_t* loss, acc_t* st) {
  const RowResult<acc_t> res =
      counted ? finalize_row(m.s, m.t, m.u, w1, w2) : RowResult<acc_t>{};
  store_row_result(res, counted, loss, st);
}

// The typed arguments every pass needs.
template <typename zs_t, typename ts_t, typename acc_t>
struct Problem {
  int64_t rows, vocab, zstride, tstride;
  const zs_t* z;
  const ts_t* t;
  Mixture<acc_t> w1, w2;
  Needs need;
  acc_t inv_temp;
  int64_t segs, seg_len;

  Problem(const at::Tensor& student, const at::Tensor& teacher, const LossConfig& cfg)
      : rows(student.size(0)),
        vocab(student.size(1)),
        zstride(student.stride(0)),
        tstride(teacher.stride(0)),
        z(student.const_data_ptr<zs_t>()),
        t(teacher.const_data_ptr<ts_t>()),
        w1{acc_t(cfg.w1.s), acc_t(cfg.w1.t), acc_t(cfg.w1.u)},
        w2{acc_t(cfg.w2.s), acc_t(cfg.w2.t), acc_t(cfg.w2.u)},
        need(needs_of(w1, w2)),
        inv_temp(acc_t(cfg.inv_temperature)),
        segs(segments_per_row(rows, vocab)),
        seg_len((vocab + segs - 1) / segs) {}

  // Gradient of one segment of row r for the per-row scale (grad_output) `scale`.
  template <typename NeedsT>
  void grad_segment(int64_t r, int64_t begin, int64_t end, const acc_t* st, acc_t scale,
                    zs_t* grad, NeedsT nt) const {
    zs_t* grow = grad + r * vocab;
    if (st[kRowWeight] == acc_t(0)) {  // ignored token: its gradient is exactly 0
      std::fill(grow + begin, grow + end, zs_t(0));
      return;
    }
    const acc_t half_scale = acc_t(0.5) * scale * st[kRowWeight];
    const GradCoeffs<acc_t> c = grad_coeffs_of_row(w1, w2, st, half_scale);
    segment_grad(z + r * zstride, t + r * tstride, grow, begin, end, st, c, nt, inv_temp);
  }

  // Gradient of the rows for which scale_of(r) returns a value (std::nullopt:
  // leave the row as it is).
  template <typename ScaleOf>
  void grad_rows(const acc_t* stats, zs_t* grad, const ScaleOf& scale_of) const {
    with_needs<kStaticNeeds<zs_t, ts_t, acc_t>>(need, [&](auto nt) {
      parallel_chunks(rows * segs, grain_for(seg_len), [] { return 0; },
                      [&](int, int64_t first, int64_t last) {
        for (int64_t item = first; item < last; ++item) {
          const int64_t r = item / segs, seg = item % segs;
          const std::optional<acc_t> scale = scale_of(r);
          if (!scale) continue;
          const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
          grad_segment(r, begin, end, stats + r * kNumStats, *scale, grad, nt);
        }
      });
    });
  }
};

// The fused forward's gradient pass for one row, from the row-mode scratch
// (still in L2) instead of the logits: S_k = exp(z_k/tau - max_tile) *
// exp((max_tile - max_row) - log_sum), so each tile's S (and T) coefficients
// are scaled by one scalar exp and no per-entry exp is recomputed.  The two
// maxima are close fp32 numbers, so their difference is exact; the log-sum is
// added only then (see csd_math.h's StatsColumn).  `c` holds the row's
// coefficients (grad_output folded in); d in the scratch is d - pivot.
template <typename zs_t, typename acc_t, typename NeedsT>
void grad_from_scratch(const Scratch<acc_t>& sc, int64_t vocab, const acc_t* st,
                       const GradCoeffs<acc_t>& c, NeedsT nt, zs_t* grow) {
  using Vec = Vectorized<acc_t>;
  const Needs need = nt.get();
  constexpr int64_t kStep = 2 * Vec::size();
  const acc_t pivot = c.pivot - sc.pivot;  // mean1 relative to the stored d - pivot
  for (int64_t j = 0; j < vocab; j += kTile) {
    const int64_t n = std::min(kTile, vocab - j);
    const acc_t fs = need.s ? exp_of((sc.max_s[j / kTile] - st[kMaxS]) - st[kLogSumS]) : acc_t(0);
    const acc_t ft = need.t ? exp_of((sc.max_t[j / kTile] - st[kMaxT]) - st[kLogSumT]) : acc_t(0);
    const GradCoeffs<acc_t> tc{pivot, c.s_d * fs, c.s_k * fs, c.t_d * ft, c.t_k * ft, c.u_d, c.u_k};
    const GradCoeffs<Vec> vc{Vec(tc.pivot), Vec(tc.s_d), Vec(tc.s_k), Vec(tc.t_d),
                             Vec(tc.t_k),   Vec(tc.u_d), Vec(tc.u_k)};
    const acc_t* d = sc.d + j;
    const acc_t* es = need.s ? sc.as + j : nullptr;
    const acc_t* et = need.t ? sc.at + j : nullptr;
    const acc_t* um = need.u ? sc.um + j : nullptr;
    // Masked entries have weight 0 and d 0, so the S and T terms vanish
    // there; only U's term needs the mask.
    auto grad_at = [&](int64_t i) {
      const Vec ws = need.s ? Vec::loadu(es + i) : Vec(0);
      const Vec wt = need.t ? Vec::loadu(et + i) : Vec(0);
      const Vec g = element_grad_regrouped(vc, need, ws, wt, Vec::loadu(d + i));
      return need.u ? g * Vec::loadu(um + i) : g;
    };
    int64_t i = 0;
    for (; i + kStep <= n; i += kStep) store_pair_as(grow + j + i, grad_at(i), grad_at(i + Vec::size()));
    for (; i < n; ++i) {
      const acc_t g = element_grad_regrouped(tc, need, need.s ? es[i] : acc_t(0),
                                             need.t ? et[i] : acc_t(0), d[i]);
      grow[j + i] = static_cast<zs_t>(need.u ? g * um[i] : g);
    }
  }
}

// Forward; when `grad` is given, also the gradient for grad_output =
// grad_scale on every row.  With whole rows per task (rows >= threads) that
// gradient comes from the row-mode scratch right after the row's moments,
// while d and the weights are still in L2: no second read of the logits
// and no second exp per entry.
template <typename zs_t, typename ts_t, typename acc_t>
void forward_typed(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                   const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats, zs_t* grad,
                   acc_t grad_scale) {
  const Problem<zs_t, ts_t, acc_t> p(student, teacher, cfg);
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  acc_t* stats_out = stats.mutable_data_ptr<acc_t>();
  const int64_t rows = p.rows, segs = p.segs, seg_len = p.seg_len, vocab = p.vocab;
  const bool fused = grad != nullptr && segs == 1;
  std::vector<RowMoments<acc_t>> partial(fused ? 0 : rows * segs);
  with_needs<kStaticNeeds<zs_t, ts_t, acc_t>>(p.need, [&](auto nt) {
    parallel_chunks(rows * segs, grain_for(seg_len),
                    [&] { return std::make_unique<Scratch<acc_t>>(p.need, fused, vocab); },
                    [&](std::unique_ptr<Scratch<acc_t>>& scp, int64_t first, int64_t last) {
      Scratch<acc_t>& sc = *scp;
      for (int64_t item = first; item < last; ++item) {
        const int64_t r = item / segs, seg = item % segs;
        const bool counted = row_mask == nullptr || row_mask[r];
        const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
        RowMoments<acc_t> m;
        if (counted) {  // an ignored token costs no work
          m = segment_moments(p.z + r * p.zstride, p.t + r * p.tstride, begin, end, nt,
                              p.inv_temp, sc);
        }
        if (!fused) {
          partial[item] = m;
          continue;
        }
        acc_t* st = stats_out + r * kNumStats;
        store_row(m, counted, p.w1, p.w2, loss_out + r, st);
        if (!counted) {
          p.grad_segment(r, 0, vocab, st, grad_scale, grad, nt);  // zeros
          continue;
        }
        const acc_t half_scale = acc_t(0.5) * grad_scale;
        grad_from_scratch(sc, vocab, st,
                          grad_coeffs(p.w1, p.w2, st[kMean1], st[kMean2], st[kInvCount], half_scale),
                          nt, grad + r * vocab);
      }
    });
  });
  if (fused) return;
  at::parallel_for(0, rows, 4096, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      RowMoments<acc_t> m = partial[r * segs];
      for (int64_t seg = 1; seg < segs; ++seg) m = merge(m, partial[r * segs + seg]);
      store_row(m, row_mask == nullptr || row_mask[r], p.w1, p.w2, loss_out + r,
                stats_out + r * kNumStats);
    }
  });
  if (grad != nullptr) {  // rows split across threads: a second sweep once the rows are final
    p.grad_rows(stats_out, grad, [&](int64_t) { return std::optional<acc_t>(grad_scale); });
  }
}

// Backward.  `only_changed`: `grad` already holds the gradient for
// grad_output = grad_scale (from the forward); recompute only the rows whose
// grad_output differs, so the usual case (a mean or sum of the rows, backward
// from 1) costs O(N).
template <typename zs_t, typename ts_t, typename acc_t>
void backward_typed(const at::Tensor& grad_loss, const at::Tensor& student,
                    const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                    at::Tensor& grad, bool only_changed, acc_t grad_scale) {
  const Problem<zs_t, ts_t, acc_t> p(student, teacher, cfg);
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const int64_t gl_stride = grad_loss.stride(0);  // 0 when autograd expands a scalar
  p.grad_rows(stats.const_data_ptr<acc_t>(), grad.mutable_data_ptr<zs_t>(), [&](int64_t r) {
    const acc_t scale = gl[r * gl_stride];
    return (only_changed && scale == grad_scale) ? std::nullopt : std::optional<acc_t>(scale);
  });
}

#define CSD_DISPATCH_FLOATS(TYPE, NAME, ...)                                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// `grad` undefined: forward only.  Defined: also the gradient for
// grad_output = grad_scale on every row (the fused forward).
inline void forward(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
                    const LossConfig& cfg, at::Tensor& loss, at::Tensor& stats, at::Tensor& grad,
                    double grad_scale) {
  CSD_DISPATCH_FLOATS(student.scalar_type(), "csd_forward_cpu", [&] {
    using zs_t = scalar_t;
    zs_t* g = grad.defined() ? grad.mutable_data_ptr<zs_t>() : nullptr;
    CSD_DISPATCH_FLOATS(teacher.scalar_type(), "csd_forward_cpu", [&] {
      using ts_t = scalar_t;
      if (loss.scalar_type() == at::kDouble) {
        forward_typed<zs_t, ts_t, double>(student, teacher, row_mask, cfg, loss, stats, g,
                                          grad_scale);
      } else {
        forward_typed<zs_t, ts_t, float>(student, teacher, row_mask, cfg, loss, stats, g,
                                         float(grad_scale));
      }
    });
  });
}

inline void backward(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const LossConfig& cfg,
                     at::Tensor& grad, bool only_changed, double grad_scale) {
  CSD_DISPATCH_FLOATS(student.scalar_type(), "csd_backward_cpu", [&] {
    using zs_t = scalar_t;
    CSD_DISPATCH_FLOATS(teacher.scalar_type(), "csd_backward_cpu", [&] {
      using ts_t = scalar_t;
      if (stats.scalar_type() == at::kDouble) {
        backward_typed<zs_t, ts_t, double>(grad_loss, student, teacher, stats, cfg, grad,
                                           only_changed, grad_scale);
      } else {
        backward_typed<zs_t, ts_t, float>(grad_loss, student, teacher, stats, cfg, grad,
                                          only_changed, float(grad_scale));
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace csd::cpu
