"""``LigerFusedLinearCSDLoss``: fused LM head + CSD with the call signature of Liger-Kernel's
chunked distillation losses (``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``).

    loss_fn = LigerFusedLinearCSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, weighting="SS")
    loss = loss_fn(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                   student_bias=None, teacher_bias=None)

The arguments mean what they mean in Liger: inputs are the final hidden states ``[BT, H]``
(already aligned with ``true_labels`` ``[BT]``: shift before calling), weights are the LM heads
``[V, H]``, and the result is

    (weight_hard_loss * CE_sum + weight_soft_loss * CSD_sum) / (number of labels != ignore_index)

with both sums over the counted positions.  The soft term is :func:`csd_ext.fused_linear_csd`
(no ``[BT, V]`` logits; runs on CPU and CUDA, no Triton needed); the hard term is a chunked,
recomputed-in-backward cross-entropy.  Gradients flow to the student's input, weight and bias;
the teacher's tensors are constants.

``temperature`` is CSD's (it scales the logits inside the weights only; CSD has no τ² factor).
``beta`` and ``compiled`` are accepted so that code built for ``LigerFusedLinearJSDLoss`` runs
unchanged; CSD has no JSD mixture weight and its kernel is compiled C++, so both are unused.
"""

import torch

from .._validate import check_ignore_index
from .._validate_fused import check_chunk_size
from ..fused_linear import fused_linear_csd
from ._heads import linear_cross_entropy_sum
from ._options import check_csd_kwargs


def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class LigerFusedLinearCSDLoss(torch.nn.Module):
    """Drop-in for ``LigerFusedLinearJSDLoss`` computing CSD; see the module docstring."""

    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0,
                 compiled=True, *, weighting="SS", alpha=0.5, chunk_size=None):
        super().__init__()
        self.weight_hard_loss = _check_weight("weight_hard_loss", weight_hard_loss)
        self.weight_soft_loss = _check_weight("weight_soft_loss", weight_soft_loss)
        self.ignore_index = check_ignore_index(ignore_index)
        opts = check_csd_kwargs(dict(weighting=weighting, alpha=alpha, temperature=temperature))
        self.weighting, self.alpha, self.temperature = opts["weighting"], opts["alpha"], opts["temperature"]
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.beta, self.compiled = beta, compiled  # unused, see the module docstring

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        labels = true_labels.reshape(-1)
        student_input = student_input.reshape(-1, student_input.shape[-1])
        teacher_input = teacher_input.reshape(-1, teacher_input.shape[-1])
        count = (labels != self.ignore_index).sum().clamp(min=1)
        loss = None
        if self.weight_soft_loss:
            soft = fused_linear_csd(
                student_input, student_weight, None, labels, teacher_hidden=teacher_input,
                teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                weighting=self.weighting, alpha=self.alpha, temperature=self.temperature,
                ignore_index=self.ignore_index, reduction="sum", chunk_size=self.chunk_size)
            loss = self.weight_soft_loss * soft
        if self.weight_hard_loss:
            hard = linear_cross_entropy_sum(student_input, student_weight, student_bias, labels, self.ignore_index)
            loss = self.weight_hard_loss * hard if loss is None else loss + self.weight_hard_loss * hard
        if loss is None:
            return student_input.new_zeros((), dtype=torch.float32)
        return loss / count

    def extra_repr(self):
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"weighting={self.weighting!r}, alpha={self.alpha}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}")
