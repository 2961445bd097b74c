"""Plain PyTorch CSD, the readable definition the kernels are tested against.

Same API and semantics as :func:`csd_ext.csd_loss`, written for clarity, not
speed: it materialises the softmax weights ([N, V] tensors).  Its autograd
gradient is the paper's stop-gradient gradient, because the weights are
detached and the value is written in the variance form

    L = 1/4 [Var_w1(d) + Var_w2(d) + (E_w1 d - E_w2 d)^2],

whose derivative in d with w1, w2 held fixed is
1/2 [w1 (d - E_w2 d) + w2 (d - E_w1 d)].
"""

import torch

from ._reduce import reduce_rows, row_mask_of
from ._validate import check_labels, check_logits_pair, check_loss_options


def csd_weights(student, teacher, weighting="SS", alpha=0.5, temperature=1.0):
    """The detached weights (w1, w2), each [N, V], in the compute dtype of the inputs.

    Masked entries (either logit -inf) get weight 0; rows with no unmasked
    entry get all-zero weights.
    """
    masked = torch.isneginf(student) | torch.isneginf(teacher)
    z = student.detach().masked_fill(masked, float("-inf")) / temperature
    t = teacher.detach().masked_fill(masked, float("-inf")) / temperature
    empty = masked.all(dim=-1, keepdim=True)
    # Softmax of an all -inf row is NaN: give such rows zeros.
    s = torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, z), dim=-1))
    tw = torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, t), dim=-1))
    unmasked = (~masked).to(s.dtype)
    u = unmasked / unmasked.sum(dim=-1, keepdim=True).clamp(min=1)
    base = {"S": s, "T": tw, "U": u, "M": alpha * tw + (1 - alpha) * s}
    return base[weighting[0]], base[weighting[1]]


def csd_per_row(student, teacher, weighting="SS", alpha=0.5, temperature=1.0):
    """Per-row loss of [N, V] logits, in the inputs' dtype (call with fp32/fp64)."""
    masked = torch.isneginf(student) | torch.isneginf(teacher)
    d = torch.where(masked, torch.zeros_like(student), student - teacher)
    w1, w2 = csd_weights(student, teacher, weighting, alpha, temperature)
    mean1 = (w1 * d).sum(-1, keepdim=True)
    mean2 = (w2 * d).sum(-1, keepdim=True)
    var1 = (w1 * (d - mean1) ** 2).sum(-1)
    var2 = (w2 * (d - mean2) ** 2).sum(-1)
    return 0.25 * (var1 + var2 + (mean1 - mean2).squeeze(-1) ** 2)


def csd_loss_reference(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    weighting="SS",
    alpha=0.5,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
):
    """Reference :func:`csd_ext.csd_loss`: fp32 math (fp64 for fp64 inputs)."""
    check_logits_pair(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    alpha, temperature = check_loss_options(weighting, alpha, temperature, ignore_index, reduction)

    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab).to(acc)
    t = teacher_logits.reshape(-1, vocab).to(acc)
    per_row = csd_per_row(z, t, weighting, alpha, temperature)
    row_mask = row_mask_of(labels, ignore_index)
    if row_mask is not None:
        per_row = torch.where(row_mask, per_row, torch.zeros_like(per_row))
    return reduce_rows(per_row, row_mask, student_logits.shape[:-1], reduction)


def csd_pairwise_per_row(student, teacher, weighting="SS", alpha=0.5, temperature=1.0):
    """The O(V^2) definition 1/4 sum_y sum_x w1(y) w2(x) (d_x - d_y)^2, for tests on small V."""
    masked = torch.isneginf(student) | torch.isneginf(teacher)
    d = torch.where(masked, torch.zeros_like(student), student - teacher)
    w1, w2 = csd_weights(student, teacher, weighting, alpha, temperature)
    diff = d[:, None, :] - d[:, :, None]  # [N, y, x]
    return 0.25 * (w1[:, :, None] * w2[:, None, :] * diff**2).sum(dim=(1, 2))


def csd_surrogate_reference(student_logits, teacher_logits, labels=None, *, ignore_index=-100, temperature=1.0):
    """The paper's code's formulation of SS, for benchmarks: full softmax tensors,
    a detached-weight surrogate sum(sg(g) * z) whose gradient is the CSD
    gradient, and a token mean over valid labels.  Its value is meaningless."""
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    with torch.no_grad():
        s = torch.softmax(z / temperature, dim=-1)
        d = z - t
        g = s * (d - (s * d).sum(-1, keepdim=True))
    per_row = (g * z).sum(-1)
    if labels is None:
        return per_row.mean()
    mask = (labels.reshape(-1) != ignore_index).float()
    return (per_row * mask).sum() / mask.sum().clamp(min=1)
