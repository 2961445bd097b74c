// The strict CUDA emulation (cuda_emulation.h) on small kernels of its own:
// per-block shared memory, interleaved blocks, clusters with distributed
// shared memory, asynchronous copies, CUB collectives without a trailing
// barrier, and misaligned vector accesses.
//
//   test_emulation_strict                 correct kernels: every check passes.
//   test_emulation_strict --planted <bug>
//       runs a kernel with one bug planted (the kernels are templates on
//       kPlanted; the bugs exist only in this test binary) in a child
//       process, and passes only if the emulation catches the bug (an abort
//       naming it, or the poison it reads), printing the emulation's report:
//         tempstorage_reuse   a cub::BlockReduce TempStorage reused without __syncthreads
//         misaligned_load     a 16-byte load (csd_cuda_rows.h's load_vec) at a misaligned address
//         cluster_barrier     distributed shared memory read with the final cluster_sync missing
//         async_before_wait   a cp.async destination read before its cp_async_wait
// ctest runs each (planted_bug_<bug>_is_caught, tests/cpp/CMakeLists.txt).
#include "cuda_emulation.h"  // first: the CUDA keywords, cub:: and the alignment check

#include "../../csrc/cuda/csd_cuda_rows.h"  // load_vec, with CSD_CHECK_VECTOR_ALIGNMENT on

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "check.h"

// The kernels are in a named namespace so that the emulation's messages can
// name them (dladdr finds exported symbols only).
namespace strict_test {

constexpr int kThreads = 128;

struct Sum {
  template <typename T>
  T operator()(T a, T b) const { return a + b; }
};

// ---- per-block shared memory and interleaving ------------------------------

struct Trace {
  int* owner;             // [blocks]: the block index each block read back from its __shared__ slot
  std::vector<int>* log;  // block index at each thread's start, in execution order
};

__global__ void shared_is_per_block(const Trace t) {
  __shared__ int mine;
  if (threadIdx.x == 0) mine = int(blockIdx.x);
  t.log->push_back(int(blockIdx.x));
  __syncthreads();
  if (threadIdx.x == kThreads - 1) t.owner[blockIdx.x] = mine;
}

TEST_CASE(shared_memory_is_per_block_and_blocks_interleave) {
  const int blocks = 16;
  std::vector<int> owner(blocks, -1), log;
  emu::launch(blocks, kThreads, shared_is_per_block, Trace{owner.data(), &log});
  for (int b = 0; b < blocks; ++b) CHECK(owner[size_t(b)] == b);
  // Interleaved: some block starts threads before another block's threads have all started.
  // One launch runs most blocks' starts in one slice (3 slices in 4 are whole), so a single
  // launch can show as few switches as blocks run in turn (~6% of seeds would fail a check of
  // one launch); summed over 17 seeded launches the check cannot fail by chance (> 7 sd).
  auto switches_of = [](const std::vector<int>& l) {
    int n = 0;
    for (size_t i = 1; i < l.size(); ++i) n += l[i] != l[i - 1];
    return n;
  };
  int switches = switches_of(log);
  // Random order: the first block to run is not always block 0 (16 launches).
  std::set<int> firsts;
  for (int i = 0; i < 16; ++i) {
    log.clear();
    emu::launch(blocks, kThreads, shared_is_per_block, Trace{owner.data(), &log});
    firsts.insert(log.front());
    switches += switches_of(log);
  }
  CHECK(switches > blocks * 17);
  CHECK(firsts.size() > 1);
}

// ---- CUB collectives: no trailing barrier ----------------------------------

template <bool kPlanted>
__global__ void two_block_reductions(float* out) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const float a = BlockReduce(tmp).Reduce(float(threadIdx.x), Sum{});
  if (!kPlanted) __syncthreads();  // CUB: a barrier before the TempStorage is reused
  const float b = BlockReduce(tmp).Reduce(1.0f, Sum{});
  if (threadIdx.x == 0) out[blockIdx.x] = a + b;
}

template <bool kPlanted>
void run_two_block_reductions() {
  std::vector<float> out(4, 0.0f);
  emu::launch(4, kThreads, two_block_reductions<kPlanted>, out.data());
  for (float v : out) {
    if (v != float(kThreads * (kThreads - 1) / 2 + kThreads)) {
      std::fprintf(stderr, "planted bug visible: wrong reduction %g\n", double(v));
      std::exit(3);
    }
  }
}

TEST_CASE(block_reduce_reused_after_a_barrier) { run_two_block_reductions<false>(); }

// ---- vector alignment --------------------------------------------------------

__global__ void vector_sum(const float* in, int offset, float* out) {
  const auto v = csd::gpu::load_vec<4>(in + offset + 4 * int(threadIdx.x));
  out[threadIdx.x] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}

void run_vector_sum(int offset) {
  alignas(16) static float in[4 * 32 + 8];
  static float out[32];
  for (int i = 0; i < 4 * 32 + 8; ++i) in[i] = float(i);
  emu::launch(1, 32, vector_sum, static_cast<const float*>(in), offset, static_cast<float*>(out));
  CHECK(out[1] == float(4 + offset) * 4 + 6);
}

TEST_CASE(aligned_vector_loads) { run_vector_sum(4); }

// ---- clusters and distributed shared memory --------------------------------

constexpr int kCluster = 4;

// Each CTA sums its slice into __shared__; after a cluster barrier, rank 0
// adds its peers' sums through distributed shared memory; a second barrier
// keeps the peers alive until rank 0 has read them.
template <bool kPlanted>
__global__ void cluster_sum(const float* in, float* out) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float partial;
  const float s = BlockReduce(tmp).Reduce(in[blockIdx.x * kThreads + threadIdx.x], Sum{});
  if (threadIdx.x == 0) partial = s;
  emu::cluster_sync();  // partial written, and every CTA of the cluster started
  if (emu::cluster_rank() == 0 && threadIdx.x == 0) {
    float total = 0.0f;
    for (unsigned r = 0; r < emu::cluster_size(); ++r) total += *emu::cluster_map(&partial, r);
    out[blockIdx.x / kCluster] = total;
  }
  if (!kPlanted) emu::cluster_sync();  // no CTA exits while rank 0 may still read its shared memory
}

template <bool kPlanted>
void run_cluster_sum() {
  const int clusters = 3, blocks = clusters * kCluster;
  std::vector<float> in(size_t(blocks * kThreads)), out(clusters, 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7);
  emu::launch_cluster(blocks, kThreads, kCluster, 0, cluster_sum<kPlanted>, static_cast<const float*>(in.data()),
                      out.data());
  for (int c = 0; c < clusters; ++c) {
    double want = 0;
    for (int i = 0; i < kCluster * kThreads; ++i) want += in[size_t(c * kCluster * kThreads + i)];
    CHECK_CLOSE(out[size_t(c)], want, 0.0, 0.0);
  }
}

TEST_CASE(cluster_reads_peers_between_barriers) { run_cluster_sum<false>(); }

__global__ void map_before_first_barrier(float* out) {
  __shared__ float x;
  x = 1.0f;
  out[0] = *emu::cluster_map(&x, (emu::cluster_rank() + 1) % emu::cluster_size());
}

// ---- asynchronous copies into dynamic shared memory ------------------------

// Each thread copies 4 floats of its block's row into dynamic shared memory
// (one 16-byte cp.async, two groups over the block), waits, and after a
// barrier thread 0 sums the row.
template <bool kPlanted>
__global__ void async_row_sum(const float* in, float* out) {
  float* row = static_cast<float*>(emu::dynamic_shared_memory());
  const float* src = in + size_t(blockIdx.x) * 8 * kThreads;
  emu::cp_async_16(row + 4 * threadIdx.x, src + 4 * threadIdx.x);
  emu::cp_async_commit();
  emu::cp_async_16(row + 4 * (kThreads + threadIdx.x), src + 4 * (kThreads + threadIdx.x));
  emu::cp_async_commit();
  if (kPlanted) {
    const float early = row[4 * threadIdx.x];  // read before the wait
    emu::cp_async_wait<0>();
    row[4 * threadIdx.x] = early;
  } else {
    emu::cp_async_wait<0>();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < 8 * kThreads; ++i) s += row[i];
    out[blockIdx.x] = s;
  }
}

template <bool kPlanted>
void run_async_row_sum() {
  const int blocks = 3;
  alignas(16) static float in[blocks * 8 * kThreads];
  std::vector<float> out(blocks, 0.0f);
  for (int i = 0; i < blocks * 8 * kThreads; ++i) in[i] = float(i % 5);
  emu::launch_cluster(blocks, kThreads, 1, 8 * kThreads * sizeof(float), async_row_sum<kPlanted>,
                      static_cast<const float*>(in), out.data());
  for (int b = 0; b < blocks; ++b) {
    double want = 0;
    for (int i = 0; i < 8 * kThreads; ++i) want += in[b * 8 * kThreads + i];
    if (!(out[size_t(b)] == float(want))) {
      std::fprintf(stderr, "planted bug visible: block %d summed %g, not %g\n", b, double(out[size_t(b)]), want);
      std::exit(3);
    }
  }
}

TEST_CASE(async_copies_land_at_the_wait) { run_async_row_sum<false>(); }

__global__ void wait_without_commit(float* out) {
  float* row = static_cast<float*>(emu::dynamic_shared_memory());
  alignas(16) static const float src[4] = {1, 2, 3, 4};
  emu::cp_async_16(row, src);
  emu::cp_async_wait<0>();  // the copy was never committed: it is still pending
  out[0] = row[0];
}

// ---- the strictness checks themselves, in child processes -------------------

// Runs fn in a child; returns its exit status and what it wrote to stderr.
template <typename F>
std::pair<int, std::string> in_child(F fn) {
  int fds[2];
  if (pipe(fds) != 0) std::abort();
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    fn();
    std::fflush(stderr);
    std::_Exit(0);
  }
  close(fds[1]);
  std::string err;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, size_t(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return {status, err};
}

bool caught(const std::pair<int, std::string>& r, const char* message) {
  const bool failed = !(WIFEXITED(r.first) && WEXITSTATUS(r.first) == 0);
  const bool named = r.second.find(message) != std::string::npos;
  if (!failed || !named) std::fprintf(stderr, "child stderr:\n%s\n", r.second.c_str());
  return failed && named;
}

TEST_CASE(cluster_map_before_the_first_cluster_barrier_aborts) {
  CHECK(caught(in_child([] {
          float out[1];
          emu::launch_cluster(2, 32, 2, 0, map_before_first_barrier, static_cast<float*>(out));
        }),
        "before the cluster's first cluster_sync"));
}

TEST_CASE(uncommitted_async_copy_stays_invisible) {
  float out[1] = {0.0f};
  emu::launch_cluster(1, 1, 1, 64, wait_without_commit, static_cast<float*>(out));
  CHECK(std::isnan(out[0]));
}

TEST_CASE(deadlock_aborts) {
  CHECK(caught(in_child([] {
          emu::launch(1, 64, +[](int) {
            if (threadIdx.x < 32) {
              __syncthreads();
            } else {
              emu::cluster_sync();  // waits for warp 0, which waits at the block barrier
            }
          }, 0);
        }),
        "deadlock"));
}

}  // namespace strict_test

using namespace strict_test;

int main(int argc, char** argv) {
  if (argc == 1) return check::run_all();
  struct Planted {
    const char* name;
    void (*run)();
    const char* message;  // what the emulation prints when it catches the bug
  };
  static const Planted planted[] = {
      {"tempstorage_reuse", run_two_block_reductions<true>, "reused before the previous collective on it finished"},
      {"misaligned_load", [] { run_vector_sum(1); }, "misaligned vector access"},
      {"cluster_barrier", run_cluster_sum<true>, "CUDA requires a cluster_sync() before exit"},
      {"async_before_wait", run_async_row_sum<true>, "planted bug visible"},
  };
  for (const Planted& p : planted) {
    if (argc != 3 || std::string(argv[1]) != "--planted" || p.name != std::string(argv[2])) continue;
    const auto r = in_child(p.run);
    if (caught(r, p.message)) {
      std::printf("%s", r.second.c_str());  // the emulation's own report
      std::printf("planted bug %s: caught by the emulation (\"%s\")\n", p.name, p.message);
      return 0;
    }
    std::printf("planted bug %s: NOT caught\n", p.name);
    return 1;
  }
  std::fprintf(stderr, "usage: %s [--planted tempstorage_reuse|misaligned_load|cluster_barrier|async_before_wait]\n",
               argv[0]);
  return 2;
}
