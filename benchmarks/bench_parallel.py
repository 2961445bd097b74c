"""Vocab-parallel CSD (csd_ext.parallel) on CPU with gloo: communication, time and memory.

    PYTHONPATH=. python benchmarks/bench_parallel.py --out benchmarks/RESULTS_parallel.md
    PYTHONPATH=. python benchmarks/bench_parallel.py --rows 64 --vocab 4096 --repeats 2   # quick

1. Bytes communicated per row, per weighting: the per-rank partial states the forward
   all-gathers (read off the tensor the code builds, not a formula), against gathering the
   logits themselves (student + teacher, bf16) -- per rank sent and received.
2. Time of forward + backward, 2 gloo ranks on [N, V/2] each, against one process on the
   full [N, V] (csd_ext.csd_loss), on the same total work.  Median of --repeats, the two
   interleaved; each process on one thread.  The 2-rank figure is wall time on rank 0.
3. Peak extra memory per rank: vocab-parallel (the rank's shard only) against the
   alternative of all-gathering both logit tensors and running csd_loss on them.  Peak
   extra = peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS with the inputs
   allocated and freed heap returned to the OS (malloc_trim).  Linux only.
"""

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WEIGHTINGS = [a + b for a in "STUM" for b in "STUM"]


def _rss_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key)


def peak_extra_bytes(call):
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    call()
    return (_rss_kb("VmHWM") - base) * 1024


def bytes_per_row(world):
    """{weighting: (state bytes sent per rank per row, received per rank per row)} from real states."""
    from csd_ext.parallel._moments import needs_of, partial_states

    z = torch.randn(3, 8)
    out = {}
    for w in WEIGHTINGS:
        states = partial_states(z, z, needs_of(w, 0.5), 1.0, torch.float32)
        per_row = states[0].numel() * states.element_size()
        out[w] = (per_row, (world - 1) * per_row)
    return out


def _worker(rank, world, store, rows, vocab, repeats, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from csd_ext import csd_loss
    from csd_ext.parallel import vocab_parallel_csd_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, vocab, generator=g)
    t = torch.randn(rows, vocab, generator=g)
    per = -(-vocab // world)
    lo, hi = rank * per, min(vocab, (rank + 1) * per)
    zs, ts = z[:, lo:hi].clone(), t[:, lo:hi].clone()
    del z, t

    def vp():
        x = zs.detach().requires_grad_(True)
        vocab_parallel_csd_loss(x, ts).backward()

    def gathered():
        # The alternative: all-gather both logit tensors, then the single-process loss.
        full = []
        for shard in (zs, ts):
            parts = [shard.new_empty((rows, min(vocab, (r + 1) * per) - r * per)) for r in range(world)]
            dist.all_gather(parts, shard.contiguous())
            full.append(torch.cat(parts, dim=1))
        x = full[0].requires_grad_(True)
        csd_loss(x, full[1]).backward()
        return x.grad[:, lo:hi]

    vp()  # warm-up
    gathered()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        vp()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    mem_vp = peak_extra_bytes(vp)
    dist.barrier()
    mem_gather = peak_extra_bytes(gathered)
    dist.barrier()
    if rank == 0:
        results.put({"times": times, "mem_vp": mem_vp, "mem_gather": mem_gather})
    dist.destroy_process_group()


def single_process_times(rows, vocab, repeats):
    from csd_ext import csd_loss

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, vocab, generator=g)
    t = torch.randn(rows, vocab, generator=g)

    def one():
        x = z.detach().requires_grad_(True)
        csd_loss(x, t).backward()

    one()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return times, peak_extra_bytes(one)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (1 process, 2 ranks)")
    p.add_argument("--out")
    args = p.parse_args()

    lines = ["# Vocab-parallel CSD on CPU (gloo): communication, time, memory", "",
             f"`{' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{os.cpu_count()} cores shared with other jobs (the machine was loaded: times are indicative, "
             f"ratios from one run).", ""]
    lines += ["## Bytes communicated per row (fp32 states; fp64 inputs double them)", "",
              "| weighting | states sent per rank | received per rank, 2 ranks | 4 ranks | 8 ranks | "
              "gathering bf16 logits instead (student + teacher), received per rank, 8 ranks, V = 128k |",
              "|---|---|---|---|---|---|"]
    v_big = 128 * 1024
    for w in WEIGHTINGS:
        sent = bytes_per_row(2)[w][0]
        lines.append(f"| {w} | {sent} B | {bytes_per_row(2)[w][1]} B | {bytes_per_row(4)[w][1]} B | "
                     f"{bytes_per_row(8)[w][1]} B | {2 * 2 * v_big * 7 // 8:,} B |")
    lines.append("")

    ctx = mp.get_context("spawn")
    single, ranks, mem_single, mem = [], [], None, None
    for _ in range(args.rounds):
        ts, mem_single = single_process_times(args.rows, args.vocab, args.repeats)
        single += ts
        q = ctx.SimpleQueue()
        store = tempfile.mktemp()
        mp.start_processes(_worker, args=(2, store, args.rows, args.vocab, args.repeats, q), nprocs=2,
                           start_method="spawn")
        mem = q.get()
        ranks += mem["times"]
    s, r = statistics.median(single), statistics.median(ranks)
    lines += [f"## Time, forward + backward, N = {args.rows} rows, V = {args.vocab}, fp32, weighting SS", "",
              "| | median ms | samples |", "|---|---|---|",
              f"| one process, csd_ext.csd_loss on [N, V] | {s * 1e3:.1f} | {len(single)} |",
              f"| 2 gloo ranks, vocab_parallel_csd_loss on [N, V/2] each | {r * 1e3:.1f} | {len(ranks)} |",
              "", f"Ratio (2 ranks / 1 process): {r / s:.2f}.  Each rank does half the elementwise work, but "
              "the partial states are computed in PyTorch (several passes over the shard) rather than by "
              "the fused C++ kernel, and the all-gather adds a round trip; see docs/parallel.md.", ""]
    mb = 1 / (1 << 20)
    lines += ["## Peak extra memory per rank (2 ranks, same shapes)", "",
              "| | MiB |", "|---|---|",
              f"| vocab_parallel_csd_loss on the rank's [N, V/2] shards | {mem['mem_vp'] * mb:.1f} |",
              f"| all-gather both logits to [N, V], then csd_loss | {mem['mem_gather'] * mb:.1f} |",
              f"| (one process, csd_loss on [N, V]) | {mem_single * mb:.1f} |",
              "", f"One [N, V] fp32 tensor is {args.rows * args.vocab * 4 * mb:.1f} MiB.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
