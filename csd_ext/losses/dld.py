"""Direct logit distillation (DLD): a weighted squared difference of logits.

    L = 1/4 sum_k w_k (z^_k - t^_k)^2

w is softmax(z/tau) ("S"), softmax(t/tau) ("T") or uniform over unmasked
entries ("U"), always detached, as in CSD.  z^ and t^ are the student's and
teacher's logits each normalised on its own, over the unmasked entries:

    none   x
    mean   x - mean(x)
    min    x - min(x)
    max    x - max(x)
    std    (x - mean(x)) / std(x)       (population std)
    range  (x - min(x)) / (max(x) - min(x))

The normalisation statistics stay in the graph: they are part of the loss.
Unlike CSD, "none" is not shift invariant (z = t + c costs c^2/4); "mean",
"min" and "max" are, which is the paper's point of comparison.
"""

import torch

from .._validate import check_temperature
from ._common import apply_per_row, masked_log_softmax

DLD_WEIGHTS = ("S", "T", "U")
DLD_NORMS = ("none", "mean", "min", "max", "std", "range")
_TINY = 1e-12  # guards std/range of a constant row (whose centred logits are all 0 anyway)


def check_dld(weight, norm):
    if weight not in DLD_WEIGHTS:
        raise ValueError(f"weight of DLD must be one of {DLD_WEIGHTS}, got {weight!r}")
    if norm not in DLD_NORMS:
        raise ValueError(f"norm of DLD must be one of {DLD_NORMS}, got {norm!r}")
    return weight, norm


def normalise(x, masked, norm):
    """Normalise each row of ``x`` over its unmasked entries; masked entries become 0."""
    valid = ~masked
    x = x.masked_fill(masked, 0.0)
    if norm == "none":
        return x
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = x.sum(-1, keepdim=True) / count
    lo = x.masked_fill(masked, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(masked, float("-inf")).amax(-1, keepdim=True)
    # An all-masked row has lo = inf, hi = -inf: its result is zeroed below anyway.
    lo, hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)
    if norm == "mean":
        out = x - mean
    elif norm == "min":
        out = x - lo
    elif norm == "max":
        out = x - hi
    elif norm == "std":
        var = (((x - mean) ** 2) * valid).sum(-1, keepdim=True) / count
        out = (x - mean) / var.sqrt().clamp(min=_TINY)
    else:  # range
        out = (x - lo) / (hi - lo).clamp(min=_TINY)
    return out.masked_fill(masked, 0.0)


def dld_per_row(z, t, masked, weight, norm, temperature):
    with torch.no_grad():
        if weight == "S":
            _, w = masked_log_softmax(z / temperature, masked)
        elif weight == "T":
            _, w = masked_log_softmax(t / temperature, masked)
        else:
            valid = (~masked).to(z.dtype)
            w = valid / valid.sum(-1, keepdim=True).clamp(min=1)
    diff = normalise(z, masked, norm) - normalise(t, masked, norm)
    return 0.25 * (w * diff**2).sum(-1)


def dld(student_logits, teacher_logits, labels=None, *, weight="U", norm="none", temperature=1.0,
        ignore_index=-100, reduction="mean"):
    """Direct logit distillation; ``weight`` in S/T/U (detached), ``norm`` as in the module doc."""
    weight, norm = check_dld(weight, norm)
    temperature = check_temperature(temperature)
    return apply_per_row(
        lambda z, t, m: dld_per_row(z, t, m, weight, norm, temperature),
        student_logits, teacher_logits, labels, ignore_index, reduction,
    )
