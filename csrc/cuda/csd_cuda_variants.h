// Which compiled variant of a kernel serves a weighting pair.  Plain host C++
// (no CUDA headers), shared by the launchers (csd_cuda_forward.cu,
// csd_cuda_backward.cu) and tests/cpp/test_csd_cuda_emulated.cpp, so the
// emulated kernels are picked exactly as on the GPU.
//
// The kernels are templated on the set of base distributions they carry
// (BaseSet, csd_cuda_rows.h).  The pairs the paper uses get an exact
// variant: SS (S), TS and MM (S and T), US (S and U); its state holds only
// those moments, so it needs fewer registers and fewer instructions per
// element.  Every other pair (TT, UU, TU, ...) and every fp64 or mixed-dtype
// pair runs the general variant, which tests the needs at run time.  Exact
// variants are compiled only for equal student/teacher dtypes with fp32
// accumulation, the training configurations, to keep the build time down.
#pragma once

#include <type_traits>

#include "csd_cuda_rows.h"

namespace csd {
namespace gpu {

template <unsigned kBases>
using BaseTag = std::integral_constant<unsigned, kBases>;

inline unsigned bases_of(const Needs& need) {
  return (need.s ? kBaseS : 0u) | (need.t ? kBaseT : 0u) | (need.u ? kBaseU : 0u);
}

template <typename zs_t, typename ts_t, typename acc_t>
constexpr bool kHasExactVariants = std::is_same_v<zs_t, ts_t> && std::is_same_v<acc_t, float>;

// The variant `launch(BaseTag<kBases>{})` is called with for these needs.
template <typename zs_t, typename ts_t, typename acc_t>
unsigned variant_for(const Needs& need) {
  if constexpr (kHasExactVariants<zs_t, ts_t, acc_t>) {
    const unsigned b = bases_of(need);
    if (b == kBaseS || b == (kBaseS | kBaseT) || b == (kBaseS | kBaseU)) return b;
  }
  return kBaseAll;
}

// Calls launch(BaseTag<kBases>{}) once, with the variant for `need`.
template <typename zs_t, typename ts_t, typename acc_t, typename F>
void with_variant(const Needs& need, F&& launch) {
  if constexpr (kHasExactVariants<zs_t, ts_t, acc_t>) {
    switch (variant_for<zs_t, ts_t, acc_t>(need)) {
      case kBaseS: launch(BaseTag<kBaseS>{}); return;
      case kBaseS | kBaseT: launch(BaseTag<kBaseS | kBaseT>{}); return;
      case kBaseS | kBaseU: launch(BaseTag<kBaseS | kBaseU>{}); return;
      default: break;
    }
  }
  launch(BaseTag<kBaseAll>{});
}

}  // namespace gpu
}  // namespace csd
