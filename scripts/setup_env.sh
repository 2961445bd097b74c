# Sourced by the README's commands: makes (or reuses) the project's virtual
# environment, installs the pinned CPU torch and the other dependencies,
# builds csd_ext's sdist and a wheel from that sdist (in dist/), and installs
# the wheel.  Everything comes from the local disk or the package registry;
# nothing else is downloaded.
#   CSD_VENV   where the venv lives (default: .venv in the clone)
#   MAX_JOBS   parallel compile jobs (default 2)
#   CSD_SETUP_TEST_DEPS  0: skip requirements-test.txt (scripts/main.sh)
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CSD_VENV:-$repo_root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating venv $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
# This machine's pip configuration names local package folders that may be
# absent; pip warns once per package about each.  Keep the log readable.
pip_install() {
  python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}
echo "[setup] installing torch 2.13.0 (CPU) and dependencies"
pip_install torch==2.13.0
pip_install -r "$repo_root/requirements.txt"
if [ "${CSD_SETUP_TEST_DEPS:-1}" = "1" ]; then
  pip_install -r "$repo_root/requirements-test.txt"
fi
# Built as a release is: `python -m build --no-isolation` makes the sdist,
# then a wheel from the unpacked sdist (so a file missing from the sdist
# fails here), against this venv's torch.  The artifacts stay in dist/,
# where .ci/packaging_check.sh checks and reuses them.
echo "[setup] building csd_ext: sdist, then a wheel from it (takes ~2-3 minutes on 2 cores; log build/release-build.log)"
rm -f "$repo_root"/dist/csd_ext-*
mkdir -p "$repo_root/build"
if ! MAX_JOBS=${MAX_JOBS:-2} python -m build --no-isolation --outdir "$repo_root/dist" "$repo_root" \
    > "$repo_root/build/release-build.log" 2>&1; then
  tail -n 40 "$repo_root/build/release-build.log" >&2
  echo "[setup] FAILED: python -m build --no-isolation (full log: build/release-build.log)" >&2
  exit 1
fi
# --force-reinstall --no-deps: replace an installed csd_ext of the same
# version, and leave torch and the other dependencies as they are.
pip_install --force-reinstall --no-deps "$repo_root"/dist/csd_ext-*.whl
# -P: import the installed package, not the source tree in the current directory.
python -P -c "import csd_ext, torch; print('[setup] csd_ext', csd_ext.__version__, 'backends', csd_ext.compiled_backends(), 'cpu kernel', torch.ops.csd_ext.cpu_kernel_isa())"
