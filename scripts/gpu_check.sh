#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and a CUDA build of torch
# already installed (no network needed): builds csd_ext in place for this
# GPU's architecture (sm_90a on an H100/H200), runs the CUDA tests with their
# names, measures the copy bandwidth (the ceiling), then times the fused
# forward+gradient kernel against the two-pass kernels (CSD_EXT_CUDA_PATH)
# and the PyTorch contenders of benchmarks/bench_loss.py.  Sized to fit in
# about 8 minutes of GPU time as one call (the step limits below add up to
# 470 s plus start-up).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default build/gpu-check)
#
# Everything lands in OUT_DIR: log.txt (all output), build.log (nvcc with
# ptxas -v), ptxas.txt (registers and spills per kernel), sass_check.txt,
# sass_loops.txt (loop instructions and exps per element, per kernel),
# pytest.txt, copy_bandwidth.txt, and the benchmark reports bench_*.md;
# benchmarks/RESULTS_cuda.md is rewritten from them.  Each step has its own
# time limit (seconds, below) so a slow step cannot eat the others' time.
#   CSD_GPU_BUILD_S (200), CSD_GPU_TEST_S (150), CSD_GPU_BENCH_S (120)   step limits
#   CSD_GPU_PYTHON                                     interpreter (default python3)
#   CSD_GPU_SKIP_BENCH=1                               build and test only
#   CSD_GPU_HBM_GBS                                    nominal HBM GB/s for the roofline (H200: 4800)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-build/gpu-check}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1
PY="${CSD_GPU_PYTHON:-python3}"
start=$(date +%s)
step() { echo "== gpu_check: $* ($(( $(date +%s) - start )) s)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
nproc

if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_bin="$(nvcc -dryrun -E -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
  CUDA_HOME="$(cd "${nvcc_bin:-/usr/local/cuda/bin}/.." && pwd)"
fi
export CUDA_HOME
cap="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
# Hopper gets sm_90a (the fused kernel's clusters need sm_90; "a" also lets
# ptxas use the arch-specific instructions).
[[ "$cap" == "9.0" ]] && cap="9.0a"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"

step "build in place (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! timeout "${CSD_GPU_BUILD_S:-200}" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  grep -n -E "error|Error|undefined" "$OUT_DIR/build.log" | head -n 40
  tail -n 20 "$OUT_DIR/build.log"
  step "BUILD FAILED"
  exit 1
fi
"$PY" .ci/ptxas_summary.py "$OUT_DIR/build.log" --fail-on-spills > "$OUT_DIR/ptxas.txt"; echo "ptxas summary exit $?"
cat "$OUT_DIR/ptxas.txt"
# From the SASS (needs cuobjdump: CUDA_HOME/bin or triton's copy): no local
# memory and 16-byte hot paths; loop instructions and exps per element.
"$PY" .ci/sass_check.py csd_ext/_C*.so > "$OUT_DIR/sass_check.txt" 2>&1; echo "sass_check exit $?"
tail -n 3 "$OUT_DIR/sass_check.txt"
"$PY" benchmarks/sass_loops.py csd_ext/_C*.so > "$OUT_DIR/sass_loops.txt" 2>&1; echo "sass_loops exit $?"
sed -n '/^fused kernel/,$p' "$OUT_DIR/sass_loops.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import csd_ext; print("backends", csd_ext.compiled_backends())'

step "CUDA tests"
# -v prints each test's outcome as it finishes, so a run cut off by the time
# limit still names its failures; each xdist worker gets 2 CPU threads, or 8
# workers x all cores oversubscribe the CPU that computes the references.
xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "${CSD_GPU_TEST_WORKERS:-8}")
OMP_NUM_THREADS=2 timeout "${CSD_GPU_TEST_S:-150}" "$PY" -m pytest python_tests/test_cuda.py -v -p no:cacheprovider \
  "${xdist[@]}" --tb=short -rA --durations=15 > "$OUT_DIR/pytest.txt" 2>&1
echo "pytest exit $?"
grep -E "(FAILED|ERROR)" "$OUT_DIR/pytest.txt" | head -n 60
tail -n 25 "$OUT_DIR/pytest.txt"

if [[ "${CSD_GPU_SKIP_BENCH:-0}" != "1" ]]; then
  step "copy bandwidth (the ceiling: read + write of 1 GiB, bf16)"
  timeout 60 "$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/copy_bandwidth.txt"
import torch
x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); y.copy_(x); end.record(); end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
times.sort()
moved = 2 * x.numel() * x.element_size()
print(f"copy bandwidth: {moved / times[len(times) // 2] / 1e9:.0f} GB/s (median of 20, 1 GiB read + 1 GiB written)")
PY
  bench_deadline=$(( $(date +%s) + ${CSD_GPU_BENCH_S:-120} ))
  bench() {  # name, CSD_EXT_CUDA_PATH, then bench_loss.py arguments; skipped once the step's time is spent
    local name="$1" path="$2"; shift 2
    local left=$(( bench_deadline - $(date +%s) ))
    if (( left < 20 )); then step "bench $name skipped: step time spent"; return; fi
    step "bench $name (CSD_EXT_CUDA_PATH=$path)"
    CSD_EXT_CUDA_PATH="$path" timeout "$left" "$PY" benchmarks/bench_loss.py --device cuda --min-time 0.2 --warmup 2 \
      --max-repeats 10 ${CSD_GPU_HBM_GBS:+--hbm-gbs "$CSD_GPU_HBM_GBS"} \
      --output "$OUT_DIR/bench_$name.md" "$@" 2>&1 | grep -v '^\[bench\] .* \.\.\.$'
  }
  # The issue-13 targets (N*V*6 B >= 256 MB, bf16): fused vs two-pass, all
  # four weightings, csd_ext only (no compiles: seconds); then the PyTorch
  # contenders on SS (each torch.compile costs ~20-40 s, so SS only).
  shapes=2048x32000,512x256000,4096x128256
  bench fused_bf16 fused --dtypes bf16 --weightings SS,TS,US,MM --shapes "$shapes" --contenders csd_ext
  bench two_pass_bf16 two_pass --dtypes bf16 --weightings SS,TS,US,MM --shapes "$shapes" --contenders csd_ext
  bench contenders_ss_bf16 fused --dtypes bf16 --weightings SS --shapes "$shapes" \
    --contenders csd_ext,lean_compile,paper_compile,lean_eager
  {
    echo "# CUDA results ($(date -u +%Y-%m-%d), written by scripts/gpu_check.sh)"
    echo
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}")'
    echo
    cat "$OUT_DIR/copy_bandwidth.txt" 2>/dev/null
    for f in fused_bf16 two_pass_bf16 contenders_ss_bf16; do
      [[ -f "$OUT_DIR/bench_$f.md" ]] || continue
      echo; echo "## $f"; echo; cat "$OUT_DIR/bench_$f.md"
    done
  } > benchmarks/RESULTS_cuda.md
  step "wrote benchmarks/RESULTS_cuda.md"
fi
step "done"
