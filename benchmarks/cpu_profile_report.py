"""Turns callgrind_annotate's self-cost table (benchmarks/cpu_profile.sh) into
instructions per element per pass of the fused CPU kernel."""

import re
import sys

# Function-name fragment -> pass label; the first match wins.
PASSES = [
    ("tile_pass_a", "A: load, upcast, d, weight logits, max"),
    ("tile_weights_and_mean", "B: exp, sum, weighted mean"),
    ("tile_centred_m2", "C: centred m2"),
    ("tile_pass_ab", "AB: load, upcast, d, max, exp, sums (one pass)"),
    ("grad_from_scratch", "D: gradient (from the row scratch)"),
    ("segment_pivot", "row: pivot"),
    ("segment_moments", "tile loop, tails, merges"),
    ("store_row", "row: finalize"),
    ("forward_typed", "row loop, coefficients"),
]


def main(path, rows, vocab):
    elements = rows * vocab
    total = None
    per = {}
    other = 0
    for line in open(path):
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        name = m.group(2)
        if "PROGRAM TOTALS" in name:
            total = ir
            continue
        # "file:function" (one line per source file of the function, since
        # the driver is built with -g); the function's own name is the first
        # kernel name in it (later ones are template arguments).
        func = re.sub(r"^[^:]*:(?!:)", "", name, count=1)
        label = None
        for word in re.findall(r"AVX2::(\w+)", func):
            label = next((lab for frag, lab in PASSES if frag == word), None)
            if label:
                break
        if label:
            per[label] = per.get(label, 0) + ir
        else:
            other += ir
    if total is None:
        m = re.search(r"([\d,]+)\s+\(100.0%\)\s+PROGRAM TOTALS", open(path).read())
        total = int(m.group(1).replace(",", "")) if m else sum(per.values()) + other
    print(f"{rows} x {vocab} = {elements} elements, {total:,} instructions in forward_typed "
          f"({total / elements:.2f} per element)")
    for frag, label in PASSES:
        if label in per:
            print(f"  {per[label] / elements:7.3f} /elem  {per[label]:>14,}  {label}")
    print(f"  {other / elements:7.3f} /elem  {other:>14,}  other (exp/log calls, allocation, ...)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
