"""CSD against a sparse (top-k) teacher: `sparse_csd_loss`.

A teacher given only on a support of k ids per row is the full teacher with
-inf everywhere else; CSD leaves -inf entries out of every sum, so the loss
only needs the student's logits on the support.  Gathering them gives an
``[N, k]`` problem for the existing kernels, and autograd's backward of the
gather scatters the gradient back (zero off the support).  Nothing of size
``[N, V]`` is built besides the student's own logits and their gradient.
"""

import torch

from . import _ops  # noqa: F401  (registers the ops)
from .loss import csd_loss
from ._validate import FLOAT_DTYPES, check_labels


def check_sparse_teacher(student_shape, student_device, teacher_ids, teacher_values, what="student_logits"):
    """Shapes, dtypes and devices of ``teacher_ids`` / ``teacher_values`` (no data is read)."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if not isinstance(teacher_values, torch.Tensor):
        raise TypeError(f"teacher_values must be a torch.Tensor, got {type(teacher_values).__name__}")
    if teacher_ids.dtype != torch.int64:
        raise TypeError(f"teacher_ids must be int64, got {teacher_ids.dtype}")
    if teacher_values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_values must be a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got {teacher_values.dtype}")
    if teacher_ids.dim() < 1 or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids must have shape [..., K] with K >= 1, got {tuple(teacher_ids.shape)}")
    if teacher_ids.shape != teacher_values.shape:
        raise ValueError(f"teacher_ids and teacher_values must have the same shape [..., K], got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_values.shape)}")
    if tuple(teacher_ids.shape[:-1]) != tuple(student_shape):
        raise ValueError(f"teacher_ids must have {what}'s leading shape {tuple(student_shape)} plus K, got "
                         f"{tuple(teacher_ids.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_values", teacher_values)):
        if x.device != student_device:
            raise ValueError(f"{name} is on {x.device} but {what} is on {student_device}")


def _bad_ids(ids, vocab):
    """Per-row flags (on the device): an id out of [-1, V), a repeated id (padding -1 aside)."""
    out_of_range = ((ids < -1) | (ids >= vocab)).any(-1)
    if ids.shape[-1] < 2:
        return out_of_range, torch.zeros_like(out_of_range)
    s = ids.sort(dim=-1).values
    duplicate = ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any(-1)
    return out_of_range, duplicate


def check_ids_values(ids, vocab):
    """Raise a clear error for ids out of range or repeated in a row.

    Eager: one host sync (a single flag is read back; the row is located only
    once an error is known).  Under torch.compile: a device-side assert
    (``torch._assert_async``), so the graph has no host sync and no break; on
    CUDA its failure is reported asynchronously, as any device assert.
    """
    flat = ids.reshape(-1, ids.shape[-1])
    out_of_range, duplicate = _bad_ids(flat, vocab)
    if torch.compiler.is_compiling():
        torch._assert_async(~(out_of_range.any() | duplicate.any()),
                            "sparse_csd_loss: teacher_ids has an id out of [-1, V) or a repeated id in a row")
        return
    if bool((out_of_range | duplicate).any()):
        if bool(out_of_range.any()):
            row = int(out_of_range.nonzero()[0, 0])
            bad = flat[row][(flat[row] < -1) | (flat[row] >= vocab)][0].item()
            raise ValueError(f"teacher_ids: row {row} holds id {bad}, outside [0, {vocab}) "
                             f"(V = {vocab}; use -1 for padding)")
        row = int(duplicate.nonzero()[0, 0])
        s = flat[row].sort().values
        dup = s[1:][(s[1:] == s[:-1]) & (s[1:] >= 0)][0].item()
        raise ValueError(f"teacher_ids: row {row} holds id {dup} more than once; each row's ids must be "
                         f"distinct (-1 padding may repeat)")


def sparse_csd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor = None,
    *,
    weighting: str = "SS",
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    check_ids: bool = True,
) -> torch.Tensor:
    """CSD against a teacher known on ``K`` ids per row (e.g. a cached top-k).

    Equal, in value and in gradient, to ``csd_loss(student_logits, t_full, labels, ...)``
    where ``t_full`` is -inf everywhere except at ``teacher_ids``, where it holds
    ``teacher_values``; computed without building ``t_full``: the student's
    logits are gathered at the ids, the kernel runs on ``[N, K]``, and the
    gradient is scattered back (it is zero off the support).

    This is a different objective from full CSD: the student is matched to the
    teacher only on the support (the weights S, T, U, M are renormalised over
    it, and the student's mass elsewhere is not penalised).  See
    docs/teacher_cache.md for how it changes with K.

    Args:
        student_logits: ``[..., V]``.
        teacher_ids: int64 ``[..., K]``, distinct ids in ``[0, V)`` per row;
            ``-1`` marks padding (ignored, may repeat).  A row of only ``-1``
            has an empty support: loss 0 and zero gradient (it still counts as
            a token for ``reduction="mean"``, as in ``csd_loss``).
        teacher_values: ``[..., K]`` teacher logits or log-probabilities at the
            ids (CSD is invariant to a per-row shift, so either works).
        labels, weighting, alpha, temperature, ignore_index, reduction: as in
            :func:`csd_ext.csd_loss`.
        check_ids: check that ids are in ``[-1, V)`` and distinct in each row
            (a clear ``ValueError`` naming the row).  Costs one host sync in
            eager mode; under ``torch.compile`` it becomes a device-side assert.
            Pass False only for ids already known to be valid (e.g. from a
            hash-verified teacher cache); invalid ids then give an index error
            (out of range) or a silently different loss (duplicates).
    """
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have shape [..., V], got a 0-dim tensor")
    check_sparse_teacher(student_logits.shape[:-1], student_logits.device, teacher_ids, teacher_values)
    check_labels(labels, student_logits)
    vocab = student_logits.shape[-1]
    if check_ids:
        check_ids_values(teacher_ids, vocab)
    valid = teacher_ids >= 0
    student_k = torch.gather(student_logits, -1, teacher_ids.clamp(min=0))
    teacher_k = teacher_values.masked_fill(~valid, float("-inf"))
    return csd_loss(student_k, teacher_k, labels, weighting=weighting, alpha=alpha, temperature=temperature,
                    ignore_index=ignore_index, reduction=reduction)
