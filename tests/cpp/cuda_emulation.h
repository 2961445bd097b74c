// A strict emulation of the CUDA execution model on the host, enough to run
// csd_ext's kernels (csrc/cuda/*.cuh) unchanged on a machine without a GPU,
// and to fail where a GPU could fail.
//
// API (what kernels and launchers may use; everything else is internal)
// ----------------------------------------------------------------------
// Launch (host):
//   emu::launch(blocks, threads, kernel, args...)
//   emu::launch_cluster(blocks, threads, cluster_size, dynamic_smem_bytes, kernel, args...)
//       runs kernel(args...) over a 1-D grid; blocks % cluster_size == 0,
//       cluster_size <= 16, dynamic_smem_bytes <= 227 KiB (sm_90's opt-in limit).
// Kernels (device):
//   threadIdx, blockIdx, blockDim, gridDim            (.x; y and z are 0 / 1)
//   __shared__ T x;                                   per block (a thread_local of the block's host thread)
//   __syncthreads(), __syncwarp(mask = ~0u)
//   emu::dynamic_shared_memory()                      the block's dynamic shared memory (void*, 128-byte
//                                                     aligned, dynamic_smem_bytes long).  A macro for
//                                                     __shared__ cannot see a preceding `extern`, so kernels
//                                                     get it through a wrapper, e.g. in csd_cuda_async.h:
//                                                       #ifdef CSD_CUDA_EMULATION
//                                                       #define CSD_DYNAMIC_SMEM(T, name) T* const name =
//                                                           static_cast<T*>(::emu::dynamic_shared_memory())
//                                                       #else
//                                                       #define CSD_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
//                                                       #endif
//   emu::cp_async_16(smem_dst, gmem_src)              cp.async.cg.shared.global, 16 bytes, both 16-aligned
//   emu::cp_async_commit()                            cp.async.commit_group
//   emu::cp_async_wait<N>()                           cp.async.wait_group N
//   emu::cluster_rank(), emu::cluster_size()          %cluster_ctarank, %cluster_nctarank
//   emu::cluster_sync()                               barrier.cluster.arrive.release + wait.acquire
//   emu::cluster_map<T>(T* smem_ptr, unsigned rank)   mapa: the same variable in CTA `rank` of the cluster
//   cub::WarpReduce<T, 32>, cub::BlockReduce<T, N>    ::Reduce(input, op) only
//   atomicAdd(unsigned* / int*, v), __threadfence()   logical semantics (one fiber runs at a time)
//   CSD_CHECK_VECTOR_ALIGNMENT(ptr, bytes)            (used by csd_cuda_rows.h's vector loads and stores)
//
// How it runs
// -----------
// * Each block runs on a host thread of its own; its CUDA threads are fibers
//   (ucontext) on that host thread, so __shared__ (`thread_local` here) is
//   per block.  Only one fiber in the whole launch runs at a time, and which
//   one runs next is drawn from a seeded generator at every synchronisation
//   point (__syncthreads, __syncwarp, a CUB collective, cluster_sync,
//   cp_async_wait, a thread's exit): blocks and their threads interleave in a
//   random but reproducible order (a block runs a random subset of its
//   runnable threads, usually all, before the next block is drawn: a switch
//   between blocks is a hand-over between host threads).  Fibers switch with
//   a few instructions on x86-64 (ucontext elsewhere, or with
//   CSD_EMU_UCONTEXT).  Up to 4 blocks (CSD_EMU_RESIDENT_BLOCKS),
//   or one cluster if larger, are resident at once; blocks (clusters) start in
//   a random order.  The seed is drawn from std::random_device once per
//   process and printed (stderr) on the first launch; CSD_EMU_SEED=<n> fixes it.
// * Strictness (each is an abort that names the kernel, the block and the
//   thread, or a poison pattern that a wrong read picks up):
//   - a vector access or cp.async whose address is not a multiple of its size;
//   - CUB collectives have no trailing barrier (CUB has none): the result is
//     read by lane / thread 0 after every other participant has run on to its
//     next synchronisation point, then the TempStorage is overwritten with
//     poison (0xFF bytes: NaN); entering a collective on a TempStorage whose
//     previous collective lane 0 has not finished aborts ("reused without a
//     barrier").  Lanes other than 0 get a poisoned result, as CUB leaves it
//     undefined;
//   - dynamic shared memory starts as poison;
//   - cp.async: the destination is poisoned when the copy is issued, and the
//     data lands only when the issuing thread's cp_async_wait<N> retires its
//     group (so a read before the wait sees poison); __syncthreads does not
//     complete copies;
//   - clusters: the CTAs of a cluster are resident together and interleave;
//     cluster_map before the cluster's first cluster_sync aborts (CUDA
//     requires one so that every peer has started), as does mapping a peer
//     that has exited, and a CTA exiting while a peer mapped its shared
//     memory after the last cluster barrier (CUDA requires a cluster_sync
//     before exit).  An exited CTA's dynamic shared memory is poisoned.
//   - a deadlock (every live thread waiting at a barrier some thread cannot
//     reach) aborts.
// * A block's threads that return before a barrier are not waited for, as on
//   sm_70+ (csd's kernels only ever return whole groups).
// * csd::exp_fast, which is ex2.approx.ftz on a GPU, gets that instruction's
//   error bound rather than exp2f's near-exact result: each argument's result
//   is moved by a pseudo-random -2..+2 ulp (a fixed function of its bits, so
//   a run is reproducible and equal inputs give equal outputs), and results
//   below the smallest normal flush to 0.
// What this cannot catch: races between two synchronisation points of
// different threads (a fiber runs from one synchronisation point to the next
// without interruption), the memory model, static __shared__ memory not
// being poisoned at block start (a reused host thread keeps its previous
// block's values, as a GPU may), and anything about the real compiler's code
// generation; the GPU tests (python_tests/test_cuda.py) cover the rest.
#pragma once

#define CSD_CUDA_EMULATION 1

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <condition_variable>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CSD_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __align__(n) alignas(n)

// Fiber switches: a few instructions on x86-64 (callee-saved registers and
// the stack pointer; no signal mask, unlike swapcontext's two system calls
// per switch), ucontext elsewhere or with CSD_EMU_UCONTEXT.
#if defined(__x86_64__) && !defined(CSD_EMU_UCONTEXT)
#define CSD_EMU_ASM_SWITCH 1
// csd_emu_switch(&save_sp, next_sp): saves rbp, rbx, r12-r15 on the current
// stack, stores its stack pointer in save_sp, and resumes next_sp's.  Weak:
// the header may be in several translation units.
asm(R"(
  .pushsection .text
  .weak csd_emu_switch
  .type csd_emu_switch, @function
csd_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size csd_emu_switch, .-csd_emu_switch
  .popsection
)");
extern "C" void csd_emu_switch(void** save_sp, void* next_sp);
#endif

namespace emu {

#ifdef CSD_EMU_ASM_SWITCH
struct Context {
  void* sp = nullptr;
};
#else
using Context = ucontext_t;
#endif

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

constexpr int kWarpSize = 32;
constexpr size_t kMaxDynamicSmem = 232448;  // 227 KiB, sm_90's opt-in maximum per block
constexpr int kMaxClusterSize = 16;         // non-portable maximum (8 portable)
constexpr size_t kFiberStack = 256 * 1024;  // reserved, not committed (MAP_NORESERVE)
constexpr unsigned char kPoison = 0xFF;     // NaN in every float format

struct Block;
struct Worker;
struct Launch;

// A host thread's turn: a flag behind a mutex and a condition variable, so a
// waiting thread sleeps (libstdc++'s semaphores spin on sched_yield first,
// which a loaded machine pays for).
class Turn {
 public:
  void give() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_ = true;
    }
    cv_.notify_one();
  }
  void take() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return ready_; });
    ready_ = false;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool ready_ = false;
};

struct AsyncCopy {
  void* dst;
  unsigned char data[16];
};

struct Fiber {
  Context ctx;
  void* stack = nullptr;  // lowest usable address
  Block* block = nullptr;
  int tid = 0;
  bool done = false;
  std::vector<AsyncCopy> open_group;
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first (few: a deque would allocate per fiber)
#ifdef CSD_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// A barrier whose expected count drops as its threads exit.
struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::vector<Fiber*> waiters;
  Fiber* last = nullptr;  // if set, released after everyone else has run on (CUB's lane 0)
  int64_t* generation = nullptr;  // if set, counts the completions (cluster barriers)
};

struct Cluster {
  int64_t index = 0;
  std::vector<Block*> ctas;
  Barrier barrier;
  int64_t generation = 0;  // cluster barriers completed
  int exited = 0;
};

struct Block {
  int64_t index = 0;
  unsigned rank = 0;  // in its cluster
  Cluster* cluster = nullptr;
  Worker* worker = nullptr;
  std::vector<Fiber> fibers;
  int live = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<int> warp_live;
  std::vector<Fiber*> runnable, deferred;
  std::unordered_map<const void*, int> busy_storage;  // TempStorage -> collectives whose lane 0 has not read it
  unsigned char* dynamic_smem = nullptr;
  int64_t mapped_by_peer_at = -1;  // the latest cluster generation in which a peer mapped this CTA
  bool exited = false;
};

struct Worker {
  Launch* launch = nullptr;
  int id = 0;
  std::thread thread;
  Turn wake;
  Context ctx;
  Block* block = nullptr;
  unsigned char* tls_anchor = nullptr;  // this host thread's copy of emu::tls_anchor
#ifdef CSD_EMU_ASAN
  void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;
#endif
};

inline thread_local unsigned char tls_anchor;  // locates this thread's __shared__ (thread_local) variables
inline thread_local Fiber* current_fiber = nullptr;

// ---------------------------------------------------------------- errors ---

inline uint64_t& process_seed() {
  static uint64_t seed = [] {
    uint64_t s;
    if (const char* env = std::getenv("CSD_EMU_SEED")) {
      s = std::strtoull(env, nullptr, 0);
    } else {
      std::random_device rd;
      s = (uint64_t(rd()) << 32) ^ rd();
    }
    std::fprintf(stderr, "cuda_emulation: seed %llu (CSD_EMU_SEED=%llu reproduces this run's schedules)\n",
                 (unsigned long long)s, (unsigned long long)s);
    return s;
  }();
  return seed;
}

inline const char*& current_kernel_name() {
  static const char* name = "?";
  return name;
}

[[noreturn]] inline void fail(const char* fmt, const std::string& detail) {
  std::string where = "cuda_emulation: ";
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, detail.c_str());
  where += buf;
  where += "\n  in kernel ";
  where += current_kernel_name();
  if (Fiber* f = current_fiber) {
    std::snprintf(buf, sizeof buf, ", block %lld, thread %d", (long long)f->block->index, f->tid);
    where += buf;
  }
  std::snprintf(buf, sizeof buf, "\n  (CSD_EMU_SEED=%llu reproduces the schedule)\n",
                (unsigned long long)process_seed());
  where += buf;
  std::fputs(where.c_str(), stderr);
  std::fflush(stderr);
  std::abort();
}

inline std::string address_text(const void* p, size_t bytes) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%p (a %zu-byte access)", p, bytes);
  return buf;
}

inline void check_alignment(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail((std::string("misaligned ") + what + " at %s").c_str(), address_text(p, bytes));
  }
}

inline void poison(void* p, size_t bytes) { std::memset(p, kPoison, bytes); }

// ------------------------------------------------------------ scheduling ---

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct StackPool {
  std::mutex mu;
  std::vector<void*> free;
  static StackPool& get() {
    static StackPool* pool = new StackPool;  // never destroyed: stacks outlive static destructors
    return *pool;
  }
  void* take() {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!free.empty()) {
        void* s = free.back();
        free.pop_back();
        return s;
      }
    }
    const size_t page = 4096;
    void* m = mmap(nullptr, kFiberStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) fail("%s", "cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults
    return static_cast<char*>(m) + page;
  }
  void give(void* s) {
    std::lock_guard<std::mutex> lock(mu);
    free.push_back(s);
  }
};

struct Launch {
  int64_t blocks = 0;
  int threads = 0;
  int cluster_size = 1;
  size_t dynamic_smem = 0;
  std::function<void()> body;
  uint64_t rng = 0;
  std::vector<int64_t> order;  // clusters, in start order
  size_t next_cluster = 0;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::unique_ptr<Cluster>> slots;  // resident clusters, by worker group (null: free)
  std::vector<Block*> resident;
  Turn finished;
  std::unique_ptr<std::latch> started;  // every worker has recorded its tls_anchor
  bool done = false;

  uint64_t draw(uint64_t n) { return n <= 1 ? 0 : splitmix(rng) % n; }
};

[[noreturn]] inline void fiber_entry_fail() { fail("%s", "fiber returned"); }

// Switches from a worker's host context into fiber f, until f yields.
inline void run_fiber(Worker& w, Fiber& f) {
  current_fiber = &f;
#ifdef CSD_EMU_ASAN
  __sanitizer_start_switch_fiber(&w.fake_stack, f.stack, kFiberStack);
#endif
#ifdef CSD_EMU_ASM_SWITCH
  csd_emu_switch(&w.ctx.sp, f.ctx.sp);
#else
  swapcontext(&w.ctx, &f.ctx);
#endif
#ifdef CSD_EMU_ASAN
  __sanitizer_finish_switch_fiber(w.fake_stack, nullptr, nullptr);
#endif
  current_fiber = nullptr;
}

// From the running fiber back to its worker; returns when scheduled again.
inline void yield_to_worker() {
  Fiber& f = *current_fiber;
  Worker& w = *f.block->worker;
#ifdef CSD_EMU_ASAN
  __sanitizer_start_switch_fiber(f.done ? nullptr : &f.fake_stack, w.stack_bottom, w.stack_size);
#endif
#ifdef CSD_EMU_ASM_SWITCH
  csd_emu_switch(&f.ctx.sp, w.ctx.sp);
#else
  swapcontext(&f.ctx, &w.ctx);
#endif
#ifdef CSD_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

inline void make_runnable(Fiber* f) { f->block->runnable.push_back(f); }

inline void release(Barrier& b) {
  for (Fiber* f : b.waiters) {
    if (f == b.last) {
      f->block->deferred.push_back(f);
    } else {
      make_runnable(f);
    }
  }
  b.waiters.clear();
  b.arrived = 0;
  b.last = nullptr;
  if (b.generation) ++*b.generation;
}

// The running fiber waits at b until every live thread of b has arrived.
// `last`: the fiber to resume after all the others (CUB's lane 0).
inline bool arrive_and_wait(Barrier& b, Fiber* last = nullptr) {
  Fiber* f = current_fiber;
  b.waiters.push_back(f);
  if (last) b.last = last;
  const bool completes = ++b.arrived == b.expected;
  if (completes) release(b);
  yield_to_worker();
  return completes;
}

inline void drop(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) release(b);
}

inline void fiber_exit() {
  Fiber& f = *current_fiber;
  Block& blk = *f.block;
  f.done = true;
  f.open_group.clear();
  f.committed.clear();
  --blk.live;
  --blk.warp_live[size_t(f.tid / kWarpSize)];
  drop(blk.block_barrier);
  drop(blk.warp_barriers[size_t(f.tid / kWarpSize)]);
  drop(blk.cluster->barrier);
  yield_to_worker();
  fiber_entry_fail();
}

inline void fiber_main() {
#ifdef CSD_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Fiber& f = *current_fiber;
  Launch& l = *f.block->worker->launch;
  l.body();
  fiber_exit();
}

// Out of line: getcontext returns twice, which -Wclobbered dislikes in a loop.
[[gnu::noinline]] inline void init_fiber(Fiber& f, Block* b, int tid) {
  f.block = b;
  f.tid = tid;
  f.stack = StackPool::get().take();
#ifdef CSD_EMU_ASAN
  // The stack's previous fiber never returned from its frames: clear their redzones.
  __asan_unpoison_memory_region(f.stack, kFiberStack);
#endif
#ifdef CSD_EMU_ASM_SWITCH
  // As if fiber_main had been called (the return address slot 16-byte
  // aligned + 8) and had then switched out with six callee-saved registers.
  auto* sp = reinterpret_cast<uintptr_t*>(static_cast<char*>(f.stack) + kFiberStack);
  *--sp = 0;                                          // fiber_main's return address: none
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);  // csd_emu_switch returns into it
  for (int i = 0; i < 6; ++i) *--sp = 0;             // rbp, rbx, r12-r15
  f.ctx.sp = sp;
  return;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
}

inline void start_cluster(Launch& l, size_t slot, int64_t cluster_index) {
  auto c = std::make_unique<Cluster>();
  c->index = cluster_index;
  c->barrier.generation = &c->generation;
  const int warps = (l.threads + kWarpSize - 1) / kWarpSize;
  for (int r = 0; r < l.cluster_size; ++r) {
    Worker& w = *l.workers[slot * size_t(l.cluster_size) + size_t(r)];
    Block* b = new Block;
    b->index = cluster_index * l.cluster_size + r;
    b->rank = unsigned(r);
    b->cluster = c.get();
    b->worker = &w;
    b->live = l.threads;
    b->block_barrier.expected = l.threads;
    b->warp_barriers.resize(size_t(warps));
    b->warp_live.resize(size_t(warps));
    for (int t = 0; t < l.threads; ++t) {
      ++b->warp_barriers[size_t(t / kWarpSize)].expected;
      ++b->warp_live[size_t(t / kWarpSize)];
    }
    if (l.dynamic_smem > 0) {
      b->dynamic_smem = static_cast<unsigned char*>(std::aligned_alloc(128, (l.dynamic_smem + 127) / 128 * 128));
      poison(b->dynamic_smem, l.dynamic_smem);
    }
    b->fibers = std::vector<Fiber>(size_t(l.threads));
    for (int t = 0; t < l.threads; ++t) {
      init_fiber(b->fibers[size_t(t)], b, t);
      b->runnable.push_back(&b->fibers[size_t(t)]);
    }
    c->barrier.expected += l.threads;
    c->ctas.push_back(b);
    w.block = b;
    l.resident.push_back(b);
  }
  l.slots[slot] = std::move(c);
}

inline void finish_block(Launch& l, Block& b) {
  b.exited = true;
  Cluster& c = *b.cluster;
  if (c.ctas.size() > 1 && b.mapped_by_peer_at >= c.generation) {
    fail("%s", "CTA rank " + std::to_string(b.rank) + " of cluster " + std::to_string(c.index) +
                   " exited while a peer that mapped its shared memory (cluster_map) after the last cluster "
                   "barrier may still read it: CUDA requires a cluster_sync() before exit");
  }
  if (b.dynamic_smem) poison(b.dynamic_smem, l.dynamic_smem);
  l.resident.erase(std::find(l.resident.begin(), l.resident.end(), &b));
  if (++c.exited < int(c.ctas.size())) return;
  // The whole cluster has exited: free its slot and start the next cluster there.
  size_t slot = 0;
  while (l.slots[slot].get() != &c) ++slot;
  for (Block* cta : c.ctas) {
    for (Fiber& f : cta->fibers) StackPool::get().give(f.stack);
    std::free(cta->dynamic_smem);
    cta->worker->block = nullptr;
    delete cta;
  }
  l.slots[slot].reset();
  if (l.next_cluster < l.order.size()) start_cluster(l, slot, l.order[l.next_cluster++]);
}

// Runs some of the worker's block's runnable threads, in a random order,
// each up to its next synchronisation point: all of them three times in
// four, else a random number (a switch to another block costs a hand-over
// between host threads, so most slices are whole).
inline void run_slice(Launch& l, Worker& w) {
  Block& b = *w.block;
  const size_t ready = b.runnable.size() + b.deferred.size();
  size_t budget = l.draw(4) != 0 ? ready : 1 + l.draw(ready);
  while (budget-- > 0) {
    if (b.runnable.empty()) {
      if (b.deferred.empty()) break;
      b.runnable.swap(b.deferred);
    }
    const size_t i = l.draw(b.runnable.size());
    Fiber* f = b.runnable[i];
    b.runnable[i] = b.runnable.back();
    b.runnable.pop_back();
    run_fiber(w, *f);
  }
  if (b.live == 0) finish_block(l, b);
}

inline Worker* pick_next(Launch& l) {
  std::vector<Block*> ready;
  for (Block* b : l.resident) {
    if (!b->runnable.empty() || !b->deferred.empty()) ready.push_back(b);
  }
  if (ready.empty()) {
    if (!l.resident.empty()) {
      Block& b = *l.resident.front();
      fail("%s", "deadlock: every live thread of block " + std::to_string(b.index) +
                     " (and of the other resident blocks) waits at a barrier that not all can reach");
    }
    return nullptr;
  }
  return ready[l.draw(ready.size())]->worker;
}

inline void worker_main(Worker* w) {
  w->tls_anchor = &tls_anchor;
  w->launch->started->count_down();
#ifdef CSD_EMU_ASAN
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &w->stack_bottom, &w->stack_size);
  pthread_attr_destroy(&attr);
#endif
  Launch& l = *w->launch;
  for (;;) {
    w->wake.take();
    for (;;) {
      if (l.done) return;
      run_slice(l, *w);
      Worker* next = pick_next(l);
      if (next == nullptr) {
        l.done = true;
        l.finished.give();
        break;
      }
      if (next == w) continue;
      next->wake.give();
      break;
    }
  }
}

inline std::string symbol_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
    return s;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "at %p", fn);
  return buf;
}

inline std::mutex& launch_mutex() {
  static std::mutex mu;
  return mu;
}

inline uint64_t next_launch_seed() {
  static uint64_t counter = 0;
  uint64_t s = process_seed() ^ (0xD1B54A32D192ED03ull * ++counter);
  return splitmix(s);
}

inline int resident_blocks() {
  static const int n = [] {
    const char* env = std::getenv("CSD_EMU_RESIDENT_BLOCKS");
    const int v = env ? std::atoi(env) : 4;
    return v > 0 ? v : 4;
  }();
  return n;
}

template <typename Kernel, typename... Args>
void launch_cluster(int64_t blocks, int threads, int cluster_size, size_t dynamic_smem_bytes, Kernel kernel,
                    const Args&... args) {
  std::lock_guard<std::mutex> serial(launch_mutex());  // one launch at a time per process
  static thread_local std::string name;
  if constexpr (std::is_pointer_v<Kernel>) {
    name = symbol_name(reinterpret_cast<const void*>(kernel));
  } else {
    name = typeid(Kernel).name();
  }
  current_kernel_name() = name.c_str();
  if (threads <= 0 || threads > 1024) fail("%s", "block size " + std::to_string(threads) + " outside 1..1024");
  if (cluster_size < 1 || cluster_size > kMaxClusterSize || blocks % cluster_size != 0) {
    fail("%s", "cluster size " + std::to_string(cluster_size) + " must be in 1..16 and divide the grid (" +
                   std::to_string(blocks) + " blocks)");
  }
  if (dynamic_smem_bytes > kMaxDynamicSmem) {
    fail("%s", std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory exceed 227 KiB");
  }
  if (blocks <= 0) return;
  Launch l;
  l.blocks = blocks;
  l.threads = threads;
  l.cluster_size = cluster_size;
  l.dynamic_smem = dynamic_smem_bytes;
  l.body = [&] { kernel(args...); };
  l.rng = next_launch_seed();
  const int64_t clusters = blocks / cluster_size;
  l.order.resize(size_t(clusters));
  for (int64_t i = 0; i < clusters; ++i) l.order[size_t(i)] = i;
  for (int64_t i = clusters - 1; i > 0; --i) std::swap(l.order[size_t(i)], l.order[l.draw(uint64_t(i + 1))]);
  const int slots = int(std::min<int64_t>(clusters, std::max(1, resident_blocks() / cluster_size)));
  l.slots.resize(size_t(slots));
  for (int i = 0; i < slots * cluster_size; ++i) {
    auto w = std::make_unique<Worker>();
    w->launch = &l;
    w->id = i;
    l.workers.push_back(std::move(w));
  }
  for (int s = 0; s < slots; ++s) start_cluster(l, size_t(s), l.order[l.next_cluster++]);
  l.started = std::make_unique<std::latch>(std::ptrdiff_t(l.workers.size()));
  for (auto& w : l.workers) w->thread = std::thread(worker_main, w.get());
  l.started->wait();  // every tls_anchor is set before the first slice runs (cluster_map reads them)
  Worker* first = pick_next(l);
  first->wake.give();
  l.finished.take();
  for (auto& w : l.workers) w->wake.give();
  for (auto& w : l.workers) w->thread.join();
  current_kernel_name() = "?";
}

template <typename Kernel, typename... Args>
void launch(int64_t blocks, int threads, Kernel kernel, const Args&... args) {
  launch_cluster(blocks, threads, 1, 0, kernel, args...);
}

// --------------------------------------------------------- device side ---

inline Fiber& self() {
  Fiber* f = current_fiber;
  if (f == nullptr) fail("%s", "a device function called outside a kernel");
  return *f;
}

inline void syncthreads() { arrive_and_wait(self().block->block_barrier); }

inline void syncwarp() {
  Fiber& f = self();
  arrive_and_wait(f.block->warp_barriers[size_t(f.tid / kWarpSize)]);
}

inline void* dynamic_shared_memory() {
  Block& b = *self().block;
  if (b.dynamic_smem == nullptr) fail("%s", "dynamic shared memory used by a kernel launched with 0 bytes of it");
  return b.dynamic_smem;
}

inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  Fiber& f = self();
  check_alignment(smem_dst, 16, "cp.async destination");
  check_alignment(gmem_src, 16, "cp.async source");
  AsyncCopy c;
  c.dst = smem_dst;
  std::memcpy(c.data, gmem_src, 16);
  poison(smem_dst, 16);  // invisible until the wait
  f.open_group.push_back(c);
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait_n(int n) {
  Fiber& f = self();
  while (int(f.committed.size()) > n) {
    for (const AsyncCopy& c : f.committed.front()) std::memcpy(c.dst, c.data, 16);
    f.committed.erase(f.committed.begin());
  }
  // A scheduling point: the thread stays runnable.
  make_runnable(&f);
  yield_to_worker();
}

template <int N>
void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group N with N >= 0");
  cp_async_wait_n(N);
}

inline unsigned cluster_rank() { return self().block->rank; }
inline unsigned cluster_size() { return unsigned(self().block->cluster->ctas.size()); }

inline void cluster_sync() { arrive_and_wait(self().block->cluster->barrier); }

template <class T>
T* cluster_map(T* smem_ptr, unsigned rank) {
  Block& me = *self().block;
  Cluster& c = *me.cluster;
  if (rank >= c.ctas.size()) {
    fail("%s", "cluster_map to rank " + std::to_string(rank) + " of a cluster of " + std::to_string(c.ctas.size()));
  }
  if (c.generation == 0 && c.ctas.size() > 1) {
    fail("%s", "cluster_map before the cluster's first cluster_sync(): a peer may not have started (CUDA "
               "requires a cluster barrier before any access to distributed shared memory)");
  }
  Block& peer = *c.ctas[rank];
  if (&peer == &me) return smem_ptr;
  if (peer.exited) {
    fail("%s", "cluster_map of CTA rank " + std::to_string(rank) + ", which has exited: CUDA requires a cluster_sync() before exit while a peer may still read a "
                   "CTA's shared memory");
  }
  peer.mapped_by_peer_at = std::max(peer.mapped_by_peer_at, c.generation);
  auto* p = reinterpret_cast<unsigned char*>(const_cast<std::remove_cv_t<T>*>(smem_ptr));
  if (me.dynamic_smem && p >= me.dynamic_smem && p < me.dynamic_smem + me.worker->launch->dynamic_smem) {
    return reinterpret_cast<T*>(peer.dynamic_smem + (p - me.dynamic_smem));
  }
  // A static __shared__ variable: a thread_local at the same offset in the peer's host thread.
  const std::ptrdiff_t offset = p - me.worker->tls_anchor;
  if (offset < -(std::ptrdiff_t(1) << 24) || offset > (std::ptrdiff_t(1) << 24)) {
    fail("%s", "cluster_map of " + address_text(p, sizeof(T)) + ", which is not shared memory");
  }
  return reinterpret_cast<T*>(peer.worker->tls_anchor + offset);
}

// Bytes of T set to the poison pattern (NaN in every float field).
template <typename T>
T poisoned() {
  static_assert(std::is_trivially_copyable_v<T>, "collectives over trivially copyable types");
  T out;
  poison(&out, sizeof out);
  return out;
}

// CUB's warp shuffle tree over 32 values: after offsets 1, 2, 4, 8, 16, lane 0
// holds op(...(op(v0, v1), op(v2, v3))...).
template <typename T, typename Op>
T warp_tree(T* v, Op op) {
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    for (int lane = 0; lane + offset < kWarpSize; lane += 2 * offset) v[lane] = op(v[lane], v[lane + offset]);
  }
  return v[0];
}

// Marks a TempStorage in use from a collective's barrier until lane 0 has
// read it; a collective entered on it meanwhile is a reuse without a barrier.
inline void enter_collective(const void* storage, const char* what) {
  Block& b = *self().block;
  auto it = b.busy_storage.find(storage);
  if (it != b.busy_storage.end() && it->second > 0) {
    char at[32];
    std::snprintf(at, sizeof at, "%p", storage);
    fail("%s", std::string(what) + " TempStorage at " + at + " reused before the previous collective on it finished: a __syncthreads() (or "
                   "__syncwarp() for a WarpReduce) is missing between the two");
  }
}

// 2^a as ex2.approx.ftz.f32 may return it: within 2 ulp (CUDA documents 2
// ulp for exp2f, which is this instruction), subnormal results flushed to 0.
inline float ex2_approx_model(float a) {
  float y = std::exp2(a);
  if (std::isnan(y) || std::isinf(y)) return y;
  if (y < FLT_MIN) return 0.0f;  // ftz
  uint32_t abits, ybits;
  std::memcpy(&abits, &a, sizeof abits);
  std::memcpy(&ybits, &y, sizeof ybits);
  ybits += uint32_t(int(((abits * 2654435761u) >> 16) % 5u) - 2);  // -2..+2 ulp
  std::memcpy(&y, &ybits, sizeof y);
  return y >= FLT_MIN ? y : 0.0f;
}

}  // namespace emu

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::syncwarp(); }
// Device-scope atomics and fences, with their logical semantics: one fiber
// of the launch runs at a time, so an atomic read-modify-write is never torn
// and every store is visible to the next fiber (the hand-over between host
// threads orders memory); the fence is a sequentially consistent one.  What
// a weaker GPU memory model could reorder is not emulated (see the top).
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#define CSD_EX2_APPROX_MODEL ::emu::ex2_approx_model

// Vector accesses in csd_cuda_rows.h: a GPU faults on a misaligned one.
#define CSD_CHECK_VECTOR_ALIGNMENT(ptr, bytes) ::emu::check_alignment((ptr), (bytes), "vector access")

#define threadIdx (::emu::Dim3{unsigned(::emu::self().tid), 0, 0})
#define blockIdx (::emu::Dim3{unsigned(::emu::self().block->index), 0, 0})
#define blockDim (::emu::Dim3{unsigned(::emu::self().block->worker->launch->threads), 1, 1})
#define gridDim (::emu::Dim3{unsigned(::emu::self().block->worker->launch->blocks), 1, 1})

namespace cub {

template <typename T, int kLogicalWarpThreads>
class WarpReduce {
  static_assert(kLogicalWarpThreads == 32, "the emulation covers full warps only");

 public:
  struct TempStorage {
    T values[32];
  };
  explicit WarpReduce(TempStorage& storage) : storage_(storage) {}

  // Each lane stores its value and meets its warp; lane 0 resumes after the
  // others have run on, reduces, and poisons the storage.
  template <typename Op>
  T Reduce(T input, Op op) {
    ::emu::Fiber& f = ::emu::self();
    ::emu::Block& b = *f.block;
    const int lane = f.tid % 32;
    const int warp = f.tid / 32;
    ::emu::enter_collective(&storage_, "cub::WarpReduce");
    storage_.values[lane] = input;
    ::emu::Fiber* lane0 = &b.fibers[size_t(warp * 32)];
    ::emu::Barrier& sync = b.warp_barriers[size_t(warp)];
    if (sync.arrived + 1 == sync.expected) ++b.busy_storage[&storage_];  // the last to arrive
    if (lane == 0) {
      ::emu::arrive_and_wait(sync, lane0);
      T copy[32];
      for (int i = 0; i < 32; ++i) copy[i] = storage_.values[i];
      const T out = ::emu::warp_tree(copy, op);
      ::emu::poison(&storage_, sizeof storage_);
      --b.busy_storage[&storage_];
      return out;
    }
    ::emu::arrive_and_wait(sync, lane0->done ? nullptr : lane0);
    return ::emu::poisoned<T>();
  }

 private:
  TempStorage& storage_;
};

// BLOCK_REDUCE_WARP_REDUCTIONS, CUB's default: each warp reduces its own
// values, then thread 0 folds the warp aggregates in warp order.
template <typename T, int kBlockThreads>
class BlockReduce {
  static_assert(kBlockThreads % 32 == 0, "whole warps");

 public:
  struct TempStorage {
    T values[kBlockThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    ::emu::Fiber& f = ::emu::self();
    ::emu::Block& b = *f.block;
    const int tid = f.tid;
    ::emu::enter_collective(&storage_, "cub::BlockReduce");
    storage_.values[tid] = input;
    ::emu::Fiber* thread0 = &b.fibers[0];
    if (b.block_barrier.arrived + 1 == b.block_barrier.expected) ++b.busy_storage[&storage_];
    if (tid == 0) {
      ::emu::arrive_and_wait(b.block_barrier, thread0);
      T aggregate{};
      for (int w = 0; w < kBlockThreads / 32; ++w) {
        T copy[32];
        for (int i = 0; i < 32; ++i) copy[i] = storage_.values[w * 32 + i];
        const T warp = ::emu::warp_tree(copy, op);
        aggregate = w == 0 ? warp : op(aggregate, warp);
      }
      ::emu::poison(&storage_, sizeof storage_);
      --b.busy_storage[&storage_];
      return aggregate;
    }
    ::emu::arrive_and_wait(b.block_barrier, thread0->done ? nullptr : thread0);
    return ::emu::poisoned<T>();
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
