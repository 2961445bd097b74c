#!/usr/bin/env bash
# Configures the CMake build (CMakeLists.txt) against a Python's torch, builds
# the extension and the C++ unit tests, and runs them with ctest.
#
#   .ci/cpp_tests.sh [PYTHON]        PYTHON defaults to /work/main/.venv/bin/python
#   CSD_CPP_TESTS_ONLY=1 .ci/cpp_tests.sh   only the unit tests (no torch, ~1 min)
#
# The build tree is build/cmake (gitignored); MAX_JOBS (default 2) sets -j.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-/work/main/.venv/bin/python}"
BUILD="${CSD_CMAKE_BUILD_DIR:-$ROOT/build/cmake}"
JOBS="${MAX_JOBS:-2}"
start=$(date +%s)

if ! command -v cmake >/dev/null 2>&1; then
  echo "cpp_tests: SKIPPED: cmake is not installed"
  exit 0
fi

if [[ "${CSD_CPP_TESTS_ONLY:-0}" == "1" ]]; then
  args=(-DCSD_BUILD_EXTENSION=OFF)
else
  if [[ ! -x "$PY" ]]; then
    echo "cpp_tests: no Python at $PY (pass one as \$1)" >&2
    exit 2
  fi
  prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  args=(-DCMAKE_PREFIX_PATH="$prefix" -DPython3_EXECUTABLE="$PY")
fi

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# A build tree configured with another generator cannot be reused.
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi

cmake -S "$ROOT" -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${args[@]}"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure
echo "cpp_tests: passed in $(( $(date +%s) - start )) s"
