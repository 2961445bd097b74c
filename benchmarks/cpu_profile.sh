#!/usr/bin/env bash
# Instruction counts per pass of the fused CPU kernel (csd_forward_grad,
# SS bf16, one thread), by callgrind.  Usage:
#   PYTHON=/path/to/venv/bin/python bash benchmarks/cpu_profile.sh [rows=32] [vocab=50257]
# Builds benchmarks/cpu_profile_main.cpp against the venv's libtorch twice:
#   -DCSD_PROFILE_NOINLINE: each pass its own function -> instructions per pass;
#   -DCSD_PROFILE_ENTRY: only forward_typed kept out of line, the passes
#     inlined as in the extension -> the shipped code's total.
# Each runs one call under callgrind, collecting only inside forward_typed.
# valgrind does not emulate AVX-512, so this is the AVX2 variant.  Output
# and the callgrind files go to $CSD_PROFILE_DIR (default /tmp/csd_cpu_profile).
set -euo pipefail
ROWS=${1:-32}
VOCAB=${2:-50257}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}  # a Python with torch, e.g. PYTHON=/work/main/.venv/bin/python
OUT=${CSD_PROFILE_DIR:-/tmp/csd_cpu_profile}
mkdir -p "$OUT"
TORCH=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
STD=c++17
grep -q 202002L "$TORCH/include/ATen/ATen.h" && STD=c++20
for MODE in NOINLINE ENTRY; do
  ${CXX:-g++} -O3 -std=$STD -g -w -mavx2 -mfma -mf16c -D_GLIBCXX_USE_CXX11_ABI=$ABI \
    -DCSD_PROFILE_$MODE -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
    "$HERE/cpu_profile_main.cpp" -o "$OUT/cpu_profile_$MODE" \
    -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -ltorch_cpu -lc10
  OMP_NUM_THREADS=1 valgrind --tool=callgrind --collect-atstart=no \
    --toggle-collect='*::forward_typed<*, float)' --callgrind-out-file="$OUT/callgrind.$MODE" \
    "$OUT/cpu_profile_$MODE" "$ROWS" "$VOCAB" 2>"$OUT/valgrind.$MODE.log"
  callgrind_annotate --inclusive=no --threshold=100 --auto=no "$OUT/callgrind.$MODE" \
    >"$OUT/self.$MODE.txt" 2>/dev/null
done
echo "== per pass (passes out of line, -DCSD_PROFILE_NOINLINE)"
"$PY" "$HERE/cpu_profile_report.py" "$OUT/self.NOINLINE.txt" "$ROWS" "$VOCAB"
echo "== as shipped (passes inlined, -DCSD_PROFILE_ENTRY)"
"$PY" "$HERE/cpu_profile_report.py" "$OUT/self.ENTRY.txt" "$ROWS" "$VOCAB" | head -1
