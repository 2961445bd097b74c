// Ticket counters per (device, stream); see csd_cuda_ticket.h.
#include "csd_cuda_ticket.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <unordered_map>

namespace csd {
namespace gpu {
namespace {

struct DeviceTickets {
  unsigned* base = nullptr;
  std::unordered_map<cudaStream_t, int> slot;
};

}  // namespace

unsigned* launch_ticket(cudaStream_t stream) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceTickets> per_device;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  DeviceTickets& d = per_device[device];
  if (d.base == nullptr) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "csd_loss_grad: the first call on cuda:", device,
                " allocates and zeroes its launch counters, which cannot happen under CUDA graph "
                "capture; run one call (a warm-up step) before capturing");
    void* p = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&p, kTicketSlots * sizeof(unsigned)));
    C10_CUDA_CHECK(cudaMemsetAsync(p, 0, kTicketSlots * sizeof(unsigned), stream));
    // Once per device and process: every later launch, on any stream, is
    // issued after this returns, so it finds the counters zeroed.
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    d.base = static_cast<unsigned*>(p);
  }
  auto it = d.slot.find(stream);
  if (it == d.slot.end()) {
    TORCH_CHECK(int(d.slot.size()) < kTicketSlots, "csd_loss_grad: more than ", kTicketSlots,
                " CUDA streams on cuda:", device, " have run it; its launch counters are per stream");
    it = d.slot.emplace(stream, int(d.slot.size())).first;
  }
  return d.base + it->second;
}

}  // namespace gpu
}  // namespace csd
