// Device primitives of the fused kernel (csd_cuda_fused_kernel.cuh):
// asynchronous global->shared copies, thread-block clusters and distributed
// shared memory, and the block's dynamic shared memory.
//
// On a GPU they are inline PTX or cooperative_groups; under
// CSD_CUDA_EMULATION (tests/cpp/cuda_emulation.h, the CPU emulation of the
// CUDA execution model) each forwards to ::emu::<same name>, which models
// their logical semantics (what a thread may read when), so the emulated
// test suite runs the kernel's own code.
//
//   cp_async_16(dst, src)   copy 16 bytes global -> shared, asynchronously
//                           (cp.async.cg: bypasses L1, lands in shared only);
//                           both addresses 16-byte aligned
//   cp_async_commit()       close the calling thread's current group of copies
//   cp_async_wait<N>()      wait until at most N of the calling thread's
//                           committed groups are still in flight; the bytes of
//                           the finished groups are then visible to that
//                           thread (other threads need a barrier as well)
//   cluster_rank()          rank of this block in its cluster, 0..size-1
//   cluster_size()          blocks per cluster (1 without a cluster launch)
//   cluster_sync()          barrier of every thread of every block of the
//                           cluster, with release/acquire ordering at cluster
//                           scope: shared-memory writes before it are visible
//                           to every block of the cluster after it
//   cluster_map(p, rank)    the address of the shared variable *p in block
//                           `rank` of the cluster (distributed shared memory)
//   dynamic_smem()          the block's dynamic shared memory (16-byte aligned)
//
// Clusters and distributed shared memory exist from sm_90 on; cp.async from
// sm_80.  On older architectures the cluster functions degrade to a cluster
// of one block and cp_async_16 to a plain copy, so the header compiles for
// every arch in the build list; the fused kernel is only launched on sm_90+.
#pragma once

#include <cstdint>

#if defined(CSD_CUDA_EMULATION)
// cuda_emulation.h (included first) defines ::emu::cp_async_16 & co.
#elif defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

namespace csd {

#if defined(CSD_CUDA_EMULATION)

inline void cp_async_16(void* smem_dst, const void* gmem_src) { ::emu::cp_async_16(smem_dst, gmem_src); }
inline void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() { ::emu::cp_async_wait<N>(); }
inline unsigned cluster_rank() { return ::emu::cluster_rank(); }
inline unsigned cluster_size() { return ::emu::cluster_size(); }
inline void cluster_sync() { ::emu::cluster_sync(); }
template <class T>
inline T* cluster_map(T* smem_ptr, unsigned rank) { return ::emu::cluster_map(smem_ptr, rank); }
inline unsigned char* dynamic_smem() { return static_cast<unsigned char*>(::emu::dynamic_shared_memory()); }

#elif defined(__CUDACC__)

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0u;
#endif
}

__device__ __forceinline__ unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1u;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

template <class T>
__device__ __forceinline__ T* cluster_map(T* smem_ptr, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(smem_ptr, rank);
#else
  (void)rank;
  return smem_ptr;
#endif
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char csd_dynamic_smem[];
  return csd_dynamic_smem;
}

#endif

}  // namespace csd
