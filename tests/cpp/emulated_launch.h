// The real launchers' host code (csrc/cuda/csd_cuda_host.h: plan, arguments,
// variant, split-row scratch, merge launch) with the kernels launched under
// cuda_emulation.h instead of on a GPU.  Shared by the C++ emulation test
// (test_csd_cuda_emulated.cpp) and the emulated torch ops that run the GPU
// suite on the CPU (torch_emulated_ops.cpp).  Only the two callbacks below
// are the emulation's own.
//
// Include cuda_emulation.h before this header.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "../../csrc/cuda/csd_cuda_host.h"

namespace csd {
namespace gpu {

// launch(kernel, blocks, threads, args...) for csd_cuda_host.h.
struct EmulatedLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t blocks, int threads, const Args&... args) const {
    emu::launch(blocks, threads, kernel, args...);
  }
};

// scratch(bytes) for csd_cuda_host.h: memory that lives as long as this object.
struct EmulatedScratch {
  std::vector<std::unique_ptr<unsigned char[]>> blocks;
  void* operator()(int64_t bytes) {
    blocks.emplace_back(new unsigned char[size_t(bytes) + 256]);
    auto p = reinterpret_cast<uintptr_t>(blocks.back().get());
    return reinterpret_cast<void*>((p + 255) / 256 * 256);  // as the CUDA caching allocator aligns
  }
};

template <typename zs_t, typename ts_t, typename acc_t>
void emulated_forward(const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride, int64_t rows,
                      int64_t vocab, const bool* row_mask, const Mixture<double>& w1,
                      const Mixture<double>& w2, double inv_temp, acc_t* loss, acc_t* stats, int sms,
                      bool force_general = false) {
  EmulatedScratch scratch;
  run_forward(z, zstride, t, tstride, rows, vocab, row_mask, w1, w2, inv_temp, loss, stats, sms, scratch,
              EmulatedLaunch{}, force_general);
}

template <typename zs_t, typename ts_t, typename acc_t>
void emulated_backward(zs_t* grad, const zs_t* z, int64_t zstride, const ts_t* t, int64_t tstride,
                       int64_t rows, int64_t vocab, const acc_t* grad_loss, int64_t grad_loss_stride,
                       const acc_t* stats, const Mixture<double>& w1, const Mixture<double>& w2,
                       double inv_temp, bool force_general = false) {
  run_backward(grad, z, zstride, t, tstride, rows, vocab, grad_loss, grad_loss_stride, stats, w1, w2, inv_temp,
               EmulatedLaunch{}, force_general);
}

}  // namespace gpu
}  // namespace csd
