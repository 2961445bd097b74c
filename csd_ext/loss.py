"""The user-facing CSD loss: `csd_loss` and `CSDLoss`."""

import torch

from . import _ops  # noqa: F401  (registers the ops)
from ._reduce import reduce_rows, row_mask_of
from ._validate import (
    check_alpha,
    check_ignore_index,
    check_labels,
    check_logits_pair,
    check_loss_options,
    check_reduction,
    check_temperature,
    check_weighting,
)


def flatten_logits(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] without a copy when possible (the kernels take any row stride)."""
    return x.reshape(-1, x.shape[-1])


def _grad_scale(student, teacher, row_mask, reduction):
    """The grad_loss each row gets back from a backward of 1.0 through this
    reduction, which the fused forward builds into its gradient: 1 for a sum
    (and "none"), 1/rows for a mean without a mask, and for a mean over a
    mask 1/count as a device tensor (no host sync)."""
    if reduction != "mean":
        return 1.0
    if row_mask is None:
        return 1.0 / max(student.shape[0], 1)
    return _ops.mean_scale(row_mask, _ops.accumulate_dtype(student, teacher))


def csd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor = None,
    *,
    weighting: str = "SS",
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Concrete Score Distillation loss (Kim et al., ICLR 2026, arXiv 2509.25837).

    For each token, with student logits ``z``, teacher logits ``t`` and
    ``d = z - t`` over the vocabulary,

    .. math::
        L = \tfrac14 \sum_y \sum_x w_1(y)\, w_2(x)\, (d_x - d_y)^2
          = \tfrac14 \left[\mathrm{Var}_{w_1} d + \mathrm{Var}_{w_2} d
            + (\mathbb{E}_{w_1} d - \mathbb{E}_{w_2} d)^2\right],

    computed in O(V) time and memory.  The weights are held constant
    (stop-gradient, as in the paper), so the gradient with respect to ``z`` is

    .. math::
        \partial L / \partial z_k = \tfrac12\left[w_{1,k}(d_k - \mathbb{E}_{w_2} d)
            + w_{2,k}(d_k - \mathbb{E}_{w_1} d)\right],

    exactly the paper's gradient.  It is *not* the derivative of the returned
    value when a weight depends on ``z`` (S, M).  If ``teacher_logits``
    requires grad it receives the negative of that gradient.

    Unlike the paper's code, which reports a surrogate ``sum(sg(g) * z)``
    whose value means nothing (it can be negative and does not vanish at the
    optimum), this returns the true ``L``: 0 exactly when ``z = t + c``.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16, float16 or float64.
        teacher_logits: ``[..., V]``, same leading shape and ``V``; any float dtype.
        labels: optional integer ``[...]``; positions equal to ``ignore_index``
            are excluded.  Not shifted: align them as for ``F.cross_entropy``.
        weighting: two letters ``w1 w2`` from ``S`` = softmax(z/τ),
            ``T`` = softmax(t/τ), ``U`` = uniform over unmasked entries and
            ``M`` = α·T + (1-α)·S.  ``"SS"`` is the paper's default.
        alpha: mixture weight of ``M``, in [0, 1].
        temperature: τ > 0; it scales the logits inside the weights only
            (``d`` is never scaled, and there is no τ² factor).  The paper's
            code applies τ to the student's weights in SS; applying it to T too
            is our generalisation.
        ignore_index: label value of positions to skip.
        reduction: ``"mean"`` over counted positions (0 if none), ``"sum"``, or
            ``"none"`` (the leading shape, 0 at ignored positions).

    A vocabulary entry where either logit is -inf is masked: left out of every
    sum (U does not count it) and given zero gradient.  Accumulation is fp32
    (fp64 for fp64 inputs); the loss is float32 (float64 for fp64 inputs) and
    the gradient has the student's dtype.
    """
    check_logits_pair(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    alpha, temperature = check_loss_options(weighting, alpha, temperature, ignore_index, reduction)

    student, teacher = flatten_logits(student_logits), flatten_logits(teacher_logits)
    if _ops.use_one_launch(student, teacher, reduction):
        # CUDA training of a mean or sum: one launch forward (the kernel reads
        # the labels and reduces), one backward (docs/kernels.md).
        flat_labels = None if labels is None else labels.reshape(-1)
        return _ops.fused_csd_loss(student, teacher, flat_labels, ignore_index, weighting, alpha, temperature,
                                   reduction)
    row_mask = row_mask_of(labels, ignore_index)
    if _ops.use_fused(student, teacher):
        # The gradient is computed in the forward for the grad_loss this
        # reduction will hand back after a backward from 1.0.
        per_row = _ops.fused_csd(student, teacher, row_mask, weighting, alpha, temperature,
                                 _grad_scale(student, teacher, row_mask, reduction))
    elif _ops.use_fused_compiled(student, teacher) and (row_mask is not None or isinstance(student.shape[0], int)):
        # Traced: csd_forward_grad(_scaled) with its autograd rule (_ops.py).
        # (A symbolic row count without a mask keeps the op pair.)
        grad_scale = _grad_scale(student, teacher, row_mask, reduction)
        if isinstance(grad_scale, torch.Tensor):
            per_row, _stats, _grad = torch.ops.csd_ext.csd_forward_grad_scaled(
                student, teacher, row_mask, weighting, alpha, temperature, grad_scale)
        else:
            per_row, _stats, _grad = torch.ops.csd_ext.csd_forward_grad(
                student, teacher, row_mask, weighting, alpha, temperature, grad_scale)
    else:
        per_row, _stats = torch.ops.csd_ext.csd_forward(student, teacher, row_mask, weighting, alpha, temperature)
    return reduce_rows(per_row, row_mask, student_logits.shape[:-1], reduction)


class CSDLoss(torch.nn.Module):
    """Module form of :func:`csd_loss`; arguments are checked at construction."""

    def __init__(self, weighting="SS", alpha=0.5, temperature=1.0, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.weighting = check_weighting(weighting)
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)

    def forward(self, student_logits, teacher_logits, labels=None):
        return csd_loss(
            student_logits, teacher_logits, labels,
            weighting=self.weighting, alpha=self.alpha, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )

    def extra_repr(self):
        return (f"weighting={self.weighting!r}, alpha={self.alpha}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
