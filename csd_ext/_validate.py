"""Argument checks shared by the loss functions: each error names the argument."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WEIGHT_LETTERS = "STUM"
REDUCTIONS = ("mean", "sum", "none")


def check_weighting(weighting):
    if not isinstance(weighting, str) or len(weighting) != 2 or any(c not in WEIGHT_LETTERS for c in weighting):
        raise ValueError(
            f"weighting must be two letters from S (student), T (teacher), U (uniform), "
            f"M (mixture), e.g. 'SS' or 'TS'; got {weighting!r}"
        )
    return weighting


def check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_temperature(temperature):
    # Plain comparisons (not math.isfinite) so torch.compile can trace a
    # dynamic float; NaN fails both comparisons.
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def check_loss_options(weighting, alpha, temperature, ignore_index, reduction):
    """The options every CSD entry point takes, checked in signature order (each error names
    its argument); returns ``(alpha, temperature)`` as floats."""
    check_weighting(weighting)
    alpha = check_alpha(alpha)
    temperature = check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    return alpha, temperature


def check_logits_pair(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
        if x.shape[-1] == 0:
            raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(x.shape)})")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student_logits has vocabulary size {student_logits.shape[-1]} but teacher_logits has "
            f"{teacher_logits.shape[-1]}; slice both to the shared vocabulary, e.g. logits[..., :V]"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape, got "
            f"{tuple(student_logits.shape[:-1])} and {tuple(teacher_logits.shape[:-1])}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )


def check_labels(labels, logits):
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {logits.device}")
