"""Sparse (top-k teacher) CSD from hidden states: unfused vs fused_linear_sparse_csd.

    PYTHONPATH=. python benchmarks/bench_sparse.py --out benchmarks/RESULTS_sparse.md
    PYTHONPATH=. python benchmarks/bench_sparse.py --quick      # tiny sizes: checks the script runs

Contenders (forward + backward, gradients to the hidden states and the LM-head weight):
  unfused   logits = F.linear(hidden, weight)  ([N, V]), then csd_ext.sparse_csd_loss
  fused     csd_ext.fused_linear_sparse_csd: K logits per token, head rows gathered per chunk

Method.  Time: for each K, one fresh process warms both contenders up once, then alternates
them (unfused, fused, unfused, ...) for --repeats timed iterations each; the median and the
ratio of medians are reported (ratios only: the machine is shared).  Memory: each
(contender, K) runs in its own fresh process; peak extra resident memory = peak RSS (VmHWM,
reset through /proc/self/clear_refs) during two iterations minus the RSS after a warm-up
iteration with the inputs allocated, gradients dropped and the free heap returned to the OS
(malloc_trim).  Both contenders return the same gradients (hidden [N, H], weight [V, H]), so
those are in both peaks.  Linux only.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CONTENDERS = ("unfused", "fused")


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _inputs(n, h, v, k, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h ** 0.5).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).requires_grad_(True)
    # Distinct ids per row without a [N, V] permutation: k distinct offsets from a random start.
    start = torch.randint(0, v, (n, 1), generator=g)
    step = torch.randint(1, max(2, v // k), (1,), generator=g)
    ids = (start + step * torch.arange(k)) % v
    values = torch.randn(n, k, generator=g) * 2
    labels = torch.where(torch.rand(n, generator=g) < 0.1, -100, 0)
    return hidden, weight, ids, values, labels


def _step(contender, hidden, weight, ids, values, labels):
    import torch.nn.functional as F

    from csd_ext import fused_linear_sparse_csd, sparse_csd_loss

    hidden.grad = weight.grad = None
    if contender == "unfused":
        loss = sparse_csd_loss(F.linear(hidden, weight), ids, values, labels)
    else:
        loss = fused_linear_sparse_csd(hidden, weight, ids, values, labels)
    loss.backward()
    return loss.item()


def worker_time(n, h, v, k, repeats):
    import torch  # noqa: F401

    args = _inputs(n, h, v, k)
    losses = {c: _step(c, *args) for c in CONTENDERS}  # warm-up
    times = {c: [] for c in CONTENDERS}
    for _ in range(repeats):
        for c in CONTENDERS:
            t0 = time.perf_counter()
            _step(c, *args)
            times[c].append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


def worker_memory(contender, n, h, v, k):
    args = _inputs(n, h, v, k)
    _step(contender, *args)
    args[0].grad = args[1].grad = None
    _trim()
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        _step(contender, *args)
    return {"peak_extra_mib": (_kib("VmHWM") - base) / 1024}


def _run_worker(argv):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256, help="tokens")
    p.add_argument("--h", type=int, default=256, help="hidden size")
    p.add_argument("--v", type=int, default=262144, help="vocabulary")
    p.add_argument("--ks", default="32,128,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes (N 16, H 16, V 4096, K 8,64)")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "time":
            n, h, v, k, r = map(int, rest)
            print(json.dumps(worker_time(n, h, v, k, r)))
        else:
            c, (n, h, v, k) = rest[0], map(int, rest[1:])
            print(json.dumps(worker_memory(c, n, h, v, k)))
        return
    if a.quick:
        a.n, a.h, a.v, a.ks, a.repeats = 16, 16, 4096, "8,64", 1
    ks = [int(x) for x in a.ks.split(",")]
    load_before = os.getloadavg()
    t_start = time.time()
    rows = []
    for k in ks:
        timing = _run_worker(["time", str(a.n), str(a.h), str(a.v), str(k), str(a.repeats)])
        mem = {c: _run_worker(["memory", c, str(a.n), str(a.h), str(a.v), str(k)])["peak_extra_mib"]
               for c in CONTENDERS}
        med = {c: statistics.median(timing["times"][c]) for c in CONTENDERS}
        lu, lf = timing["losses"]["unfused"], timing["losses"]["fused"]
        for c in CONTENDERS:
            rows.append({"k": k, "contender": c, "median_s": med[c], "min_s": min(timing["times"][c]),
                         "max_s": max(timing["times"][c]), "mib": mem[c], "time_ratio": med[c] / med["unfused"],
                         "mem_ratio": mem[c] / max(mem["unfused"], 1e-9), "loss_rel_diff": abs(lf - lu) / abs(lu)})
        print(f"K={k}: " + ", ".join(f"{c} {med[c]:.3f}s {mem[c]:.0f} MiB" for c in CONTENDERS), flush=True)
    load_after = os.getloadavg()
    import torch

    lines = [
        "## Sparse CSD from hidden states: unfused vs fused_linear_sparse_csd (issue 17)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({os.environ.get('OMP_NUM_THREADS', '2')} threads per worker). Load average before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)} "
        f"(other jobs share the machine: only the ratios mean something). Whole run {time.time() - t_start:.0f} s.",
        f"Shape: N = {a.n} tokens, H = {a.h}, V = {a.v}, fp32, 10% of labels ignored, weighting SS; "
        f"{a.repeats} timed iterations per contender after one warm-up.",
        "",
        "Command:",
        "",
        f"    PYTHONPATH=. python benchmarks/bench_sparse.py --n {a.n} --h {a.h} --v {a.v} --ks {a.ks} "
        f"--repeats {a.repeats}" + (f" --out {a.out}" if a.out else ""),
        "",
        "Time = forward + backward (median/min/max, the two contenders interleaved in one process per K). "
        "Peak extra memory: fresh process per row, peak RSS during two iterations minus the RSS after a "
        "warm-up with gradients dropped; it includes the returned gradients (hidden [N, H] and weight "
        "[V, H]: the weight gradient alone is V*H*4 bytes = "
        f"{a.v * a.h * 4 / 2**20:.0f} MiB), which both contenders hold.",
        "",
        "| K | contender | median s | min s | max s | peak extra MiB | time / unfused | memory / unfused |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['k']} | {r['contender']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{r['mib']:.0f} | {r['time_ratio']:.2f}x | {r['mem_ratio']:.2f} |")
    lines += ["", "Largest relative loss difference fused vs unfused: "
              f"{max(r['loss_rel_diff'] for r in rows):.1e} (fp32)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
