"""`vocab_parallel_csd_loss`: CSD on logits sharded over the vocabulary across ranks.

Forward, per rank: partial row states of the local shard (_moments.py), one
all-gather of them, a merge in rank order (bitwise the same on every rank),
the global row loss and the global row statistics.  Backward: the compiled
csd_ext::csd_backward on the local shard, fed the global statistics, so each
shard gets its slice of the full gradient with no communication.
"""

import torch

from .. import _ops  # noqa: F401  (registers csd_backward)
from .._reduce import reduce_rows, row_mask_of
from .._validate import (
    FLOAT_DTYPES,
    check_alpha,
    check_ignore_index,
    check_labels,
    check_loss_options,
    check_reduction,
    check_temperature,
    check_weighting,
)
from ._comm import all_gather_states, check_same_leading_shape, resolve_group
from ._kernel_stats import kernel_stats, local_partial_states
from ._moments import SUM, finalize, merge_ranks, needs_of
from .dtensor import is_dtensor, vocab_parallel_dtensor_call


def check_shards(student_shard, teacher_shard):
    """Like csd_ext's check_logits_pair, but a shard may have 0 columns."""
    for name, x in (("student_shard", student_shard), ("teacher_shard", teacher_shard)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                            f"got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape [..., V_local], got a 0-dim tensor")
    if student_shard.shape[-1] != teacher_shard.shape[-1]:
        raise ValueError(
            f"student_shard holds {student_shard.shape[-1]} vocabulary columns on this rank but teacher_shard "
            f"holds {teacher_shard.shape[-1]}; both must be this rank's slice of the same vocabulary range "
            f"(shard the student's and the teacher's LM heads identically)"
        )
    if student_shard.shape[:-1] != teacher_shard.shape[:-1]:
        raise ValueError(
            f"student_shard and teacher_shard must have the same leading shape, got "
            f"{tuple(student_shard.shape[:-1])} and {tuple(teacher_shard.shape[:-1])}"
        )
    if student_shard.device != teacher_shard.device:
        raise ValueError(f"student_shard is on {student_shard.device} but teacher_shard is on {teacher_shard.device}")


def global_row_stats(student, teacher, row_mask, weighting, alpha, temperature, group):
    """(per-row loss [N], kernel stats [N, 6]) of the global rows of shards [N, V_local]."""
    acc = _ops.accumulate_dtype(student, teacher)
    need = needs_of(weighting, alpha)
    states = local_partial_states(student, teacher, row_mask, need, temperature, acc)
    gathered = all_gather_states(states, group)
    return loss_and_stats(gathered, need, row_mask, weighting, alpha)


def loss_and_stats(gathered, need, row_mask, weighting, alpha):
    """Merge gathered states [R, N, B, 4] and finish the rows: (per-row loss, kernel stats)."""
    state = merge_ranks(gathered)
    loss, mean1, mean2, per_base, empty = finalize(state, need, weighting, alpha)
    one = torch.ones_like(loss)
    row_weight = one if row_mask is None else row_mask.to(loss.dtype)
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros_like(loss))
    s, t, u = per_base
    stats = kernel_stats(
        s[:, 0] if s is not None else one, s[:, SUM] if s is not None else one,
        t[:, 0] if t is not None else one, t[:, SUM] if t is not None else one,
        u[:, SUM] if u is not None else one, mean1, mean2, row_weight, need, empty,
    )
    return loss, stats


def local_grad(grad_rows, student, teacher, stats, weighting, alpha, temperature):
    """This shard's slice of the gradient for per-row grad_output `grad_rows`, no communication."""
    if student.shape[-1] == 0:
        return torch.zeros_like(student)
    return torch.ops.csd_ext.csd_backward(grad_rows.to(stats.dtype), student, teacher, stats,
                                          weighting, alpha, temperature)


class _VocabParallelCSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, row_mask, weighting, alpha, temperature, group):
        with torch.no_grad():
            loss, stats = global_row_stats(student, teacher, row_mask, weighting, alpha, temperature, group)
        ctx.save_for_backward(student, teacher, stats)
        ctx.params = (weighting, alpha, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, stats = ctx.saved_tensors
        grad = local_grad(grad_rows, student, teacher, stats, *ctx.params)
        gs = grad if ctx.needs_input_grad[0] else None
        # d/dt of the stop-gradient objective is the negative of d/dz.
        gt = grad.neg().to(teacher.dtype) if ctx.needs_input_grad[1] else None
        return gs, gt, None, None, None, None, None


def vocab_parallel_csd_loss(
    student_shard,
    teacher_shard,
    labels=None,
    *,
    group=None,
    weighting="SS",
    alpha=0.5,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    check_shapes=False,
):
    """:func:`csd_ext.csd_loss` of logits split over the vocabulary across the ranks of `group`.

    Args:
        student_shard, teacher_shard: ``[..., V_local]``, this rank's contiguous slice of
            the vocabulary, slices in rank order; ``V_local`` may differ between ranks and
            may be 0 or 1.  Or ``DTensor`` logits placed ``Shard(-1)`` on one mesh
            dimension and ``Replicate()`` on the others (then `group` must be None: the
            mesh dimension's group is used, and the result is a replicated DTensor).
        labels: optional ``[...]`` integer labels, the same on every rank.
        group: process group over which the vocabulary is split (default: the world).
        weighting, alpha, temperature, ignore_index, reduction: as in ``csd_loss``; U
            counts the unmasked entries of the whole vocabulary.
        check_shapes: first check that every rank passes the same leading shape, with
            one extra all-gather of a few integers and a host sync (for debugging; off by
            default because the loss otherwise never syncs with the host).

    Returns the global loss on every rank, bitwise identical across ranks.  One
    all-gather of a few floats per row and base distribution per call; the backward
    is local.  Every rank must call it with the same leading shape, arguments and
    labels.  Without ``check_shapes`` a different row count fails inside the collective
    (gloo aborts the process with "Received data size doesn't match expected size").
    """
    if is_dtensor(student_shard) or is_dtensor(teacher_shard):
        if group is not None:
            raise ValueError("group must be None for DTensor logits: the group of their vocab-sharded mesh "
                             "dimension is used")
        return vocab_parallel_dtensor_call(
            vocab_parallel_csd_loss, student_shard, teacher_shard, labels,
            weighting=weighting, alpha=alpha, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction,
        )  # DTensors carry their global shape: torch has checked it
    check_shards(student_shard, teacher_shard)
    if labels is not None:
        check_labels(labels, student_shard)
    alpha, temperature = check_loss_options(weighting, alpha, temperature, ignore_index, reduction)
    group = resolve_group(group)
    if check_shapes:
        check_same_leading_shape(student_shard.shape[:-1], student_shard.shape[-1], student_shard.device, group)

    width = student_shard.shape[-1]
    rows = student_shard.shape[:-1].numel()  # not -1: a 0-column shard has no elements to infer it from
    student = student_shard.reshape(rows, width)
    teacher = teacher_shard.reshape(rows, width)
    row_mask = row_mask_of(labels, ignore_index)
    per_row = _VocabParallelCSD.apply(student, teacher, row_mask, weighting, alpha, temperature, group)
    return reduce_rows(per_row, row_mask, student_shard.shape[:-1], reduction)


class VocabParallelCSDLoss(torch.nn.Module):
    """Module form of :func:`vocab_parallel_csd_loss`; arguments are checked at construction."""

    def __init__(self, weighting="SS", alpha=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                 group=None, check_shapes=False):
        super().__init__()
        self.weighting = check_weighting(weighting)
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)
        self.group = group
        self.check_shapes = check_shapes

    def forward(self, student_shard, teacher_shard, labels=None):
        return vocab_parallel_csd_loss(
            student_shard, teacher_shard, labels, group=self.group,
            weighting=self.weighting, alpha=self.alpha, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction, check_shapes=self.check_shapes,
        )

    def extra_repr(self):
        return (f"weighting={self.weighting!r}, alpha={self.alpha}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
