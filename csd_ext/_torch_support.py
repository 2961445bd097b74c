"""Which torch csd_ext runs with, checked at import with a clear message.

Two rules, both checked before the compiled extension is loaded:
- torch >= 2.4 (the floor of the torch.library API the ops use; the
  same floor as pyproject.toml's dependencies);
- the torch minor version that csd_ext._C was compiled against, which
  setup.py records in csd_ext/_build_info.py: a C++ extension does not load
  (or worse, misbehaves) under another torch minor version.  An in-place
  development build without that file is not checked.
"""

import re

MIN_TORCH = (2, 4)
TESTED = "2.13.0 (CPU) and 2.14.1 (CUDA 13.0 build)"


def _major_minor(version: str):
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(m[1]), int(m[2])


def torch_problem(installed: str, built_against=None):
    """None when csd_ext can run with torch `installed`, else the reason.

    `built_against` is the torch version csd_ext._C was compiled with (None:
    unknown, e.g. an in-place development build)."""
    have = _major_minor(installed)
    if have < MIN_TORCH:
        return (
            f"csd_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, but torch {installed} is installed "
            f"(tested with {TESTED}). Upgrade torch, then rebuild csd_ext: "
            "pip install --no-build-isolation --force-reinstall --no-deps <csd_ext source>"
        )
    if built_against is not None and _major_minor(built_against) != have:
        return (
            f"csd_ext's compiled extension was built against torch {built_against}, but torch {installed} "
            "is installed; a C++ extension only loads with the torch minor version it was compiled for. "
            "Rebuild csd_ext against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps <csd_ext source or sdist>"
        )
    return None


def built_against():
    """The torch version recorded when csd_ext._C was built, or None."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


def check_torch():
    """Raises ImportError with the reason when this torch cannot run csd_ext."""
    import torch

    problem = torch_problem(torch.__version__, built_against())
    if problem is not None:
        raise ImportError(problem)
