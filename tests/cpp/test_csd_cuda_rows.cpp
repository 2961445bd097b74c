// Replays the CUDA kernels' per-thread row walk (csrc/cuda/csd_cuda_rows.h)
// on the CPU, lane by lane, and checks:
//   * every element of a row segment is visited exactly once (the U moments
//     count them) and every gradient element is written exactly once, with
//     nothing written outside the segment;
//   * every 16-byte vector access is aligned (the hook below), for rows that
//     start at any element offset, with equal or different offsets of the
//     student, teacher and gradient (vector and scalar modes);
//   * the merged moments, once reduced in CUB's order (a shuffle tree per
//     warp, then the warps in order), match a two-pass double reference;
//   * the launch plans (csrc/cuda/csd_cuda_plan.h) cover each row exactly.
// No GPU and no torch needed; bf16 is emulated with a 2-byte type.  Built
// with -fsanitize=address (CMakeLists.txt), the guard zones around each
// segment are poisoned, so a read or write outside it stops the test.
#include <cstdint>
#include <cstdio>
#include <string>

static int g_misaligned = 0;
#define CSD_CHECK_VECTOR_ALIGNMENT(ptr, bytes) \
  do {                                          \
    if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) ++g_misaligned; \
  } while (0)

#include "../../csrc/cuda/csd_cuda_plan.h"
#include "../../csrc/cuda/csd_cuda_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "bf16.h"

// As c10::BFloat16 in the kernels: vectors convert two elements per word.
template <>
struct csd::gpu::IsBFloat16<Bf16> : std::true_type {};
#include "check.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CSD_POISON(p, bytes) ASAN_POISON_MEMORY_REGION(p, bytes)
#define CSD_UNPOISON(p, bytes) ASAN_UNPOISON_MEMORY_REGION(p, bytes)
#else
#define CSD_POISON(p, bytes)
#define CSD_UNPOISON(p, bytes)
#endif

using namespace csd;
using namespace csd::gpu;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();


template <typename T>
const char* name_of();
template <> const char* name_of<float>() { return "fp32"; }
template <> const char* name_of<double>() { return "fp64"; }
template <> const char* name_of<Bf16>() { return "bf16"; }

// A 64-byte aligned allocation holding a segment of n elements that starts
// `offset` elements past an aligned address, with guard zones on both sides
// (poisoned under AddressSanitizer between fill() and the checks).
template <typename T>
struct Buffer {
  static constexpr int kGuard = 64;
  std::unique_ptr<T[], void (*)(void*)> mem{nullptr, std::free};
  T* data;  // the row segment
  int n;
  size_t total;
  Buffer(int n_, int offset) : n(n_), total(size_t(n_ + offset + 2 * kGuard)) {
    const size_t bytes = ((total * sizeof(T) + 63) / 64) * 64;
    mem.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    data = mem.get() + kGuard + offset;
  }
  void guard(bool on) {
    T* end = data + n;
    const size_t before = size_t(data - mem.get()) * sizeof(T);
    const size_t after = (total - size_t(end - mem.get())) * sizeof(T);
    if (on) {
      CSD_POISON(mem.get(), before);
      CSD_POISON(end, after);
    } else {
      CSD_UNPOISON(mem.get(), before);
      CSD_UNPOISON(end, after);
    }
  }
  ~Buffer() { guard(false); }
};

template <typename acc_t>
struct Ref {
  double max[3], sum[3], mean[3], m2[3];
};

// Two-pass reference of the S, T, U moments of a segment (values already
// rounded to their storage dtype), in double.
template <typename zs_t, typename ts_t>
Ref<double> reference(const zs_t* z, const ts_t* t, int n, double inv_temp) {
  Ref<double> r;
  for (int which = 0; which < 3; ++which) {
    auto a_of = [&](int i) {
      return which == 0 ? double(float(z[i])) * inv_temp
                        : which == 1 ? double(float(t[i])) * inv_temp : 0.0;
    };
    auto ok = [&](int i) { return double(float(z[i])) != -kInf && double(float(t[i])) != -kInf; };
    double mx = -kInf;
    for (int i = 0; i < n; ++i)
      if (ok(i)) mx = std::max(mx, a_of(i));
    double s = 0, sd = 0;
    for (int i = 0; i < n; ++i)
      if (ok(i)) {
        const double e = std::exp(a_of(i) - mx), d = double(float(z[i])) - double(float(t[i]));
        s += e;
        sd += e * d;
      }
    const double mean = s > 0 ? sd / s : 0;
    double m2 = 0;
    for (int i = 0; i < n; ++i)
      if (ok(i)) {
        const double d = double(float(z[i])) - double(float(t[i]));
        m2 += std::exp(a_of(i) - mx) * (d - mean) * (d - mean);
      }
    r.max[which] = mx;
    r.sum[which] = s;
    r.mean[which] = mean;
    r.m2[which] = m2;
  }
  return r;
}

// CUB's order: a shuffle-down tree within each warp, then the warps in order.
template <typename acc_t, unsigned kBases>
RowState<acc_t, kBases> reduce_like_cub(std::vector<RowState<acc_t, kBases>> lanes) {
  const int group = int(lanes.size());
  const int warp = std::min(group, kWarp);
  std::vector<RowState<acc_t, kBases>> warps;
  for (int w0 = 0; w0 < group; w0 += warp) {
    for (int offset = warp / 2; offset > 0; offset /= 2)
      for (int i = 0; i < offset; ++i) lanes[w0 + i] = merge_state(lanes[w0 + i], lanes[w0 + i + offset]);
    warps.push_back(lanes[w0]);
  }
  RowState<acc_t, kBases> st = warps[0];
  for (size_t w = 1; w < warps.size(); ++w) st = merge_state(st, warps[w]);
  return st;
}

template <typename zs_t, typename ts_t>
void fill(std::mt19937& rng, zs_t* z, ts_t* t, int n, double masked_frac) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> unif(0.f, 1.f);
  for (int i = 0; i < n; ++i) {
    const float tv = 3.f * normal(rng);
    t[i] = ts_t(tv);
    z[i] = zs_t(0.6f * tv + 1.5f * normal(rng) + 4.f);
    if (unif(rng) < masked_frac) {
      if (i % 2) z[i] = zs_t(-std::numeric_limits<float>::infinity());
      else t[i] = ts_t(-std::numeric_limits<float>::infinity());
    }
  }
}

template <typename zs_t, typename ts_t>
using acc_of = std::conditional_t<std::is_same_v<zs_t, double> || std::is_same_v<ts_t, double>, double, float>;

// Forward walk of one segment by `group` lanes vs the reference, with the
// state (and chunk size, ForwardChunk) of the variant kBases, which must
// carry U: its sum counts the entries visited.
template <typename zs_t, typename ts_t, unsigned kBases = kBaseAll>
void check_forward(int n, int oz, int ot, int group, double masked, uint32_t seed) {
  static_assert((kBases & kBaseU) != 0u, "U counts the visits");
  using acc_t = acc_of<zs_t, ts_t>;
  using State = RowState<acc_t, kBases>;
  std::mt19937 rng(seed);
  Buffer<zs_t> zb(n, oz);
  Buffer<ts_t> tb(n, ot);
  fill(rng, zb.data, tb.data, n, masked);
  const double inv_temp = 1.0 / 1.3;
  const ForwardMath<acc_t> m{{true, true, true}, acc_t(inv_temp)};
  std::vector<State> lanes(group, empty_state<acc_t, kBases>());
  zb.guard(true);
  tb.guard(true);
  for (int lane = 0; lane < group; ++lane)
    accumulate_segment(lanes[lane], zb.data, tb.data, n, lane, group, m);
  zb.guard(false);
  tb.guard(false);
  const State st = reduce_like_cub(lanes);
  const Ref<double> ref = reference(zb.data, tb.data, n, inv_temp);
  int count = 0;
  for (int i = 0; i < n; ++i) count += float(zb.data[i]) != -INFINITY && float(tb.data[i]) != -INFINITY;
  const std::string where = std::string(name_of<zs_t>()) + "/" + name_of<ts_t>() + " n=" +
                            std::to_string(n) + " offsets=" + std::to_string(oz) + "," +
                            std::to_string(ot) + " group=" + std::to_string(group) + " chunk=" +
                            std::to_string(ForwardChunk<zs_t, ts_t, kBases>::value);
  // Exactly once: U's sum is the number of unmasked entries visited.
  if (st.u().sum != acc_t(count)) {
    check::fail(__FILE__, __LINE__, where + ": visited " + std::to_string(double(st.u().sum)) +
                                        " unmasked entries, expected " + std::to_string(count));
    return;
  }
  if (count == 0) {
    CHECK(is_empty(st.s()) && is_empty(st.t()) && is_empty(st.u()));
    return;
  }
  const double rtol = std::is_same_v<acc_t, double> ? 1e-11 : 5e-5;
  const Moments<acc_t> got[3] = {st.s(), st.t(), st.u()};
  for (int w = 0; w < 3; ++w) {
    if ((kBases & (1u << w)) == 0u) continue;  // S, T, U are bits 0, 1, 2
    const Moments<acc_t>& g = got[w];
    const double scale = std::exp(double(g.max) - ref.max[w]);
    const bool ok = check::close(g.max, ref.max[w], 1e-6, 0) &&
                    check::close(g.sum * scale, ref.sum[w], rtol, 0) &&
                    check::close(g.mean, ref.mean[w], 10 * rtol, 10 * rtol * 8) &&
                    check::close(g.m2 * scale, ref.m2[w], 20 * rtol, rtol * ref.sum[w]);
    if (!ok) {
      char buf[256];
      std::snprintf(buf, sizeof(buf), ": moments %d: mean %.9g vs %.9g, m2 %.9g vs %.9g", w,
                    double(g.mean), ref.mean[w], double(g.m2 * scale), ref.m2[w]);
      check::fail(__FILE__, __LINE__, where + buf);
    }
  }
}

// Backward walk: each element written once, with the value grad_of gives it,
// by the variant kBases (and its chunk length, BackwardChunk).
template <typename zs_t, typename ts_t, unsigned kBases = kBaseAll>
void check_backward(int n, int oz, int ot, int oo, int group, bool live, uint32_t seed) {
  using acc_t = acc_of<zs_t, ts_t>;
  std::mt19937 rng(seed);
  Buffer<zs_t> zb(n, oz);
  Buffer<ts_t> tb(n, ot);
  Buffer<zs_t> ob(n, oo);
  fill(rng, zb.data, tb.data, n, 0.1);
  const zs_t sentinel = zs_t(12345.0f);
  for (size_t i = 0; i < ob.total; ++i) ob.mem.get()[i] = sentinel;
  GradMath<acc_t> g;
  // M and U need all three bases; the S+U variant gets S and U.
  const Mixture<acc_t> w1 = mixture_of<acc_t>(kBases == kBaseAll ? 'M' : 'S', acc_t(0.3));
  const Mixture<acc_t> w2 = mixture_of<acc_t>('U', acc_t(0.3));
  g.need = needs_of(w1, w2);
  g.inv_temp = acc_t(1 / 1.3);
  g.max_s = acc_t(9.0);
  g.max_t = acc_t(7.5);
  g.coeffs = grad_coeffs(w1, w2, acc_t(4.1), acc_t(3.9), acc_t(1.0 / n), acc_t(0.5 * 1.7));
  g.live = live;
  zb.guard(true);
  tb.guard(true);
  ob.guard(true);
  for (int lane = 0; lane < group; ++lane) grad_segment<kBases>(ob.data, zb.data, tb.data, n, lane, group, g);
  zb.guard(false);
  tb.guard(false);
  ob.guard(false);
  const std::string where = std::string(name_of<zs_t>()) + "/" + name_of<ts_t>() + " n=" +
                            std::to_string(n) + " offsets=" + std::to_string(oz) + "," +
                            std::to_string(ot) + "," + std::to_string(oo) +
                            " group=" + std::to_string(group) + " chunk=" +
                            std::to_string(BackwardChunk<zs_t, ts_t, kBases>::value);
  const zs_t* base = ob.mem.get();
  for (size_t i = 0; i < ob.total; ++i) {
    const long pos = long(i) - long(ob.data - base);
    const float got = float(base[i]);
    if (pos < 0 || pos >= n) {
      if (got != float(sentinel)) {
        check::fail(__FILE__, __LINE__, where + ": wrote outside the segment at " + std::to_string(pos));
        return;
      }
      continue;
    }
    const float want = live ? float(zs_t(grad_of<kBaseAll>(acc_t(float(zb.data[pos])), acc_t(float(tb.data[pos])), g)))
                            : 0.f;
    if (!(got == want)) {
      check::fail(__FILE__, __LINE__, where + ": element " + std::to_string(pos) + " is " +
                                          std::to_string(got) + ", expected " + std::to_string(want));
      return;
    }
  }
}

const int kLengths[] = {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 255, 256, 257,
                        1000, 2047, 2049, 4097, 9001};

template <typename zs_t, typename ts_t>
void sweep_forward() {
  constexpr int W = Shape<zs_t, ts_t>::kVec;
  const int offsets[][2] = {{0, 0}, {1, 1}, {W - 1, W - 1}, {W / 2, W / 2}, {0, 1}, {1, 0}, {W - 1, 0}};
  uint32_t seed = 1;
  g_misaligned = 0;
  for (int n : kLengths)
    for (const auto& o : offsets)
      for (int group : {32, 256})
        for (double masked : {0.0, 0.3}) {
          check_forward<zs_t, ts_t>(n, o[0], o[1], group, masked, seed);
          // An exact variant: 16-element chunks for 2-byte dtypes.
          check_forward<zs_t, ts_t, kBaseS | kBaseU>(n, o[0], o[1], group, masked, seed++);
        }
  CHECK(g_misaligned == 0);
}

template <typename zs_t, typename ts_t>
void sweep_backward() {
  constexpr int W = Shape<zs_t, ts_t>::kVec;
  const int offsets[][3] = {{0, 0, 0}, {1, 1, 1}, {W - 1, W - 1, W - 1}, {0, 1, 0}, {1, 1, 0}, {2 % W, 0, 2 % W}};
  uint32_t seed = 100;
  g_misaligned = 0;
  for (int n : kLengths)
    for (const auto& o : offsets)
      for (int group : {32, 256})
        for (bool live : {true, false}) {
          check_backward<zs_t, ts_t>(n, o[0], o[1], o[2], group, live, seed);
          // An exact variant: 16-element chunks for bf16.
          check_backward<zs_t, ts_t, kBaseS | kBaseU>(n, o[0], o[1], o[2], group, live, seed++);
        }
  CHECK(g_misaligned == 0);
}

}  // namespace

// Packed lanes (2-byte types, two per 32-bit word) give exactly the
// element-wise conversion (the stand-in's operator float, like c10's) for
// every 16-bit pattern: normals, subnormals, zeros, infinities and NaNs of
// both signs; loaded as a vector or set element by element over a cleared
// (-inf) register, and whatever the order of the sets.
TEST_CASE(packed_bf16_lanes_convert_exactly) {
  using csd::gpu::Lanes;
  static_assert(csd::gpu::IsBFloat16<Bf16>::value, "the shift-and-mask path is the one under test");
  int mismatches = 0;
  for (uint32_t base = 0; base < 65536; base += 8) {
    csd::gpu::VecOf<Bf16, 8> v;
    for (int j = 0; j < 8; ++j) v.v[j].bits = uint16_t(base + uint32_t((j * 5) % 8));
    Lanes<Bf16, 8> loaded, set;
    loaded.load(v.v);
    set.clear();
    for (int j = 7; j >= 0; j -= 2) set.set(j, v.v[j]);
    for (int j = 0; j < 8; j += 2) set.set(j, v.v[j]);
    float a[8], b[8];
    loaded.convert<float>(a);
    set.convert<float>(b);
    for (int j = 0; j < 8; ++j) {
      const float want = static_cast<float>(v.v[j]);
      if (std::memcmp(&a[j], &want, sizeof want) != 0 || std::memcmp(&b[j], &want, sizeof want) != 0) {
        ++mismatches;
      }
    }
  }
  CHECK(mismatches == 0);
  // A cleared register holds -inf everywhere; set() touches one element.
  Lanes<Bf16, 8> x;
  x.clear();
  x.set(3, Bf16(2.5f));
  float out[8];
  x.convert<float>(out);
  for (int j = 0; j < 8; ++j) CHECK(j == 3 ? out[j] == 2.5f : out[j] == -INFINITY);
}

TEST_CASE(forward_walk_fp32_fp32) { sweep_forward<float, float>(); }
TEST_CASE(forward_walk_bf16_bf16) { sweep_forward<Bf16, Bf16>(); }
TEST_CASE(forward_walk_bf16_fp32) { sweep_forward<Bf16, float>(); }
TEST_CASE(forward_walk_fp32_bf16) { sweep_forward<float, Bf16>(); }
TEST_CASE(forward_walk_fp64_bf16) { sweep_forward<double, Bf16>(); }
TEST_CASE(forward_walk_fp64_fp64) { sweep_forward<double, double>(); }
TEST_CASE(backward_walk_fp32_fp32) { sweep_backward<float, float>(); }
TEST_CASE(backward_walk_bf16_bf16) { sweep_backward<Bf16, Bf16>(); }
TEST_CASE(backward_walk_bf16_fp32) { sweep_backward<Bf16, float>(); }
TEST_CASE(backward_walk_fp32_bf16) { sweep_backward<float, Bf16>(); }
TEST_CASE(backward_walk_fp64_fp32) { sweep_backward<double, float>(); }

TEST_CASE(alignment_hook_sees_misaligned_vectors) {
  // The sweeps' alignment check is only worth something if the hook (called
  // by load_vec and store_vec) fires on a misaligned address.  Under
  // -fsanitize=undefined, a misaligned vector access is also reported.
  alignas(16) float buf[8] = {};
  g_misaligned = 0;
  CSD_CHECK_VECTOR_ALIGNMENT(buf + 1, 16);
  CSD_CHECK_VECTOR_ALIGNMENT(buf + 4, 16);
  CHECK(g_misaligned == 1);
  g_misaligned = 0;
}

TEST_CASE(launch_plans_cover_each_row) {
  for (int sms : {1, 108, 132}) {
    for (int64_t rows : {int64_t(1), int64_t(7), int64_t(100), int64_t(263), int64_t(264), int64_t(70000)}) {
      for (int64_t vocab : {int64_t(1), int64_t(50), int64_t(4096), int64_t(4097), int64_t(32000),
                            int64_t(50257), int64_t(151936), int64_t(262144), int64_t(1) << 20}) {
        for (const LaunchPlan& p : {plan_forward(rows, vocab, sms), plan_backward(rows, vocab)}) {
          CHECK(p.group == kWarp || p.group == kThreads);
          CHECK(p.segs >= 1 && p.segs <= std::max<int64_t>(kMaxSegments, vocab / kBackwardSegment + 1));
          CHECK((p.segs - 1) * p.seg_len < vocab && p.segs * p.seg_len >= vocab);
          CHECK(p.segs == 1 || p.seg_len % kSegmentAlign == 0);
          CHECK(p.blocks * (kThreads / p.group) >= rows * p.segs);
          CHECK((p.blocks - 1) * (kThreads / p.group) < rows * p.segs);
          CHECK(vocab > kWarpRowMaxVocab || p.group == kWarp);
        }
        const LaunchPlan f = plan_forward(rows, vocab, sms);
        CHECK(f.segs <= kMaxSegments);
        CHECK(f.segs == 1 || (rows < 2 * sms && f.seg_len >= kMinSplitSegment));
      }
    }
  }
}

TEST_CASE(split_rows_merge_to_the_whole_row) {
  // The split path end to end: a few long rows cut into segments, each
  // reduced by a 256-thread group, then merged in segment order.
  using acc_t = float;
  for (int64_t vocab : {int64_t(70001), int64_t(131072)}) {
    const LaunchPlan p = plan_forward(2, vocab, 132);
    REQUIRE(p.segs > 1 && p.group == kThreads);
    std::mt19937 rng(17);
    Buffer<Bf16> zb(int(vocab), 3);
    Buffer<Bf16> tb(int(vocab), 3);
    fill(rng, zb.data, tb.data, int(vocab), 0.01);
    const ForwardMath<acc_t> m{{true, true, true}, 1.0f};
    RowState<acc_t> row = empty_state<acc_t>();
    for (int64_t seg = 0; seg < p.segs; ++seg) {
      const int64_t begin = seg * p.seg_len;
      const int n = int(std::min(p.seg_len, vocab - begin));
      std::vector<RowState<acc_t>> lanes(p.group, empty_state<acc_t>());
      for (int lane = 0; lane < p.group; ++lane)
        accumulate_segment(lanes[lane], zb.data + begin, tb.data + begin, n, lane, p.group, m);
      row = merge_state(row, reduce_like_cub(lanes));
    }
    const Ref<double> ref = reference(zb.data, tb.data, int(vocab), 1.0);
    const double scale = std::exp(double(row.s().max) - ref.max[0]);
    CHECK_CLOSE(row.s().mean, ref.mean[0], 1e-4, 1e-4);
    CHECK_CLOSE(row.s().m2 * scale, ref.m2[0], 1e-3, 0);
    int count = 0;
    for (int64_t i = 0; i < vocab; ++i) count += float(zb.data[i]) != -INFINITY && float(tb.data[i]) != -INFINITY;
    CHECK(row.u().sum == float(count));
    const auto res = finalize_row(row.s(), row.t(), row.u(), mixture_of<acc_t>('S', 0.5f), mixture_of<acc_t>('S', 0.5f));
    CHECK_CLOSE(res.loss, 0.5 * ref.m2[0] / ref.sum[0], 1e-3, 0);
  }
}

int main() { return check::run_all(); }
