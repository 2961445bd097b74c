"""Times one contender on one configuration, in a process of its own.

bench_loss.py starts one of these per (configuration, contender), so each
contender's peak memory is measured without the others' allocations, caches
or compiled graphs in the same process.  Usage (internal):

    python bench_worker.py '<json spec>'

prints one JSON line with the timings and memory.  Memory is "peak extra":
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
minus its resident set once the inputs exist, around one call after the
timing runs, with freed heap memory first returned to the OS (malloc_trim)
so that reused pages cannot hide an allocation.  On CUDA it is
torch.cuda.max_memory_allocated() minus memory_allocated() before the call.
"""

import ctypes
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(spec, device):
    """Deterministic logits: the teacher is correlated with the student, as in
    distillation; a fraction `ignore_frac` of labels is ignore_index."""
    n, v, dtype = spec["N"], spec["V"], DTYPES[spec["dtype"]]
    g = torch.Generator().manual_seed(spec["seed"])
    # Generated in chunks of rows so that the fp32 staging stays small.
    student = torch.empty(n, v, dtype=dtype, device=device)
    teacher = torch.empty(n, v, dtype=dtype, device=device)
    step = max(1, (1 << 24) // v)
    for r in range(0, n, step):
        base = torch.randn(min(step, n - r), v, generator=g) * 3.0
        teacher[r:r + step] = base.to(device)
        student[r:r + step] = (base + 1.5 * torch.randn(base.shape, generator=g)).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < spec["ignore_frac"]] = -100
    return student, teacher, labels.to(device)


def make_fn(spec):
    """The contender's loss function: csd_ext, or one of the two PyTorch
    formulations (paper_style.py, lean.py), eager or under torch.compile."""
    from lean import lean_csd
    from paper_style import paper_style_csd

    kw = dict(weighting=spec["weighting"], alpha=spec["alpha"], temperature=spec["temperature"])
    c = spec["contender"]
    if c == "csd_ext":
        from csd_ext import csd_loss

        return lambda z, t, l: csd_loss(z, t, l, **kw)
    formulations = {"paper": paper_style_csd, "lean": lean_csd}
    name, _, mode = c.partition("_")
    if name not in formulations or mode not in ("eager", "compile"):
        raise ValueError(f"unknown contender {c!r}")
    fn = formulations[name] if mode == "eager" else torch.compile(formulations[name])
    return lambda z, t, l: fn(z, t, l, **kw)


class Timer:
    """Time per call of `fn`, over `batch` back-to-back calls (each after its
    untimed-in-spirit `prepare`, which only drops references on the host).

    On CUDA the clock is a pair of events around the batch, after a
    synchronize: with batch > 1 the host queues the next call while the GPU
    runs the previous one, as in a training loop, so the figure is the GPU's
    time per call, or the host's (Python dispatch, argument checks, the
    launches) where that is longer.  A single synchronized call (`batch=1`)
    pays both in turn: the GPU idles while the host prepares the call.  On the
    CPU the clock is perf_counter and the work is synchronous anyway."""

    def __init__(self, device, batch=1):
        self.cuda = device.startswith("cuda")
        self.batch = max(1, int(batch))

    def __call__(self, fn, prepare=lambda: None):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(self.batch):
                prepare()
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.batch
        t0 = time.perf_counter()
        for _ in range(self.batch):
            prepare()
            fn()
        return (time.perf_counter() - t0) * 1e3 / self.batch


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_bytes(call, prepare, device):
    """Peak memory one call adds on top of what exists before it (see module doc)."""
    prepare()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _release_free_memory()
    _reset_peak_rss()
    base = _rss_kb("VmRSS")
    call()
    return (_rss_kb("VmHWM") - base) * 1024


def run(spec):
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {"contender": spec["contender"], "times_ms": {}, "memory_bytes": {}}
    if spec["contender"] == "csd_ext":
        import csd_ext

        if device.startswith("cuda") and "cuda" not in csd_ext.compiled_backends():
            result["error"] = "csd_ext was built without CUDA kernels"
            return result
    student, teacher, labels = make_inputs(spec, device)
    if device == "cpu":
        result["rss_after_inputs_bytes"] = _rss_kb("VmRSS") * 1024
    fn = make_fn(spec)
    z = student.detach().requires_grad_(True)
    timer = Timer(device, spec.get("batch", 1))
    single = Timer(device, 1)

    def fwd():
        with torch.no_grad():
            fn(student, teacher, labels)

    def fwdbwd():
        fn(z, teacher, labels).backward()

    def clear_grad():
        z.grad = None

    steps = {"fwd": (fwd, lambda: None), "fwdbwd": (fwdbwd, clear_grad)}

    # Compile (for the compile contender) and warm up: not timed.
    t0 = time.perf_counter()
    for mode in spec["modes"]:
        call, prepare = steps[mode]
        prepare()
        call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result["first_call_s"] = time.perf_counter() - t0

    # The gradient of the first rows, for the parent's cross-contender check.
    if "fwdbwd" in spec["modes"] and spec.get("grad_path"):
        torch.save(z.grad[: spec["grad_rows"]].float().cpu(), spec["grad_path"])

    for mode in spec["modes"]:
        call, prepare = steps[mode]
        for _ in range(spec["warmup"]):
            prepare()
            call()
        times, spent = [], 0.0
        while len(times) < spec["min_repeats"] or (spent < spec["min_time_s"] and len(times) < spec["max_repeats"]):
            # The first call's prepare frees the previous gradient outside the
            # clock; within a batch it is the host-side part of a training step.
            prepare()
            ms = timer(call, prepare if timer.batch > 1 else (lambda: None))
            times.append(ms)
            spent += ms * timer.batch / 1e3
        result["times_ms"][mode] = times
        if timer.batch > 1:
            # One synchronized call at a time: what a lone call costs, host overhead included.
            result.setdefault("latency_ms", {})[mode] = [single(call, prepare) for _ in range(spec["min_repeats"])]

    if spec["measure_memory"]:
        for mode in spec["modes"]:
            call, prepare = steps[mode]
            result["memory_bytes"][mode] = peak_extra_bytes(call, prepare, device)
    result["median_ms"] = {m: statistics.median(v) for m, v in result["times_ms"].items()}
    return result


def main():
    spec = json.loads(sys.argv[1])
    try:
        result = run(spec)
    except Exception as exc:  # reported in the table, not a crash of the whole benchmark
        result = {"contender": spec["contender"], "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
