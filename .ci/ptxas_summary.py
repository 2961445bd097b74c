"""Summarises `nvcc -Xptxas -v` output: registers, stack and spills per kernel.

    python .ci/ptxas_summary.py BUILD_LOG [--fail-on-spills]

Kernels are matched by their demangled name; only csd_ext's own kernels (in
namespace csd::) are listed and checked.  Exit status 1 with --fail-on-spills
when any of them spills, 2 when the log holds no csd kernel at all.
"""

import re
import shutil
import subprocess
import sys
from collections import defaultdict

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
REGS = re.compile(r"Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")  # static shared memory (the fused kernel adds dynamic, docs/kernels.md)


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name):
    """csd::gpu::(anonymous namespace)::csd_forward_kernel<32, 8, float, c10::BFloat16, float>(...)
    -> csd_forward_kernel<32, 8, float, c10::BFloat16, float>"""
    name = re.sub(r"^void ", "", name)
    depth = 0  # cut the parameter list: the first '(' outside template brackets
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            name = name[:i]
            break
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    return name.replace("csd::gpu::", "").replace("c10::", "")


def parse(text):
    kernels = []  # (mangled, arch, regs, stack, stores, loads)
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"name": m["name"], "arch": m["arch"]}
            continue
        if current is None:
            continue
        m = SPILL.search(line)
        if m:
            current.update(stack=int(m["stack"]), stores=int(m["stores"]), loads=int(m["loads"]))
        m = REGS.search(line)
        if m:
            current["regs"] = int(m["regs"])
            s = SMEM.search(line)
            current["smem"] = int(s["smem"]) if s else 0
            kernels.append(current)
            current = None
    return kernels


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    with open(argv[1], errors="replace") as f:
        kernels = parse(f.read())
    names = demangle(sorted({k["name"] for k in kernels}))
    ours = [k for k in kernels if re.match(r"(void )?csd::", names[k["name"]])]
    if not ours:
        print("ptxas summary: no csd kernel found in the log (was -Xptxas=-v passed?)")
        return 2
    rows = defaultdict(dict)
    spilled = []
    for k in ours:
        key = short(names[k["name"]])
        rows[key][k["arch"]] = k
        if k.get("stores", 0) or k.get("loads", 0):
            spilled.append((key, k))
    archs = sorted({k["arch"] for k in ours})
    print(f"ptxas summary: {len(rows)} csd kernels x {len(archs)} archs ({', '.join(archs)}); "
          "registers per thread, static shared memory, [stack bytes], spill stores/loads")
    for key in sorted(rows):
        cells = []
        for a in archs:
            k = rows[key].get(a)
            if k is None:
                cells.append(f"{a}: -")
                continue
            cell = f"{a}: {k['regs']:3d} regs {k.get('smem', 0):5d} B smem"
            if k.get("stack", 0):
                cell += f" [{k['stack']}B stack]"
            if k.get("stores", 0) or k.get("loads", 0):
                cell += f" SPILL {k['stores']}/{k['loads']}"
            cells.append(cell)
        print(f"  {key}\n      " + "  ".join(cells))
    if spilled:
        print(f"ptxas summary: {len(spilled)} kernel/arch builds spill registers:")
        for key, k in spilled:
            print(f"  {k['arch']} {key}: {k['stores']} bytes spill stores, {k['loads']} bytes spill loads")
    else:
        print("ptxas summary: no register spills in csd kernels")
    if "--fail-on-spills" in argv and spilled:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
