"""Static size of each CUDA kernel's main loop, read from the SASS.

    python benchmarks/sass_loops.py csd_ext/_C.*.so [--filter BFloat16]

Without a GPU this is the best available proxy for the kernels' issue cost:
it disassembles the extension (cuobjdump -sass) and, for every csd kernel
and architecture, counts the instructions inside its longest loop that
reads global memory (the loop over a row's chunks), with the MUFU.EX2 (exp), BSSY (divergent
branch) and PRMT (byte shuffle) counts among them.  The fused kernel
(csd_fused_kernel) reads its rows from shared memory instead; a second table
gives, per element, the instructions and exps of each of its loops (max,
sums, gradient) on the fast path.  A static count includes
paths a step does not take (the tail step, scalar loads of misaligned rows),
so it bounds the executed count from above; "hot" estimates what a full,
aligned step executes (see hot_path).  Compare builds, not absolutes.
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
    """The longest range closed by a backward branch that loads from global
    memory (the chunk loop; CUB's reductions, after it, have backward
    branches too but read only shared memory), as [(address, text)]."""
    best = []
    for _start, _end, body in backward_branch_ranges(instructions):
        if len(body) > len(best) and any("LDG" in t for _, t in body):
            best = body
    return best


def backward_branch_ranges(instructions):
    """(start, end, body) of every range closed by a backward branch: the loops."""
    for addr, text in instructions:
        m = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            yield start, addr, [(a, t) for a, t in instructions if start <= a <= addr]


def basic_blocks(body):
    """Splits a loop into basic blocks: a block starts at a branch or
    convergence target and ends after a branch or call."""
    targets = set()
    for _, t in body:
        for pat in (r"BRA\s.*?(0x[0-9a-f]+)", r"BSSY\s+B\d+,\s*(0x[0-9a-f]+)"):
            m = re.search(pat, t)
            if m:
                targets.add(int(m.group(1), 16))
    blocks, cur = [], []
    for a, t in body:
        if a in targets and cur:
            blocks.append(cur)
            cur = []
        cur.append((a, t))
        if "BRA" in t or "CALL" in t:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def hot_path(body):
    """Instructions a full, aligned chunk step executes, estimated as the
    loop minus its cold blocks: the fetch variants for partial chunks,
    misaligned rows and the head-and-tail step (predicated loads, or only
    scalar 2- or 4-byte loads) and the slow-path calls (IEEE division's
    rare-operand fallback).  A heuristic read of the control flow, not a
    trace; it counts both sides of the few data-dependent branches left
    (a merge into an empty state), so it errs high."""
    hot = 0
    for block in basic_blocks(body):
        loads = [t for _, t in block if "LDG" in t]
        cold = (any("CALL" in t for _, t in block)
                or any(re.match(r"@\S+ LDG", t) for t in loads)
                or (loads and not any(re.match(r"LDG\.E\.(128|64)", t) for t in loads)))
        hot += 0 if cold else len(block)
    return hot


def innermost_loops(instructions, marker):
    """Loops (backward-branch ranges) holding an instruction that matches
    `marker` and holding no smaller such loop, in address order."""
    loops = [(start, end, body) for start, end, body in backward_branch_ranges(instructions)
             if any(re.search(marker, t) for _, t in body)]
    return [(s, e, b) for s, e, b in loops
            if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2, _ in loops)]


def fused_loops(instructions):
    """The fused kernel's per-element loops over shared memory: step 1 (the
    max, packed bf16 VHMNMX / FMNMX), step 2 (exp + sums), step 3 (gradient,
    second moments, the 16-byte store), and the masked max of threads with a
    -inf.  For each: all its instructions, and the fast path's -- the loop
    without the basic blocks of the masked path (FSETP: the per-element
    -inf tests) and of the scalar stores of a misaligned row's ends
    (STG.E.U16 / STG.E without .128).  One iteration handles one 16-byte
    vector of student and one of teacher logits."""
    out = []
    for _s, _e, body in innermost_loops(instructions, r"^(@\S+ )?LDS\.128|HMNMX"):
        blocks = basic_blocks(body)
        fast = [b for b in blocks
                if not any("FSETP" in t for _, t in b)
                and not any(re.search(r"STG\.E(\.U16)?\s", t) for _, t in b)]
        fast_n = sum(len(b) for b in fast)
        ex2 = sum("MUFU.EX2" in t for b in fast for _, t in b)
        ops = " ".join(t.split()[1] if t.startswith("@") else t.split()[0] for _, t in body)
        kind = ("max" if "HMNMX" in ops and "MUFU" not in ops else
                "grad" if "STG" in ops else "sums" if "MUFU.EX2" in ops else "masked max")
        out.append((kind, len(body), fast_n, ex2))
    return out


def fused_element_loops(instructions, elem_bytes):
    """The fused kernel's per-element loops with what one iteration of each
    costs and handles, for the analytic model (benchmarks/cuda_model.py):
    [{kind, instructions, fast, ex2, vectors, elements, elements_from}] in
    address order, kinds "fill" (cp.async: LDGSTS), "max", "sums", "grad",
    "masked max".  `fast` drops the cold basic blocks: the fill's scalar
    loads and -inf padding of a misaligned row's ends (LDG/STS without
    .128), and, as in fused_loops, the masked selects (FSETP) and scalar
    stores of the other loops.  `elements` (per iteration) is derived from
    the SASS: the 16-byte data accesses of the fast path (fill: LDGSTS.128;
    steps: LDS.128), half of them the student's and half the teacher's, so
    elements = accesses / 2 x 16 / elem_bytes; `elements_from` says "sass",
    or None when the count is odd or zero (the caller then falls back to
    the template constant and says so)."""
    out = []
    for _s, _e, body in innermost_loops(instructions, r"LDGSTS|^(@\S+ )?LDS\.128|HMNMX"):
        blocks = basic_blocks(body)
        ops = " ".join(t.split()[1] if t.startswith("@") else t.split()[0] for _, t in body)
        if "LDGSTS" in ops:
            kind = "fill"
            fast = [b for b in blocks
                    if not any(re.search(r"\bLDG\.", t) or re.search(r"\bSTS(\.U16)?\s", t) for _, t in b)]
            vec = [t for b in fast for _, t in b if re.search(r"LDGSTS\S*\.128", t)]
        else:
            kind = ("max" if "HMNMX" in ops and "MUFU" not in ops else
                    "grad" if "STG" in ops else "sums" if "MUFU.EX2" in ops else "masked max")
            fast = [b for b in blocks
                    if not any("FSETP" in t for _, t in b)
                    and not any(re.search(r"STG\.E(\.U16)?\s", t) for _, t in b)]
            vec = [t for b in fast for _, t in b if re.match(r"(@\S+ )?LDS\.128", t)]
        n_vec = len(vec)
        derived = n_vec > 0 and n_vec % 2 == 0
        out.append({"kind": kind, "instructions": len(body), "fast": sum(len(b) for b in fast),
                    "ex2": sum("MUFU.EX2" in t for b in fast for _, t in b), "vectors": n_vec,
                    "elements": n_vec // 2 * 16 // elem_bytes if derived else None,
                    "elements_from": "sass" if derived else None})
    return out


def print_fused(rows, names, filt):
    """Per element (fast path) of each fused-kernel loop, and their sum."""
    print()
    print("fused kernel (csd_fused_kernel): per-element loops over shared memory, fast path "
          "(no -inf in the thread's vectors; aligned stores)")
    print(f"{'kernel':<40} {'arch':<7} {'loops: kind instr/elem (ex2/elem)':<70} {'instr/el':>8} {'ex2/el':>6}")
    for (_, arch, _total, _size, _hot, _ops, loops), name in sorted(zip(rows, names), key=lambda x: (x[1], x[0][1])):
        short = re.sub(r"^void csd::gpu::|\(.*$", "", name).replace("c10::", "")
        if "csd_fused_kernel" not in short or (filt and filt not in short) or not loops:
            continue
        width = 4 if "<float" in short else 8  # elements per 16-byte vector
        # Without packed bf16 the masked max (FSETP per element) is step 1 itself.
        bf16 = "BFloat16" in short
        hot = [(k, f / width, x / width) if k != "masked max" else ("max", n / width, 0.0)
               for k, n, f, x in loops if k != "masked max" or not bf16]
        cells = "  ".join(f"{k} {i:.1f} ({x:.1f})" for k, i, x in hot)
        print(f"{short:<40} {arch:<7} {cells:<70} {sum(i for _, i, _ in hot):>8.1f} "
              f"{sum(x for _, _, x in hot):>6.1f}")


def csd_sass_functions(binary):
    """(arch, mangled name, SASS text) of every csd kernel in ``binary`` (a .so, .o or .cubin),
    in cuobjdump's order; the one parser of cuobjdump's listing for this script,
    .ci/sass_check.py and cuda_model.py."""
    sass = subprocess.run([find_cuobjdump(), "-sass", binary], capture_output=True, text=True, check=True).stdout
    arch = "?"
    for block in re.split(r"\n(?=\s*code for sm_|\s*Function : )", sass):
        m = re.match(r"\s*code for (sm_\w+)", block)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", block)
        if m and "csd" in m.group(1):
            yield arch, m.group(1), block


def instructions(block):
    """(address, instruction text) of each instruction in one function's SASS."""
    return [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", help="the built extension (.so) or a CUDA object (.o)")
    ap.add_argument("--filter", default="", help="only kernels whose demangled name contains this")
    args = ap.parse_args()
    rows = []
    for arch, mangled, block in csd_sass_functions(args.binary):
        ins = instructions(block)
        body = longest_loop(ins)
        ops = Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for _, t in body)
        fused = fused_loops(ins) if "csd_fused_kernel" in mangled else []
        rows.append((mangled, arch, len(ins), len(body), hot_path(body), ops, fused))
    names = demangle([r[0] for r in rows])
    print(f"{'kernel':<78} {'arch':<7} {'total':>6} {'loop':>5} {'hot':>4} {'EX2':>4} {'BSSY':>5} {'PRMT':>5}")
    for (_, arch, total, size, hot, ops, _fused), name in sorted(zip(rows, names), key=lambda x: (x[1], x[0][1])):
        short = re.sub(r"^void csd::gpu::|\(.*$", "", name).replace("c10::", "")
        if args.filter and args.filter not in short:
            continue
        print(f"{short:<78} {arch:<7} {total:>6} {size:>5} {hot:>4} {ops['MUFU.EX2']:>4} {ops['BSSY']:>5} "
              f"{ops['PRMT']:>5}")
    print_fused(rows, names, args.filter)


if __name__ == "__main__":
    main()
