// Dtype dispatch shared by the forward and backward launchers: the student
// and teacher dtypes are dispatched independently (any of fp32, bf16, fp16,
// fp64 each), and the accumulation type follows from them (fp64 only when
// one of them is fp64): 16 pairs.  Each pair gets the general kernel
// variant; csd_cuda_variants.h adds exact variants for three weighting
// families on the equal fp32/bf16/fp16 pairs.  Temperature, alpha and row
// length are runtime arguments.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>

#include <type_traits>

#include "csd_cuda_rows.h"

// Before any kernel is instantiated: c10::BFloat16 vectors convert to fp32
// two elements per word (csd_cuda_rows.h, convert_vec).
template <>
struct csd::gpu::IsBFloat16<c10::BFloat16> : std::true_type {};

#define CSD_CUDA_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Runs BODY with zs_t, ts_t and acc_t defined.
#define CSD_CUDA_DISPATCH_PAIR(STUDENT, TEACHER, NAME, ...)                                     \
  CSD_CUDA_DISPATCH_FLOATS(STUDENT, NAME, [&] {                                                 \
    using zs_t = scalar_t;                                                                      \
    CSD_CUDA_DISPATCH_FLOATS(TEACHER, NAME, [&] {                                               \
      using ts_t = scalar_t;                                                                    \
      using acc_t = std::conditional_t<std::is_same_v<zs_t, double> || std::is_same_v<ts_t, double>, \
                                       double, float>;                                          \
      __VA_ARGS__();                                                                            \
    });                                                                                         \
  })
