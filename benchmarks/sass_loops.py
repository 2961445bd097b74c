"""Static size of each CUDA kernel's main loop, read from the SASS.

    python benchmarks/sass_loops.py csd_ext/_C.*.so [--filter BFloat16]

Without a GPU this is the best available proxy for the kernels' issue cost:
it disassembles the extension (cuobjdump -sass) and, for every csd kernel
and architecture, counts the instructions inside its longest loop that
reads global memory (the loop over a row's chunks), with the MUFU.EX2 (exp), BSSY (divergent
branch) and PRMT (byte shuffle) counts among them.  A static count includes
paths a step does not take (the tail step, scalar loads of misaligned rows),
so it bounds the executed count from above; compare builds, not absolutes.
cuobjdump comes from CUDA_HOME/bin, PATH, or the copy triton bundles.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import Counter


def find_cuobjdump():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    if shutil.which("cuobjdump"):
        candidates.append(shutil.which("cuobjdump"))
    try:
        import triton  # noqa: F401  (its wheel ships cuobjdump)

        candidates += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("sass_loops: no cuobjdump (set CUDA_HOME, or install triton, which bundles one)")


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def longest_loop(instructions):
    """(size, opcode counts) of the longest range closed by a backward branch
    that loads from global memory (the chunk loop; CUB's reductions, after
    it, have backward branches too but read only shared memory)."""
    best = (0, Counter())
    for addr, text in instructions:
        m = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = [t for a, t in instructions if start <= a <= addr]
        if len(body) > best[0] and any("LDG" in t for t in body):
            ops = Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in body)
            best = (len(body), ops)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", help="the built extension (.so) or a CUDA object (.o)")
    ap.add_argument("--filter", default="", help="only kernels whose demangled name contains this")
    args = ap.parse_args()
    sass = subprocess.run([find_cuobjdump(), "-sass", args.binary], capture_output=True, text=True, check=True).stdout
    arch = "?"
    rows = []
    for block in re.split(r"\n(?=\s*code for sm_|\s*Function : )", sass):
        m = re.match(r"\s*code for (sm_\w+)", block)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", block)
        if not m or "csd" not in m.group(1):
            continue
        ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]
        size, ops = longest_loop(ins)
        rows.append((m.group(1), arch, len(ins), size, ops))
    names = demangle([r[0] for r in rows])
    print(f"{'kernel':<78} {'arch':<7} {'total':>6} {'loop':>5} {'EX2':>4} {'BSSY':>5} {'PRMT':>5}")
    for (_, arch, total, size, ops), name in sorted(zip(rows, names), key=lambda x: (x[1], x[0][1])):
        short = re.sub(r"^void csd::gpu::|\(.*$", "", name).replace("c10::", "")
        if args.filter and args.filter not in short:
            continue
        print(f"{short:<78} {arch:<7} {total:>6} {size:>5} {ops['MUFU.EX2']:>4} {ops['BSSY']:>5} {ops['PRMT']:>5}")


if __name__ == "__main__":
    main()
