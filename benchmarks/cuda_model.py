"""Analytic model of csd_ext's CUDA kernels (issue 13): predicted time of each
kernel path on each shape of the benchmark grid, on H100 and H200, without a GPU.

    python benchmarks/cuda_model.py                      # the table, from cuda_model_build.json
    python benchmarks/cuda_model.py --markdown           # the same as markdown (docs/kernels.md)
    python benchmarks/cuda_model.py --compile            # rebuild the kernels for sm_90 (nvcc -c,
                                                         # ptxas -v), read registers and SASS, and
                                                         # rewrite cuda_model_build.json

Time of one kernel = the largest of four floors:

1. HBM:      bytes moved / bandwidth (the achievable copy bandwidth, COPY_FRACTION
             of the nominal figure until a GPU measures it);
2. latency:  bytes read / (bytes in flight per SM x SMs / HBM latency), Little's law;
             bytes in flight = resident blocks (from the registers) x threads x the
             bytes a thread's loop step loads;
3. issue:    instructions per element / (4 warp schedulers x 32 lanes x clock x SMs),
             or the exps per element on the 16-lane special-function unit if slower;
4. waves:    the HBM floor stretched by wave quantisation (blocks rounded up to
             whole waves of resident blocks) plus a fixed cost per launch.

A path's time is the sum over its kernels (their launches run back to back).
Instructions per element, exps per element and registers come from the real
build: `--compile` runs nvcc on csrc/cuda/*.cu for sm_90 and reads ptxas -v
(.ci/ptxas_summary.py) and the SASS hot loops (benchmarks/sass_loops.py); the
result is kept in cuda_model_build.json.  The planned fused one-read kernel
(issue 13 items 1-3) is modelled from its design figures (PLANNED_FUSED), or
from the build when a `csd_fused` kernel is in it.

This is a floor model: it predicts what the design allows, not what the code
achieves; compare with the measurements (docs/kernels.md).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_JSON = os.path.join(HERE, "cuda_model_build.json")

# Public figures: SXM parts, boost clock.  Latency: HBM load-to-use latency
# under load, ~600-800 ns on Hopper (microbenchmarks); the issue uses 700 ns.
GPUS = {
    "H100": {"sms": 132, "hbm_gbs": 3350.0, "clock_ghz": 1.98, "latency_ns": 700.0},
    "H200": {"sms": 132, "hbm_gbs": 4800.0, "clock_ghz": 1.98, "latency_ns": 700.0},
}
COPY_FRACTION = 0.90      # achievable device-to-device copy / nominal HBM (assumed; gpu_check measures it)
LANES_PER_CLOCK = 4 * 32  # thread-instructions issued per SM per clock (4 schedulers, 1 warp-instruction each)
SFU_PER_CLOCK = 16        # MUFU.EX2 per SM per clock
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
THREADS = 256             # block size of every csd kernel (csd_cuda_plan.h)
LAUNCH_US = 2.5           # GPU-side cost of one more kernel on a busy stream (ramp-up + tail)

GRID = ((512, 50257), (2048, 32000), (64, 256000), (512, 256000), (1024, 152064), (4096, 128256))
TARGET_SHAPES = ((2048, 32000), (512, 256000), (4096, 128256))

# Launch plans (csd_cuda_plan.h; keep in step with it).
WARP_ROW_MAX_VOCAB = 4096
MIN_SPLIT_SEGMENT = 4096
BACKWARD_SEGMENT = 16384
MAX_SEGMENTS = 64
BLOCKS_PER_SM_WANTED = 8

# The fused one-read kernel's design (issue 13): one block (or a cluster of
# up to 8) per row, the row held in shared memory, >= 64 KB per SM in flight
# by asynchronous copies whatever the registers.  Instructions per element:
# the two-pass forward's and backward's hot loops of the same weighting
# together, minus the backward's second load of z and t (~4 per element):
# an estimate until the kernel is built.
PLANNED_FUSED = {"inflight_kb_per_sm": 64.0, "launches": 1, "ipe_discount": 4.0,
                 "row_smem_budget": 200 * 1024, "smem_per_sm": 228 * 1024, "max_cluster": 8}


def fused_layout(vocab, sms, elem_bytes=2):
    """(cluster size, resident blocks per SM, SMs in use) of the rows-on-chip
    kernel: a row's z and t (2 x elem_bytes x V) split over the smallest
    power-of-two cluster whose blocks each hold at most row_smem_budget;
    clusters tile the SMs whole (132 SMs take 16 clusters of 8: 128 in use)."""
    row = 2 * elem_bytes * vocab
    cluster = 1
    while row / cluster > PLANNED_FUSED["row_smem_budget"] and cluster < PLANNED_FUSED["max_cluster"]:
        cluster *= 2
    per_block = row / cluster + 4096  # + reduction scratch
    slots = max(1, min(MAX_THREADS_PER_SM // THREADS, int(PLANNED_FUSED["smem_per_sm"] // per_block)))
    return cluster, slots, (sms // cluster) * cluster

# The lean PyTorch formulation under torch.compile (benchmarks/lean.py), for
# the issue's "2.5x lean compile" target: not measured on a GPU yet.  Counted
# from its graph as inductor fuses it: row max + sum of exps (z: 2 B), the
# weighted mean of d (z, t: 4 B), g and the surrogate's sum (z, t read, g
# written: 6 B), the backward's g x grad_output (g read, grad written: 4 B):
# 16 B per bf16 element, assumed at LEAN_COMPILE_EFFICIENCY of copy bandwidth.
LEAN_COMPILE_BYTES = 16
LEAN_COMPILE_EFFICIENCY = 0.85

# The code that was timed there had static chunk loops of ~75 (SS forward)
# and ~108 (backward) SASS instructions per entry (RESULTS_cuda.md; hot
# paths not measured then), the same registers and launch plans.
TIMED_CODE_IPE = {"forward": 75.0, "backward": 108.0}

# H200 measurements (benchmarks/RESULTS_cuda.md, 2026-11-30, SS bf16, older
# code: single synchronized calls, host overhead included): csd_ext ms.
H200_MEASURED = {
    ((512, 50257), "fwd+bwd"): 0.66, ((512, 50257), "fwd"): 0.18,
    ((2048, 32000), "fwd+bwd"): 0.71, ((2048, 32000), "fwd"): 0.37,
    ((64, 256000), "fwd+bwd"): 0.40, ((64, 256000), "fwd"): 0.17,
    ((512, 256000), "fwd+bwd"): 1.05, ((512, 256000), "fwd"): 0.59,
    ((1024, 152064), "fwd+bwd"): 1.25, ((1024, 152064), "fwd"): 0.70,
}


# ---------------------------------------------------------------------------
# Floors.
# ---------------------------------------------------------------------------
def blocks_per_sm(regs, smem_bytes=0, smem_per_sm=228 * 1024):
    """Resident 256-thread blocks per SM: registers are allocated per warp in
    multiples of 8 per thread; the thread limit and shared memory cap it too."""
    per_block = math.ceil(regs / 8) * 8 * THREADS
    by_regs = REGS_PER_SM // per_block
    by_threads = MAX_THREADS_PER_SM // THREADS
    by_smem = smem_per_sm // smem_bytes if smem_bytes else by_threads
    return max(0, min(by_regs, by_threads, by_smem))


def kernel_time_us(gpu, *, elements, read_bytes, write_bytes, ipe, exps_pe, inflight_per_sm, blocks,
                   slots_per_sm, launches=1):
    """The four floors of one kernel (µs) and their max: {name: µs, "time": µs, "bound": name}."""
    g = GPUS[gpu]
    bw = g["hbm_gbs"] * COPY_FRACTION * 1e3  # bytes per µs
    hbm = (read_bytes + write_bytes) / bw
    latency = read_bytes / (inflight_per_sm * g["sms"] / (g["latency_ns"] * 1e-3)) if inflight_per_sm else math.inf
    clock = g["clock_ghz"] * 1e3  # per µs
    issue = max(elements * ipe / (g["sms"] * LANES_PER_CLOCK * clock),
                elements * exps_pe / (g["sms"] * SFU_PER_CLOCK * clock))
    slots = g["sms"] * slots_per_sm
    waves_exact = blocks / slots
    quantised = math.ceil(waves_exact) / waves_exact if blocks else 1.0
    waves = hbm * quantised + launches * LAUNCH_US
    floors = {"hbm": hbm, "latency": latency, "issue": issue, "waves": waves}
    bound = max(floors, key=floors.get)
    return {**floors, "time": floors[bound], "bound": bound}


# ---------------------------------------------------------------------------
# Kernel paths.
# ---------------------------------------------------------------------------
def forward_plan(rows, vocab, sms):
    """(blocks, segments per row, launches) of the two-pass forward (plan_forward)."""
    if vocab <= WARP_ROW_MAX_VOCAB:
        return math.ceil(rows / (THREADS // 32)), 1, 1
    segs = 1
    if rows < 2 * sms:
        wanted = math.ceil(BLOCKS_PER_SM_WANTED * sms / max(rows, 1))
        segs = max(1, min(wanted, vocab // MIN_SPLIT_SEGMENT, MAX_SEGMENTS))
    seg_len = max(64, math.ceil(math.ceil(vocab / segs) / 64) * 64)
    segs = math.ceil(vocab / seg_len)
    return rows * segs, segs, 2 if segs > 1 else 1  # split rows add the merge kernel


def backward_plan(rows, vocab):
    if vocab <= WARP_ROW_MAX_VOCAB:
        return math.ceil(rows / (THREADS // 32))
    return rows * math.ceil(vocab / BACKWARD_SEGMENT)


def weighting_kernel(kind, weighting):
    """The kernel variant a weighting runs (csd_cuda_variants.h): exact SS, TS/MM, US, or general."""
    return {"SS": f"{kind} SS", "TS": f"{kind} TS/MM", "MM": f"{kind} TS/MM", "US": f"{kind} US"}.get(
        weighting, f"{kind} general")


def path_times(build, gpu, rows, vocab, weighting="SS", elem_bytes=2):
    """{path: floors dict} for bf16 (elem_bytes 2) on one shape."""
    g = GPUS[gpu]
    n = rows * vocab
    out = {}
    fwd = build["kernels"][weighting_kernel("forward", weighting)]
    bwd = build["kernels"][weighting_kernel("backward", weighting)]
    fblocks, _, flaunch = forward_plan(rows, vocab, g["sms"])
    f_slots = blocks_per_sm(fwd["regs"])
    f = kernel_time_us(gpu, elements=n, read_bytes=2 * elem_bytes * n, write_bytes=0, ipe=fwd["ipe"],
                       exps_pe=fwd["exps_pe"], inflight_per_sm=f_slots * THREADS * fwd["step"] * 2 * elem_bytes,
                       blocks=fblocks, slots_per_sm=f_slots, launches=flaunch)
    b_slots = blocks_per_sm(bwd["regs"])
    b = kernel_time_us(gpu, elements=n, read_bytes=2 * elem_bytes * n, write_bytes=elem_bytes * n, ipe=bwd["ipe"],
                       exps_pe=bwd["exps_pe"], inflight_per_sm=b_slots * THREADS * bwd["step"] * 2 * elem_bytes,
                       blocks=backward_plan(rows, vocab), slots_per_sm=b_slots)
    out["forward-only"] = f
    out["two-pass backward"] = b
    out["two-pass fwd+bwd"] = {k: (f[k] + b[k] if k != "bound" else f"{f['bound']}+{b['bound']}") for k in f}
    fused = build["kernels"].get(f"fused {weighting}")
    cluster, slots, used_sms = fused_layout(vocab, g["sms"], elem_bytes)
    if fused is None:  # the planned kernel, from its design figures
        fused = {"ipe": fwd["ipe"] + bwd["ipe"] - PLANNED_FUSED["ipe_discount"],
                 "exps_pe": max(fwd["exps_pe"], bwd["exps_pe"]),
                 "inflight": PLANNED_FUSED["inflight_kb_per_sm"] * 1024, "planned": True}
    # Blocks of whole clusters on the SMs that clusters can use: the wave
    # floor counts them against all SMs' slots, scaled by the unused SMs.
    out["fused one-read"] = kernel_time_us(
        gpu, elements=n, read_bytes=2 * elem_bytes * n, write_bytes=elem_bytes * n, ipe=fused["ipe"],
        exps_pe=fused["exps_pe"], inflight_per_sm=fused["inflight"],
        blocks=math.ceil(rows * cluster * g["sms"] / used_sms), slots_per_sm=slots,
        launches=PLANNED_FUSED["launches"])
    out["fused one-read"]["cluster"] = cluster
    out["fused one-read"]["planned"] = fused.get("planned", False)
    return out


def lean_compile_us(gpu, rows, vocab):
    g = GPUS[gpu]
    return rows * vocab * LEAN_COMPILE_BYTES / (g["hbm_gbs"] * COPY_FRACTION * LEAN_COMPILE_EFFICIENCY * 1e3)


# ---------------------------------------------------------------------------
# Reading the build.
# ---------------------------------------------------------------------------
KERNEL_PATTERNS = {  # model name -> (kernel name regex in the demangled SASS/ptxas name)
    "forward": r"csd_forward_kernel<",
    "backward": r"csd_backward_kernel<",
}


def _variant(name):
    """The weighting variant of a csd kernel from its template arguments
    (kBases: 1 = S, 2 = T, 4 = U; csd_cuda_variants.h), as the model names it."""
    m = re.search(r",\s*(\d+)u?>\s*$", name) or re.search(r",\s*\(unsigned int\)(\d+)>", name)
    bases = int(m.group(1)) if m else 7
    return {1: "SS", 3: "TS/MM", 5: "US"}.get(bases, "general")


def compile_and_read(out_dir, arch="90", reuse=False):
    """nvcc -c the forward and backward .cu for sm_<arch> with ptxas -v; returns
    the build facts for bf16/bf16: registers, instructions and exps per element."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    import ptxas_summary
    import sass_loops

    venv = os.environ.get("CSD_CUDA_VENV", os.path.expanduser("~/.cache/csd_ext/cuda-venv"))
    py = os.path.join(venv, "bin", "python")
    incs = subprocess.run([py, "-c", "import torch.utils.cpp_extension as c, sysconfig, torch, os;"
                           "print('\\n'.join(c.include_paths('cuda') + [sysconfig.get_paths()['include'],"
                           "os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),'nvidia','cu13','include')]))"],
                          capture_output=True, text=True, check=True).stdout.split()
    # cuobjdump: the toolkit's, or the copy triton ships in the CUDA venv.
    triton_bin = subprocess.run([py, "-c", "import triton, os; print(os.path.join(os.path.dirname(triton.__file__),"
                                 "'backends', 'nvidia', 'bin'))"], capture_output=True, text=True).stdout.strip()
    if triton_bin:
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + triton_bin
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    std = "-std=c++20"
    facts = {"arch": f"sm_{arch}", "kernels": {}, "raw": []}
    os.makedirs(out_dir, exist_ok=True)
    for src in ("csd_cuda_forward.cu", "csd_cuda_backward.cu"):
        obj = os.path.join(out_dir, src.replace(".cu", ".o"))
        cmd = [nvcc, "-c", os.path.join(ROOT, "csrc", "cuda", src), "-o", obj, "-O3", std, "-Xptxas=-v",
               "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler=-fPIC",
               "-DCSD_WITH_CUDA=1", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{i}" for i in incs]
        if reuse and os.path.exists(obj + ".log") and os.path.exists(obj):
            with open(obj + ".log") as f:
                log = f.read()
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            with open(obj + ".log", "w") as f:
                f.write(log)
            if proc.returncode:
                raise RuntimeError(f"nvcc failed on {src}:\n{proc.stderr[-3000:]}")
        regs = {}
        kernels = ptxas_summary.parse(log)
        names = ptxas_summary.demangle(sorted({k["name"] for k in kernels}))
        for k in kernels:
            regs[names[k["name"]]] = k
        sass = subprocess.run([sass_loops.find_cuobjdump(), "-sass", obj], capture_output=True, text=True,
                              check=True).stdout
        for block in re.split(r"\n(?=\s*code for sm_|\s*Function : )", sass):
            m = re.match(r"\s*Function : (\S+)", block)
            if not m or "csd" not in m.group(1):
                continue
            name = sass_loops.demangle([m.group(1)])[0]
            short = re.sub(r"\(.*$", "", re.sub(r"^void ", "", name))
            if "BFloat16, c10::BFloat16" not in short:
                continue
            ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]
            body = sass_loops.longest_loop(ins)
            hot = sass_loops.hot_path(body)
            exps = sum(1 for _, t in body if "MUFU.EX2" in t)
            kind = next((k for k, pat in KERNEL_PATTERNS.items() if re.search(pat, short)), None)
            if kind is None:
                continue
            variant = _variant(short)
            # Entries per loop step: 16 for the exact bf16 variants, 8 otherwise (csd_cuda_rows.h).
            step = 8 if variant == "general" else 16
            reg = next((v for kname, v in regs.items() if re.sub(r"\(.*$", "", re.sub(r"^void ", "", kname)) == short),
                       None)
            entry = {"kernel": short, "regs": reg["regs"] if reg else None, "spills": (reg or {}).get("stores", 0),
                     "loop": len(body), "hot": hot, "exps": exps, "step": step,
                     "ipe": round(hot / step, 2), "exps_pe": round(exps / step, 3)}
            facts["raw"].append(entry)
            facts["kernels"][f"{kind} {variant}"] = entry
    return facts


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------
def load_build(path=BUILD_JSON):
    with open(path) as f:
        return json.load(f)


def rows_of(build, weighting="SS"):
    out = []
    for gpu in GPUS:
        for rows, vocab in GRID:
            paths = path_times(build, gpu, rows, vocab, weighting)
            lean = lean_compile_us(gpu, rows, vocab)
            copy = GPUS[gpu]["hbm_gbs"] * COPY_FRACTION
            for name, p in paths.items():
                # Against the bytes the *task* needs (a training step: read z
                # and t, write g = 6 B), so two-pass fwd+bwd tops out at 60%.
                moved = rows * vocab * {"forward-only": 4, "two-pass backward": 6, "two-pass fwd+bwd": 6,
                                        "fused one-read": 6}[name]
                out.append({"gpu": gpu, "shape": (rows, vocab), "path": name, **p,
                            "copy_fraction": moved / p["time"] / 1e3 / copy,
                            "vs_lean_compile": lean / p["time"] if name in ("two-pass fwd+bwd", "fused one-read")
                            else None})
    return out


def format_markdown(build, weighting="SS"):
    head = ("| GPU | N×V | path | HBM µs | latency µs | issue µs | waves+launch µs | predicted µs | bound | "
            "% of copy BW (task bytes) | vs lean compile (model) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows_of(build, weighting):
        vs = f"{r['vs_lean_compile']:.2f}×" if r["vs_lean_compile"] is not None else ""
        path = r["path"] + (" (planned)" if r.get("planned") else "")
        lines.append(f"| {r['gpu']} | {r['shape'][0]}×{r['shape'][1]} | {path} | {r['hbm']:.0f} | {r['latency']:.0f} | "
                     f"{r['issue']:.0f} | {r['waves']:.0f} | **{r['time']:.0f}** | {r['bound']} | "
                     f"{100 * r['copy_fraction']:.0f}% | {vs} |")
    return "\n".join(lines)


def timed_code_build(build):
    """The build facts with the timed (older) code's instructions per entry."""
    out = json.loads(json.dumps(build))
    for kind, ipe in TIMED_CODE_IPE.items():
        out["kernels"][f"{kind} SS"]["ipe"] = ipe
    return out


def measured_comparison(build):
    """The model against the H200 measurements (older code, lone synchronized
    calls): with the current build's instruction counts and with the timed code's."""
    old = timed_code_build(build)
    lines = ["| N×V | pass | measured ms | model ms (current build) | measured / model | "
             "model ms (timed code's instructions) | measured / model |", "|---|---|---|---|---|---|---|"]
    for (shape, mode), ms in H200_MEASURED.items():
        key = "two-pass fwd+bwd" if mode == "fwd+bwd" else "forward-only"
        pred = path_times(build, "H200", *shape)[key]["time"] / 1e3
        pred_old = path_times(old, "H200", *shape)[key]
        lines.append(f"| {shape[0]}×{shape[1]} | {mode} | {ms:.2f} | {pred:.3f} | {ms / pred:.1f}× | "
                     f"{pred_old['time'] / 1e3:.3f} ({pred_old['bound']}) | {ms / (pred_old['time'] / 1e3):.1f}× |")
    return "\n".join(lines)


def target_summary(build):
    lines = []
    for gpu in GPUS:
        for shape in TARGET_SHAPES:
            p = path_times(build, gpu, *shape)
            for name in ("fused one-read", "two-pass fwd+bwd"):
                t = p[name]["time"]
                moved = shape[0] * shape[1] * 6  # what a training step must move, whatever the path
                frac = moved / t / 1e3 / (GPUS[gpu]["hbm_gbs"] * COPY_FRACTION)
                vs = lean_compile_us(gpu, *shape) / t
                lines.append(f"- {gpu} {shape[0]}×{shape[1]} {name}: {t:.0f} µs, {100 * frac:.0f}% of copy "
                             f"bandwidth ({'meets' if frac >= 0.8 else 'misses'} ≥ 80%), {vs:.2f}× the modelled "
                             f"lean compile ({'meets' if vs >= 2.5 else 'misses'} ≥ 2.5×)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="rebuild the kernels (nvcc) and rewrite the build facts")
    ap.add_argument("--reuse-objects", action="store_true",
                    help="with --compile: read the objects already in build/cuda-model instead of running nvcc")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--weighting", default="SS", choices=["SS", "TS", "US", "MM"])
    args = ap.parse_args(argv)
    if args.compile:
        facts = compile_and_read(os.path.join(ROOT, "build", "cuda-model"), reuse=args.reuse_objects)
        with open(BUILD_JSON, "w") as f:
            json.dump(facts, f, indent=1, sort_keys=True)
        print(f"wrote {BUILD_JSON}", file=sys.stderr)
    build = load_build()
    print(format_markdown(build, args.weighting))
    print("\nTargets (bf16 SS):\n" + target_summary(build))
    print("\nH200 measurements (RESULTS_cuda.md, older code) against the model:\n" + measured_comparison(build))


if __name__ == "__main__":
    main()
