#!/usr/bin/env bash
# CUDA build check for machines without a GPU (the GPU tests skip there, so
# this stands in for them): builds csd_ext with its CUDA kernels against the
# CUDA build of torch, checks that the CUDA implementations of both ops are
# registered, and fails on any compile or link error, on any register
# spill in a csd kernel, and on any local-memory access (LDL/STL) or missing
# 16-byte hot-path access in the SASS (.ci/sass_check.py).
#
#   .ci/cuda_build_check.sh [PYTHON]
#
# PYTHON (optional) is the interpreter that creates the venv on first use
# (default python3).  Without a CUDA toolkit the check is skipped (exit 0)
# unless CSD_REQUIRE_CUDA_BUILD=1, as CI sets, which makes that a failure.
#
# Environment:
#   CSD_CUDA_VENV     venv with the CUDA build of torch, created on first use
#                     (default ~/.cache/csd_ext/cuda-venv, outside the clone)
#   CSD_CUDA_TORCH    what pip installs there (default torch==2.14.1, cu130)
#   CUDA_HOME         CUDA toolkit root (default: from nvcc on PATH, else /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX",
#                     see setup.py; every one is checked for spills)
#   MAX_JOBS          parallel compile jobs (default 2)
#   CSD_CUDA_LOG_DIR  where build.log (full nvcc/ptxas -v output),
#                     ptxas_summary.txt, sass_check.txt and sass_loops.txt
#                     are kept (default build/cuda-check)
# The build runs in a temporary copy of the tracked sources, so the clone's
# own (CPU) build is untouched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CSD_CUDA_VENV:-$HOME/.cache/csd_ext/cuda-venv}"
TORCH_SPEC="${CSD_CUDA_TORCH:-torch==2.14.1}"
LOG_DIR="${CSD_CUDA_LOG_DIR:-$ROOT/build/cuda-check}"
export MAX_JOBS="${MAX_JOBS:-2}"
if [[ -z "${CUDA_HOME:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    # nvcc reports its real location, also behind a wrapper script such as
    # /usr/local/bin/nvcc that execs the toolkit's bin/nvcc.
    nvcc_bin="$(nvcc -dryrun -E -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
    CUDA_HOME="$(cd "${nvcc_bin:-$(dirname "$(readlink -f "$(command -v nvcc)")")}/.." && pwd)"
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
start=$(date +%s)
step() { echo "== cuda_build_check: $* ($(( $(date +%s) - start )) s)"; }

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  if [[ "${CSD_REQUIRE_CUDA_BUILD:-0}" == "1" ]]; then
    echo "cuda_build_check: FAILED: no nvcc under CUDA_HOME=$CUDA_HOME (CSD_REQUIRE_CUDA_BUILD=1); set CUDA_HOME to the CUDA toolkit root" >&2
    exit 1
  fi
  echo "cuda_build_check: SKIPPED: no CUDA toolkit (no nvcc under CUDA_HOME=$CUDA_HOME); set CSD_REQUIRE_CUDA_BUILD=1 to make this an error"
  exit 0
fi

step "venv $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  "${1:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, numpy, ninja, setuptools, wheel; assert torch.version.cuda' 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" numpy ninja setuptools wheel
fi
"$VENV/bin/python" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'

step "copy tracked sources"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/csd_cuda_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) |
  (cd "$WORK" && tar -xf -)

mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/build.log"
step "build with FORCE_CUDA=1, CUDA_HOME=$CUDA_HOME, MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} (log: $LOG)"
build_start=$(date +%s)
set +e
(cd "$WORK" && FORCE_CUDA=1 "$VENV/bin/python" setup.py build_ext --inplace) > "$LOG" 2>&1
rc=$?
set -e
build_s=$(( $(date +%s) - build_start ))
if [[ $rc -ne 0 ]]; then
  grep -n -E "error|Error|undefined reference" "$LOG" | head -n 40 >&2 || true
  echo "cuda_build_check: FAILED: the CUDA build failed (exit $rc) after ${build_s} s; full log: $LOG" >&2
  exit 1
fi
step "build ok in ${build_s} s"

step "import and check registrations"
(cd "$WORK" && "$VENV/bin/python" - <<'PY'
import torch
import csd_ext

has = torch._C._dispatch_has_kernel_for_dispatch_key
backends = csd_ext.compiled_backends()
print("compiled_backends:", backends)
assert "cuda" in backends, f"csd_ext was built without CUDA kernels: {backends}"
for op in ("csd_ext::csd_forward", "csd_ext::csd_backward", "csd_ext::csd_forward_grad",
           "csd_ext::csd_backward_reuse_"):
    for key in ("CPU", "CUDA"):
        assert has(op, key), f"{op} has no {key} kernel"
    print(f"{op}: CPU and CUDA kernels registered")
PY
)

step "every architecture in the list compiled (SASS, and PTX where +PTX)"
# The list the build used: TORCH_CUDA_ARCH_LIST, else setup.py's default.
archs="${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^DEFAULT_CUDA_ARCHS = "\(.*\)"$/\1/p' "$ROOT/setup.py")}"
for arch in ${archs//;/ }; do
  num="${arch%+PTX}"; num="${num//./}"
  if ! grep -q "for 'sm_${num}a\?'" "$LOG"; then
    echo "cuda_build_check: FAILED: ptxas compiled nothing for sm_${num} ($arch in \"$archs\"); see $LOG" >&2
    exit 1
  fi
  if [[ "$arch" == *+PTX ]] && ! grep -q "code=compute_${num}" "$LOG"; then
    echo "cuda_build_check: FAILED: no compute_${num} PTX embedded ($arch); see $LOG" >&2
    exit 1
  fi
done
echo "architectures: $archs (all compiled)"

# gate OUT WHY CMD...: runs CMD with its output kept in OUT and shown; fails the check with WHY.
gate() {
  local out=$1 why=$2 status
  shift 2
  set +e
  "$@" > "$out" 2>&1
  status=$?
  set -e
  cat "$out"
  if [[ $status -ne 0 ]]; then
    echo "cuda_build_check: FAILED: $why; see $out" >&2
    exit 1
  fi
}
step "register use and spills (ptxas -v)"
gate "$LOG_DIR/ptxas_summary.txt" "register spills in csd kernels (or no ptxas output in $LOG)" \
  "$VENV/bin/python" "$ROOT/.ci/ptxas_summary.py" "$LOG" --fail-on-spills
step "SASS: no local memory, 16-byte hot-path accesses (cuobjdump; .ci/sass_check.py)"
so="$(ls "$WORK"/csd_ext/_C*.so | head -n1)"
gate "$LOG_DIR/sass_check.txt" "local-memory accesses or missing 16-byte hot-path accesses in csd kernels" \
  "$VENV/bin/python" "$ROOT/.ci/sass_check.py" "$so"
# Instructions and exps per element of each kernel's loops (a report, not a gate).
"$VENV/bin/python" "$ROOT/benchmarks/sass_loops.py" "$so" > "$LOG_DIR/sass_loops.txt" 2>&1 || true
sed -n '/^fused kernel/,$p' "$LOG_DIR/sass_loops.txt"

echo "cuda_build_check: passed (build ${build_s} s, total $(( $(date +%s) - start )) s); log $LOG"
