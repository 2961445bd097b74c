# Sourced by the README's commands: makes (or reuses) the project's virtual
# environment, installs the pinned CPU torch and the other dependencies, and
# builds + installs csd_ext into it.  Everything comes from the local disk or
# the package registry; nothing else is downloaded.
#   CSD_VENV   where the venv lives (default: .venv in the clone)
#   MAX_JOBS   parallel compile jobs (default 2)
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
echo "[setup] building csd_ext (takes ~2-3 minutes on 2 cores)"
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation "$repo_root"
# -P: import the installed package, not the source tree in the current directory.
python -P -c "import csd_ext, torch; print('[setup] csd_ext', csd_ext.__version__, 'backends', csd_ext.compiled_backends(), 'cpu kernel', torch.ops.csd_ext.cpu_kernel_isa())"
