"""Shared plumbing of the baseline losses: checks, row selection, masked softmax, reduction.

Every baseline follows the conventions of :func:`csd_ext.csd_loss`:

- logits ``[..., V]`` in any float dtype; the math runs in fp32 (fp64 when
  either input is fp64), so fp16/bf16 logits of ~100 lose nothing;
- a vocabulary entry where either logit is -inf is masked: it is left out of
  both distributions (each is renormalised over the shared support) and of
  every sum, and gets zero gradient, so no NaN appears;
- positions whose label is ``ignore_index`` are skipped; "mean" divides by the
  number of counted positions (0 when none count).
"""

import math

import torch

from .._reduce import reduce_rows, row_mask_of
from .._validate import check_ignore_index, check_labels, check_logits_pair, check_reduction


def accumulate_dtype(student, teacher):
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def masked_log_softmax(x, masked):
    """(log-probabilities, probabilities) of rows of ``x`` over the unmasked entries.

    Masked entries get probability 0 and log-probability 0 (not -inf), so a
    product such as ``p * log p`` is 0 there and its gradient is finite.  A
    row with every entry masked gets all zeros.
    """
    empty = masked.all(dim=-1, keepdim=True)
    # log_softmax of an all -inf row is NaN: give such rows zeros before it.
    x = torch.where(empty, torch.zeros_like(x), x.masked_fill(masked, float("-inf")))
    logp = torch.log_softmax(x, dim=-1).masked_fill(masked, 0.0)
    p = torch.where(masked, torch.zeros_like(logp), logp.exp())
    return logp, p


def log_of(weight):
    """log of a mixture weight in [0, 1]; log 0 = -inf, which logaddexp handles exactly."""
    return math.log(weight) if weight > 0 else float("-inf")


def check_lam(lam):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    return float(lam)


def apply_per_row(per_row_fn, student_logits, teacher_logits, labels, ignore_index, reduction):
    """Check the inputs, run ``per_row_fn(z, t, masked) -> [n]`` on the counted rows only, reduce.

    Only the rows whose label counts are gathered and upcast, so prompt and
    padding positions (often most of an instruction-tuning batch) cost nothing.
    """
    check_logits_pair(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    check_ignore_index(ignore_index)
    check_reduction(reduction)

    acc = accumulate_dtype(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    row_mask = row_mask_of(labels, ignore_index)
    if row_mask is not None:
        z, t = z[row_mask], t[row_mask]
    z, t = z.to(acc), t.to(acc)
    masked = torch.isneginf(z) | torch.isneginf(t)
    per_row = per_row_fn(z, t, masked)
    if row_mask is not None:
        per_row = per_row.new_zeros(row_mask.shape).masked_scatter(row_mask, per_row)
    return reduce_rows(per_row, row_mask, student_logits.shape[:-1], reduction)
