"""CSD straight from hidden states and LM-head weights: `fused_linear_csd`, `FusedLinearCSDLoss`.

The full [N, V] logits are never materialised; see csd_ext/_fused_ops.py for
how the work is chunked.
"""

import torch

from . import _fused_ops  # noqa: F401  (registers the fused ops)
from ._reduce import reduce_rows
from ._validate import check_alpha, check_ignore_index, check_reduction, check_temperature, check_weighting
from ._validate_fused import check_chunk_size, checked_linear_call


def fused_linear_csd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor = None,
    labels: torch.Tensor = None,
    *,
    teacher_hidden: torch.Tensor = None,
    teacher_weight: torch.Tensor = None,
    student_bias: torch.Tensor = None,
    teacher_bias: torch.Tensor = None,
    weighting: str = "SS",
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = None,
    vocab_parallel_group=None,
    vocab_parallel_reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """:func:`csd_ext.csd_loss` of ``student_hidden @ student_weight.T + student_bias``
    without materialising the ``[N, V]`` logits.

    Same value and gradients as ``csd_loss(F.linear(student_hidden, student_weight,
    student_bias), teacher_logits, labels, ...)``, except that each chunk's logits are
    computed in fp32 (fp64 for fp64 inputs) and never rounded to bf16/fp16, so with
    reduced-precision inputs the fused result is the more accurate one.

    Args:
        student_hidden: ``[..., H]`` final hidden states of the student (before the LM head).
        student_weight: ``[V, H]`` LM-head weight (``lm_head.weight`` layout), same dtype and
            device as ``student_hidden``.
        teacher_logits: ``[..., V]`` teacher logits, any float dtype.  Or, instead:
        teacher_hidden, teacher_weight, teacher_bias: ``[..., H_t]``, ``[V, H_t]``, ``[V]``:
            the teacher's logits are then computed chunk by chunk too (under no_grad).
        student_bias: optional ``[V]`` LM-head bias.
        labels, weighting, alpha, temperature, ignore_index, reduction: as in
            :func:`csd_ext.csd_loss`.
        chunk_size: rows (tokens) per chunk; ``None`` picks it from a memory budget
            (``csd_ext._fused_ops.DEFAULT_CHUNK_BUDGET_BYTES``, 64 MiB of ``[rows, V]``
            working buffers).  Only speed and peak memory depend on it.
        vocab_parallel_group: a ``torch.distributed`` process group over which the heads are
            split by vocabulary rows: ``student_weight`` is then this rank's ``[V_local, H]``
            slice (the teacher's logits or head likewise) and the global loss is returned on
            every rank; see :func:`csd_ext.parallel.vocab_parallel_fused_linear_csd` and
            docs/parallel.md.  ``vocab_parallel_reduce_hidden_grad=False`` leaves the
            hidden-state gradient partial (for sequence-parallel callers).

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; the
    teacher inputs (logits or hidden/weight/bias) are constants and get none.  With
    ``reduction`` "mean" or "sum", the gradients are computed during the forward (the
    logits do not survive until backward) and the backward only scales them; so a
    forward under grad mode costs forward + backward.  With "none", the backward
    recomputes each chunk's logits to apply the per-row grad_output (one extra GEMM).
    The weight and bias gradients are accumulated in fp32 (fp64 for fp64 inputs).
    A "mean"/"sum" graph can be backpropagated once only (no retain_graph=True): its
    backward scales the saved gradients in place to avoid a second [V, H] buffer.
    """
    if vocab_parallel_group is not None:
        from .parallel.fused import vocab_parallel_fused_linear_csd

        return vocab_parallel_fused_linear_csd(
            student_hidden, student_weight, teacher_logits, labels, group=vocab_parallel_group,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, weighting=weighting, alpha=alpha, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
            reduce_hidden_grad=vocab_parallel_reduce_hidden_grad,
        )
    vocab, alpha, temperature, chunk, lead, hidden, teacher, row_mask = checked_linear_call(
        student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
        teacher_bias, labels, weighting, alpha, temperature, ignore_index, reduction, chunk_size)

    grad_on = torch.is_grad_enabled()
    need = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    if reduction != "none" and any(need):
        loss, _gh, _gw, _gb = torch.ops.csd_ext.fused_linear_csd_reduced(
            hidden, student_weight, student_bias, *teacher, row_mask,
            weighting, alpha, temperature, reduction, chunk, *need,
        )
        return loss
    per_row, _stats = torch.ops.csd_ext.fused_linear_csd_rows(
        hidden, student_weight, student_bias, *teacher, row_mask, weighting, alpha, temperature, chunk,
    )
    return reduce_rows(per_row, row_mask, lead, reduction)


class FusedLinearCSDLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_csd`; hyper-parameters are checked at construction.

        loss_fn = FusedLinearCSDLoss(weighting="SS")
        loss = loss_fn(hidden, model.lm_head.weight, teacher_logits, labels)
    """

    def __init__(self, weighting="SS", alpha=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                 chunk_size=None):
        super().__init__()
        self.weighting = check_weighting(weighting)
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_logits=None, labels=None, *,
                teacher_hidden=None, teacher_weight=None, student_bias=None, teacher_bias=None):
        return fused_linear_csd(
            student_hidden, student_weight, teacher_logits, labels,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias,
            weighting=self.weighting, alpha=self.alpha, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction, chunk_size=self.chunk_size,
        )

    def extra_repr(self):
        return (f"weighting={self.weighting!r}, alpha={self.alpha}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}")
