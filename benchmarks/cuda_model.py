"""Analytic model of csd_ext's CUDA kernels (issue 13): predicted time of each
kernel path on each shape of the benchmark grid, on H100 and H200, without a GPU.

    python benchmarks/cuda_model.py                      # the tables, from cuda_model_build.json
    python benchmarks/cuda_model.py --weighting TS       # the path table for another weighting

Regenerating everything after a kernel change (one command, from the repo
root; needs nvcc (CUDA_HOME, default /usr/local/cuda) and the CUDA venv of
.ci/cuda_build_check.sh for torch's headers and cuobjdump; ~5-15 min on
2 cores):

    python benchmarks/cuda_model.py --from-build --write-docs

--from-build compiles csrc/cuda/csd_cuda_{forward,backward,fused}.cu for sm_90
(nvcc -c -Xptxas=-v, objects and logs in build/cuda-model/), reads registers,
spills and static shared memory from ptxas -v (.ci/ptxas_summary.py) and the
SASS loops (cuobjdump -sass, benchmarks/sass_loops.py), and rewrites
benchmarks/cuda_model_build.json; --write-docs rewrites the generated block of
docs/kernels.md's "Analytic model" section (between its cuda_model.py
markers).  --reuse-objects reads the objects already built instead of
running nvcc.  The JSON keeps a digest of csrc/cuda/* and csrc/*.h; every run
warns when the sources no longer match it (the facts are stale).  Any Python 3 with no extra packages runs the model itself.

Time of one kernel = the largest of four floors:

1. HBM:      bytes moved / bandwidth (the achievable copy bandwidth, COPY_FRACTION
             of the nominal figure until a GPU measures it);
2. latency:  bytes read / (bytes in flight per SM x SMs / HBM latency), Little's law;
             bytes in flight = resident blocks (from the registers) x threads x the
             bytes a thread's loop step loads (the fused kernel: every resident
             block's whole segment, which its threads issue before any wait);
3. issue:    instructions per element / (4 warp schedulers x 32 lanes x clock x SMs),
             or the exps per element on the 16-lane special-function unit if slower;
4. waves:    the HBM floor stretched by wave quantisation (blocks rounded up to
             whole waves of resident blocks) plus a fixed cost per launch; for
             the fused kernel at one resident block per SM, at least one HBM
             latency plus its steps 2 and 3 per block (nothing overlaps them).

A path's time is the sum over its kernels (their launches run back to back).
Instructions per element, exps per element and registers come from the real
build.  Two-pass kernels: the hot path of their longest global-memory loop
divided by the entries one step handles.  The fused kernel (csd_fused_kernel)
has several per-element loops -- the cp.async fill, the max, the sums, the
gradient -- so its cost per element is the SUM over them of each loop's
fast-path instructions divided by the elements one iteration handles (read
from its 16-byte accesses in the SASS; see fused_entry), and its launch plan
is plan_fused (csd_cuda_fused_plan.h, whose constants are read from the
header).  PLANNED_FUSED, the design figures from before the kernel existed,
remains only as a fallback for a build JSON without a fused entry, and such
rows are labelled "(planned)".

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

# The fused one-read kernel's design figures (issue 13), from before it was
# built: a FALLBACK, used only for a weighting whose `fused <W>` entry is
# missing from cuda_model_build.json (a build without csd_cuda_fused.cu), and
# labelled "(planned)" in the table.  Instructions per element: the two-pass
# forward's and backward's hot loops together minus the backward's second
# load of z and t (~4 per element); 64 KB per SM in flight.
PLANNED_FUSED = {"inflight_kb_per_sm": 64.0, "ipe_discount": 4.0}

# The built fused kernel's launch plan: plan_fused in csd_cuda_fused_plan.h,
# ported below; its constants are read from that header so the two cannot
# drift apart.  Shared memory of an H100/H200 (cudaDeviceProp):
# sharedMemPerBlockOptin 227 KB, sharedMemPerMultiprocessor 228 KB.
FUSED_PLAN_HEADER = os.path.join(ROOT, "csrc", "cuda", "csd_cuda_fused_plan.h")
SMEM_PER_BLOCK_OPTIN = 227 * 1024
SMEM_PER_SM = 228 * 1024


def fused_constants(path=FUSED_PLAN_HEADER):
    """kFused* constants of csd_cuda_fused_plan.h, as {name: int}."""
    with open(path) as f:
        text = f.read()
    found = dict(re.findall(r"constexpr\s+(?:int|int64_t|size_t)\s+(kFused\w+)\s*=\s*(\d+)", text))
    need = ("kFusedThreads", "kFusedMaxCluster", "kFusedStages", "kFusedMinSegment", "kFusedSmemReserve",
            "kFusedSlotBytes")
    missing = [k for k in need if k not in found]
    if missing:
        raise RuntimeError(f"cuda_model: {path} no longer defines {missing}; update fused_plan()")
    return {k: int(v) for k, v in found.items()}


def fused_plan(rows, vocab, sms, elem_bytes=2, smem_per_block=SMEM_PER_BLOCK_OPTIN, smem_per_sm=SMEM_PER_SM):
    """plan_fused (csd_cuda_fused_plan.h) in Python: {cluster, seg_len, vecs,
    blocks, smem_bytes (dynamic), blocks_per_sm (by shared memory and
    threads, as the plan counts them), fits}."""
    k = fused_constants()
    w = 16 // elem_bytes

    def cdiv(a, b):
        return -(-a // b)

    def make(c):
        seg = cdiv(cdiv(vocab, c), w) * w
        vecs = seg // w + 1
        smem = k["kFusedSlotBytes"] + 2 * vecs * 16
        per_block = smem + k["kFusedSmemReserve"]
        by_smem = smem_per_sm // per_block
        bps = min(by_smem, 2048 // k["kFusedThreads"])
        return {"cluster": c, "seg_len": seg, "vecs": vecs, "blocks": rows * c, "smem_bytes": smem,
                "blocks_per_sm": bps, "fits": smem <= smem_per_block and bps >= 1}

    best = None
    for want_two in (True, False):
        c = 1
        while c <= k["kFusedMaxCluster"] and best is None:
            p = make(c)
            if p["fits"] and (p["blocks_per_sm"] >= 2 or not want_two):
                best = p
            c *= 2
    if best is None:
        return {"fits": False}
    while (best["cluster"] < k["kFusedMaxCluster"] and rows * best["cluster"] < sms * best["blocks_per_sm"]
           and cdiv(vocab, 2 * best["cluster"]) >= k["kFusedMinSegment"]):
        best = make(2 * best["cluster"])
    return best


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
                   slots_per_sm, launches=1, serial_us=0.0):
    """The four floors of one kernel (µs) and their max: {name: µs, "time": µs, "bound": name}.
    serial_us: a kernel whose SMs cannot overlap one block's memory phase
    with another's compute (the fused kernel at one block per SM) needs at
    least this long per SM; it raises the waves floor."""
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
    waves = max(hbm * quantised, serial_us) + launches * LAUNCH_US
    floors = {"hbm": hbm, "latency": latency, "issue": issue, "waves": waves}
    bound = max(floors, key=floors.get)
    if bound == "waves" and serial_us > hbm * quantised:
        bound = "waves (serial)"  # one block per SM: its memory and compute phases do not overlap
    return {**floors, "time": floors[bound.split()[0]], "bound": bound}


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
    out["fused one-read"] = fused_time_us(build, gpu, rows, vocab, weighting, fwd, bwd, elem_bytes)
    return out


def fused_time_us(build, gpu, rows, vocab, weighting, fwd, bwd, elem_bytes=2):
    """The fused kernel's floors on one shape: from its build entry (`fused
    <W>`: registers, static shared memory, the sum of its per-element loops'
    instructions) and the launch plan; from the design figures (PLANNED_FUSED,
    marked planned) when the build has no entry for this weighting."""
    g = GPUS[gpu]
    n = rows * vocab
    plan = fused_plan(rows, vocab, g["sms"], elem_bytes)
    if not plan["fits"]:
        raise ValueError(f"fused kernel: a {vocab}-entry row does not fit in 8 blocks' shared memory")
    cluster = plan["cluster"]
    entry = build["kernels"].get(weighting_kernel("fused", weighting))
    if entry is None:  # the pre-build design figures (labelled "planned")
        ipe = fwd["ipe"] + bwd["ipe"] - PLANNED_FUSED["ipe_discount"]
        exps_pe = max(fwd["exps_pe"], bwd["exps_pe"])
        slots = plan["blocks_per_sm"]
        inflight = PLANNED_FUSED["inflight_kb_per_sm"] * 1024
        serial = 0.0
    else:
        ipe, exps_pe = entry["ipe"], entry["exps_pe"]
        # Resident blocks: the plan counts shared memory and threads; the
        # registers and the static shared memory (CUB's scratch) cap it too.
        per_block_smem = plan["smem_bytes"] + entry["smem_static"] + fused_constants()["kFusedSmemReserve"]
        slots = min(plan["blocks_per_sm"], blocks_per_sm(entry["regs"], per_block_smem, SMEM_PER_SM))
        # Every thread issues all its copies before its first wait: the
        # whole segment of every resident block is in flight.
        inflight = slots * 2 * plan["seg_len"] * elem_bytes
        # One resident block per SM: the next row's copies wait for this
        # block to finish steps 2 and 3 (only step 1 overlaps the fill), so
        # each SM spends per block at least one HBM latency plus those steps.
        serial = 0.0
        if slots == 1:
            after_fill = entry["ipe_after_fill"]
            clock = g["clock_ghz"] * 1e3
            per_block = g["latency_ns"] * 1e-3 + plan["seg_len"] * after_fill / (LANES_PER_CLOCK * clock)
            serial = math.ceil(plan["blocks"] / ((g["sms"] // cluster) * cluster)) * per_block
    used_sms = (g["sms"] // cluster) * cluster  # clusters tile the SMs whole
    # Blocks of whole clusters on the SMs that clusters can use: the wave
    # floor counts them against all SMs' slots, scaled by the unused SMs.
    # Two launches: the fused kernel, and the training step's backward
    # (csd_backward_reuse_), which after a mean or sum backward reads only
    # grad_loss and returns (its bytes are negligible; its launch is not).
    t = kernel_time_us(gpu, elements=n, read_bytes=2 * elem_bytes * n, write_bytes=elem_bytes * n, ipe=ipe,
                       exps_pe=exps_pe, inflight_per_sm=inflight,
                       blocks=math.ceil(plan["blocks"] * g["sms"] / used_sms), slots_per_sm=slots, launches=2,
                       serial_us=serial)
    t.update(cluster=cluster, slots=slots, planned=entry is None)
    return t


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


# Elements (z, t pairs) per iteration of each fused loop, from the kernel's
# template constants: one 16-byte vector of z and one of t, W = 16 / sizeof(T)
# = 8 bf16 (csd_cuda_fused_kernel.cuh: `v * W`, `cp_async_16`, `L::load`).
# Used only where the SASS count of 16-byte accesses does not give it.
FUSED_BF16_ELEMENTS_PER_ITERATION = 8


def fused_entry(short, ins, reg, sass_loops):
    """The fused kernel's build facts (bf16): registers, spills, static shared
    memory (ptxas -v), and instructions / exps per element as the SUM over
    its per-element loops of (fast-path instructions / elements per
    iteration).  The kernel has several loops (fill, max, sums, gradient,
    and the masked max that only threads holding a -inf run), so the
    two-pass kernels' "longest loop" reading would be wrong for it.  The
    masked max is left out of the sum (the fast path: no -inf in a thread's
    vectors; bf16 finds the max with packed max.bf16x2 instead).  Every loop
    and how its elements per iteration were found is recorded."""
    loops = sass_loops.fused_element_loops(ins, elem_bytes=2)
    kinds = [lp["kind"] for lp in loops]
    for want in ("fill", "max", "sums", "grad"):
        if kinds.count(want) != 1:
            raise RuntimeError(f"{short}: expected one '{want}' loop in the SASS, found {kinds}; "
                               "sass_loops.fused_element_loops needs updating for this kernel")
    for lp in loops:
        if lp["elements"] is None:
            lp["elements"] = FUSED_BF16_ELEMENTS_PER_ITERATION
            lp["elements_from"] = ("template constant W = 16 / sizeof(bf16) "
                                   "(SASS count of 16-byte accesses odd or 0)")
        elif lp["elements"] != FUSED_BF16_ELEMENTS_PER_ITERATION:
            raise RuntimeError(f"{short}: the {lp['kind']} loop handles {lp['elements']} elements per iteration "
                               f"by its SASS, the source says {FUSED_BF16_ELEMENTS_PER_ITERATION}")
        lp["per_element"] = round(lp["fast"] / lp["elements"], 3)
        lp["exps_per_element"] = round(lp["ex2"] / lp["elements"], 3)
        lp["in_sum"] = lp["kind"] != "masked max"
    summed = [lp for lp in loops if lp["in_sum"]]
    ipe = sum(lp["fast"] / lp["elements"] for lp in summed)
    after_fill = sum(lp["fast"] / lp["elements"] for lp in summed if lp["kind"] in ("sums", "grad"))
    return {"kernel": short, "regs": reg["regs"] if reg else None, "spills": (reg or {}).get("stores", 0),
            "smem_static": (reg or {}).get("smem", 0), "loops": loops,
            "ipe": round(ipe, 2), "ipe_after_fill": round(after_fill, 2),
            "exps_pe": round(sum(lp["ex2"] / lp["elements"] for lp in summed), 3),
            "derivation": "sum over the loops with in_sum of fast / elements (sass_loops.fused_element_loops); "
                          "dynamic shared memory per block comes from the launch plan (fused_plan)"}


def sources_digest():
    """sha256 over the sources the kernels are built from (csrc/cuda/* and
    the shared headers csrc/*.h), to tell whether the build facts are stale."""
    import glob
    import hashlib
    h = hashlib.sha256()
    paths = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*")) + glob.glob(os.path.join(ROOT, "csrc", "*.h"))
    for path in sorted(paths):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def compile_and_read(out_dir, arch="90", reuse=False):
    """nvcc -c the forward, backward and fused .cu for sm_<arch> with ptxas -v;
    returns the build facts for bf16/bf16: registers, spills, static shared
    memory, instructions and exps per element."""
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
    facts = {"arch": f"sm_{arch}", "kernels": {}, "raw": [], "sources_sha256": sources_digest()}
    os.makedirs(out_dir, exist_ok=True)
    for src in ("csd_cuda_forward.cu", "csd_cuda_backward.cu", "csd_cuda_fused.cu"):
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
        for _arch, mangled, block in sass_loops.csd_sass_functions(obj):
            name = sass_loops.demangle([mangled])[0]
            short = re.sub(r"\(.*$", "", re.sub(r"^void ", "", name))
            ins = sass_loops.instructions(block)
            reg = next((v for kname, v in regs.items() if re.sub(r"\(.*$", "", re.sub(r"^void ", "", kname)) == short),
                       None)
            if re.search(r"csd_fused_kernel<c10::BFloat16,", short):
                entry = fused_entry(short, ins, reg, sass_loops)
                facts["raw"].append(entry)
                facts["kernels"][f"fused {_variant(short)}"] = entry
                continue
            if "BFloat16, c10::BFloat16" not in short:
                continue
            body = sass_loops.longest_loop(ins)
            hot = sass_loops.hot_path(body)
            exps = sum(1 for _, t in body if "MUFU.EX2" in t)
            kind = next((k for k, pat in KERNEL_PATTERNS.items() if re.search(pat, short)), None)
            if kind is None:
                continue
            variant = _variant(short)
            # Entries per loop step: 16 for the exact bf16 variants, 8 otherwise (csd_cuda_rows.h).
            step = 8 if variant == "general" else 16
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


WEIGHTINGS = ("SS", "TS", "US", "MM")
# The issue's bandwidth target applies to shapes moving >= 256 MB (N·V·6 B,
# bf16 fwd+bwd) with 32k <= V <= 256k; the 2.5x one to TARGET_SHAPES.
TARGET_MIN_BYTES = 256 * 2**20
TARGET_VOCAB = (32000, 256000)


def fused_facts_table(build):
    """The fused kernel's build facts per weighting (markdown)."""
    lines = ["| weighting | kernel | registers | spills | static smem | per-element loops: fast-path instructions / "
             "elements per iteration | instr / element | exps / element |", "|---|---|---|---|---|---|---|---|"]
    for w in WEIGHTINGS:
        e = build["kernels"].get(weighting_kernel("fused", w))
        if e is None:
            lines.append(f"| {w} | (not in the build: planned design figures) | | | | | | |")
            continue
        loops = ", ".join(f"{lp['kind']} {lp['fast']}/{lp['elements']}"
                          + ("" if lp["elements_from"] == "sass" else "†") for lp in e["loops"] if lp["in_sum"])
        kernel = e["kernel"].replace("csd::gpu::", "").replace("c10::", "")
        lines.append(f"| {w} | `{kernel}` | {e['regs']} | {e['spills']} B | {e['smem_static']} B | {loops} | "
                     f"{e['ipe']:.1f} | {e['exps_pe']:.2f} |")
    return "\n".join(lines)


def target_rows(build):
    """The fused path against the issue's targets, every weighting: one dict
    per (weighting, GPU, grid shape) the targets cover."""
    out = []
    for w in WEIGHTINGS:
        for gpu in GPUS:
            for shape in GRID:
                rows, vocab = shape
                in_bw = rows * vocab * 6 >= TARGET_MIN_BYTES and TARGET_VOCAB[0] <= vocab <= TARGET_VOCAB[1]
                if not in_bw and shape not in TARGET_SHAPES:
                    continue
                p = path_times(build, gpu, rows, vocab, w)
                t = p["fused one-read"]["time"]
                frac = rows * vocab * 6 / t / 1e3 / (GPUS[gpu]["hbm_gbs"] * COPY_FRACTION)
                vs = lean_compile_us(gpu, rows, vocab) / t if shape in TARGET_SHAPES else None
                out.append({"weighting": w, "gpu": gpu, "shape": shape, "time": t,
                            "bound": p["fused one-read"]["bound"], "planned": p["fused one-read"]["planned"],
                            "two_pass": p["two-pass fwd+bwd"]["time"], "copy_fraction": frac if in_bw else None,
                            "vs_lean_compile": vs})
    return out


def _where(rows):
    return ", ".join(f"{r['weighting']} {r['gpu']} {r['shape'][0]}×{r['shape'][1]}" for r in rows)


def target_summary(build):
    """Markdown: the fused path at the target shapes, every weighting, and a verdict."""
    lines = ["| weighting | GPU | N×V | fused µs | bound | two-pass fwd+bwd µs | % of copy BW (≥ 80%) | "
             "vs lean compile (≥ 2.5×) |", "|---|---|---|---|---|---|---|---|"]
    rows = target_rows(build)
    for r in rows:
        frac = "" if r["copy_fraction"] is None else f"{100 * r['copy_fraction']:.0f}%"
        vs = "" if r["vs_lean_compile"] is None else f"{r['vs_lean_compile']:.2f}×"
        planned = " (planned)" if r["planned"] else ""
        lines.append(f"| {r['weighting']} | {r['gpu']} | {r['shape'][0]}×{r['shape'][1]} | {r['time']:.0f}{planned} | "
                     f"{r['bound']} | {r['two_pass']:.0f} | {frac} | {vs} |")
    fr = [r["copy_fraction"] for r in rows if r["copy_fraction"] is not None]
    vs = [r["vs_lean_compile"] for r in rows if r["vs_lean_compile"] is not None]
    bw_miss = [r for r in rows if r["copy_fraction"] is not None and r["copy_fraction"] < 0.8]
    vs_miss = [r for r in rows if r["vs_lean_compile"] is not None and r["vs_lean_compile"] < 2.5]
    verdict = (f"Verdict of the model: the fused path reaches {100 * min(fr):.0f}–{100 * max(fr):.0f}% of copy "
               f"bandwidth where the ≥ 80% target applies ("
               + ("met at every weighting, GPU and shape" if not bw_miss else "missed at " + _where(bw_miss))
               + f"), and {min(vs):.2f}–{max(vs):.2f}× the modelled lean compile at the three target shapes ("
               + ("met everywhere" if not vs_miss else "missed at " + _where(vs_miss)) + ").")
    return "\n".join(lines) + "\n\n" + verdict


DOCS = os.path.join(ROOT, "docs", "kernels.md")
DOCS_BEGIN = "<!-- cuda_model.py --write-docs: begin (generated; do not edit by hand) -->"
DOCS_END = "<!-- cuda_model.py --write-docs: end -->"


def docs_block(build):
    """The generated part of docs/kernels.md's "Analytic model" section."""
    arch = build.get("arch", "?")
    planned = [w for w in WEIGHTINGS if weighting_kernel("fused", w) not in build["kernels"]]
    source = (f"the built kernel's SASS and ptxas -v ({arch})" if not planned
              else f"the design figures (PLANNED_FUSED) for {', '.join(planned)}: no build entry")
    return "\n\n".join([
        f"Fused kernel facts (`csd_fused_kernel`, bf16, {arch} build; † = elements per iteration from the "
        "template constant, not the SASS):",
        fused_facts_table(build),
        f"Model table (bf16 SS; the fused row from {source}):",
        format_markdown(build, "SS"),
        "**What the model predicts for the targets** (fused one-read path, bf16 fwd+bwd, every weighting; "
        "two-pass fwd+bwd for comparison):",
        target_summary(build)])


def write_docs(build, path=DOCS):
    with open(path) as f:
        text = f.read()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise RuntimeError(f"{path}: no {DOCS_BEGIN!r} ... {DOCS_END!r} markers")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    with open(path, "w") as f:
        f.write(head + DOCS_BEGIN + "\n\n" + docs_block(build) + "\n\n" + DOCS_END + tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-build", "--compile", dest="from_build", action="store_true",
                    help="rebuild the kernels for sm_90 (nvcc) and rewrite cuda_model_build.json from them")
    ap.add_argument("--reuse-objects", action="store_true",
                    help="with --from-build: read the objects already in build/cuda-model instead of running nvcc")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the generated block of docs/kernels.md's model section")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--weighting", default="SS", choices=list(WEIGHTINGS))
    args = ap.parse_args(argv)
    if args.from_build:
        facts = compile_and_read(os.path.join(ROOT, "build", "cuda-model"), reuse=args.reuse_objects)
        missing = [w for w in WEIGHTINGS if weighting_kernel("fused", w) not in facts["kernels"]]
        if missing:
            raise RuntimeError(f"the build has no fused kernel entry for {missing}")
        with open(BUILD_JSON, "w") as f:
            json.dump(facts, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {BUILD_JSON}", file=sys.stderr)
    build = load_build()
    if build.get("sources_sha256") != sources_digest():
        print("warning: csrc/cuda or csrc/*.h changed since cuda_model_build.json was made; "
              "rerun with --from-build --write-docs", file=sys.stderr)
    if args.write_docs:
        write_docs(build)
        print(f"wrote the model block of {DOCS}", file=sys.stderr)
    print(fused_facts_table(build))
    print()
    print(format_markdown(build, args.weighting))
    print("\nTargets (fused path, every weighting):\n" + target_summary(build))
    print("\nH200 measurements (RESULTS_cuda.md, older code) against the model:\n" + measured_comparison(build))


if __name__ == "__main__":
    main()
