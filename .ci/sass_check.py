"""SASS check of the csd kernels in a CUDA build (no GPU needed).

    python .ci/sass_check.py csd_ext/_C*.so        (or a CUDA object .o)

Disassembles the build with cuobjdump -sass (CUDA_HOME/bin, PATH, or the
copy triton bundles; see benchmarks/sass_loops.py) and, for every csd kernel
and architecture:
  * fails on any local-memory access (LDL / STL): spills, or arrays the
    compiler could not keep in registers -- slow, and invisible to the
    ptxas spill counters when they come from a stack frame;
  * checks that the hot paths move 16 bytes per instruction: the fused
    kernel (csd_fused_kernel, sm_90+) fills shared memory with cp.async
    (LDGSTS.*.128) or bulk copies (UBLKCP) and writes the gradient with
    STG.E.128; the two-pass forward and backward kernels with equal 2- or
    4-byte student/teacher dtypes read with LDG.E.128.  A kernel that misses
    its check fails the run.
Prints one line per kernel and architecture.  Exit status 1 on a failure.
"""

import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from sass_loops import csd_sass_functions, demangle  # noqa: E402

LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9]+)*\b")
EQUAL_PAIRS = ("<float, float,", "<BFloat16, BFloat16,", "<Half, Half,")


def opcodes(block):
    ops = Counter()
    for text in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", block):
        t = text.strip()
        op = t.split()[1] if t.startswith("@") and len(t.split()) > 1 else t.split()[0]
        ops[op] += 1
    return ops


def requirement(name, ops):
    """(label, ok) of the 16-byte check for this kernel, or None when it has none."""
    async_copies = sum(n for op, n in ops.items() if op.startswith("LDGSTS") and op.endswith(".128"))
    bulk = sum(n for op, n in ops.items() if op.startswith("UBLKCP"))
    if "csd_fused_kernel" in name:
        if sum(ops.values()) < 64:  # the empty body below sm_90 (clusters): never launched there
            return None
        return "cp.async/bulk fill + STG.E.128", (async_copies + bulk) > 0 and ops["STG.E.128"] > 0
    if re.match(r"csd_(forward|backward)_kernel", name) and any(p in name for p in EQUAL_PAIRS):
        return "LDG.E.128", ops["LDG.E.128"] + ops["LDG.E.128.CONSTANT"] + async_copies + bulk > 0
    return None


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    found = [(mangled, arch, opcodes(block), len(LOCAL.findall(block)))
             for arch, mangled, block in csd_sass_functions(argv[1])]
    if not found:
        print("sass_check: no csd kernel in the SASS")
        return 1
    names = demangle([f[0] for f in found])
    failures = []
    print(f"sass_check: {len(found)} csd kernel builds; local-memory accesses, 16-byte accesses")
    for (_, arch, ops, local), name in sorted(zip(found, names), key=lambda x: (x[1], x[0][1])):
        short = re.sub(r"^void csd::gpu::|\(.*$", "", name).replace("c10::", "")
        req = requirement(short, ops)
        wide = {k: v for k, v in ops.items() if re.match(r"(LDG|STG|LDGSTS|UBLKCP)\S*128|UBLKCP", k)}
        status = "ok"
        if local:
            status = f"FAIL: {local} LDL/STL"
            failures.append(f"{arch} {short}: {local} local-memory accesses (LDL/STL)")
        if req is not None and not req[1]:
            status = f"FAIL: no {req[0]}"
            failures.append(f"{arch} {short}: hot path lacks {req[0]}")
        wide_txt = " ".join(f"{k}x{v}" for k, v in sorted(wide.items())) or "-"
        print(f"  {short:<70} {arch:<7} {status:<10} {wide_txt}")
    if failures:
        print(f"sass_check: FAILED ({len(failures)}):")
        for f in failures:
            print("  " + f)
        return 1
    print("sass_check: no local memory in csd kernels; 16-byte hot-path accesses present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
