#!/usr/bin/env bash
# Packaging check (issue 19): the release artifacts build, hold what they
# must, and install and run outside the source tree.
#
#   .ci/packaging_check.sh [PYTHON]     PYTHON: the project venv's python (default: python on PATH)
#
# 1. The sdist and the wheel built from it: reused from dist/ when
#    scripts/setup_env.sh has just made them (it installs csd_ext from that
#    very wheel), else built here with `python -m build --no-isolation`
#    (sdist, then a wheel from the unpacked sdist) against PYTHON's torch.
# 2. The sdist holds every file of `git ls-files` (csrc/ above all) with the
#    working tree's content, and nothing else but setuptools' metadata: no
#    compiled extension, objects, bytecode or build folders.
# 3. The wheel holds the compiled _C, every preset, the license and the
#    csd-distill console script, and nothing outside csd_ext/ (no tests,
#    benchmarks, sources or build files).
# 4. A fresh venv (nothing of its own installed) gets the project venv's torch
#    and pyyaml through a .pth file naming a folder of symlinks to just those
#    distributions and their dependencies (.ci/requirement_site.py), instead
#    of a 700 MB copy; the wheel is installed there with pip, offline, so its
#    declared requirements are checked against those versions.
# 5. From a temporary folder outside the clone (python -P): import csd_ext
#    (from the fresh venv), one csd_loss forward + backward against
#    csd_ext.reference, and `csd-distill --list-presets`.
#
# Environment: CSD_DIST_DIR (default dist/), MAX_JOBS (build jobs, default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$(command -v python)}"
DIST="${CSD_DIST_DIR:-$ROOT/dist}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
step() { echo "== packaging_check: $* ($(( $(date +%s) - start )) s)"; }
fail() { echo "packaging_check: FAILED: $*" >&2; exit 1; }

cd "$ROOT"
version="$("$PY" -c 'import runpy; print(runpy.run_path("csd_ext/_version.py")["__version__"])')"
sdist="$DIST/csd_ext-$version.tar.gz"
shopt -s nullglob
wheels=("$DIST"/csd_ext-"$version"-*.whl)
shopt -u nullglob

WORK="$(mktemp -d "${TMPDIR:-/tmp}/csd_packaging.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [[ -f "$sdist" && ${#wheels[@]} -eq 1 ]]; then
  step "reusing $sdist and ${wheels[0]##*/}"
else
  step "python -m build --no-isolation (sdist, then a wheel from it) into $DIST"
  rm -f "$DIST"/csd_ext-*
  "$PY" -m build --no-isolation --outdir "$DIST" "$ROOT" > "$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log" >&2; fail "python -m build failed (log above)"; }
  wheels=("$DIST"/csd_ext-"$version"-*.whl)
fi
wheel="${wheels[0]}"

step "sdist against git ls-files"
mkdir "$WORK/sdist"
tar -xzf "$sdist" -C "$WORK/sdist"
unpacked="$WORK/sdist/csd_ext-$version"
(cd "$unpacked" && find . -type f | sed 's|^\./||' | sort) > "$WORK/sdist_files"
# Every tracked file, except git's own configuration.  (Untracked files are
# not expected: an sdist is made from what is committed, and the test suite,
# which runs before this check in CI, may leave files behind.)
git ls-files --cached | grep -v -x -e '.gitignore' | sort > "$WORK/tracked"
missing="$(comm -13 "$WORK/sdist_files" "$WORK/tracked")"
[[ -z "$missing" ]] || fail "files missing from the sdist:
$missing"
# Beyond the tracked files, only what setuptools writes itself.
extra="$(comm -23 "$WORK/sdist_files" "$WORK/tracked" | grep -v -x -E 'PKG-INFO|setup\.cfg|csd_ext\.egg-info/.*' || true)"
[[ -z "$extra" ]] || fail "untracked or built files in the sdist:
$extra"
while read -r f; do
  cmp -s "$f" "$unpacked/$f" || fail "$f in $sdist differs from the working tree (stale dist/? delete it and rerun)"
done < "$WORK/tracked"
csrc_count="$(git ls-files csrc | wc -l)"
echo "sdist: $(wc -l < "$WORK/sdist_files") files; all $(wc -l < "$WORK/tracked") tracked files ($csrc_count under csrc/) present and identical"

step "wheel contents"
"$PY" - "$wheel" "$version" <<'PY'
import subprocess
import sys
import zipfile

wheel, version = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
info = f"csd_ext-{version}.dist-info/"
tracked = subprocess.run(["git", "ls-files", "csd_ext"], capture_output=True, text=True, check=True).stdout.split()
problems = []
outside = [n for n in names if not (n.startswith("csd_ext/") or n.startswith(info))]
if outside:
    problems.append(f"files outside csd_ext/ (tests, benchmarks, sources, build files?): {outside[:10]}")
if not any(n.startswith("csd_ext/_C.") and n.endswith(".so") for n in names):
    problems.append("no compiled csd_ext/_C*.so")
missing = [t for t in tracked if t not in names]
if missing:
    problems.append(f"package files missing: {missing}")
if info + "licenses/LICENSE" not in names:
    problems.append("no LICENSE in the .dist-info")
entry_points = zipfile.ZipFile(wheel).read(info + "entry_points.txt").decode() if info + "entry_points.txt" in names else ""
if "csd-distill = csd_ext.distill:main" not in entry_points:
    problems.append("no csd-distill console script")
built = [n for n in names if n.endswith((".o", ".pyc", ".cpp", ".cu", ".h", ".cuh"))]
if built:
    problems.append(f"build files in the wheel: {built[:10]}")
if problems:
    sys.exit("packaging_check: FAILED: " + "; ".join(problems))
presets = sorted(n for n in names if n.startswith("csd_ext/configs/"))
print(f"wheel: {len(names)} files, all under csd_ext/; _C, {len(presets)} presets, LICENSE, csd-distill")
PY

step "fresh venv with the project's torch (symlinks) and the wheel"
"$PY" -m venv --without-pip "$WORK/venv"
site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo -n "shared from $PY: "
"$PY" "$ROOT/.ci/requirement_site.py" "$WORK/shared-site" torch pyyaml
echo "$WORK/shared-site" > "$site/_csd_shared_requirements.pth"
# pip runs from the project venv, installing into the fresh one (--python);
# --no-index: the requirements must be met by what the venv already sees.
"$PY" -m pip --python "$WORK/venv/bin/python" install --quiet --no-index --disable-pip-version-check "$wheel" \
  2> >(grep -v "^WARNING: Location '" >&2)

step "outside the source tree: import, csd_loss forward+backward against the reference, csd-distill"
mkdir "$WORK/outside"
cd "$WORK/outside"
CSD_FRESH_SITE="$site" "$WORK/venv/bin/python" -P - <<'PY'
import os

import torch

import csd_ext
from csd_ext import csd_loss
from csd_ext import _build_info
from csd_ext.reference import csd_loss_reference

site = os.environ["CSD_FRESH_SITE"]
assert csd_ext.__file__.startswith(site), f"csd_ext imported from {csd_ext.__file__}, not the fresh venv {site}"
print(f"csd_ext {csd_ext.__version__} from {os.path.dirname(csd_ext.__file__)}; backends {csd_ext.compiled_backends()}; "
      f"built against torch {_build_info.TORCH_VERSION}, running {torch.__version__}")

torch.manual_seed(0)
z = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
t = torch.randn(6, 37, dtype=torch.float64)
labels = torch.tensor([1, -100, 3, 4, -100, 5])
loss = csd_loss(z, t, labels, weighting="SS")
loss.backward()
z_ref = z.detach().clone().requires_grad_(True)
ref = csd_loss_reference(z_ref, t, labels, weighting="SS")
ref.backward()
torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-12)
assert z.grad.abs().sum() > 0
print(f"csd_loss SS: loss {loss.item():.6f} and gradient match csd_ext.reference")
PY
"$WORK/venv/bin/csd-distill" --list-presets > "$WORK/presets.txt"
cat "$WORK/presets.txt"
for preset in "$ROOT"/csd_ext/configs/*.yaml; do
  name="$(basename "$preset" .yaml)"
  grep -q -x -F -- "$name" "$WORK/presets.txt" || fail "csd-distill --list-presets does not list $name"
done
echo "packaging_check: passed in $(( $(date +%s) - start )) s"
