"""Checked options shared by the integrations (no framework imports)."""

from .._validate import check_alpha, check_temperature, check_weighting
from .._validate_fused import check_chunk_size

CSD_KWARGS = ("weighting", "alpha", "temperature", "chunk_size")


def check_csd_kwargs(csd_kwargs):
    """A copy of ``csd_kwargs`` with checked values; unknown keys are an error."""
    kwargs = dict(csd_kwargs or {})
    unknown = sorted(set(kwargs) - set(CSD_KWARGS))
    if unknown:
        raise ValueError(f"csd_kwargs: unknown key(s) {unknown}; expected some of {list(CSD_KWARGS)}")
    if "weighting" in kwargs:
        check_weighting(kwargs["weighting"])
    if "alpha" in kwargs:
        kwargs["alpha"] = check_alpha(kwargs["alpha"])
    if "temperature" in kwargs:
        kwargs["temperature"] = check_temperature(kwargs["temperature"])
    if "chunk_size" in kwargs:
        check_chunk_size(kwargs["chunk_size"])
    return kwargs


def check_kd_ratio(kd_ratio):
    if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)) or not 0 <= kd_ratio <= 1:
        raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
    return float(kd_ratio)
