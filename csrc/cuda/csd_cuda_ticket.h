// The ticket counters of csd_loss_grad's one-launch reduction
// (csd_cuda_fused_kernel.cuh): each launch's CTAs count themselves on a
// device counter, and the last one resets it to 0, so the next launch finds
// it zeroed without a memset launch (and a CUDA graph can capture the call).
//
// Counters are per (device, stream): launches on one stream run one after
// another, so they never share a counter at once; launches on different
// streams get different counters.  A counter is a slot of a buffer
// allocated and zeroed once per device, at the first call there -- which
// must therefore not be under stream capture (a warm-up call before
// capturing, as torch.cuda.graph asks for anyway; the call raises
// otherwise).  A captured graph keeps its capture stream's counter: it must
// not replay while a csd_loss_grad launch on that stream is running (a graph
// already never runs concurrently with itself).  The buffer lives for the
// process (4 KiB per device).
#pragma once

#include <cuda_runtime_api.h>

namespace csd {
namespace gpu {

constexpr int kTicketSlots = 1024;  // streams per device

// A zeroed counter for launches on `stream` of the current device.
unsigned* launch_ticket(cudaStream_t stream);

}  // namespace gpu
}  // namespace csd
