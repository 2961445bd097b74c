"""Alpha-beta divergence (Cichocki, Cruces & Amari 2011), as used by ABKD.

    D_AB(p || q) = -1/(a b) sum [ p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) ]

with p the teacher's and q the student's distribution.  (a, b) = (1, 0) is
KL(p || q) and (0, 1) is KL(q || p).  Where the formula is 0/0 the divergence
is defined by its limits, each written out below:

    a != 0, b == 0:   1/a^2 sum [ p^a log(p^a / q^a) - p^a + q^a ]
    a == 0, b != 0:   1/b^2 sum [ q^b log(q^b / p^b) - q^b + p^b ]
    a == -b != 0:     1/a^2 sum [ log(q^a / p^a) + (q^a / p^a)^-1 - 1 ]
    a == b == 0:      1/2   sum [ (log p - log q)^2 ]

Powers are taken in log space, p^a q^b = exp(a log p + b log q), so
probabilities that underflow fp32 stay finite.  The branch is chosen by exact
comparison with 0: values very close to a limit use the general formula and
lose precision to cancellation, as any closed form does.
"""

import math

import torch

from ._common import apply_per_row, masked_log_softmax


def check_ab(alpha, beta):
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} of the AB-divergence must be a finite number, got {v!r}")
    return float(alpha), float(beta)


def ab_per_row(z, t, masked, alpha, beta):
    logq, _ = masked_log_softmax(z, masked)
    logp, _ = masked_log_softmax(t, masked)
    valid = (~masked).to(z.dtype)

    def power(a, b):
        """p^a q^b on unmasked entries, 0 on masked ones."""
        return torch.exp(a * logp + b * logq) * valid

    a, b = alpha, beta
    if a == 0 and b == 0:
        terms = 0.5 * (logp - logq) ** 2
    elif b == 0:
        pa = power(a, 0.0)
        terms = (pa * a * (logp - logq) - pa + power(0.0, a)) / a**2
    elif a == 0:
        qb = power(0.0, b)
        terms = (qb * b * (logq - logp) - qb + power(b, 0.0)) / b**2
    elif a + b == 0:
        terms = (a * (logq - logp) + torch.exp(a * (logp - logq)) - 1.0) * valid / a**2
    else:
        s = a + b
        terms = -(power(a, b) - (a / s) * power(s, 0.0) - (b / s) * power(0.0, s)) / (a * b)
    return terms.sum(-1)


def ab_divergence(student_logits, teacher_logits, labels=None, *, alpha=0.2, beta=0.7,
                  ignore_index=-100, reduction="mean"):
    """AB-divergence D_AB(p || q) with the paper's default alpha = 0.2, beta = 0.7."""
    alpha, beta = check_ab(alpha, beta)
    return apply_per_row(
        lambda z, t, m: ab_per_row(z, t, m, alpha, beta),
        student_logits, teacher_logits, labels, ignore_index, reduction,
    )
