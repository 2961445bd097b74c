// The vectorised CPU kernel.  This header is compiled once per instruction
// set (isa/*.cpp define CPU_CAPABILITY as DEFAULT, AVX2 or AVX512 and the
// matching compiler flags), the way ATen builds its own CPU kernels; the
// op layer picks the variant with at::native::get_cpu_capability().
//
// Algorithm, per row, in tiles of kTile entries whose fp32 buffers stay in
// L1/L2 between passes:
//   forward  the row's first tile (and any tile pass AB turns down), in passes:
//            tile pass A: load the logits and upcast them in registers, mask,
//            d = z - t, weight logits a = z/tau (and/or t/tau), running max
//            (a tile without -inf skips the masking: tile_pass_a<false>);
//            tile pass B: e = exp(a - max), sum(e), sum(e*d)  -> tile mean;
//            tile pass C: sum(e * (d - mean)^2)               -> centred m2;
//            every later tile in one pass AB: d and e = exp(a - ref) with ref
//            the row state's max so far (tile_pass_ab: taken only when the
//            tile's max is near ref and it has no -inf), then pass C;
//            then csd::merge folds the tile into the row state (stable).
//            The fused forward (gradient too) skips pass C and gets each m2
//            from its gradient pass, about the row's final mean.
//   backward one pass straight from the logits to the gradient: upcast in
//            registers, recompute the weights from the saved log-sum-exps,
//            g = S (s_d d - s_0) + T (t_d d - t_0) + (u_d d - u_0) with
//            per-row coefficients (csd::grad_coeffs, grad_output folded in),
//            written once in the student's dtype.
// Instruction counts per pass: benchmarks/cpu_profile.sh and
// benchmarks/CPU_KERNEL_NOTES.md.
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
  acc_t mean_s = 0, mean_t = 0, mean_u = 0;  // row mode: the means of d - pivot
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

// Pass B for one base distribution whose (padded) weight logits are in `a`
// (tile max `mx`, finite): turns them into weights in place and returns the
// tile's weight sum and weighted mean of d.
template <typename acc_t>
CSD_PASS inline Moments<acc_t> tile_weights_and_mean(acc_t* a, const acc_t* d, int64_t n_pad,
                                                     acc_t mx, const NextTile& next) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Vec vmax(mx);
  // Two accumulator sets halve the add-latency chains.  Not with AVX2: its
  // 16 registers do not hold two exp chains, their constants and four
  // accumulators, and the spills cost more instructions than they save.
#if defined(CPU_CAPABILITY_AVX2)
  constexpr bool kTwoAtOnce = false;
#else
  constexpr bool kTwoAtOnce = true;
#endif
  Vec vs0(0), vs1(0), vsd0(0), vsd1(0);
  int64_t i = 0;
  for (; kTwoAtOnce && i + 2 * Vec::size() <= n_pad; i += 2 * Vec::size()) {
    next.fetch(i, 2 * Vec::size());
    const Vec e0 = L::exp_no_overflow(Vec::loadu(a + i) - vmax);
    const Vec e1 = L::exp_no_overflow(Vec::loadu(a + i + Vec::size()) - vmax);
    e0.store(a + i);
    e1.store(a + i + Vec::size());
    vs0 += e0;
    vs1 += e1;
    vsd0 = at::vec::fmadd(e0, Vec::loadu(d + i), vsd0);
    vsd1 = at::vec::fmadd(e1, Vec::loadu(d + i + Vec::size()), vsd1);
  }
  for (; i < n_pad; i += Vec::size()) {
    if (!kTwoAtOnce) next.fetch(i, Vec::size());
    const Vec e = L::exp_no_overflow(Vec::loadu(a + i) - vmax);
    e.store(a + i);
    vs0 += e;
    vsd0 = at::vec::fmadd(e, Vec::loadu(d + i), vsd0);
  }
  const acc_t s = vec_sum(vs0 + vs1);
  return {mx, s, vec_sum(vsd0 + vsd1) / s, acc_t(0)};
}

// Pass C: the centred second moment sum w (d - mean)^2 of the weights `w`.
template <typename acc_t>
CSD_PASS inline acc_t tile_centred_m2(const acc_t* w, const acc_t* d, int64_t n_pad,
                                      acc_t mean) {
  using Vec = Vectorized<acc_t>;
  const Vec vmean(mean);
  Vec vm0(0), vm1(0);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n_pad; i += 2 * Vec::size()) {
    const Vec c0 = Vec::loadu(d + i) - vmean;
    const Vec c1 = Vec::loadu(d + i + Vec::size()) - vmean;
    vm0 = at::vec::fmadd(Vec::loadu(w + i) * c0, c0, vm0);
    vm1 = at::vec::fmadd(Vec::loadu(w + i + Vec::size()) * c1, c1, vm1);
  }
  for (; i < n_pad; i += Vec::size()) {
    const Vec c = Vec::loadu(d + i) - vmean;
    vm0 = at::vec::fmadd(Vec::loadu(w + i) * c, c, vm0);
  }
  return vec_sum(vm0 + vm1);
}

// Passes B and C for one base distribution whose (padded) weight logits are
// in `a`.  Turns them into weights in place and returns the tile's moments.
// Without `with_m2` (the fused forward, whose gradient pass centres on the
// row's mean instead) the m2 is left 0 and pass C is skipped.
template <typename acc_t>
inline Moments<acc_t> weighted_tile_moments(acc_t* a, const acc_t* d, int64_t n_pad, acc_t mx,
                                            const NextTile& next, bool with_m2) {
  if (mx == neg_inf<acc_t>()) return moments_without_max(a, n_pad);
  Moments<acc_t> m = tile_weights_and_mean(a, d, n_pad, mx, next);
  if (with_m2) m.m2 = tile_centred_m2(a, d, n_pad, m.mean);
  return m;
}

// Moments of d under the uniform weights `um` (1 per unmasked entry).
template <typename acc_t>
inline Moments<acc_t> uniform_tile_moments(const acc_t* um, const acc_t* d, int64_t n_pad,
                                           bool with_m2) {
  using Vec = Vectorized<acc_t>;
  Vec vs(0), vsd(0);
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    vs += Vec::loadu(um + i);
    vsd += Vec::loadu(d + i);  // d is 0 at masked entries
  }
  const acc_t s = vec_sum(vs);
  if (s == acc_t(0)) return empty_moments<acc_t>();
  const acc_t mean = vec_sum(vsd) / s;
  if (!with_m2) return {acc_t(0), s, mean, acc_t(0)};
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
// kMasked = false is the common case, a tile without -inf logits: it skips
// the per-entry masking and only tracks the smallest logit (`low`); a tile
// where that is -inf is redone with kMasked = true.  (NaN logits count as
// unmasked either way, so both versions agree on every tile without -inf.)
// The state lives in locals, not in the callers' variables, so that the
// compiler keeps it in registers whether or not the pass is inlined.
template <typename acc_t>
struct PassA {
  Vectorized<acc_t> max_s, max_t, low;
};

template <bool kMasked, typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
CSD_PASS inline PassA<acc_t> tile_pass_a(const zs_t* z, const ts_t* t, const NextTile& next,
                                         int64_t n_vec, NeedsT nt, acc_t inv_temp, acc_t pivot,
                                         TileView<acc_t> buf) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Needs need = nt.get();
  const Vec vinv(inv_temp), vone(1), vpivot(pivot);
  acc_t* const bd = buf.d;
  acc_t* const bs = buf.as;
  acc_t* const bt = buf.at;
  acc_t* const bu = buf.um;
  Vec max_s(neg_inf<acc_t>()), max_t(neg_inf<acc_t>()), low(std::numeric_limits<acc_t>::infinity());
  auto one = [&](int64_t i, const Vec& vz, const Vec& vt) {
    if constexpr (kMasked) {
      const auto ok = L::unmasked(vz, vt);
      L::or_zero(ok, (vz - vt) - vpivot).store(bd + i);
      if (need.s) {
        const Vec a = L::or_neg_inf(ok, vz * vinv);
        a.store(bs + i);
        max_s = L::max_skip_nan(max_s, a);
      }
      if (need.t) {
        const Vec a = L::or_neg_inf(ok, vt * vinv);
        a.store(bt + i);
        max_t = L::max_skip_nan(max_t, a);
      }
      if (need.u) L::or_zero(ok, vone).store(bu + i);
    } else {
      low = L::min_skip_nan(L::min_skip_nan(low, vz), vt);
      ((vz - vt) - vpivot).store(bd + i);
      if (need.s) {
        const Vec a = vz * vinv;
        a.store(bs + i);
        max_s = L::max_skip_nan(max_s, a);
      }
      if (need.t) {
        const Vec a = vt * vinv;
        a.store(bt + i);
        max_t = L::max_skip_nan(max_t, a);
      }
      if (need.u) vone.store(bu + i);
    }
  };
  constexpr bool kEvenOdd = kEvenOddPairs<zs_t, ts_t, acc_t>;
  for (int64_t i = 0; i < n_vec; i += 2 * Vec::size()) {  // n_vec: whole pairs
    if (!need.s && !need.t) next.fetch(i, 2 * Vec::size());
    Vec z0, z1, t0, t1;
    load_pair<kEvenOdd>(z + i, z0, z1);
    load_pair<kEvenOdd>(t + i, t0, t1);
    one(i, z0, t0);
    one(i + Vec::size(), z1, t1);
  }
  return {max_s, max_t, low};
}

// Passes A and B in one (pass AB), for a tile after the row's first: the
// weights are taken relative to a reference `ref_*` (the row state's max so
// far) instead of the tile's own max, which is not known until the tile has
// been read.  exp(a - ref) may then exceed 1, so the caller accepts the tile
// only when its max lies in [ref - kFusedBelow, ref + kFusedAbove] (no
// overflow, no underflow of the tile's sums) and its weighted sums of d are
// finite; otherwise the tile is redone in the two-pass way.  There is no
// masking here: a -inf logit makes d = -inf or +inf, so its term e * d is
// +-inf or NaN (0 * inf when its weight is 0) and the tile is redone with
// masks -- for free, where tile_pass_a<false> spends two instructions per
// vector on finding -inf.  (A NaN logit also gets the tile redone; the row
// is NaN either way.)  It saves pass A's store of the weight logits, pass B's
// reload and one loop.  The weights go to `buf` as pass B leaves them.
constexpr float kFusedAbove = 8;   // exp(8) ~ 3e3: sums stay far from overflow
constexpr float kFusedBelow = 20;  // exp(-20) ~ 2e-9: the largest weight stays normal

template <typename acc_t>
struct PassAB {
  Vectorized<acc_t> max_z, max_t;  // raw logit maxima (times inv_temp: the a maxima)
  Vectorized<acc_t> sum_s, sum_sd, sum_t, sum_td;
};

template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
CSD_PASS inline PassAB<acc_t> tile_pass_ab(const zs_t* z, const ts_t* t, int64_t n_vec,
                                           NeedsT nt, acc_t inv_temp, acc_t pivot,
                                           acc_t ref_s, acc_t ref_t, TileView<acc_t> buf) {
  using Vec = Vectorized<acc_t>;
  using L = Lanes<acc_t>;
  const Needs need = nt.get();
  const Vec vinv(inv_temp), vone(1), vpivot(pivot), nref_s(-ref_s), nref_t(-ref_t);
  acc_t* const bd = buf.d;
  acc_t* const bs = buf.as;
  acc_t* const bt = buf.at;
  acc_t* const bu = buf.um;
  PassAB<acc_t> r{Vec(neg_inf<acc_t>()), Vec(neg_inf<acc_t>()), Vec(0), Vec(0), Vec(0), Vec(0)};
  auto one = [&](int64_t i, const Vec& vz, const Vec& vt) {
    const Vec d = (vz - vt) - vpivot;
    d.store(bd + i);
    // max(z) * inv_temp is the max of z * inv_temp (inv_temp > 0 and
    // rounding are monotonic), so the max needs no multiply per entry.
    if (need.s) {
      r.max_z = L::max_skip_nan(r.max_z, vz);
      const Vec e = L::exp_no_overflow(at::vec::fmadd(vz, vinv, nref_s));
      e.store(bs + i);
      r.sum_s += e;
      r.sum_sd = at::vec::fmadd(e, d, r.sum_sd);
    }
    if (need.t) {
      r.max_t = L::max_skip_nan(r.max_t, vt);
      const Vec e = L::exp_no_overflow(at::vec::fmadd(vt, vinv, nref_t));
      e.store(bt + i);
      r.sum_t += e;
      r.sum_td = at::vec::fmadd(e, d, r.sum_td);
    }
    if (need.u) vone.store(bu + i);
  };
  constexpr bool kEvenOdd = kEvenOddPairs<zs_t, ts_t, acc_t>;
  for (int64_t i = 0; i < n_vec; i += 2 * Vec::size()) {  // n_vec: whole pairs
    Vec z0, z1, t0, t1;
    load_pair<kEvenOdd>(z + i, z0, z1);
    load_pair<kEvenOdd>(t + i, t0, t1);
    one(i, z0, t0);
    one(i + Vec::size(), z1, t1);
  }
  return r;
}

// d at the segment's first unmasked entry (0 if there is none).  The tiles
// accumulate d - pivot, so a row whose d is one constant c gives sums of
// exact zeros: mean exactly c and m2 exactly 0, hence loss and gradient
// exactly 0 at the optimum z = t + c.  It also keeps the sums small when d
// carries a large common offset.
template <typename zs_t, typename ts_t, typename acc_t>
CSD_PASS acc_t segment_pivot(const zs_t* zrow, const ts_t* trow, int64_t begin, int64_t end) {
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
CSD_PASS RowMoments<acc_t> segment_moments(const zs_t* zrow, const ts_t* trow, int64_t begin,
                                  int64_t end, NeedsT nt, acc_t inv_temp, Scratch<acc_t>& sc) {
  using Vec = Vectorized<acc_t>;
  const Needs need = nt.get();
  RowMoments<acc_t> row;
  // The largest weight logits seen; the row state's max (the references of
  // pass AB) may stay below them, and is raised to them at the end.
  acc_t true_max_s = neg_inf<acc_t>(), true_max_t = neg_inf<acc_t>();
  // Pass AB is tried until a tile's sums come out non-finite (a -inf or NaN
  // logit): a row with masked entries in many tiles (a filtered teacher)
  // then pays for one wasted pass AB, not one per tile.
  bool try_ab = true;
  const acc_t pivot = segment_pivot<zs_t, ts_t, acc_t>(zrow, trow, begin, end);
  sc.pivot = pivot;
  for (int64_t j = begin; j < end; j += kTile) {
    const TileView<acc_t> buf = tile_view(sc, j - begin);
    const int64_t n = std::min(kTile, end - j);
    // Whole pairs of vectors (load_pair), then a scalar tail and the padding
    // to whole vectors.
    const int64_t n_vec = n - n % (2 * Vec::size());
    const int64_t n_pad = (n + Vec::size() - 1) / Vec::size() * Vec::size();
    NextTile next;  // the segment's next tile, if any
    if (j + kTile < end) {
      next = {reinterpret_cast<const char*>(zrow + j + kTile),
              reinterpret_cast<const char*>(trow + j + kTile), int64_t(sizeof(zs_t)),
              int64_t(sizeof(ts_t)), std::min(kTile, end - j - kTile)};
    }
    const bool with_m2 = !sc.whole_row;
    // Pass AB when the row state gives finite references (every tile after
    // the row's first, usually); it reports whether the tile was taken.
    auto fused = [&]() -> bool {
      if (!try_ab || !(need.s || need.t)) return false;
      if (need.s && !std::isfinite(row.s.max)) return false;
      if (need.t && !std::isfinite(row.t.max)) return false;
      const acc_t ref_s = need.s ? row.s.max : acc_t(0), ref_t = need.t ? row.t.max : acc_t(0);
      const PassAB<acc_t> ab =
          tile_pass_ab(zrow + j, trow + j, n_vec, nt, inv_temp, pivot, ref_s, ref_t, buf);
      acc_t mx_s = vec_max(ab.max_z) * inv_temp, mx_t = vec_max(ab.max_t) * inv_temp;
      acc_t ss = vec_sum(ab.sum_s), sds = vec_sum(ab.sum_sd);
      acc_t st = vec_sum(ab.sum_t), sdt = vec_sum(ab.sum_td);
      for (int64_t i = n_vec; i < n_pad; ++i) {  // scalar tail, then masked padding
        const acc_t zi = i < n ? static_cast<acc_t>(zrow[j + i]) : neg_inf<acc_t>();
        const acc_t ti = i < n ? static_cast<acc_t>(trow[j + i]) : neg_inf<acc_t>();
        const bool ok = is_unmasked(zi, ti);
        const acc_t di = ok ? (zi - ti) - pivot : acc_t(0);
        buf.d[i] = di;
        if (need.s) {
          const acc_t a = zi * inv_temp;
          const acc_t e = ok ? exp_of(a - ref_s) : acc_t(0);
          if (ok && a > mx_s) mx_s = a;  // NaN skipped, as in pass A
          buf.as[i] = e;
          ss += e;
          sds += e * di;
        }
        if (need.t) {
          const acc_t a = ti * inv_temp;
          const acc_t e = ok ? exp_of(a - ref_t) : acc_t(0);
          if (ok && a > mx_t) mx_t = a;
          buf.at[i] = e;
          st += e;
          sdt += e * di;
        }
        if (need.u) buf.um[i] = ok ? acc_t(1) : acc_t(0);
      }
      auto in_window = [](acc_t mx, acc_t ref) {
        return mx >= ref - acc_t(kFusedBelow) && mx <= ref + acc_t(kFusedAbove);
      };
      if ((need.s && !std::isfinite(sds)) || (need.t && !std::isfinite(sdt))) {
        try_ab = false;
        return false;
      }
      if (need.s && !in_window(mx_s, ref_s)) return false;
      if (need.t && !in_window(mx_t, ref_t)) return false;
      // The tile's moments relative to the references, which equal the row
      // state's max: the merges below rescale nothing.
      if (need.s) {
        Moments<acc_t> m{ref_s, ss, sds / ss, acc_t(0)};
        if (with_m2) m.m2 = tile_centred_m2(buf.as, buf.d, n_pad, m.mean);
        row.s = csd::merge(row.s, m);
        true_max_s = std::max(true_max_s, mx_s);
      }
      if (need.t) {
        Moments<acc_t> m{ref_t, st, sdt / st, acc_t(0)};
        if (with_m2) m.m2 = tile_centred_m2(buf.at, buf.d, n_pad, m.mean);
        row.t = csd::merge(row.t, m);
        true_max_t = std::max(true_max_t, mx_t);
      }
      if (sc.whole_row) {
        sc.max_s[(j - begin) / kTile] = ref_s;
        sc.max_t[(j - begin) / kTile] = ref_t;
      }
      if (need.u) row.u = csd::merge(row.u, uniform_tile_moments(buf.um, buf.d, n_pad, with_m2));
      return true;
    };
    if (fused()) continue;
    PassA<acc_t> pa =
        tile_pass_a<false>(zrow + j, trow + j, next, n_vec, nt, inv_temp, pivot, buf);
    if (vec_min(pa.low) == neg_inf<acc_t>()) {  // masked entries: redo it with masks
      pa = tile_pass_a<true>(zrow + j, trow + j, next, n_vec, nt, inv_temp, pivot, buf);
    }
    acc_t mx_s = vec_max(pa.max_s), mx_t = vec_max(pa.max_t);
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
    // Passes B and C, then the stable merge into the row state.  Row mode
    // (the fused forward) skips C: its gradient pass adds up m2 about the
    // row's mean (grad_from_scratch), and the merged m2 here is discarded.
    if (need.s && mx_s > true_max_s) true_max_s = mx_s;
    if (need.t && mx_t > true_max_t) true_max_t = mx_t;
    if (need.s) {
      row.s = csd::merge(row.s, weighted_tile_moments(buf.as, buf.d, n_pad, mx_s, next, with_m2));
    }
    if (need.t) {
      row.t = csd::merge(row.t, weighted_tile_moments(buf.at, buf.d, n_pad, mx_t,
                                                      need.s ? NextTile{} : next, with_m2));
    }
    if (need.u) row.u = csd::merge(row.u, uniform_tile_moments(buf.um, buf.d, n_pad, with_m2));
  }
  // The stats keep the true max (StatsColumn): rescale the sums to it.  Pass
  // AB's window keeps the factor >= exp(-kFusedAbove).
  auto to_true_max = [](Moments<acc_t>& m, acc_t mx) {
    if (is_empty(m) || !(mx > m.max)) return;
    const acc_t c = exp_of(m.max - mx);
    m.sum *= c;
    m.m2 *= c;
    m.max = mx;
  };
  if (need.s) to_true_max(row.s, true_max_s);
  if (need.t) to_true_max(row.t, true_max_t);
  // The means about the pivot, for grad_from_scratch's m2.
  sc.mean_s = row.s.mean;
  sc.mean_t = row.t.mean;
  sc.mean_u = row.u.mean;
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
CSD_PASS inline void store_row(const RowMoments<acc_t>& m, bool counted, const Mixture<acc_t>& w1,
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
//
// It also returns the row's centred second moments (m2 of S, T, U, on the
// scale of Moments: weights relative to the row's max), by the exact
// two-pass formula about the row's final means, while d and the weights are
// loaded anyway: the fused forward skips the per-tile pass C for them.
template <typename zs_t, typename ts_t, typename acc_t, typename NeedsT>
CSD_PASS RowMoments<acc_t> grad_from_scratch(const Scratch<acc_t>& sc, int64_t vocab,
                                             const acc_t* st, const GradCoeffs<acc_t>& c,
                                             NeedsT nt, zs_t* grow) {
  using Vec = Vectorized<acc_t>;
  const Needs need = nt.get();
  constexpr int64_t kStep = 2 * Vec::size();
  const acc_t pivot = c.pivot - sc.pivot;  // mean1 relative to the stored d - pivot
  const Vec vms(sc.mean_s), vmt(sc.mean_t), vmu(sc.mean_u);
  RowMoments<acc_t> out;
  out.s.m2 = out.t.m2 = out.u.m2 = acc_t(0);
  for (int64_t j = 0; j < vocab; j += kTile) {
    const int64_t n = std::min(kTile, vocab - j);
    // exp(max_tile - max_row): the tile's weights on the row's scale.
    const acc_t ms = need.s ? exp_of(sc.max_s[j / kTile] - st[kMaxS]) : acc_t(0);
    const acc_t mt = need.t ? exp_of(sc.max_t[j / kTile] - st[kMaxT]) : acc_t(0);
    const acc_t fs = need.s ? exp_of((sc.max_s[j / kTile] - st[kMaxS]) - st[kLogSumS]) : acc_t(0);
    const acc_t ft = need.t ? exp_of((sc.max_t[j / kTile] - st[kMaxT]) - st[kLogSumT]) : acc_t(0);
    const GradCoeffs<acc_t> tc{pivot, c.s_d * fs, c.s_k * fs, c.t_d * ft, c.t_k * ft, c.u_d, c.u_k};
    const GradCoeffs<Vec> vc{Vec(tc.pivot), Vec(tc.s_d), Vec(tc.s_k), Vec(tc.t_d),
                             Vec(tc.t_k),   Vec(tc.u_d), Vec(tc.u_k)};
    const acc_t* d = sc.d + j;
    const acc_t* es = need.s ? sc.as + j : nullptr;
    const acc_t* et = need.t ? sc.at + j : nullptr;
    const acc_t* um = need.u ? sc.um + j : nullptr;
    Vec m2s[2] = {Vec(0), Vec(0)}, m2t[2] = {Vec(0), Vec(0)}, m2u[2] = {Vec(0), Vec(0)};
    // Masked entries have weight 0 and d 0, so the S and T terms vanish
    // there; only U's term needs the mask.
    auto grad_at = [&](int64_t i, int h) {
      const Vec ws = need.s ? Vec::loadu(es + i) : Vec(0);
      const Vec wt = need.t ? Vec::loadu(et + i) : Vec(0);
      const Vec dv = Vec::loadu(d + i);
      const Vec g = element_grad_regrouped(vc, need, ws, wt, dv);
      if (need.s) {
        const Vec e = dv - vms;
        m2s[h] = at::vec::fmadd(ws * e, e, m2s[h]);
      }
      if (need.t) {
        const Vec e = dv - vmt;
        m2t[h] = at::vec::fmadd(wt * e, e, m2t[h]);
      }
      if (need.u) {
        const Vec wu = Vec::loadu(um + i);
        const Vec e = dv - vmu;
        m2u[h] = at::vec::fmadd(wu * e, e, m2u[h]);
        return g * wu;
      }
      return g;
    };
    int64_t i = 0;
    for (; i + kStep <= n; i += kStep) {
      const Vec g0 = grad_at(i, 0);
      const Vec g1 = grad_at(i + Vec::size(), 1);
      store_grad_pair<kEvenOddPairs<zs_t, ts_t, acc_t>>(grow + j + i, g0, g1);
    }
    acc_t ts = 0, tt = 0, tu = 0;
    for (; i < n; ++i) {
      const acc_t ws = need.s ? es[i] : acc_t(0), wt = need.t ? et[i] : acc_t(0);
      const acc_t g = element_grad_regrouped(tc, need, ws, wt, d[i]);
      if (need.s) ts += ws * (d[i] - sc.mean_s) * (d[i] - sc.mean_s);
      if (need.t) tt += wt * (d[i] - sc.mean_t) * (d[i] - sc.mean_t);
      if (need.u) tu += um[i] * (d[i] - sc.mean_u) * (d[i] - sc.mean_u);
      grow[j + i] = static_cast<zs_t>(need.u ? g * um[i] : g);
    }
    if (need.s) out.s.m2 += ms * (vec_sum(m2s[0] + m2s[1]) + ts);
    if (need.t) out.t.m2 += mt * (vec_sum(m2t[0] + m2t[1]) + tt);
    if (need.u) out.u.m2 += vec_sum(m2u[0] + m2u[1]) + tu;
  }
  return out;
}

// Forward; when `grad` is given, also the gradient for grad_output =
// grad_scale on every row.  With whole rows per task (rows >= threads) that
// gradient comes from the row-mode scratch right after the row's moments,
// while d and the weights are still in L2: no second read of the logits
// and no second exp per entry.
template <typename zs_t, typename ts_t, typename acc_t>
CSD_PROFILE_ENTRY_POINT void forward_typed(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask,
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
        // The stats above do not depend on m2; the loss does, so it is
        // finalised again with the m2s from the gradient pass.
        const acc_t half_scale = acc_t(0.5) * grad_scale;
        const RowMoments<acc_t> m2 = grad_from_scratch<zs_t, ts_t>(
            sc, vocab, st,
            grad_coeffs(p.w1, p.w2, st[kMean1], st[kMean2], st[kInvCount], half_scale), nt,
            grad + r * vocab);
        m.s.m2 = m2.s.m2;
        m.t.m2 = m2.t.m2;
        m.u.m2 = m2.u.m2;
        store_row(m, counted, p.w1, p.w2, loss_out + r, st);
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
