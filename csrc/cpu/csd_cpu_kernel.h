// The vectorised CPU kernel.  This header is compiled once per instruction
// set (isa/*.cpp define CPU_CAPABILITY as DEFAULT, AVX2 or AVX512 and the
// matching compiler flags), the way ATen builds its own CPU kernels; the
// op layer picks the variant with at::native::get_cpu_capability().
//
// Algorithm, per row, in tiles of kTile entries that stay in L1:
//   forward  tile pass A: load + upcast, mask, d = z - t, weight logits, max;
//            tile pass B: e = exp(a - max), sum(e), sum(e*d)  -> tile mean;
//            tile pass C: sum(e * (d - mean)^2)               -> centred m2;
//            then csd::merge folds the tile into the row state (stable).
//   backward re-reads the logits, recomputes the weights from the saved
//            log-sum-exps, and writes the gradient once, grad_output folded in.
// Rows are split across threads when there are fewer rows than threads, and
// the per-segment states are merged with the same csd::merge.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../csd_kernel_api.h"
#include "../csd_math.h"

namespace csd::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// 2048 fp32 entries per buffer: five buffers (z, t, d and two weight
// logits) take 40 KB, which stays in L1/L2 between the passes.
constexpr int64_t kTile = 2048;
// A task should cover at least this many entries, so that thread start-up
// does not dominate small problems.
constexpr int64_t kMinEntriesPerTask = 1 << 15;
// Smallest piece of a row worth giving its own thread.
constexpr int64_t kMinSplitEntries = 1 << 14;

template <typename acc_t>
inline Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // ~2e-6 relative error: far below fp32 accumulation noise
  } else {
    return x.exp();
  }
}

template <typename acc_t>
inline acc_t vec_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t vec_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// Upcasts n entries to acc_t.  Returns src itself when no conversion is
// needed, so fp32 inputs are read in place.
template <typename src_t, typename acc_t>
inline const acc_t* load_tile(const src_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<acc_t, float> && at::is_reduced_floating_point_v<src_t>) {
    using VecSrc = Vectorized<src_t>;
    using VecF = Vectorized<float>;
    int64_t i = 0;
    for (; i + VecSrc::size() <= n; i += VecSrc::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(VecSrc::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + VecF::size());
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

template <typename dst_t, typename acc_t>
inline void store_tile(const acc_t* buf, int64_t n, dst_t* dst) {
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<dst_t, double>) {
    at::vec::convert(buf, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(buf[i]);
  }
}

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

// Scratch for one tile.  Buffers are padded to a whole number of vectors;
// padding lanes are written as masked entries (a = -inf, d = 0, unmasked = 0).
template <typename acc_t>
struct TileScratch {
  alignas(64) acc_t z[kTile];
  alignas(64) acc_t t[kTile];
  alignas(64) acc_t d[kTile];
  alignas(64) acc_t as[kTile];  // z/tau, then exp(z/tau - max)
  alignas(64) acc_t at[kTile];  // t/tau, then exp(t/tau - max)
  alignas(64) acc_t um[kTile];  // 1 for unmasked entries, else 0 (U's weight)
};

// Passes B and C for one base distribution whose (padded) weight logits are
// in `a`.  Turns them into weights in place and returns the tile's moments.
template <typename acc_t>
inline Moments<acc_t> weighted_tile_moments(acc_t* a, const acc_t* d, int64_t n_pad, acc_t mx) {
  using Vec = Vectorized<acc_t>;
  if (mx == neg_inf<acc_t>()) return empty_moments<acc_t>();  // all masked
  const Vec vmax(mx);
  Vec vs(0), vsd(0);
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    const Vec e = vec_exp(Vec::loadu(a + i) - vmax);
    e.store(a + i);
    vs += e;
    vsd = at::vec::fmadd(e, Vec::loadu(d + i), vsd);
  }
  const acc_t s = vec_sum(vs);
  const acc_t mean = vec_sum(vsd) / s;
  const Vec vmean(mean);
  Vec vm2(0);
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    const Vec c = Vec::loadu(d + i) - vmean;
    vm2 = at::vec::fmadd(Vec::loadu(a + i) * c, c, vm2);
  }
  return {mx, s, mean, vec_sum(vm2)};
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

// Moments of entries [begin, end) of one row under the base distributions
// in `need`.
template <typename zs_t, typename ts_t, typename acc_t>
RowMoments<acc_t> segment_moments(const zs_t* zrow, const ts_t* trow, int64_t begin,
                                  int64_t end, Needs need, acc_t inv_temp,
                                  TileScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  const Vec vninf(neg_inf<acc_t>()), vzero(0), vone(1), vinv(inv_temp);
  RowMoments<acc_t> row;
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    const int64_t n_vec = n - n % Vec::size();
    const int64_t n_pad = n_vec == n ? n : n_vec + Vec::size();
    const acc_t* z = load_tile(zrow + j, n, buf.z);
    const acc_t* t = load_tile(trow + j, n, buf.t);
    // Pass A.
    Vec max_s(neg_inf<acc_t>()), max_t(neg_inf<acc_t>());
    for (int64_t i = 0; i < n_vec; i += Vec::size()) {
      const Vec vz = Vec::loadu(z + i), vt = Vec::loadu(t + i);
      const Vec unmasked = (vz != vninf) & (vt != vninf);
      Vec::blendv(vzero, vz - vt, unmasked).store(buf.d + i);
      if (need.s) {
        const Vec a = Vec::blendv(vninf, vz * vinv, unmasked);
        a.store(buf.as + i);
        max_s = at::vec::maximum(max_s, a);
      }
      if (need.t) {
        const Vec a = Vec::blendv(vninf, vt * vinv, unmasked);
        a.store(buf.at + i);
        max_t = at::vec::maximum(max_t, a);
      }
      if (need.u) Vec::blendv(vzero, vone, unmasked).store(buf.um + i);
    }
    acc_t mx_s = vec_max(max_s), mx_t = vec_max(max_t);
    for (int64_t i = n_vec; i < n_pad; ++i) {  // scalar tail, then masked padding
      const bool ok = i < n && is_unmasked(z[i], t[i]);
      buf.d[i] = ok ? z[i] - t[i] : acc_t(0);
      buf.as[i] = ok ? z[i] * inv_temp : neg_inf<acc_t>();
      buf.at[i] = ok ? t[i] * inv_temp : neg_inf<acc_t>();
      buf.um[i] = ok ? acc_t(1) : acc_t(0);
      if (ok) {
        mx_s = max_nan(mx_s, buf.as[i]);
        mx_t = max_nan(mx_t, buf.at[i]);
      }
    }
    // Passes B and C, then the stable merge into the row state.
    if (need.s) row.s = csd::merge(row.s, weighted_tile_moments(buf.as, buf.d, n_pad, mx_s));
    if (need.t) row.t = csd::merge(row.t, weighted_tile_moments(buf.at, buf.d, n_pad, mx_t));
    if (need.u) row.u = csd::merge(row.u, uniform_tile_moments(buf.um, buf.d, n_pad));
  }
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
  at::parallel_for(0, rows * segs, grain_for(seg_len), [&](int64_t first, int64_t last) {
    auto buf = std::make_unique<TileScratch<acc_t>>();
    for (int64_t item = first; item < last; ++item) {
      const int64_t r = item / segs, seg = item % segs;
      if (row_mask != nullptr && !row_mask[r]) continue;  // ignored token: no work
      const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
      partial[item] = segment_moments(zdata + r * zstride, tdata + r * tstride, begin, end, need,
                                      inv_temp, *buf);
    }
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

// Gradient of entries [begin, end) of one row.
template <typename zs_t, typename ts_t, typename acc_t>
void segment_grad(const zs_t* zrow, const ts_t* trow, zs_t* grow, int64_t begin, int64_t end,
                  const acc_t* st, acc_t half_scale, const Mixture<acc_t>& w1,
                  const Mixture<acc_t>& w2, acc_t inv_temp, TileScratch<acc_t>& buf) {
  using Vec = Vectorized<acc_t>;
  const Needs need = needs_of(w1, w2);
  const Vec vninf(neg_inf<acc_t>()), vzero(0), vinv(inv_temp), vhalf(half_scale);
  const Vec lse_s(st[kLseS]), lse_t(st[kLseT]), wu(st[kInvCount]);
  const Vec mean1(st[kMean1]), mean2(st[kMean2]);
  for (int64_t j = begin; j < end; j += kTile) {
    const int64_t n = std::min(kTile, end - j);
    const acc_t* z = load_tile(zrow + j, n, buf.z);
    const acc_t* t = load_tile(trow + j, n, buf.t);
    acc_t* g = std::is_same_v<zs_t, acc_t> ? reinterpret_cast<acc_t*>(grow + j) : buf.d;
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - i);
      const Vec vz = Vec::loadu(z + i, count), vt = Vec::loadu(t + i, count);
      const Vec unmasked = (vz != vninf) & (vt != vninf);
      const Vec ws = need.s ? vec_exp(vz * vinv - lse_s) : vzero;
      const Vec wt = need.t ? vec_exp(vt * vinv - lse_t) : vzero;
      const Vec gw1 = mixture_weight(w1, ws, wt, wu);
      const Vec gw2 = mixture_weight(w2, ws, wt, wu);
      const Vec grad = element_grad(gw1, gw2, vz - vt, mean1, mean2, vhalf);
      Vec::blendv(vzero, grad, unmasked).store(g + i, count);
    }
    if (!std::is_same_v<zs_t, acc_t>) store_tile(buf.d, n, grow + j);
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
  const acc_t inv_temp = acc_t(cfg.inv_temperature);

  const int64_t segs = segments_per_row(rows, vocab);
  const int64_t seg_len = (vocab + segs - 1) / segs;
  at::parallel_for(0, rows * segs, grain_for(seg_len), [&](int64_t first, int64_t last) {
    std::unique_ptr<TileScratch<acc_t>> buf;
    for (int64_t item = first; item < last; ++item) {
      const int64_t r = item / segs, seg = item % segs;
      const int64_t begin = seg * seg_len, end = std::min(vocab, begin + seg_len);
      zs_t* grow = gdata + r * vocab;
      const acc_t* st = st_all + r * kNumStats;
      const acc_t half_scale = acc_t(0.5) * gl[r * gl_stride] * st[kRowWeight];
      if (st[kRowWeight] == acc_t(0)) {  // ignored token: its gradient is exactly 0
        std::fill(grow + begin, grow + end, zs_t(0));
        continue;
      }
      if (!buf) buf = std::make_unique<TileScratch<acc_t>>();
      segment_grad(zdata + r * zstride, tdata + r * tstride, grow, begin, end, st, half_scale, w1,
                   w2, inv_temp, *buf);
    }
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
