#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and a CUDA build of torch
# already installed (no network needed): builds csd_ext in place for this
# GPU's architecture, runs the CUDA tests, then a GPU benchmark subset.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default build/gpu-check)
#
# Everything lands in OUT_DIR: log.txt (all output), build.log (nvcc with
# ptxas -v), ptxas.txt (registers and spills per kernel), sass_loops.txt
# (chunk-loop instructions per kernel), pytest.txt, and the
# benchmark reports bench_*.md / *.png.  Each step has its own time limit
# (seconds, below) so a slow step cannot eat the others' time.
#   CSD_GPU_BUILD_S, CSD_GPU_TEST_S, CSD_GPU_BENCH_S   step limits
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
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"

step "build in place (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! timeout "${CSD_GPU_BUILD_S:-300}" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  grep -n -E "error|Error|undefined" "$OUT_DIR/build.log" | head -n 40
  tail -n 20 "$OUT_DIR/build.log"
  step "BUILD FAILED"
  exit 1
fi
"$PY" .ci/ptxas_summary.py "$OUT_DIR/build.log" --fail-on-spills > "$OUT_DIR/ptxas.txt"; echo "ptxas summary exit $?"
cat "$OUT_DIR/ptxas.txt"
# Chunk-loop size per kernel from the SASS (needs cuobjdump: CUDA_HOME/bin or triton's copy).
"$PY" benchmarks/sass_loops.py csd_ext/_C*.so > "$OUT_DIR/sass_loops.txt" 2>&1; echo "sass_loops exit $?"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import csd_ext; print("backends", csd_ext.compiled_backends())'

step "CUDA tests"
# -v prints each test's outcome as it finishes, so a run cut off by the time
# limit still names its failures; each xdist worker gets 2 CPU threads, or 8
# workers x all cores oversubscribe the CPU that computes the references.
xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "${CSD_GPU_TEST_WORKERS:-8}")
OMP_NUM_THREADS=2 timeout "${CSD_GPU_TEST_S:-240}" "$PY" -m pytest python_tests/test_cuda.py -v -p no:cacheprovider \
  "${xdist[@]}" --tb=short -rfEs --durations=15 > "$OUT_DIR/pytest.txt" 2>&1
echo "pytest exit $?"
grep -E "(FAILED|ERROR)" "$OUT_DIR/pytest.txt" | head -n 60
tail -n 25 "$OUT_DIR/pytest.txt"

if [[ "${CSD_GPU_SKIP_BENCH:-0}" != "1" ]]; then
  bench_deadline=$(( $(date +%s) + ${CSD_GPU_BENCH_S:-300} ))
  bench() {  # name, then bench_loss.py arguments; skipped once the step's time is spent
    local name="$1"; shift
    local left=$(( bench_deadline - $(date +%s) ))
    if (( left < 60 )); then step "bench $name skipped: step time spent"; return; fi
    step "bench $name"
    timeout "$left" "$PY" benchmarks/bench_loss.py --device cuda --min-time 0.3 --warmup 3 \
      ${CSD_GPU_HBM_GBS:+--hbm-gbs "$CSD_GPU_HBM_GBS"} \
      --output "$OUT_DIR/bench_$name.md" "$@" 2>&1 | grep -v '^\[bench\] .* \.\.\.$'
  }
  # bf16 SS over every shape first (the headline), then the other weightings and fp32.
  bench ss_bf16 --dtypes bf16 --weightings SS
  bench weightings_bf16 --dtypes bf16 --weightings TS,US,MM --shapes 512x50257,2048x32000
  bench ss_fp32 --dtypes fp32 --weightings SS --shapes 512x50257,512x256000
fi
step "done"
