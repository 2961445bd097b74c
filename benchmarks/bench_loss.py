"""Benchmark of the CSD loss: csd_ext against two PyTorch formulations of the
same loss -- the paper's (paper_style.py) and a lean one (lean.py) -- each
eager and under torch.compile, forward+backward and forward alone.  Speedups
are quoted against the faster of the two formulations.

    python benchmarks/bench_loss.py                     # full grid, writes benchmarks/RESULTS.md
    python benchmarks/bench_loss.py --quick             # one small configuration, prints the table
    python benchmarks/bench_loss.py --device cuda --hbm-gbs 3350   # on a GPU (H100 SXM: 3350 GB/s)
    python benchmarks/bench_loss.py --render OUT.partial.json OUT.md  # the finished rows of a cut-short run

Every (configuration, contender) pair runs in its own subprocess
(bench_worker.py), so peak memory is measured per contender; all numbers in
one invocation come from the same run.  See bench_worker.py for how time and
memory are measured, paper_style.py and lean.py for the baselines.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_report import format_latency_table, format_table, write_results  # noqa: E402

CONTENDERS = ("csd_ext", "paper_eager", "paper_compile", "lean_eager", "lean_compile")
FULL_SHAPES = ((512, 50257), (2048, 32000), (64, 256000), (512, 256000), (1024, 152064))
QUICK_SHAPES = ((64, 4096),)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MODES = ("fwdbwd", "fwd")
GRAD_ROWS = 4  # rows of the gradient compared across contenders


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        shapes.append((int(n), int(v)))
    return tuple(shapes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small configuration (a smoke test of the harness)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", type=parse_shapes, help="e.g. 512x50257,64x256000 (default: the full grid)")
    p.add_argument("--dtypes", default=None, help="comma list from bf16,fp16,fp32 (default bf16,fp32)")
    p.add_argument("--weightings", default=None, help="comma list from SS,TS,US,MM (default all four)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list from " + ",".join(CONTENDERS))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.15, help="M's teacher share (the paper's summarisation runs)")
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="fraction of tokens with label -100; 0 keeps the bytes-moved accounting exact")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per pass after the first (compiling) one")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=30)
    p.add_argument("--min-time", type=float, default=1.5, help="seconds of timed calls per contender and pass")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the contenders this many times per configuration, interleaved, and pool the samples "
                        "(on a loaded machine a change of load then hits every contender alike)")
    p.add_argument("--batch", type=int, default=None,
                   help="back-to-back calls per timed sample (default 10 on CUDA: the GPU time per call with the "
                        "queue kept full, plus a separate single-call latency; 1 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--hbm-gbs", type=float, default=None,
                   help="nominal memory bandwidth in GB/s for the roofline on CUDA (H100 SXM 3350, H200 4800)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--thp", action="store_true",
                   help="run the contenders with THP_MEM_ALLOC_ENABLE=1 (torch's own huge-page allocations)")
    p.add_argument("--output", default=None,
                   help="markdown report to write (default: benchmarks/RESULTS.md for a full run, none for --quick)")
    p.add_argument("--plot", default=None, help="PNG plot (default: next to the report)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    args.dtypes = tuple((args.dtypes or ("bf16" if args.quick else "bf16,fp32")).split(","))
    args.weightings = tuple((args.weightings or ("SS" if args.quick else "SS,TS,US,MM")).split(","))
    args.contenders = tuple(args.contenders.split(","))
    for name, values, allowed in (("--dtypes", args.dtypes, DTYPE_BYTES), ("--weightings", args.weightings,
                                  ("SS", "TS", "US", "MM")), ("--contenders", args.contenders, CONTENDERS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    if args.quick:
        args.min_repeats, args.min_time, args.warmup = 3, 0.2, 1
    if args.batch is None:
        args.batch = 10 if args.device == "cuda" else 1
    if args.batch < 1:
        p.error("--batch: expected a positive number of calls")
    if args.rounds < 1:
        p.error("--rounds: expected a positive number of rounds")
    if args.output is None and not args.quick:
        args.output = os.path.join(HERE, "RESULTS.md")
    if args.output and args.plot is None:
        args.plot = os.path.splitext(args.output)[0] + "_time_vs_size.png"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    return args


# ---------------------------------------------------------------------------
# Machine and bandwidth.
# ---------------------------------------------------------------------------
def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", platform.processor())
        info["cpus"] = fields.get("CPU(s)")
        info["threads_per_core"] = fields.get("Thread(s) per core")
        info["l2"] = fields.get("L2 cache")
        info["l3"] = fields.get("L3 cache")
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or "unknown"
    info["thp"] = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    import csd_ext

    info["csd_ext_cpu_isa"] = torch.ops.csd_ext.cpu_kernel_isa()
    info["csd_ext_backends"] = list(csd_ext.compiled_backends())
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        info["commit"] = rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def load_average():
    text = _read("/proc/loadavg")
    return text.split()[:3] if text else None


def _best_ms(fn, device, reps):
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure_bandwidth(nbytes, device, reps=7):
    """Best-of-reps bandwidth on a working set of `nbytes`: a sum (reads
    nbytes) and a copy into an existing buffer (reads and writes nbytes).
    On CUDA the working set is at least 1 GiB, to be out of L2."""
    if device == "cuda":
        nbytes = max(nbytes, 1 << 30)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros(n, dtype=torch.float32, device=device)
    src.sum(), dst.copy_(src)  # touch, warm up
    read_ms = _best_ms(lambda: src.sum(), device, reps)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, reps)
    del src, dst
    return {"working_set_bytes": 4 * n, "read_gbs": 4 * n / read_ms / 1e6, "copy_gbs": 2 * 4 * n / copy_ms / 1e6}


def bytes_moved(n, v, dtype, fused):
    """What csd_ext's design must move.  The forward reads both logit tensors.
    Two-pass (forward, then a backward op): the backward reads them again and
    writes the gradient, 5 N V b in all.  Fused (csd_forward_grad, used in
    eager mode when the student requires grad and the backend has it): the
    forward writes the gradient while each row is in cache and the backward
    hands it over, 3 N V b in all."""
    b = DTYPE_BYTES[dtype]
    return {"fwd": 2 * n * v * b, "fwdbwd": (3 if fused else 5) * n * v * b}


# ---------------------------------------------------------------------------
# Running the contenders.
# ---------------------------------------------------------------------------
def run_worker(spec, env):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench_worker.py"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"contender": spec["contender"], "error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def merge_rounds(previous, new):
    """Pools one contender's samples over interleaved rounds; the first
    round's memory and gradient stand."""
    if previous is None or "error" in new:
        return new if previous is None else {**previous, "error": new["error"]}
    merged = dict(previous)
    for field in ("times_ms", "latency_ms"):
        for mode, times in new.get(field, {}).items():
            merged.setdefault(field, {}).setdefault(mode, []).extend(times)
    return merged


def grad_check(tmpdir, key, contenders, dtype):
    """Max |g - g_csd_ext| / max |g_csd_ext| over the first rows, per baseline."""
    ref_path = os.path.join(tmpdir, f"{key}-csd_ext.pt")
    if not os.path.exists(ref_path):
        return {}
    ref = torch.load(ref_path)
    out = {}
    for c in contenders:
        path = os.path.join(tmpdir, f"{key}-{c}.pt")
        if c != "csd_ext" and os.path.exists(path):
            g = torch.load(path)
            out[c] = ((g - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
    tol = 1e-4 if dtype == "fp32" else 2e-2  # the gradient is rounded to the student's dtype
    return {"max_rel_diff": out, "tolerance": tol, "ok": all(x <= tol for x in out.values())}


def render(path, output):
    """Writes the report of a saved (possibly cut-short) run: its finished rows."""
    import types

    with open(path) as f:
        report = json.load(f)
    args = types.SimpleNamespace(**report["args"])
    args.output, args.plot = output, os.path.splitext(output)[0] + "_time_vs_size.png"
    report.setdefault("load_after", load_average())
    report.setdefault("finished_utc", "cut short after the rows below")
    print(format_table(report, args))
    write_results(report, args)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--render":  # bench_loss.py --render RUN.partial.json RESULTS.md
        return render(argv[1], argv[2])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import csd_ext

    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(csd_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"

    from csd_ext import _ops

    fused = _ops.has_fused_kernel(torch.device(args.device))
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(args.device),
              "load_before": load_average(), "args": {k: v for k, v in vars(args).items()}, "rows": [],
              "fused": fused}
    bw_cache = {}
    with tempfile.TemporaryDirectory(prefix="csd_bench_") as tmpdir:
        for n, v in args.shapes:
            for dtype in args.dtypes:
                # On CPU, rows split across threads (N < threads) fall back to two sweeps.
                split = args.device == "cpu" and n < torch.get_num_threads()
                moved = bytes_moved(n, v, dtype, fused and not split)
                ws = moved["fwd"]
                if ws not in bw_cache:
                    bw_cache[ws] = measure_bandwidth(ws, args.device)
                bw = bw_cache[ws]
                for w in args.weightings:
                    key = f"{n}x{v}-{dtype}-{w}"
                    results = {}
                    for rnd in range(args.rounds):
                        for c in args.contenders:
                            if rnd and "error" in results.get(c, {}):
                                continue
                            spec = {"contender": c, "device": args.device, "N": n, "V": v, "dtype": dtype,
                                    "weighting": w, "alpha": args.alpha, "temperature": args.temperature,
                                    "ignore_frac": args.ignore_frac, "seed": args.seed, "warmup": args.warmup,
                                    "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
                                    "min_time_s": args.min_time, "batch": args.batch, "threads": args.threads,
                                    "modes": list(MODES), "measure_memory": not args.no_memory and rnd == 0,
                                    "grad_rows": GRAD_ROWS,
                                    "grad_path": os.path.join(tmpdir, f"{key}-{c}.pt") if rnd == 0 else None}
                            print(f"[bench] {key} {c} (round {rnd + 1}/{args.rounds}) ...", file=sys.stderr,
                                  flush=True)
                            results[c] = merge_rounds(results.get(c), run_worker(spec, env))
                            if "error" in results[c]:
                                print(f"[bench]   {c} failed: {results[c]['error'][:300]}", file=sys.stderr)
                    report["rows"].append({"N": n, "V": v, "dtype": dtype, "weighting": w, "bytes": moved,
                                           "bandwidth": bw, "results": results,
                                           "grad_check": grad_check(tmpdir, key, args.contenders, dtype)})
                    if args.output:  # each finished configuration, so that a cut-short run keeps its rows
                        with open(os.path.splitext(args.output)[0] + ".partial.json", "w") as f:
                            json.dump(report, f)
    report["load_after"] = load_average()
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(format_table(report, args))
    latency = format_latency_table(report)
    if latency:
        print("\nSingle-call latency (ms):\n" + latency)
    if args.output:
        write_results(report, args)
        print(f"[bench] wrote {args.output} and {args.plot}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
