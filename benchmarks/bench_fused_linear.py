"""LM head + distillation loss: unfused vs csd_ext's fused path vs Liger-Kernel.

    PYTHONPATH=. python benchmarks/bench_fused_linear.py --repeats 5 --out benchmarks/RESULTS_fused_linear.md
    PYTHONPATH=. python benchmarks/bench_fused_linear.py --quick   # tiny sizes, for the tests

Contenders (each forward + backward, gradients to hidden states and weight):
  unfused      torch.nn.Linear (no bias), then csd_ext.CSDLoss, teacher given as logits
  fused        csd_ext.FusedLinearCSDLoss, teacher given as logits
  fused_th     csd_ext.FusedLinearCSDLoss, teacher given as hidden states + LM-head weight
  liger_jsd    Liger-Kernel's LigerFusedLinearJSDLoss (chunked, pure-torch, torch.compile'd
               chunk function; weight_hard_loss=0 so it is a pure distillation loss), teacher
               as hidden states + weight, like fused_th.  A different loss (JSD), so only the
               cost is comparable.

Method.  Every (contender, N, dtype) runs in its own fresh Python process, one at a time.
  Time: wall clock of forward + backward, after --warmup untimed iterations (these include
  torch.compile for Liger), over --repeats iterations; median, min and max are reported.
  Memory: peak extra resident memory = peak RSS (VmHWM) during the timed iterations minus
  a baseline RSS taken after the warm-up, with the inputs allocated, gradients dropped and
  free heap memory handed back to the OS (glibc malloc_trim).  So lazily imported modules
  and compiled graphs (one-off costs) are in the baseline, and everything a training step
  allocates is in the peak.  The peak counter is reset right after the baseline by writing
  "5" to /proc/self/clear_refs (Linux).  Gradients are set to None before each iteration,
  so every contender holds the same outputs (the .grad of hidden states and weight) at its
  peak.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CONTENDERS = ("unfused", "fused", "fused_th", "liger_jsd")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------- worker


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _trim_heap():
    """Hand free heap memory back to the OS (glibc), so the baseline RSS counts live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _make_step(name, torch, n, hidden, vocab, dtype, seed, liger_compiled=True):
    """Allocates the inputs and returns a closure doing one forward + backward."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    w = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype))
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100  # some ignored positions, as in SFT data
    params = (h, w)
    if name in ("unfused", "fused"):
        teacher = (torch.randn(n, vocab, generator=g) * 2).to(dtype)
    else:
        t_h = (torch.randn(n, hidden, generator=g) * 0.5).to(dtype)
        t_w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype)

    if name == "unfused":
        import csd_ext

        lin = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        lin.weight = w
        loss_fn = csd_ext.CSDLoss()

        def step():
            loss_fn(lin(h), teacher, labels).backward()
    elif name == "fused":
        import csd_ext

        loss_fn = csd_ext.FusedLinearCSDLoss()

        def step():
            loss_fn(h, w, teacher, labels).backward()
    elif name == "fused_th":
        import csd_ext

        loss_fn = csd_ext.FusedLinearCSDLoss()

        def step():
            loss_fn(h, w, None, labels, teacher_hidden=t_h, teacher_weight=t_w).backward()
    elif name == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
                                          compiled=liger_compiled)

        def step():
            loss_fn(h, w, t_h, t_w, labels).backward()
    else:
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    return step, params


def run_worker(spec):
    import torch

    result = {"contender": spec["contender"], "n": spec["n"], "dtype": spec["dtype"]}
    try:
        dtype = getattr(torch, DTYPES[spec["dtype"]])
        step, params = _make_step(spec["contender"], torch, spec["n"], spec["hidden"], spec["vocab"], dtype,
                                  spec["seed"], spec["liger_compiled"])

        def one():
            for p in params:
                p.grad = None
            start = time.perf_counter()
            step()
            return time.perf_counter() - start

        for _ in range(spec["warmup"]):
            one()
        for p in params:
            p.grad = None
        _trim_heap()
        base_kib = _status_kib("VmRSS")
        _reset_peak_rss()
        times = [one() for _ in range(spec["repeats"])]
        result.update(times=times, peak_extra_mib=(_status_kib("VmHWM") - base_kib) / 1024)
    except Exception as exc:  # reported in the table: e.g. Liger missing or failing on this machine
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- driver


def machine_info():
    model, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        cores = fields.get("CPU(s)", str(cores)).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return model, cores


def measure(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**{k: spec[k] for k in ("contender", "n", "dtype")}, "error": f"worker exited {proc.returncode}: {tail}"}


def format_table(results):
    base = {(r["n"], r["dtype"]): r for r in results if r["contender"] == "unfused" and "error" not in r}
    lines = [
        "| N | dtype | contender | median s | min s | max s | peak extra MiB | time / unfused | memory / unfused |",
        "|---:|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    errors = []
    for r in results:
        head = f"| {r['n']} | {r['dtype']} | {r['contender']} |"
        if "error" in r:
            errors.append(f"- {r['contender']} (N={r['n']}, {r['dtype']}): `{r['error']}`")
            lines.append(head + " error | error | error | error | - | - |")
            continue
        med, lo, hi = statistics.median(r["times"]), min(r["times"]), max(r["times"])
        ref = base.get((r["n"], r["dtype"]))
        t_rel = f"{med / statistics.median(ref['times']):.2f}x" if ref else "-"
        m_rel = f"{r['peak_extra_mib'] / ref['peak_extra_mib']:.2f}" if ref and ref["peak_extra_mib"] > 0 else "-"
        lines.append(head + f" {med:.4g} | {lo:.4g} | {hi:.4g} | {r['peak_extra_mib']:.0f} | {t_rel} | {m_rel} |")
    return lines, errors


def _liger_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return "not installed"


def write_markdown(path, args, results, load_before, load_after, elapsed):
    import torch

    import csd_ext

    model, cores = machine_info()
    lines, errors = format_table(results)
    isa = torch.ops.csd_ext.cpu_kernel_isa() if hasattr(torch.ops.csd_ext, "cpu_kernel_isa") else "?"
    md = [
        "## Fused linear + CSD (issue 5)",
        "",
        f"Machine: {model}, {cores} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"csd_ext {csd_ext.__version__} CPU kernel `{isa}`.",
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after} (other jobs share the machine).",
        f"Shape: H = {args.hidden}, V = {args.vocab}; teacher H_t = H; 10% of labels ignored; "
        f"{args.warmup} warm-up + {args.repeats} timed iterations per row; total run {elapsed / 60:.1f} min.",
        f"Liger: liger-kernel {_liger_version()}, LigerFusedLinearJSDLoss(weight_hard_loss=0, beta=0.5, "
        f"chunk_size=1024, compiled={not args.quick}).",
        "",
        "Command:",
        "",
        "    " + " ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "",
        "Each row runs in a fresh process.  Time = forward + backward (median/min/max).  Peak extra memory "
        "= peak RSS (VmHWM, reset via /proc/self/clear_refs) during the timed iterations minus the RSS after "
        "the warm-up with inputs allocated, gradients dropped and free heap returned (malloc_trim); it includes "
        "the gradients of the hidden states and weight that every contender returns.",
        "",
        *lines,
        "",
    ]
    if errors:
        md += ["Errors:", "", *errors, ""]
    with open(path, "w") as f:
        f.write("\n".join(md))
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,8192", help="comma-separated token counts N")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (for tests)")
    p.add_argument("--out", default=None, help="write the markdown section to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return run_worker(json.loads(args.worker))
    if args.quick:  # exercises every contender and the table; Liger uncompiled to skip a 20 s compile
        args.sizes, args.hidden, args.vocab, args.repeats, args.warmup = "64", 32, 512, 2, 1

    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.time()
    results = []
    for dtype in args.dtypes.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for name in args.contenders.split(","):
                spec = dict(contender=name, n=n, dtype=dtype, hidden=args.hidden, vocab=args.vocab,
                            repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                            liger_compiled=not args.quick)
                r = measure(spec)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    load_after = "/".join(f"{x:.2f}" for x in os.getloadavg())
    if args.out:
        md = write_markdown(args.out, args, results, load_before, load_after, time.time() - start)
    else:
        md = format_table(results)[0]
    print("\n".join(md))


if __name__ == "__main__":
    main()
