"""KL-family baselines the CSD paper compares against (its Table of baselines).

p is the teacher's distribution softmax(t), q the student's softmax(z); each
loss is summed over the vocabulary per token and averaged over counted tokens.
Every one is a divergence: 0 when p = q and never negative.

FKL, SFKL are written as true KL divergences.  The paper (and DistiLLM) write
FKL as the cross-entropy -sum p log q and SFKL as -sum p log(lam p + (1-lam) q);
those differ from ours by sum p log p, a constant of the teacher, so the
student's gradient is the same while our values reach 0 at the optimum and can
be monitored.
"""

import torch

from ._common import apply_per_row, check_lam, log_of, masked_log_softmax


def _kl(logp_a, p_a, logp_b):
    """KL(a || b) per row from log-probabilities (0 at masked entries) and a's probabilities."""
    return (p_a * (logp_a - logp_b)).sum(-1)


def _both(z, t, masked):
    logq, q = masked_log_softmax(z, masked)
    logp, p = masked_log_softmax(t, masked)
    return logp, p, logq, q


def fkl(student_logits, teacher_logits, labels=None, *, ignore_index=-100, reduction="mean"):
    """Forward KL, KL(p || q) = sum p (log p - log q): mode-covering."""
    def per_row(z, t, masked):
        logp, p, logq, _ = _both(z, t, masked)
        return _kl(logp, p, logq)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def rkl(student_logits, teacher_logits, labels=None, *, ignore_index=-100, reduction="mean"):
    """Reverse KL, KL(q || p) = sum q (log q - log p): mode-seeking."""
    def per_row(z, t, masked):
        logp, _, logq, q = _both(z, t, masked)
        return _kl(logq, q, logp)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def symmetric_kl(student_logits, teacher_logits, labels=None, *, lam=0.9, ignore_index=-100, reduction="mean"):
    """(1 - lam) KL(p || q) + lam KL(q || p); the paper uses lam = 0.9."""
    lam = check_lam(lam)

    def per_row(z, t, masked):
        logp, p, logq, q = _both(z, t, masked)
        return (1 - lam) * _kl(logp, p, logq) + lam * _kl(logq, q, logp)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def jeffreys(student_logits, teacher_logits, labels=None, *, ignore_index=-100, reduction="mean"):
    """Jeffreys divergence sum (p - q)(log p - log q) = KL(p || q) + KL(q || p)."""
    def per_row(z, t, masked):
        logp, p, logq, q = _both(z, t, masked)
        return ((p - q) * (logp - logq)).sum(-1)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def total_variation(student_logits, teacher_logits, labels=None, *, ignore_index=-100, reduction="mean"):
    """Total variation distance 1/2 sum |p - q|, in [0, 1]."""
    def per_row(z, t, masked):
        _, p, _, q = _both(z, t, masked)
        return 0.5 * (p - q).abs().sum(-1)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def skewed_js(student_logits, teacher_logits, labels=None, *, lam=0.9, ignore_index=-100, reduction="mean"):
    """The paper's skewed Jensen-Shannon divergence, lam = 0.9 by default:

    m = (1 - lam) p + lam q,   JS = lam KL(q || m) + (1 - lam) KL(p || m).

    lam = 0.5 gives the ordinary JS divergence.
    """
    lam = check_lam(lam)

    def per_row(z, t, masked):
        logp, p, logq, q = _both(z, t, masked)
        logm = torch.logaddexp(log_of(1 - lam) + logp, log_of(lam) + logq)
        return lam * _kl(logq, q, logm) + (1 - lam) * _kl(logp, p, logm)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def skew_forward_kl(student_logits, teacher_logits, labels=None, *, lam=0.1, ignore_index=-100, reduction="mean"):
    """DistiLLM's skew forward KL, KL(p || lam p + (1 - lam) q), lam = 0.1 by default."""
    lam = check_lam(lam)

    def per_row(z, t, masked):
        logp, p, logq, _ = _both(z, t, masked)
        logmix = torch.logaddexp(log_of(lam) + logp, log_of(1 - lam) + logq)
        return _kl(logp, p, logmix)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)


def skew_reverse_kl(student_logits, teacher_logits, labels=None, *, lam=0.1, ignore_index=-100, reduction="mean"):
    """DistiLLM's skew reverse KL, KL(q || (1 - lam) p + lam q), lam = 0.1 by default."""
    lam = check_lam(lam)

    def per_row(z, t, masked):
        logp, _, logq, q = _both(z, t, masked)
        logmix = torch.logaddexp(log_of(1 - lam) + logp, log_of(lam) + logq)
        return _kl(logq, q, logmix)
    return apply_per_row(per_row, student_logits, teacher_logits, labels, ignore_index, reduction)
