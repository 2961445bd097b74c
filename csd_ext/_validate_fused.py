"""Argument checks of fused_linear_csd: shapes, dtypes and devices of the
hidden states, LM-head weights and the teacher, each error naming the argument."""

from typing import NamedTuple

import torch

from ._reduce import row_mask_of
from ._validate import FLOAT_DTYPES, check_loss_options


def _check_float_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _check_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def check_linear(prefix, hidden, weight, bias):
    """hidden [..., H], weight [V, H] of hidden's dtype, bias [V] or None; returns V."""
    h_name, w_name, b_name = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    _check_float_tensor(h_name, hidden)
    _check_float_tensor(w_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(
            f"{w_name} must be the 2-D LM-head weight [V, H] (the layout of nn.Linear.weight), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} has shape {tuple(weight.shape)}, i.e. H = {weight.shape[1]}, but {h_name} has "
            f"hidden size H = {hidden.shape[-1]} (shape {tuple(hidden.shape)}); expected {w_name} of "
            f"shape [V, {hidden.shape[-1]}]"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary dimension (shape {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{w_name} is {weight.dtype} but {h_name} is {hidden.dtype}; they must have the same dtype "
            f"(as for nn.Linear)"
        )
    _check_device(w_name, weight, h_name, hidden)
    if bias is not None:
        _check_float_tensor(b_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{b_name} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b_name} is {bias.dtype} but {w_name} is {weight.dtype}; they must match")
        _check_device(b_name, bias, h_name, hidden)
    return weight.shape[0]


def check_teacher(student_hidden, vocab, teacher_logits, teacher_hidden, teacher_weight, teacher_bias):
    """Exactly one teacher form: logits [..., V], or hidden [..., H_t] + weight [V, H_t] (+ bias)."""
    hidden_form = (teacher_hidden, teacher_weight, teacher_bias)
    if teacher_logits is not None and any(x is not None for x in hidden_form):
        raise ValueError(
            "give the teacher either as teacher_logits or as teacher_hidden + teacher_weight "
            "(+ teacher_bias), not both"
        )
    if teacher_logits is None:
        if teacher_hidden is None and teacher_weight is None:
            raise ValueError(
                "no teacher given: pass teacher_logits [..., V], or teacher_hidden [..., H_t] together "
                "with teacher_weight [V, H_t]"
            )
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
            raise ValueError(
                f"{missing} is missing: a teacher given by hidden states needs both teacher_hidden "
                f"[..., H_t] and teacher_weight [V, H_t]"
            )
        t_vocab = check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if t_vocab != vocab:
            raise ValueError(
                f"teacher_weight has vocabulary size {t_vocab} but student_weight has {vocab}; slice both "
                f"to the shared vocabulary, e.g. weight[:V]"
            )
        lead, t_lead = student_hidden.shape[:-1], teacher_hidden.shape[:-1]
        if t_lead != lead:
            raise ValueError(
                f"teacher_hidden must have student_hidden's leading shape {tuple(lead)}, got {tuple(t_lead)}"
            )
        _check_device("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
        return
    _check_float_tensor("teacher_logits", teacher_logits)
    if teacher_logits.dim() < 1 or teacher_logits.shape[-1] != vocab:
        raise ValueError(
            f"teacher_logits must have shape [..., V] with V = {vocab} (student_weight's vocabulary), "
            f"got {tuple(teacher_logits.shape)}; slice both to the shared vocabulary"
        )
    if teacher_logits.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_logits must have student_hidden's leading shape {tuple(student_hidden.shape[:-1])}, "
            f"got {tuple(teacher_logits.shape[:-1])}"
        )
    _check_device("teacher_logits", teacher_logits, "student_hidden", student_hidden)


def check_labels_for_hidden(labels, student_hidden):
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    lead = student_hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(
            f"labels must have student_hidden's leading shape {tuple(lead)}, got {tuple(labels.shape)}"
        )
    _check_device("labels", labels, "student_hidden", student_hidden)


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return 0  # 0 tells the op to pick it from the memory budget
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")
    return chunk_size


class LinearCall(NamedTuple):
    """A fused-linear call's arguments, checked, with its inputs flattened to rows."""

    vocab: int
    alpha: float
    temperature: float
    chunk: int
    lead: torch.Size  # the leading shape of student_hidden
    hidden: torch.Tensor  # [N, H]
    teacher: tuple  # (logits [N, V] or None, hidden [N, H_t] or None, weight, bias)
    row_mask: torch.Tensor  # [N] bool, or None when every row counts


def checked_linear_call(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                        teacher_weight, teacher_bias, labels, weighting, alpha, temperature, ignore_index,
                        reduction, chunk_size):
    """Checks a fused-linear CSD call (every error names its argument) and flattens its inputs;
    the single-device and the vocab-parallel entry points both start here."""
    vocab = check_linear("student", student_hidden, student_weight, student_bias)
    check_teacher(student_hidden, vocab, teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
    check_labels_for_hidden(labels, student_hidden)
    alpha, temperature = check_loss_options(weighting, alpha, temperature, ignore_index, reduction)
    chunk = check_chunk_size(chunk_size)
    t_logits = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    t_hidden = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    return LinearCall(vocab, alpha, temperature, chunk, student_hidden.shape[:-1],
                      student_hidden.reshape(-1, student_hidden.shape[-1]),
                      (t_logits, t_hidden, teacher_weight, teacher_bias), row_mask_of(labels, ignore_index))
