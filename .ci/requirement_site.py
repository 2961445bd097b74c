"""Makes a directory that exposes, read-only, some distributions installed in
this interpreter (and everything they depend on), and nothing else.

    python .ci/requirement_site.py OUT_DIR torch pyyaml ...

OUT_DIR gets one symlink per top-level file or folder those distributions
installed (their packages, modules, .libs folders and .dist-info metadata).
A .pth file naming OUT_DIR in a fresh venv then gives that venv these
packages without copying them: .ci/packaging_check.sh uses it to give its
fresh venv the project venv's torch (~700 MB) instead of installing it again.
pip in that venv sees them as installed (their .dist-info is on sys.path), so
it can check a wheel's requirements against them, offline.
Prints the distributions it exposed.
"""

import os
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names):
    """The named distributions and their non-extra requirements, recursively,
    whose markers hold in this interpreter."""
    seen, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def top_level_entries(dist):
    """site-packages entries the distribution installed, e.g. 'torch',
    'torch-2.13.0+cpu.dist-info', 'typing_extensions.py'."""
    entries = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue  # scripts in bin/, bytecode caches, .pth hooks
        entries.add(parts[0])
    return entries


def main(out_dir, names):
    os.makedirs(out_dir, exist_ok=True)
    exposed = closure(names)
    missing = [n for n in names if canonicalize_name(n) not in exposed]
    if missing:
        sys.exit(f"requirement_site: not installed in {sys.executable}: {missing}")
    for dist in exposed.values():
        base = dist.locate_file("")
        for entry in sorted(top_level_entries(dist)):
            src, dst = os.path.join(base, entry), os.path.join(out_dir, entry)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    print(" ".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in exposed.values())))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
