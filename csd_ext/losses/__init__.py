"""Baseline distillation losses, each with the call shape of :func:`csd_ext.csd_loss`:

    loss(student_logits, teacher_logits, labels=None, *, ignore_index=-100,
         reduction="mean", **hparams)

and a registry for picking one by name::

    from csd_ext.losses import get_loss
    kd = get_loss("srkl", lam=0.1)
    loss = kd(student_logits, teacher_logits, labels)

p is the teacher's distribution and q the student's.  All use fp32 softmax
(fp64 for fp64 inputs), mask -inf vocabulary entries, and average over the
positions whose label is not ``ignore_index``.
"""

from ..loss import csd_loss
from .ab import ab_divergence
from .dld import DLD_NORMS, DLD_WEIGHTS, dld
from .divergences import (
    fkl,
    jeffreys,
    rkl,
    skew_forward_kl,
    skew_reverse_kl,
    skewed_js,
    symmetric_kl,
    total_variation,
)
from .registry import ALIASES, LOSSES, canonical_name, get_loss, hparam_names, loss_names

__all__ = [
    "ALIASES", "DLD_NORMS", "DLD_WEIGHTS", "LOSSES", "ab_divergence", "canonical_name", "csd_loss", "dld",
    "fkl", "get_loss", "hparam_names", "jeffreys", "loss_names", "rkl", "skew_forward_kl",
    "skew_reverse_kl", "skewed_js", "symmetric_kl", "total_variation",
]
