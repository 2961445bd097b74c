#!/usr/bin/env bash
# The README's test command: from a fresh clone, set up, build, and run every
# test (Python suite; the packaging check, the C++ math tests and the CUDA
# build check when their scripts and toolchains are present).
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo_root"
start=$(date +%s)
# shellcheck disable=SC1091
. scripts/setup_env.sh

echo "[test] python suite"
# -P: do not put the clone on sys.path, so the tests import the installed
# package (with its compiled _C), exactly as a user would.
python -P -m pytest python_tests -q -p no:cacheprovider "$@"

for step in .ci/packaging_check.sh .ci/cpp_tests.sh .ci/cuda_build_check.sh; do
  if [ -f "$step" ]; then
    echo "[test] $step"
    bash "$step" "$(command -v python)"
  fi
done
echo "[test] all done in $(( $(date +%s) - start )) s"
